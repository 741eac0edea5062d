//! Snapshots: a consistent view of the state-machine tables, serialized as
//! a checksummed stream, kept as one file and installed atomically.
//!
//! Stream: `MAGIC`, then records `[table u8][key len u32][key][value len u32][value]`,
//! then `END`, then the SHA-256 of everything before it.

use std::fs::{self, File};
use std::io::Write;
use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::Arc;

use hie_domain::codec;
use hie_domain::raft::{LogId, SnapshotMeta};
use rocksdb::{DB, WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};

use crate::{StoreError, cf, handle, keys};

const MAGIC: &[u8; 8] = b"HIESNAP1";
const END: u8 = 0xFF;
const CHECKSUM_LEN: usize = 32;
/// Longest key in any state table; used as the end of delete ranges.
const KEY_LEN_MAX: usize = 512;
const CURRENT: &str = "current.snap";
const PARTIAL_SUFFIX: &str = ".partial";

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

    fn applied(&self) -> Result<Option<LogId>, StoreError> {
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
    fn for_each(&self, mut f: impl FnMut(u8, &[u8], &[u8])) -> Result<(), StoreError> {
        let inner = &self.0;
        for (table, name) in cf::STATE.iter().enumerate() {
            let mut it = inner.snap.raw_iterator_cf(handle(&inner.db, name));
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                f(table as u8, k, v);
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

    /// A consistent backup: the snapshot file format, from this one view.
    pub(crate) fn backup(&self) -> Result<Vec<u8>, StoreError> {
        let last_log_id = self.applied()?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership: self.membership()?,
            snapshot_id: format!("backup-{}", last_log_id.map(|l| l.index).unwrap_or(0)),
        };
        Ok(SnapshotFile::encode(&meta, &self.serialize_state()?))
    }

    pub(crate) fn serialize_state(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(1 << 20);
        out.extend_from_slice(MAGIC);
        self.for_each(|table, k, v| {
            out.push(table);
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        })?;
        out.push(END);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// (applied log id, hex SHA-256 over all state records, record count).
    pub(crate) fn digest(&self) -> Result<(Option<LogId>, String, u64), StoreError> {
        let applied = self.applied()?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        self.for_each(|table, k, v| {
            h.update([table]);
            h.update((k.len() as u32).to_le_bytes());
            h.update(k);
            h.update((v.len() as u32).to_le_bytes());
            h.update(v);
            n += 1;
        })?;
        Ok((applied, hex::encode(h.finalize()), n))
    }
}

/// Parses and checks a snapshot stream, calling `f` for each record.
fn parse(data: &[u8], mut f: impl FnMut(u8, &[u8], &[u8])) -> Result<u64, StoreError> {
    let bad = |m: &str| StoreError::BadSnapshot(m.to_owned());
    if data.len() < MAGIC.len() + 1 + CHECKSUM_LEN || &data[..MAGIC.len()] != MAGIC {
        return Err(bad("not a hie snapshot"));
    }
    let (body, sum) = data.split_at(data.len() - CHECKSUM_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err(bad("checksum mismatch"));
    }
    let mut pos = MAGIC.len();
    let mut records = 0u64;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], StoreError> {
        let s = body.get(*pos..*pos + n).ok_or_else(|| bad("truncated record"))?;
        *pos += n;
        Ok(s)
    };
    loop {
        let table = *body.get(pos).ok_or_else(|| bad("missing end marker"))?;
        pos += 1;
        if table == END {
            break;
        }
        if usize::from(table) >= cf::STATE.len() {
            return Err(bad("unknown table"));
        }
        let klen = u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap()) as usize;
        if klen > KEY_LEN_MAX {
            return Err(bad("key too long"));
        }
        let k = take(&mut pos, klen)?;
        let vlen = u32::from_le_bytes(take(&mut pos, 4)?.try_into().unwrap()) as usize;
        let v = take(&mut pos, vlen)?;
        f(table, k, v);
        records += 1;
    }
    if pos != body.len() {
        return Err(bad("bytes after end marker"));
    }
    Ok(records)
}

/// Replaces the state machine with a snapshot's content in one synced write.
pub(crate) fn install(db: &DB, meta: &SnapshotMeta, data: &[u8]) -> Result<u64, StoreError> {
    let mut batch = WriteBatch::default();
    let hi = vec![0xFFu8; KEY_LEN_MAX + 1];
    for name in cf::STATE {
        batch.delete_range_cf(handle(db, name), [].as_slice(), hi.as_slice());
    }
    let handles: Vec<_> = cf::STATE.iter().map(|n| handle(db, n)).collect();
    let records = parse(data, |table, k, v| batch.put_cf(handles[usize::from(table)], k, v))?;
    let sm_meta = handle(db, cf::SM_META);
    batch.put_cf(sm_meta, keys::APPLIED, codec::encode(&meta.last_log_id));
    batch.put_cf(sm_meta, keys::MEMBERSHIP, codec::encode(&meta.last_membership));
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    Ok(records)
}

/// The current snapshot on disk: `[meta len u32][meta cbor][stream]`.
pub(crate) struct SnapshotFile;

impl SnapshotFile {
    pub(crate) fn save(dir: &Path, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let tmp = dir.join(format!("{CURRENT}{PARTIAL_SUFFIX}"));
        let meta_bytes = codec::encode(meta);
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&(meta_bytes.len() as u32).to_le_bytes()).map_err(io(&tmp))?;
        f.write_all(&meta_bytes).map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let dst = dir.join(CURRENT);
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        Ok(())
    }

    pub(crate) fn load(dir: &Path) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
        let path = dir.join(CURRENT);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Self::decode(&bytes).map(Some).map_err(|e| StoreError::BadSnapshot(format!("{}: {e}", path.display())))
    }

    /// `[meta len u32][meta cbor][stream]`: the file and backup format.
    pub(crate) fn encode(meta: &SnapshotMeta, data: &[u8]) -> Vec<u8> {
        let meta_bytes = codec::encode(meta);
        let mut out = Vec::with_capacity(4 + meta_bytes.len() + data.len());
        out.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta_bytes);
        out.extend_from_slice(data);
        out
    }

    /// Splits and checks the file format (the stream's checksum included).
    pub(crate) fn decode(bytes: &[u8]) -> Result<(SnapshotMeta, Vec<u8>), StoreError> {
        let bad = |m: &str| StoreError::BadSnapshot(m.to_owned());
        let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(|| bad("truncated"))?.try_into().unwrap()) as usize;
        let meta_bytes = bytes.get(4..4 + len).ok_or_else(|| bad("truncated meta"))?;
        let meta: SnapshotMeta = codec::decode(meta_bytes).map_err(|e| bad(&e.to_string()))?;
        let data = bytes[4 + len..].to_vec();
        parse(&data, |_, _, _| {})?;
        Ok((meta, data))
    }
}

pub(crate) fn remove_partial_files(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(PARTIAL_SUFFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}
