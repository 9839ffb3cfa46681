//! Idempotent creation of every stream, consumer and bucket from config.
//! Every role calls [`ensure`] at start-up, so whichever worker starts first
//! creates the topology and the others find it in place.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, object_store, stream};

use crate::names;

#[derive(Debug, thiserror::Error)]
pub enum EnsureStreamsError {
    #[error("cannot create stream {name}: {source}")]
    Stream { name: &'static str, source: jetstream::context::CreateStreamError },
    #[error("cannot create bucket {name}: {source}")]
    Bucket { name: &'static str, source: jetstream::context::CreateKeyValueError },
    #[error("cannot open bucket {name}: {source}")]
    OpenBucket { name: &'static str, source: jetstream::context::KeyValueError },
    #[error("streams.partitions does not match MLSFED_SUBMIT (its transform is {have:?}, this config needs {want:?}); changing P is a migration")]
    Partitions { have: String, want: String },
    #[error("cannot create object store {name}: {source}")]
    ObjectStore { name: &'static str, source: jetstream::context::ObjectStoreError },
    #[error("cannot open the stream of object store {name}: {source}")]
    ObjectStoreStream { name: &'static str, source: jetstream::context::GetStreamError },
    #[error("cannot update stream {name}: {source}")]
    Update { name: &'static str, source: jetstream::context::UpdateStreamError },
    #[error("cannot reopen stream {name} after its update: {source}")]
    Reopen { name: &'static str, source: jetstream::context::GetStreamError },
    #[error("cannot read the stream of {name}: {source}")]
    Inspect { name: &'static str, source: jetstream::context::GetStreamError },
    #[error("cannot create consumer {name}: {source}")]
    Consumer { name: &'static str, source: jetstream::stream::ConsumerError },
}

/// Handles to everything a worker uses.
#[derive(Clone)]
pub struct Topology {
    pub js: jetstream::Context,
    pub submit: stream::Stream,
    pub log: stream::Stream,
    pub mailbox: stream::Stream,
    /// Per group: the pointer to its latest checkpoint in `state`.
    pub groups: kv::Store,
    /// Groups' public-state checkpoints (chunked objects).
    pub state: object_store::ObjectStore,
    /// The stream behind `state`, for purging what deleted objects leave.
    pub state_stream: stream::Stream,
    pub fanout: kv::Store,
    pub verdicts: kv::Store,
    pub rosters: kv::Store,
    pub device_groups: kv::Store,
    pub fed_out: stream::Stream,
    /// Our inbound stream from each configured peer, by domain.
    pub fed_in: std::collections::HashMap<String, stream::Stream>,
    pub federation: kv::Store,
    pub forwarded: kv::Store,
    pub nonces: kv::Store,
    pub members: kv::Store,
    pub dead: stream::Stream,
    pub kp_used: stream::Stream,
}

/// `name` labels errors (a peer's inbound stream has the prefix); the
/// stream is `cfg.name`.
async fn ensure_stream(
    js: &jetstream::Context,
    cfg: stream::Config,
    name: &'static str,
) -> Result<stream::Stream, EnsureStreamsError> {
    // An existing stream takes the configured retention, replicas and
    // dedup window at start (an operator changes them by restarting with
    // new settings), and what the code relies on: a LOG stream made by an
    // older version gets the republish that ingest's tails follow and the
    // atomic batches the bridge appends with. A change the server refuses
    // (more replicas than servers, say) stops the start with its reason.
    let wanted = cfg.clone();
    let mut stream =
        js.get_or_create_stream(cfg).await.map_err(|source| EnsureStreamsError::Stream { name, source })?;
    let current = stream.cached_info().config.clone();
    // The server reports "no limit" as -1 where a config may say 0, and
    // fills in its own dedup window where none is set.
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    // Subjects only grow: a stream made by an older version gets the
    // subjects this one writes to (the mailbox's shared Welcomes).
    let missing = wanted.subjects.iter().any(|s| !current.subjects.contains(s));
    let differs = missing
        || current.max_age != wanted.max_age
        || limit(current.max_bytes) != limit(wanted.max_bytes)
        || limit(current.max_messages_per_subject) != limit(wanted.max_messages_per_subject)
        || current.num_replicas.max(1) != wanted.num_replicas.max(1)
        || (!wanted.duplicate_window.is_zero() && current.duplicate_window != wanted.duplicate_window)
        || current.republish != wanted.republish
        || current.allow_atomic_publish != wanted.allow_atomic_publish;
    if differs {
        tracing::info!(stream = name, "applying the configured limits to an existing stream");
        let config = stream::Config {
            max_age: wanted.max_age,
            max_bytes: wanted.max_bytes,
            max_messages_per_subject: wanted.max_messages_per_subject,
            num_replicas: wanted.num_replicas,
            duplicate_window: if wanted.duplicate_window.is_zero() {
                current.duplicate_window
            } else {
                wanted.duplicate_window
            },
            republish: wanted.republish,
            allow_atomic_publish: wanted.allow_atomic_publish,
            subjects: {
                let mut subjects = current.subjects.clone();
                subjects.extend(wanted.subjects.iter().filter(|s| !current.subjects.contains(s)).cloned());
                subjects
            },
            ..current
        };
        js.update_stream(config).await.map_err(|source| EnsureStreamsError::Update { name, source })?;
        stream =
            js.get_stream(wanted.name.as_str()).await.map_err(|source| EnsureStreamsError::Reopen { name, source })?;
    }
    Ok(stream)
}

/// A bucket's or object store's own stream takes the configured replicas
/// and max age at start, as [`ensure_stream`] does for ours.
async fn apply_to_backing_stream(
    js: &jetstream::Context,
    stream_name: &str,
    replicas: usize,
    max_age: Duration,
    name: &'static str,
) -> Result<(), EnsureStreamsError> {
    let mut stream = js.get_stream(stream_name).await.map_err(|source| EnsureStreamsError::Inspect { name, source })?;
    let current = stream.cached_info().config.clone();
    if current.num_replicas.max(1) == replicas.max(1) && current.max_age == max_age {
        return Ok(());
    }
    tracing::info!(bucket = name, "applying the configured replicas and age to an existing bucket");
    let config = stream::Config { num_replicas: replicas, max_age, ..current };
    js.update_stream(config).await.map_err(|source| EnsureStreamsError::Update { name, source })?;
    // Refresh what later calls see.
    let _ = stream.info().await;
    Ok(())
}

async fn ensure_bucket(
    js: &jetstream::Context,
    cfg: kv::Config,
    name: &'static str,
) -> Result<kv::Store, EnsureStreamsError> {
    let (replicas, max_age) = (cfg.num_replicas, cfg.max_age);
    match js.get_key_value(name).await {
        Ok(s) => {
            // Boxed: inline, its future would grow every caller's (debug
            // builds overflow a worker thread's stack).
            Box::pin(apply_to_backing_stream(js, &names::kv_stream(name), replicas, max_age, name)).await?;
            Ok(s)
        }
        Err(_) => match js.create_key_value(cfg).await {
            Ok(s) => Ok(s),
            // Another worker created it between our get and our create.
            Err(_) => js.get_key_value(name).await.map_err(|source| EnsureStreamsError::OpenBucket { name, source }),
        },
    }
}

async fn ensure_object_store(
    js: &jetstream::Context,
    cfg: object_store::Config,
    name: &'static str,
) -> Result<object_store::ObjectStore, EnsureStreamsError> {
    let (replicas, max_age) = (cfg.num_replicas, cfg.max_age);
    match js.get_object_store(name).await {
        Ok(s) => {
            Box::pin(apply_to_backing_stream(js, &names::object_store_stream(name), replicas, max_age, name)).await?;
            Ok(s)
        }
        Err(_) => match js.create_object_store(cfg).await {
            Ok(s) => Ok(s),
            // Another worker created it between our get and our create.
            Err(_) => {
                js.get_object_store(name).await.map_err(|source| EnsureStreamsError::ObjectStore { name, source })
            }
        },
    }
}

pub async fn ensure(js: &jetstream::Context, all: &config::Config) -> Result<Topology, EnsureStreamsError> {
    let cfg = &all.streams;
    let replicas = cfg.replicas.max(1);
    let (src, dest) = names::submit_transform(cfg.partitions.max(1));
    let submit = ensure_stream(
        js,
        stream::Config {
            name: names::SUBMIT_STREAM.into(),
            subjects: vec![names::SUBMIT_WILDCARD.into()],
            subject_transform: Some(stream::SubjectTransform { source: src, destination: dest }),
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: cfg.duplicate_window(),
            num_replicas: replicas,
            ..Default::default()
        },
        names::SUBMIT_STREAM,
    )
    .await?;
    // LOG subjects and SUBMIT's transform must agree on P, or two processes
    // would order one group on two subjects (a fork): refuse to start.
    let (_, want) = names::submit_transform(cfg.partitions.max(1));
    let have = submit.cached_info().config.subject_transform.as_ref().map(|t| t.destination.clone());
    if have.as_deref() != Some(want.as_str()) {
        return Err(EnsureStreamsError::Partitions { have: have.unwrap_or_default(), want });
    }
    let log = ensure_stream(
        js,
        stream::Config {
            name: names::LOG_STREAM.into(),
            subjects: vec![names::LOG_WILDCARD.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(cfg.log_max_age_secs),
            duplicate_window: cfg.duplicate_window(),
            allow_direct: true,
            num_replicas: replicas,
            republish: Some(stream::Republish {
                source: names::LOG_REPUBLISH.0.into(),
                destination: names::LOG_REPUBLISH.1.into(),
                headers_only: false,
            }),
            // A peer's entries are appended many at once (`proto::batch`).
            allow_atomic_publish: true,
            ..Default::default()
        },
        names::LOG_STREAM,
    )
    .await?;
    let mailbox = ensure_stream(
        js,
        stream::Config {
            name: names::MAILBOX_STREAM.into(),
            subjects: vec![names::MAILBOX_WILDCARD.into(), names::WELCOME_WILDCARD.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(cfg.mailbox_max_age_secs),
            duplicate_window: cfg.duplicate_window(),
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        },
        names::MAILBOX_STREAM,
    )
    .await?;
    let groups = ensure_bucket(
        js,
        kv::Config { bucket: names::GROUPS_BUCKET.into(), history: 1, num_replicas: replicas, ..Default::default() },
        names::GROUPS_BUCKET,
    )
    .await?;
    let state = ensure_object_store(
        js,
        object_store::Config {
            bucket: names::STATE_BUCKET.into(),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
        names::STATE_BUCKET,
    )
    .await?;
    let state_stream = js
        .get_stream(names::STATE_STREAM)
        .await
        .map_err(|source| EnsureStreamsError::ObjectStoreStream { name: names::STATE_BUCKET, source })?;
    let fanout = ensure_bucket(
        js,
        kv::Config { bucket: names::FANOUT_BUCKET.into(), history: 1, num_replicas: replicas, ..Default::default() },
        names::FANOUT_BUCKET,
    )
    .await?;
    let verdicts = ensure_bucket(
        js,
        kv::Config {
            bucket: names::VERDICTS_BUCKET.into(),
            history: 1,
            max_age: cfg.duplicate_window(),
            num_replicas: replicas,
            ..Default::default()
        },
        names::VERDICTS_BUCKET,
    )
    .await?;
    let rosters = ensure_bucket(
        js,
        kv::Config { bucket: names::ROSTERS_BUCKET.into(), history: 1, num_replicas: replicas, ..Default::default() },
        names::ROSTERS_BUCKET,
    )
    .await?;
    let device_groups = ensure_bucket(
        js,
        kv::Config {
            bucket: names::DEVICE_GROUPS_BUCKET.into(),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        },
        names::DEVICE_GROUPS_BUCKET,
    )
    .await?;
    let fed_out = ensure_stream(
        js,
        stream::Config {
            name: names::FED_OUT_STREAM.into(),
            subjects: vec![names::FED_OUT_WILDCARD.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(all.federation.outbox_max_age_secs),
            // JetStream refuses a duplicate window longer than the max age.
            duplicate_window: cfg.duplicate_window().min(Duration::from_secs(all.federation.outbox_max_age_secs)),
            num_replicas: replicas,
            // A run of a group's entries is handed to its peers at once
            // (`proto::batch`), stored all together or not at all.
            allow_atomic_publish: true,
            ..Default::default()
        },
        names::FED_OUT_STREAM,
    )
    .await?;
    // One inbound stream per peer: JetStream's duplicate detection is per
    // stream and takes the publisher's Nats-Msg-Id, so in a shared stream a
    // peer could pre-empt another peer's envelope ids and have them dropped
    // as duplicates. Each is bounded in bytes too, refusing new envelopes
    // when full (the peer's outbox keeps them), so no peer fills our disk.
    let mut fed_in = std::collections::HashMap::new();
    for peer in &all.peers {
        let name = names::fed_in_stream(&peer.domain);
        let stream = ensure_stream(
            js,
            stream::Config {
                name: name.clone(),
                subjects: vec![names::fed_in_subject(&peer.domain)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(all.federation.outbox_max_age_secs),
                max_bytes: all.federation.inbox_max_bytes,
                discard: stream::DiscardPolicy::New,
                duplicate_window: cfg.duplicate_window().min(Duration::from_secs(all.federation.outbox_max_age_secs)),
                num_replicas: replicas,
                ..Default::default()
            },
            names::FED_IN_STREAM_PREFIX,
        )
        .await?;
        fed_in.insert(peer.domain.clone(), stream);
    }
    let federation = ensure_bucket(
        js,
        kv::Config {
            bucket: names::FEDERATION_BUCKET.into(),
            history: 1,
            num_replicas: replicas,
            ..Default::default()
        },
        names::FEDERATION_BUCKET,
    )
    .await?;
    // A forwarded submission may wait in our outbox as long as the outbox
    // keeps it, and its verdict arrives after that.
    let forwarded = ensure_bucket(
        js,
        kv::Config {
            bucket: names::FORWARDED_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(all.federation.outbox_max_age_secs) + cfg.duplicate_window(),
            num_replicas: replicas,
            ..Default::default()
        },
        names::FORWARDED_BUCKET,
    )
    .await?;
    // A request is answered only within the window either side of our
    // clock; its nonce must be remembered at least that long.
    let nonces = ensure_bucket(
        js,
        kv::Config {
            bucket: names::NONCES_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(2 * all.federation.request_window_secs.max(1) + 60),
            num_replicas: replicas,
            ..Default::default()
        },
        names::NONCES_BUCKET,
    )
    .await?;
    // Live worker processes: a key each, refreshed every heartbeat; the
    // max age is how long a crashed process keeps its partitions.
    let members = ensure_bucket(
        js,
        kv::Config {
            bucket: names::MEMBERS_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(cfg.partition_failover_secs.max(3)),
            num_replicas: replicas,
            ..Default::default()
        },
        names::MEMBERS_BUCKET,
    )
    .await?;
    let dead = ensure_stream(
        js,
        stream::Config {
            name: names::DEAD_STREAM.into(),
            subjects: vec![names::DEAD_WILDCARD.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(cfg.dead_letter_max_age_secs.max(60)),
            num_replicas: replicas,
            ..Default::default()
        },
        names::DEAD_STREAM,
    )
    .await?;
    let kp_used = ensure_stream(
        js,
        stream::Config {
            name: names::KP_USED_STREAM.into(),
            subjects: vec![names::KP_USED_SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: cfg.duplicate_window(),
            num_replicas: replicas,
            ..Default::default()
        },
        names::KP_USED_STREAM,
    )
    .await?;
    Ok(Topology {
        js: js.clone(),
        dead,
        kp_used,
        members,
        nonces,
        submit,
        log,
        mailbox,
        groups,
        state,
        state_stream,
        fanout,
        verdicts,
        rosters,
        device_groups,
        fed_out,
        fed_in,
        federation,
        forwarded,
    })
}

/// A durable consumer worked by one process at a time among several
/// (pinned in priority group `group`), and its message stream. The pin
/// moves to a standby that pulls once the owner has not pulled for
/// `failover`. What the old owner held unacked comes back after `ack_wait`;
/// a new owner that must keep order waits for it (see the bridge's
/// outbox). An existing consumer is updated to this configuration.
#[allow(clippy::too_many_arguments)]
pub async fn pinned_messages(
    stream: &stream::Stream,
    name: &str,
    filter: &str,
    group: &str,
    max_ack_pending: i64,
    ack_wait: Duration,
    max_deliver: i64,
    failover: Duration,
) -> Result<(jetstream::consumer::PullConsumer, jetstream::consumer::pull::Stream), String> {
    let config = pull::Config {
        max_deliver,
        priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![group.to_owned()],
        priority_timeout: failover,
        ..durable_config(name, filter, max_ack_pending, ack_wait)
    };
    let consumer: jetstream::consumer::PullConsumer =
        stream.create_consumer(config).await.map_err(|e| e.to_string())?;
    // Pull well within the failover time, so a live owner keeps its pin.
    let expires = (failover / 3).max(Duration::from_secs(1));
    let messages = consumer
        .stream()
        .group(group)
        .expires(expires)
        .heartbeat(expires / 2)
        .max_messages_per_batch(max_ack_pending.clamp(1, 256) as usize)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    Ok((consumer, messages))
}

/// A durable pull consumer with explicit acks; `filter` empty: the whole
/// stream. `max_ack_pending` bounds what is in flight (1 or a batch keeps
/// order where order matters).
pub fn durable_config(name: &str, filter: &str, max_ack_pending: i64, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(name.into()),
        filter_subject: filter.into(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        ..Default::default()
    }
}

/// The message stream of a durable consumer (created if missing).
/// `max_deliver`: the server's bound on deliveries of one message (0: none,
/// for consumers that hold messages on purpose, like a peer's outbox).
pub async fn durable_messages(
    stream: &stream::Stream,
    name: &str,
    filter: &str,
    max_ack_pending: i64,
    ack_wait: Duration,
    max_deliver: i64,
) -> Result<jetstream::consumer::pull::Stream, String> {
    let config = pull::Config { max_deliver, ..durable_config(name, filter, max_ack_pending, ack_wait) };
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_or_create_consumer(name, config).await.map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// The consumer was closed under a worker (the stream or consumer was
/// deleted): the worker stops and its process restarts it.
#[derive(Debug, thiserror::Error)]
#[error("consumer {0} closed")]
pub struct ConsumerClosed(pub &'static str);

/// The next message of a worker's consumer, or `Ok(None)` once `shutdown`
/// fires. Transient errors (missed heartbeats while NATS restarts) are
/// logged and waited out, so every worker loop reads the same way.
pub async fn next_message(
    messages: &mut jetstream::consumer::pull::Stream,
    shutdown: &tokio_util::sync::CancellationToken,
    what: &'static str,
) -> Result<Option<jetstream::Message>, ConsumerClosed> {
    use futures::StreamExt;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            m = messages.next() => m,
        };
        match next {
            Some(Ok(m)) => return Ok(Some(m)),
            Some(Err(e)) => {
                tracing::warn!(consumer = what, error = %e, "consumer error; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => return Err(ConsumerClosed(what)),
        }
    }
}

/// What became of a message whose handling failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Handed back for redelivery after a backoff.
    Later,
    /// Moved to `MLSFED_DEAD` after `max_deliver` deliveries.
    DeadLettered,
}

/// Bounded deliveries (design decision 12): a failed message is redelivered
/// with exponential backoff (`retry_base_ms` doubling, capped at 30 s) until
/// it has been delivered `max_deliver` times; then it is copied to
/// `MLSFED_DEAD` with `reason` and terminated, so it never blocks the
/// messages behind it forever. If the dead-letter stream cannot take it, it
/// stays and is retried.
pub async fn retry_or_dead_letter(
    topo: &Topology,
    cfg: &config::Streams,
    role: &str,
    reason: &str,
    detail: &str,
    msg: &jetstream::Message,
) -> Retry {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u64;
    if delivered as i64 >= cfg.max_deliver && dead_letter(topo, role, reason, detail, msg).await {
        return Retry::DeadLettered;
    }
    let _ = msg.ack_with(jetstream::AckKind::Nak(Some(retry_wait(cfg, delivered)))).await;
    Retry::Later
}

/// A period drawn at random between half and one and a half times
/// `period`: timers of many sockets or tails started together (a restart,
/// a reconnect storm) then stay apart instead of all reading JetStream in
/// the same instant. Ten thousand re-reads fired together made every read
/// of the stream wait past its timeout in `mlsfed bench`.
pub fn spread(period: Duration) -> Duration {
    let ms = period.as_millis().max(2) as u64;
    Duration::from_millis(ms / 2 + rand::random::<u64>() % ms)
}

/// How long a message that failed on its `attempt`th try (from 1) waits
/// for the next: `retry_base_ms` doubling, capped at 30 s.
pub fn retry_wait(cfg: &config::Streams, attempt: u64) -> Duration {
    let exp = (attempt.max(1) - 1).min(16) as u32;
    Duration::from_millis(cfg.retry_base_ms.max(1).saturating_mul(1u64 << exp)).min(Duration::from_secs(30))
}

/// Moves `msg` to `MLSFED_DEAD` with `reason` now (a record no retry can
/// help: undecodable, or of a newer format) and terminates it. `false`:
/// the dead-letter stream did not take it; the message stays.
pub async fn dead_letter(topo: &Topology, role: &str, reason: &str, detail: &str, msg: &jetstream::Message) -> bool {
    use base64::Engine as _;
    let info = msg.info().ok();
    let mut letter = crate::wire::DeadLetter {
        v: 1,
        role: role.to_owned(),
        reason: reason.to_owned(),
        detail: detail.chars().take(512).collect(),
        stream: info.as_ref().map(|i| i.stream.to_owned()).unwrap_or_default(),
        stream_seq: info.as_ref().map(|i| i.stream_sequence).unwrap_or_default(),
        subject: msg.subject.to_string(),
        delivered: info.as_ref().map(|i| i.delivered.max(1) as u64).unwrap_or(1),
        payload: base64::engine::general_purpose::STANDARD.encode(&msg.payload),
        payload_omitted: false,
    };
    let mut body = serde_json::to_vec(&letter).unwrap_or_default();
    // A record near the size limit does not fit once it is base64 in JSON:
    // without its copy, the letter still names the record and why, rather
    // than fail and leave a record no retry can help where it blocks others.
    if body.len() > dead_letter_room(topo.js.client().server_info().max_payload) {
        letter.payload = String::new();
        letter.payload_omitted = true;
        body = serde_json::to_vec(&letter).unwrap_or_default();
    }
    let stored = match topo.js.publish(names::dead_subject(role), body.into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if stored {
        tracing::error!(role, reason, detail, omitted = letter.payload_omitted, "message dead-lettered");
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
    }
    stored
}

/// The most bytes a dead letter's JSON may take on a server with
/// `max_payload`: room is left for the headers a publish adds.
fn dead_letter_room(max_payload: usize) -> usize {
    max_payload.saturating_sub(4 << 10)
}
