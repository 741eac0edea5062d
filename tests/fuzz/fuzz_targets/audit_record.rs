#![no_main]
//! Audit log lines, as `hie audit verify` and the log's own open and query
//! read them back. By the first byte, either
//! - a line: `chain::parse_record` never panics, and a line it accepts is
//!   exactly the line the writer (`chain::record_line`) makes for its
//!   record;
//! - an event: written with `record_line`, it reads back as the same event
//!   when it is in canonical form and is refused when it is not (any
//!   altered byte is caught).
//!
//! Every event read is given to `event::check`, `render`, `recorded_millis`,
//! `subject_of` and `hide_settled_intents`, which never panic; an event that
//! `check` accepts renders as an AuditEvent.
//!
//! `hie-audit` links RocksDB (its index, through `hie-store`), which this
//! crate must not build: its two modules that read records, `chain.rs`
//! and `event.rs`, are compiled here from their source as they are.

mod common;

#[allow(dead_code)]
#[path = "../../../crates/audit/src/event.rs"]
mod event;

#[allow(dead_code)]
#[path = "../../../crates/audit/src/chain.rs"]
mod chain;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[global_allocator]
static ALLOC: common::PeakAlloc = common::PeakAlloc;

fn read_event(e: &Value) {
    let checked = event::check(e);
    let rendered = event::render(e);
    if checked.is_ok() {
        let rendered = rendered.expect("an event that checks renders");
        assert_eq!(rendered.get("resourceType").and_then(Value::as_str), Some("AuditEvent"));
    }
    let _ = event::recorded_millis(e);
    let _ = event::subject_of(e);
    let mut events = vec![e.clone(), e.clone()];
    event::hide_settled_intents(&mut events, |v| v);
}

fn line(line: &[u8]) {
    let Ok(record) = chain::parse_record(line) else { return };
    let event_bytes = serde_json::to_vec(&record.event).expect("a JSON value serialises");
    // The writer puts `prev` in as it is (it is always a hash): compare
    // only where JSON needs no escape in it.
    let quoted = serde_json::to_string(&record.prev).expect("a string serialises");
    if quoted.len() == record.prev.len() + 2 {
        let (written, hash) = chain::record_line(record.seq, &record.prev, &event_bytes);
        assert_eq!(written[..written.len() - 1], *line, "an accepted line is the line written for its record");
        assert_eq!(hash, record.hash);
    }
    read_event(&record.event);
}

/// serde_json reads at most 128 levels; inside a record line an event has
/// one more level than on its own. Real events have three.
const EVENT_DEPTH_MAX: usize = 100;

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn event_written(seq: u64, event_bytes: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(event_bytes) else { return };
    read_event(&value);
    if depth(&value) > EVENT_DEPTH_MAX {
        return;
    }
    let canonical = value.is_object() && serde_json::to_vec(&value).expect("a JSON value serialises") == event_bytes;
    let (written, hash) = chain::record_line(seq, chain::GENESIS, event_bytes);
    let line = &written[..written.len() - 1];
    match chain::parse_record(line) {
        Ok(record) => {
            assert!(canonical, "a record whose event is not in canonical form was accepted");
            assert!(!line.contains(&b'\n'), "a record is one line");
            assert_eq!((record.seq, record.prev.as_str(), record.hash), (seq, chain::GENESIS, hash));
            assert_eq!(record.event, value);
        }
        Err(why) => assert!(!canonical, "a record written from a canonical event was refused: {why}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    common::bounded("audit record", data.len(), || {
        if mode & 1 == 0 { line(rest) } else { event_written(u64::from(mode >> 1), rest) }
    });
});
