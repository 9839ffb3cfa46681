//! The sequencer: takes submissions from SUBMIT, validates them against the
//! hub's public group state, and appends the accepted ones to the group's LOG.
//!
//! Groups are spread over partitions (a SUBMIT subject transform); each
//! partition is owned by one sequencer process at a time
//! (`proto::partitions`), which pulls it through a pinned consumer. Inside a
//! partition, groups are decided concurrently, each by its own task and
//! strictly in turn. Ordering is still enforced by the server that stores
//! it: every append carries `Nats-Expected-Last-Subject-Sequence`, so two
//! processes can never both append to the same position, whatever the
//! partition ownership says; the loser reloads and re-validates (design
//! decision 2). The in-memory group state is only a cache of LOG.
#![forbid(unsafe_code)]

mod decide;
mod metrics;
mod state;
mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::StreamExt as _;
use openmls_rust_crypto::RustCrypto;
use proto::federation::Payload;
use proto::partitions::{Membership, Owned};
use proto::streams::Topology;
use proto::wire::{Submission, Verdict};
use proto::{names, GroupId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use decide::GroupDecider;
pub use metrics::Metrics;

/// How many times one submission is retried after losing a CAS race before
/// it is handed back to JetStream for redelivery.
const CAS_RETRIES: usize = 8;
/// Accepted entries between two snapshots of a group's state.
const SNAPSHOT_EVERY: u64 = 32;
/// Role name in the membership bucket.
const ROLE: &str = "sequencer";

#[derive(Debug, thiserror::Error)]
pub enum RunSequencerError {
    #[error("cannot read submissions: {0}")]
    Consume(String),
    #[error(transparent)]
    Membership(#[from] proto::partitions::MembershipError),
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Infrastructure trouble (NATS unavailable, ...): leave the submission
    /// unacked so it is redelivered.
    #[error("transient: {0}")]
    Transient(String),
}

/// What every group task of this process shares.
pub(crate) struct Ctx {
    topo: Topology,
    domain: String,
    crypto: RustCrypto,
    metrics: Metrics,
}

pub struct Sequencer {
    ctx: Arc<Ctx>,
    cfg: config::Streams,
}

/// One submission handed to its group's task.
struct Job {
    sub: Submission,
    msg: jetstream::Message,
}

impl Sequencer {
    pub fn new(topo: Topology, domain: String, cfg: config::Streams, metrics: Metrics) -> Self {
        Self { ctx: Arc::new(Ctx { topo, domain, crypto: RustCrypto::default(), metrics }), cfg }
    }

    /// Joins the sequencers of this operator and orders the partitions it
    /// is given until `shutdown` fires; then hands them over.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunSequencerError> {
        let membership = Membership::join(self.ctx.topo.members.clone(), ROLE, self.cfg.partitions).await?;
        tracing::info!(instance = membership.instance(), "sequencer joined");
        let (owned_tx, mut owned_rx) = watch::channel(Owned::new());
        let members = tokio::spawn(membership.run(owned_tx, shutdown.clone()));
        // One task per owned partition, cancelled when it is reassigned.
        let mut running: HashMap<u32, (CancellationToken, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let owned = owned_rx.borrow_and_update().clone();
            let metrics = &self.ctx.metrics;
            running.retain(|p, (stop, task)| {
                if owned.contains(p) && !task.is_finished() {
                    return true;
                }
                stop.cancel();
                metrics.partition_owned.with_label_values(&[&p.to_string()]).set(0);
                false
            });
            for p in owned {
                if running.contains_key(&p) {
                    continue;
                }
                let stop = shutdown.child_token();
                let task =
                    tokio::spawn(Partition { ctx: self.ctx.clone(), cfg: self.cfg.clone(), k: p }.run(stop.clone()));
                running.insert(p, (stop, task));
                self.ctx.metrics.partition_owned.with_label_values(&[&p.to_string()]).set(1);
            }
            self.ctx.metrics.partitions_owned.set(running.len() as i64);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = owned_rx.changed() => if changed.is_err() { break },
                // A partition task that ended on its own (consumer error) is
                // restarted on the next turn.
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        for (p, (stop, task)) in running.drain() {
            stop.cancel();
            let _ = task.await;
            self.ctx.metrics.partition_owned.with_label_values(&[&p.to_string()]).set(0);
        }
        self.ctx.metrics.partitions_owned.set(0);
        let _ = members.await;
        Ok(())
    }
}

/// The work of one owned partition: pull it, and hand each submission to
/// its group's task.
struct Partition {
    ctx: Arc<Ctx>,
    cfg: config::Streams,
    k: u32,
}

impl Partition {
    async fn run(self, stop: CancellationToken) {
        let name = names::sequencer_consumer(self.k);
        let consumer = match proto::streams::partition_consumer(
            &self.ctx.topo.submit,
            &name,
            &names::submit_partition_filter(self.k),
            names::SEQUENCER_PRIORITY_GROUP,
            &self.cfg,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(partition = self.k, error = %e, "cannot open partition consumer");
                return;
            }
        };
        // Pull expiry well below the failover time, so we keep the pin
        // while alive and lose it soon after dying.
        let expires = Duration::from_secs(self.cfg.partition_failover_secs.max(3)) / 3;
        let messages = consumer
            .stream()
            .group(names::SEQUENCER_PRIORITY_GROUP)
            .expires(expires)
            .heartbeat(expires / 2)
            .max_messages_per_batch(self.cfg.max_in_flight_per_partition.clamp(1, 256) as usize)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(partition = self.k, error = %e, "cannot pull partition");
                return;
            }
        };
        let idle = Duration::from_secs(self.cfg.group_idle_secs.max(1));
        let mut groups: HashMap<GroupId, mpsc::UnboundedSender<Job>> = HashMap::new();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                m = messages.next() => m,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(partition = self.k, error = %e, "pull error; retrying");
                    continue;
                }
                None => break,
            };
            let sub: Submission = match proto::wire::decode(&msg.payload) {
                Ok(s) => s,
                Err(e) => {
                    // Only our ingest and bridge write SUBMIT; an undecodable
                    // record is a bug or version skew and must not block
                    // the partition.
                    tracing::error!(error = %e, "undecodable submission; terminating it");
                    self.ctx.metrics.dead_letters.inc();
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            // The queue of a group task is bounded by the partition's
            // max_ack_pending: JetStream hands out no more than that.
            let mut job = Job { sub, msg };
            loop {
                let tx = groups.entry(job.sub.group.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(group_task(self.ctx.clone(), rx, idle));
                    tx
                });
                match tx.send(job) {
                    Ok(()) => break,
                    // The group's task went idle and closed: start another.
                    Err(mpsc::error::SendError(back)) => {
                        groups.remove(&back.sub.group);
                        job = back;
                    }
                }
            }
            if groups.len() > 1024 {
                groups.retain(|_, tx| !tx.is_closed());
            }
        }
        // Dropping the senders lets each group task finish what it holds.
        drop(groups);
        drop(messages);
        // Hand the partition over at once instead of after the failover time.
        if let Err(e) = self.ctx.topo.submit.unpin_consumer(&name, names::SEQUENCER_PRIORITY_GROUP).await {
            tracing::debug!(partition = self.k, error = %e, "unpin failed; the pin expires instead");
        }
    }
}

/// Decides one group's submissions in turn until it has been idle for
/// `idle` (then its state is dropped) or its partition was released.
async fn group_task(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Job>, idle: Duration) {
    let mut decider = GroupDecider { ctx, state: None };
    loop {
        let job = match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(_) => {
                // Refuse new jobs, then finish the ones already queued.
                rx.close();
                while let Ok(job) = rx.try_recv() {
                    decider.run(job).await;
                }
                return;
            }
        };
        decider.run(job).await;
    }
}

impl GroupDecider {
    async fn run(&mut self, job: Job) {
        match self.handle(&job.sub).await {
            Ok(verdict) => {
                self.ctx.publish_verdict(&job.sub, &verdict).await;
                // A lost ack only means a redelivery, which the cached
                // recent verdicts or the LOG answer the same way.
                if let Err(e) = job.msg.ack().await {
                    tracing::warn!(error = %e, "ack of submission failed; it will be redelivered");
                }
            }
            Err(StepError::Transient(e)) => {
                tracing::warn!(error = %e, "submission deferred");
                self.state = None;
                let _ = job.msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
            }
        }
    }
}

impl Ctx {
    /// Records the verdict (for clients that retry) and announces it (for
    /// the waiting ingest), concurrently.
    async fn publish_verdict(&self, sub: &Submission, verdict: &Verdict) {
        let id = sub.id.as_str();
        let bytes = Bytes::from(verdict.to_bytes());
        let client = self.topo.js.client();
        let (recorded, announced) =
            tokio::join!(self.topo.verdicts.put(id, bytes.clone()), client.publish(names::verdict_subject(id), bytes),);
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "cannot record verdict");
        }
        if let Err(e) = announced {
            tracing::warn!(error = %e, "cannot announce verdict");
        }
        if let Some(peer) = &sub.origin {
            // A forwarded submission: the verdict goes back through our
            // outbox to the peer whose device sent it.
            let payload = Payload::Verdict { submission_id: sub.id.clone(), verdict: verdict.clone() };
            let publish = PublishMessage::build()
                .payload(Bytes::from(proto::wire::encode(&payload)))
                .message_id(names::fed_msg_id("verdict", &[sub.id.as_bytes()]));
            match self.topo.js.send_publish(names::fed_out_subject(peer), publish).await {
                Ok(ack) => {
                    if let Err(e) = ack.await {
                        tracing::warn!(error = %e, "verdict for a peer not queued");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "verdict for a peer not queued"),
            }
        }
    }
}
