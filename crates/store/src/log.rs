//! The Raft log, vote and committed index, with group commit.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use hie_domain::codec;
use hie_domain::raft::{Entry, LogId, StorageError, TypeConfig, Vote};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogId, RaftLogReader, StorageIOError};
use rocksdb::{DB, WriteBatch, WriteOptions};

use crate::{StoreError, StoreOptions, cf, handle, keys};

/// Counters of the log's disk work, for metrics.
#[derive(Debug, Default)]
pub struct LogCounters {
    pub entries_appended: AtomicU64,
    /// Bytes of the entries appended, and the largest of them, since the
    /// store was opened.
    pub entry_bytes: AtomicU64,
    pub entry_bytes_max: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_micros_total: AtomicU64,
}

struct Inner {
    db: Arc<DB>,
    options: StoreOptions,
    /// Appended but not yet durable: the flusher thread fsyncs the WAL once
    /// for everything waiting and then reports each append in order.
    flush_tx: mpsc::Sender<LogFlushed<TypeConfig>>,
    counters: Arc<LogCounters>,
    cache: Mutex<EntryCache>,
}

/// Most entries kept in [`EntryCache`].
const CACHE_ENTRIES_MAX: usize = 1024;
/// Most encoded bytes of entries kept in [`EntryCache`].
const CACHE_BYTES_MAX: usize = 16 << 20;

/// The last entries appended, decoded. Each entry is read back soon after it
/// is appended: on the leader once per follower to replicate it, and on
/// every node to apply it. Served from here, those reads cost a clone
/// instead of a RocksDB seek and a CBOR decode.
///
/// **Invariant:** the cache holds a run of consecutive entries exactly as
/// they are in the store, and its last is the store's last entry (appends
/// extend it; truncate and purge cut it as they cut the store; after a
/// restart it is empty until the next append). A read it cannot answer
/// from its start goes to RocksDB.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.get_log_id().index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.get_log_id().index)
    }

    fn append(&mut self, new: Vec<(Entry, usize)>) {
        let Some((first, _)) = new.first() else { return };
        if self.last_index().is_some_and(|last| last + 1 != first.get_log_id().index) {
            self.clear();
        }
        for (e, n) in new {
            self.bytes += n;
            self.entries.push_back((e, n));
        }
        while self.entries.len() > CACHE_ENTRIES_MAX || (self.bytes > CACHE_BYTES_MAX && self.entries.len() > 1) {
            let (_, n) = self.entries.pop_front().expect("not empty");
            self.bytes -= n;
        }
    }

    /// Drops entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            let (_, n) = self.entries.pop_back().expect("not empty");
            self.bytes -= n;
        }
    }

    /// Drops entries up to `index`.
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            let (_, n) = self.entries.pop_front().expect("not empty");
            self.bytes -= n;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `start..end` (at most `limit`), if the cache holds `start`:
    /// the store has no entry past the cache's last.
    fn read(&self, start: u64, end: u64, limit: usize) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first || start > self.last_index()? {
            return None;
        }
        let skip = (start - first) as usize;
        let take = end.saturating_sub(start).min(limit as u64) as usize;
        Some(self.entries.iter().skip(skip).take(take).map(|(e, _)| e.clone()).collect())
    }
}

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn io_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>, options: StoreOptions) -> Result<LogStore, StoreError> {
        let (flush_tx, flush_rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let counters = Arc::new(LogCounters::default());
        // Weak: the fsync thread must not keep the database open after the store is dropped.
        let flusher_db = Arc::downgrade(&db);
        let flusher_counters = counters.clone();
        std::thread::Builder::new()
            .name("hie-log-fsync".into())
            .spawn(move || flusher(flusher_db, flush_rx, flusher_counters))
            .map_err(|source| StoreError::Io { path: "fsync thread".into(), source })?;
        let cache = Mutex::new(EntryCache::default());
        Ok(LogStore { inner: Arc::new(Inner { db, options, flush_tx, counters, cache }) })
    }

    pub fn counters(&self) -> Arc<LogCounters> {
        self.inner.counters.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let db = &self.inner.db;
        match db.get_cf(handle(db, cf::RAFT_META), key).map_err(io_read)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(io_read)?)),
        }
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let db = &self.inner.db;
        let mut it = db.raw_iterator_cf(handle(db, cf::LOG));
        it.seek_to_last();
        it.status().map_err(io_read)?;
        match it.value() {
            None => Ok(None),
            Some(v) => {
                let entry: Entry = codec::decode(v).map_err(io_read)?;
                Ok(Some(*entry.get_log_id()))
            }
        }
    }
}

/// The group-commit loop: one WAL fsync for every append waiting.
fn flusher(db: std::sync::Weak<DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>, counters: Arc<LogCounters>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let started = std::time::Instant::now();
        let result = match db.upgrade() {
            Some(_) if crate::is_planted(crate::PlantedBug::LogFsync) => Ok(()),
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the store was closed".to_owned()),
        };
        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        counters.fsync_micros_total.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "log fsync failed; the appends waiting on it are not acknowledged");
        }
        for callback in waiting {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.clone())),
            };
            callback.log_io_completed(r);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        if let Some(hit) = self.cached(&range, usize::MAX) {
            return Ok(hit);
        }
        // Entries that are not there are allowed (openraft's membership scan
        // asks from index 0).
        read_range(&self.inner.db, range, usize::MAX, false)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let limit = self.inner.options.read_entries_max;
        if let Some(hit) = self.cached(&(start..end), limit) {
            return Ok(hit);
        }
        read_range(&self.inner.db, start..end, limit, true)
    }
}

impl LogStore {
    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.inner.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entries of `range` from the cache, if it holds the range's start.
    fn cached<RB: RangeBounds<u64>>(&self, range: &RB, limit: usize) -> Option<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        self.cache().read(start, end, limit)
    }
}

/// The entries in `range`, at most `limit`. With `from_start`, the entries
/// returned begin at the range's start or there are none.
fn read_range<RB: RangeBounds<u64>>(
    db: &DB,
    range: RB,
    limit: usize,
    from_start: bool,
) -> Result<Vec<Entry>, StorageError> {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i + 1,
        Bound::Unbounded => 0,
    };
    let mut out = Vec::new();
    let mut it = db.raw_iterator_cf(handle(db, cf::LOG));
    it.seek(keys::log_key(start));
    while it.valid() && out.len() < limit {
        let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
        let index = keys::log_index(k).ok_or_else(|| {
            io_read(StoreError::Corrupt { cf: cf::LOG, key: hex_key(k), message: "log key is not 8 bytes".into() })
        })?;
        if !range.contains(&index) {
            break;
        }
        // Replication builds AppendEntries from these entries after
        // `prev_log_id = start - 1`, and a follower's core panics on a gap. A
        // range whose start was purged meanwhile (a replication stream racing
        // a snapshot's purge) therefore reads as nothing, never as the later
        // entries; openraft then sends a heartbeat and, next, the snapshot.
        // Found by the simulation (crates/sim, `--defect shifted-read`).
        if from_start && out.is_empty() && index != start {
            return Ok(vec![]);
        }
        let entry: Entry = codec::decode(v).map_err(io_read)?;
        // Check data on the way back: the entry is the one its key names.
        if entry.get_log_id().index != index {
            return Err(io_read(StoreError::Corrupt {
                cf: cf::LOG,
                key: index.to_string(),
                message: format!("entry at key {index} says it is index {}", entry.get_log_id().index),
            }));
        }
        out.push(entry);
        it.next();
    }
    it.status().map_err(io_read)?;
    Ok(out)
}

fn hex_key(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(keys::LAST_PURGED)?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let db = self.inner.db.clone();
        let bytes = codec::encode(vote);
        tokio::task::spawn_blocking(move || db.put_cf_opt(handle(&db, cf::RAFT_META), keys::VOTE, bytes, &sync_opts()))
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))?
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(keys::VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a lost committed index is recomputed by Raft.
        let db = &self.inner.db;
        db.put_cf(handle(db, cf::RAFT_META), keys::COMMITTED, codec::encode(&committed)).map_err(io_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(keys::COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = &self.inner.db;
        let log_cf = handle(db, cf::LOG);
        let mut batch = WriteBatch::default();
        let mut count = 0u64;
        let mut buf = Vec::with_capacity(512);
        let mut appended = Vec::new();
        let (mut largest, mut bytes) = (0, 0);
        for entry in entries {
            buf.clear();
            codec::encode_into(&entry, &mut buf);
            if buf.len() > self.inner.options.entry_bytes_max {
                return Err(io_write(StoreError::Corrupt {
                    cf: cf::LOG,
                    key: entry.get_log_id().index.to_string(),
                    message: format!(
                        "entry of {} bytes exceeds entry_bytes_max {}",
                        buf.len(),
                        self.inner.options.entry_bytes_max
                    ),
                }));
            }
            batch.put_cf(log_cf, keys::log_key(entry.get_log_id().index), &buf);
            count += 1;
            largest = largest.max(buf.len());
            bytes += buf.len() as u64;
            appended.push((entry, buf.len()));
        }
        if let Err(e) = db.write(batch) {
            // What the store holds past its last entries is not known now.
            self.cache().clear();
            return Err(io_write(e));
        }
        self.cache().append(appended);
        self.inner.counters.entries_appended.fetch_add(count, Ordering::Relaxed);
        self.inner.counters.entry_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.inner.counters.entry_bytes_max.fetch_max(largest as u64, Ordering::Relaxed);
        self.inner.flush_tx.send(callback).map_err(|_| io_write(std::io::Error::other("fsync thread stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Cut first: a read meanwhile goes to the store, never to a cached
        // entry the store no longer has.
        self.cache().truncate(log_id.index);
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(handle(&db, cf::LOG), keys::log_key(log_id.index), keys::log_key(u64::MAX));
            // delete_range's end is exclusive; u64::MAX is never a real index.
            db.write_opt(batch, &sync_opts())
        })
        .await
        .map_err(io_write)?
        .map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().purge(log_id.index);
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(handle(&db, cf::RAFT_META), keys::LAST_PURGED, codec::encode(&Some(log_id)));
            batch.delete_range_cf(handle(&db, cf::LOG), keys::log_key(0), keys::log_key(log_id.index + 1));
            // Synced: every state-machine write before it in the WAL is durable
            // before the log entries that produced it disappear.
            db.write_opt(batch, &sync_opts())
        })
        .await
        .map_err(io_write)?
        .map_err(io_write)
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::raft::LogId;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> (Entry, usize) {
        (Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }, 10)
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn the_entry_cache_answers_only_what_it_holds_from_the_start() {
        let mut c = EntryCache::default();
        assert_eq!(indexes(c.read(1, 5, 10)), None);
        c.append((1..=5).map(entry).collect());
        assert_eq!(indexes(c.read(2, 4, 10)), Some(vec![2, 3]));
        assert_eq!(indexes(c.read(4, u64::MAX, 10)), Some(vec![4, 5]));
        assert_eq!(indexes(c.read(1, u64::MAX, 2)), Some(vec![1, 2]));
        assert_eq!(indexes(c.read(6, 9, 10)), None, "past the last: the store decides");
        c.truncate(4);
        assert_eq!(indexes(c.read(1, 9, 10)), Some(vec![1, 2, 3]));
        c.purge(2);
        assert_eq!(indexes(c.read(1, 9, 10)), None, "purged: the store decides");
        assert_eq!(indexes(c.read(3, 9, 10)), Some(vec![3]));
        // A gap (an append the cache did not follow) empties it first.
        c.append(vec![entry(7)]);
        assert_eq!(indexes(c.read(3, 9, 10)), None);
        assert_eq!(indexes(c.read(7, 9, 10)), Some(vec![7]));
        // Bounded by count.
        c.append((8..8 + CACHE_ENTRIES_MAX as u64 + 5).map(entry).collect());
        assert_eq!(c.entries.len(), CACHE_ENTRIES_MAX);
        assert_eq!(c.bytes, 10 * CACHE_ENTRIES_MAX);
        assert_eq!(c.first_index(), Some(13));
    }
}
