//! The on-disk form of the audit log and its hash chain.
//!
//! The log is a directory of segment files `00000001.ndjson`, ... Each line
//! is one record, compact JSON with sorted keys. The segment being written
//! may end in zeros (space reserved ahead of the records), which readers
//! skip; closed segments end with their last record.
//!
//! ```text
//! {"event":{...},"hash":"<hex>","prev":"<hex>","seq":N}
//! ```
//!
//! `event` is the stored form of the event (see [`crate::event`]: format 2,
//! the facts of the access, `"v":2`; format 1 records hold the whole
//! AuditEvent). Readers render it as a BALP AuditEvent.
//!
//! `hash = SHA-256(prev ‖ "\n" ‖ seq ‖ "\n" ‖ event as written)`, and `prev`
//! is the hash of the record before it (64 zeros for the first record of
//! the log), across segment boundaries. A line must also be exactly the
//! canonical serialisation of what it parses to, so any change of any byte
//! is caught: by the hash, by the chain, by the sequence or by the form.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub fn hash(prev: &str, seq: u64, event: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(event);
    hex::encode(h.finalize())
}

/// The line (with its newline) for an event, and the record's hash. Built
/// by hand in exactly the form `serde_json` gives the parsed record (keys
/// sorted), which [`parse_record`] checks.
pub fn record_line(seq: u64, prev: &str, event_bytes: &[u8]) -> (Vec<u8>, String) {
    let hash = hash(prev, seq, event_bytes);
    let mut line = Vec::with_capacity(event_bytes.len() + 180);
    line.extend_from_slice(b"{\"event\":");
    line.extend_from_slice(event_bytes);
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\",\"prev\":\"");
    line.extend_from_slice(prev.as_bytes());
    line.extend_from_slice(b"\",\"seq\":");
    line.extend_from_slice(seq.to_string().as_bytes());
    line.extend_from_slice(b"}\n");
    (line, hash)
}

/// A record read back and checked on its own (not yet against its neighbours).
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub event: Value,
}

/// Parses one line (without its newline) and checks its form and own hash.
pub fn parse_record(line: &[u8]) -> Result<Record, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let canonical = serde_json::to_vec(&v).expect("a JSON value serialises");
    if canonical != line {
        return Err("not in the form it was written in (bytes altered)".into());
    }
    let obj = v.as_object().ok_or("not a JSON object")?;
    if obj.len() != 4 {
        return Err("unexpected fields".into());
    }
    let seq = obj.get("seq").and_then(Value::as_u64).ok_or("no seq")?;
    let prev = obj.get("prev").and_then(Value::as_str).ok_or("no prev")?.to_owned();
    let stated = obj.get("hash").and_then(Value::as_str).ok_or("no hash")?.to_owned();
    let event = obj.get("event").filter(|e| e.is_object()).ok_or("no event")?.clone();
    let event_bytes = serde_json::to_vec(&event).expect("a JSON value serialises");
    if hash(&prev, seq, &event_bytes) != stated {
        return Err("hash does not match the record's content".into());
    }
    Ok(Record { seq, prev, hash: stated, event })
}

/// The segment files of a log directory, in order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if let Some(n) = name.strip_suffix(".ndjson").and_then(|s| s.parse::<u32>().ok()) {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

pub fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.ndjson"))
}

/// Where verification found the chain broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub segment: PathBuf,
    /// 1-based line in the segment.
    pub line: u64,
    /// The sequence number the record should have had.
    pub expected_seq: u64,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "first bad record: seq {} at {} line {}: {}",
            self.expected_seq,
            self.segment.display(),
            self.line,
            self.reason
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub segments: u64,
    /// Hash of the last record: the head of the chain.
    pub head: String,
}

/// Walks every record of the log in order, checking each and the chain;
/// `each` sees every good record. Stops at the first bad record.
pub fn walk(dir: &Path, mut each: impl FnMut(&Record) -> std::io::Result<()>) -> Result<Verified, Break> {
    let segs = segments(dir).map_err(|e| Break {
        segment: dir.to_owned(),
        line: 0,
        expected_seq: 1,
        reason: format!("cannot list the audit directory: {e}"),
    })?;
    let mut prev = GENESIS.to_owned();
    let mut seq = 0u64;
    let first_segment = segs.first().map(|(n, _)| *n).unwrap_or(1);
    for (expected_segment, (n, path)) in (first_segment..).zip(&segs) {
        let bad =
            |line: u64, seq: u64, reason: String| Break { segment: path.clone(), line, expected_seq: seq, reason };
        if *n != expected_segment {
            return Err(bad(0, seq + 1, format!("segment {expected_segment:08} is missing")));
        }
        let file = File::open(path).map_err(|e| bad(0, seq + 1, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(|e| bad(line_no + 1, seq + 1, e.to_string()))?;
            if n == 0 {
                break;
            }
            if buf.last() != Some(&b'\n') && buf.iter().all(|b| *b == 0) {
                // The open segment's zeros, written ahead of the records.
                break;
            }
            line_no += 1;
            if buf.last() != Some(&b'\n') {
                return Err(bad(line_no, seq + 1, "incomplete record at the end (torn write)".into()));
            }
            let record = parse_record(&buf[..buf.len() - 1]).map_err(|r| bad(line_no, seq + 1, r))?;
            crate::event::check(&record.event).map_err(|r| bad(line_no, seq + 1, r))?;
            if record.seq != seq + 1 {
                return Err(bad(line_no, seq + 1, format!("sequence number {} out of order", record.seq)));
            }
            if record.prev != prev {
                return Err(bad(line_no, seq + 1, "does not chain to the record before it".into()));
            }
            each(&record).map_err(|e| bad(line_no, seq + 1, format!("could not pass the record on: {e}")))?;
            seq = record.seq;
            prev = record.hash;
        }
    }
    Ok(Verified { records: seq, segments: segs.len() as u64, head: prev })
}

/// Checks the whole chain.
pub fn verify(dir: &Path) -> Result<Verified, Break> {
    walk(dir, |_| Ok(()))
}

/// Writes every event (FHIR AuditEvent, one JSON object per line) for a SIEM,
/// checking the chain as it goes; events recorded before `since` (ms) are
/// skipped. Stops at the first bad record.
pub fn export(dir: &Path, since: Option<i64>, out: &mut impl Write) -> Result<Verified, Break> {
    walk(dir, |r| {
        if let Some(since) = since
            && crate::event::recorded_millis(&r.event).is_some_and(|t| t < since)
        {
            return Ok(());
        }
        let event = crate::event::render(&r.event).map_err(std::io::Error::other)?;
        serde_json::to_writer(&mut *out, &event)?;
        out.write_all(b"\n")
    })
}

/// The record with sequence number `seq`, checked on its own, or `None`
/// when the log ends before it. Reads only the segment that holds it (found
/// by the sequence number of each segment's first record).
pub fn record_at(dir: &Path, seq: u64) -> Result<Option<Record>, String> {
    let segs = segments(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for (_, path) in segs.iter().rev() {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            let record = parse_record(&buf[..buf.len() - 1]).map_err(|r| format!("{}: {r}", path.display()))?;
            if first && record.seq > seq {
                // Held by an earlier segment.
                break;
            }
            first = false;
            if record.seq == seq {
                return Ok(Some(record));
            }
        }
        if !first {
            // This segment starts at or before `seq` and does not hold it.
            return Ok(None);
        }
    }
    Ok(None)
}

/// How a chain stands against the head the cluster anchored for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The record at the anchor's sequence number has the anchored hash.
    Holds,
    /// The chain ends before the anchored record: records were cut off.
    CutShort { records: u64 },
    /// The anchored record's hash differs: the chain was rewritten.
    Rewritten { found: String },
}

/// Checks the chain in `dir` against an anchored `(seq, hash)`.
pub fn check_anchor(dir: &Path, seq: u64, hash: &str) -> Result<AnchorCheck, String> {
    match record_at(dir, seq)? {
        Some(r) if r.hash == hash => Ok(AnchorCheck::Holds),
        Some(r) => Ok(AnchorCheck::Rewritten { found: r.hash }),
        None => {
            let records = verify(dir).map(|v| v.records).unwrap_or(0);
            Ok(AnchorCheck::CutShort { records })
        }
    }
}
