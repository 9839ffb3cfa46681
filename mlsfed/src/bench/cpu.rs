//! CPU time of the processes a run involves, read from `/proc` (Linux; on
//! other systems nothing is reported). A process near as many cores as the
//! machine has is what limits the run; when none is, the limit is waiting
//! (a serial step, a round trip), not work. Tooling, not behaviour.

use std::time::Instant;

use serde_json::json;

/// The kernel reports process times in ticks of 1/100 s (`USER_HZ`, fixed
/// for `/proc` whatever the kernel's own tick).
const TICKS_PER_SEC: f64 = 100.0;

/// User plus system CPU seconds of one process, all its threads.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // the fields after it start at the state (field 3).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// A group of processes measured together, such as every sequencer.
pub struct Group {
    pub name: String,
    pub pids: Vec<u32>,
}

impl Group {
    pub fn new(name: &str, pids: impl IntoIterator<Item = u32>) -> Self {
        Self { name: name.to_owned(), pids: pids.into_iter().collect() }
    }
}

/// CPU used by each group between `start` and `stop`.
pub struct Clock {
    groups: Vec<(Group, f64)>,
    t0: Instant,
}

impl Clock {
    pub fn start(groups: Vec<Group>) -> Self {
        let groups = groups
            .into_iter()
            .map(|g| {
                let used = g.pids.iter().filter_map(|p| cpu_secs(*p)).sum();
                (g, used)
            })
            .collect();
        Self { groups, t0: Instant::now() }
    }

    /// Cores each group kept busy on average (CPU seconds per second);
    /// empty where `/proc` is not readable.
    pub fn stop(&self) -> Vec<(String, f64)> {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let mut out = Vec::new();
        for (g, before) in self.groups.iter().filter(|(g, _)| !g.pids.is_empty()) {
            let now: Option<f64> = g.pids.iter().map(|p| cpu_secs(*p)).sum();
            if let Some(now) = now {
                out.push((g.name.clone(), (now - before) / secs));
            }
        }
        out
    }
}

/// Prints one line for the table and records the same figures under
/// `key` in the JSON report; nothing where `/proc` gave nothing.
pub fn note(report: &mut serde_json::Map<String, serde_json::Value>, key: &str, cores: &[(String, f64)]) {
    if cores.is_empty() {
        return;
    }
    let machine = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let parts: Vec<String> = cores.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    println!("  CPU in cores (of {machine}): {}", parts.join(", "));
    let obj: serde_json::Map<String, serde_json::Value> = cores.iter().map(|(n, c)| (n.clone(), json!(c))).collect();
    report.insert(key.to_owned(), serde_json::Value::Object(obj));
}
