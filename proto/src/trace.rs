//! Message tracing: one span per stage a message passes through (ingest,
//! sequencer, fanout, the bridge's outbox, the peer's inbox and fanout),
//! linked by a W3C `traceparent` carried in NATS headers. Only ids travel
//! (trace, span, group, position), never contents. Finished spans go to a
//! bounded sink that the binary exports over OTLP when configured
//! (`mlsfed::otlp`); without a sink, a span costs two random ids and a
//! timestamp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use tokio::sync::mpsc;

/// The W3C trace context header (https://www.w3.org/TR/trace-context/).
pub const HEADER: &str = "traceparent";
/// On a federation envelope: one trace context per record, in record
/// order, comma-separated (`-` for a record without one). Outside the
/// signed payload: a peer's trace ids are hints, parsed strictly and never
/// trusted for anything else.
pub const RECORDS_HEADER: &str = "Mlsfed-Traceparents";

/// Where one span sits in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Context {
    /// A new trace.
    pub fn root() -> Self {
        Self { trace_id: rand::random(), span_id: rand::random() }
    }

    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        Self { trace_id: self.trace_id, span_id: rand::random() }
    }

    /// `00-<trace>-<span>-01` (version 0, sampled).
    pub fn to_header(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }

    /// A version-0 `traceparent`; anything else (another version, bad hex,
    /// all-zero ids) is no context.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || unhex::<1>(flags).is_none() {
            return None;
        }
        let (trace_id, span_id) = (unhex::<16>(trace)?, unhex::<8>(span)?);
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id })
    }

    /// The context a NATS message carries, if any.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<Self> {
        Self::parse(headers?.get(HEADER)?.as_str())
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// The contexts of an envelope's records (see [`RECORDS_HEADER`]).
pub fn records_header(contexts: &[Option<Context>]) -> String {
    contexts.iter().map(|c| c.map(|c| c.to_header()).unwrap_or_else(|| "-".into())).collect::<Vec<_>>().join(",")
}

/// Parses [`RECORDS_HEADER`] for `n` records; a malformed header yields no
/// contexts at all.
pub fn parse_records_header(headers: Option<&HeaderMap>, n: usize) -> Vec<Option<Context>> {
    let parsed = headers.and_then(|h| h.get(RECORDS_HEADER)).map(|v| {
        v.as_str().split(',').map(|p| if p == "-" { Some(None) } else { Context::parse(p).map(Some) }).collect()
    });
    match parsed {
        Some(Some(v)) => {
            let v: Vec<Option<Context>> = v;
            if v.len() == n {
                v
            } else {
                vec![None; n]
            }
        }
        _ => vec![None; n],
    }
}

/// A finished span, as exported.
#[derive(Debug, Clone)]
pub struct Finished {
    pub context: Context,
    pub parent: Option<[u8; 8]>,
    pub name: &'static str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, String)>,
}

/// A span being timed. Dropped without [`Span::end`], it is not exported.
#[derive(Debug)]
pub struct Span {
    context: Context,
    parent: Option<[u8; 8]>,
    name: &'static str,
    start_unix_nanos: u64,
    attributes: Vec<(&'static str, String)>,
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

impl Span {
    /// Starts a new trace, when this process exports spans: a message's
    /// first stage (ingest) begins one only then, so an operator without
    /// tracing adds no header to its messages.
    pub fn root(name: &'static str) -> Option<Self> {
        enabled().then(|| Self::start(name, None))
    }

    /// Continues `parent`'s trace, when a message carries one (exported if
    /// this process exports, and passed on either way).
    pub fn child(name: &'static str, parent: Option<Context>) -> Option<Self> {
        parent.map(|p| Self::start(name, Some(p)))
    }

    /// Starts `name` as a child of `parent`, or a new trace without one.
    pub fn start(name: &'static str, parent: Option<Context>) -> Self {
        let context = parent.map(|p| p.child()).unwrap_or_else(Context::root);
        Self { context, parent: parent.map(|p| p.span_id), name, start_unix_nanos: now_nanos(), attributes: Vec::new() }
    }

    pub fn context(&self) -> Context {
        self.context
    }

    /// Adds an attribute: identifiers and counts only, never contents.
    pub fn set(&mut self, key: &'static str, value: impl ToString) {
        self.attributes.push((key, value.to_string()));
    }

    /// Ends the span and hands it to the exporter, if one runs.
    pub fn end(self) {
        let Some(sink) = SINK.get() else { return };
        let finished = Finished {
            context: self.context,
            parent: self.parent,
            name: self.name,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: now_nanos(),
            attributes: self.attributes,
        };
        if sink.try_send(finished).is_err() {
            // The exporter is behind (or gone): tracing never slows a
            // message down, it drops spans and counts them.
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

static SINK: OnceLock<mpsc::Sender<Finished>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Installs this process's span sink (at most `capacity` waiting spans) and
/// returns its receiving end; `None` if one is installed already.
pub fn install(capacity: usize) -> Option<mpsc::Receiver<Finished>> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    SINK.set(tx).ok().map(|_| rx)
}

/// Whether this process exports spans.
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Adds an attribute to a span that may not exist.
pub fn set(span: &mut Option<Span>, key: &'static str, value: impl ToString) {
    if let Some(s) = span.as_mut() {
        s.set(key, value);
    }
}

/// Ends a span that may not exist.
pub fn end(span: Option<Span>) {
    if let Some(s) = span {
        s.end();
    }
}

/// The context of a span that may not exist.
pub fn context(span: &Option<Span>) -> Option<Context> {
    span.as_ref().map(Span::context)
}

/// Spans dropped because the sink was full, since the process started.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The OTLP/HTTP JSON body (`ExportTraceServiceRequest`) for `spans`.
pub fn otlp_json(service: &str, spans: &[Finished]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let attributes: Vec<serde_json::Value> = s
                .attributes
                .iter()
                .map(|(k, v)| serde_json::json!({ "key": k, "value": { "stringValue": v } }))
                .collect();
            serde_json::json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "parentSpanId": s.parent.map(|p| hex(&p)).unwrap_or_default(),
                "name": s.name,
                // SPAN_KIND_INTERNAL
                "kind": 1,
                "startTimeUnixNano": s.start_unix_nanos.to_string(),
                "endTimeUnixNano": s.end_unix_nanos.to_string(),
                "attributes": attributes,
            })
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": [{ "key": "service.name", "value": { "stringValue": service } }] },
            "scopeSpans": [{ "scope": { "name": "mlsfed" }, "spans": spans }],
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let c = Context::root();
        assert_eq!(Context::parse(&c.to_header()), Some(c));
        let child = c.child();
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert_eq!(Context::parse(bad), None, "{bad:?}");
        }
        let known = Context::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").expect("valid");
        assert_eq!(known.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(known.span_hex(), "b7ad6b7169203331");
    }

    #[test]
    fn records_header_keeps_order_and_drops_a_malformed_list() {
        let (a, b) = (Context::root(), Context::root());
        let mut h = HeaderMap::new();
        h.insert(RECORDS_HEADER, records_header(&[Some(a), None, Some(b)]).as_str());
        assert_eq!(parse_records_header(Some(&h), 3), vec![Some(a), None, Some(b)]);
        // Another record count, or a bad entry: no contexts, never misattributed ones.
        assert_eq!(parse_records_header(Some(&h), 2), vec![None, None]);
        h.insert(RECORDS_HEADER, "junk,-");
        assert_eq!(parse_records_header(Some(&h), 2), vec![None, None]);
        assert_eq!(parse_records_header(None, 1), vec![None]);
    }
}
