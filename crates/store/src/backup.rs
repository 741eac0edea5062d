//! Backups of the state machine: a consistent view written out, as it is
//! read, in the snapshot file format (`snapshot.rs`), and a new node's
//! store loaded from such a file.
//!
//! A backup never sits whole in memory: the view is walked record by record
//! into whatever writer the caller gives (the API streams it to the
//! operator), so the memory it needs is the writer's buffers and the
//! compressor's, whatever the size of the state.

use std::path::Path;

use hie_domain::raft::SnapshotMeta;

use crate::snapshot::{self, OwnedSnapshot};
use crate::{Store, StoreError, StoreOptions, cf, handle, keys};

/// One consistent view of the state, taken when the backup was asked for,
/// to be written out on a blocking thread. It holds a RocksDB snapshot, so
/// the files it reads stay on disk until it is dropped.
pub struct BackupState {
    view: OwnedSnapshot,
    meta: SnapshotMeta,
}

impl BackupState {
    pub(crate) fn new(view: OwnedSnapshot) -> Result<BackupState, StoreError> {
        let last_log_id = view.applied()?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership: view.membership()?,
            snapshot_id: format!("backup-{}", last_log_id.map(|l| l.index).unwrap_or(0)),
        };
        Ok(BackupState { view, meta })
    }

    /// The log index the view is at (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        self.meta.last_log_id.map(|l| l.index).unwrap_or(0)
    }

    pub fn snapshot_id(&self) -> &str {
        &self.meta.snapshot_id
    }

    /// Writes the view to `out` as a snapshot file (meta, then the
    /// compressed, checksummed stream of records), record by record. Reads
    /// the disk: call it from a blocking thread.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> Result<(), StoreError> {
        self.view.write_to(&self.meta, out)
    }
}

impl Store {
    /// Refuses a store directory that already holds a node's state (a log,
    /// state, or a vote): a backup is restored only into a new node.
    pub fn check_new(dir: &Path) -> Result<(), StoreError> {
        let store = Store::open(dir, StoreOptions::default())?;
        store.check_empty(dir)
    }

    fn check_empty(&self, dir: &Path) -> Result<(), StoreError> {
        let db = self.reads.db();
        let empty = |name: &str| db.iterator_cf(handle(db, name), rocksdb::IteratorMode::Start).next().is_none();
        if !empty(cf::LOG)
            || !cf::STATE.iter().all(|c| empty(c))
            || db.get_cf(handle(db, cf::RAFT_META), keys::VOTE)?.is_some()
        {
            return Err(StoreError::BadSnapshot(format!(
                "{} already holds a node's state; restore only into a new data directory",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Loads a backup's state (a snapshot file at `file`, as
    /// [`BackupState::write_to`] wrote it) into a new node's empty store,
    /// as if it had installed that snapshot: state, applied index and
    /// membership from the backup, the log purged up to it. The file is
    /// moved into the store (it must be on the same file system). The node
    /// then joins as a learner and catches up from there.
    pub fn restore(dir: &Path, file: &Path) -> Result<SnapshotMeta, StoreError> {
        let store = Store::open(dir, StoreOptions::default())?;
        store.check_empty(dir)?;
        let db = store.reads.db();
        // Checked, made current and installed from there, as a received
        // snapshot is.
        std::fs::File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io { path: file.to_owned(), source })?;
        let (meta, _) = snapshot::verify_file(file, None)?;
        let files = snapshot::SnapshotFiles::open(dir.join("snapshots"))?;
        files.publish(file, meta.last_log_id, true)?;
        snapshot::install_file(db, &files.current_path())?;
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(handle(db, cf::RAFT_META), keys::LAST_PURGED, hie_domain::codec::encode(&meta.last_log_id));
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        db.write_opt(batch, &sync)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::mem::testkit;
    use hie_domain::raft::{Entry, LogId};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    /// A backup written through a small writer restores into a new store
    /// with the same state digest, and a store that holds state is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_restores_into_a_new_store_only() {
        let a_dir = tempfile::tempdir().unwrap();
        let mut a = Store::open(a_dir.path(), StoreOptions::default()).unwrap();
        let mut commands = testkit::registry_commands(&["A81001"]);
        for i in 0..300u32 {
            let p = testkit::pointer("A81001", &format!("p{i}"), testkit::nhs(i % 50), i64::from(i));
            commands.push(testkit::create("A81001", p));
        }
        let entries: Vec<Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
                payload: EntryPayload::Normal(c),
            })
            .collect();
        a.state_machine.apply(entries).await.unwrap();
        let want = a.reads.digest().unwrap();

        let backup = a.reads.backup().unwrap();
        assert_eq!(Some(backup.applied_index()), want.0.map(|l| l.index));
        let staged = tempfile::tempdir().unwrap();
        let file = staged.path().join("state.snap");
        let mut w = std::io::BufWriter::with_capacity(4096, std::fs::File::create(&file).unwrap());
        backup.write_to(&mut w).unwrap();
        std::io::Write::flush(&mut w).unwrap();
        drop(w);
        let kept = staged.path().join("again.snap");
        std::fs::copy(&file, &kept).unwrap();

        let b_dir = tempfile::tempdir().unwrap();
        Store::check_new(b_dir.path()).unwrap();
        let meta = Store::restore(b_dir.path(), &file).unwrap();
        assert_eq!(meta.last_log_id, want.0);
        let b = Store::open(b_dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(b.reads.digest().unwrap(), want);
        drop(b);

        drop((a, backup));
        let err = Store::restore(a_dir.path(), &kept).unwrap_err();
        assert!(err.to_string().contains("already holds a node's state"), "{err}");
        let err = Store::check_new(b_dir.path()).unwrap_err();
        assert!(err.to_string().contains("already holds a node's state"), "{err}");
    }
}
