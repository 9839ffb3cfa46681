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

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt as _;
use tokio::sync::watch;
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
        loop {
            if let Err(e) = self.announce().await {
                tracing::warn!(role = self.role, error = %e, "cannot refresh membership");
            }
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
        owned.send_replace(Owned::new());
        let _ = self.kv.delete(names::member_key(self.role, &self.instance)).await;
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
