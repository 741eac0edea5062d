//! The audit log: accesses on every node in one "who looked" answer, a
//! partial answer that names the node it misses, roles, tampering found by
//! `hie audit verify`, and fail-closed behaviour on a full disk.

use std::time::Duration;

use hie_tests::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn audit_query(http: &reqwest::Client, api: &str, patient: &str) -> reqwest::RequestBuilder {
    http.get(format!("{api}/AuditEvent")).query(&[("entity.identifier", format!("{NHS_SYSTEM}|{patient}"))])
}

/// The events of an AuditEvent Bundle, and its OperationOutcome entries.
fn split(bundle: &Value) -> (Vec<Value>, Vec<Value>) {
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let (events, outcomes): (Vec<Value>, Vec<Value>) =
        entries.into_iter().partition(|e| e["search"]["mode"] == "match");
    (
        events.into_iter().map(|e| e["resource"].clone()).collect(),
        outcomes.into_iter().map(|e| e["resource"].clone()).collect(),
    )
}

fn summary(e: &Value) -> (String, String, String, String) {
    (
        e["agent"][0]["who"]["identifier"]["value"].as_str().unwrap_or("").to_owned(),
        e["subtype"][0]["code"].as_str().unwrap_or("").to_owned(),
        e["purposeOfEvent"][0]["coding"][0]["code"].as_str().unwrap_or("").to_owned(),
        e["source"]["observer"]["display"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn the_log_check_finds_test_numbers_standing_alone() {
    let n = nhs(7);
    let text = format!("ok\nsubject={n} x\n1{n}\n{n}5\nid=9434765919");
    assert_eq!(nhs_numbers_in(&text), vec![(2, n.clone()), (5, "9434765919".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accesses_on_every_node_appear_in_one_answer_and_a_missing_node_is_named() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let patient = nhs(4242);
    let other = nhs(4243);
    let gp = c.http("gp-practice-a");
    let created = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "audit-1")).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(create_pointer(&gp, &n1, &pointer_body(&other, "A81001", "audit-2")).await?.status, 201);

    let ambulance = c.http("ambulance-service");
    let ooh = c.http("out-of-hours-111");
    let lin = [("x-hie-consistency", "linearizable")];
    assert_eq!(search(&ambulance, &n2, &patient, &lin).await?.body["total"], 1);
    let glass = [("x-hie-purpose-of-use", "emergency"), ("x-hie-break-glass-reason", "collapsed at home")];
    let holders = reply(ooh.get(format!("{n3}/Patient/{patient}/$record-holders")).headers(headers(&glass))).await?;
    assert_eq!(holders.status, 200);
    let read = reply(ambulance.get(format!("{n1}/DocumentReference/{id}"))).await?;
    assert_eq!(read.status, 200);

    // Who looked, asked of node 2 by the patient's app: every node's events.
    let app = c.http("patient-app");
    let r = reply(audit_query(&app, &n2, &patient)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["resourceType"], "Bundle");
    assert_eq!(r.body["type"], "searchset");
    let (events, outcomes) = split(&r.body);
    assert!(outcomes.is_empty(), "every node answered: {outcomes:?}");
    let seen: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(r.body["total"].as_u64(), Some(events.len() as u64));
    assert!(
        seen.contains(&("A81001".into(), "create".into(), "TREAT".into(), "node-1 (north-east)".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("RX9".into(), "search-type".into(), "TREAT".into(), "node-2 (north-west)".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("NLO10".into(), "operation".into(), "ETREAT".into(), "node-3 (yorkshire)".into())),
        "{seen:?}"
    );
    assert!(seen.contains(&("RX9".into(), "read".into(), "TREAT".into(), "node-1 (north-east)".into())), "{seen:?}");
    assert_eq!(seen.len(), 4, "only this patient's events: {seen:?}");
    let glass_event = events.iter().find(|e| e["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT").unwrap();
    assert_eq!(glass_event["subtype"][1]["code"], "110127");
    assert_eq!(glass_event["purposeOfEvent"][0]["text"], "collapsed at home");
    let times: Vec<&str> = events.iter().map(|e| e["recorded"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "merged by time: {times:?}");
    for e in &events {
        assert_eq!(e["entity"][0]["what"]["identifier"]["value"], patient.as_str());
        assert_eq!(e["outcome"], "0");
    }

    // A date range that excludes everything; a range in the past.
    let none = reply(audit_query(&app, &n1, &patient).query(&[("date", "le2000-01-01")])).await?;
    assert_eq!((none.status, none.body["total"].as_u64()), (200, Some(0)), "{}", none.body);
    let since = reply(audit_query(&app, &n1, &patient).query(&[("date", "ge2000-01-01")])).await?;
    assert!(since.body["total"].as_u64().unwrap() >= 4);

    // Roles that may not read the audit, and bad queries.
    for who in ["gp-practice-a", "ambulance-service", "operator"] {
        let r = reply(audit_query(&c.http(who), &n1, &patient)).await?;
        assert_eq!((r.status, r.code()), (403, "AUTHOR_CREDENTIALS_ERROR"), "{who} read the audit");
    }
    let authority = c.http("consent-authority");
    assert_eq!(reply(audit_query(&authority, &n3, &patient)).await?.status, 200);
    let r = reply(app.get(format!("{n1}/AuditEvent"))).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_PARAMETER"));
    let r = reply(audit_query(&app, &n1, "9434765918")).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_NHS_NUMBER"));
    let r = reply(audit_query(&app, &n1, &patient).query(&[("date", "yesterday")])).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_PARAMETER"));
    // A multi-byte character where the prefix should be is refused, not a panic.
    let r = reply(audit_query(&app, &n1, &patient).query(&[("date", "gé2026-01-01")])).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_PARAMETER"));
    let r = reply(audit_query(&app, &n1, &patient).query(&[("agent", "RX9")])).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_PARAMETER"));

    // With node 3 down the answer is partial and says which node is missing.
    c.kill9(3);
    let r = reply(audit_query(&app, &n1, &patient)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let (events, outcomes) = split(&r.body);
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0]["issue"][0]["code"], "incomplete");
    let said = outcomes[0]["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(said.contains("node 3 (yorkshire)"), "{said}");
    assert!(events.iter().all(|e| summary(e).3 != "node-3 (yorkshire)"));
    assert!(events.iter().any(|e| summary(e).3 == "node-1 (north-east)"));

    // The node comes back: the answer is whole again, and includes the
    // queries themselves (reading the audit is an access too).
    c.restart(3)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = reply(audit_query(&app, &n1, &patient)).await?;
        let (events, outcomes) = split(&r.body);
        if outcomes.is_empty() {
            assert!(events.iter().any(|e| summary(e).3 == "node-3 (yorkshire)"));
            assert!(events.iter().any(|e| summary(e).0 == "X27" && e["action"] == "E"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 3 never answered again: {outcomes:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m = c.metrics(1).await.unwrap_or_default();
    assert!(m.contains("hie_audit_events_total"), "metric exported");
    assert!(metric(&m, "hie_audit_events_total") >= 3.0, "{m}");
    assert!(metric(&m, "hie_break_glass_total") == 0.0, "the override was on node 3");
    Ok(())
}

fn headers(pairs: &[(&str, &str)]) -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    for (k, v) in pairs {
        h.insert(reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    h
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_altered_byte_makes_verify_fail_at_that_record() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    // Node 3: the dev cluster sets its registry up through node 1, whose
    // log holds those operator actions too.
    let n1 = c.api_url(3);
    let consumer = c.http("ambulance-service");
    for i in 0..12 {
        assert_eq!(search(&consumer, &n1, &nhs(500 + i), &[]).await?.status, 200);
    }
    let config = c.dir.path().join("node-3.toml").display().to_string();
    let ok = hie(&["audit", "verify", "--config", &config])?;
    assert!(ok.contains("audit chain intact: 12 records"), "{ok}");
    let export = c.dir.path().join("export.ndjson");
    hie(&["audit", "export", "--config", &config, "--out", &export.display().to_string()])?;
    let lines: Vec<Value> =
        std::fs::read_to_string(&export)?.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|e| e["resourceType"] == "AuditEvent"));

    // Alter one byte inside record 7 (a digit of its recorded time).
    let segment = c.data_dir(3).join("audit/00000001.ndjson");
    let original = std::fs::read(&segment)?;
    let starts: Vec<usize> = std::iter::once(0)
        .chain(original.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
        .collect();
    let line7 = &original[starts[6]..starts[7]];
    let at = starts[6] + find(line7, b"\"at\":1").unwrap() + 7;
    let mut altered = original.clone();
    altered[at] = if altered[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&segment, &altered)?;
    let err = hie(&["audit", "verify", "--config", &config]).expect_err("a broken chain must fail verify");
    let msg = format!("{err:#}");
    assert!(msg.contains("first bad record: seq 7") && msg.contains("line 7"), "{msg}");
    assert!(hie(&["audit", "export", "--config", &config, "--out", "/dev/null"]).is_err());
    std::fs::write(&segment, &original)?;
    assert!(hie(&["audit", "verify", "--config", &config])?.contains("intact"));
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, bytes: u64) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(at)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", &at.display().to_string()])
            .output()?;
        anyhow::ensure!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(SmallDisk(at.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_fails_requests_closed_and_the_node_recovers() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2) = (c.api_url(1), c.api_url(2));
    let consumer = c.http("ambulance-service");
    let gp = c.http("gp-practice-a");
    let patient = nhs(777);
    assert_eq!(create_pointer(&gp, &n2, &pointer_body(&patient, "A81001", "disk-0")).await?.status, 201);

    // Node 1's audit directory moves onto a 32 MiB filesystem.
    c.signal(1, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.pid(1).is_some() {
        assert!(std::time::Instant::now() < deadline, "node 1 did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = c.data_dir(1).join("audit");
    let saved = c.dir.path().join("audit-saved");
    std::fs::rename(&audit, &saved)?;
    let _disk = SmallDisk::mount(&audit, 32 << 20)?;
    copy_dir(&saved, &audit)?;
    c.restart(1)?;
    wait_ready(&c, 1).await?;
    assert_eq!(search(&consumer, &n1, &patient, &[]).await?.status, 200);

    // Fill the disk: reads and writes on node 1 fail with 503, nothing is changed.
    let filler = audit.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"])
        .output()?;
    // The space the log reserved ahead (64 KiB) still takes a few hundred
    // records (each ~410 bytes).
    let mut r = search(&consumer, &n1, &patient, &[]).await?;
    for _ in 0..400 {
        if r.status != 200 {
            break;
        }
        r = search(&consumer, &n1, &patient, &[]).await?;
    }
    assert_eq!((r.status, r.code()), (503, "AUDIT_UNAVAILABLE"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert!(r.body.get("entry").is_none(), "no pointers in a failed answer");
    let w = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "disk-1")).await?;
    assert_eq!((w.status, w.code()), (503, "AUDIT_UNAVAILABLE"), "{}", w.body);
    // So is a batch Bundle (`POST /fhir`, the bulk load), before any entry is proposed.
    let batch = serde_json::json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{
            "resource": pointer_body(&patient, "A81001", "disk-batch"),
            "request": { "method": "POST", "url": "DocumentReference" },
        }],
    });
    let b = reply(gp.post(n1.clone()).header("content-type", "application/fhir+json").json(&batch)).await?;
    assert_eq!((b.status, b.code()), (503, "AUDIT_UNAVAILABLE"), "{}", b.body);
    // The refused create and batch were refused before they were proposed.
    let elsewhere = search(&gp, &n2, &patient, &[("x-hie-consistency", "linearizable")]).await?;
    assert_eq!(elsewhere.body["total"], 1, "{}", elsewhere.body);
    // Node 1 stays up and healthy apart from its audit.
    assert!(c.pid(1).is_some());
    let m = c.metrics(1).await.unwrap_or_default();
    assert!(metric(&m, "hie_audit_write_failures_total") >= 1.0, "{m}");

    // Space returns: node 1 serves again and its chain is intact.
    std::fs::remove_file(&filler)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = search(&consumer, &n1, &patient, &[]).await?;
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 1 never recovered: {}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "disk-2")).await?.status, 201);
    let config = c.dir.path().join("node-1.toml").display().to_string();
    let v = hie(&["audit", "verify", "--config", &config])?;
    assert!(v.contains("intact"), "{v}");
    c.signal(1, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.pid(1).is_some() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A node that dies after its change is committed and before it records
/// how the change ended (or answers) has already recorded, fsynced, the
/// change's intent: the patient's trail shows it, with no outcome, and the
/// change itself is in the cluster. Another change, answered, shows only
/// its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_commit_leaves_the_changes_intent_in_the_trail() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let victim = c.node_ids().into_iter().find(|id| *id != leader).unwrap();
    let other = c.node_ids().into_iter().find(|id| *id != victim).unwrap();
    let patient = nhs(5151);
    let gp = c.http("gp-practice-a");
    let answered = create_pointer(&gp, &c.api_url(victim), &pointer_body(&patient, "A81001", "intent-1")).await?;
    assert_eq!(answered.status, 201, "{}", answered.body);

    // The victim again, with the fault point that aborts after a commit.
    c.kill9(victim);
    let log = c.data_dir(victim).join("hie.log");
    c.restart_with(victim, &["env".into(), "HIE_FAULT_ABORT_AFTER_COMMIT=1".into()], &log)?;
    wait_ready(&c, victim).await?;
    let crashed = create_pointer(&gp, &c.api_url(victim), &pointer_body(&patient, "A81001", "intent-2")).await;
    if let Ok(r) = &crashed {
        assert!(r.status >= 500, "the node answered: {} {}", r.status, r.body);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.pid(victim).is_some() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "node {victim} did not abort");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The change was committed: the cluster has both pointers.
    let lin = [("x-hie-consistency", "linearizable")];
    let found = search(&c.http("ambulance-service"), &c.api_url(other), &patient, &lin).await?;
    assert_eq!(found.body["total"], 2, "{}", found.body);

    c.restart(victim)?;
    wait_ready(&c, victim).await?;
    let r = reply(audit_query(&c.http("patient-app"), &c.api_url(other), &patient)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let (events, outcomes) = split(&r.body);
    assert!(outcomes.is_empty(), "every node answered: {outcomes:?}");
    let creates: Vec<&Value> = events.iter().filter(|e| e["subtype"][0]["code"] == "create").collect();
    assert_eq!(creates.len(), 2, "one record per create: {creates:?}");
    assert_eq!(creates[0]["outcome"], "0", "the answered create shows its outcome, its intent hidden");
    assert!(creates[1].get("outcome").is_none(), "the crashed create shows its intent: {}", creates[1]);
    let desc = creates[1]["outcomeDesc"].as_str().unwrap_or("");
    assert!(desc.starts_with("intent"), "{desc}");
    let observer = creates[1]["source"]["observer"]["display"].as_str().unwrap_or("");
    assert!(observer.starts_with(&format!("node-{victim} ")), "recorded by the node that crashed: {observer}");
    // And the chain holds both records of the first create and the second's intent.
    let config = c.dir.path().join(format!("node-{victim}.toml")).display().to_string();
    let verified = hie(&["audit", "verify", "--config", &config])?;
    assert!(verified.contains("audit chain intact"), "{verified}");
    Ok(())
}

/// Operators are audited like accesses to patient data: every `/admin/*`
/// request, a refused attempt too, is in the node's audit log (its export;
/// it names no patient, so no patient's trail shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_are_in_the_audit_log() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let admin = |path: &str| format!("{}{path}", c.api_url(1).trim_end_matches("/fhir"));
    let op = c.http("operator");
    let backup = op.get(admin("/admin/backup")).send().await?;
    assert_eq!(backup.status(), 200);
    let body = serde_json::json!({ "pointer_types": ["736253002"] });
    let put = reply(op.put(admin("/admin/consumers/RYX01")).json(&body)).await?;
    assert_eq!(put.status, 200, "{}", put.body);
    let tried = reply(c.http("gp-practice-a").get(admin("/admin/backup"))).await?;
    assert_eq!(tried.status, 403);

    let config = c.dir.path().join("node-1.toml").display().to_string();
    let export = c.dir.path().join("export.ndjson");
    hie(&["audit", "export", "--config", &config, "--out", &export.display().to_string()])?;
    let events: Vec<Value> =
        std::fs::read_to_string(&export)?.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |what: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["entity"].as_array().into_iter().flatten().any(|x| x["what"]["reference"] == what))
            .collect()
    };
    let backups = of("GET /admin/backup");
    assert_eq!(backups.len(), 2, "the backup and the refused attempt: {events:?}");
    let who: Vec<(&str, &str)> = backups
        .iter()
        .map(|e| (e["agent"][0]["who"]["identifier"]["value"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert!(who.contains(&("X26OPS", "0")), "{who:?}");
    assert!(who.contains(&("A81001", "4")), "the refused attempt: {who:?}");
    assert!(backups.iter().all(|e| e["purposeOfEvent"][0]["coding"][0]["code"] == "HOPERAT"));
    // A registry change is a change: its intent, fsynced before it was
    // proposed, then how it ended.
    let registry = of("PUT /admin/consumers/RYX01");
    assert_eq!(registry.len(), 2, "{events:?}");
    assert!(registry[0].get("outcome").is_none(), "the intent first: {}", registry[0]);
    assert_eq!((registry[1]["action"].as_str(), registry[1]["outcome"].as_str()), (Some("U"), Some("0")));
    Ok(())
}

async fn wait_ready(c: &Cluster, id: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", c.admin_url(id))).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "node {id} not ready:\n{}", c.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The anchor the cluster holds for node `id`: `(seq, hash)`.
async fn anchor_of(c: &Cluster, from: u64, id: u64) -> anyhow::Result<Option<(u64, String)>> {
    let url = format!("{}/admin/audit-anchors", c.api_url(from).trim_end_matches("/fhir"));
    let r = reply(c.http("operator").get(url)).await?;
    anyhow::ensure!(r.status == 200, "{}", r.body);
    Ok(r.body["anchors"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["node"] == id)
        .map(|a| (a["seq"].as_u64().unwrap_or(0), a["hash"].as_str().unwrap_or("").to_owned())))
}

/// The segment files of an audit directory and their lines, oldest first.
fn audit_lines(dir: &std::path::Path) -> anyhow::Result<Vec<(std::path::PathBuf, Vec<Vec<u8>>)>> {
    let mut out = vec![];
    for (_, path) in hie_audit::chain::segments(dir)? {
        let bytes = std::fs::read(&path)?;
        let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let lines = bytes[..end].split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        out.push((path, lines));
    }
    Ok(out)
}

/// A node's audit chain is anchored in the replicated state: cut short or
/// rewritten consistently on a stopped node, `hie audit verify` alone
/// passes (the chain is whole in itself) but `--cluster` fails naming the
/// anchor; untouched, both pass. The restarted node sees the mismatch too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_cut_short_or_rewritten_fails_against_the_clusters_anchor() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let victim = 2;
    let gp = c.http("gp-practice-a");
    let patient = nhs(5150);
    for i in 0..6 {
        let r =
            create_pointer(&gp, &c.api_url(victim), &pointer_body(&patient, "A81001", &format!("anchor-{i}"))).await?;
        assert_eq!(r.status, 201, "{}", r.body);
        search(&c.http("ambulance-service"), &c.api_url(victim), &patient, &[]).await?;
    }
    // The victim anchors its head within an interval (1 s in the dev cluster).
    let config = c.dir.path().join(format!("node-{victim}.toml")).display().to_string();
    let dir = c.data_dir(victim).join("audit");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (seq, hash) = loop {
        let head = hie_audit::chain::verify(&dir).map_err(|b| anyhow::anyhow!("{b}"))?;
        if let Some((seq, hash)) = anchor_of(&c, 1, victim).await?
            && seq == head.records
        {
            assert_eq!(hash, head.head, "the anchor is the chain's head");
            break (seq, hash);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "node {victim} did not anchor its head");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(seq >= 12, "two records a round: {seq}");
    let metrics = c.metrics(victim).await.unwrap_or_default();
    assert!(metric(&metrics, "hie_audit_anchored_seq") >= 12.0, "{metrics}");

    c.signal(victim, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.pid(victim).is_some() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "node {victim} did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (seq, hash) = anchor_of(&c, 1, victim).await?.map_or((seq, hash), |a| a);
    let cluster = c.cluster_json();
    let verify = |with_cluster: bool| {
        let mut args = vec!["audit", "verify", "--config", config.as_str()];
        if with_cluster {
            args.extend(["--cluster", cluster.as_str()]);
        }
        hie(&args)
    };
    let ok = verify(true)?;
    assert!(ok.contains(&format!("holds the cluster's anchor for node {victim}: record {seq}")), "{ok}");

    let original = audit_lines(&dir)?;
    // Cut short: every record from the anchored one on removed.
    for (path, lines) in &original {
        let kept: Vec<u8> = lines
            .iter()
            .filter(|l| hie_audit::chain::parse_record(&l[..l.len() - 1]).is_ok_and(|r| r.seq < seq))
            .flatten()
            .copied()
            .collect();
        std::fs::write(path, kept)?;
    }
    assert!(verify(false)?.contains("audit chain intact"), "what is left is whole in itself");
    let err = verify(true).unwrap_err().to_string();
    assert!(
        err.contains(&format!("cut short: the cluster's anchor for node {victim} is record {seq} hash {hash}")),
        "{err}"
    );

    // Rewritten consistently: the first record's event altered and every
    // record re-chained, so the chain is whole in itself.
    let mut prev = hie_audit::chain::GENESIS.to_owned();
    for (path, lines) in &original {
        let mut out = Vec::new();
        for line in lines {
            let r = hie_audit::chain::parse_record(&line[..line.len() - 1]).map_err(anyhow::Error::msg)?;
            let mut event = r.event.clone();
            if r.seq == 1 {
                event["at"] = serde_json::json!(event["at"].as_i64().unwrap_or(0) + 1);
            }
            let (line, h) = hie_audit::chain::record_line(r.seq, &prev, &serde_json::to_vec(&event)?);
            out.extend_from_slice(&line);
            prev = h;
        }
        std::fs::write(path, out)?;
    }
    assert!(verify(false)?.contains("audit chain intact"), "the rewrite is consistent in itself");
    let err = verify(true).unwrap_err().to_string();
    assert!(
        err.contains(&format!("rewritten: the cluster's anchor for node {victim} is record {seq} hash {hash}")),
        "{err}"
    );

    // The node restarted on the rewritten chain says so and stops anchoring.
    std::fs::remove_dir_all(dir.join("index"))?;
    c.restart(victim)?;
    wait_ready(&c, victim).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = c.metrics(victim).await.unwrap_or_default();
        if metric(&metrics, "hie_audit_anchor_mismatch") == 1.0 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no anchor mismatch reported:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(anchor_of(&c, 1, victim).await?.map(|a| a.0), Some(seq), "the anchor stays as evidence");
    Ok(())
}
