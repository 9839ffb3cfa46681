//! How large a body may be: what the operator configured, within what its
//! NATS server carries.

/// What a submission's record adds around its body (ids, framing, trace
/// headers) and a federation envelope around a LOG entry, with a wide
/// margin: a body must fit in one NATS message with all that.
pub const NATS_HEADROOM: usize = 64 << 10;

/// The largest body an operator takes: `limits.max_body_bytes`, unless the
/// NATS server's `max_payload` leaves less room. A body that fits the
/// configured limit but not NATS would otherwise be refused as
/// `unavailable` (retryable) at every resend, instead of once as
/// `body_too_large`. Ingest enforces it, and the bridge tells peers it
/// (`Capabilities::max_message_bytes`).
pub fn body_limit(configured: usize, nats_max_payload: usize) -> usize {
    configured.min(nats_max_payload.saturating_sub(NATS_HEADROOM)).max(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_limit_leaves_room_under_the_nats_payload() {
        // The defaults agree: NATS' 1 MiB less the headroom.
        let default = config::Config::default().limits.max_body_bytes;
        assert_eq!(body_limit(default, 1 << 20), default);
        assert_eq!(default + NATS_HEADROOM, 1 << 20);
        // A larger configured limit on a default server is lowered...
        assert_eq!(body_limit(4 << 20, 1 << 20), (1 << 20) - NATS_HEADROOM);
        // ...and a server with room takes it whole.
        assert_eq!(body_limit(4 << 20, (4 << 20) + NATS_HEADROOM), 4 << 20);
    }
}
