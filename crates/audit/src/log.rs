//! The audit log of one node: a writer thread appending records in batches
//! (one write and one fsync per batch: group commit), a patient index in a
//! side table, and queries over both.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
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
    /// Events waiting to be written; past this, requests fail (503).
    pub queue_max: usize,
    /// Most events written by one write and fsync.
    pub batch_max: usize,
    /// How long a request waits for its audit record to be written.
    pub write_timeout: Duration,
    /// Records of reads are written (to the operating system) before the
    /// read is answered and fsynced within this interval; records of
    /// changes are fsynced before the change is answered.
    pub sync_interval: Duration,
    /// Fsync every record, reads' too, before answering.
    pub sync_every_access: bool,
    /// After a failed write, how often the writer probes for space again
    /// (requests that would change data are refused until a write succeeds).
    pub retry_after: Duration,
}

impl AuditConfig {
    pub fn new(dir: PathBuf) -> AuditConfig {
        AuditConfig {
            dir,
            segment_bytes_max: 64 << 20,
            queue_max: 10_000,
            batch_max: 1024,
            write_timeout: Duration::from_secs(2),
            sync_interval: Duration::from_millis(10),
            sync_every_access: false,
            retry_after: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit record could not be written: {0}")]
    Write(String),
    #[error("the audit queue is full ({0} events waiting)")]
    QueueFull(usize),
    #[error("the audit record was not written within {0} ms")]
    Timeout(u128),
    #[error("the audit log has stopped")]
    Stopped,
    #[error("audit log: {0}")]
    Open(String),
}

struct Job {
    event: Event,
    /// Acknowledge only once fsynced.
    durable: bool,
    ack: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

pub struct AuditLog {
    tx: SyncSender<Job>,
    /// Joined on drop, so the index is closed before the process exits.
    writer: Option<std::thread::JoinHandle<()>>,
    config: AuditConfig,
    index: Arc<SideTable>,
    /// Set by a failed write or fsync, cleared by the next success.
    failing: Arc<AtomicBool>,
    /// Set while the index is behind the log (it could not be written):
    /// queries then also read the log past the index's high-water mark.
    index_behind: Arc<AtomicBool>,
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
fn index_key(subject: &str, seq: u64) -> Vec<u8> {
    let mut key = patient_key(subject).to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn index_entry(record: &Record, loc: Loc) -> Option<(Vec<u8>, [u8; 24])> {
    Some((index_key(subject_of(&record.event)?, record.seq), loc.encode()))
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

/// Reads the last segment to find the head of the chain, cutting off a torn
/// (incomplete, never acknowledged) last line.
fn open_head(dir: &Path) -> Result<(u32, File, u64, u64, String), AuditError> {
    let segs = chain::segments(dir).map_err(|e| io_err("listing", dir, e))?;
    let mut seq = 0;
    let mut prev = GENESIS.to_owned();
    // The head is the last complete line of the last segment that has one.
    for (_, path) in segs.iter().rev() {
        let bytes = std::fs::read(path).map_err(|e| io_err("reading", path, e))?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < bytes.len() {
            tracing::warn!(segment = %path.display(), bytes = bytes.len() - complete, "cutting off a torn audit record (never acknowledged)");
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
    let segment = segs.last().map(|(n, _)| *n).unwrap_or(1);
    let path = chain::segment_path(dir, segment);
    let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_err("opening", &path, e))?;
    let len = file.metadata().map_err(|e| io_err("reading", &path, e))?.len();
    if segs.is_empty() {
        sync_dir(dir).map_err(|e| io_err("syncing", dir, e))?;
    }
    Ok((segment, file, len, seq, prev))
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
    /// Opens (or creates) the log in `config.dir` and starts its writer thread.
    pub fn open(config: AuditConfig, metrics: Arc<Metrics>) -> Result<Arc<AuditLog>, AuditError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| io_err("creating", &config.dir, e))?;
        let (segment, file, len, seq, prev) = open_head(&config.dir)?;
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
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_max);
        let failing = Arc::new(AtomicBool::new(false));
        let index_behind = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            config: config.clone(),
            segment,
            file,
            len,
            seq,
            prev,
            index: index.clone(),
            metrics,
            failing: failing.clone(),
            unsynced_since: None,
            index_behind: None,
            index_behind_flag: index_behind.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Open(format!("starting the writer thread: {e}")))?;
        Ok(Arc::new(AuditLog { tx, writer: Some(writer), config, index, failing, index_behind }))
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Appends an event and waits until it is written (`durable`: fsynced
    /// too); its sequence number.
    pub async fn append(&self, event: Event, durable: bool) -> Result<u64, AuditError> {
        let (ack, rx) = tokio::sync::oneshot::channel();
        let durable = durable || self.config.sync_every_access;
        self.tx.try_send(Job { event, durable, ack }).map_err(|e| match e {
            TrySendError::Full(_) => AuditError::QueueFull(self.config.queue_max),
            TrySendError::Disconnected(_) => AuditError::Stopped,
        })?;
        match tokio::time::timeout(self.config.write_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Stopped),
            Err(_) => Err(AuditError::Timeout(self.config.write_timeout.as_millis())),
        }
    }

    /// True from a failed write until a write or a probe succeeds: requests
    /// that would change data are refused before they do, rather than done
    /// and not audited.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// One patient's events on this node (blocking: call off the async threads).
    pub fn query_blocking(&self, q: &AuditQuery) -> Result<AuditPage, String> {
        query(&self.index, &self.config.dir, self.index_behind.load(Ordering::Acquire), q)
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
            match good {
                Some(r) => {
                    events.push((loc.recorded, seq, serde_json::to_string(&r.event).expect("a JSON value serialises")))
                }
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
                        events.push((
                            loc.recorded,
                            r.seq,
                            serde_json::to_string(&r.event).expect("a JSON value serialises"),
                        ));
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
        events.sort();
        page.events = events.into_iter().map(|(_, _, e)| e).collect();
        Ok(page)
    }
}

impl Drop for AuditLog {
    /// Stops the writer (it finishes what it has) and waits for it.
    fn drop(&mut self) {
        let (closed, _) = std::sync::mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl AuditSource for AuditLog {
    fn query(&self, q: AuditQuery) -> AuditFuture {
        let (index, dir) = (self.index.clone(), self.config.dir.clone());
        let behind = self.index_behind.load(Ordering::Acquire);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || query(&index, &dir, behind, &q)).await.map_err(|e| e.to_string())?
        })
    }
}

/// The writer thread's state: the open segment and the head of the chain.
struct Writer {
    config: AuditConfig,
    segment: u32,
    file: File,
    len: u64,
    seq: u64,
    prev: String,
    index: Arc<SideTable>,
    metrics: Arc<Metrics>,
    failing: Arc<AtomicBool>,
    /// When the oldest record not yet fsynced was written.
    unsynced_since: Option<Instant>,
    /// Set when an index write failed (the records are in the log; the
    /// index catches up from its high-water mark), with the last attempt.
    index_behind: Option<Instant>,
    /// `index_behind.is_some()`, for queries.
    index_behind_flag: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            let failing = self.failing.load(Ordering::Acquire);
            // Written records not yet fsynced are fsynced when the interval
            // since the oldest of them has passed, or sooner with a change.
            let wait = if failing {
                Some(self.config.retry_after)
            } else {
                self.unsynced_since.map(|t| self.config.sync_interval.saturating_sub(t.elapsed()))
            };
            let first = match wait {
                Some(w) => match rx.recv_timeout(w) {
                    Ok(j) => j,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if failing {
                            self.probe();
                        } else {
                            self.sync();
                        }
                        self.index_catch_up();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            };
            let mut jobs = vec![first];
            while jobs.len() < self.config.batch_max {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let started = Instant::now();
            let durable = jobs.iter().any(|j| j.durable);
            let (events, acks): (Vec<Event>, Vec<_>) = jobs.into_iter().map(|j| (j.event, j.ack)).unzip();
            let mut result = self.write_batch(events);
            if let Err(e) = &result {
                tracing::error!(error = %e, events = acks.len(), "audit write failed; failing the requests (fail closed)");
                self.mark_failed();
            } else if (durable || self.unsynced_since.is_some_and(|t| t.elapsed() >= self.config.sync_interval))
                && !self.sync()
            {
                result = Err("fsync failed".into());
            }
            self.metrics.audit_write_seconds.observe(started.elapsed().as_secs_f64());
            self.index_catch_up();
            match result {
                Ok(first_seq) => {
                    if self.failing.swap(false, Ordering::AcqRel) {
                        tracing::info!("audit log writable again");
                    }
                    self.metrics.audit_events_total.inc_by(acks.len() as u64);
                    for (i, ack) in acks.into_iter().enumerate() {
                        let _ = ack.send(Ok(first_seq + i as u64));
                    }
                }
                Err(e) => {
                    for ack in acks {
                        let _ = ack.send(Err(AuditError::Write(e.clone())));
                    }
                }
            }
        }
        tracing::info!("audit writer stopped");
    }

    /// Records whether (and since when) the index is behind, and tells queries.
    fn set_index_behind(&mut self, since: Option<Instant>) {
        self.index_behind = since;
        self.index_behind_flag.store(since.is_some(), Ordering::Release);
    }

    /// While the index is behind, tries (once per `retry_after`) to index
    /// the records written since its high-water mark.
    fn index_catch_up(&mut self) {
        let Some(last) = self.index_behind else { return };
        if last.elapsed() < self.config.retry_after {
            return;
        }
        match catch_up_index(&self.config.dir, &self.index) {
            Ok(n) => {
                tracing::info!(records = n, "audit index caught up");
                self.set_index_behind(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit index still behind");
                self.set_index_behind(Some(Instant::now()));
            }
        }
    }

    /// Counts a failed write or fsync; requests that would change data are
    /// refused until a write or a probe succeeds.
    fn mark_failed(&self) {
        self.metrics.audit_write_failures_total.inc();
        self.failing.store(true, Ordering::Release);
    }

    /// Fsyncs what was written; false (and failing) if that fails.
    fn sync(&mut self) -> bool {
        match self.file.sync_data() {
            Ok(()) => {
                self.unsynced_since = None;
                true
            }
            Err(e) => {
                // Records already answered may not be on disk: say so loudly;
                // `hie audit verify` shows what survived.
                tracing::error!(error = %e, "audit fsync failed; records written since the last fsync may be lost");
                self.mark_failed();
                false
            }
        }
    }

    /// While failing with no requests coming: is there room again? Writes
    /// a block past the end of the segment, fsyncs, and cuts it off again.
    fn probe(&mut self) {
        let ok = self.file.write_all(&[b'\n'; 4096]).and_then(|_| self.file.sync_data()).is_ok();
        if let Err(e) = self.file.set_len(self.len).and_then(|_| self.file.sync_data()) {
            tracing::error!(error = %e, "could not cut the audit segment back after a probe");
            return;
        }
        if ok {
            self.failing.store(false, Ordering::Release);
            tracing::info!("audit log writable again (probe)");
        }
    }

    fn roll(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let next = self.segment + 1;
        let path = chain::segment_path(&self.config.dir, next);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.config.dir)?;
        self.segment = next;
        self.file = file;
        self.len = 0;
        Ok(())
    }

    /// Writes the batch as one append and one fsync, then indexes it. On any
    /// failure the segment is cut back to where it was, so the chain on disk
    /// never holds a record whose request failed.
    fn write_batch(&mut self, events: Vec<Event>) -> Result<u64, String> {
        if self.len >= self.config.segment_bytes_max {
            self.roll().map_err(|e| format!("starting a new segment: {e}"))?;
        }
        let (start_seq, start_prev, start_len) = (self.seq, self.prev.clone(), self.len);
        let mut buf = Vec::with_capacity(events.len() * 2048);
        let mut index = Vec::with_capacity(events.len());
        let (mut seq, mut prev) = (start_seq, start_prev.clone());
        for event in events {
            seq += 1;
            let (line, hash) = chain::record_line(seq, &prev, &event.json);
            let loc = Loc {
                segment: self.segment,
                offset: start_len + buf.len() as u64,
                len: line.len() as u32,
                recorded: event.recorded,
            };
            index.push((index_key(&event.subject, seq), loc.encode()));
            buf.extend_from_slice(&line);
            prev = hash;
        }
        let hwm = hwm_value(seq, self.segment);
        let written = self.file.write_all(&buf).map_err(|e| e.to_string());
        if written.is_ok() && self.index_behind.is_none() {
            let indexed = self.index.put_all(
                index
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .chain(std::iter::once((HWM_KEY, hwm.as_slice()))),
            );
            // The record is in the log, which is what the request needs; the
            // index is derived from it and catches up once it can be written
            // (a full disk stops its flushes, and RocksDB then refuses writes
            // until it recovers).
            if let Err(e) = indexed {
                tracing::error!(error = %e, "audit index write failed; records stay in the log and are indexed when it can be written");
                self.metrics.audit_write_failures_total.inc();
                self.set_index_behind(Some(Instant::now()));
            }
        }
        if let Err(e) = written {
            if let Err(cut) = self.file.set_len(start_len).and_then(|_| self.file.sync_data()) {
                tracing::error!(error = %cut, "could not cut the audit segment back after a failed write");
            }
            return Err(e);
        }
        self.len = start_len + buf.len() as u64;
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.seq = seq;
        self.prev = prev;
        Ok(start_seq + 1)
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::Timestamp;
    use hie_domain::mem::testkit::nhs;

    use super::*;
    use crate::{Access, Action, Context, audit_event};

    fn event(patient: u32, at: i64) -> Event {
        let access = Access {
            subject: nhs(patient),
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
            node: "node-1 (north-east)",
            recorded: Timestamp(at),
            status: 200,
            error_code: None,
        };
        audit_event(&access, &ctx)
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
            log.append(event(i % 3, 1_000 + i as i64), false).await.unwrap();
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
        let both = query(&log.index, log.dir(), true, &q(100)).unwrap();
        assert_eq!(both.events, behind.events);
    }
}
