//! The bulk-load path: a FHIR batch Bundle of creates (`POST /fhir`) on a
//! real 3-node cluster. Each entry succeeds or fails alone, all of them go
//! through Raft together, each is audited, and a follower that missed many
//! large batches catches up although they do not fit in one message.

use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

fn entry(resource: Value) -> Value {
    json!({ "resource": resource, "request": { "method": "POST", "url": "DocumentReference" } })
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({ "resourceType": "Bundle", "type": kind, "entry": entries })
}

async fn post_bundle(http: &reqwest::Client, api: &str, body: &Value) -> anyhow::Result<Reply> {
    reply(http.post(api.to_owned()).header("content-type", "application/fhir+json").json(body)).await
}

fn statuses(r: &Reply) -> Vec<String> {
    r.body["entry"]
        .as_array()
        .map(|a| a.iter().map(|e| e["response"]["status"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_bundle_creates_each_entry_alone_and_audits_each() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let gp = c.http("gp-practice-a");
    let consumer = c.http("ambulance-service");
    let (p1, p2, p3) = (nhs(301), nhs(302), nhs(303));

    // An earlier pointer, so one entry repeats its masterIdentifier.
    let first = create_pointer(&gp, &n1, &pointer_body(&p1, "A81001", "bulk-0")).await?;
    assert_eq!(first.status, 201, "{}", first.body);

    let mut bad_nhs = pointer_body(&p1, "A81001", "bulk-bad");
    bad_nhs["subject"]["identifier"]["value"] = json!("9434765918");
    let body = bundle(
        "batch",
        vec![
            entry(pointer_body(&p1, "A81001", "bulk-1")),
            entry(pointer_body(&p2, "A81001", "bulk-2")),
            entry(pointer_body(&p3, "B82002", "bulk-3")), // custodian not the caller
            entry(pointer_body(&p2, "A81001", "bulk-0")), // duplicate masterIdentifier
            entry(bad_nhs),                               // invalid check digit
            entry(pointer_body(&p3, "A81001", "bulk-4")),
        ],
    );
    // To a node that may well not be the leader: forwarded like any write.
    let r = post_bundle(&gp, &n2, &body).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["resourceType"], "Bundle");
    assert_eq!(r.body["type"], "batch-response");
    assert_eq!(
        statuses(&r),
        ["201 Created", "201 Created", "403 Forbidden", "409 Conflict", "400 Bad Request", "201 Created"]
    );
    let entries = r.body["entry"].as_array().unwrap();
    assert_eq!(entries[3]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"], "DUPLICATE_REJECTED");
    assert_eq!(entries[4]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"], "INVALID_NHS_NUMBER");
    let location = entries[0]["response"]["location"].as_str().unwrap();
    assert!(location.starts_with("DocumentReference/A81001-") && location.ends_with("/_history/1"), "{location}");
    assert_eq!(entries[0]["response"]["etag"], "W/\"1\"");

    // Each created pointer is readable on another node, and only those.
    let id = location.trim_start_matches("DocumentReference/").trim_end_matches("/_history/1");
    let read =
        reply(consumer.get(format!("{n3}/DocumentReference/{id}")).header("x-hie-consistency", "linearizable")).await?;
    assert_eq!(read.status, 200, "{}", read.body);
    let lin = [("x-hie-consistency", "linearizable")];
    assert_eq!(search(&consumer, &n3, &p1, &lin).await?.body["total"], 2);
    assert_eq!(search(&consumer, &n3, &p2, &lin).await?.body["total"], 1);
    assert_eq!(search(&consumer, &n3, &p3, &lin).await?.body["total"], 1);

    // Every entry whose patient is known is audited on its own, with its own outcome.
    let app = c.http("patient-app");
    let audit = |p: String| {
        let app = app.clone();
        let n1 = n1.clone();
        async move {
            reply(app.get(format!("{n1}/AuditEvent")).query(&[("entity.identifier", format!("{NHS_SYSTEM}|{p}"))]))
                .await
        }
    };
    let outcomes = |r: &Reply| -> Vec<String> {
        r.body["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "AuditEvent" && e["resource"]["action"] == "C")
            .map(|e| e["resource"]["outcome"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let mut seen = outcomes(&audit(p2.clone()).await?);
    seen.sort();
    // p2: one created, one refused as a duplicate (outcome 4: minor failure).
    assert_eq!(seen, ["0", "4"], "{seen:?}");
    let mut seen = outcomes(&audit(p3.clone()).await?);
    seen.sort();
    assert_eq!(seen, ["0", "4"], "{seen:?}");

    // Refused as a whole: a transaction, too many entries, a wrong request,
    // a caller who is not a producer.
    let r = post_bundle(&gp, &n1, &bundle("transaction", vec![entry(pointer_body(&p1, "A81001", "t"))])).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_RESOURCE"), "{}", r.body);
    let many: Vec<Value> = (0..1001).map(|i| entry(pointer_body(&p1, "A81001", &format!("m{i}")))).collect();
    let r = post_bundle(&gp, &n1, &bundle("batch", many)).await?;
    assert_eq!((r.status, r.code()), (413, "PAYLOAD_TOO_LARGE"), "{}", r.body);
    let mut put = entry(pointer_body(&p1, "A81001", "p"));
    put["request"]["method"] = json!("PUT");
    let r = post_bundle(&gp, &n1, &bundle("batch", vec![put])).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_RESOURCE"), "{}", r.body);
    let r = post_bundle(&consumer, &n1, &bundle("batch", vec![entry(pointer_body(&p1, "A81001", "c"))])).await?;
    assert_eq!((r.status, r.code()), (403, "AUTHOR_CREDENTIALS_ERROR"), "{}", r.body);
    let r = post_bundle(&gp, &n1, &json!({"resourceType": "Bundle", "type": "batch", "entry": "x"})).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_RESOURCE"), "{}", r.body);
    // Nothing of those was created.
    assert_eq!(search(&consumer, &n1, &p1, &lin).await?.body["total"], 2);
    c.wait_converged(&[1, 2, 3], Duration::from_secs(10)).await?;
    Ok(())
}

/// Batches that together exceed one node-to-node message: a follower that
/// missed them gets them in several append-entries, not one refused message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_on_batches_larger_than_one_message() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let follower = c.node_ids().into_iter().find(|&id| id != leader).unwrap();
    let gp = c.http("gp-practice-a");
    let api = c.api_url(leader);
    c.signal(follower, nix::sys::signal::Signal::SIGSTOP);
    // 40 batches of 1,000 pointers: about 20 MB of log entries, more than
    // p2p.message_bytes_max (16 MiB) in one append-entries.
    let mut patient = 0u32;
    for b in 0..40 {
        let entries: Vec<Value> = (0..1000)
            .map(|i| {
                patient += 1;
                entry(pointer_body(&nhs(10_000 + patient % 5_000), "A81001", &format!("big-{b}-{i}")))
            })
            .collect();
        let r = post_bundle(&gp, &api, &bundle("batch", entries)).await?;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(statuses(&r).iter().all(|s| s == "201 Created"));
    }
    c.signal(follower, nix::sys::signal::Signal::SIGCONT);
    // Without splitting, the one append-entries holding all 40 is refused
    // on every retry and the follower never catches up.
    if let Err(e) = c.wait_converged(&[1, 2, 3], Duration::from_secs(60)).await {
        eprintln!("{}", c.logs_tail(100));
        return Err(e);
    }
    let on_follower = search(&c.http("ambulance-service"), &c.api_url(follower), &nhs(10_001), &[]).await?;
    assert_eq!(on_follower.body["total"], 8, "{}", on_follower.body);
    Ok(())
}
