//! `mlsfed admin groups show <group-id>`: where one group stands at this
//! operator. Counts only: never message contents, never who the members
//! are.

use std::collections::BTreeMap;

use anyhow::Context as _;
use async_nats::jetstream::stream::DirectGetErrorKind;
use clap::Subcommand;
use proto::roster::Roster;
use proto::wire::{EntryKind, LogEntry};
use proto::{names, DeviceId, GroupId};
use serde_json::json;

use super::out::Fields;
use super::Ctx;

#[derive(Subcommand)]
pub enum GroupsCmd {
    /// Hub, epoch, last LOG position, partition, and member devices counted
    /// by domain (as this operator's roster records them).
    Show {
        /// The group id (`mimi://<hub>/r/<room>`).
        group: String,
    },
}

pub(super) async fn run(ctx: &Ctx<'_>, cmd: GroupsCmd) -> anyhow::Result<()> {
    match cmd {
        GroupsCmd::Show { group } => show(ctx, &group).await,
    }
}

async fn show(ctx: &Ctx<'_>, group: &str) -> anyhow::Result<()> {
    let g = GroupId::parse(group).map_err(|e| anyhow::anyhow!("not a group id: {e}"))?;
    let partitions = ctx.cfg.streams.partitions.max(1);
    let subject = names::log_subject(&g, partitions);
    let log = ctx.js.get_stream(names::LOG_STREAM).await.context("MLSFED_LOG is missing")?;
    let last = match log.direct_get_last_for_subject(subject.as_str()).await {
        Ok(m) => Some(proto::wire::decode::<LogEntry>(&m.payload).context("the group's last LOG entry is unreadable")?),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
        Err(e) => return Err(e).context("cannot read the LOG"),
    };
    let entries = log.info_with_subjects(subject.as_str()).await;
    let entries = match entries {
        Ok(mut s) => {
            use futures::TryStreamExt as _;
            let mut n = 0u64;
            while let Some((s, count)) = s.try_next().await? {
                if s == subject {
                    n += count as u64;
                }
            }
            n
        }
        Err(e) => return Err(e).context("cannot count the group's LOG entries"),
    };
    let key = names::group_key(&g);
    let rosters = ctx.js.get_key_value(names::ROSTERS_BUCKET).await.context("the rosters bucket is missing")?;
    let roster: Option<Roster> = match rosters.get(&key).await? {
        Some(b) => Some(serde_json::from_slice(&b).context("the group's roster is unreadable")?),
        None => None,
    };
    anyhow::ensure!(last.is_some() || roster.is_some(), "{group} is not known here (no LOG entry, no roster)");
    // Only `done`: the rest of the cursor is fanout's.
    #[derive(serde::Deserialize)]
    struct Cursor {
        #[serde(default)]
        done: u64,
    }
    let fanout = ctx.js.get_key_value(names::FANOUT_BUCKET).await.context("the fanout bucket is missing")?;
    let delivered = fanout.get(&key).await?.and_then(|b| serde_json::from_slice::<Cursor>(&b).ok()).map(|c| c.done);
    // Only `position`: the checkpoint pointer is the sequencer's.
    #[derive(serde::Deserialize)]
    struct Pointer {
        position: u64,
    }
    let checkpoint = match ctx.js.get_key_value(names::GROUPS_BUCKET).await {
        Ok(kv) => kv.get(&key).await?.and_then(|b| serde_json::from_slice::<Pointer>(&b).ok()).map(|p| p.position),
        Err(_) => None,
    };
    // The epoch now: after the last entry (a Commit moves it on), and
    // never behind what the roster applied.
    let after_last = last.as_ref().map(|e| if e.kind == EntryKind::Commit { e.epoch + 1 } else { e.epoch });
    let epoch = match (after_last, roster.as_ref()) {
        (Some(a), Some(r)) => Some(a.max(r.epoch)),
        (Some(a), None) => Some(a),
        (None, Some(r)) => Some(r.epoch),
        (None, None) => None,
    };
    let mut by_domain: BTreeMap<String, u64> = BTreeMap::new();
    let mut unparsable = 0u64;
    if let Some(r) = &roster {
        for d in r.members.keys() {
            match DeviceId::parse(d) {
                Ok(d) => *by_domain.entry(d.domain().to_owned()).or_default() += 1,
                Err(_) => unparsable += 1,
            }
        }
    }
    let row = Fields(vec![
        ("group", json!(group)),
        ("hub", json!(g.hub())),
        ("hub_here", json!(g.hub() == ctx.cfg.domain)),
        ("partition", json!(names::partition_of(&g, partitions))),
        ("position", json!(last.as_ref().map(|e| e.position))),
        ("last_kind", json!(last.as_ref().map(|e| e.kind.as_str()))),
        ("epoch", json!(epoch)),
        ("log_entries", json!(entries)),
        ("fanout_done", json!(delivered)),
        ("checkpoint_position", json!(checkpoint)),
        ("roster_position", json!(roster.as_ref().map(|r| r.position))),
        ("member_devices", json!(roster.as_ref().map(|r| r.members.len()))),
        ("members_by_domain", json!(by_domain)),
        ("removed_devices", json!(roster.as_ref().map(|r| r.removed.len()))),
        ("unreadable_member_ids", json!(unparsable)),
    ]);
    ctx.out.record(&row, &[]);
    Ok(())
}
