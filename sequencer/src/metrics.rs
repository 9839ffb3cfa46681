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
    pub partitions_owned: IntGauge,
    pub partition_owned: IntGaugeVec,
}

impl Metrics {
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
        Ok(m)
    }
}
