//! Federation metrics, labelled by configured peer domain (a small, operator
//! controlled set) or by a closed set of refusal reasons; never by group,
//! user or device.

use prometheus::{GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub sent: IntCounterVec,
    pub send_failures: IntCounterVec,
    pub outbox_pending: IntGaugeVec,
    pub outbox_age: GaugeVec,
    pub received: IntCounterVec,
    pub replays: IntCounterVec,
    pub refused: IntCounterVec,
    pub request_failures: IntCounterVec,
    pub remote_rejections: IntCounterVec,
    pub peer_version: IntGaugeVec,
    pub peer_compatible: IntGaugeVec,
    pub needs_resync: IntGaugeVec,
    pub mark: IntGaugeVec,
    pub mark_resets: IntCounterVec,
    pub outbox_restarts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub takeovers: IntCounterVec,
    pub takeover_seconds: Histogram,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let peer = &["peer"];
        let m = Self {
            sent: IntCounterVec::new(
                Opts::new("mlsfed_federation_sent_total", "Outbox records handed to a peer (acked by its JetStream)."),
                peer,
            )?,
            send_failures: IntCounterVec::new(
                Opts::new("mlsfed_federation_send_failures_total", "Failed attempts to hand an envelope to a peer."),
                peer,
            )?,
            outbox_pending: IntGaugeVec::new(
                Opts::new("mlsfed_federation_outbox_pending", "Envelopes waiting in the outbox to a peer."),
                peer,
            )?,
            outbox_age: GaugeVec::new(
                Opts::new(
                    "mlsfed_federation_outbox_lag_seconds",
                    "Age of the oldest envelope not yet handed to a peer: per-peer delivery lag.",
                ),
                peer,
            )?,
            received: IntCounterVec::new(
                Opts::new("mlsfed_federation_received_total", "Envelopes accepted from a peer."),
                peer,
            )?,
            replays: IntCounterVec::new(
                Opts::new(
                    "mlsfed_federation_replays_total",
                    "Envelopes at or below the peer's high-water mark, dropped.",
                ),
                peer,
            )?,
            refused: IntCounterVec::new(
                Opts::new("mlsfed_federation_refused_total", "Inbound envelopes and requests refused, by reason."),
                &["reason"],
            )?,
            request_failures: IntCounterVec::new(
                Opts::new("mlsfed_federation_request_failures_total", "Requests to a peer that got no answer."),
                peer,
            )?,
            remote_rejections: IntCounterVec::new(
                Opts::new("mlsfed_federation_remote_rejections_total", "Forwarded submissions the hub refused."),
                peer,
            )?,
            needs_resync: IntGaugeVec::new(
                Opts::new(
                    "mlsfed_federation_peer_needs_resync",
                    "1 when a peer stayed away longer than the outbox retention: its members must rejoin.",
                ),
                peer,
            )?,
            peer_version: IntGaugeVec::new(
                Opts::new("mlsfed_federation_peer_version", "Federation version agreed with a peer (0: none)."),
                peer,
            )?,
            peer_compatible: IntGaugeVec::new(
                Opts::new(
                    "mlsfed_federation_peer_compatible",
                    "1 when a capabilities exchange with the peer found common ground, 0 when not.",
                ),
                peer,
            )?,
            mark: IntGaugeVec::new(
                Opts::new(
                    "mlsfed_federation_mark",
                    "A peer's high-water mark: the outbox sequence of the last envelope from it that we applied.",
                ),
                peer,
            )?,
            mark_resets: IntCounterVec::new(
                Opts::new(
                    "mlsfed_federation_mark_resets_total",
                    "Operator resets of a peer's high-water mark (`mlsfed peer reset-mark`) that took effect.",
                ),
                peer,
            )?,
            outbox_restarts: IntCounterVec::new(
                Opts::new(
                    "mlsfed_federation_peer_outbox_restarts_total",
                    "Times a peer's outbox began anew (a recreated stream), so its sequence restarted lower.",
                ),
                peer,
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "mlsfed_federation_dead_letters_total",
                    "Envelopes from a peer moved to MLSFED_DEAD after bounded deliveries, and records for a peer too large for its NATS.",
                ),
                peer,
            )?,
            takeovers: IntCounterVec::new(
                Opts::new(
                    "mlsfed_federation_outbox_takeovers_total",
                    "Times this bridge took a peer's outbox over and waited for what a previous owner held.",
                ),
                peer,
            )?,
            takeover_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "mlsfed_federation_outbox_takeover_seconds",
                    "How long a bridge taking a peer's outbox over waited for a previous owner's records.",
                )
                .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0]),
            )?,
        };
        registry.register(Box::new(m.takeovers.clone()))?;
        registry.register(Box::new(m.takeover_seconds.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.mark.clone()))?;
        registry.register(Box::new(m.mark_resets.clone()))?;
        registry.register(Box::new(m.outbox_restarts.clone()))?;
        registry.register(Box::new(m.needs_resync.clone()))?;
        registry.register(Box::new(m.peer_version.clone()))?;
        registry.register(Box::new(m.peer_compatible.clone()))?;
        registry.register(Box::new(m.sent.clone()))?;
        registry.register(Box::new(m.send_failures.clone()))?;
        registry.register(Box::new(m.outbox_pending.clone()))?;
        registry.register(Box::new(m.outbox_age.clone()))?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.replays.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.request_failures.clone()))?;
        registry.register(Box::new(m.remote_rejections.clone()))?;
        Ok(m)
    }
}
