//! Taking a pinned consumer over from a bridge that died holding messages.
//!
//! A peer's outbox and inbox consumers are each worked by one bridge at a
//! time, with several messages in flight. When the owner dies, what it held
//! unacknowledged comes back only after the ack wait, while newer messages
//! are handed to the new owner at once. Acting on a newer one first would
//! let a high-water mark (the peer's, or ours for the peer) pass the older
//! ones, which would then be dropped as replays.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

/// What waiting for a predecessor's messages came to.
pub(crate) enum Takeover {
    /// Nothing was out with another bridge.
    Nothing,
    /// Messages another bridge held came back after this long.
    Waited(Duration),
    /// Shut down while waiting.
    Shutdown,
    /// The consumer's message stream ended.
    Closed,
    /// Waited past the limit: probably another bridge is pinned now and
    /// waits for what we hold. Everything held was handed back (nak) for
    /// whoever is pinned; the caller holds nothing any more.
    Released,
}

/// The message's sequence in its stream (0 if it carries no JetStream info).
pub(crate) fn stream_seq(m: &jetstream::Message) -> u64 {
    m.info().map(|i| i.stream_sequence).unwrap_or(0)
}

/// After this bridge may have taken `consumer` over: waits until every
/// message the consumer has out is one this bridge holds (in `batch` or
/// `carried`). What a dead owner held joins `batch` as it comes back. No
/// acting before they are back would let a high-water mark pass them. After
/// `give_up` (well past the ack wait, by when a dead bridge's messages are
/// back), two bridges may each be waiting for the other's: the pin moved
/// while both held messages. Then everything held is handed back, so that it
/// flows to the pinned bridge. `what` names the consumer in logs.
#[allow(clippy::too_many_arguments)] // The consumer's parts and the caller's holdings, all needed.
pub(crate) async fn await_predecessor(
    what: &str,
    peer: &str,
    consumer: &mut jetstream::consumer::PullConsumer,
    messages: &mut jetstream::consumer::pull::Stream,
    batch: &mut Vec<jetstream::Message>,
    carried: &VecDeque<jetstream::Message>,
    give_up: Duration,
    shutdown: &CancellationToken,
) -> Takeover {
    let t0 = tokio::time::Instant::now();
    let mut progressed = t0;
    let mut told = t0;
    let mut waited = false;
    loop {
        // What is already here counts before we ask.
        while let Some(Some(Ok(m))) = messages.next().now_or_never() {
            batch.push(m);
        }
        let mut held: Vec<u64> = batch.iter().chain(carried.iter()).map(stream_seq).collect();
        held.sort_unstable();
        held.dedup();
        match consumer.info().await {
            Ok(info) if info.num_ack_pending <= held.len() => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(peer, consumer = what, error = %e, "cannot read the consumer; asking again");
            }
        }
        if !waited {
            tracing::info!(peer, consumer = what, "taking over; waiting for what the previous owner held");
            waited = true;
        }
        if t0.elapsed() > give_up {
            tracing::warn!(
                peer,
                consumer = what,
                waited = ?t0.elapsed(),
                "gave up waiting for messages another bridge holds; handing ours back"
            );
            for m in batch.drain(..).chain(carried.iter().cloned()) {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
            return Takeover::Released;
        }
        if told.elapsed() > Duration::from_secs(30) {
            told = tokio::time::Instant::now();
            tracing::warn!(
                peer,
                consumer = what,
                waited = ?t0.elapsed(),
                "still waiting for messages another bridge holds; nothing newer is handled before them"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Takeover::Shutdown,
            m = tokio::time::timeout(Duration::from_millis(200), messages.next()) => match m {
                Ok(Some(Ok(m))) => batch.push(m),
                Ok(None) => return Takeover::Closed,
                _ => {}
            }
        }
        if progressed.elapsed() > Duration::from_secs(1) {
            progressed = tokio::time::Instant::now();
            for m in batch.iter().chain(carried.iter()) {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }
    if waited {
        Takeover::Waited(t0.elapsed())
    } else {
        Takeover::Nothing
    }
}
