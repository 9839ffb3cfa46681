//! `mlsfed admin dead ...`: the dead letters in `MLSFED_DEAD` (what a
//! worker gave up on after bounded deliveries, with why): list them
//! (never their payloads), requeue one to where it came from, purge.

use anyhow::Context as _;
use async_nats::jetstream::stream::{DirectGetErrorKind, RawMessageErrorKind, Stream};
use bytes::Bytes;
use clap::Subcommand;
use proto::names;
use proto::wire::{DeadLetter, EntryKind, LogEntry};
use serde_json::json;

use super::{age_secs, Ctx};

#[derive(Subcommand)]
pub enum DeadCmd {
    /// Each dead letter: its sequence (for requeue), role, reason, detail,
    /// and where it came from; not its payload.
    List {
        /// Only the dead letters of this role (sequencer, fanout, bridge, keydir).
        #[arg(long)]
        role: Option<String>,
    },
    /// Publish a dead letter's original record to its original subject,
    /// then delete the dead letter.
    Requeue {
        /// The dead letter's sequence in MLSFED_DEAD (`dead list`).
        seq: u64,
    },
    /// Delete the dead letters (of one role).
    Purge {
        #[arg(long)]
        role: Option<String>,
    },
}

pub(super) async fn run(ctx: &Ctx<'_>, cmd: DeadCmd) -> anyhow::Result<()> {
    let stream = ctx.js.get_stream(names::DEAD_STREAM).await.context("MLSFED_DEAD is missing")?;
    match cmd {
        DeadCmd::List { role } => list(ctx, &stream, &filter(role.as_deref())?).await,
        DeadCmd::Requeue { seq } => requeue(ctx, &stream, seq).await,
        DeadCmd::Purge { role } => {
            let purged = stream.purge().filter(filter(role.as_deref())?).await.context("cannot purge")?.purged;
            ctx.out.done(
                &json!({ "purged": purged, "role": role }),
                &format!("purged {purged} dead letter(s){}", role.map(|r| format!(" of {r}")).unwrap_or_default()),
            );
            Ok(())
        }
    }
}

/// The subjects of `role`'s dead letters, or of all.
fn filter(role: Option<&str>) -> anyhow::Result<String> {
    match role {
        None => Ok(names::DEAD_WILDCARD.to_owned()),
        Some(r) => {
            anyhow::ensure!(
                !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "not a role name: {r:?}"
            );
            Ok(names::dead_subject(r))
        }
    }
}

async fn list(ctx: &Ctx<'_>, stream: &Stream, filter: &str) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut next = 1;
    loop {
        let msg = match stream.raw_message_builder().sequence(next).next_by_subject(filter).send().await {
            Ok(m) => m,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(e).context("cannot read MLSFED_DEAD"),
        };
        next = msg.sequence + 1;
        let mut row = json!({ "seq": msg.sequence, "age_secs": age_secs(msg.time.unix_timestamp_nanos()) });
        match serde_json::from_slice::<DeadLetter>(&msg.payload) {
            Ok(l) => {
                for (k, v) in [
                    ("role", json!(l.role)),
                    ("reason", json!(l.reason)),
                    ("detail", json!(l.detail)),
                    ("stream", json!(l.stream)),
                    ("stream_seq", json!(l.stream_seq)),
                    ("subject", json!(l.subject)),
                    ("delivered", json!(l.delivered)),
                    ("payload_omitted", json!(l.payload_omitted)),
                ] {
                    row[k] = v;
                }
            }
            Err(e) => {
                row["reason"] = json!("unreadable_dead_letter");
                row["detail"] = json!(e.to_string());
                row["subject"] = json!(msg.subject.to_string());
            }
        }
        rows.push(row);
    }
    if ctx.out.json {
        ctx.out.table(&rows, &[]);
    } else {
        // The detail can be long: a table shows its start.
        for r in &mut rows {
            if let Some(d) = r["detail"].as_str().filter(|d| d.chars().count() > 60) {
                r["detail"] = json!(format!("{}...", d.chars().take(57).collect::<String>()));
            }
        }
        ctx.out.table(
            &rows,
            &[
                ("seq", "SEQ"),
                ("age_secs", "AGE(S)"),
                ("role", "ROLE"),
                ("reason", "REASON"),
                ("stream", "STREAM"),
                ("stream_seq", "STREAM_SEQ"),
                ("delivered", "DELIVERED"),
                ("subject", "SUBJECT"),
                ("detail", "DETAIL"),
            ],
        );
    }
    Ok(())
}

async fn requeue(ctx: &Ctx<'_>, stream: &Stream, seq: u64) -> anyhow::Result<()> {
    let msg = match stream.get_raw_message(seq).await {
        Ok(m) => m,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {
            anyhow::bail!("no dead letter at sequence {seq} (see `mlsfed admin dead list`)")
        }
        Err(e) => return Err(e).context("cannot read MLSFED_DEAD"),
    };
    let letter: DeadLetter = serde_json::from_slice(&msg.payload).context("the dead letter is unreadable")?;
    anyhow::ensure!(letter.v <= 1, "dead letter format {} is newer than this build reads", letter.v);
    anyhow::ensure!(
        !letter.payload_omitted,
        "dead letter {seq} holds no copy of its record (too large to copy); the record is {} #{} for as long as that stream keeps it",
        letter.stream,
        letter.stream_seq
    );
    let payload = base64_decode(&letter.payload).context("the dead letter's payload is not base64")?;
    // SUBMIT stores a message under its partition's subject; it takes
    // messages only on the subject they were published on.
    let subject = if letter.stream == names::SUBMIT_STREAM {
        names::submit_subject_of_stored(&letter.subject).unwrap_or_else(|| letter.subject.clone())
    } else {
        letter.subject.clone()
    };
    if letter.stream == names::LOG_STREAM {
        log_requeue_is_safe(ctx, &letter, &payload).await?;
    }
    let ack = ctx
        .js
        .publish(subject.clone(), Bytes::from(payload))
        .await
        .context("cannot publish")?
        .await
        .with_context(|| format!("{subject} did not take the record"))?;
    // Only once the record is back: a failure in between leaves the dead
    // letter, never loses the record.
    stream.delete_message(seq).await.with_context(|| {
        format!("requeued as {} #{}, but the dead letter {seq} could not be deleted", ack.stream, ack.sequence)
    })?;
    let row = json!({
        "requeued": seq,
        "role": letter.role,
        "subject": subject,
        "stream": ack.stream,
        "stream_seq": ack.sequence,
    });
    ctx.out.done(&row, &format!("dead letter {seq} requeued to {} as #{} ({subject})", ack.stream, ack.sequence));
    Ok(())
}

/// A LOG entry goes back at its group's tail, so it is requeued only if
/// that keeps the tail's position from going backwards (the sequencer
/// would take the old position for the group's, and fork it), and never
/// as a second copy of a Commit or Proposal (which would not replay).
async fn log_requeue_is_safe(ctx: &Ctx<'_>, letter: &DeadLetter, payload: &[u8]) -> anyhow::Result<()> {
    let entry: LogEntry = proto::wire::decode(payload).map_err(|e| {
        anyhow::anyhow!("this build cannot read the dead LOG entry ({e}); requeue it with one that can")
    })?;
    let log = ctx.js.get_stream(names::LOG_STREAM).await.context("MLSFED_LOG is missing")?;
    let tail = match log.direct_get_last_for_subject(letter.subject.as_str()).await {
        Ok(m) => proto::wire::decode::<LogEntry>(&m.payload).ok(),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
        Err(e) => return Err(e).context("cannot read the group's LOG tail"),
    };
    let Some(tail) = tail else { return Ok(()) };
    anyhow::ensure!(
        tail.position <= entry.position,
        "the LOG holds later entries of this group (position {} after {}): requeueing it would put an old \
         position at the group's tail; left in MLSFED_DEAD",
        tail.position,
        entry.position
    );
    anyhow::ensure!(
        !(tail.position == entry.position && matches!(entry.kind, EntryKind::Commit | EntryKind::Proposal)),
        "the LOG's last entry of this group is this {} already; a second copy would not replay; left in MLSFED_DEAD",
        entry.kind.as_str()
    );
    Ok(())
}

/// Standard base64 with padding (RFC 4648 §4), as dead letters carry
/// their payload.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim().as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, chunk) in s.chunks(4).enumerate() {
        let last = i + 1 == s.len() / 4;
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for c in &chunk[..4 - pad] {
            n = (n << 6) | value(*c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_what_dead_letters_carry() {
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("Zg==").as_deref(), Some(&b"f"[..]));
        assert_eq!(base64_decode("Zm8=").as_deref(), Some(&b"fo"[..]));
        assert_eq!(base64_decode("Zm9v").as_deref(), Some(&b"foo"[..]));
        assert_eq!(base64_decode("9U0B/w==").as_deref(), Some(&[0xF5, 0x4D, 0x01, 0xFF][..]));
        assert_eq!(base64_decode("Zm9"), None);
        assert_eq!(base64_decode("Z===").as_deref(), None);
        assert_eq!(base64_decode("Zg==Zg=="), None);
        assert_eq!(base64_decode("Zm9*"), None);
    }

    #[test]
    fn role_filters_are_single_tokens() {
        assert_eq!(filter(None).unwrap(), names::DEAD_WILDCARD);
        assert_eq!(filter(Some("fanout")).unwrap(), names::dead_subject("fanout"));
        assert!(filter(Some("a.b")).is_err() && filter(Some("*")).is_err() && filter(Some("")).is_err());
    }
}
