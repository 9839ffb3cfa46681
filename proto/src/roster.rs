//! Who may read a group's LOG at this operator, and which groups a device is
//! in. Devices read their groups' entries straight from LOG (one write per
//! message, whatever the group's size), so membership is kept beside it:
//! a roster per group (KV `mlsfed_rosters`) and a group list per device (KV
//! `mlsfed_device_groups`). Fanout updates both, in the group's order, at
//! each entry that changes membership (Created, Commit).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::wire::{EntryKind, LogEntry};

/// Removed devices a roster remembers: the most recently removed. A roster
/// is one KV value, rewritten at every membership change, so a group whose
/// members come and go must not grow it forever. A device removed before
/// these can no longer read its group's last entries before its removal;
/// its mailbox still tells it it was removed.
pub const MAX_REMOVED: usize = 1024;

/// The devices of one group at this operator, as of `position`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub v: u8,
    /// The last membership entry (Created or Commit) applied.
    pub position: u64,
    /// The group's epoch after it: entries sent in a later epoch follow a
    /// Commit not applied here yet, and wait for it.
    #[serde(default)]
    pub epoch: u64,
    /// Member device → the position it joined at: it reads the entries after.
    pub members: BTreeMap<String, u64>,
    /// Removed device → (joined at, removed at): it still reads up to and
    /// including the Commit that removed it, so it learns it was removed.
    pub removed: BTreeMap<String, (u64, u64)>,
}

/// What a device may read of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Entries after this position...
    pub after: u64,
    /// ...up to and including this one (None: still a member).
    pub until: Option<u64>,
}

impl Span {
    pub fn admits(&self, position: u64) -> bool {
        position > self.after && self.until.is_none_or(|u| position <= u)
    }
}

/// How one membership entry changes the roster.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<DeviceId>,
    pub removed: Vec<DeviceId>,
}

impl Change {
    /// What a Created or Commit entry adds and removes.
    pub fn of(entry: &LogEntry) -> Self {
        match entry.kind {
            EntryKind::Created => Self { added: vec![entry.sender.clone()], removed: vec![] },
            // A device the same Commit removes and adds again (a fresh leaf
            // for a stale one) stays a member: it is only added.
            EntryKind::Commit => Self {
                added: entry.welcome_recipients.clone(),
                removed: entry.removed.iter().filter(|d| !entry.welcome_recipients.contains(d)).cloned().collect(),
            },
            _ => Self::default(),
        }
    }
}

impl Roster {
    pub fn span(&self, d: &DeviceId) -> Option<Span> {
        if let Some(from) = self.members.get(d.as_str()) {
            return Some(Span { after: *from, until: None });
        }
        self.removed.get(d.as_str()).map(|(from, until)| Span { after: *from, until: Some(*until) })
    }

    /// The peer domains (other than `us`) with member devices.
    pub fn peers(&self, us: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .members
            .keys()
            .filter_map(|d| DeviceId::parse(d).ok())
            .map(|d| d.domain().to_owned())
            .filter(|d| d != us)
            .collect();
        out.dedup();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Keeps the [`MAX_REMOVED`] most recently removed devices.
    fn forget_oldest_removals(&mut self) {
        let ages = self.removed.iter().map(|(d, (_, until))| (*until, d));
        for d in oldest_beyond(ages, MAX_REMOVED) {
            self.removed.remove(&d);
        }
    }

    /// Applies a Created or Commit entry once (a replay changes nothing).
    /// The creator is a member from position 0: it reads the whole group.
    pub fn apply(&mut self, entry: &LogEntry) -> Option<()> {
        if entry.position <= self.position {
            return None;
        }
        match entry.kind {
            EntryKind::Created => {
                self.members.insert(entry.sender.to_string(), 0);
                self.epoch = 0;
            }
            EntryKind::Commit => {
                for d in &entry.removed {
                    if let Some(from) = self.members.remove(d.as_str()) {
                        self.removed.insert(d.to_string(), (from, entry.position));
                    }
                }
                for d in &entry.welcome_recipients {
                    self.removed.remove(d.as_str());
                    self.members.insert(d.to_string(), entry.position);
                }
                self.forget_oldest_removals();
                self.epoch = entry.epoch + 1;
            }
            _ => return None,
        }
        self.v = 1;
        self.position = entry.position;
        Some(())
    }
}

/// The groups of one device at this operator (KV `mlsfed_device_groups`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGroups {
    pub v: u8,
    /// Group id → the position the device was removed at (None: a member).
    /// A removed group stays listed until the device was told, so a device
    /// that returns after its removal still learns of it.
    pub groups: BTreeMap<String, Option<u64>>,
    /// Group id → the position of the Commit that last changed its entry:
    /// entries only move forward.
    #[serde(default)]
    pub changed_at: BTreeMap<String, u64>,
    /// Removed group id → when it was recorded (unix seconds): the oldest
    /// removals are forgotten first.
    #[serde(default)]
    pub removed_unix: BTreeMap<String, u64>,
}

/// Removed groups a device's list remembers: the most recently recorded.
/// The list is one KV value rewritten at every change; a device that comes
/// and goes in thousands of groups over its life must not grow it until
/// it no longer fits in a NATS message (its next group's Commit would then
/// stall in fanout). Its mailbox still tells it of a forgotten removal.
pub const MAX_REMOVED_GROUPS: usize = 1024;

/// About how many bytes a device's group list may take encoded: one KV
/// value, well under NATS' default 1 MiB message. Joins beyond it are not
/// listed: the device still gets its Welcome and reads the group, but its
/// sync does not report that group. Anyone who can claim the device's
/// last-resort KeyPackage can add it to groups; without a bound, enough of
/// them would grow the list past one NATS message, and every later Commit
/// that adds or removes the device would then stall in fanout. Removals
/// are forgotten oldest first to stay within it (and `MAX_REMOVED_GROUPS`).
/// With group ids of 60 bytes, about 3000 member groups fit beside a full
/// list of removals.
pub const MAX_LIST_BYTES: usize = 640 << 10;

/// What `DeviceGroups::record` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Changed,
    /// Nothing to record: a newer Commit already did, or this one was.
    Unchanged,
    /// A join not listed: the list is at `MAX_LIST_BYTES`.
    Full,
}

impl DeviceGroups {
    /// Records that the device joined `group` (`removed_at` None) or was
    /// removed at a position, by the Commit at `position`, `now` in unix
    /// seconds.
    pub fn record(&mut self, group: &str, removed_at: Option<u64>, position: u64, now: u64) -> Recorded {
        let newer = self.changed_at.get(group).is_some_and(|p| *p > position);
        if newer || self.groups.get(group) == Some(&removed_at) {
            return Recorded::Unchanged;
        }
        if removed_at.is_none() && !self.groups.contains_key(group) {
            // Room for a new member group comes from the oldest removals
            // if need be, never from groups the device is in.
            let grows = member_bytes(group);
            if self.forget_removals(MAX_REMOVED_GROUPS, MAX_LIST_BYTES.saturating_sub(grows)) + grows > MAX_LIST_BYTES {
                return Recorded::Full;
            }
        }
        self.v = 1;
        self.groups.insert(group.to_owned(), removed_at);
        self.changed_at.insert(group.to_owned(), position);
        match removed_at {
            Some(_) => self.removed_unix.insert(group.to_owned(), now),
            None => self.removed_unix.remove(group),
        };
        self.forget_removals(MAX_REMOVED_GROUPS, MAX_LIST_BYTES);
        Recorded::Changed
    }

    /// Forgets removals, oldest first, while there are more than `keep` or
    /// the list takes more than `budget` bytes (`bytes`); returns what it
    /// takes then.
    fn forget_removals(&mut self, keep: usize, budget: usize) -> usize {
        let mut bytes = self.bytes();
        let removed: Vec<(u64, &String)> = self
            .groups
            .iter()
            .filter(|(_, r)| r.is_some())
            .map(|(g, _)| (self.removed_unix.get(g).copied().unwrap_or(0), g))
            .collect();
        let mut left = removed.len();
        for g in oldest_beyond(removed.into_iter(), 0) {
            if left <= keep && bytes <= budget {
                break;
            }
            self.groups.remove(&g);
            self.changed_at.remove(&g);
            if self.removed_unix.remove(&g).is_some() {
                bytes -= removed_bytes(&g);
            }
            bytes -= member_bytes(&g);
            left -= 1;
        }
        bytes
    }

    /// About the bytes of the list's JSON, never fewer.
    pub fn bytes(&self) -> usize {
        let listed: usize = self.groups.keys().map(|g| member_bytes(g)).sum();
        let removed: usize = self.removed_unix.keys().map(|g| removed_bytes(g)).sum();
        64 + listed + removed
    }
}

/// A removed group's entry in `removed_unix` in JSON (quotes, colon, a
/// time, comma).
fn removed_bytes(group: &str) -> usize {
    group.len() + 28
}

/// A listed group's two entries (`groups` and `changed_at`) in JSON, with
/// room for the largest positions.
fn member_bytes(group: &str) -> usize {
    2 * group.len() + 56
}

/// The keys beyond the `keep` youngest of `ages` (age, key), oldest first;
/// ties go by key, so every worker forgets the same ones.
fn oldest_beyond<'a>(ages: impl Iterator<Item = (u64, &'a String)>, keep: usize) -> Vec<String> {
    let mut by_age: Vec<(u64, &String)> = ages.collect();
    let excess = by_age.len().saturating_sub(keep);
    if excess == 0 {
        return Vec::new();
    }
    by_age.sort_unstable();
    by_age.into_iter().take(excess).map(|(_, k)| k.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::GroupId;

    fn entry(
        kind: EntryKind,
        position: u64,
        sender: &DeviceId,
        added: &[&DeviceId],
        removed: &[&DeviceId],
    ) -> LogEntry {
        LogEntry {
            group: GroupId::parse("mimi://a.example/r/x").unwrap(),
            position,
            prev_position: position - 1,
            epoch: 0,
            kind,
            sender: sender.clone(),
            submission_id: String::new(),
            message: vec![],
            removed: removed.iter().map(|d| (*d).clone()).collect(),
            welcome: None,
            welcome_recipients: added.iter().map(|d| (*d).clone()).collect(),
        }
    }

    #[test]
    fn spans_follow_joins_and_removals_once() {
        let a = DeviceId::parse("mimi://a.example/d/alice/1").unwrap();
        let b = DeviceId::parse("mimi://b.example/d/bob/1").unwrap();
        let mut r = Roster::default();
        assert!(r.apply(&entry(EntryKind::Created, 1, &a, &[], &[])).is_some());
        assert_eq!(r.span(&a), Some(Span { after: 0, until: None }));
        assert!(r.apply(&entry(EntryKind::Application, 2, &a, &[], &[])).is_none());
        let add = entry(EntryKind::Commit, 3, &a, &[&b], &[]);
        assert!(r.apply(&add).is_some());
        assert_eq!(Change::of(&add).added, vec![b.clone()]);
        // A replay of the same Commit changes nothing.
        assert!(r.apply(&add).is_none());
        assert_eq!(r.peers("a.example"), vec!["b.example".to_owned()]);
        let span = r.span(&b).unwrap();
        assert!(!span.admits(3) && span.admits(4));
        r.apply(&entry(EntryKind::Commit, 7, &a, &[], &[&b]));
        let span = r.span(&b).unwrap();
        assert!(span.admits(7) && !span.admits(8));
        assert!(r.peers("a.example").is_empty());
        // Removed and added again by one Commit (a fresh leaf for a stale
        // one): a member from that Commit on, never "removed".
        let again = entry(EntryKind::Commit, 9, &a, &[&b], &[&b]);
        assert_eq!(Change::of(&again), Change { added: vec![b.clone()], removed: vec![] });
        r.apply(&again);
        assert_eq!(r.span(&b), Some(Span { after: 9, until: None }));
    }

    #[test]
    fn a_device_list_remembers_only_the_latest_removed_groups() {
        use Recorded::*;
        let mut list = DeviceGroups::default();
        let n = MAX_REMOVED_GROUPS + 10;
        for i in 0..n {
            assert_eq!(list.record(&format!("g{i}"), None, 1, 100), Changed);
        }
        // A stale Commit never moves an entry back; a repeat changes nothing.
        assert_eq!(list.record("g0", None, 1, 100), Unchanged);
        for i in 0..n {
            assert_eq!(list.record(&format!("g{i}"), Some(5), 5, 1000 + i as u64), Changed);
        }
        let last = format!("g{}", n - 1);
        assert_eq!(list.record(&last, None, 1, 9999), Unchanged, "a stale add must not undo a removal");
        assert_eq!(list.record("member", None, 3, 5000), Changed);
        let removed = list.groups.values().filter(|r| r.is_some()).count();
        assert_eq!(removed, MAX_REMOVED_GROUPS);
        assert_eq!(list.groups.get("member"), Some(&None), "groups it is in are never forgotten");
        assert!(!list.groups.contains_key("g0"), "the oldest removal is forgotten");
        assert_eq!(list.groups.get(&last), Some(&Some(5)));
        assert_eq!(list.changed_at.len(), list.groups.len());
        assert_eq!(list.removed_unix.len(), MAX_REMOVED_GROUPS);
    }

    #[test]
    fn a_device_list_stays_within_its_bytes() {
        use Recorded::*;
        // Group ids as long as ids may be: the fewest fit.
        let id = |i: usize| format!("{i:0>200}");
        let mut list = DeviceGroups::default();
        let mut n = 0;
        while n < 10_000 && list.record(&id(n), None, 1, 100) == Changed {
            n += 1;
        }
        assert!(n > 1000 && n < 10_000, "{n} groups of long ids were listed");
        assert_eq!(list.record(&id(n), None, 1, 100), Full);
        assert!(!list.groups.contains_key(&id(n)));
        // Removals go on being recorded, and the oldest are forgotten to
        // stay within the bytes; a join takes the place a removal freed.
        for i in 0..n {
            assert_eq!(list.record(&id(i), Some(7), 7, 200 + i as u64), Changed);
            if i % 97 == 0 {
                assert!(serde_json::to_vec(&list).unwrap().len() <= MAX_LIST_BYTES, "after removal {i}");
            }
        }
        assert_eq!(list.record(&id(n), None, 2, 9000), Changed);
        assert!(list.groups.contains_key(&id(n - 1)), "the latest removal is remembered");
        assert!(!list.groups.contains_key(&id(0)), "the oldest removal is forgotten");
        // A join already listed is not a new one.
        assert_eq!(list.record(&id(n), None, 2, 9001), Unchanged);
        let encoded = serde_json::to_vec(&list).unwrap();
        assert!(encoded.len() <= MAX_LIST_BYTES, "{} bytes", encoded.len());
        assert!(list.bytes() >= encoded.len(), "the estimate is below the truth: {} < {}", list.bytes(), encoded.len());
    }

    #[test]
    fn a_roster_remembers_only_the_latest_removals() {
        let a = DeviceId::parse("mimi://a.example/d/alice/1").unwrap();
        let others: Vec<DeviceId> =
            (0..MAX_REMOVED + 100).map(|i| DeviceId::parse(&format!("mimi://a.example/d/u{i}/1")).unwrap()).collect();
        let mut r = Roster::default();
        r.apply(&entry(EntryKind::Created, 1, &a, &[], &[]));
        let everyone: Vec<&DeviceId> = others.iter().collect();
        r.apply(&entry(EntryKind::Commit, 2, &a, &everyone, &[]));
        // Removed one per Commit, oldest first.
        for (i, d) in others.iter().enumerate() {
            r.apply(&entry(EntryKind::Commit, 3 + i as u64, &a, &[], &[d]));
        }
        assert_eq!(r.removed.len(), MAX_REMOVED);
        assert_eq!(r.span(&others[0]), None, "the oldest removal is forgotten");
        let last = others.last().unwrap();
        assert_eq!(r.span(last), Some(Span { after: 2, until: Some(2 + others.len() as u64) }));
        assert_eq!(r.members.len(), 1);
    }
}
