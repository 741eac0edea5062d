//! The body of `GET /admin/backup`: this node's state and its audit
//! segments, streamed as they are read, never built in memory.
//!
//! Format 1: [`MAGIC`], then frames `[kind u8][len u32 LE][payload]`, each
//! payload at most [`FRAME_BYTES_MAX`]:
//! - [`Kind::Header`], first and once: JSON [`BackupHeader`];
//! - [`Kind::State`]: the next bytes of the state, a snapshot file (meta,
//!   then the LZ4-compressed records with their SHA-256, `hie-store`);
//! - [`Kind::AuditSegment`]: the name of an audit segment file
//!   (`00000001.ndjson`); the [`Kind::AuditData`] frames after it are that
//!   file's bytes;
//! - [`Kind::End`], last: JSON [`BackupSummary`];
//! - [`Kind::Failed`] instead of `End` if the node could not finish (the
//!   reason, as text).
//!
//! The state is one RocksDB snapshot, taken when the request is answered;
//! the audit segments are read after it, so they hold every record up to
//! the moment they are read, this backup's own record among them (it is
//! fsynced before the first byte is sent). The open segment's last record,
//! if it is still being copied in, is left out: a record is JSON text, with
//! no NUL byte, so the segment's bytes up to its first zero are records
//! fully written, and what follows the last newline before it is not one
//! yet.
//!
//! The node sends this over the API's TLS, to the operator role only; the
//! client (`hie cluster backup`) writes it to a file sealed with the
//! operator's backup key. The node never sees that key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// The first bytes of a backup body (the last two: the format, 1).
pub const MAGIC: &[u8; 8] = b"HIEBAK\x00\x01";
/// The format this node writes and reads.
pub const FORMAT: u32 = 1;
/// Largest payload of one frame.
pub const FRAME_BYTES_MAX: usize = 1 << 20;
/// `[kind u8][len u32]`.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Frames produced and not yet sent: with the one being filled, the memory
/// a backup holds on the node (besides the compressor's and RocksDB's
/// read-ahead), whatever the size of the state.
pub const FRAMES_QUEUED_MAX: usize = 4;
/// How long the node waits for a client that stopped reading before it
/// gives the backup up (and the RocksDB snapshot it holds).
pub const CLIENT_STALL_MAX: Duration = Duration::from_secs(60);
/// Backups this node streams at once; another is refused until one ends.
pub const BACKUPS_AT_ONCE_MAX: usize = 1;
/// Longest segment file name accepted (`NNNNNNNN.ndjson`).
const SEGMENT_NAME_LEN_MAX: usize = 64;
/// Bytes read from a segment at a time.
const SEGMENT_READ_BYTES: usize = 64 << 10;

const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(SEGMENT_READ_BYTES <= FRAME_BYTES_MAX);

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Header = 1,
    State = 2,
    AuditSegment = 3,
    AuditData = 4,
    End = 5,
    Failed = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Header,
            2 => Kind::State,
            3 => Kind::AuditSegment,
            4 => Kind::AuditData,
            5 => Kind::End,
            6 => Kind::Failed,
            _ => return None,
        })
    }
}

/// The first frame: what this backup is of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupHeader {
    pub format: u32,
    pub node_id: u64,
    /// `node-<id> (<region>)`, as audit events name the node.
    pub node: String,
    pub applied_index: u64,
    pub snapshot_id: String,
    /// When the state's view was taken (ms since the epoch).
    pub taken_ms: i64,
    /// The request that took it (its audit record names it too).
    pub request_id: String,
}

/// The last frame: what was sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupSummary {
    pub state_bytes: u64,
    pub audit_segments: u64,
    pub audit_bytes: u64,
}

/// Why a backup body is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a hie backup (no {:?} at the start)", String::from_utf8_lossy(MAGIC))]
    Magic,
    #[error("backup format {found} is not one this hie reads (it reads format {FORMAT})")]
    Format { found: u32 },
    #[error("a frame of {len} bytes is over the limit of {FRAME_BYTES_MAX}")]
    FrameTooLarge { len: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{0:?} frame out of place")]
    OutOfOrder(Kind),
    #[error("bad {what}: {message}")]
    Bad { what: &'static str, message: String },
    #[error("the node could not finish the backup: {0}")]
    NodeFailed(String),
    #[error("the backup ends before its end frame (cut short)")]
    Truncated,
}

/// A frame, as [`Parser::feed`] hands it on.
#[derive(Debug)]
pub enum Frame<'a> {
    Header(BackupHeader),
    State(&'a [u8]),
    /// A segment file's name: checked to be a plain `NNNNNNNN.ndjson`.
    AuditSegment(&'a str),
    AuditData(&'a [u8]),
    End(BackupSummary),
}

/// Reads a backup body pushed to it in pieces of any size, checking its
/// form, and hands on whole frames; its memory is one frame at most.
#[derive(Debug, Default)]
pub struct Parser {
    magic: Vec<u8>,
    head: Vec<u8>,
    payload: Vec<u8>,
    want: Option<(Kind, usize)>,
    header_seen: bool,
    in_segment: bool,
    ended: bool,
}

/// Checks a segment file name: digits, `.ndjson`, nothing else.
pub fn segment_name_ok(name: &str) -> bool {
    name.len() <= SEGMENT_NAME_LEN_MAX
        && name.strip_suffix(".ndjson").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Takes the next bytes of the body; calls `each` with every frame
    /// completed by them.
    pub fn feed<E: From<FormatError>>(
        &mut self,
        mut bytes: &[u8],
        mut each: impl FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.magic.len() < MAGIC.len() {
                let n = bytes.len().min(MAGIC.len() - self.magic.len());
                self.magic.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                // The last byte is the format: the same prefix with another
                // last byte is a backup of another format.
                let prefix = (MAGIC.len() - 1).min(self.magic.len());
                if self.magic[..prefix] != MAGIC[..prefix] {
                    return Err(FormatError::Magic.into());
                }
                if self.magic.len() == MAGIC.len() && self.magic[prefix] != MAGIC[prefix] {
                    return Err(FormatError::Format { found: u32::from(self.magic[prefix]) }.into());
                }
                continue;
            }
            if self.ended {
                return Err(FormatError::Bad { what: "backup", message: "bytes after its end frame".into() }.into());
            }
            let Some((kind, len)) = self.want else {
                let n = bytes.len().min(FRAME_HEADER_BYTES - self.head.len());
                self.head.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.head.len() == FRAME_HEADER_BYTES {
                    let kind = Kind::from_u8(self.head[0]).ok_or(FormatError::UnknownKind(self.head[0]))?;
                    let len = u32::from_le_bytes(self.head[1..].try_into().expect("4 bytes")) as usize;
                    if len > FRAME_BYTES_MAX {
                        return Err(FormatError::FrameTooLarge { len }.into());
                    }
                    self.head.clear();
                    self.want = Some((kind, len));
                    if len == 0 {
                        self.frame(kind, &mut each)?;
                    }
                }
                continue;
            };
            let n = bytes.len().min(len - self.payload.len());
            self.payload.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.payload.len() == len {
                self.frame(kind, &mut each)?;
            }
        }
        Ok(())
    }

    fn frame<E: From<FormatError>>(
        &mut self,
        kind: Kind,
        each: &mut impl FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.want = None;
        let payload = std::mem::take(&mut self.payload);
        if !self.header_seen && kind != Kind::Header && kind != Kind::Failed {
            return Err(FormatError::OutOfOrder(kind).into());
        }
        fn json(what: &'static str) -> impl Fn(serde_json::Error) -> FormatError {
            move |e| FormatError::Bad { what, message: e.to_string() }
        }
        let result = match kind {
            Kind::Header if self.header_seen => Err(FormatError::OutOfOrder(kind).into()),
            Kind::Header => {
                // The format first, so that a newer header is named as such.
                let v: serde_json::Value = serde_json::from_slice(&payload).map_err(json("header"))?;
                let found = v.get("format").and_then(serde_json::Value::as_u64).unwrap_or(0);
                if found != u64::from(FORMAT) {
                    return Err(FormatError::Format { found: found as u32 }.into());
                }
                self.header_seen = true;
                each(Frame::Header(serde_json::from_value(v).map_err(json("header"))?))
            }
            Kind::State => each(Frame::State(&payload)),
            Kind::AuditSegment => {
                let name = std::str::from_utf8(&payload).ok().filter(|n| segment_name_ok(n)).ok_or_else(|| {
                    FormatError::Bad {
                        what: "audit segment name",
                        message: String::from_utf8_lossy(&payload[..payload.len().min(SEGMENT_NAME_LEN_MAX)])
                            .into_owned(),
                    }
                })?;
                self.in_segment = true;
                each(Frame::AuditSegment(name))
            }
            Kind::AuditData if !self.in_segment => Err(FormatError::OutOfOrder(kind).into()),
            Kind::AuditData => each(Frame::AuditData(&payload)),
            Kind::End => {
                self.ended = true;
                each(Frame::End(serde_json::from_slice(&payload).map_err(json("end frame"))?))
            }
            Kind::Failed => Err(FormatError::NodeFailed(String::from_utf8_lossy(&payload).into_owned()).into()),
        };
        // Reuse the buffer for the next frame.
        self.payload = payload;
        self.payload.clear();
        result
    }

    /// The body has ended: an error unless its end frame was read.
    pub fn finish(&self) -> Result<(), FormatError> {
        if self.ended { Ok(()) } else { Err(FormatError::Truncated) }
    }
}

/// Starts streaming a backup: `write_state` writes the state (a snapshot
/// file) into the writer it is given, on a blocking thread; the audit
/// segments in `audit_dir` follow. Nothing is read until the body is first
/// polled, after the envelope has recorded the request; `permit` is held
/// until the stream ends.
pub(crate) fn body<F>(
    header: BackupHeader,
    write_state: F,
    audit_dir: Option<PathBuf>,
    permit: OwnedSemaphorePermit,
) -> Body
where
    F: FnOnce(&mut Frames) -> Result<(), String> + Send + 'static,
{
    enum St<F> {
        Idle(Box<(BackupHeader, F, Option<PathBuf>, OwnedSemaphorePermit)>),
        Running(mpsc::Receiver<Bytes>),
    }
    let stream =
        futures::stream::unfold(St::Idle(Box::new((header, write_state, audit_dir, permit))), |st| async move {
            let mut rx = match st {
                St::Running(rx) => rx,
                St::Idle(args) => {
                    let (header, write_state, audit_dir, permit) = *args;
                    let (tx, rx) = mpsc::channel(FRAMES_QUEUED_MAX);
                    let rt = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        produce(Frames::new(tx, rt), header, write_state, audit_dir.as_deref());
                    });
                    rx
                }
            };
            let chunk = rx.recv().await?;
            Some((Ok::<_, std::io::Error>(chunk), St::Running(rx)))
        });
    Body::from_stream(stream)
}

fn produce<F>(mut out: Frames, header: BackupHeader, write_state: F, audit_dir: Option<&Path>)
where
    F: FnOnce(&mut Frames) -> Result<(), String>,
{
    let started = std::time::Instant::now();
    let request_id = header.request_id.clone();
    let result = (|| -> Result<BackupSummary, String> {
        out.send_raw(Bytes::from_static(MAGIC)).map_err(|e| e.to_string())?;
        let json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        out.frame(Kind::Header, &json).map_err(|e| e.to_string())?;
        out.begin(Kind::State);
        write_state(&mut out)?;
        out.end().map_err(|e| format!("state: {e}"))?;
        let mut summary = BackupSummary { state_bytes: out.counted(Kind::State), ..Default::default() };
        if let Some(dir) = audit_dir {
            let segments = hie_audit::chain::segments(dir).map_err(|e| format!("audit directory: {e}"))?;
            let last = segments.len().saturating_sub(1);
            for (i, (_, path)) in segments.iter().enumerate() {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                out.frame(Kind::AuditSegment, name.as_bytes()).map_err(|e| e.to_string())?;
                copy_segment(path, i == last, &mut out).map_err(|e| format!("audit segment {name}: {e}"))?;
                summary.audit_segments += 1;
            }
        }
        summary.audit_bytes = out.counted(Kind::AuditData);
        let json = serde_json::to_vec(&summary).map_err(|e| e.to_string())?;
        out.frame(Kind::End, &json).map_err(|e| e.to_string())?;
        Ok(summary)
    })();
    match result {
        Ok(s) => tracing::info!(
            request_id,
            state_bytes = s.state_bytes,
            audit_segments = s.audit_segments,
            audit_bytes = s.audit_bytes,
            seconds = started.elapsed().as_secs_f64(),
            "backup sent"
        ),
        Err(e) if out.gone => tracing::warn!(request_id, "backup abandoned: {e}"),
        Err(e) => {
            tracing::error!(request_id, "backup failed: {e}");
            // After the whole frames sent so far (a part-filled one is dropped).
            out.kind = None;
            let _ = out.frame(Kind::Failed, e.as_bytes());
        }
    }
}

/// Copies a segment's records: its bytes up to the first zero (the space
/// reserved ahead of the records); of the open (last) segment, only up to
/// its last newline (a record still being copied in is left out).
fn copy_segment(path: &Path, open: bool, out: &mut Frames) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    out.begin(Kind::AuditData);
    let mut buf = vec![0u8; SEGMENT_READ_BYTES];
    // Bytes after the last newline, held back until the next one.
    let mut held = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        let read = &buf[..n];
        let (read, end) = match read.iter().position(|&b| b == 0) {
            Some(z) => (&read[..z], true),
            None => (read, n == 0),
        };
        match read.iter().rposition(|&b| b == b'\n') {
            Some(nl) => {
                out.write_all(&held)?;
                held.clear();
                out.write_all(&read[..=nl])?;
                held.extend_from_slice(&read[nl + 1..]);
            }
            None => held.extend_from_slice(read),
        }
        // A "line" this long is no record being copied in: pass it on.
        if held.len() > FRAME_BYTES_MAX {
            out.write_all(&held)?;
            held.clear();
        }
        if end {
            break;
        }
    }
    if !open {
        out.write_all(&held)?;
    } else if !held.is_empty() {
        tracing::debug!(bytes = held.len(), "backup: the audit record being written is left out");
    }
    out.end()
}

/// The writer of frames of one kind at a time into the body's channel:
/// what is written fills a frame of at most [`FRAME_BYTES_MAX`], sent
/// when full. Sending waits for the client (at most [`CLIENT_STALL_MAX`]).
pub(crate) struct Frames {
    tx: mpsc::Sender<Bytes>,
    rt: tokio::runtime::Handle,
    kind: Option<Kind>,
    buf: Vec<u8>,
    counts: [u64; 7],
    /// The client went away (or stopped reading).
    gone: bool,
}

impl Frames {
    fn new(tx: mpsc::Sender<Bytes>, rt: tokio::runtime::Handle) -> Frames {
        Frames { tx, rt, kind: None, buf: Vec::new(), counts: [0; 7], gone: false }
    }

    fn counted(&self, kind: Kind) -> u64 {
        self.counts[kind as usize]
    }

    fn send_raw(&mut self, bytes: Bytes) -> std::io::Result<()> {
        let sent = self.rt.block_on(async { tokio::time::timeout(CLIENT_STALL_MAX, self.tx.send(bytes)).await });
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                self.gone = true;
                Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
            }
            Err(_) => {
                self.gone = true;
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client read nothing for {} s", CLIENT_STALL_MAX.as_secs()),
                ))
            }
        }
    }

    /// Starts frames of `kind`: what is written next goes into them.
    fn begin(&mut self, kind: Kind) {
        self.kind = Some(kind);
        self.buf = Vec::with_capacity(FRAME_HEADER_BYTES + FRAME_BYTES_MAX);
        self.buf.extend_from_slice(&[kind as u8, 0, 0, 0, 0]);
    }

    /// Sends the frame being filled, if it holds anything.
    fn flush_frame(&mut self) -> std::io::Result<()> {
        let Some(kind) = self.kind else { return Ok(()) };
        let len = self.buf.len() - FRAME_HEADER_BYTES;
        if len == 0 {
            return Ok(());
        }
        self.buf[1..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
        self.counts[kind as usize] += len as u64;
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(FRAME_HEADER_BYTES + FRAME_BYTES_MAX));
        self.buf.extend_from_slice(&[kind as u8, 0, 0, 0, 0]);
        self.send_raw(Bytes::from(full))
    }

    /// Ends the frames begun with [`Frames::begin`].
    fn end(&mut self) -> std::io::Result<()> {
        self.flush_frame()?;
        self.kind = None;
        self.buf = Vec::new();
        Ok(())
    }

    /// Sends one whole frame (at most [`FRAME_BYTES_MAX`]).
    fn frame(&mut self, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
        debug_assert!(payload.len() <= FRAME_BYTES_MAX);
        let mut b = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
        b.push(kind as u8);
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        self.counts[kind as usize] += payload.len() as u64;
        self.send_raw(Bytes::from(b))
    }
}

impl Write for Frames {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.kind.is_none() {
            return Err(std::io::Error::other("no frame begun"));
        }
        let room = FRAME_HEADER_BYTES + FRAME_BYTES_MAX - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME_HEADER_BYTES + FRAME_BYTES_MAX {
            self.flush_frame()?;
        }
        Ok(n)
    }

    /// Frames are sent when full or ended, not on a flush (the compressor
    /// flushes often).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![kind as u8];
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn header() -> Vec<u8> {
        let h = BackupHeader {
            format: FORMAT,
            node_id: 2,
            node: "node-2 (north)".into(),
            applied_index: 7,
            snapshot_id: "backup-7".into(),
            taken_ms: 1,
            request_id: "r".into(),
        };
        frame(Kind::Header, &serde_json::to_vec(&h).unwrap())
    }

    fn parse(body: &[u8], piece: usize) -> Result<Vec<String>, FormatError> {
        let mut p = Parser::new();
        let mut seen = Vec::new();
        for chunk in body.chunks(piece) {
            p.feed(chunk, |f| -> Result<(), FormatError> {
                seen.push(match f {
                    Frame::Header(h) => format!("header {}", h.applied_index),
                    Frame::State(b) => format!("state {}", b.len()),
                    Frame::AuditSegment(n) => format!("segment {n}"),
                    Frame::AuditData(b) => format!("audit {}", b.len()),
                    Frame::End(s) => format!("end {}", s.state_bytes),
                });
                Ok(())
            })?;
        }
        p.finish()?;
        Ok(seen)
    }

    /// A body parses the same fed in any pieces; each malformation is
    /// refused with its own reason.
    #[test]
    fn a_backup_body_is_parsed_in_any_pieces_and_its_faults_are_named() {
        let mut body = MAGIC.to_vec();
        body.extend(header());
        body.extend(frame(Kind::State, &[7; 300]));
        body.extend(frame(Kind::AuditSegment, b"00000001.ndjson"));
        body.extend(frame(Kind::AuditData, b"{}\n"));
        body.extend(frame(Kind::End, br#"{"state_bytes":300,"audit_segments":1,"audit_bytes":3}"#));
        let want = ["header 7", "state 300", "segment 00000001.ndjson", "audit 3", "end 300"];
        for piece in [1, 3, 5, 64, body.len()] {
            assert_eq!(parse(&body, piece).unwrap(), want, "in pieces of {piece}");
        }

        assert_eq!(parse(&body[..body.len() - 1], 7), Err(FormatError::Truncated));
        assert_eq!(parse(b"HIESNAP2....", 4), Err(FormatError::Magic));
        let mut newer = body.clone();
        newer[7] = 2;
        assert_eq!(parse(&newer, 3), Err(FormatError::Format { found: 2 }));
        let mut after = body.clone();
        after.push(0);
        assert!(matches!(parse(&after, 9), Err(FormatError::Bad { .. })));

        let mut no_header = MAGIC.to_vec();
        no_header.extend(frame(Kind::State, b"x"));
        assert_eq!(parse(&no_header, 2), Err(FormatError::OutOfOrder(Kind::State)));
        let mut escape = MAGIC.to_vec();
        escape.extend(header());
        escape.extend(frame(Kind::AuditSegment, b"../../etc/passwd"));
        assert!(matches!(parse(&escape, 2), Err(FormatError::Bad { what: "audit segment name", .. })));
        let mut orphan = MAGIC.to_vec();
        orphan.extend(header());
        orphan.extend(frame(Kind::AuditData, b"x"));
        assert_eq!(parse(&orphan, 2), Err(FormatError::OutOfOrder(Kind::AuditData)));
        let mut big = MAGIC.to_vec();
        big.extend(header());
        big.extend([Kind::State as u8]);
        big.extend(((FRAME_BYTES_MAX + 1) as u32).to_le_bytes());
        assert_eq!(parse(&big, 2), Err(FormatError::FrameTooLarge { len: FRAME_BYTES_MAX + 1 }));
        let mut failed = MAGIC.to_vec();
        failed.extend(header());
        failed.extend(frame(Kind::Failed, b"disk gone"));
        assert_eq!(parse(&failed, 4), Err(FormatError::NodeFailed("disk gone".into())));
    }

    /// Of the open segment, the record being copied in (no newline yet,
    /// zeros after it) is left out; a closed segment is copied as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_is_copied_up_to_its_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001.ndjson");
        let mut content = b"{\"a\":1}\n{\"b\":2}\n{\"c\":".to_vec();
        content.extend(vec![0u8; 3 * SEGMENT_READ_BYTES]);
        std::fs::write(&path, &content).unwrap();
        let copy = |open: bool| {
            let path = path.clone();
            async move {
                let (tx, mut rx) = mpsc::channel(FRAMES_QUEUED_MAX);
                let rt = tokio::runtime::Handle::current();
                let task = tokio::task::spawn_blocking(move || {
                    let mut out = Frames::new(tx, rt);
                    copy_segment(&path, open, &mut out).unwrap();
                });
                let mut got = Vec::new();
                while let Some(b) = rx.recv().await {
                    got.extend_from_slice(&b[FRAME_HEADER_BYTES..]);
                }
                task.await.unwrap();
                got
            }
        };
        assert_eq!(copy(true).await, b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(copy(false).await, b"{\"a\":1}\n{\"b\":2}\n{\"c\":");
    }
}
