//! NRL compatibility on a real 3-node cluster: pointers modelled on NRLF's
//! valid samples kept as sent, versions and history, NRLF's search (JSON
//! bodies, categories, comma lists, `_summary=count`, `next-page-token`)
//! with paging tokens any node continues, consumers limited by type, NRL's
//! success codes, `/_status`, and a PUT decided where it is applied.
//! docs/NRL-COMPATIBILITY.md maps NRLF's behaviour scenarios to these tests.

use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

const LIN: (&str, &str) = ("x-hie-consistency", "linearizable");
const FHIR_JSON: &str = "application/fhir+json";

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Reply> {
    reply(http.get(url).header(LIN.0, LIN.1)).await
}

async fn put(http: &reqwest::Client, url: &str, body: &Value, prefer: Option<&str>) -> anyhow::Result<Reply> {
    let mut r = http.put(url).header("content-type", FHIR_JSON).json(body);
    if let Some(p) = prefer {
        r = r.header("prefer", p);
    }
    reply(r).await
}

/// The NRLF-modelled samples in tests/data/nrlf, by file name.
fn samples() -> anyhow::Result<Vec<(String, Value)>> {
    let dir = manifest_dir().join("data/nrlf");
    let mut out = vec![];
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, serde_json::from_slice(&std::fs::read(&path)?)?));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 6, "one file per NRLF valid sample");
    Ok(out)
}

/// A pointer as read, without what the server owns.
fn as_sent(mut v: Value) -> Value {
    let m = v.as_object_mut().unwrap();
    m.remove("id");
    m.remove("date");
    if let Some(Value::Object(meta)) = m.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            m.remove("meta");
        }
    }
    v
}

/// The sample as another producer's (custodian and author rewritten).
fn as_producer(mut v: Value, ods: &str) -> Value {
    v["custodian"]["identifier"]["value"] = json!(ods);
    v["author"][0]["identifier"]["value"] = json!(ods);
    v
}

fn entry_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"]["id"].as_str().unwrap().to_owned()).collect()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == relation)?["url"].as_str().map(str::to_owned)
}

/// Must-show 1: every element of each NRLF valid sample survives a create
/// on one node and a read on another, equal as JSON but for the server's
/// members; `date` is the server's for an ordinary producer and the
/// producer's own for one with the `migration` permission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointers_modelled_on_nrlf_samples_are_kept_as_sent() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let gp = c.http("gp-practice-a");
    let mh = c.http("mental-health-trust");
    let consumer = c.http("ambulance-service");
    for (name, sample) in samples()? {
        let mut sent = sample.clone();
        if name.contains("meta-lastupdated") {
            // NRLF's samples carry a meta.lastUpdated: the server's own wins.
            sent["meta"] = json!({ "lastUpdated": "2020-01-01T00:00:00.000Z" });
        }
        // NRLF's samples carry an id; a POST's id is the server's to choose.
        sent["id"] = json!(format!("A81001-{}", name.trim_end_matches(".json")));
        let created = create_pointer(&gp, &c.api_url(1), &sent).await?;
        assert_eq!(created.status, 201, "{name}: {}", created.body);
        let id = created.body["id"].as_str().unwrap().to_owned();
        assert_ne!(json!(id), sent["id"], "{name}: the server's id replaces the sent one");
        assert!(id.starts_with("A81001-"), "{name}: {id}");
        assert_eq!(created.header("location").map(|l| l.contains(&format!("/DocumentReference/{id}/"))), Some(true));
        let read = get(&consumer, &format!("{}/DocumentReference/{id}", c.api_url(2))).await?;
        assert_eq!(read.status, 200, "{name}: {}", read.body);
        assert_eq!(as_sent(read.body.clone()), as_sent(sample.clone()), "{name} read back as sent");
        assert_ne!(read.body["meta"]["lastUpdated"], "2020-01-01T00:00:00.000Z", "{name}: server's lastUpdated");
        assert!(read.body["date"].as_str().is_some_and(|d| d.starts_with("20")), "{name}: a date");
        if let Some(date) = sample.get("date") {
            assert_ne!(&read.body["date"], date, "{name}: server time without the migration permission");
            // The mental health trust holds the migration permission: its date is kept.
            let mut theirs = as_producer(sample.clone(), "RV3");
            theirs["masterIdentifier"]["value"] =
                json!(format!("{}-rv3", sample["masterIdentifier"]["value"].as_str().unwrap()));
            let created = create_pointer(&mh, &c.api_url(3), &theirs).await?;
            assert_eq!(created.status, 201, "{name}: {}", created.body);
            let rid = created.body["id"].as_str().unwrap();
            let read = get(&consumer, &format!("{}/DocumentReference/{rid}", c.api_url(1))).await?;
            assert_eq!(&read.body["date"], date, "{name}: a migration keeps the producer's date");
            assert_eq!(as_sent(read.body.clone()), as_sent(theirs), "{name} (RV3) read back as sent");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_history_search_and_types_work_the_nrl_way() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let gp = c.http("gp-practice-a");
    let consumer = c.http("ambulance-service");
    let ooh = c.http("out-of-hours-111");
    let patient = nhs(1919);

    // Versions: PUT without If-Match (NRL's unconditional update) makes a
    // new version each time; every Location answered is readable.
    let created = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "nrl-v")).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let url = format!("{n1}/DocumentReference/{id}");
    let mut doc = created.body.clone();
    for v in 2..=3 {
        doc["content"][0]["attachment"]["url"] = json!(format!("https://a81001.example.nhs.uk/r/nrl-v{v}"));
        let r = put(&gp, &url, &doc, Some("return=OperationOutcome")).await?;
        assert_eq!((r.status, r.code()), (200, "RESOURCE_UPDATED"), "{}", r.body);
        assert_eq!(r.header("etag"), Some(format!("W/\"{v}\"").as_str()));
        let location = r.header("location").unwrap().to_owned();
        assert!(location.ends_with(&format!("/_history/{v}")), "{location}");
        let at = get(&consumer, &location.replace(&n1, &n2)).await?;
        assert_eq!((at.status, at.body["meta"]["versionId"].as_str()), (200, Some(format!("{v}").as_str())));
    }
    let v1 = get(&consumer, &format!("{n3}/DocumentReference/{id}/_history/1")).await?;
    assert_eq!(v1.status, 200, "{}", v1.body);
    assert_eq!(v1.body["content"][0]["attachment"]["url"], "https://a81001.example.nhs.uk/r/nrl-v");
    let none = get(&consumer, &format!("{n3}/DocumentReference/{id}/_history/9")).await?;
    assert_eq!((none.status, none.code()), (404, "NO_RECORD_FOUND"));
    let h = get(&consumer, &format!("{n2}/DocumentReference/{id}/_history")).await?;
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!((h.body["type"].as_str(), h.body["total"].as_u64()), (Some("history"), Some(3)));
    let versions: Vec<&str> = h.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["3", "2", "1"], "newest first");
    let out = hie(&["pointer", "history", &id, "--cluster", &c.cluster_json(), "--node", "2"])?;
    assert!(out.starts_with("3 version(s)"), "{out}");

    // relatesTo: transforms is kept and supersedes nothing; replaces
    // supersedes and answers RESOURCE_SUPERSEDED.
    let mut t = pointer_body(&patient, "A81001", "nrl-transforms");
    t["relatesTo"] = json!([{ "code": "transforms", "target": { "reference": format!("DocumentReference/{id}"), "type": "DocumentReference" } }]);
    let r = create_pointer(&gp, &n2, &t).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["relatesTo"], t["relatesTo"]);
    assert_eq!(get(&consumer, &url).await?.body["status"], "current");
    let mut s = pointer_body(&patient, "A81001", "nrl-replaces");
    s["relatesTo"] = json!([{ "code": "replaces", "target": { "identifier": { "value": id } } }]);
    let r = reply(
        gp.post(format!("{n3}/DocumentReference"))
            .header("content-type", FHIR_JSON)
            .header("prefer", "return=OperationOutcome")
            .json(&s),
    )
    .await?;
    assert_eq!((r.status, r.code()), (201, "RESOURCE_SUPERSEDED"), "{}", r.body);
    let old = get(&consumer, &url).await?;
    assert_eq!((old.body["status"].as_str(), old.body["meta"]["versionId"].as_str()), (Some("superseded"), Some("4")));

    // A second type and a restricted consumer.
    let mut eol = pointer_body(&patient, "A81001", "nrl-eol");
    eol["type"]["coding"][0] =
        json!({ "system": "http://snomed.info/sct", "code": "736373009", "display": "End of life care plan" });
    let r = create_pointer(&gp, &n1, &eol).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let eol_id = r.body["id"].as_str().unwrap().to_owned();
    let mut news2 = pointer_body(&patient, "A81001", "nrl-news2");
    news2["type"]["coding"][0] = json!({ "system": "http://snomed.info/sct", "code": "1363501000000100" });
    news2["category"][0]["coding"][0] =
        json!({ "system": "http://snomed.info/sct", "code": "1102421000000108", "display": "Observations" });
    assert_eq!(create_pointer(&gp, &n1, &news2).await?.status, 201);
    // Current: transforms, replaces, eol, news2.
    let subject = format!("{NHS_SYSTEM}|{patient}");

    // NRLF's JSON _search body, categories, comma lists and _summary=count.
    let json_search = |body: Value, node: &str| {
        reply(consumer.post(format!("{node}/DocumentReference/_search")).header(LIN.0, LIN.1).json(&body))
    };
    let all = json_search(json!({ "subject:identifier": subject }), &n2).await?;
    assert_eq!((all.status, all.body["total"].as_u64()), (200, Some(4)), "{}", all.body);
    assert_eq!(link(&all.body, "self").as_deref(), Some(format!("{n2}/DocumentReference/_search").as_str()));
    let care_plans =
        json_search(json!({ "subject:identifier": subject, "category": "http://snomed.info/sct|734163000" }), &n3)
            .await?;
    assert_eq!(care_plans.body["total"], 3);
    let two_types = json_search(
        json!({ "subject:identifier": subject, "type": "http://snomed.info/sct|736373009,http://snomed.info/sct|1363501000000100" }),
        &n1,
    )
    .await?;
    assert_eq!(two_types.body["total"], 2);
    let counted = json_search(json!({ "subject:identifier": subject, "_summary": "count" }), &n1).await?;
    assert_eq!((counted.body["total"].as_u64(), counted.body.get("entry")), (Some(4), None));
    let bad =
        reply(consumer.post(format!("{n1}/DocumentReference/_search")).json(&json!(["not", "an", "object"]))).await?;
    assert_eq!((bad.status, bad.code()), (400, "MESSAGE_NOT_WELL_FORMED"));

    // Paging: a token made on one node is continued on another, under
    // NRLF's parameter name; it names neither the patient nor a pointer.
    let first = reply(
        consumer
            .get(format!("{n1}/DocumentReference"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", subject.clone()), ("_count", "1".into())]),
    )
    .await?;
    let mut seen = entry_ids(&first.body);
    let mut next = link(&first.body, "next");
    let mut node = 0;
    while let Some(u) = next {
        let token = u.split("next=").nth(1).unwrap().to_owned();
        assert!(!token.contains(&patient) && !token.contains("A81001"), "{token}");
        let base = [&n1, &n2, &n3][node % 3];
        node += 1;
        let page = json_search(json!({ "subject:identifier": subject, "next-page-token": token }), base).await?;
        assert_eq!((page.status, page.body["total"].as_u64()), (200, Some(4)), "{}", page.body);
        seen.extend(entry_ids(&page.body));
        next = link(&page.body, "next");
    }
    seen.sort();
    assert_eq!(
        seen,
        {
            let mut a = entry_ids(&all.body);
            a.sort();
            a
        },
        "every pointer once"
    );
    let forged = get(&consumer, &format!("{n2}/DocumentReference?next=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")).await?;
    assert_eq!((forged.status, forged.code()), (400, "INVALID_PARAMETER"));
    let malformed = get(&consumer, &format!("{n2}/DocumentReference?next-page-token=not%2Fa%2Ftoken")).await?;
    assert_eq!((malformed.status, malformed.code()), (400, "INVALID_PARAMETER"));
    let token = link(&first.body, "next").unwrap().split("next=").nth(1).unwrap().to_owned();
    let theirs = reply(ooh.get(format!("{n2}/DocumentReference?next={token}"))).await?;
    assert_eq!(theirs.status, 403, "a token is its organisation's: {}", theirs.body);

    // The out-of-hours consumer may read mental health crisis plans only.
    let r = search(&ooh, &n3, &patient, &[LIN]).await?;
    assert_eq!(r.body["total"], 2, "{}", r.body);
    let denied = get(&ooh, &format!("{n3}/DocumentReference/{eol_id}")).await?;
    assert_eq!((denied.status, denied.code()), (403, "ACCESS_DENIED"), "{}", denied.body);
    let h = get(&ooh, &format!("{n2}/Patient/{patient}/$record-holders")).await?;
    assert_eq!(h.body["parameter"][0]["part"][1]["valueInteger"], 2);

    // Delete: RESOURCE_DELETED, and the history goes with the pointer.
    let r = reply(gp.delete(format!("{n2}/DocumentReference/{eol_id}"))).await?;
    assert_eq!((r.status, r.code()), (200, "RESOURCE_DELETED"));
    let gone = get(&consumer, &format!("{n1}/DocumentReference/{eol_id}/_history")).await?;
    assert_eq!(gone.status, 404);

    // NRLF's health check, and every link of the CapabilityStatement resolves.
    let status = reply(consumer.get(format!("{}/_status", n1.trim_end_matches("/fhir")))).await?;
    assert_eq!(status.status, 200, "{}", status.body);
    let cap = get(&consumer, &format!("{n1}/metadata")).await?;
    let mut definitions = 0;
    for resource in cap.body["rest"][0]["resource"].as_array().unwrap() {
        for op in resource["operation"].as_array().into_iter().flatten() {
            let d = get(&consumer, op["definition"].as_str().unwrap()).await?;
            assert_eq!((d.status, d.body["resourceType"].as_str()), (200, Some("OperationDefinition")), "{op}");
            definitions += 1;
        }
    }
    assert!(definitions >= 1);
    let base = get(&consumer, cap.body["implementation"]["url"].as_str().unwrap()).await?;
    assert_eq!((base.status, base.body["resourceType"].as_str()), (200, Some("CapabilityStatement")), "{}", base.body);
    Ok(())
}

/// A PUT is decided where it is applied: an update sent to a node that has
/// not yet applied the pointer's create is still an update, never a 409;
/// and NRLF's upsert (the id in the body) is the same PUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_right_after_a_create_on_another_node_is_an_update() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let gp = c.http("gp-practice-a");
    let patient = nhs(2020);
    for i in 0..20 {
        let id = format!("A81001-race-{i}");
        let mut body = pointer_body(&patient, "A81001", &format!("race-{i}"));
        body["id"] = json!(id);
        let first = put(&gp, &format!("{}/DocumentReference/{id}", c.api_url(1 + i % 3)), &body, None).await?;
        assert_eq!(first.status, 201, "{}", first.body);
        body["content"][0]["attachment"]["url"] = json!(format!("https://a81001.example.nhs.uk/r/race-{i}-v2"));
        // NRLF's upsert (`PUT /DocumentReference`, the id in the body) every
        // other time.
        let node = c.api_url(1 + (i + 1) % 3);
        let url =
            if i % 2 == 0 { format!("{node}/DocumentReference/{id}") } else { format!("{node}/DocumentReference") };
        let second = put(&gp, &url, &body, None).await?;
        assert_eq!((second.status, second.header("etag")), (200, Some("W/\"2\"")), "{}", second.body);
    }
    Ok(())
}
