//! The RocksDB state machine applies commands like the in-memory model,
//! snapshots round-trip, and a reopened store keeps what it acknowledged.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hie_domain::apply::apply;
use hie_domain::mem::{MemState, testkit};
use hie_domain::query::{StateRead, conformance};
use hie_domain::raft::{Entry, LogId};
use hie_domain::{Command, Outcome};
use hie_store::{Store, StoreOptions};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};

fn entry(index: u64, command: Command) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

fn commands(n: u32) -> Vec<Command> {
    let mut out = testkit::registry_commands(&["A81001", "RR8"]);
    for i in 0..n {
        let mut p = testkit::pointer("A81001", &format!("p{i}"), testkit::nhs(i % 50), i64::from(i));
        if i >= 50 && i % 7 == 0 {
            // Replace the first pointer of the same patient.
            p.replaces = Some(hie_domain::PointerId::parse(&format!("A81001-p{}", i % 50)).unwrap());
        }
        out.push(testkit::create("A81001", p));
        if i % 5 == 0 {
            let q = testkit::pointer("RR8", &format!("q{i}"), testkit::nhs(i % 50), i64::from(i));
            out.push(testkit::create("RR8", q));
        }
    }
    // A duplicate masterIdentifier is rejected, deterministically.
    let mut dup = testkit::pointer("A81001", "p0", testkit::nhs(0), 0);
    dup.id = hie_domain::PointerId::parse("A81001-dup").unwrap();
    out.push(testkit::create("A81001", dup));
    out
}

/// The read conformance suite that the in-memory state passes too, on the
/// store as applied and again once every table is on disk only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocks_reads_conform() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let entries: Vec<Entry> =
        conformance::commands().into_iter().enumerate().map(|(i, c)| entry(i as u64 + 1, c)).collect();
    for outcome in store.state_machine.apply(entries).await.unwrap() {
        assert!(!matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
    }
    conformance::check(&store.reads);
    drop(store);
    let reopened = Store::open(dir.path(), StoreOptions::default()).unwrap();
    conformance::check(&reopened.reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocks_matches_the_in_memory_model_and_snapshots_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let cmds = commands(300);
    let mut model = MemState::default();
    let expected: Vec<Outcome> = cmds.iter().map(|c| apply(&mut model, c).unwrap()).collect();
    // Apply in uneven batches: reads within a batch must see its own writes.
    let entries: Vec<Entry> = cmds.into_iter().enumerate().map(|(i, c)| entry(i as u64 + 1, c)).collect();
    let mut got = Vec::new();
    for chunk in entries.chunks(37) {
        got.extend(store.state_machine.apply(chunk.to_vec()).await.unwrap());
    }
    assert_eq!(got, expected);
    assert!(matches!(got.last().unwrap(), Outcome::Rejected(_)));

    // Searches agree with the model.
    for i in 0..50 {
        let nhs = testkit::nhs(i);
        let found = StateRead::scan(&store.reads, &nhs, None, 1000, 10_000, &mut |_, _| true).unwrap();
        let want: Vec<_> = model.current_pointers(&nhs).into_iter().cloned().collect();
        assert_eq!(found.resume_after, None, "no more");
        let found = found.pointers;
        assert_eq!(found, want, "patient {i}");
        assert_eq!(store.reads.patient(&nhs).unwrap().as_ref(), model.patients.get(&nhs));
    }

    // A snapshot installed into a fresh store reproduces the state exactly.
    let mut builder = store.state_machine.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();
    let (_, digest, records) = store.reads.digest().unwrap();
    assert!(records > 300);
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = Store::open(other_dir.path(), StoreOptions::default()).unwrap();
    let mut data = Vec::new();
    let mut sent = snap.snapshot;
    sent.read_to_end(&mut data).await.unwrap();
    // Received the way openraft does: into the file the store hands out.
    let mut receiving = other.state_machine.begin_receiving_snapshot().await.unwrap();
    receiving.write_all(&data).await.unwrap();
    receiving.shutdown().await.unwrap();
    other.state_machine.install_snapshot(&snap.meta, receiving).await.unwrap();
    let (applied, other_digest, _) = other.reads.digest().unwrap();
    assert_eq!(other_digest, digest);
    assert_eq!(applied, snap.meta.last_log_id);
    let (applied_state, _) = other.state_machine.applied_state().await.unwrap();
    assert_eq!(applied_state, snap.meta.last_log_id);

    // A corrupted snapshot is refused and leaves the state as it was.
    let mut bad = data.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    let third_dir = tempfile::tempdir().unwrap();
    let mut third = Store::open(third_dir.path(), StoreOptions::default()).unwrap();
    let mut receiving = third.state_machine.begin_receiving_snapshot().await.unwrap();
    receiving.write_all(&bad).await.unwrap();
    receiving.shutdown().await.unwrap();
    let err = third.state_machine.install_snapshot(&snap.meta, receiving).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(third.reads.digest().unwrap().2, 0);
    // ... and so is a good snapshot file sent under another snapshot's meta.
    let mut receiving = third.state_machine.begin_receiving_snapshot().await.unwrap();
    receiving.write_all(&data).await.unwrap();
    receiving.shutdown().await.unwrap();
    let mut other_meta = snap.meta.clone();
    other_meta.snapshot_id = "someone-else".into();
    assert!(third.state_machine.install_snapshot(&other_meta, receiving).await.is_err());
    assert_eq!(third.reads.digest().unwrap().2, 0);
    assert!(third.state_machine.get_current_snapshot().await.unwrap().is_none());

    // Reopening keeps the state and the current snapshot.
    drop(other);
    let mut reopened = Store::open(other_dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(reopened.reads.digest().unwrap().1, digest);
    let current = reopened.state_machine.get_current_snapshot().await.unwrap().expect("snapshot kept");
    assert_eq!(current.meta.last_log_id, snap.meta.last_log_id);
    // The current snapshot is sent as it was received, byte for byte.
    let mut again = Vec::new();
    let mut file = current.snapshot;
    file.read_to_end(&mut again).await.unwrap();
    assert_eq!(again, data);
}
