//! What a store does with damaged files: a flipped bit or a torn tail in
//! its write-ahead log, its newest table file (SST) and its snapshot file.
//! Each case either refuses to open, naming the file, or opens and never
//! answers from bytes that fail their checksum. docs/RELIABILITY.md
//! ("Corruption") tabulates these tests.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hie_domain::codec;
use hie_domain::raft::{Entry, LogId};
use openraft::{CommittedLeaderId, EntryPayload};
use rocksdb::{DBRecoveryMode, WriteBatch, WriteOptions};

use crate::{Store, StoreOptions, cf, handle, keys};

const ENTRIES: u64 = 300;

fn entry(index: u64) -> Entry {
    let payload = EntryPayload::Normal(hie_domain::mem::testkit::create(
        "A81001",
        hie_domain::mem::testkit::pointer(
            "A81001",
            &format!("p{index}"),
            hie_domain::mem::testkit::nhs(index as u32 % 40),
            index as i64,
        ),
    ));
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
}

/// Appends entries 1..=n to the log, each in its own fsynced write (as
/// Raft appends are acknowledged), and closes the store.
fn store_with_synced_log(dir: &Path, n: u64) {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let db = store.reads.db();
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    for i in 1..=n {
        let mut batch = WriteBatch::default();
        batch.put_cf(handle(db, cf::LOG), keys::log_key(i), codec::encode(&entry(i)));
        db.write_opt(batch, &sync).unwrap();
    }
}

/// `store_with_synced_log`, its log then flushed into a table file; that file.
fn store_with_log_in_an_sst(dir: &Path) -> PathBuf {
    store_with_synced_log(dir, ENTRIES);
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    store.reads.db().flush_cf(handle(store.reads.db(), cf::LOG)).unwrap();
    drop(store);
    newest(dir, ".sst")
}

/// The log indexes a store holds, in order.
fn log_indexes(store: &Store) -> Vec<u64> {
    let db = store.reads.db();
    db.iterator_cf(handle(db, cf::LOG), rocksdb::IteratorMode::Start)
        .map(|kv| keys::log_index(&kv.unwrap().0).unwrap())
        .collect()
}

/// The newest file in the database directory whose name ends in `suffix`.
fn newest(dir: &Path, suffix: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix) && fs::metadata(p).unwrap().len() > 0)
        .collect();
    files.sort();
    files.pop().unwrap_or_else(|| panic!("no {suffix} file in {}", dir.display()))
}

fn flip_bit(path: &Path, offset: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn open_err(dir: &Path, mode: DBRecoveryMode) -> Option<String> {
    Store::open_with(dir, StoreOptions::default(), mode).err().map(|e| e.to_string())
}

/// A bit flipped in the middle of the WAL, in records that were fsynced
/// and acknowledged: the store refuses to open and names the WAL file.
/// RocksDB's default (point-in-time recovery) would open without every
/// entry from the damaged record on, which this test also shows.
#[test]
fn a_flipped_bit_in_the_wal_refuses_the_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    store_with_synced_log(dir.path(), ENTRIES);
    let wal = newest(dir.path(), ".log");
    let len = fs::metadata(&wal).unwrap().len();
    flip_bit(&wal, len / 2);

    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let store = Store::open_with(copy.path(), StoreOptions::default(), DBRecoveryMode::PointInTime).unwrap();
    let kept = log_indexes(&store).len() as u64;
    assert!(kept < ENTRIES, "point-in-time recovery opens without the entries after the damage: kept {kept}");
    drop(store);

    let err = Store::open(dir.path(), StoreOptions::default()).err().map(|e| e.to_string()).expect("refused");
    let name = wal.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "names the WAL file {name}: {err}");
    assert!(err.to_lowercase().contains("corrupt"), "{err}");
    // Refused again: nothing was repaired behind the operator's back.
    assert!(open_err(dir.path(), crate::WAL_RECOVERY).is_some());
}

/// A write torn at the end of the WAL (a power cut part way through an
/// append that was never acknowledged, the file ending inside it) costs
/// that write only.
#[test]
fn a_wal_cut_short_loses_only_the_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    store_with_synced_log(dir.path(), ENTRIES);
    let wal = newest(dir.path(), ".log");
    let len = fs::metadata(&wal).unwrap().len();
    OpenOptions::new().write(true).open(&wal).unwrap().set_len(len - 20).unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(log_indexes(&store), (1..ENTRIES).collect::<Vec<_>>(), "all but the torn last write");
}

/// A torn last record followed by other bytes (zeros here) cannot be told
/// from a damaged record that was fsynced: the store refuses to open,
/// naming the file, rather than guess. RocksDB's point-in-time recovery
/// would open without the record.
#[test]
fn a_wal_torn_with_bytes_after_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    store_with_synced_log(dir.path(), ENTRIES);
    let wal = newest(dir.path(), ".log");
    let len = fs::metadata(&wal).unwrap().len();
    let f = OpenOptions::new().write(true).open(&wal).unwrap();
    f.set_len(len - 20).unwrap();
    f.set_len(len + 4096).unwrap();
    drop(f);
    let err = open_err(dir.path(), crate::WAL_RECOVERY).expect("refused");
    let name = wal.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "names {name}: {err}");
}

/// A bit flipped in the newest table file's data: the store opens (table
/// blocks are checked when read), and every read either returns exactly
/// what was written or fails naming the file; none returns other bytes.
#[test]
fn a_flipped_bit_in_an_sst_is_never_answered() {
    let dir = tempfile::tempdir().unwrap();
    let sst = store_with_log_in_an_sst(dir.path());
    let len = fs::metadata(&sst).unwrap().len();
    flip_bit(&sst, len / 3);

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let db = store.reads.db();
    let name = sst.file_name().unwrap().to_string_lossy().into_owned();
    let (mut good, mut failed) = (0, 0);
    for i in 1..=ENTRIES {
        match db.get_cf(handle(db, cf::LOG), keys::log_key(i)) {
            Ok(Some(v)) => {
                assert_eq!(v, codec::encode(&entry(i)), "entry {i} read back with other bytes");
                good += 1;
            }
            Ok(None) => panic!("entry {i} missing without an error"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(&name) && e.to_lowercase().contains("corrupt"), "names {name}: {e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "the damaged block was read and refused ({good} good)");
}

/// A table file cut short: the store refuses to open, naming it.
#[test]
fn a_truncated_sst_refuses_the_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sst = store_with_log_in_an_sst(dir.path());
    let len = fs::metadata(&sst).unwrap().len();
    OpenOptions::new().write(true).open(&sst).unwrap().set_len(len - 100).unwrap();
    let err = open_err(dir.path(), crate::WAL_RECOVERY).expect("refused");
    let name = sst.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "names {name}: {err}");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A store holding `n` pointers (applied) and a snapshot of them.
async fn store_with_snapshot(dir: &Path, n: u32) {
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;
    let (mut store, entries) = crate::snapshot::tests::store_with_pointers(dir, n);
    store.state_machine.apply(entries).await.unwrap();
    store.state_machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
}

fn current_snap(dir: &Path) -> PathBuf {
    dir.join("snapshots").join(crate::snapshot::CURRENT)
}

/// A bit flipped in the current snapshot file, in its records or in its
/// header's meta: the store opens, and the first time Raft asks for the
/// snapshot (at start-up, or to send it to a follower) the file fails its
/// checksum, is set aside as `damaged-<time>.snap`, and a new one is built
/// from the state, whole; the damaged file is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_file_is_set_aside_and_built_again() {
    use openraft::storage::RaftStateMachine;
    for (what, at) in [("records", None), ("meta", Some(8u64))] {
        let dir = tempfile::tempdir().unwrap();
        store_with_snapshot(dir.path(), 300).await;
        let snap = current_snap(dir.path());
        let (meta, _) = crate::snapshot::verify_file(&snap, None).unwrap();
        let len = fs::metadata(&snap).unwrap().len();
        flip_bit(&snap, at.unwrap_or(len / 2));
        assert!(crate::snapshot::verify_file(&snap, None).is_err(), "{what}: the flip fails the check");

        let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let counters = store.state_machine.counters();
        let got = store.state_machine.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(got.meta.last_log_id, meta.last_log_id, "{what}: built again up to the applied index");
        let (again, records) = crate::snapshot::verify_file(&snap, None).unwrap();
        assert_eq!(again.last_log_id, meta.last_log_id);
        assert!(records > 300, "{what}: {records} records");
        assert_eq!(counters.damaged_total.load(std::sync::atomic::Ordering::Relaxed), 1, "{what}");
        let aside: Vec<_> = fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("damaged-") && n.ends_with(".snap"))
            .collect();
        assert_eq!(aside.len(), 1, "{what}: kept for the operator: {aside:?}");
    }
}

/// A node stopped part way through installing a snapshot must finish the
/// install from that file: if it is damaged, the store refuses to open and
/// names it, rather than serve a half-installed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_needed_to_finish_an_install_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    store_with_snapshot(dir.path(), 300).await;
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let db = store.reads.db();
        let (meta, _) = crate::snapshot::verify_file(&current_snap(dir.path()), None).unwrap();
        db.put_cf(handle(db, cf::SM_META), keys::INSTALLING, codec::encode(&meta)).unwrap();
    }
    let snap = current_snap(dir.path());
    let len = fs::metadata(&snap).unwrap().len();
    flip_bit(&snap, len / 2);
    let err = open_err(dir.path(), crate::WAL_RECOVERY).expect("refused");
    assert!(err.contains(&snap.display().to_string()), "names the file: {err}");
}
