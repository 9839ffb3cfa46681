//! `mlsfed cluster --chaos`: on the two-operator cluster topology, one
//! process of each role at each operator, then a NATS node of each, is
//! SIGKILLed while four members (two per operator) keep talking in a group
//! hosted by a.example, and started again. Two members race Commits while
//! a NATS node is down. Then it checks what users would notice:
//! - every accepted message reached every member once, in the hub's order;
//! - a message whose answer was lost to an outage arrived at most once;
//! - every member applied the group in one order and ends in the same epoch;
//! - no epoch has two Commits in the hub's LOG;
//!
//! and prints the kill report. Any violation makes the command fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use client::{ClientError, Device, Event};
use proto::wire::{EntryKind, LogEntry};
use proto::{names, DeviceId, UserId};

use super::Topology;
use crate::unix_now;

/// What is killed, one at a time.
#[derive(Clone, Copy)]
enum Victim {
    /// (operator, role, index)
    Worker(usize, &'static str, usize),
    /// (operator, node); `true`: two members race Commits meanwhile.
    Nats(usize, usize, bool),
}

const PLAN: [Victim; 10] = [
    Victim::Worker(0, "ingest", 0),
    Victim::Worker(0, "sequencer", 0),
    Victim::Worker(0, "fanout", 0),
    Victim::Worker(0, "bridge", 0),
    Victim::Worker(1, "ingest", 1),
    Victim::Worker(1, "sequencer", 1),
    Victim::Worker(1, "fanout", 1),
    Victim::Worker(1, "bridge", 1),
    Victim::Nats(0, 1, true),
    Victim::Nats(1, 2, false),
];

/// Messages sent before and after each kill, and at least during it.
const PER_PHASE: usize = 3;
/// How long the load runs with the victim dead: longer than a partition's
/// failover, so the group's own owner being the victim shows.
const OUTAGE: Duration = Duration::from_secs(4);

/// A member device, reopened at its operator's other ingest when its own
/// dies (as a load balancer in front of both would do).
struct Member {
    name: &'static str,
    op: usize,
    ingest: usize,
    home: PathBuf,
    token: String,
    device: Option<Device>,
    events: Vec<Event>,
}

impl Member {
    fn open(topo: &Topology, name: &'static str, op: usize, ingest: usize) -> anyhow::Result<Self> {
        let cfg = &topo.ops[op].cfg;
        let id = DeviceId::new(&cfg.domain, name, "phone")?;
        let token = proto::auth::issue(cfg.token_secret.expose().as_bytes(), &id, unix_now() + 6 * 3600);
        let home = topo.dir.join("devices").join(name);
        let device = Device::open(&home, &topo.ops[op].ingest_urls[ingest], &token, Some(&id))?;
        Ok(Self { name, op, ingest, home, token, device: Some(device), events: Vec::new() })
    }

    fn dev(&mut self) -> &mut Device {
        self.device.as_mut().expect("the device is open")
    }

    fn reopen(&mut self, url: &str, ingest: usize) -> anyhow::Result<()> {
        // Its store allows one opener at a time.
        self.device = None;
        self.device = Some(Device::open(&self.home, url, &self.token, None)?);
        self.ingest = ingest;
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), ClientError> {
        let events = self.dev().sync().await?;
        self.events.extend(events);
        Ok(())
    }

    /// (position, text) of every application message applied, own included.
    fn messages(&self, g: &str) -> Vec<(u64, String)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Message { group, position, text, .. } if group == g => Some((*position, text.clone())),
                _ => None,
            })
            .collect()
    }
}

/// An answer a client cannot tell from a lost one: the message may or may
/// not be in the group.
fn undecided(e: &ClientError) -> bool {
    matches!(e, ClientError::Http(_)) || e.code().is_some_and(|c| c.retryable())
}

#[derive(Default)]
struct Tally {
    accepted: Vec<String>,
    uncertain: Vec<String>,
    sent: usize,
}

pub(super) async fn run(topo: &mut Topology) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut members = vec![
        Member::open(topo, "alice", 0, 0)?,
        Member::open(topo, "bob", 0, 1)?,
        Member::open(topo, "carol", 1, 0)?,
        Member::open(topo, "dave", 1, 1)?,
    ];
    for m in &mut members {
        m.dev().publish_key_packages(4, true).await.with_context(|| format!("{}: KeyPackages", m.name))?;
    }
    let g = members[0].dev().create_group(&format!("chaos{}", rand::random::<u32>())).await?;
    let others: Vec<UserId> =
        members[1..].iter().map(|m| UserId::new(&topo.ops[m.op].cfg.domain, m.name)).collect::<Result<_, _>>()?;
    members[0].dev().add(&g, &others).await?;
    wait(&mut members, Duration::from_secs(120), "every member joins", |m| m.dev().groups().contains(&g)).await?;

    let mut tally = Tally::default();
    let mut report = Vec::new();
    for victim in PLAN {
        let urls: Vec<Vec<String>> = topo.ops.iter().map(|o| o.ingest_urls.clone()).collect();
        (members, tally) = traffic(members, g.clone(), "before".into(), tally, Duration::ZERO, urls.clone()).await?;
        // The load runs while the victim dies: the kill lands on work in
        // flight, not between two requests.
        let phase = match victim {
            Victim::Worker(_, role, index) => format!("{role}{index} down"),
            Victim::Nats(_, node, _) => format!("nats {node} down"),
        };
        let load = tokio::spawn(traffic(members, g.clone(), phase, tally, OUTAGE, urls));
        tokio::time::sleep(Duration::from_millis(300)).await;
        match victim {
            Victim::Worker(op, role, index) => {
                topo.kill(op, role, index)?;
                report.push(format!("killed {} {role}{index} (SIGKILL) under load", topo.ops[op].cfg.domain));
            }
            Victim::Nats(op, node, _) => {
                topo.ops[op].nodes[node].stop();
                report.push(format!("killed {} nats node {node} (SIGKILL) under load", topo.ops[op].cfg.domain));
            }
        }
        (members, tally) = load.await??;
        match victim {
            Victim::Worker(op, role, index) => topo.restart(op, role, index).await?,
            Victim::Nats(op, node, race) => {
                if race {
                    commit_race(&mut members, &g).await?;
                    report.push("  and bob and carol raced a Commit while that node was down".into());
                }
                topo.ops[op].nodes[node].restart()?;
            }
        }
        let urls: Vec<Vec<String>> = topo.ops.iter().map(|o| o.ingest_urls.clone()).collect();
        (members, tally) = traffic(members, g.clone(), "after".into(), tally, Duration::ZERO, urls).await?;
    }

    // Once everything is back, a message goes through (the first tries may
    // still meet a stream electing its leader).
    let mut last = None;
    for attempt in 0..120 {
        let text = format!("all back, try {attempt}");
        tally.sent += 1;
        match members[0].dev().send(&g, &text).await {
            Ok(p) => {
                tally.accepted.push(text);
                last = Some(p);
                break;
            }
            Err(e) if undecided(&e) => {
                tally.uncertain.push(text);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let last = last.context("no message accepted after everything came back")?;
    wait(&mut members, Duration::from_secs(180), "every member applies the last message", |m| {
        m.dev().applied(&g) >= last
    })
    .await?;

    // What users would notice.
    let mut by_position: BTreeMap<u64, String> = BTreeMap::new();
    for m in &members {
        let got = m.messages(&g);
        let texts: Vec<&String> = got.iter().map(|(_, t)| t).collect();
        let accepted: Vec<&String> = texts.iter().copied().filter(|t| tally.accepted.contains(t)).collect();
        anyhow::ensure!(
            accepted == tally.accepted.iter().collect::<Vec<_>>(),
            "{}: accepted messages lost, doubled or reordered ({} of {} arrived)",
            m.name,
            accepted.len(),
            tally.accepted.len()
        );
        for t in &tally.uncertain {
            anyhow::ensure!(texts.iter().filter(|x| **x == t).count() <= 1, "{}: {t:?} arrived twice", m.name);
        }
        anyhow::ensure!(got.windows(2).all(|w| w[0].0 < w[1].0), "{}: positions out of order", m.name);
        for (p, t) in &got {
            let seen = by_position.entry(*p).or_insert_with(|| t.clone());
            anyhow::ensure!(seen == t, "position {p} is {seen:?} for one member and {t:?} for {}", m.name);
        }
        let failed: Vec<&Event> = m.events.iter().filter(|e| matches!(e, Event::Failed { .. })).collect();
        anyhow::ensure!(failed.is_empty(), "{}: {failed:?}", m.name);
    }
    let epochs: Vec<Option<Vec<u8>>> = members.iter_mut().map(|m| m.dev().epoch_authenticator(&g)).collect();
    anyhow::ensure!(epochs.windows(2).all(|w| w[0] == w[1]), "members ended in different epochs");
    let commits = commit_epochs(topo, &g).await?;
    let mut unique = commits.clone();
    unique.sort_unstable();
    unique.dedup();
    anyhow::ensure!(unique.len() == commits.len(), "two Commits for one epoch: {commits:?}");

    println!("chaos kill report ({:.0} s):", t0.elapsed().as_secs_f64());
    for r in &report {
        println!("  {r}");
    }
    println!("  (each victim was started again after {OUTAGE:?} of load)");
    println!(
        "  {} messages sent: {} accepted, each delivered once and in order to all {} members; {} unanswered \
         during outages, none delivered twice",
        tally.sent,
        tally.accepted.len(),
        members.len(),
        tally.uncertain.len()
    );
    for m in &members {
        println!("  {}@{}: {} messages applied", m.name, topo.ops[m.op].cfg.domain, m.messages(&g).len());
    }
    println!("  {} Commits in the hub's LOG, one per epoch; every member in the same epoch", commits.len());
    println!("chaos OK");
    Ok(())
}

/// One message from each member in turn: `PER_PHASE` at least, and for
/// `at_least`. A member whose ingest stopped answering moves to its
/// operator's other ingest (`urls`), as behind a load balancer.
async fn traffic(
    mut members: Vec<Member>,
    g: String,
    phase: String,
    mut tally: Tally,
    at_least: Duration,
    urls: Vec<Vec<String>>,
) -> anyhow::Result<(Vec<Member>, Tally)> {
    let t0 = Instant::now();
    let mut i = 0;
    while i < PER_PHASE || t0.elapsed() < at_least {
        let k = tally.sent % members.len();
        let m = &mut members[k];
        let text = format!("{phase} #{} from {}", tally.sent, m.name);
        tally.sent += 1;
        i += 1;
        match m.dev().send(&g, &text).await {
            Ok(_) => tally.accepted.push(text),
            Err(e) if undecided(&e) => {
                if matches!(e, ClientError::Http(_)) {
                    let other = 1 - m.ingest;
                    m.reopen(&urls[m.op][other], other)?;
                }
                tally.uncertain.push(text);
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {text:?} refused: {e}", m.name)),
        }
    }
    Ok((members, tally))
}

/// bob (at the hub) and carol (at the follower) commit at once: one wins
/// the epoch, the other is refused with `wrong_epoch` and the SDK rebuilds
/// its Commit on the next epoch.
async fn commit_race(members: &mut [Member], g: &str) -> anyhow::Result<()> {
    let (left, right) = members.split_at_mut(2);
    let (bob, carol) = (&mut left[1], &mut right[0]);
    bob.sync().await.ok();
    carol.sync().await.ok();
    let (b, c) = tokio::join!(bob.dev().update(g), carol.dev().update(g));
    for (who, r) in [("bob", b), ("carol", c)] {
        match r {
            Ok(()) => {}
            // Refused for good: the hub would not take a Commit it should.
            Err(e) if e.code().is_some_and(|c| !c.retryable()) => anyhow::bail!("{who}'s Commit refused: {e}"),
            // Undecided, or accepted but not yet back at the device: the
            // device settles it on its next sync, and the checks at the end
            // see whether it did.
            Err(e) => println!("  {who}'s Commit was not settled during the outage: {e}"),
        }
    }
    Ok(())
}

/// Syncs every member until `done` holds for all (bounded); a retryable
/// refusal is waited out.
async fn wait(
    members: &mut [Member],
    limit: Duration,
    what: &str,
    done: impl Fn(&mut Member) -> bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        for m in members.iter_mut() {
            match m.sync().await {
                Ok(()) => {}
                Err(e) if undecided(&e) => {}
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", m.name)),
            }
        }
        if members.iter_mut().all(&done) {
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The epoch of every Commit in the hub's LOG for `g`, in LOG order.
async fn commit_epochs(topo: &Topology, g: &str) -> anyhow::Result<Vec<u64>> {
    let cfg = &topo.ops[0].cfg;
    let nats = mlsfed::connect(&cfg.nats_url, "").await?;
    let group = proto::GroupId::parse(g)?;
    let subject = names::log_subject(&group, cfg.streams.partitions);
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page =
            proto::direct::batch(&nats, names::LOG_STREAM, &subject, from, 256, None, Duration::from_secs(10)).await?;
        let Some(last) = page.last().map(|s| s.seq) else { break };
        for stored in &page {
            let entry: LogEntry = proto::wire::decode(&stored.payload)?;
            if entry.kind == EntryKind::Commit {
                out.push(entry.epoch);
            }
        }
        from = last + 1;
    }
    Ok(out)
}
