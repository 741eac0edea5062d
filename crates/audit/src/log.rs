//! The audit log of one node: records appended on the requests' own threads
//! (hashed onto the chain and written into the segment with one `pwrite`,
//! no hand-off), a syncer
//! thread fsyncing them (one fsync for every record waiting) and then
//! indexing them by patient in a side table (one batch a fsync), and
//! queries over both.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hie_domain::audit::{AuditFuture, AuditPage, AuditQuery, AuditSource};
use hie_metrics::Metrics;
use hie_store::SideTable;
use sha2::{Digest, Sha256};

use crate::chain::{self, GENESIS, Record};
use crate::event::{Event, recorded_millis, subject_of};

/// Named limits and settings of the audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the segments and the index live.
    pub dir: PathBuf,
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes_max: u64,
    /// How long a durable append waits for its record to be fsynced.
    pub write_timeout: Duration,
    /// Records of reads are in the page cache (written into the segment) before the
    /// read is answered and fsynced within this interval; records of
    /// changes are fsynced before the change is answered.
    ///
    /// 100 ms by default: each fsync is a few write I/Os, and on a virtual
    /// disk an I/O costs CPU in every process (its notifications and
    /// interrupts). Measured side by side, the audit costs searches about 7%
    /// of their throughput at 100 ms and 11 to 15% at 10 ms
    /// (docs/BENCHMARKS.md: "What auditing costs searches", "What did not
    /// help"). PostgreSQL's asynchronous commit makes the same trade with a
    /// 200 ms writer delay.
    pub sync_interval: Duration,
    /// Fsync every record, reads' too, before answering.
    pub sync_every_access: bool,
    /// After a failed write, how often the syncer thread probes for space
    /// again (requests that would change data are refused until a write
    /// succeeds); while the index is behind, how often it is retried.
    pub retry_after: Duration,
}

impl AuditConfig {
    pub fn new(dir: PathBuf) -> AuditConfig {
        AuditConfig {
            dir,
            segment_bytes_max: 64 << 20,
            write_timeout: Duration::from_secs(2),
            sync_interval: Duration::from_millis(100),
            sync_every_access: false,
            retry_after: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit record could not be written: {0}")]
    Write(String),
    #[error("the audit record was not written within {0} ms")]
    Timeout(u128),
    #[error("the audit log has stopped")]
    Stopped,
    #[error(
        "the audit log stopped after a failed fsync (records in the page cache may never reach the disk); restart the node"
    )]
    Halted,
    #[error("audit log: {0}")]
    Open(String),
}

pub struct AuditLog {
    inner: Arc<Inner>,
    /// Joined on drop, so the last records are fsynced and the index closed
    /// before the process exits.
    syncer: Option<std::thread::JoinHandle<()>>,
}

/// What the appenders (request threads) and the syncer thread share.
struct Inner {
    config: AuditConfig,
    index: Arc<SideTable>,
    metrics: Arc<Metrics>,
    /// The open segment and the head of the chain. Held by an append while
    /// it hashes its record onto the chain and writes it (a few
    /// microseconds), and by the syncer thread's upkeep.
    head: Mutex<Head>,
    /// Set by a failed write (no room), cleared by the next success.
    failing: AtomicBool,
    /// Set by a failed fsync, never cleared: after one, Linux may have
    /// dropped the dirty pages (or marked them clean), so nothing written
    /// since the last good fsync can be trusted to reach the disk, and
    /// writing on would chain new records onto records that may be lost.
    /// The node refuses patient-data requests until it restarts, and then
    /// reopens the chain from what is on disk.
    halted: AtomicBool,
    /// Test-only: fsyncs fail.
    #[cfg(test)]
    fail_fsync: AtomicBool,
    /// Set while the index is behind the log because it could not be
    /// written: the syncer thread stops indexing new records and retries
    /// from the index's high-water mark, and queries also read the log past
    /// that mark.
    index_behind: AtomicBool,
    /// Records written and not yet fsynced (and indexed), for the syncer thread.
    pending: Mutex<Pending>,
    wake: Condvar,
    /// How far the log is known to be on disk, for durable appends.
    synced: tokio::sync::watch::Sender<Synced>,
    /// The last record known to be on disk: what the node anchors in the
    /// replicated state (never a record a power cut could take back).
    durable: Mutex<Durable>,
}

/// The last record on disk: its hash, or where to read it (found from the
/// record only when asked, so an fsync costs no read).
enum Durable {
    Known { seq: u64, hash: String },
    At { seq: u64, loc: Loc },
}

/// A record written, to be indexed once it is fsynced.
struct Unindexed {
    seq: u64,
    /// `None` for an operator's action, which names no patient.
    patient: Option<[u8; 16]>,
    loc: Loc,
}

/// The open segment and the last record written to it.
///
/// Records are written with one `pwrite` each, into the page cache: a
/// record written survives a crash of the process, and the syncer's
/// `fdatasync` makes it durable. They are only ever written where the file
/// has already been extended with zeros (`reserved`), so on a filesystem
/// that overwrites in place (ext4, xfs; not a copy-on-write one) a write
/// never needs new space: a full disk shows up as a failed reservation,
/// before any byte of the record is written. Not through a shared memory map: on
/// this ext4, an `fdatasync` after a write through a map took 1.9 ms, and
/// 0.25 ms after a `pwrite` to the same file (docs/BENCHMARKS.md, "One
/// create's round trip"), and a change's answer waits for that fsync.
struct Head {
    segment: u32,
    file: Arc<File>,
    /// Bytes of records in the segment.
    len: u64,
    /// Bytes the file holds: the records, then zeros written ahead.
    reserved: u64,
    seq: u64,
    prev: String,
}

/// How far ahead of the records a segment is extended with zeros at a time.
/// A full disk fails appends once this much is used up.
const RESERVE_BYTES: u64 = 64 << 10;

/// The largest record (an event is a few hundred bytes; its fields are
/// bounded by the API's limits).
const RECORD_BYTES_MAX: usize = 64 << 10;

/// The zeros are written a page at a time, so the page cache holds the
/// segment in page-sized pieces. Written in one 64 KiB call, the kernel
/// (6.18's ext4) keeps them as one 64 KiB folio, a record's write
/// dirties all of it, and every fsync writes the whole 64 KiB back for the
/// few records written since the last one: 25 MB/s of disk writes
/// instead of 10 at 10 ms fsyncs under a search load (`/sys/block/*/stat`).
const RESERVE_WRITE_BYTES: usize = 4096;

static ZEROS: [u8; RESERVE_BYTES as usize] = [0; RESERVE_BYTES as usize];

/// Opens segment `n` for writing: its file and its length.
fn open_segment(dir: &Path, n: u32) -> std::io::Result<(File, u64)> {
    let path = chain::segment_path(dir, n);
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

#[derive(Default)]
struct Pending {
    /// The last record written and not yet fsynced, the file it is in, and
    /// when the oldest record not yet fsynced was written.
    unsynced: Option<(u64, Arc<File>, Instant)>,
    /// The records written and not yet indexed, in order: the syncer thread
    /// indexes them in one batch after the fsync that makes them durable, so
    /// the index never names a record a power cut could take back.
    unindexed: Vec<Unindexed>,
    /// A durable append is waiting: fsync now.
    urgent: bool,
    /// The syncer thread waits with no deadline: the next record written
    /// must wake it. (Otherwise it wakes on its own by the record's
    /// deadline, and writers need not signal it.)
    idle: bool,
    stop: bool,
}

/// Every record up to `seq` is on disk; `failures` counts failed fsyncs, so
/// a durable append can tell one happened after it wrote its record.
#[derive(Debug, Clone, Copy, Default)]
struct Synced {
    seq: u64,
    failures: u64,
}

const HWM_KEY: &[u8] = b"\0hwm";

/// 16 bytes standing for a patient in the index; the NHS Number itself is
/// only in the records.
fn patient_key(nhs: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"hie-audit-index\0");
    h.update(nhs.as_bytes());
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// Where a record is: segment, offset, length, and when it was recorded.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u32,
    offset: u64,
    len: u32,
    recorded: i64,
}

impl Loc {
    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&self.segment.to_be_bytes());
        b[4..12].copy_from_slice(&self.offset.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b[16..].copy_from_slice(&self.recorded.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Loc> {
        if b.len() != 24 {
            return None;
        }
        Some(Loc {
            segment: u32::from_be_bytes(b[..4].try_into().ok()?),
            offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
            len: u32::from_be_bytes(b[12..16].try_into().ok()?),
            recorded: i64::from_be_bytes(b[16..].try_into().ok()?),
        })
    }
}

/// The index key of a record: its patient's key, then its sequence number.
fn index_key(patient: &[u8; 16], seq: u64) -> Vec<u8> {
    let mut key = patient.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn index_entry(record: &Record, loc: Loc) -> Option<(Vec<u8>, [u8; 24])> {
    Some((index_key(&patient_key(subject_of(&record.event)?), record.seq), loc.encode()))
}

fn hwm_value(seq: u64, segment: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&seq.to_be_bytes());
    b[8..].copy_from_slice(&segment.to_be_bytes());
    b
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> AuditError {
    AuditError::Open(format!("{what} {}: {e}", path.display()))
}

/// Extends the segment with zeros, `RESERVE_BYTES` at a time, until it holds
/// `end` bytes. On failure (a full disk) it is cut back to what it held.
fn reserve(head: &mut Head, end: u64) -> std::io::Result<()> {
    while head.reserved < end {
        if let Err(e) = ZEROS
            .chunks(RESERVE_WRITE_BYTES)
            .enumerate()
            .try_for_each(|(i, z)| head.file.write_all_at(z, head.reserved + (i * RESERVE_WRITE_BYTES) as u64))
        {
            if let Err(cut) = head.file.set_len(head.reserved) {
                tracing::error!(error = %cut, "could not cut the audit segment back after a failed write");
            }
            return Err(e);
        }
        head.reserved += RESERVE_BYTES;
    }
    Ok(())
}

/// Reads the last segment to find the head of the chain, cutting off what
/// follows the last complete line: zeros written ahead, and a torn
/// (incomplete, never acknowledged) record.
fn open_head(dir: &Path) -> Result<(u32, u64, String), AuditError> {
    let segs = chain::segments(dir).map_err(|e| io_err("listing", dir, e))?;
    let mut seq = 0;
    let mut prev = GENESIS.to_owned();
    // The head is the last complete line of the last segment that has one.
    for (_, path) in segs.iter().rev() {
        let bytes = std::fs::read(path).map_err(|e| io_err("reading", path, e))?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < bytes.len() {
            let torn = bytes[complete..].iter().filter(|b| **b != 0).count();
            if torn > 0 {
                tracing::warn!(segment = %path.display(), bytes = torn, "cutting off a torn audit record (never acknowledged)");
            }
            let f = OpenOptions::new().write(true).open(path).map_err(|e| io_err("opening", path, e))?;
            f.set_len(complete as u64).and_then(|_| f.sync_all()).map_err(|e| io_err("truncating", path, e))?;
        }
        if complete == 0 {
            continue;
        }
        let start = bytes[..complete - 1].iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
        let line = &bytes[start..complete - 1];
        match chain::parse_record(line) {
            Ok(r) => {
                seq = r.seq;
                prev = r.hash;
            }
            Err(reason) => {
                return Err(AuditError::Open(format!(
                    "the last audit record in {} is damaged ({reason}); run `hie audit verify`",
                    path.display()
                )));
            }
        }
        break;
    }
    Ok((segs.last().map(|(n, _)| *n).unwrap_or(1), seq, prev))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Indexes records the index has not seen (written before a crash).
fn index_hwm(index: &SideTable) -> Result<(u64, u32), AuditError> {
    Ok(match index.get(HWM_KEY).map_err(|e| AuditError::Open(e.to_string()))? {
        Some(v) if v.len() == 12 => {
            (u64::from_be_bytes(v[..8].try_into().expect("8")), u32::from_be_bytes(v[8..].try_into().expect("4")))
        }
        _ => (0, 0),
    })
}

/// Calls `each` with every complete record after the index high-water mark
/// `hwm` (those the index had not seen), a segment at a time, with where it is.
fn for_each_unindexed(
    dir: &Path,
    (hwm_seq, hwm_segment): (u64, u32),
    mut each: impl FnMut(u32, Vec<(Record, Loc)>) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    for (n, path) in chain::segments(dir).map_err(|e| io_err("listing", dir, e))? {
        if n < hwm_segment {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| io_err("reading", &path, e))?;
        let mut records = Vec::new();
        let mut offset = 0usize;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let here = offset;
            offset += line.len();
            // A line being written as we read has no newline yet, and fails.
            let Ok(record) = chain::parse_record(line.strip_suffix(b"\n").unwrap_or(line)) else { continue };
            if record.seq <= hwm_seq {
                continue;
            }
            let recorded = recorded_millis(&record.event).unwrap_or(0);
            let loc = Loc { segment: n, offset: here as u64, len: line.len() as u32, recorded };
            records.push((record, loc));
        }
        if !records.is_empty() {
            each(n, records)?;
        }
    }
    Ok(())
}

/// Indexes records the index has not seen (written before a crash, or while
/// the index could not be written).
fn catch_up_index(dir: &Path, index: &SideTable) -> Result<u64, AuditError> {
    let mut added = 0;
    for_each_unindexed(dir, index_hwm(index)?, |segment, records| {
        let last = records.last().map(|(r, _)| r.seq).expect("not empty");
        let entries: Vec<_> = records.iter().filter_map(|(r, loc)| index_entry(r, *loc)).collect();
        added += entries.len() as u64;
        let hwm = hwm_value(last, segment);
        index
            .put_all(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .chain(std::iter::once((HWM_KEY, hwm.as_slice()))),
            )
            .map_err(|e| AuditError::Open(e.to_string()))
    })?;
    Ok(added)
}

impl AuditLog {
    /// Opens (or creates) the log in `config.dir` and starts its syncer thread.
    pub fn open(config: AuditConfig, metrics: Arc<Metrics>) -> Result<Arc<AuditLog>, AuditError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| io_err("creating", &config.dir, e))?;
        let (segment, seq, prev) = open_head(&config.dir)?;
        let path = chain::segment_path(&config.dir, segment);
        let (file, len) = open_segment(&config.dir, segment).map_err(|e| io_err("opening", &path, e))?;
        // Records a crashed process left in the page cache are on disk from
        // here, and so is a new segment's name.
        file.sync_data().map_err(|e| io_err("syncing", &path, e))?;
        sync_dir(&config.dir).map_err(|e| io_err("syncing", &config.dir, e))?;
        let index_dir = config.dir.join("index");
        let mut index = SideTable::open(&index_dir).map_err(|e| AuditError::Open(e.to_string()))?;
        if index_hwm(&index)?.0 > seq {
            // The index names records the log lost (a power cut before their
            // fsync): rebuild it from the log.
            tracing::warn!(records = seq, "the audit index is ahead of the log; rebuilding it");
            drop(index);
            std::fs::remove_dir_all(&index_dir).map_err(|e| io_err("removing", &index_dir, e))?;
            index = SideTable::open(&index_dir).map_err(|e| AuditError::Open(e.to_string()))?;
        }
        let index = Arc::new(index);
        let reindexed = catch_up_index(&config.dir, &index)?;
        tracing::info!(dir = %config.dir.display(), records = seq, segment, reindexed, "audit log open");
        let inner = Arc::new(Inner {
            config,
            index,
            metrics,
            head: Mutex::new(Head { segment, file: Arc::new(file), len, reserved: len, seq, prev: prev.clone() }),
            failing: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            #[cfg(test)]
            fail_fsync: AtomicBool::new(false),
            index_behind: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            synced: tokio::sync::watch::Sender::new(Synced { seq, failures: 0 }),
            durable: Mutex::new(Durable::Known { seq, hash: prev.clone() }),
        });
        let syncer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("audit-syncer".into())
                .spawn(move || inner.run_syncer())
                .map_err(|e| AuditError::Open(format!("starting the syncer thread: {e}")))?
        };
        Ok(Arc::new(AuditLog { inner, syncer: Some(syncer) }))
    }

    pub fn dir(&self) -> &Path {
        &self.inner.config.dir
    }

    /// Appends an event and returns its sequence number once it is written
    /// into the segment (the page cache), or (`durable`) once it is fsynced too.
    ///
    /// The record is hashed and written into the segment on the caller's
    /// thread (see `Inner::write`); the syncer thread indexes it after its
    /// fsync. A durable append then waits for that fsync (one fsync serves
    /// every append waiting).
    pub async fn append(&self, event: Event, durable: bool) -> Result<u64, AuditError> {
        let inner = &self.inner;
        let started = Instant::now();
        let durable = durable || inner.config.sync_every_access;
        // Taken before the write: any fsync failure after it fails this append.
        let failures = durable.then(|| inner.synced.borrow().failures);
        let seq = inner.write(&event)?;
        if let Some(failures) = failures {
            inner.request_sync();
            inner.wait_synced(seq, failures).await?;
        }
        inner.metrics.audit_events_total.inc();
        inner.metrics.audit_write_seconds.observe(started.elapsed().as_secs_f64());
        Ok(seq)
    }

    /// True from a failed write until a write or a probe succeeds: requests
    /// that would change data are refused before they do, rather than done
    /// and not audited.
    pub fn failing(&self) -> bool {
        self.inner.failing.load(Ordering::Acquire) || self.halted()
    }

    /// The last record known to be on disk, `(seq, hash)`, or `None` for
    /// an empty log: the head this node anchors in the replicated state.
    pub fn durable_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        let mut durable = self.inner.durable.lock().unwrap_or_else(PoisonError::into_inner);
        if let Durable::At { seq, loc } = *durable {
            let path = chain::segment_path(&self.inner.config.dir, loc.segment);
            let mut buf = vec![0u8; loc.len as usize];
            let record = File::open(&path)
                .and_then(|f| f.read_exact_at(&mut buf, loc.offset))
                .map_err(|e| e.to_string())
                .and_then(|()| chain::parse_record(buf.strip_suffix(b"\n").unwrap_or(&buf)))
                .map_err(|e| AuditError::Open(format!("reading audit record {seq} in {}: {e}", path.display())))?;
            if record.seq != seq {
                return Err(AuditError::Open(format!("audit record {seq} is not where it was written")));
            }
            *durable = Durable::Known { seq, hash: record.hash };
        }
        match &*durable {
            Durable::Known { seq: 0, .. } => Ok(None),
            Durable::Known { seq, hash } => Ok(Some((*seq, hash.clone()))),
            Durable::At { .. } => unreachable!("resolved above"),
        }
    }

    /// True once an fsync failed: the log writes nothing more until the
    /// node restarts.
    pub fn halted(&self) -> bool {
        self.inner.halted.load(Ordering::Acquire)
    }
}

/// `index_behind`: the index could not be written lately, so the records
/// past its high-water mark are read from the log too.
fn query(index: &SideTable, dir: &Path, index_behind: bool, q: &AuditQuery) -> Result<AuditPage, String> {
    {
        let key = patient_key(q.subject.as_str());
        let (since, until) = (q.since.map(|t| t.0), q.until.map(|t| t.0));
        let in_range = |loc: &Loc| since.is_none_or(|s| loc.recorded >= s) && until.is_none_or(|u| loc.recorded <= u);
        // Read before the index is, so that a catch-up in between cannot
        // hide a record from both.
        let hwm = if index_behind { Some(index_hwm(index).map_err(|e| e.to_string())?) } else { None };
        let (found, truncated) = index
            .scan_prefix_rev(&key, q.limit as usize, |_, v| Loc::decode(v).is_some_and(|l| in_range(&l)))
            .map_err(|e| e.to_string())?;
        let mut page = AuditPage { truncated, ..AuditPage::default() };
        let mut open: Option<(u32, File)> = None;
        let mut events = Vec::with_capacity(found.len());
        // Newest first from the index; answered oldest first.
        for (k, v) in found.iter().rev() {
            let seq = u64::from_be_bytes(k[16..24].try_into().map_err(|_| "bad index key".to_string())?);
            let loc = Loc::decode(v).ok_or("bad index value")?;
            if open.as_ref().is_none_or(|(n, _)| *n != loc.segment) {
                let path = chain::segment_path(dir, loc.segment);
                open = Some((loc.segment, File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?));
            }
            let (_, file) = open.as_ref().expect("opened above");
            let mut buf = vec![0u8; loc.len as usize];
            let good = file
                .read_exact_at(&mut buf, loc.offset)
                .ok()
                .and_then(|_| chain::parse_record(buf.strip_suffix(b"\n").unwrap_or(&buf)).ok())
                .filter(|r| r.seq == seq && subject_of(&r.event) == Some(q.subject.as_str()));
            match good.filter(|r| crate::event::check(&r.event).is_ok()) {
                Some(r) => events.push((loc.recorded, seq, r.event)),
                None => {
                    tracing::error!(seq, "audit record failed its integrity check on a query; run `hie audit verify`");
                    page.damaged.push(seq);
                }
            }
        }
        if let Some(hwm) = hwm {
            let seen: std::collections::BTreeSet<u64> = events.iter().map(|(_, seq, _)| *seq).collect();
            for_each_unindexed(dir, hwm, |_, records| {
                for (r, loc) in records {
                    if subject_of(&r.event) == Some(q.subject.as_str()) && in_range(&loc) && !seen.contains(&r.seq) {
                        match crate::event::check(&r.event) {
                            Ok(()) => events.push((loc.recorded, r.seq, r.event)),
                            Err(_) => page.damaged.push(r.seq),
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
            if events.len() > q.limit as usize {
                // Keep the newest, as the index scan does.
                events.sort_by_key(|(_, seq, _)| std::cmp::Reverse(*seq));
                events.truncate(q.limit as usize);
                page.truncated = true;
            }
        }
        // Concurrent requests are numbered in the order their records
        // reached the writer; answer in the order they were recorded.
        events.sort_by_key(|(recorded, seq, _)| (*recorded, *seq));
        crate::event::hide_settled_intents(&mut events, |(_, _, e)| e);
        for (_, seq, e) in events {
            match crate::event::render(&e) {
                Ok(event) => page.events.push(event.to_string()),
                Err(_) => page.damaged.push(seq),
            }
        }
        Ok(page)
    }
}

impl Drop for AuditLog {
    /// Stops the syncer (it fsyncs what is written) and waits for it.
    fn drop(&mut self) {
        self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        self.inner.wake.notify_all();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        // The zeros written ahead are not left behind.
        if let Ok(head) = self.inner.head()
            && let Err(e) = head.file.set_len(head.len).and_then(|_| head.file.sync_data())
        {
            tracing::warn!(error = %e, "could not cut the zeros written ahead off the audit segment");
        }
    }
}

impl AuditSource for AuditLog {
    /// Answers from the index once it holds every record written before the
    /// query (see `Inner::settle`).
    fn query(&self, q: AuditQuery) -> AuditFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let settled = inner.settle().await;
            let behind = !settled || inner.index_behind.load(Ordering::Acquire);
            tokio::task::spawn_blocking(move || query(&inner.index, &inner.config.dir, behind, &q))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

impl Inner {
    /// Waits until every record written so far is fsynced and indexed (at
    /// most `write_timeout`), so a query sees every access answered before
    /// it. False if it could not be sure: the query then also reads the log
    /// past the index.
    async fn settle(&self) -> bool {
        let Ok(written) = self.head().map(|h| h.seq) else { return false };
        let synced = *self.synced.borrow();
        if synced.seq >= written {
            return true;
        }
        self.request_sync();
        self.wait_synced(written, synced.failures).await.is_ok()
    }

    /// Waits (at most `write_timeout`) until every record up to `seq` is
    /// fsynced; fails if an fsync failed since `failures` was read.
    async fn wait_synced(&self, seq: u64, failures: u64) -> Result<(), AuditError> {
        let mut synced = self.synced.subscribe();
        let waited = tokio::time::timeout(
            self.config.write_timeout,
            synced.wait_for(|s| s.failures != failures || s.seq >= seq),
        )
        .await;
        match waited {
            Ok(Ok(s)) if s.failures == failures => Ok(()),
            Ok(Ok(_)) => Err(AuditError::Write("fsync failed".into())),
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout(self.config.write_timeout.as_millis())),
        }
    }

    fn head(&self) -> Result<MutexGuard<'_, Head>, String> {
        // A panic while the head was held may have left it half-updated:
        // fail closed rather than chain onto it.
        self.head.lock().map_err(|_| "the audit log is unusable after an internal error; restart the node".into())
    }

    /// Hashes one record onto the chain and writes it into the segment
    /// (see [`Head`]), all under the head's lock: records are in the
    /// segment in the order of the chain, and a record that cannot be
    /// written (no room) leaves the chain as it was. Its sequence number.
    ///
    /// One system call is made here, the record's `pwrite` into the page
    /// cache (and, once every `RESERVE_BYTES`, the writes of zeros that
    /// reserve room), so the lock is held for a few microseconds and
    /// appends need no grouping or hand-off.
    fn write(&self, event: &Event) -> Result<u64, AuditError> {
        // The line adds the hashes and the sequence number to the event.
        if event.json.len() + 256 > RECORD_BYTES_MAX {
            return Err(AuditError::Write(format!(
                "an audit event of {} bytes is larger than a record may be ({RECORD_BYTES_MAX} bytes)",
                event.json.len()
            )));
        }
        let patient = (!event.subject.is_empty()).then(|| patient_key(&event.subject));
        let mut head = self.head().map_err(AuditError::Write)?;
        if self.halted.load(Ordering::Acquire) {
            return Err(AuditError::Halted);
        }
        let seq = head.seq + 1;
        let (line, hash) = chain::record_line(seq, &head.prev, &event.json);
        let n = line.len() as u64;
        if head.len > 0
            && head.len + n > self.config.segment_bytes_max
            && let Err(e) = self.roll(&mut head)
        {
            self.mark_failed();
            return Err(AuditError::Write(format!("starting a new segment: {e}")));
        }
        let end = head.len + n;
        if let Err(e) = reserve(&mut head, end) {
            tracing::error!(error = %e, "audit write failed; failing the request (fail closed)");
            self.mark_failed();
            return Err(AuditError::Write(e.to_string()));
        }
        let at = head.len;
        if let Err(e) = head.file.write_all_at(&line, at) {
            // A write cut short leaves part of the record past the last
            // whole one: put the zeros back, so that a reader (a live
            // `hie audit verify`) sees no torn record there. If that fails
            // too, the next record overwrites it, and a restart cuts off
            // whatever follows the last whole record.
            if let Some(zeros) = ZEROS.get(..line.len()) {
                let _ = head.file.write_all_at(zeros, at);
            }
            tracing::error!(error = %e, "audit write failed; failing the request (fail closed)");
            self.mark_failed();
            return Err(AuditError::Write(e.to_string()));
        }
        head.len = end;
        head.seq = seq;
        head.prev = hash;
        let loc = Loc { segment: head.segment, offset: at, len: n as u32, recorded: event.recorded };
        {
            // Under the head's lock, so records reach the syncer in order.
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            p.unindexed.push(Unindexed { seq, patient, loc });
            let since = p.unsynced.as_ref().map(|(_, _, t)| *t);
            p.unsynced = Some((seq, head.file.clone(), since.unwrap_or_else(Instant::now)));
            if p.idle {
                p.idle = false;
                self.wake.notify_all();
            }
        }
        drop(head);
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("audit log writable again");
        }
        Ok(seq)
    }

    /// Asks the syncer thread to fsync now (a durable append is waiting).
    fn request_sync(&self) {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).urgent = true;
        self.wake.notify_all();
    }

    /// The syncer thread: fsyncs written records within `sync_interval`
    /// (at once when a durable append waits), and while the log is failing
    /// or its index behind, retries them every `retry_after`.
    ///
    /// After each fsync it lingers for one `sync_interval` and then fsyncs
    /// whatever was written meanwhile: every such record is then fsynced
    /// within its interval, and under steady load the syncer wakes once per
    /// fsync, on its own, with no signal from the writers. Only after a
    /// linger with nothing written does it wait to be woken.
    fn run_syncer(&self) {
        let interval = self.config.sync_interval;
        let mut last_repair = Instant::now();
        let mut linger_until: Option<Instant> = None;
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            if let Some((seq, file, since)) = &p.unsynced {
                let due = linger_until.map_or(*since + interval, |l| l.min(*since + interval));
                if p.urgent || p.stop || now >= due {
                    let (seq, file) = (*seq, file.clone());
                    p.unsynced = None;
                    p.urgent = false;
                    let records = std::mem::take(&mut p.unindexed);
                    drop(p);
                    self.sync(seq, &file, records);
                    linger_until = Some(Instant::now() + interval);
                    p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
            } else if p.stop {
                break;
            } else if linger_until.is_some_and(|l| now >= l) {
                linger_until = None;
            }
            let troubled = self.failing.load(Ordering::Acquire) || self.index_behind.load(Ordering::Acquire);
            if troubled && now >= last_repair + self.config.retry_after {
                drop(p);
                self.repair();
                last_repair = Instant::now();
                p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let mut wait =
                if troubled { (last_repair + self.config.retry_after) - now } else { Duration::from_secs(3600) };
            if let Some((_, _, since)) = &p.unsynced {
                wait = wait.min((*since + interval).saturating_duration_since(now));
            }
            if let Some(l) = linger_until {
                wait = wait.min(l.saturating_duration_since(now));
            }
            p.idle = p.unsynced.is_none() && linger_until.is_none();
            p = self.wake.wait_timeout(p, wait).unwrap_or_else(PoisonError::into_inner).0;
            p.idle = false;
        }
        tracing::info!("audit syncer stopped");
    }

    /// Fsyncs `file`, which holds every record up to `seq` not yet fsynced,
    /// indexes those `records`, and tells the appends and queries waiting.
    fn sync(&self, seq: u64, file: &File, records: Vec<Unindexed>) {
        match self.sync_file(file) {
            Ok(()) => {
                self.index(&records);
                if let Some(last) = records.last() {
                    *self.durable.lock().unwrap_or_else(PoisonError::into_inner) =
                        Durable::At { seq: last.seq, loc: last.loc };
                }
                self.synced.send_modify(|s| s.seq = s.seq.max(seq));
            }
            Err(e) => {
                // Records already answered (reads') may not be on disk: say
                // so loudly; `hie audit verify` shows what survived.
                tracing::error!(error = %e, "audit fsync failed; records written since the last fsync may be lost");
                self.index_behind.store(true, Ordering::Release);
                self.fsync_failed();
            }
        }
    }

    /// Indexes fsynced records, and moves the index's high-water mark past
    /// them in the same batch, so a restart re-indexes only what came after.
    /// While the index is behind, leaves them to the catch-up, which reads
    /// them from the log.
    fn index(&self, records: &[Unindexed]) {
        let Some(last) = records.last() else { return };
        if self.index_behind.load(Ordering::Acquire) {
            return;
        }
        let keys: Vec<(Vec<u8>, [u8; 24])> =
            records.iter().filter_map(|r| Some((index_key(r.patient.as_ref()?, r.seq), r.loc.encode()))).collect();
        let hwm = hwm_value(last.seq, last.loc.segment);
        let batch =
            keys.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).chain(std::iter::once((HWM_KEY, hwm.as_slice())));
        if let Err(e) = self.index.put_all(batch) {
            // The records are in the log, which is what the requests need;
            // the index is derived from it and catches up once it can be
            // written (a full disk stops its flushes, and RocksDB then
            // refuses writes until it recovers).
            tracing::error!(error = %e, "audit index write failed; records stay in the log and are indexed when it can be written");
            self.metrics.audit_write_failures_total.inc();
            self.index_behind.store(true, Ordering::Release);
        }
    }

    /// Stops the log: see `halted`.
    fn fsync_failed(&self) {
        if !self.halted.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "the audit log stopped: it writes nothing more and this node refuses patient-data requests until it is restarted (ops/RUNBOOK.md#audit-log-failing)"
            );
            self.metrics.audit_stopped.set(1);
        }
        self.mark_failed();
        self.synced.send_modify(|s| s.failures += 1);
    }

    /// `fdatasync`, which a test can make fail.
    // `self` holds the test-only switch.
    #[cfg_attr(not(test), allow(clippy::unused_self))]
    fn sync_file(&self, file: &File) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_fsync.load(Ordering::Acquire) {
            return Err(std::io::Error::other("fsync failed (test)"));
        }
        if hie_store::is_planted(hie_store::PlantedBug::AuditFsync) {
            return Ok(());
        }
        file.sync_data()
    }

    /// Counts a failed write or fsync; requests that would change data are
    /// refused until a write or a probe succeeds.
    fn mark_failed(&self) {
        self.metrics.audit_write_failures_total.inc();
        self.failing.store(true, Ordering::Release);
        // The syncer thread probes for space from now on. (Under its lock,
        // so the signal cannot fall between its check and its wait.)
        let _p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
    }

    /// While failing: is there room again? While the index is behind: index
    /// what it missed.
    fn repair(&self) {
        if self.failing.load(Ordering::Acquire) && !self.halted.load(Ordering::Acquire) {
            self.probe();
        }
        if self.index_behind.load(Ordering::Acquire) {
            self.index_catch_up();
        }
    }

    /// Writes a block past the end of the segment, fsyncs, and cuts it off again.
    fn probe(&self) {
        let Ok(head) = self.head() else { return };
        let ok = head.file.write_all_at(&ZEROS, head.reserved).and_then(|_| head.file.sync_data()).is_ok();
        if let Err(e) = head.file.set_len(head.reserved).and_then(|_| head.file.sync_data()) {
            tracing::error!(error = %e, "could not cut the audit segment back after a probe");
            return;
        }
        if ok && self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!("audit log writable again (probe)");
        }
    }

    /// Indexes the records written since the index's high-water mark. Runs
    /// on the syncer thread, so no fsync indexes (or drops) records while
    /// it reads: records written after it read the log are still waiting in
    /// `Pending`, and are indexed by the next fsync.
    fn index_catch_up(&self) {
        match catch_up_index(&self.config.dir, &self.index) {
            Ok(n) => {
                self.index_behind.store(false, Ordering::Release);
                tracing::info!(records = n, "audit index caught up");
            }
            Err(e) => tracing::warn!(error = %e, "audit index still behind"),
        }
    }

    /// Closes the segment (fsynced, without the zeros written ahead) and
    /// starts the next.
    fn roll(&self, head: &mut Head) -> std::io::Result<()> {
        if let Err(e) = head.file.set_len(head.len).and_then(|_| self.sync_file(&head.file)) {
            // Fails the durable appends waiting, and stops the log.
            self.fsync_failed();
            return Err(e);
        }
        head.reserved = head.len;
        let next = head.segment + 1;
        let (file, _) = open_segment(&self.config.dir, next)?;
        sync_dir(&self.config.dir)?;
        head.segment = next;
        head.file = Arc::new(file);
        head.len = 0;
        head.reserved = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::Timestamp;
    use hie_domain::mem::testkit::nhs;

    use serde_json::Value;

    use super::*;
    use crate::{Access, Action, Context, audit_event};

    fn event(patient: u32, at: i64) -> Event {
        let access = Access {
            subject: Some(nhs(patient)),
            action: Action::Read,
            interaction: "search-type",
            resource: None,
            emergency_reason: None,
        };
        let ctx = Context {
            event_id: format!("1-{at}"),
            caller_ods: "RX9",
            caller_roles: vec!["consumer"],
            request_id: "req-1",
            correlation_id: None,
            node: "node-1 (north-east)",
            recorded: Timestamp(at),
            status: 200,
            error_code: None,
        };
        audit_event(&access, &ctx)
    }

    /// A failed fsync stops the log: nothing is written after it (not even
    /// once fsyncs work again), every append fails, and the node must
    /// restart, which reopens the chain from what is on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_stops_the_log_until_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AuditConfig::new(dir.path().join("audit"));
        config.retry_after = Duration::from_millis(20);
        let metrics = Arc::new(Metrics::new());
        let log = AuditLog::open(config.clone(), metrics.clone()).unwrap();
        assert_eq!(log.append(event(1, 1_000), true).await.unwrap(), 1);
        log.inner.fail_fsync.store(true, Ordering::Release);
        assert!(matches!(log.append(event(1, 1_001), true).await, Err(AuditError::Write(_))), "its fsync failed");
        assert!(log.halted() && log.failing());
        assert_eq!(metrics.audit_stopped.get(), 1);
        // Fsyncs work again; the log still writes nothing, read or change.
        log.inner.fail_fsync.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(log.append(event(1, 1_002), false).await, Err(AuditError::Halted)));
        assert!(matches!(log.append(event(1, 1_003), true).await, Err(AuditError::Halted)));
        assert!(log.failing(), "a probe does not revive a halted log");
        drop(log);
        // Reopened: the chain holds what reached the disk and goes on.
        let log = AuditLog::open(config, Arc::new(Metrics::new())).unwrap();
        assert!(!log.failing());
        let seq = log.append(event(1, 1_004), true).await.unwrap();
        assert!(seq == 2 || seq == 3, "the record whose fsync failed may or may not be on disk: {seq}");
        chain::verify(log.dir()).expect("the chain is whole");
    }

    /// The durable head is the last fsynced record, as the chain has it,
    /// before and after a reopen; and the chain can be checked against it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_head_is_the_last_fsynced_record() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig::new(dir.path().join("audit"));
        let log = AuditLog::open(config.clone(), Arc::new(Metrics::new())).unwrap();
        assert_eq!(log.durable_head().unwrap(), None);
        for i in 0..3 {
            log.append(event(1, 1_000 + i), true).await.unwrap();
        }
        let (seq, hash) = log.durable_head().unwrap().unwrap();
        assert_eq!(seq, 3);
        assert_eq!(hash, chain::verify(log.dir()).unwrap().head);
        assert_eq!(chain::check_anchor(log.dir(), 3, &hash).unwrap(), chain::AnchorCheck::Holds);
        assert_eq!(
            chain::check_anchor(log.dir(), 2, &hash).unwrap(),
            chain::AnchorCheck::Rewritten { found: chain::record_at(log.dir(), 2).unwrap().unwrap().hash }
        );
        assert_eq!(chain::check_anchor(log.dir(), 9, &hash).unwrap(), chain::AnchorCheck::CutShort { records: 3 });
        drop(log);
        let log = AuditLog::open(config, Arc::new(Metrics::new())).unwrap();
        assert_eq!(log.durable_head().unwrap(), Some((3, hash)));
    }

    /// An intent is hidden by the record of how its change ended, and
    /// shown (with no outcome) when that record is missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_intent_shows_only_when_its_change_has_no_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditConfig::new(dir.path().join("audit")), Arc::new(Metrics::new())).unwrap();
        let change = |request: &'static str, status: u16, at: i64| {
            let access = Access {
                subject: Some(nhs(1)),
                action: Action::Create,
                interaction: "create",
                resource: Some("DocumentReference/X".into()),
                emergency_reason: None,
            };
            let ctx = Context {
                event_id: format!("1-{at}"),
                caller_ods: "RX9",
                caller_roles: vec!["producer"],
                request_id: request,
                correlation_id: None,
                node: "node-1 (north-east)",
                recorded: Timestamp(at),
                status,
                error_code: None,
            };
            audit_event(&access, &ctx)
        };
        log.append(change("req-a", crate::INTENT, 1_000), true).await.unwrap();
        log.append(change("req-a", 201, 1_001), true).await.unwrap();
        log.append(change("req-b", crate::INTENT, 1_002), true).await.unwrap();
        let page = log.query(AuditQuery { subject: nhs(1), since: None, until: None, limit: 10 }).await.unwrap();
        let events: Vec<Value> = page.events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0]["outcome"], "0", "req-a's outcome, its intent hidden");
        assert!(events[1].get("outcome").is_none(), "req-b never ended: its intent shows");
        assert!(events[1]["outcomeDesc"].as_str().unwrap().starts_with("intent"));
        // Every record is still in the chain (and an export).
        assert_eq!(chain::verify(log.dir()).unwrap().records, 3);
    }

    /// While the index cannot be written, a query also reads the log past
    /// the index's high-water mark, so the answer still holds every record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_reads_the_log_past_an_index_that_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AuditConfig::new(dir.path().join("audit"));
        config.segment_bytes_max = 8 << 10; // records after the mark span segments
        let log = AuditLog::open(config, Arc::new(Metrics::new())).unwrap();
        for i in 0..60 {
            log.append(event(i % 3, 1_000 + i64::from(i)), false).await.unwrap();
        }
        let q = |limit| AuditQuery { subject: nhs(1), since: None, until: None, limit };
        // An index that missed every write: a new, empty one (mark 0).
        let empty = SideTable::open(&dir.path().join("empty-index")).unwrap();
        let stale = query(&empty, log.dir(), false, &q(100)).unwrap();
        assert!(stale.events.is_empty(), "the index alone knows nothing");
        let behind = query(&empty, log.dir(), true, &q(100)).unwrap();
        assert_eq!(behind.events.len(), 20);
        assert!(!behind.truncated);
        assert!(behind.events.iter().all(|e| e.contains(nhs(1).as_str())));
        let times: Vec<i64> =
            behind.events.iter().map(|e| recorded_millis(&serde_json::from_str(e).unwrap()).unwrap()).collect();
        assert_eq!(times, (0..60).filter(|i| i % 3 == 1).map(|i| 1_000 + i).collect::<Vec<_>>());
        // The limit holds, keeping the newest.
        let limited = query(&empty, log.dir(), true, &q(5)).unwrap();
        assert!(limited.truncated);
        let kept: Vec<i64> =
            limited.events.iter().map(|e| recorded_millis(&serde_json::from_str(e).unwrap()).unwrap()).collect();
        assert_eq!(kept, vec![1_046, 1_049, 1_052, 1_055, 1_058]);
        // With an index that is up to date, reading past it adds nothing twice.
        assert!(log.inner.settle().await, "every record fsynced and indexed");
        let both = query(&log.inner.index, log.dir(), true, &q(100)).unwrap();
        assert_eq!(both.events, behind.events);
    }

    /// Damaged audit segments (docs/RELIABILITY.md, "Corruption"): a torn
    /// last record (never acknowledged) is cut off on open and the chain goes
    /// on; a flipped bit in an older record leaves the log open, `verify`
    /// names that record and a patient's trail reports it as damaged rather
    /// than answer it; a damaged last record refuses the open, naming the
    /// segment, since the chain cannot go on from a head it cannot prove.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_segments_are_cut_reported_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig::new(dir.path().join("audit"));
        let log = AuditLog::open(config.clone(), Arc::new(Metrics::new())).unwrap();
        for i in 0..30 {
            log.append(event(i % 3, 1_000 + i64::from(i)), true).await.unwrap();
        }
        drop(log);
        let segment = chain::segment_path(&config.dir, 1);
        let flip = |line: usize| {
            let mut bytes = std::fs::read(&segment).unwrap();
            let start: usize = bytes.split(|b| *b == b'\n').take(line - 1).map(|l| l.len() + 1).sum();
            let at = start + find(&bytes[start..], b"search-type").expect("the record's interaction");
            bytes[at] ^= 0x01;
            std::fs::write(&segment, bytes).unwrap();
        };

        // Torn: half a record with no newline.
        let whole = std::fs::read(&segment).unwrap();
        let last_line = whole[..whole.len() - 1].iter().rposition(|b| *b == b'\n').unwrap() + 1;
        let mut torn = whole.clone();
        torn.extend_from_slice(&whole[last_line..last_line + 40]);
        std::fs::write(&segment, &torn).unwrap();
        let log = AuditLog::open(config.clone(), Arc::new(Metrics::new())).unwrap();
        assert_eq!(log.append(event(1, 2_000), true).await.unwrap(), 31, "the torn record cut off, the chain goes on");
        drop(log);
        assert_eq!(chain::verify(&config.dir).unwrap().records, 31);

        // An older record (line 11: seq 11, patient 1's) damaged.
        flip(11);
        let log = AuditLog::open(config.clone(), Arc::new(Metrics::new())).unwrap();
        let broken = chain::verify(&config.dir).expect_err("the chain is broken");
        assert_eq!((broken.segment.clone(), broken.line, broken.expected_seq), (segment.clone(), 11, 11), "{broken}");
        let q = AuditQuery { subject: nhs(1), since: None, until: None, limit: 100 };
        let page = query(&log.inner.index, log.dir(), true, &q).unwrap();
        assert_eq!(page.damaged, vec![11], "reported, not answered");
        assert_eq!(page.events.len(), 10, "patient 1's other records: {}", page.events.len());
        drop(log);

        // The last record damaged: refused, naming the segment.
        flip(31);
        let err = AuditLog::open(config, Arc::new(Metrics::new())).err().expect("refused").to_string();
        assert!(err.contains(&segment.display().to_string()) && err.contains("damaged"), "{err}");
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }
}
