//! Criterion micro-benchmarks of the hot paths: NHS Number parsing, pointer
//! encode and decode, applying a batch of commands to the RocksDB state
//! machine, a patient search in RocksDB, parsing a DocumentReference, and
//! rendering a search Bundle.
//!
//! Run with the workspace's one profile (no release build of RocksDB):
//!   cargo build --benches -p hie-benches
//!   $CARGO_TARGET_DIR/debug/deps/hot_paths-* --bench
//! (see docs/BENCHMARKS.md).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hie_domain::mem::testkit;
use hie_domain::raft::{Entry, LogId};
use hie_domain::{NhsNumber, RecordPointer, codec};
use hie_store::{Store, StoreOptions};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};

/// Pointers per patient in the search benchmark (a patient with several holders).
const POINTERS_PER_PATIENT: u32 = 8;
/// Patients preloaded for the search benchmark.
const PATIENTS: u32 = 10_000;
/// Commands in one applied batch (about what openraft hands over under load).
const BATCH: usize = 64;

fn pointer(i: u32) -> RecordPointer {
    testkit::pointer("A81001", &format!("p{i}"), testkit::nhs(i / POINTERS_PER_PATIENT), i64::from(i))
}

fn entry(index: u64, command: hie_domain::Command) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

fn nhs_number(c: &mut Criterion) {
    let numbers: Vec<String> = (0..1000).map(|i| testkit::nhs(i).as_str().to_owned()).collect();
    let mut g = c.benchmark_group("nhs_number");
    g.throughput(Throughput::Elements(numbers.len() as u64));
    g.bench_function("parse_1000", |b| {
        b.iter(|| {
            for n in &numbers {
                black_box(NhsNumber::parse(black_box(n)).unwrap());
            }
        })
    });
    g.finish();
}

fn pointer_codec(c: &mut Criterion) {
    let p = pointer(1);
    let bytes = codec::encode(&p);
    let mut g = c.benchmark_group("pointer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| black_box(codec::encode(black_box(&p)))));
    g.bench_function("decode", |b| b.iter(|| black_box(codec::decode::<RecordPointer>(black_box(&bytes)).unwrap())));
    g.finish();
}

fn apply_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let registry: Vec<Entry> =
        testkit::registry_commands(&["A81001"]).into_iter().enumerate().map(|(i, c)| entry(i as u64 + 1, c)).collect();
    let mut next = registry.len() as u64 + 1;
    rt.block_on(store.state_machine.apply(registry)).unwrap();
    let mut g = c.benchmark_group("state_machine");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("apply_batch_of_64_creates", |b| {
        b.iter_batched(
            || {
                let batch: Vec<Entry> = (0..BATCH)
                    .map(|_| {
                        let i = next as u32;
                        next += 1;
                        entry(next - 1, testkit::create("A81001", pointer(i)))
                    })
                    .collect();
                batch
            },
            |batch| rt.block_on(store.state_machine.apply(batch)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn search(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut entries: Vec<Entry> =
        testkit::registry_commands(&["A81001"]).into_iter().enumerate().map(|(i, c)| entry(i as u64 + 1, c)).collect();
    let base = entries.len() as u64 + 1;
    entries.extend(
        (0..PATIENTS * POINTERS_PER_PATIENT).map(|i| entry(base + i as u64, testkit::create("A81001", pointer(i)))),
    );
    for chunk in entries.chunks(1024) {
        rt.block_on(store.state_machine.apply(chunk.to_vec())).unwrap();
    }
    let subjects: Vec<NhsNumber> = (0..PATIENTS).step_by(97).map(testkit::nhs).collect();
    let mut g = c.benchmark_group("rocksdb");
    g.throughput(Throughput::Elements(1));
    let mut k = 0;
    g.bench_function("search_patient_of_8_pointers_in_80000", |b| {
        b.iter(|| {
            k = (k + 1) % subjects.len();
            let (found, _) = store.reads.search(&subjects[k], None, 100, |_| true).unwrap();
            assert_eq!(found.len(), POINTERS_PER_PATIENT as usize);
            black_box(found)
        })
    });
    g.finish();
}

fn fhir(c: &mut Criterion) {
    let pointers: Vec<RecordPointer> = (0..POINTERS_PER_PATIENT).map(pointer).collect();
    let body = hie_fhir::document_reference(&pointers[0]).into_bytes();
    assert!(hie_fhir::parse_document_reference(&body).is_ok(), "a rendered pointer parses back");
    let mut g = c.benchmark_group("fhir");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_document_reference", |b| {
        b.iter(|| black_box(hie_fhir::parse_document_reference(black_box(&body))))
    });
    g.bench_function("render_searchset_of_8", |b| {
        b.iter(|| black_box(hie_fhir::searchset("https://node.example/fhir", 8, black_box(&pointers), None)))
    });
    g.finish();
}

criterion_group!(benches, nhs_number, pointer_codec, apply_batch, search, fhir);
criterion_main!(benches);
