//! The Raft log, vote and committed index, with group commit.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

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
        Ok(LogStore { inner: Arc::new(Inner { db, options, flush_tx, counters }) })
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
        // Entries that are not there are allowed (openraft's membership scan
        // asks from index 0).
        read_range(&self.inner.db, range, usize::MAX, false)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        read_range(&self.inner.db, start..end, self.inner.options.read_entries_max, true)
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
        }
        // Written (readable) now; durable when the flusher's fsync returns.
        db.write(batch).map_err(io_write)?;
        self.inner.counters.entries_appended.fetch_add(count, Ordering::Relaxed);
        self.inner.flush_tx.send(callback).map_err(|_| io_write(std::io::Error::other("fsync thread stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
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
