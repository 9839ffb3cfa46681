//! Every NATS subject, stream, consumer and KV bucket name, built here and
//! nowhere else, so that a rename or a new partition scheme is one change.
//! Identifier tokens are hex (see `ids::*::token`), which keeps subjects legal
//! whatever bytes a hostile client puts in an identifier.

use crate::ids::{DeviceId, GroupId};

pub const PREFIX: &str = "mlsfed";

/// Submissions waiting for the sequencer: `mlsfed.submit.<group>` (WorkQueue).
pub const SUBMIT_STREAM: &str = "MLSFED_SUBMIT";
pub const SUBMIT_WILDCARD: &str = "mlsfed.submit.*";
/// The per-group total order: `mlsfed.log.<partition>.<group>` (Limits,
/// direct get), the partition as `partition_of` computes it, so fanout can
/// split LOG the way the sequencers split SUBMIT.
pub const LOG_STREAM: &str = "MLSFED_LOG";
pub const LOG_WILDCARD: &str = "mlsfed.log.*.*";
/// LOG republishes every entry it stored to `mlsfed.tail.<partition>.<group>`
/// with its stream sequence and the sequence of the group's previous entry
/// (`Nats-Sequence`, `Nats-Last-Sequence`): ingest's tails follow groups
/// from these instead of reading each new entry back.
pub const LOG_REPUBLISH: (&str, &str) = ("mlsfed.log.>", "mlsfed.tail.>");
/// Per-device mailboxes: `mlsfed.mbox.<device>` (Limits, direct get).
pub const MAILBOX_STREAM: &str = "MLSFED_MAILBOX";
pub const MAILBOX_WILDCARD: &str = "mlsfed.mbox.*";
/// The Welcomes of the same stream, one per Commit at
/// `mlsfed.welcome.<group>.<position>`: a Welcome is the same bytes for
/// every device it adds (and carries the whole ratchet tree), so it is
/// stored once and each added device's mailbox item only points to it.
pub const WELCOME_WILDCARD: &str = "mlsfed.welcome.*.*";

/// Per group: a small pointer to its latest checkpoint in [`STATE_BUCKET`]
/// (`{"v":1,"position":..,"object":..}`), moved forward by compare-and-set.
pub const GROUPS_BUCKET: &str = "mlsfed_groups";
/// Durable checkpoints of groups' public state: an object store, so a state
/// is stored in chunks and no group size runs into NATS' max payload. A
/// group's state must never depend on LOG entries that retention deletes.
pub const STATE_BUCKET: &str = "mlsfed_state";
/// The stream JetStream keeps [`STATE_BUCKET`] in (`OBJ_<bucket>`).
pub const STATE_STREAM: &str = "OBJ_mlsfed_state";
/// Per-group fan-out cursor: the last hub position delivered to every mailbox.
pub const FANOUT_BUCKET: &str = "mlsfed_fanout";
/// Per group: the devices of this operator that may read its LOG entries.
pub const ROSTERS_BUCKET: &str = "mlsfed_rosters";
/// Per device: the groups it is (or was just removed from) a member of.
pub const DEVICE_GROUPS_BUCKET: &str = "mlsfed_device_groups";
/// Verdicts of recent submissions, for clients that retry after a timeout.
pub const VERDICTS_BUCKET: &str = "mlsfed_verdicts";

/// What the consumer of LOG partition `k` reads.
pub fn log_partition_filter(k: u32) -> String {
    format!("{PREFIX}.log.{k}.*")
}

/// The durable consumer of LOG partition `k`.
pub fn fanout_consumer(k: u32) -> String {
    format!("fanout-p{k}")
}

/// The priority group fanout workers pull partitions in.
pub const FANOUT_PRIORITY_GROUP: &str = "fanouts";

/// SUBMIT stores `mlsfed.submit.<group>` as `mlsfed.submitp.<k>.<group>`,
/// `k` = `partition(P)` of the group token (a stream subject transform, so
/// the server is the one place that maps groups to partitions).
pub fn submit_transform(partitions: u32) -> (String, String) {
    (SUBMIT_WILDCARD.to_owned(), format!("{PREFIX}.submitp.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"))
}

/// What the consumer of SUBMIT partition `k` reads.
pub fn submit_partition_filter(k: u32) -> String {
    format!("{PREFIX}.submitp.{k}.*")
}

/// The durable consumer of SUBMIT partition `k`.
pub fn sequencer_consumer(k: u32) -> String {
    format!("sequencer-p{k}")
}

/// The priority group sequencers pull partitions in (pinned: one owner).
pub const SEQUENCER_PRIORITY_GROUP: &str = "sequencers";

/// The priority group a peer's outbox and inbox consumers are pinned in:
/// one bridge at a time works each, the others stand by.
pub const BRIDGE_PRIORITY_GROUP: &str = "bridges";

/// The queue group the bridges of one operator answer peers' requests in:
/// each request is answered once, by one of them.
pub const BRIDGE_QUEUE_GROUP: &str = "mlsfed-bridges";

/// The partition the server puts `g` in: FNV-1a (32 bit) of the subject
/// token, modulo P, as nats-server's `partition()` transform computes it.
/// For metrics, tests and the admin tools; routing is the server's.
pub fn partition_of(g: &GroupId, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in g.token().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// Messages a worker gave up on after bounded deliveries, with the reason:
/// `mlsfed.dead.<role>` (Limits; read and requeued by operators).
pub const DEAD_STREAM: &str = "MLSFED_DEAD";
pub const DEAD_WILDCARD: &str = "mlsfed.dead.*";

pub fn dead_subject(role: &str) -> String {
    format!("{PREFIX}.dead.{role}")
}

/// The subject a SUBMIT message was published on, from the subject SUBMIT
/// stored it under (`mlsfed.submitp.<k>.<group>`, see [`submit_transform`]):
/// where a dead letter of the sequencer is requeued. `None`: not one.
pub fn submit_subject_of_stored(stored: &str) -> Option<String> {
    let rest = stored.strip_prefix(&format!("{PREFIX}.submitp."))?;
    let (k, group) = rest.split_once('.')?;
    (k.parse::<u32>().is_ok() && !group.is_empty() && !group.contains('.')).then(|| format!("{PREFIX}.submit.{group}"))
}

/// JetStream keeps a KV bucket in stream `KV_<bucket>` and an object store
/// in `OBJ_<bucket>`.
pub const KV_STREAM_PREFIX: &str = "KV_";
pub const OBJ_STREAM_PREFIX: &str = "OBJ_";

/// What an mlsfed stream of that name is, for the admin tools: `("stream",
/// name)`, `("kv", bucket)` or `("object", bucket)`; `None`: not ours.
pub fn classify_stream(name: &str) -> Option<(&'static str, &str)> {
    let ours = |bucket: &str| bucket.starts_with(&format!("{PREFIX}_"));
    if name.starts_with("MLSFED_") {
        Some(("stream", name))
    } else if let Some(b) = name.strip_prefix(KV_STREAM_PREFIX).filter(|b| ours(b)) {
        Some(("kv", b))
    } else {
        name.strip_prefix(OBJ_STREAM_PREFIX).filter(|b| ours(b)).map(|b| ("object", b))
    }
}

/// The inbox consumer of one peer's envelopes: one per peer, so a peer's
/// poison only ever delays that peer.
pub fn bridge_in_consumer(peer: &str) -> String {
    format!("bridge-in-{}", domain_token(peer))
}

/// Live worker processes, per role (`mlsfed_members`, keys expire).
pub const MEMBERS_BUCKET: &str = "mlsfed_members";

pub fn member_prefix(role: &str) -> String {
    format!("{role}.")
}

pub fn member_key(role: &str, instance: &str) -> String {
    format!("{role}.{instance}")
}

pub fn submit_subject(g: &GroupId) -> String {
    format!("{PREFIX}.submit.{}", g.token())
}

pub fn log_subject(g: &GroupId, partitions: u32) -> String {
    format!("{PREFIX}.log.{}.{}", partition_of(g, partitions), g.token())
}

/// Where LOG republishes the entries stored on `log_subject` (see
/// [`LOG_REPUBLISH`]).
pub fn tail_subject(log_subject: &str) -> String {
    let rest = log_subject.strip_prefix(LOG_REPUBLISH.0.trim_end_matches('>')).unwrap_or(log_subject);
    format!("{}{rest}", LOG_REPUBLISH.1.trim_end_matches('>'))
}

pub fn mailbox_subject(d: &DeviceId) -> String {
    format!("{PREFIX}.mbox.{}", d.token())
}

/// Where the Welcome of the Commit at `position` of group `g` is stored
/// once, in the mailbox stream (see [`WELCOME_WILDCARD`]).
pub fn welcome_subject(g: &GroupId, position: u64) -> String {
    format!("{PREFIX}.welcome.{}.{position}", g.token())
}

/// Every verdict subject: one subscription per ingest process hears them.
pub const VERDICT_WILDCARD: &str = "mlsfed.verdict.*";

/// Core NATS (no stream): a removed device's id, published by the ingest
/// process that removed it, so every ingest process closes its sockets at
/// once instead of at their next periodic check.
pub const REVOKED_SUBJECT: &str = "mlsfed.revoked";

/// Core-NATS subject on which the sequencer announces a submission's verdict.
pub fn verdict_subject(submission_id: &str) -> String {
    format!("{PREFIX}.verdict.{submission_id}")
}

/// KV key of a group (groups and fanout buckets).
pub fn group_key(g: &GroupId) -> String {
    g.token()
}

/// The object holding group `g`'s public state as of hub position
/// `position`: a new name per checkpoint, so writing one never overwrites
/// the checkpoint the pointer still names.
pub fn state_object(g: &GroupId, position: u64) -> String {
    format!("{}.{position}", g.token())
}

/// The subject of an object's metadata in [`STATE_BUCKET`], as JetStream's
/// object store lays it out (`$O.<bucket>.M.<base64url(name)>`). Deleting
/// an object leaves a tombstone there; the sequencer purges it, or every
/// checkpoint ever written would leave one behind.
pub fn state_object_meta_subject(object: &str) -> String {
    use base64::Engine as _;
    format!("$O.{STATE_BUCKET}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(object))
}

/// The stream JetStream keeps KV bucket `bucket` in.
pub fn kv_stream(bucket: &str) -> String {
    format!("{KV_STREAM_PREFIX}{bucket}")
}

/// The stream JetStream keeps object store `bucket` in.
pub fn object_store_stream(bucket: &str) -> String {
    format!("{OBJ_STREAM_PREFIX}{bucket}")
}

/// The subject of one stored version of an object's chunks in
/// [`STATE_BUCKET`] (`$O.<bucket>.C.<nuid>`), read by direct gets so that a
/// read needs no consumer.
pub fn state_object_chunks_subject(nuid: &str) -> String {
    format!("$O.{STATE_BUCKET}.C.{nuid}")
}

/// KV key of a device (device groups bucket).
pub fn device_key(d: &DeviceId) -> String {
    d.token()
}

/// `Nats-Msg-Id` of a group's log entry: the submission it came from, so a
/// sequencer that crashed between append and ack cannot append it twice.
pub fn log_msg_id(submission_id: &str) -> String {
    format!("log-{submission_id}")
}

/// `Nats-Msg-Id` of one mailbox delivery: redelivered fan-out is dropped by the
/// stream's duplicate window.
pub fn mailbox_msg_id(g: &GroupId, position: u64, d: &DeviceId) -> String {
    // The ids can be long; a digest keeps the header short and fixed-size.
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(g.as_bytes());
    h.update(position.to_be_bytes());
    h.update(d.as_bytes());
    format!("mb-{}", hex::encode(&h.finalize()[..16]))
}

/// `Nats-Msg-Id` of a Commit's Welcome stored once: redelivered fan-out
/// stores it once.
pub fn welcome_msg_id(g: &GroupId, position: u64) -> String {
    fed_msg_id("wl", &[g.as_bytes(), &position.to_be_bytes()])
}

/// `Nats-Msg-Id` of a low-stock notice: one per stock level, so concurrent
/// claims that see the same level notify once.
pub fn notice_msg_id(d: &DeviceId, suite: u16, remaining: usize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(d.as_bytes());
    format!("nt-{}-{suite}-{remaining}", hex::encode(&h.finalize()[..12]))
}

/// Header names carried on JetStream messages.
pub mod headers {
    pub const POSITION: &str = "Mlsfed-Position";
    pub const EPOCH: &str = "Mlsfed-Epoch";
    pub const KIND: &str = "Mlsfed-Kind";
}

/// KeyPackages of the JetStream key directory backend:
/// `mlsfed.kp.ot.<device>.<suite>.<ref>` (one message per one-time KeyPackage;
/// deleting its message is the atomic claim) and `mlsfed.kp.res.<ref>`
/// (reservations of claimed KeyPackages).
pub const KEYPACKAGES_STREAM: &str = "MLSFED_KEYPACKAGES";
pub const KEYPACKAGES_WILDCARD: &str = "mlsfed.kp.>";
pub const RESERVATIONS_WILDCARD: &str = "mlsfed.kp.res.*";
/// Small keydir records: last-resort KeyPackages, device lists, bindings.
pub const KEYDIR_BUCKET: &str = "mlsfed_keydir";

pub fn key_package_subject(d: &DeviceId, suite: u16, kp_ref: &[u8]) -> String {
    format!("{PREFIX}.kp.ot.{}.{suite}.{}", d.token(), hex::encode(kp_ref))
}

pub fn key_packages_of(d: &DeviceId, suite: u16) -> String {
    format!("{PREFIX}.kp.ot.{}.{suite}.*", d.token())
}

pub fn reservation_subject(kp_ref: &[u8]) -> String {
    format!("{PREFIX}.kp.res.{}", hex::encode(kp_ref))
}

pub fn key_package_msg_id(kp_ref: &[u8]) -> String {
    format!("kp-{}", hex::encode(kp_ref))
}

pub fn last_resort_key(d: &DeviceId, suite: u16) -> String {
    format!("lr.{}.{suite}", d.token())
}

pub fn user_devices_key(u: &crate::ids::UserId) -> String {
    format!("user.{}", u.token())
}

/// A removed device's permanent mark (key directory bucket).
pub fn revoked_key(d: &DeviceId) -> String {
    format!("revoked.{}", d.token())
}

pub fn binding_key(d: &DeviceId) -> String {
    format!("bind.{}", d.token())
}

/// Our outbox to each peer: `mlsfed.fedout.<hex peer domain>` (Limits;
/// retention is the outage we tolerate).
pub const FED_OUT_STREAM: &str = "MLSFED_FED_OUT";
pub const FED_OUT_WILDCARD: &str = "mlsfed.fedout.*";
/// Our inbox from peers: `mlsfed.fedin.<hex origin domain>`; each peer's
/// NATS user may publish only to its own subject (docs/federation.md).
/// One stream per peer (`MLSFED_FED_IN_<hex domain>`): dedup and limits
/// are per stream, so one peer can neither drop nor crowd out another's.
pub const FED_IN_STREAM_PREFIX: &str = "MLSFED_FED_IN";

pub fn fed_in_stream(peer: &str) -> String {
    format!("{FED_IN_STREAM_PREFIX}_{}", domain_token(peer))
}
/// Per-peer high-water marks of accepted envelopes.
pub const FEDERATION_BUCKET: &str = "mlsfed_federation";
/// Submissions we forwarded to a hub: submission id → the hub's domain. A
/// verdict is accepted only from that hub, for that submission, once.
pub const FORWARDED_BUCKET: &str = "mlsfed_forwarded";
/// Nonces of peers' requests seen within the replay window.
pub const NONCES_BUCKET: &str = "mlsfed_fed_nonces";

/// Key of a peer's request nonce in [`NONCES_BUCKET`].
pub fn nonce_key(origin: &str, nonce: &[u8]) -> String {
    format!("{}.{}", domain_token(origin), hex::encode(nonce))
}

fn domain_token(domain: &str) -> String {
    hex::encode(domain.as_bytes())
}

pub fn fed_out_subject(peer: &str) -> String {
    format!("{PREFIX}.fedout.{}", domain_token(peer))
}

pub fn fed_in_subject(origin: &str) -> String {
    format!("{PREFIX}.fedin.{}", domain_token(origin))
}

/// The origin domain named by a FED_IN subject.
pub fn origin_of_fed_in(subject: &str) -> Option<String> {
    let token = subject.strip_prefix(&format!("{PREFIX}.fedin."))?;
    String::from_utf8(hex::decode(token).ok()?).ok()
}

pub fn bridge_out_consumer(peer: &str) -> String {
    format!("bridge-out-{}", domain_token(peer))
}

pub fn hwm_key(peer: &str) -> String {
    format!("hwm.{}", domain_token(peer))
}

/// An operator's instructions to our outbox for `peer` (pause, backoff
/// reset) in [`FEDERATION_BUCKET`], written by `mlsfed admin peers`.
pub fn peer_control_key(peer: &str) -> String {
    format!("ctl.{}", domain_token(peer))
}

/// Which revision of [`peer_control_key`] our bridge has applied, so an
/// operator can tell a pause in effect from one only requested.
pub fn peer_control_applied_key(peer: &str) -> String {
    format!("ctlack.{}", domain_token(peer))
}

/// On a peer's NATS: where we send it requests (claims, identity lookups).
pub fn peer_rpc_subject(origin: &str) -> String {
    format!("{PREFIX}.fedrpc.{}", domain_token(origin))
}

pub const PEER_RPC_WILDCARD: &str = "mlsfed.fedrpc.*";

/// On our NATS: ingest asks our bridge to query `peer`.
pub fn bridge_rpc_subject(peer: &str) -> String {
    format!("{PREFIX}.bridgerpc.{}", domain_token(peer))
}

pub const BRIDGE_RPC_WILDCARD: &str = "mlsfed.bridgerpc.*";

/// On our NATS: the bridge asks our key directory (served by ingest).
pub const KEYDIR_RPC_SUBJECT: &str = "mlsfed.keydir.rpc";
pub const KEYDIR_RPC_QUEUE: &str = "keydir";

/// `Nats-Msg-Id` of an envelope in a peer's FED_IN.
pub fn envelope_msg_id(origin: &str, outbox: u64, seq: u64) -> String {
    format!("{origin}-{outbox}-{seq}")
}

/// `Nats-Msg-Id` of an outbox record.
pub fn fed_msg_id(kind: &str, parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    format!("{kind}-{}", hex::encode(&h.finalize()[..16]))
}

/// The KeyPackageRefs a delivered Welcome used, so the key directory
/// settles their reservations: a WorkQueue stream, so a notice outlives an
/// ingest process that is down or dies while settling.
pub const KP_USED_STREAM: &str = "MLSFED_KP_USED";
pub const KP_USED_SUBJECT: &str = "mlsfed.kpused";
pub const KP_SETTLE_CONSUMER: &str = "keydir-settle";

/// `Nats-Msg-Id` of a released KeyPackage's return to its pool: one per
/// reservation (the KeyPackage and when it was claimed).
pub fn key_package_return_msg_id(kp_ref: &[u8], reserved_at: u64) -> String {
    format!("kpret-{}-{reserved_at}", hex::encode(kp_ref))
}

#[cfg(test)]
mod admin_name_tests {
    use super::*;

    #[test]
    fn stored_submit_subjects_map_back_and_streams_are_classified() {
        let g = GroupId::parse("mimi://a.example/r/x").unwrap();
        let stored = format!("{PREFIX}.submitp.{}.{}", partition_of(&g, 16), g.token());
        assert_eq!(submit_subject_of_stored(&stored), Some(submit_subject(&g)));
        assert_eq!(submit_subject_of_stored(&submit_subject(&g)), None);
        assert_eq!(submit_subject_of_stored("mlsfed.submitp.x.y"), None);
        assert_eq!(classify_stream(LOG_STREAM), Some(("stream", LOG_STREAM)));
        assert_eq!(classify_stream(&format!("KV_{ROSTERS_BUCKET}")), Some(("kv", ROSTERS_BUCKET)));
        assert_eq!(classify_stream(STATE_STREAM), Some(("object", STATE_BUCKET)));
        assert_eq!(classify_stream("KV_other"), None);
        assert_eq!(classify_stream("ORDERS"), None);
        let log = log_subject(&g, 16);
        assert_eq!(tail_subject(&log), format!("{PREFIX}.tail.{}.{}", partition_of(&g, 16), g.token()));
        assert_ne!(peer_control_key("b.example"), peer_control_applied_key("b.example"));
    }
}
