//! The audit log on a real filesystem: appends, the chain, tampering, torn
//! writes, restarts and patient queries.

use std::sync::Arc;

use hie_audit::chain;
use hie_audit::{Access, Action, AuditConfig, AuditLog, Context, audit_event};
use hie_domain::audit::{AuditQuery, AuditSource};
use hie_domain::mem::testkit::nhs;
use hie_domain::{NhsNumber, Timestamp};
use hie_metrics::Metrics;

fn event(subject: &NhsNumber, at: i64, emergency: bool) -> hie_audit::Event {
    let access = Access {
        subject: Some(*subject),
        action: Action::Read,
        interaction: "search-type",
        resource: None,
        emergency_reason: emergency.then(|| "unconscious, no history".to_owned()),
    };
    let ctx = Context {
        event_id: format!("1-{at}-{emergency}"),
        caller_ods: "RX9",
        caller_roles: vec!["consumer"],
        request_id: "req-1",
        correlation_id: None,
        node: "node-1 (north-east)",
        recorded: Timestamp(at),
        status: 200,
        error_code: None,
    };
    audit_event(&access, &ctx)
}

fn open(dir: &std::path::Path) -> Arc<AuditLog> {
    let mut config = AuditConfig::new(dir.to_owned());
    config.segment_bytes_max = 8 << 10; // several segments in a test
    AuditLog::open(config, Arc::new(Metrics::new())).unwrap()
}

fn query(subject: &NhsNumber, since: Option<i64>, until: Option<i64>, limit: u32) -> AuditQuery {
    AuditQuery { subject: *subject, since: since.map(Timestamp), until: until.map(Timestamp), limit }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_chain_survive_restart_and_answer_patient_queries() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // Concurrent appends go out in batches; every one is acknowledged once.
    let mut tasks = Vec::new();
    for i in 0..200i64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(event(&nhs((i % 5) as u32), 1_000 + i, i % 7 == 0), i % 3 == 0).await
        }));
    }
    let mut seqs: Vec<u64> = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());

    assert_eq!(chain::verify(dir.path()).unwrap().records, 200);

    let page = log.query(query(&nhs(2), None, None, 1000)).await.unwrap();
    assert_eq!(page.events.len(), 40);
    assert!(!page.truncated && page.damaged.is_empty());
    let times: Vec<i64> = page
        .events
        .iter()
        .map(|e| hie_audit::event::recorded_millis(&serde_json::from_str(e).unwrap()).unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    assert!(page.events.iter().all(|e| e.contains(nhs(2).as_str())));

    // Sequential appends for another patient: the newest in range are kept.
    for t in 0..10 {
        log.append(event(&nhs(9), 3_000 + t, false), false).await.unwrap();
    }
    let limited = log.query(query(&nhs(9), Some(3_002), Some(3_008), 5)).await.unwrap();
    assert!(limited.truncated, "7 match, 5 asked for");
    let kept: Vec<i64> = limited
        .events
        .iter()
        .map(|e| hie_audit::event::recorded_millis(&serde_json::from_str(e).unwrap()).unwrap())
        .collect();
    assert_eq!(kept, vec![3_004, 3_005, 3_006, 3_007, 3_008]);
    // A group of records goes into one segment; the next starts a new one
    // once it is past 8 KiB.
    let v = chain::verify(dir.path()).unwrap();
    assert!(v.records == 210 && v.segments > 1, "8 KiB segments roll over: {v:?}");

    // A restart continues the chain and the index.
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let log = open(dir.path());
    log.append(event(&nhs(2), 5_000, false), false).await.unwrap();
    assert_eq!(chain::verify(dir.path()).unwrap().records, 211);
    assert_eq!(log.query(query(&nhs(2), None, None, 1000)).await.unwrap().events.len(), 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_altered_byte_is_found_at_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for i in 0..30 {
        log.append(event(&nhs(1), 1_000 + i, false), false).await.unwrap();
    }
    drop(log);
    let (_, seg) = chain::segments(dir.path()).unwrap().into_iter().next().unwrap();
    let original = std::fs::read(&seg).unwrap();
    let lines: Vec<usize> = original.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1).collect();
    // Every byte position of record 4 (line 4): flip it and verify names seq 4.
    let (start, end) = (lines[2], lines[3]);
    for pos in (start..end).step_by(7) {
        let mut bytes = original.clone();
        bytes[pos] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let err = chain::verify(dir.path()).expect_err("tampering must be found");
        assert_eq!((err.expected_seq, err.line), (4, 4), "byte {pos}: {err}");
    }
    std::fs::write(&seg, &original).unwrap();
    assert_eq!(chain::verify(dir.path()).unwrap().records, 30);

    // Removing a record breaks the chain at the record after it.
    let mut cut = original[..lines[2]].to_vec();
    cut.extend_from_slice(&original[lines[3]..]);
    std::fs::write(&seg, &cut).unwrap();
    let err = chain::verify(dir.path()).unwrap_err();
    assert_eq!(err.expected_seq, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_is_cut_off_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for i in 0..3 {
        log.append(event(&nhs(1), 1_000 + i, false), false).await.unwrap();
    }
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (_, seg) = chain::segments(dir.path()).unwrap().into_iter().next().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"{\"event\":{\"half").unwrap();
    assert!(chain::verify(dir.path()).unwrap_err().reason.contains("torn"));
    let log = open(dir.path());
    log.append(event(&nhs(1), 2_000, false), false).await.unwrap();
    assert_eq!(chain::verify(dir.path()).unwrap().records, 4);

    // While the log is open its segment ends in zeros written ahead, which
    // readers skip.
    let len = std::fs::metadata(&seg).unwrap().len();
    let used = std::fs::read(&seg).unwrap().iter().rposition(|b| *b == b'\n').unwrap() as u64 + 1;
    assert!(len > used, "space is reserved ahead: {len} bytes for {used}");
    assert_eq!(chain::verify(dir.path()).unwrap().records, 4);

    // A process killed while copying a record leaves part of it, then the
    // zeros: cut off on open too.
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), used, "a clean close leaves no zeros behind");
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"{\"event\":{\"act").unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 5000]).unwrap();
    assert!(chain::verify(dir.path()).unwrap_err().reason.contains("torn"));
    let log = open(dir.path());
    log.append(event(&nhs(1), 3_000, false), false).await.unwrap();
    assert_eq!(chain::verify(dir.path()).unwrap().records, 5);
    let page = log.query(query(&nhs(1), None, None, 100)).await.unwrap();
    assert_eq!(page.events.len(), 5);
    assert!(page.damaged.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_every_event_as_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for i in 0..10 {
        log.append(event(&nhs(i), 1_000 + i64::from(i), i == 3), false).await.unwrap();
    }
    let mut out = Vec::new();
    chain::export(dir.path(), Some(1_005), &mut out).unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|e| e["resourceType"] == "AuditEvent" && e["id"].as_str().unwrap().starts_with("1-")));
}

#[test]
fn break_glass_events_say_emergency_override() {
    let read = |e: hie_audit::Event| hie_audit::render(&serde_json::from_slice(&e.json).unwrap()).unwrap();
    let e = read(event(&nhs(1), 0, true));
    assert_eq!(e["purposeOfEvent"][0]["coding"][0]["code"], "ETREAT");
    assert_eq!(e["subtype"][1]["code"], "110127");
    assert_eq!(e["purposeOfEvent"][0]["text"], "unconscious, no history");
    let e = read(event(&nhs(1), 0, false));
    assert_eq!(e["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
    assert_eq!(e["subtype"].as_array().unwrap().len(), 1);
}
