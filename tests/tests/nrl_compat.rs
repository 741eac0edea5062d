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

/// `GET /DocumentReference/_count` with these parameters.
async fn count(http: &reqwest::Client, node: &str, query: &[(&str, &str)]) -> anyhow::Result<Reply> {
    reply(http.get(format!("{node}/DocumentReference/_count")).header(LIN.0, LIN.1).query(query)).await
}

/// A reply's status, FHIR issue type and error code.
fn refusal(r: &Reply) -> (u16, String, String) {
    (r.status, r.body["issue"][0]["code"].as_str().unwrap_or("").to_owned(), r.code().to_owned())
}

fn refused(status: u16, issue: &str, code: &str) -> (u16, String, String) {
    (status, issue.to_owned(), code.to_owned())
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
    // NRLF's custodian filter in a JSON body (row 38).
    let ods = |code: &str| format!("{ODS_SYSTEM}|{code}");
    let ours =
        json_search(json!({ "subject:identifier": subject, "custodian:identifier": ods("A81001") }), &n2).await?;
    assert_eq!((ours.status, ours.body["total"].as_u64()), (200, Some(4)), "{}", ours.body);
    let theirs = json_search(json!({ "subject:identifier": subject, "custodian:identifier": ods("RV3") }), &n2).await?;
    assert_eq!((theirs.status, theirs.body["total"].as_u64(), entry_ids(&theirs.body).len()), (200, Some(0), 0));

    // The _count route (rows 1, 2, 5, 6, 7): a total without entries,
    // counting only the types a restricted consumer may read.
    let c4 = count(&consumer, &n3, &[("subject:identifier", &subject)]).await?;
    assert_eq!((c4.status, c4.body["total"].as_u64(), c4.body.get("entry")), (200, Some(4), None), "{}", c4.body);
    assert_eq!(c4.body["type"], "searchset");
    let c2 = count(&ooh, &n1, &[("subject:identifier", &subject)]).await?;
    assert_eq!((c2.status, c2.body["total"].as_u64(), c2.body.get("entry")), (200, Some(2), None), "{}", c2.body);
    let nobody = format!("{NHS_SYSTEM}|{}", nhs(1918));
    let c0 = count(&consumer, &n2, &[("subject:identifier", &nobody)]).await?;
    assert_eq!((c0.status, c0.body["total"].as_u64(), c0.body.get("entry")), (200, Some(0), None), "{}", c0.body);
    let no_params = count(&consumer, &n2, &[]).await?;
    assert_eq!(refusal(&no_params), refused(400, "invalid", "INVALID_PARAMETER"));
    let short = format!("{NHS_SYSTEM}|123");
    let bad_number = count(&consumer, &n2, &[("subject:identifier", &short)]).await?;
    assert_eq!(refusal(&bad_number), refused(400, "invalid", "INVALID_NHS_NUMBER"));

    // A type of another system (rows 19, 32): NRL's INVALID_CODE_SYSTEM,
    // in a query and in a JSON body alike.
    let other_system = "http://incorrect.info/sct|736253002";
    let r = reply(
        consumer
            .get(format!("{n1}/DocumentReference"))
            .query(&[("subject:identifier", subject.as_str()), ("type", other_system)]),
    )
    .await?;
    assert_eq!(refusal(&r), refused(400, "code-invalid", "INVALID_CODE_SYSTEM"), "{}", r.body);
    let r = json_search(json!({ "subject:identifier": subject, "type": other_system }), &n2).await?;
    assert_eq!(refusal(&r), refused(400, "code-invalid", "INVALID_CODE_SYSTEM"), "{}", r.body);

    // An NRLF id with an ODS code extension (row 16): not a FHIR id, so no
    // such pointer.
    let r = get(&consumer, &format!("{n1}/DocumentReference/A81001%7C001-1234567890-ReadDocRefUrlEncoded")).await?;
    assert_eq!(refusal(&r), refused(404, "not-found", "NO_RECORD_FOUND"));

    // Creates NRLF refuses (rows 45, 46, 49), and the target untouched.
    let mh = c.http("mental-health-trust");
    let mut wrong_system = pointer_body(&patient, "A81001", "nrl-wrong-system");
    wrong_system["subject"]["identifier"]["system"] = json!("https://fhir.nhs.uk/Id/not-nhs-number");
    let r = create_pointer(&gp, &n2, &wrong_system).await?;
    assert_eq!(refusal(&r), refused(400, "invalid", "INVALID_IDENTIFIER_SYSTEM"), "{}", r.body);
    for target in [eol_id.as_str(), "A81001-does-not-exist"] {
        let mut steal = pointer_body(&patient, "RV3", &format!("nrl-steal-{target}"));
        steal["type"] = eol["type"].clone();
        steal["relatesTo"] = json!([{ "code": "replaces", "target": { "type": "DocumentReference", "identifier": { "system": ODS_SYSTEM, "value": target } } }]);
        let r = create_pointer(&mh, &n3, &steal).await?;
        assert_eq!(refusal(&r), refused(400, "invalid", "BAD_REQUEST"), "{target}: {}", r.body);
    }
    let untouched = get(&consumer, &format!("{n1}/DocumentReference/{eol_id}")).await?;
    assert_eq!(
        (untouched.body["status"].as_str(), untouched.body["meta"]["versionId"].as_str()),
        (Some("current"), Some("1"))
    );
    let mut wrong_category = pointer_body(&patient, "A81001", "nrl-wrong-category");
    wrong_category["category"] = news2["category"].clone();
    let r = create_pointer(&gp, &n1, &wrong_category).await?;
    assert_eq!(refusal(&r), refused(400, "invalid", "BAD_REQUEST"), "{}", r.body);

    // Another organisation's pointer, to a producer (rows 53, 59): 403
    // AUTHOR_CREDENTIALS_ERROR from the id alone, whether or not it exists.
    for id in [eol_id.as_str(), "A81001-does-not-exist"] {
        let r = get(&mh, &format!("{n2}/DocumentReference/{id}")).await?;
        assert_eq!(refusal(&r), refused(403, "forbidden", "AUTHOR_CREDENTIALS_ERROR"), "read {id}: {}", r.body);
        let r = reply(mh.delete(format!("{n2}/DocumentReference/{id}"))).await?;
        assert_eq!(refusal(&r), refused(403, "forbidden", "AUTHOR_CREDENTIALS_ERROR"), "delete {id}: {}", r.body);
    }

    // X-Correlation-ID is echoed, and carried into the audit record the
    // patient-access client reads.
    let r = reply(
        consumer
            .get(format!("{n3}/DocumentReference"))
            .header("x-correlation-id", "nrl-correlation-1919")
            .query(&[("subject:identifier", subject.as_str())]),
    )
    .await?;
    assert_eq!((r.status, r.header("x-correlation-id")), (200, Some("nrl-correlation-1919")), "{}", r.body);
    let app = c.http("patient-app");
    let events = reply(app.get(format!("{n1}/AuditEvent")).query(&[("entity.identifier", subject.as_str())])).await?;
    assert_eq!(events.status, 200, "{}", events.body);
    let correlated = events.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["resource"]["entity"].as_array().into_iter().flatten())
        .filter(|en| {
            en["what"]["identifier"] == json!({ "system": "urn:hie:correlation-id", "value": "nrl-correlation-1919" })
        })
        .count();
    assert_eq!(correlated, 1, "one audited search carries the correlation id: {}", events.body);
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
    // A patient whose only pointer was deleted (rows 29, 41): 200, total 0,
    // no entries, a self link; by GET and by a JSON body.
    let alone = nhs(1917);
    let r = create_pointer(&gp, &n2, &pointer_body(&alone, "A81001", "nrl-alone")).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let alone_id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(reply(gp.delete(format!("{n3}/DocumentReference/{alone_id}"))).await?.status, 200);
    let alone_subject = format!("{NHS_SYSTEM}|{alone}");
    let by_get = reply(
        consumer
            .get(format!("{n1}/DocumentReference"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", alone_subject.as_str()), ("custodian:identifier", &ods("A81001"))]),
    )
    .await?;
    let by_post =
        json_search(json!({ "subject:identifier": alone_subject, "custodian:identifier": ods("A81001") }), &n2).await?;
    for r in [by_get, by_post] {
        assert_eq!((r.status, r.body["total"].as_u64(), entry_ids(&r.body).len()), (200, Some(0), 0), "{}", r.body);
        assert!(link(&r.body, "self").is_some(), "{}", r.body);
    }

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
    // NRLF's upsert with a category that is not the type's: 400 BAD_REQUEST.
    let mut body = pointer_body(&patient, "A81001", "upsert-category");
    body["id"] = json!("A81001-upsert-category");
    body["category"][0]["coding"][0] = json!({ "system": "http://snomed.info/sct", "code": "1102421000000108" });
    let r = put(&gp, &format!("{}/DocumentReference", c.api_url(2)), &body, None).await?;
    assert_eq!(refusal(&r), refused(400, "invalid", "BAD_REQUEST"), "{}", r.body);
    Ok(())
}

/// NRLF's permission scenarios against hie's registry: a consumer with no
/// registry entry reads every type; a consumer restricted to no type is
/// refused every read, search and count with 403 ACCESS_DENIED (NRLF's
/// answer; an empty Bundle would look like a patient without records); a
/// producer with no types is refused a create or upsert with 403
/// ACCESS_DENIED, and still reads and deletes what it published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_permissions_answer_as_nrlf_does() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let gp = c.http("gp-practice-a");
    let mh = c.http("mental-health-trust");
    let consumer = c.http("ambulance-service");
    let ooh = c.http("out-of-hours-111");
    let op = c.http("operator");
    let admin = |path: &str| format!("{}{path}", n1.trim_end_matches("/fhir"));
    let patient = nhs(2121);
    let subject = format!("{NHS_SYSTEM}|{patient}");
    let mut eol = pointer_body(&patient, "A81001", "perm-eol");
    eol["type"]["coding"][0] = json!({ "system": "http://snomed.info/sct", "code": "736373009" });
    let r = create_pointer(&gp, &n1, &eol).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();

    // No registry entry: every type, a bare type code too (rows 22, 23, 35, 36).
    let r = reply(
        consumer
            .get(format!("{n2}/DocumentReference"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", subject.as_str()), ("type", "736373009")]),
    )
    .await?;
    assert_eq!((r.status, r.body["total"].as_u64()), (200, Some(1)), "{}", r.body);
    let r = reply(
        consumer
            .post(format!("{n3}/DocumentReference/_search"))
            .header(LIN.0, LIN.1)
            .json(&json!({ "subject:identifier": subject, "type": "736373009" })),
    )
    .await?;
    assert_eq!((r.status, r.body["total"].as_u64()), (200, Some(1)), "{}", r.body);

    // A consumer restricted to no type (rows 3, 4, 10, 12, 21, 34).
    let r = reply(op.put(admin("/admin/consumers/NLO10")).json(&json!({ "pointer_types": [] }))).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let denied = refused(403, "forbidden", "ACCESS_DENIED");
    assert_eq!(refusal(&count(&ooh, &n2, &[("subject:identifier", &subject)]).await?), denied, "count");
    assert_eq!(refusal(&search(&ooh, &n3, &patient, &[LIN]).await?), denied, "search");
    let r = reply(
        ooh.post(format!("{n1}/DocumentReference/_search"))
            .header(LIN.0, LIN.1)
            .json(&json!({ "subject:identifier": subject })),
    )
    .await?;
    assert_eq!(refusal(&r), denied, "JSON search");
    for read in [id.as_str(), "A81001-does-not-exist"] {
        assert_eq!(refusal(&get(&ooh, &format!("{n2}/DocumentReference/{read}")).await?), denied, "read {read}");
    }
    // hie checks the NHS Number before the permissions (NRLF: after).
    let nine = format!("{NHS_SYSTEM}|999999999");
    let r = count(&ooh, &n2, &[("subject:identifier", &nine)]).await?;
    assert_eq!(refusal(&r), refused(400, "invalid", "INVALID_NHS_NUMBER"));

    // A producer allowed some types, but not this one (row 48).
    let only = json!({ "pointer_types": ["http://snomed.info/sct|736253002"] });
    let r = reply(op.put(admin("/admin/producers/RV3")).json(&only)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut news2 = pointer_body(&patient, "RV3", "perm-news2");
    news2["type"]["coding"][0] = json!({ "system": "http://snomed.info/sct", "code": "1363501000000100" });
    news2["category"][0]["coding"][0] = json!({ "system": "http://snomed.info/sct", "code": "1102421000000108" });
    let r = create_pointer(&mh, &n2, &news2).await?;
    assert_eq!(refusal(&r), refused(403, "forbidden", "AUTHOR_CREDENTIALS_ERROR"), "{}", r.body);

    // A producer with no types (rows 47, 57, 58).
    let r = reply(op.put(admin("/admin/producers/A81001")).json(&json!({ "pointer_types": [] }))).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = create_pointer(&gp, &n3, &pointer_body(&patient, "A81001", "perm-none")).await?;
    assert_eq!(refusal(&r), denied, "create: {}", r.body);
    let mut upsert = pointer_body(&patient, "A81001", "perm-upsert");
    upsert["id"] = json!("A81001-perm-upsert");
    let r = put(&gp, &format!("{n2}/DocumentReference"), &upsert, None).await?;
    assert_eq!(refusal(&r), denied, "upsert: {}", r.body);
    let own = get(&gp, &format!("{n2}/DocumentReference/{id}")).await?;
    assert_eq!(own.status, 200, "a producer reads its own pointer: {}", own.body);
    let r = reply(gp.delete(format!("{n3}/DocumentReference/{id}"))).await?;
    assert_eq!((r.status, r.code()), (200, "RESOURCE_DELETED"), "{}", r.body);
    // An unrestricted consumer finding nothing is answered 200, total 0.
    let r = search(&consumer, &n1, &patient, &[LIN]).await?;
    assert_eq!((r.status, r.body["total"].as_u64()), (200, Some(0)), "{}", r.body);
    Ok(())
}

/// The registry and pointer updates through the CLI, as an operator and a
/// producer would use them: `hie registry type|producer|consumer|list` and
/// `hie pointer update` (with and without a stale `--if-match`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_changes_the_registry_and_updates_pointers() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let cluster = c.cluster_json();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--cluster", cluster.as_str()]);
        hie(&all)
    };
    cli(&[
        "registry",
        "type",
        "999000011",
        "--display",
        "Test care plan",
        "--category",
        "734163000",
        "--category-display",
        "Care plan",
    ])?;
    cli(&["registry", "producer", "A81001", "--types", "736253002,736373009,999000011"])?;
    cli(&["registry", "consumer", "RYX03", "--types", "999000011"])?;
    let list: Value = serde_json::from_str(&cli(&["registry", "list", "--json"])?)?;
    let types = list["pointer_types"].as_array().unwrap();
    assert!(
        types
            .iter()
            .any(|t| t["code"] == "999000011" && t["display"] == "Test care plan" && t["category"] == "734163000"),
        "{list}"
    );
    assert_eq!(list["producers"]["A81001"]["pointer_types"], json!(["736253002", "736373009", "999000011"]), "{list}");
    assert_eq!(list["consumers"]["RYX03"]["pointer_types"], json!(["999000011"]), "{list}");

    // A pointer of the new type, updated from a file through the CLI.
    let gp = c.http("gp-practice-a");
    let mut body = pointer_body(&nhs(777), "A81001", "cli-update");
    body["type"]["coding"][0]["code"] = json!("999000011");
    body["type"]["coding"][0]["display"] = json!("Test care plan");
    let created = create_pointer(&gp, &c.api_url(1), &body).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let mut changed = created.body.clone();
    changed["description"] = json!("updated through the CLI");
    let file = c.dir.path().join("update.json");
    std::fs::write(&file, serde_json::to_vec(&changed)?)?;
    let file = file.display().to_string();
    let out = cli(&["pointer", "update", &id, "--file", &file, "--if-match", "1", "--node", "2"])?;
    assert!(out.contains(&format!("DocumentReference/{id}/_history/2")), "{out}");
    let stale = cli(&["pointer", "update", &id, "--file", &file, "--if-match", "1"]).unwrap_err().to_string();
    assert!(stale.contains("412") && stale.contains("VERSION_CONFLICT"), "{stale}");
    let url = format!("{}/DocumentReference/{id}", c.api_url(3));
    let read = reply(gp.get(url).header("x-hie-consistency", "linearizable")).await?;
    assert_eq!(read.body["description"], "updated through the CLI", "{}", read.body);
    assert_eq!(read.body["meta"]["versionId"], "2");
    Ok(())
}
