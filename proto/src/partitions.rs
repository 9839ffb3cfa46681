//! Partition ownership among the processes of one worker role.
//!
//! A role's work is split into P partitions (a stream subject transform puts
//! each group in `partition(P)` of its id), with one durable consumer per
//! partition. Each live process announces itself in the KV bucket
//! `mlsfed_members` (a key per process, refreshed every heartbeat, expiring
//! with the bucket's max age), and every process computes the same
//! assignment from the live set by rendezvous hashing: adding or removing a
//! process moves only about P/N partitions. A process pulls only from the
//! partitions it owns.
//!
//! Views of the live set can differ for a heartbeat or two, so two
//! processes may briefly both pull one partition. The partition consumers
//! use a pinned priority group, so the server still hands each partition's
//! messages to one of them; and correctness never rests on either: the LOG
//! compare-and-set does (design decision 2).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::names;

/// The partitions a process owns now.
pub type Owned = BTreeSet<u32>;

/// How often a process refreshes its membership and recomputes ownership.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot announce this process: {0}")]
    Announce(String),
}

/// Which of `members` owns `partition`: the highest hash of (member,
/// partition), so every process that sees the same members agrees.
pub fn owner(members: &[String], partition: u32) -> Option<&String> {
    members.iter().max_by_key(|m| score(m, partition))
}

fn score(member: &str, partition: u32) -> u64 {
    // FNV-1a 64, then the splitmix64 finalizer so that similar inputs get
    // unrelated scores: stable across processes and versions (std's hasher
    // is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member.bytes().chain(partition.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The partitions `me` owns among `members`.
pub fn assignment(members: &[String], partitions: u32, me: &str) -> Owned {
    (0..partitions).filter(|p| owner(members, *p).is_some_and(|m| m == me)).collect()
}

/// One process's membership in its role.
pub struct Membership {
    kv: kv::Store,
    role: &'static str,
    instance: String,
    partitions: u32,
}

impl Membership {
    /// Announces a new process of `role` (with a random instance id).
    pub async fn join(kv: kv::Store, role: &'static str, partitions: u32) -> Result<Self, MembershipError> {
        let instance = format!("{:016x}", rand::random::<u64>());
        let me = Self { kv, role, instance, partitions };
        me.announce().await?;
        Ok(me)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn announce(&self) -> Result<(), MembershipError> {
        let key = names::member_key(self.role, &self.instance);
        self.kv.put(key, bytes::Bytes::new()).await.map(|_| ()).map_err(|e| MembershipError::Announce(e.to_string()))
    }

    /// The live processes of this role, sorted.
    async fn members(&self) -> Result<Vec<String>, String> {
        let prefix = names::member_prefix(self.role);
        let mut keys = self.kv.keys().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| e.to_string())?;
            if let Some(id) = k.strip_prefix(&prefix) {
                out.push(id.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Refreshes the announcement every heartbeat and publishes what this
    /// process owns on `owned`, until `shutdown`; then withdraws, so the
    /// others take over at once instead of after the expiry.
    pub async fn run(self, owned: watch::Sender<Owned>, shutdown: CancellationToken) {
        // The announcements keep their own beat: a slow listing of the
        // members (a loaded server) must not let our key expire, or the
        // others would take our partitions from a live process.
        let (kv, role, key) = (self.kv.clone(), self.role, names::member_key(self.role, &self.instance));
        let stop_announcing = shutdown.child_token();
        let announcer = {
            let stop = stop_announcing.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = kv.put(key.as_str(), bytes::Bytes::new()).await {
                        tracing::warn!(role, error = %e, "cannot refresh membership");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(HEARTBEAT) => {}
                    }
                }
            })
        };
        loop {
            match self.members().await {
                Ok(mut members) => {
                    // Our own key may not be listed yet (or just expired).
                    if !members.contains(&self.instance) {
                        members.push(self.instance.clone());
                        members.sort();
                    }
                    let mine = assignment(&members, self.partitions, &self.instance);
                    owned.send_if_modified(|cur| {
                        if *cur == mine {
                            return false;
                        }
                        tracing::info!(
                            role = self.role,
                            owned = mine.len(),
                            members = members.len(),
                            "partitions reassigned"
                        );
                        *cur = mine;
                        true
                    });
                }
                Err(e) => tracing::warn!(role = self.role, error = %e, "cannot list members; keeping partitions"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
        stop_announcing.cancel();
        let _ = announcer.await;
        owned.send_replace(Owned::new());
        let _ = self.kv.delete(names::member_key(self.role, &self.instance)).await;
    }
}

/// A worker role whose work is one stream split into partitions, with one
/// pinned durable consumer per partition.
pub struct Role {
    /// The role's name among the members (`sequencer`, `fanout`).
    pub name: &'static str,
    pub stream: stream::Stream,
    /// The durable consumer of partition `k`.
    pub consumer: fn(u32) -> String,
    /// The subjects of partition `k`; the last token of each names a group.
    pub filter: fn(u32) -> String,
    pub priority_group: &'static str,
}

/// One group's work: its messages, in stream order. The handler acks, naks
/// or terminates each message itself.
pub trait GroupHandler: Send + 'static {
    fn handle(&mut self, msg: jetstream::Message) -> impl Future<Output = ()> + Send;

    /// Several of the group's messages that were waiting at once, in order
    /// (at most [`MAX_BATCH`]). A handler that can do them for the price of
    /// one (one append, one cursor write) overrides this; by default they
    /// are handled one at a time.
    fn handle_batch(&mut self, msgs: Vec<jetstream::Message>) -> impl Future<Output = ()> + Send {
        async move {
            for m in msgs {
                self.handle(m).await;
            }
        }
    }

    /// The group's task is ending (the group went idle, its room was
    /// needed, or the partition is handed over) after its last message:
    /// whatever the handler deferred is made durable now.
    fn idle(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Most messages a group task hands its handler at once.
pub const MAX_BATCH: usize = 64;

/// Told when this process takes (`true`) or hands over (`false`) a
/// partition: for metrics.
pub type OnOwned = Arc<dyn Fn(u32, bool) + Send + Sync>;

/// The usual `OnOwned`: a gauge of how many partitions this process owns,
/// and one per partition (a closed set of labels: 0..P).
pub fn ownership_gauges(total: prometheus::IntGauge, each: prometheus::IntGaugeVec) -> OnOwned {
    Arc::new(move |k, owned| {
        each.with_label_values(&[&k.to_string()]).set(i64::from(owned));
        if owned {
            total.inc();
        } else {
            total.dec();
        }
    })
}

/// Joins `role`'s members and works the partitions this process is given
/// until `shutdown`; then hands them over. Within a partition each group
/// gets its own task, made by `new_group`, so groups proceed concurrently
/// and each strictly in order; a task is dropped after the group has been
/// idle for `streams.group_idle_secs`.
pub async fn serve<H, F>(
    role: Role,
    members: kv::Store,
    cfg: config::Streams,
    new_group: F,
    on_owned: OnOwned,
    shutdown: CancellationToken,
) -> Result<(), MembershipError>
where
    H: GroupHandler,
    F: Fn() -> H + Send + Sync + 'static,
{
    let membership = Membership::join(members, role.name, cfg.partitions).await?;
    tracing::info!(role = role.name, instance = membership.instance(), "joined");
    let (owned_tx, mut owned_rx) = watch::channel(Owned::new());
    let heartbeat = tokio::spawn(membership.run(owned_tx, shutdown.clone()));
    let role = Arc::new(role);
    let new_group = Arc::new(new_group);
    let mut running: HashMap<u32, (CancellationToken, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let owned = owned_rx.borrow_and_update().clone();
        running.retain(|k, (stop, task)| {
            if owned.contains(k) && !task.is_finished() {
                return true;
            }
            stop.cancel();
            on_owned(*k, false);
            false
        });
        for k in owned {
            if running.contains_key(&k) {
                continue;
            }
            let stop = shutdown.child_token();
            let task = tokio::spawn(partition(role.clone(), cfg.clone(), k, new_group.clone(), stop.clone()));
            running.insert(k, (stop, task));
            on_owned(k, true);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = owned_rx.changed() => if changed.is_err() { break },
            // A partition task that ended on its own (its consumer failed)
            // is started again on the next turn.
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    for (k, (stop, task)) in running.drain() {
        stop.cancel();
        let _ = task.await;
        on_owned(k, false);
    }
    let _ = heartbeat.await;
    Ok(())
}

/// Pulls partition `k` and hands each message to its group's task.
async fn partition<H, F>(role: Arc<Role>, cfg: config::Streams, k: u32, new_group: Arc<F>, stop: CancellationToken)
where
    H: GroupHandler,
    F: Fn() -> H + Send + Sync + 'static,
{
    let name = (role.consumer)(k);
    let pinned = crate::streams::pinned_messages(
        &role.stream,
        &name,
        &(role.filter)(k),
        role.priority_group,
        i64::from(cfg.max_in_flight_per_partition.max(1)),
        cfg.ack_wait(),
        // The server's own bound, past ours: a worker that dies on a
        // message every time still cannot loop forever.
        cfg.max_deliver.saturating_add(2),
        Duration::from_secs(cfg.partition_failover_secs.max(3)),
    )
    .await;
    let mut messages = match pinned {
        Ok((_, m)) => m,
        Err(e) => {
            tracing::warn!(role = role.name, partition = k, error = %e, "cannot pull partition");
            return;
        }
    };
    let idle = Duration::from_secs(cfg.group_idle_secs.max(1));
    let cap = cfg.max_groups_per_partition.max(1) as usize;
    // Tells idle group tasks to end now: too many groups are cached.
    let crowded = std::sync::Arc::new(tokio::sync::Notify::new());
    // The queues are bounded by the consumer's max_ack_pending: JetStream
    // hands out no more than that unacknowledged.
    let mut groups: HashMap<String, Slot> = HashMap::new();
    // Group tasks that stopped taking messages (idle, or asked to make
    // room) and may still be finishing what they had: a new task for the
    // same group waits for the old one, so each group stays strictly
    // serial. Each entry is dropped once its task has ended.
    let mut draining: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            m = messages.next() => m,
        };
        let mut msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(role = role.name, partition = k, error = %e, "pull error; retrying");
                continue;
            }
            None => break,
        };
        let group = msg.subject.rsplit('.').next().unwrap_or_default().to_owned();
        if !groups.contains_key(&group) && groups.len() >= cap {
            // Bounded memory: ask the idle groups to go, and wait (bounded)
            // until one did; busy ones keep their state.
            retire_closed(&mut groups, &mut draining);
            let t0 = tokio::time::Instant::now();
            while groups.len() >= cap && t0.elapsed() < idle {
                crowded.notify_waiters();
                let _ = tokio::time::timeout(Duration::from_millis(50), tasks.join_next()).await;
                retire_closed(&mut groups, &mut draining);
            }
        }
        loop {
            let slot = groups.entry(group.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let (done_tx, done) = oneshot::channel();
                let previous = draining.remove(&group);
                tasks.spawn(group_task(new_group(), rx, idle, crowded.clone(), previous, done_tx));
                Slot { tx, done }
            });
            match slot.tx.send(msg) {
                Ok(()) => break,
                // The group's task went idle and closed: start another,
                // which waits for it to finish.
                Err(mpsc::error::SendError(back)) => {
                    if let Some(old) = groups.remove(&group) {
                        draining.insert(group.clone(), old.done);
                    }
                    msg = back;
                }
            }
        }
        if groups.len() > 4096 || draining.len() > 4096 {
            retire_closed(&mut groups, &mut draining);
        }
    }
    // What the server already sent us but no group task took would wait
    // out the ack wait (30 s) before the next owner saw it: hand it back
    // now instead, so a handover costs milliseconds, not the ack wait.
    // Only what is already here: reading on could take back what we hand
    // back, as long as the pin is still ours.
    let mut returned = 0usize;
    while let Some(Some(Ok(m))) = futures::FutureExt::now_or_never(messages.next()) {
        let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
        returned += 1;
    }
    if returned > 0 {
        tracing::debug!(role = role.name, partition = k, returned, "handed unstarted messages back");
    }
    // Dropping the senders lets each group task finish what it holds; wait
    // for them (bounded), so a stopping process drains its work.
    drop(groups);
    drop(messages);
    let drained =
        tokio::time::timeout(Duration::from_secs(20), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(role = role.name, partition = k, "group tasks still busy; their messages will be redelivered");
    }
    // Hand the partition over at once instead of after the failover time.
    if let Err(e) = role.stream.unpin_consumer(&name, role.priority_group).await {
        tracing::debug!(role = role.name, partition = k, error = %e, "unpin failed; the pin expires instead");
    }
}

/// A group's task as the partition loop sees it.
struct Slot {
    tx: mpsc::UnboundedSender<jetstream::Message>,
    /// Ends (its sender is dropped) when the task has ended.
    done: oneshot::Receiver<()>,
}

/// Forgets the groups whose tasks stopped taking messages, keeping what
/// tells when each has ended; and forgets those that have.
fn retire_closed(groups: &mut HashMap<String, Slot>, draining: &mut HashMap<String, oneshot::Receiver<()>>) {
    let closed: Vec<String> = groups.iter().filter(|(_, s)| s.tx.is_closed()).map(|(g, _)| g.clone()).collect();
    for g in closed {
        if let Some(slot) = groups.remove(&g) {
            draining.insert(g, slot.done);
        }
    }
    draining.retain(|_, done| matches!(done.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
}

/// Works one group's messages in order. `previous`: the group's task
/// before this one, still finishing what it had when it stopped taking
/// messages; nothing is handled before it has ended. `_done` is dropped
/// when this task ends, which tells the next one.
async fn group_task<H: GroupHandler>(
    mut handler: H,
    mut rx: mpsc::UnboundedReceiver<jetstream::Message>,
    idle: Duration,
    crowded: std::sync::Arc<tokio::sync::Notify>,
    previous: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
) {
    if let Some(previous) = previous {
        // Err: its sender was dropped, which is what ends it.
        let _ = previous.await;
    }
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => {
                    handler.idle().await;
                    return;
                }
            },
            _ = tokio::time::sleep(idle) => None,
            _ = crowded.notified() => None,
        };
        let Some(msg) = msg else {
            // Idle (or asked to make room): refuse new messages, then
            // finish the ones already queued.
            rx.close();
            while let Ok(m) = rx.try_recv() {
                handler.handle(m).await;
            }
            handler.idle().await;
            return;
        };
        // What queued while the last batch was handled goes together: under
        // load a busy group pays one round trip for many messages.
        let mut batch = vec![msg];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        match batch.len() {
            1 => handler.handle(batch.remove(0)).await,
            _ => handler.handle_batch(batch).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_assignment_is_total_and_stable() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let all: Vec<u32> = three.iter().flat_map(|m| assignment(&three, 64, m)).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>(), "every partition has exactly one owner");
        for m in &three {
            let n = assignment(&three, 64, m).len();
            assert!((8..=40).contains(&n), "{m} owns {n} of 64");
        }
        // A fourth process takes partitions only from the others; nothing
        // else moves.
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        for p in 0..64 {
            let before = owner(&three, p).cloned();
            let after = owner(&four, p).cloned();
            assert!(
                after == before || after.as_deref() == Some("d"),
                "partition {p} moved from {before:?} to {after:?}"
            );
        }
    }
}
