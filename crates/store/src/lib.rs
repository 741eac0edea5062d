//! RocksDB storage for a replica: the Raft log and the patient-index state
//! machine, in one database whose column families share one write-ahead log.
//!
//! This is the only crate that links RocksDB.
//!
//! Durability: a log append is acknowledged to Raft only after the WAL has
//! been fsynced (one fsync covers every append waiting at that moment: group
//! commit). State-machine writes are not synced by themselves; they precede
//! every later synced write in the shared WAL, so a crash can only lose
//! applied state whose log entries are still on disk and will be applied
//! again. Log purges are synced writes, so state is durable before the log
//! entries that produced it are removed.

// openraft's `StorageError` is what its storage traits return: the store
// passes it on as it is rather than box it at every call.
#![allow(clippy::result_large_err)]

mod backup;
#[cfg(test)]
mod corruption;
mod keys;
mod log;
mod planted;
mod side;
mod snapshot;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DB, Options};

pub use crate::backup::BackupState;
pub use crate::log::LogStore;
pub use crate::planted::{PLANTED_BUG_ENV, PlantedBug, is_planted, planted_bug, planted_bug_setting};
pub use crate::side::SideTable;
pub use crate::state::{ReadView, SnapshotCounters, StateMachine, StateStats, SubscriptionWakes};

/// Storage errors that are not openraft's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("stored value under {cf}/{key} is corrupt: {message}")]
    Corrupt { cf: &'static str, key: String, message: String },
    #[error("io on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// RocksDB found damage while replaying its write-ahead log at open.
    #[error(
        "the write-ahead log {file} is damaged ({source}); this node will not start without what it held: rebuild it (runbook: a node refuses to start)"
    )]
    DamagedWal { file: String, source: rocksdb::Error },
    #[error("snapshot rejected: {0}")]
    BadSnapshot(String),
    /// A memory-only read needed the disk (see `ReadView::memory_only`).
    #[error("the read needs the disk")]
    WouldBlock,
}

impl StoreError {
    /// A read's error: RocksDB's "incomplete" (the data is not in memory,
    /// and the read was told not to go to disk) is [`StoreError::WouldBlock`].
    fn from_read(e: rocksdb::Error) -> StoreError {
        if e.kind() == rocksdb::ErrorKind::Incomplete { StoreError::WouldBlock } else { StoreError::Rocks(e) }
    }
}

/// Named limits and tuning of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest encoded log entry accepted on append.
    pub entry_bytes_max: usize,
    /// Most log entries returned by one read (replication batches).
    pub read_entries_max: usize,
    /// Block cache for the state machine's tables.
    pub block_cache_bytes: usize,
    /// All memtables together, over every column family: past this RocksDB
    /// flushes the largest. Without it each of the eight column families
    /// could hold two 64 MiB memtables, and a node that had just taken a
    /// large load held them until they filled.
    pub memtables_bytes_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            entry_bytes_max: 4 << 20,
            read_entries_max: 4096,
            block_cache_bytes: 64 << 20,
            memtables_bytes_max: 64 << 20,
        }
    }
}

/// The column families, in a fixed order (snapshots and digests rely on it).
pub(crate) mod cf {
    pub const LOG: &str = "log";
    pub const RAFT_META: &str = "raft_meta";
    pub const SM_META: &str = "sm_meta";
    pub const POINTERS: &str = "pointers";
    pub const PATIENTS: &str = "patients";
    pub const INDEX: &str = "patient_pointers";
    pub const IDEMPOTENCY: &str = "idempotency";
    pub const REGISTRY: &str = "registry";
    /// Past versions of pointers: `<pointer id>\0<version, 8 bytes big-endian>`.
    pub const HISTORY: &str = "pointer_history";
    /// The cross-reference of local identifiers: `<system>\0<value>` to the NHS Number.
    pub const LOCAL_IDS: &str = "local_ids";
    /// Subscriptions (`s/<id>`), the keys they are found by
    /// (`k/<key>\0<id>`) and their retained events (`e/<id>\0<number,
    /// 8 bytes big-endian>`).
    pub const SUBSCRIPTIONS: &str = "subscriptions";

    /// State-machine data: what a snapshot carries and a digest covers.
    pub const STATE: [&str; 8] = [POINTERS, PATIENTS, INDEX, IDEMPOTENCY, REGISTRY, HISTORY, LOCAL_IDS, SUBSCRIPTIONS];
    pub const ALL: [&str; 11] =
        [LOG, RAFT_META, SM_META, POINTERS, PATIENTS, INDEX, IDEMPOTENCY, REGISTRY, HISTORY, LOCAL_IDS, SUBSCRIPTIONS];
}

/// An opened store: the log, the state machine and a read view, sharing one database.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachine,
    pub reads: ReadView,
}

/// How RocksDB replays its write-ahead log on open. An incomplete record at
/// the end (a write torn by a crash or power cut, never acknowledged) is
/// dropped; any other damage (a flipped bit in a record that was fsynced,
/// a missing piece in the middle) fails the open, naming the file.
/// RocksDB's default, point-in-time recovery, instead stops the replay at the
/// first bad record and opens without everything after it: a voter would
/// come back without log entries and a vote it had acknowledged, silently.
const WAL_RECOVERY: rocksdb::DBRecoveryMode = rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords;

impl Store {
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        Store::open_with(dir, options, WAL_RECOVERY)
    }

    fn open_with(dir: &Path, options: StoreOptions, recovery: rocksdb::DBRecoveryMode) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
        let db_path = dir.join("db");
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_db_write_buffer_size(options.memtables_bytes_max);
        db_opts.set_wal_recovery_mode(recovery);
        db_opts.set_paranoid_checks(true);
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let cfs = cf::ALL.iter().map(|name| {
            let mut o = Options::default();
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&table);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if *name == cf::LOG {
                o.set_write_buffer_size(32 << 20);
            }
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = match DB::open_cf_descriptors(&db_opts, &db_path, cfs) {
            Ok(db) => Arc::new(db),
            Err(e) => {
                return Err(match damaged_wal(&db_path, &e) {
                    Some(file) => StoreError::DamagedWal { file, source: e },
                    None => StoreError::Rocks(e),
                });
            }
        };
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)
            .map_err(|source| StoreError::Io { path: snapshot_dir.clone(), source })?;
        let log = LogStore::new(db.clone(), options.clone())?;
        let state_machine = StateMachine::new(db.clone(), snapshot_dir)?;
        let reads = ReadView::new(db);
        Ok(Store { log, state_machine, reads })
    }
}

/// The WAL file a failed open found damaged, from RocksDB's info log
/// (`<db>/LOG`), where its WAL replay reports `<file>.log: dropping N
/// bytes; Corruption: ...`. RocksDB's error itself names no file.
fn damaged_wal(db_path: &Path, e: &rocksdb::Error) -> Option<String> {
    if e.kind() != rocksdb::ErrorKind::Corruption || e.to_string().contains(".sst") {
        return None;
    }
    let info = std::fs::read_to_string(db_path.join("LOG")).ok()?;
    info.lines()
        .rev()
        .filter(|l| l.contains("dropping"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_suffix(".log:").map(|f| format!("{f}.log"))))
}

pub(crate) fn handle<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}
