//! Sequencer metrics. Labels are closed sets (error codes), never identifiers.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub accepted: IntCounter,
    pub rejected: IntCounterVec,
    pub cas_conflicts: IntCounter,
    pub replayed: IntCounter,
    pub dead_letters: IntCounter,
    pub duplicates: IntCounter,
    pub step_seconds: Histogram,
    /// Entries per LOG append: above 1 when a busy group's waiting
    /// submissions went in one atomic batch.
    pub append_entries: Histogram,
    /// Runs appended one entry at a time because the process already had
    /// `max_batches_in_flight` atomic batches in flight.
    pub batches_busy: IntCounter,
    pub checkpoint_bytes: Histogram,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_failures: IntCounter,
    pub checkpoint_cleanup_failures: IntCounter,
    pub checkpoint_restores: IntCounter,
    pub checkpoint_fallbacks: IntCounter,
    pub partitions_owned: IntGauge,
    pub partition_owned: IntGaugeVec,
}

impl Metrics {
    /// Counts a decided submission by its verdict.
    pub(crate) fn count(&self, verdict: &proto::wire::Verdict) {
        match verdict {
            proto::wire::Verdict::Accepted { .. } => self.accepted.inc(),
            proto::wire::Verdict::Rejected(e) => self.rejected.with_label_values(&[e.code.as_str()]).inc(),
        }
    }

    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            accepted: IntCounter::new("mlsfed_sequencer_accepted_total", "Submissions appended to a group log.")?,
            rejected: IntCounterVec::new(
                Opts::new("mlsfed_sequencer_rejected_total", "Submissions refused, by error code."),
                &["code"],
            )?,
            cas_conflicts: IntCounter::new(
                "mlsfed_sequencer_cas_conflicts_total",
                "Appends that lost the per-group compare-and-set and were re-validated.",
            )?,
            replayed: IntCounter::new(
                "mlsfed_sequencer_replayed_entries_total",
                "LOG entries replayed to rebuild state.",
            )?,
            dead_letters: IntCounter::new(
                "mlsfed_sequencer_dead_letters_total",
                "Submissions given up on: undecodable, or moved to MLSFED_DEAD after bounded deliveries.",
            )?,
            duplicates: IntCounter::new(
                "mlsfed_sequencer_duplicate_appends_total",
                "Submissions found already in LOG by the append's duplicate ack (answered from the stored entry).",
            )?,
            step_seconds: Histogram::with_opts(
                HistogramOpts::new("mlsfed_sequencer_step_seconds", "Time to decide one submission.")
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16)?),
            )?,
            batches_busy: IntCounter::new(
                "mlsfed_sequencer_batches_busy_total",
                "Runs of waiting messages appended one at a time: the process had its atomic batches in flight.",
            )?,
            append_entries: Histogram::with_opts(
                HistogramOpts::new(
                    "mlsfed_sequencer_append_entries",
                    "Entries per LOG append (a busy group's waiting application messages go in one atomic batch).",
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 8)?),
            )?,
            checkpoint_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "mlsfed_sequencer_checkpoint_bytes",
                    "Size of each group state checkpoint stored (object store, chunked).",
                )
                .buckets(prometheus::exponential_buckets(1024.0, 4.0, 10)?),
            )?,
            checkpoint_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "mlsfed_sequencer_checkpoint_seconds",
                    "Time to store one group state checkpoint and move its pointer.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            checkpoint_failures: IntCounter::new(
                "mlsfed_sequencer_checkpoint_failures_total",
                "Group state checkpoints that could not be stored (retried on the group's next submission).",
            )?,
            checkpoint_cleanup_failures: IntCounter::new(
                "mlsfed_sequencer_checkpoint_cleanup_failures_total",
                "Superseded checkpoint objects that could not be deleted (left as orphans).",
            )?,
            checkpoint_restores: IntCounter::new(
                "mlsfed_sequencer_checkpoint_restores_total",
                "Group states loaded from their checkpoint.",
            )?,
            checkpoint_fallbacks: IntCounter::new(
                "mlsfed_sequencer_checkpoint_fallbacks_total",
                "Loads whose checkpoint was missing or unreadable, replayed from the start of the group's LOG instead.",
            )?,
            partitions_owned: IntGauge::new(
                "mlsfed_sequencer_partitions_owned",
                "SUBMIT partitions this sequencer process orders now.",
            )?,
            partition_owned: IntGaugeVec::new(
                Opts::new(
                    "mlsfed_sequencer_partition_owned",
                    "1 for each SUBMIT partition this process orders now (a closed set: 0..streams.partitions).",
                ),
                &["partition"],
            )?,
        };
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.partition_owned.clone()))?;
        registry.register(Box::new(m.accepted.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.cas_conflicts.clone()))?;
        registry.register(Box::new(m.replayed.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.step_seconds.clone()))?;
        registry.register(Box::new(m.append_entries.clone()))?;
        registry.register(Box::new(m.batches_busy.clone()))?;
        registry.register(Box::new(m.checkpoint_bytes.clone()))?;
        registry.register(Box::new(m.checkpoint_seconds.clone()))?;
        registry.register(Box::new(m.checkpoint_failures.clone()))?;
        registry.register(Box::new(m.checkpoint_cleanup_failures.clone()))?;
        registry.register(Box::new(m.checkpoint_restores.clone()))?;
        registry.register(Box::new(m.checkpoint_fallbacks.clone()))?;
        Ok(m)
    }
}
