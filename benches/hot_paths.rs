//! Criterion micro-benchmarks of the hot paths: NHS Number parsing, pointer
//! encode and decode, applying a batch of commands to the RocksDB state
//! machine, a patient search in RocksDB, pages of a patient with 50,000
//! pointers (first, 50th, 2,500th, and the count), parsing a
//! DocumentReference, and rendering a search Bundle.
//!
//! Run with the workspace's one profile (no release build of RocksDB):
//!   cargo build --benches -p hie-benches
//!   $CARGO_TARGET_DIR/debug/deps/hot_paths-* --bench
//! (see docs/BENCHMARKS.md).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hie_domain::mem::testkit;
use hie_domain::query::{self, Search, SearchFilter};
use hie_domain::raft::{Entry, LogId};
use hie_domain::{NhsNumber, PointerId, Purpose, Reader, RecordPointer, Role, codec};
use hie_store::{Store, StoreOptions};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};

/// Pointers per patient in the search benchmark (a patient with several holders).
const POINTERS_PER_PATIENT: u32 = 8;
/// Patients preloaded for the search benchmark.
const PATIENTS: u32 = 10_000;
/// Pointers of the one patient in the paging benchmark.
const BIG_PATIENT_POINTERS: u32 = 50_000;
/// Pointers on a page of the paging benchmark.
const PAGE: usize = 20;
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
        (0..PATIENTS * POINTERS_PER_PATIENT).map(|i| entry(base + u64::from(i), testkit::create("A81001", pointer(i)))),
    );
    for chunk in entries.chunks(1024) {
        rt.block_on(store.state_machine.apply(chunk.to_vec())).unwrap();
    }
    let subjects: Vec<NhsNumber> = (0..PATIENTS).step_by(97).map(testkit::nhs).collect();
    let reader = conformance_reader();
    let mut g = c.benchmark_group("rocksdb");
    g.throughput(Throughput::Elements(1));
    let mut k = 0;
    g.bench_function("search_patient_of_8_pointers_in_80000", |b| {
        b.iter(|| {
            k = (k + 1) % subjects.len();
            let page =
                query::search(&store.reads, &reader, &Purpose::DirectCare, &search_of(subjects[k], None, 100)).unwrap();
            assert_eq!(page.pointers.len(), POINTERS_PER_PATIENT as usize);
            black_box(page)
        })
    });
    g.finish();
}

fn search_of(subject: NhsNumber, after: Option<PointerId>, count: usize) -> Search {
    Search { subject, filter: SearchFilter::default(), after, count, scan_max: 10_000 }
}

fn conformance_reader() -> Reader {
    Reader::new(&testkit::caller("Y01", &[Role::Consumer])).unwrap()
}

/// One patient with `BIG_PATIENT_POINTERS` pointers: a page by key costs
/// the same however deep it is, and the total comes from the patient index.
fn paging(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let subject = testkit::nhs(1);
    let mut commands = testkit::registry_commands(&["A81001"]);
    commands
        .extend((0..BIG_PATIENT_POINTERS).map(|i| {
            testkit::create("A81001", testkit::pointer("A81001", &format!("p{i:06}"), subject, i64::from(i)))
        }));
    let entries: Vec<Entry> = commands.into_iter().enumerate().map(|(i, c)| entry(i as u64 + 1, c)).collect();
    for chunk in entries.chunks(1024) {
        rt.block_on(store.state_machine.apply(chunk.to_vec())).unwrap();
    }
    let reader = conformance_reader();
    let run = |q: &Search| query::search(&store.reads, &reader, &Purpose::DirectCare, q).unwrap();
    // The id each page starts after, found by paging through once.
    let mut afters: Vec<Option<PointerId>> = vec![None];
    let mut page = run(&search_of(subject, None, PAGE));
    assert_eq!(page.total, u64::from(BIG_PATIENT_POINTERS), "total exact");
    while let Some(after) = page.next_after.clone() {
        afters.push(Some(after.clone()));
        page = run(&search_of(subject, Some(after), PAGE));
    }
    assert_eq!(afters.len(), BIG_PATIENT_POINTERS as usize / PAGE);
    let mut g = c.benchmark_group("paging_50000");
    g.throughput(Throughput::Elements(1));
    for n in [1usize, 50, 2_500] {
        let q = search_of(subject, afters[n - 1].clone(), PAGE);
        g.bench_function(format!("page_{n}_of_20"), |b| {
            b.iter(|| {
                let page = run(&q);
                assert_eq!(page.pointers.len(), PAGE);
                black_box(page)
            })
        });
    }
    let q = search_of(subject, None, 0);
    g.bench_function("count", |b| {
        b.iter(|| {
            let page = run(&q);
            assert_eq!(page.total, u64::from(BIG_PATIENT_POINTERS));
            black_box(page)
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
    let base = "https://node.example/fhir";
    let self_url = "https://node.example/fhir/DocumentReference/_search";
    g.bench_function("render_searchset_of_8", |b| {
        b.iter(|| black_box(hie_fhir::searchset(base, 8, black_box(&pointers), self_url, None, None)))
    });
    // NRLF-sized pointers: every element of NRLF's ssp sample (2.4 KB of JSON).
    let nrlf = include_bytes!("../tests/data/nrlf/valid-with-ssp-content.json");
    let nrlf_pointer = hie_fhir::parse_document_reference(nrlf).expect("the sample parses").pointer;
    let nrlf_pointers = vec![nrlf_pointer; 8];
    g.bench_function("parse_document_reference_nrlf", |b| {
        b.iter(|| black_box(hie_fhir::parse_document_reference(black_box(nrlf))))
    });
    g.bench_function("render_searchset_of_8_nrlf", |b| {
        b.iter(|| black_box(hie_fhir::searchset(base, 8, black_box(&nrlf_pointers), self_url, None, None)))
    });
    g.finish();
}

criterion_group!(benches, nhs_number, pointer_codec, apply_batch, search, paging, fhir);
criterion_main!(benches);
