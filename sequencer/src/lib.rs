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
//! decision 2). The in-memory group state is a cache of the group's latest
//! durable checkpoint plus the LOG entries after it (`checkpoint.rs`): LOG
//! entries expire, so every change to a group's public state is
//! checkpointed before its verdict is announced.
#![forbid(unsafe_code)]

mod checkpoint;
mod decide;
mod metrics;
mod state;
mod validate;

use std::sync::Arc;

use async_nats::jetstream::{self, message::PublishMessage, AckKind};
use bytes::Bytes;
use openmls_rust_crypto::RustCrypto;
use proto::federation::Payload;
use proto::names;
use proto::partitions::{GroupHandler, Role};
use proto::streams::Topology;
use proto::wire::{Submission, Verdict};
use tokio_util::sync::CancellationToken;

use decide::GroupDecider;
pub use metrics::Metrics;

/// How many times one submission is retried after losing a CAS race before
/// it is handed back to JetStream for redelivery.
const CAS_RETRIES: usize = 8;
/// Positions of application messages between two checkpoints of a group's
/// state (every other kind of entry is checkpointed at once): bounds the
/// replay after a checkpoint.
const CHECKPOINT_EVERY: u64 = 32;
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
    checkpoints: checkpoint::Checkpoints,
    /// Partitions (LOG subjects name the group's) and delivery bounds.
    streams: config::Streams,
    /// Atomic batch appends this process has in flight at once: nats-server
    /// takes at most 50 per stream, from every writer together.
    batches: tokio::sync::Semaphore,
    /// Decided submissions whose verdicts are being announced (`settle`).
    settling: Arc<tokio::sync::Semaphore>,
    settlers: tokio_util::task::TaskTracker,
}

/// Decided submissions per process whose verdicts may be in the making at
/// once, beyond which deciding waits.
const SETTLING: usize = 4096;

pub struct Sequencer {
    ctx: Arc<Ctx>,
}

impl Sequencer {
    pub fn new(topo: Topology, domain: String, cfg: config::Streams, metrics: Metrics) -> Self {
        let checkpoints = checkpoint::Checkpoints::new(&topo, metrics.checkpoint_cleanup_failures.clone());
        let batches = tokio::sync::Semaphore::new(cfg.max_batches_in_flight.max(1) as usize);
        let crypto = RustCrypto::default();
        let settling = Arc::new(tokio::sync::Semaphore::new(SETTLING));
        let settlers = tokio_util::task::TaskTracker::new();
        let ctx = Ctx { topo, domain, crypto, metrics, checkpoints, streams: cfg, batches, settling, settlers };
        Self { ctx: Arc::new(ctx) }
    }

    /// Joins the sequencers of this operator and orders the partitions it
    /// is given until `shutdown` fires; then hands them over.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunSequencerError> {
        let role = Role {
            name: ROLE,
            stream: self.ctx.topo.submit.clone(),
            consumer: names::sequencer_consumer,
            filter: names::submit_partition_filter,
            priority_group: names::SEQUENCER_PRIORITY_GROUP,
        };
        let metrics = &self.ctx.metrics;
        let on_owned =
            proto::partitions::ownership_gauges(metrics.partitions_owned.clone(), metrics.partition_owned.clone());
        let ctx = self.ctx.clone();
        let new_group = move || GroupDecider { ctx: ctx.clone(), state: None, trace: None };
        let members = self.ctx.topo.members.clone();
        let served =
            proto::partitions::serve(role, members, self.ctx.streams.clone(), new_group, on_owned, shutdown).await;
        // Verdicts being announced go out before the process ends, so their
        // submitters hear them now rather than after a redelivery.
        self.ctx.settlers.close();
        if tokio::time::timeout(std::time::Duration::from_secs(10), self.ctx.settlers.wait()).await.is_err() {
            tracing::warn!("verdicts still being announced at shutdown; their submissions will be redelivered");
        }
        // Their announcements and acks may still sit in the client's buffer.
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(5), self.ctx.topo.js.client().flush()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::debug!("NATS flush at shutdown did not complete");
        }
        served?;
        Ok(())
    }
}

impl GroupHandler for GroupDecider {
    async fn handle_batch(&mut self, msgs: Vec<jetstream::Message>) {
        use proto::trace;
        let mut subs = Vec::with_capacity(msgs.len());
        let mut rest = Vec::new();
        for msg in msgs {
            // Anything out of the ordinary (undecodable) goes the usual way,
            // after the run: `handle` sets it aside.
            match proto::wire::decode::<Submission>(&msg.payload) {
                Ok(sub) if rest.is_empty() => subs.push((msg, sub)),
                _ => rest.push(msg),
            }
        }
        let mut spans: Vec<Option<trace::Span>> = subs.iter().map(|(msg, sub)| decide_span(msg, sub)).collect();
        let run: Vec<(&Submission, Option<trace::Context>)> =
            subs.iter().zip(&spans).map(|((_, sub), span)| (sub, trace::context(span))).collect();
        let verdicts = self.decide_run(&run).await;
        drop(run);
        let decided = verdicts.len();
        for (span, v) in spans.iter_mut().zip(&verdicts) {
            note_verdict(span, v);
        }
        for span in spans.drain(..decided) {
            trace::end(span);
        }
        drop(spans);
        let mut settled = Vec::with_capacity(decided);
        let mut undecided = Vec::new();
        let mut verdicts = verdicts.into_iter();
        for (msg, sub) in subs {
            match verdicts.next() {
                Some(v) => settled.push((msg, sub, v)),
                None => undecided.push(msg),
            }
        }
        self.ctx.settle(settled).await;
        for msg in undecided.into_iter().chain(rest) {
            self.handle(msg).await;
        }
    }

    async fn idle(&mut self) {
        self.checkpoint_idle().await;
    }

    async fn handle(&mut self, msg: jetstream::Message) {
        let sub: Submission = match proto::wire::decode(&msg.payload) {
            Ok(s) => s,
            Err(e) => {
                // Only our ingest and bridge write SUBMIT; an undecodable
                // record (a bug, or a newer format: version skew) is set
                // aside with its reason, never silently, and never blocks
                // the group. A dead-letter stream that cannot take it
                // leaves it for a redelivery.
                let ctx = &self.ctx;
                if proto::streams::dead_letter(&ctx.topo, ROLE, e.label(), &e.to_string(), &msg).await {
                    ctx.metrics.dead_letters.inc();
                } else {
                    let _ = msg.ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(5)))).await;
                }
                return;
            }
        };
        use proto::trace;
        let mut span = decide_span(&msg, &sub);
        self.trace = trace::context(&span);
        let decided = self.decide_one(&sub).await;
        self.trace = None;
        match &decided {
            Ok(v) => note_verdict(&mut span, v),
            Err(_) => trace::set(&mut span, "mlsfed.deferred", true),
        }
        trace::end(span);
        match decided {
            Ok(verdict) => self.ctx.settle(vec![(msg, sub, verdict)]).await,
            Err(StepError::Transient(e)) => {
                tracing::warn!(error = %e, "submission deferred");
                self.state = None;
                let ctx = &self.ctx;
                let outcome =
                    proto::streams::retry_or_dead_letter(&ctx.topo, &ctx.streams, ROLE, "transient", &e, &msg).await;
                if outcome == proto::streams::Retry::DeadLettered {
                    ctx.metrics.dead_letters.inc();
                    // Whoever waits (or retries: SUBMIT's dedup drops the
                    // resend) learns that it was not decided.
                    let refusal = proto::ApiError::new(
                        proto::ErrorCode::Unavailable,
                        "the submission could not be decided; it is in the operator's dead letters",
                    );
                    ctx.publish_verdict(&sub, &Verdict::Rejected(refusal)).await;
                }
            }
        }
    }
}

/// The span of one submission's decision, in the trace its ingest began.
fn decide_span(msg: &jetstream::Message, sub: &Submission) -> Option<proto::trace::Span> {
    use proto::trace;
    let mut span = trace::Span::child("sequencer.decide", trace::Context::from_headers(msg.headers.as_ref()));
    trace::set(&mut span, "mlsfed.group", &sub.group);
    span
}

/// What the decision was, on its span.
fn note_verdict(span: &mut Option<proto::trace::Span>, verdict: &Verdict) {
    match verdict {
        Verdict::Accepted { position, .. } => proto::trace::set(span, "mlsfed.position", position),
        Verdict::Rejected(e) => proto::trace::set(span, "mlsfed.refused", e.code.as_str()),
    }
}

impl Ctx {
    /// Announces the verdicts of decided submissions and then acks them, in
    /// a task of its own: the group goes on to its next submission at once
    /// instead of after the verdict's record is stored. Bounded: at most
    /// [`SETTLING`] submissions per process wait for this at once, and a
    /// stopping process waits for them (`run`). A crash before the ack
    /// redelivers the submission, which the cached recent verdicts or the
    /// LOG answer the same way, and the verdict is announced again.
    async fn settle(self: &Arc<Self>, decided: Vec<(jetstream::Message, Submission, Verdict)>) {
        if decided.is_empty() {
            return;
        }
        let n = u32::try_from(decided.len()).unwrap_or(u32::MAX).min(SETTLING as u32);
        let Ok(permit) = self.settling.clone().acquire_many_owned(n).await else {
            return;
        };
        let ctx = self.clone();
        self.settlers.spawn(async move {
            futures::future::join_all(decided.iter().map(|(_, sub, v)| ctx.publish_verdict(sub, v))).await;
            for (msg, _, _) in decided {
                // A lost ack only means a redelivery (see above).
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "ack of submission failed; it will be redelivered");
                }
            }
            drop(permit);
        });
    }

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
