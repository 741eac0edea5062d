//! Snapshots: a consistent view of the state-machine tables, serialized as
//! a checksummed stream into a file, sent in chunks from that file and
//! installed from the received file, never held whole in memory.
//!
//! File: `[meta len u32][meta cbor][stream]`, the stream compressed as one
//! LZ4 frame (pointers are JSON text as their producers sent it, which
//! compresses about threefold). Stream: `MAGIC`, then records
//! `[table u8][key len u32][key][value len u32][value]`, then `END`, then the
//! SHA-256 of the header (meta length and meta) and of everything in the
//! stream before it, so a flipped bit in the meta (its last log id, its
//! membership) fails the check like one in the records. Files of the
//! previous format (`MAGIC_V2`, whose checksum left the header out) are
//! still read.
//!
//! Installing replaces the state tables in batches of `INSTALL_BATCH_BYTES`.
//! A marker (`keys::INSTALLING`) is written first and removed with the last
//! batch, in a synced write; a store opened with the marker present installs
//! the snapshot again from `current.snap`, which is in place before the first
//! batch. So a crash mid-install never leaves a mix of old and new state.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hie_domain::codec;
use hie_domain::raft::{LogId, SnapshotMeta};
use rocksdb::{DB, WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};

use crate::{StoreError, cf, handle, keys};

const MAGIC: &[u8; 8] = b"HIESNAP3";
const MAGIC_V2: &[u8; 8] = b"HIESNAP2";
const END: u8 = 0xFF;
const CHECKSUM_LEN: usize = 32;
/// Longest key in any state table; used as the end of delete ranges.
const KEY_LEN_MAX: usize = 512;
/// Largest value a snapshot record may hold (a pointer is about 1 KB).
const VALUE_LEN_MAX: usize = 16 << 20;
/// Largest encoded meta in a snapshot file's header.
const META_LEN_MAX: usize = 1 << 20;
/// The state written to RocksDB in one batch while installing.
const INSTALL_BATCH_BYTES: usize = 32 << 20;
/// Buffer of the reader and writer of snapshot files.
const IO_BUFFER_BYTES: usize = 1 << 20;
pub(crate) const CURRENT: &str = "current.snap";
pub(crate) const RECEIVING: &str = "receiving.partial";
const PARTIAL_SUFFIX: &str = ".partial";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

fn bad(m: impl Into<String>) -> StoreError {
    StoreError::BadSnapshot(m.into())
}

/// A snapshot file's fault, with the file named (so an operator knows
/// which file a node that refuses to start is refusing).
fn in_file(path: &Path) -> impl Fn(StoreError) -> StoreError + '_ {
    move |e| match e {
        StoreError::BadSnapshot(m) => StoreError::BadSnapshot(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// A RocksDB snapshot that owns a handle on its database, so it can outlive
/// the call that took it (a snapshot builder runs after apply moved on).
#[derive(Clone)]
pub(crate) struct OwnedSnapshot(Arc<OwnedInner>);

struct OwnedInner {
    // Declared first and dropped by hand before `db`.
    snap: ManuallyDrop<rocksdb::Snapshot<'static>>,
    db: Arc<DB>,
}

impl Drop for OwnedInner {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, while `self.db` is still alive.
        unsafe { ManuallyDrop::drop(&mut self.snap) }
    }
}

impl OwnedSnapshot {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let snap = db.snapshot();
        // SAFETY: the snapshot borrows the DB behind `db`; the Arc keeps that
        // DB alive (at a stable address) for as long as `OwnedInner` exists,
        // and `Drop` releases the snapshot before the Arc.
        let snap: rocksdb::Snapshot<'static> = unsafe { std::mem::transmute(snap) };
        OwnedSnapshot(Arc::new(OwnedInner { snap: ManuallyDrop::new(snap), db }))
    }

    pub(crate) fn applied(&self) -> Result<Option<LogId>, StoreError> {
        let inner = &self.0;
        match inner.snap.get_cf(handle(&inner.db, cf::SM_META), keys::APPLIED)? {
            None => Ok(None),
            Some(b) => codec::decode(&b).map_err(|e| StoreError::Corrupt {
                cf: cf::SM_META,
                key: "applied".into(),
                message: e.to_string(),
            }),
        }
    }

    /// Visits every record of the state tables in order.
    fn for_each(&self, mut f: impl FnMut(u8, &[u8], &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let inner = &self.0;
        for (table, name) in cf::STATE.iter().enumerate() {
            // A whole-table scan: read ahead, and keep its blocks out of the
            // block cache, which holds what searches use (and would only grow
            // the node's memory while a snapshot is built).
            let mut o = rocksdb::ReadOptions::default();
            o.fill_cache(false);
            o.set_readahead_size(2 << 20);
            let mut it = inner.snap.raw_iterator_cf_opt(handle(&inner.db, name), o);
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                f(table as u8, k, v)?;
                it.next();
            }
            it.status()?;
        }
        Ok(())
    }

    /// The membership as of this view.
    pub(crate) fn membership(&self) -> Result<hie_domain::raft::StoredMembership, StoreError> {
        let inner = &self.0;
        match inner.snap.get_cf(handle(&inner.db, cf::SM_META), keys::MEMBERSHIP)? {
            None => Ok(Default::default()),
            Some(b) => codec::decode(&b).map_err(|e| StoreError::Corrupt {
                cf: cf::SM_META,
                key: "membership".into(),
                message: e.to_string(),
            }),
        }
    }

    /// Writes this view to `out` as a snapshot file with `meta` (a backup:
    /// `backup.rs`), record by record.
    pub(crate) fn write_to(&self, meta: &SnapshotMeta, out: &mut impl Write) -> Result<(), StoreError> {
        let header = write_header(out, meta).map_err(io(Path::new("backup")))?;
        self.write_stream(out, &header).map_err(|e| match e {
            StoreError::Io { source, .. } => StoreError::Io { path: "backup".into(), source },
            e => e,
        })
    }

    /// Writes the stream (magic, records, end, checksum) to `out`, compressed.
    fn write_stream(&self, out: &mut impl Write, header: &[u8]) -> Result<(), StoreError> {
        let e = |source| StoreError::Io { path: "snapshot stream".into(), source };
        let mut lz4 = lz4_flex::frame::FrameEncoder::new(out);
        self.write_records(&mut lz4, header)?;
        lz4.finish().map_err(|err| e(err.into()))?;
        Ok(())
    }

    fn write_records(&self, out: &mut impl Write, header: &[u8]) -> Result<(), StoreError> {
        let mut w = Hashing { inner: out, hash: Sha256::new_with_prefix(header) };
        let e = |source| StoreError::Io { path: "snapshot stream".into(), source };
        w.write_all(MAGIC).map_err(e)?;
        self.for_each(|table, k, v| {
            w.write_all(&[table]).map_err(e)?;
            w.write_all(&(k.len() as u32).to_le_bytes()).map_err(e)?;
            w.write_all(k).map_err(e)?;
            w.write_all(&(v.len() as u32).to_le_bytes()).map_err(e)?;
            w.write_all(v).map_err(e)
        })?;
        w.write_all(&[END]).map_err(e)?;
        let sum = w.hash.finalize();
        w.inner.write_all(&sum).map_err(e)
    }

    /// Writes this view as a snapshot file at `path` (fsynced); its size.
    pub(crate) fn write_file(&self, meta: &SnapshotMeta, path: &Path) -> Result<(File, u64), StoreError> {
        let file = File::options().read(true).write(true).create(true).truncate(true).open(path).map_err(io(path))?;
        let mut w = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        let header = write_header(&mut w, meta).map_err(io(path))?;
        self.write_stream(&mut w, &header).map_err(|e| match e {
            StoreError::Io { source, .. } => StoreError::Io { path: path.to_owned(), source },
            e => e,
        })?;
        let mut file = w.into_inner().map_err(|e| StoreError::Io { path: path.to_owned(), source: e.into_error() })?;
        file.sync_all().map_err(io(path))?;
        let size = file.seek(SeekFrom::End(0)).map_err(io(path))?;
        file.seek(SeekFrom::Start(0)).map_err(io(path))?;
        Ok((file, size))
    }

    /// (applied log id, hex SHA-256 over all state records, record count).
    /// The nodes' audit anchors are left out: they move on their own while
    /// nodes record accesses, and the digest answers "did the data change,
    /// and do replicas agree on it" (the snapshot and backup have them).
    pub(crate) fn digest(&self) -> Result<(Option<LogId>, String, u64), StoreError> {
        let applied = self.applied()?;
        let registry = cf::STATE.iter().position(|c| *c == cf::REGISTRY).expect("the registry is a state table") as u8;
        let mut h = Sha256::new();
        let mut n = 0u64;
        self.for_each(|table, k, v| {
            if table == registry && k.starts_with(keys::AUDIT_ANCHOR_PREFIX) {
                return Ok(());
            }
            h.update([table]);
            h.update((k.len() as u32).to_le_bytes());
            h.update(k);
            h.update((v.len() as u32).to_le_bytes());
            h.update(v);
            n += 1;
            Ok(())
        })?;
        Ok((applied, hex::encode(h.finalize()), n))
    }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the header; its bytes, which the stream's checksum covers.
fn write_header(out: &mut impl Write, meta: &SnapshotMeta) -> std::io::Result<Vec<u8>> {
    let meta_bytes = codec::encode(meta);
    let mut header = Vec::with_capacity(4 + meta_bytes.len());
    header.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    header.extend_from_slice(&meta_bytes);
    out.write_all(&header)?;
    Ok(header)
}

/// Reads a snapshot file's header: its meta, and the header's bytes (the
/// stream's checksum covers them).
fn read_header(r: &mut impl Read) -> Result<(SnapshotMeta, Vec<u8>), StoreError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|_| bad("truncated header"))?;
    let n = u32::from_le_bytes(len) as usize;
    if n > META_LEN_MAX {
        return Err(bad("meta too long"));
    }
    let mut header = vec![0u8; 4 + n];
    header[..4].copy_from_slice(&len);
    r.read_exact(&mut header[4..]).map_err(|_| bad("truncated meta"))?;
    let meta = codec::decode(&header[4..]).map_err(|e| bad(format!("meta: {e}")))?;
    Ok((meta, header))
}

/// Reads a stream record by record, hashing what it reads.
struct StreamReader<R> {
    inner: R,
    hash: Sha256,
    buf: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    fn read(&mut self, n: usize) -> Result<&[u8], StoreError> {
        self.buf.resize(n, 0);
        self.inner.read_exact(&mut self.buf).map_err(|_| bad("truncated record"))?;
        self.hash.update(&self.buf);
        Ok(&self.buf)
    }

    fn len(&mut self, max: usize, what: &str) -> Result<usize, StoreError> {
        let n = u32::from_le_bytes(self.read(4)?.try_into().expect("4 bytes")) as usize;
        if n > max { Err(bad(format!("{what} too long"))) } else { Ok(n) }
    }
}

/// Parses and checks a stream (after the header), calling `f` for each
/// record; the checksum is checked at the end, so `f` must not make
/// anything final before this returns Ok. The number of records.
fn parse(
    r: impl Read,
    header: &[u8],
    mut f: impl FnMut(u8, &[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let r = lz4_flex::frame::FrameDecoder::new(r);
    let mut s = StreamReader { inner: r, hash: Sha256::new_with_prefix(header), buf: Vec::new() };
    match s.read(MAGIC.len()).ok() {
        Some(m) if m == MAGIC.as_slice() => {}
        Some(m) if m == MAGIC_V2.as_slice() => s.hash = Sha256::new_with_prefix(MAGIC_V2),
        _ => return Err(bad("not a hie snapshot")),
    }
    let mut records = 0u64;
    let mut key = Vec::with_capacity(KEY_LEN_MAX);
    loop {
        let table = s.read(1)?[0];
        if table == END {
            break;
        }
        if usize::from(table) >= cf::STATE.len() {
            return Err(bad("unknown table"));
        }
        let klen = s.len(KEY_LEN_MAX, "key")?;
        key.clear();
        key.extend_from_slice(s.read(klen)?);
        let vlen = s.len(VALUE_LEN_MAX, "value")?;
        f(table, &key, s.read(vlen)?)?;
        records += 1;
    }
    let computed = s.hash.finalize();
    let mut sum = [0u8; CHECKSUM_LEN];
    s.inner.read_exact(&mut sum).map_err(|_| bad("missing checksum"))?;
    if computed.as_slice() != sum {
        return Err(bad("checksum mismatch"));
    }
    if s.inner.read(&mut [0u8; 1]).map_err(|e| bad(e.to_string()))? != 0 {
        return Err(bad("bytes after the checksum"));
    }
    Ok(records)
}

fn open_reader(path: &Path) -> Result<(SnapshotMeta, Vec<u8>, BufReader<File>), StoreError> {
    let file = File::open(path).map_err(io(path))?;
    let mut r = BufReader::with_capacity(IO_BUFFER_BYTES, file);
    let (meta, header) = read_header(&mut r).map_err(in_file(path))?;
    Ok((meta, header, r))
}

/// Opens the snapshot file at `path`, if there is one: its meta, and the
/// file at its start (to be sent from there). The meta is read from the
/// file opened, so a rename meanwhile cannot pair one snapshot's meta with
/// another's data.
pub(crate) fn open_file(path: &Path) -> Result<Option<(SnapshotMeta, File)>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path: path.to_owned(), source }),
    };
    let mut r = BufReader::new(file);
    let (meta, _) = read_header(&mut r).map_err(in_file(path))?;
    let mut file = r.into_inner();
    file.seek(SeekFrom::Start(0)).map_err(io(path))?;
    Ok(Some((meta, file)))
}

/// Checks a whole snapshot file: its meta is `expected`'s (when given) and
/// its stream is complete with the right checksum. Its meta and record count.
pub(crate) fn verify_file(path: &Path, expected: Option<&SnapshotMeta>) -> Result<(SnapshotMeta, u64), StoreError> {
    let (meta, header, r) = open_reader(path)?;
    if let Some(want) = expected
        && (meta.snapshot_id != want.snapshot_id || meta.last_log_id != want.last_log_id)
    {
        return Err(bad(format!(
            "{} holds snapshot {} up to {:?}, not {} up to {:?}",
            path.display(),
            meta.snapshot_id,
            meta.last_log_id,
            want.snapshot_id,
            want.last_log_id
        )));
    }
    let records = parse(r, &header, |_, _, _| Ok(())).map_err(in_file(path))?;
    Ok((meta, records))
}

/// Replaces the state machine with a verified snapshot file's content, in
/// batches, between the install marker and a synced last batch (see the
/// module docs). The number of records.
pub(crate) fn install_file(db: &DB, path: &Path) -> Result<u64, StoreError> {
    install_file_until(db, path, None)
}

/// `install_file`, which (in tests) stops as a crash would after writing
/// `stop_after` records, before the last batch.
fn install_file_until(db: &DB, path: &Path, stop_after: Option<u64>) -> Result<u64, StoreError> {
    let (meta, header, r) = open_reader(path)?;
    let sm_meta = handle(db, cf::SM_META);
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let mut first = WriteBatch::default();
    first.put_cf(sm_meta, keys::INSTALLING, codec::encode(&meta));
    let hi = vec![0xFFu8; KEY_LEN_MAX + 1];
    for name in cf::STATE {
        first.delete_range_cf(handle(db, name), [].as_slice(), hi.as_slice());
    }
    db.write_opt(first, &sync)?;
    let handles: Vec<_> = cf::STATE.iter().map(|n| handle(db, n)).collect();
    let mut batch = WriteBatch::default();
    let mut written = 0u64;
    let records = parse(r, &header, |table, k, v| {
        if stop_after == Some(written) {
            db.write(std::mem::take(&mut batch))?;
            return Err(bad("stopped (test)"));
        }
        written += 1;
        batch.put_cf(handles[usize::from(table)], k, v);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            // Not synced: the synced last batch makes every earlier one
            // durable (one write-ahead log), and until then the marker says
            // the install is not done.
            db.write(std::mem::take(&mut batch))?;
        }
        Ok(())
    })?;
    batch.put_cf(sm_meta, keys::APPLIED, codec::encode(&meta.last_log_id));
    batch.put_cf(sm_meta, keys::MEMBERSHIP, codec::encode(&meta.last_membership));
    batch.delete_cf(sm_meta, keys::INSTALLING);
    db.write_opt(batch, &sync)?;
    Ok(records)
}

/// If the store was stopped mid-install, installs that snapshot again from
/// `current.snap`; true if it did.
pub(crate) fn finish_interrupted_install(db: &DB, dir: &Path) -> Result<bool, StoreError> {
    let Some(marker) = db.get_cf(handle(db, cf::SM_META), keys::INSTALLING)? else { return Ok(false) };
    let meta: SnapshotMeta = codec::decode(&marker).map_err(|e| StoreError::Corrupt {
        cf: cf::SM_META,
        key: "installing".into(),
        message: e.to_string(),
    })?;
    let path = dir.join(CURRENT);
    verify_file(&path, Some(&meta))
        .map_err(|e| bad(format!("a snapshot install was interrupted and {} cannot finish it: {e}", path.display())))?;
    tracing::warn!(snapshot = %meta.snapshot_id, "a snapshot install was interrupted; installing it again");
    install_file(db, &path)?;
    Ok(true)
}

/// The snapshot files of one store: which is current, and replacing it.
/// Building runs beside applying, so a build that finishes after a newer
/// snapshot was installed must not replace it.
#[derive(Clone)]
pub(crate) struct SnapshotFiles {
    pub(crate) dir: PathBuf,
    /// The last log id of `current.snap` (None: none yet).
    current: Arc<Mutex<Option<LogId>>>,
}

/// What [`SnapshotFiles::open_current_checked`] found.
pub(crate) enum Current {
    None,
    Good(SnapshotMeta, File),
    /// The file failed its check and was set aside.
    SetAside,
}

impl SnapshotFiles {
    pub(crate) fn open(dir: PathBuf) -> Result<SnapshotFiles, StoreError> {
        remove_partial_files(&dir)?;
        let path = dir.join(CURRENT);
        let current = match open_file(&path) {
            Ok(opened) => opened.and_then(|(m, _)| m.last_log_id),
            // A damaged header: nothing is known of the file. Finishing an
            // interrupted install refuses it, naming it; otherwise the first
            // `open_current_checked` sets it aside.
            Err(StoreError::BadSnapshot(reason)) => {
                tracing::error!(%reason, "the current snapshot file is damaged");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(SnapshotFiles { dir, current: Arc::new(Mutex::new(current)) })
    }

    /// The current snapshot file, after reading it whole and checking its
    /// checksum. A file that fails is renamed `damaged-<unix seconds>.snap`
    /// (kept for the operator, never read again) and `Current::SetAside`
    /// says so.
    pub(crate) fn open_current_checked(&self) -> Result<Current, StoreError> {
        let path = self.current_path();
        match verify_file(&path, None) {
            Ok(_) => {}
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Current::None);
            }
            Err(StoreError::BadSnapshot(reason)) => {
                let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = self.dir.join(format!("damaged-{secs}.snap"));
                fs::rename(&path, &aside).map_err(io(&aside))?;
                File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
                *current = None;
                tracing::error!(
                    %reason,
                    set_aside = %aside.display(),
                    "snapshot file damaged: set aside, building a new one from the state"
                );
                return Ok(Current::SetAside);
            }
            Err(e) => return Err(e),
        }
        Ok(match open_file(&path)? {
            Some((meta, file)) => Current::Good(meta, file),
            None => Current::None,
        })
    }

    pub(crate) fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    pub(crate) fn building_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("building-{seq}{PARTIAL_SUFFIX}"))
    }

    pub(crate) fn receiving_path(&self) -> PathBuf {
        self.dir.join(RECEIVING)
    }

    /// Makes the fsynced file at `from` the current snapshot, unless one
    /// newer than `last` is current already (unless `force`: an install).
    /// False if it was not newer, and then removes it.
    pub(crate) fn publish(&self, from: &Path, last: Option<LogId>, force: bool) -> Result<bool, StoreError> {
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !force && *current > last {
            let _ = fs::remove_file(from);
            return Ok(false);
        }
        let dst = self.current_path();
        fs::rename(from, &dst).map_err(io(&dst))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        *current = last;
        Ok(true)
    }
}

fn remove_partial_files(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(io(dir))?;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(PARTIAL_SUFFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use hie_domain::mem::testkit;
    use hie_domain::raft::Entry;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};

    use super::*;
    use crate::{Store, StoreOptions};

    /// A new store at `dir`, and the entries that register a producer and create `n` pointers.
    pub(crate) fn store_with_pointers(dir: &Path, n: u32) -> (Store, Vec<Entry>) {
        let store = Store::open(dir, StoreOptions::default()).unwrap();
        let mut commands = testkit::registry_commands(&["A81001"]);
        for i in 0..n {
            let p = testkit::pointer("A81001", &format!("p{i}"), testkit::nhs(i % 40), i64::from(i));
            commands.push(testkit::create("A81001", p));
        }
        let entries = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
                payload: EntryPayload::Normal(c),
            })
            .collect();
        (store, entries)
    }

    /// A node stopped part way through installing a snapshot (some batches
    /// written, the last not) finishes the install when it is opened again,
    /// and refuses to open if the snapshot file to finish from is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_install_is_finished_on_open() {
        let a_dir = tempfile::tempdir().unwrap();
        let (mut a, entries) = store_with_pointers(a_dir.path(), 200);
        a.state_machine.apply(entries).await.unwrap();
        let snap = a.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let (applied, digest, records) = a.reads.digest().unwrap();
        assert!(records > 400);

        // B holds other state, then "crashes" 150 records into the install.
        let b_dir = tempfile::tempdir().unwrap();
        let (mut b, mut other) = store_with_pointers(b_dir.path(), 30);
        other.truncate(10);
        b.state_machine.apply(other).await.unwrap();
        let b_snapshots = b_dir.path().join("snapshots");
        fs::copy(a_dir.path().join("snapshots").join(CURRENT), b_snapshots.join(CURRENT)).unwrap();
        let err = install_file_until(b.reads.db(), &b_snapshots.join(CURRENT), Some(150)).unwrap_err();
        assert!(err.to_string().contains("stopped"), "{err}");
        assert_eq!(b.reads.digest().unwrap().2, 150, "half installed");
        drop(b);

        let mut b = Store::open(b_dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(b.reads.digest().unwrap(), (applied, digest.clone(), records));
        assert_eq!(b.state_machine.applied_state().await.unwrap().0, snap.meta.last_log_id);
        assert!(b.reads.db().get_cf(handle(b.reads.db(), cf::SM_META), keys::INSTALLING).unwrap().is_none());
        drop(b);

        // Interrupted again, and the file it needs is gone: opening fails
        // and says why, rather than serve a half-installed state.
        let b = Store::open(b_dir.path(), StoreOptions::default()).unwrap();
        let _ = install_file_until(b.reads.db(), &b_snapshots.join(CURRENT), Some(10));
        drop(b);
        fs::remove_file(b_snapshots.join(CURRENT)).unwrap();
        let err = Store::open(b_dir.path(), StoreOptions::default()).err().expect("refused");
        assert!(err.to_string().contains("interrupted"), "{err}");
    }
}
