//! The FHIR API contract on a real 3-node cluster over HTTPS with mutual TLS:
//! every endpoint, success and error codes, reads checked on a different
//! node from the write.

use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

const LIN: (&str, &str) = ("x-hie-consistency", "linearizable");

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Reply> {
    reply(http.get(url).header(LIN.0, LIN.1)).await
}

async fn put(http: &reqwest::Client, url: &str, body: &Value, if_match: Option<&str>) -> anyhow::Result<Reply> {
    let mut r = http.put(url).header("content-type", "application/fhir+json").json(body);
    if let Some(m) = if_match {
        r = r.header("if-match", m);
    }
    reply(r).await
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == "next")?["url"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_behaves_as_the_contract_says() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let gp = c.http("gp-practice-a");
    let mh = c.http("mental-health-trust");
    let consumer = c.http("ambulance-service");
    let patient = nhs(77);

    // metadata
    let m = get(&consumer, &format!("{n1}/metadata")).await?;
    assert_eq!(m.status, 200);
    assert_eq!(m.body["resourceType"], "CapabilityStatement");
    assert_eq!(m.body["fhirVersion"], "4.0.1");

    // create on node 2, read on node 3
    let created = create_pointer(&gp, &n2, &pointer_body(&patient, "A81001", "contract-1")).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(created.header("location").unwrap(), format!("{n2}/DocumentReference/{id}/_history/1"));
    let read = get(&consumer, &format!("{n3}/DocumentReference/{id}")).await?;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("etag"), Some("W/\"1\""));
    assert_eq!(read.body["meta"]["versionId"], "1");
    assert_eq!(read.body["subject"]["identifier"]["value"], patient.as_str());
    assert!(read.header("x-hie-applied-index").is_some() && read.header("x-hie-replication-lag-ms").is_some());

    // Prefer
    let minimal = reply(
        gp.post(format!("{n1}/DocumentReference"))
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=minimal")
            .json(&pointer_body(&patient, "A81001", "contract-2")),
    )
    .await?;
    assert_eq!(minimal.status, 201);
    assert_eq!(minimal.body, Value::Null);
    let outcome = reply(
        gp.post(format!("{n1}/DocumentReference"))
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=OperationOutcome")
            .json(&pointer_body(&patient, "A81001", "contract-3")),
    )
    .await?;
    assert_eq!(outcome.status, 201);
    assert_eq!(outcome.body["resourceType"], "OperationOutcome");

    // masterIdentifier idempotency
    let dup = create_pointer(&gp, &n3, &pointer_body(&patient, "A81001", "contract-1")).await?;
    assert_eq!((dup.status, dup.code()), (409, "DUPLICATE_REJECTED"));

    // update: stale, weak and strong forms of If-Match, and none (NRL's
    // unconditional update)
    let mut changed = read.body.clone();
    changed["content"][0]["attachment"]["url"] = json!("https://a81001.example.nhs.uk/r/contract-1-v2");
    let url = format!("{n1}/DocumentReference/{id}");
    let stale = put(&gp, &url, &changed, Some("W/\"9\"")).await?;
    assert_eq!((stale.status, stale.code()), (412, "VERSION_CONFLICT"));
    let v2 = put(&gp, &url, &changed, Some("W/\"1\"")).await?;
    assert_eq!(v2.status, 200, "{}", v2.body);
    assert_eq!(v2.header("etag"), Some("W/\"2\""));
    let v3 = put(&gp, &url, &changed, Some("\"2\"")).await?;
    assert_eq!(v3.status, 200);
    assert_eq!(v3.body["meta"]["versionId"], "3");
    let v4 = put(&gp, &url, &changed, None).await?;
    assert_eq!((v4.status, v4.header("etag")), (200, Some("W/\"4\"")), "{}", v4.body);
    let mut immutable = changed.clone();
    immutable["type"]["coding"][0]["code"] = json!("736373009");
    let r = put(&gp, &url, &immutable, Some("W/\"4\"")).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_RESOURCE"));
    let r = put(&mh, &url, &changed, Some("W/\"4\"")).await?;
    assert_eq!((r.status, r.code()), (403, "AUTHOR_CREDENTIALS_ERROR"), "another organisation cannot change it");
    let again = get(&consumer, &format!("{n2}/DocumentReference/{id}")).await?;
    assert_eq!(again.body["content"][0]["attachment"]["url"], "https://a81001.example.nhs.uk/r/contract-1-v2");

    // PUT creates with the producer's own id
    let mut own = pointer_body(&patient, "A81001", "contract-own");
    own["id"] = json!("A81001-local-42");
    let r = put(&gp, &format!("{n1}/DocumentReference/A81001-local-42"), &own, None).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut theirs = pointer_body(&patient, "RV3", "contract-theirs");
    theirs["id"] = json!("A81001-local-43");
    let r = put(&mh, &format!("{n1}/DocumentReference/A81001-local-43"), &theirs, None).await?;
    assert_eq!(r.status, 403);

    // relatesTo replaces: atomic supersede, history readable
    let mut newer = pointer_body(&patient, "A81001", "contract-1-replacement");
    newer["relatesTo"] = json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{id}") } }]);
    let r = create_pointer(&gp, &n3, &newer).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let old = get(&consumer, &format!("{n2}/DocumentReference/{id}")).await?;
    assert_eq!(old.body["status"], "superseded");
    let s = search(&consumer, &n2, &patient, &[LIN]).await?;
    let ids: Vec<&str> =
        s.body["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap()).collect();
    assert!(!ids.contains(&id.as_str()), "superseded pointers drop out of searches");
    assert_eq!(s.body["total"], 4);

    // another organisation's pointer; holders
    create_pointer(&mh, &n1, &pointer_body(&patient, "RV3", "contract-mh")).await?;
    let h = get(&consumer, &format!("{n3}/Patient/{patient}/$record-holders")).await?;
    let holders: Vec<(String, i64)> = h.body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["part"][0]["valueIdentifier"]["value"].as_str().unwrap().to_owned(),
                p["part"][1]["valueInteger"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(holders, vec![("A81001".into(), 4), ("RV3".into(), 1)]);

    // search: paging with opaque tokens, filters, POST _search, _count
    let s = reply(
        consumer
            .get(format!("{n2}/DocumentReference"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", format!("{NHS_SYSTEM}|{patient}")), ("_count", "2".into())]),
    )
    .await?;
    assert_eq!(s.body["total"], 5);
    assert_eq!(s.body["entry"].as_array().unwrap().len(), 2);
    let mut seen: Vec<String> =
        s.body["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap().to_owned()).collect();
    let mut next = next_link(&s.body);
    while let Some(url) = next {
        assert!(!url.contains(&patient), "no NHS Number in a next link");
        let page = get(&consumer, &url).await?;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.body["total"], 5, "total on every page");
        seen.extend(
            page.body["entry"].as_array().unwrap().iter().map(|e| e["resource"]["id"].as_str().unwrap().to_owned()),
        );
        next = next_link(&page.body);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "paging visits every pointer once");
    let by_type = reply(consumer.get(format!("{n1}/DocumentReference")).header(LIN.0, LIN.1).query(&[
        ("subject:identifier", format!("{NHS_SYSTEM}|{patient}")),
        ("custodian:identifier", format!("{ODS_SYSTEM}|RV3")),
        ("type", "http://snomed.info/sct|736253002".into()),
    ]))
    .await?;
    assert_eq!(by_type.body["total"], 1);
    let posted = reply(
        consumer
            .post(format!("{n3}/DocumentReference/_search"))
            .header(LIN.0, LIN.1)
            .form(&[("subject:identifier", format!("{NHS_SYSTEM}|{patient}"))]),
    )
    .await?;
    assert_eq!(posted.body["total"], 5);
    let count = reply(
        consumer
            .get(format!("{n1}/DocumentReference/_count"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", format!("{NHS_SYSTEM}|{patient}"))]),
    )
    .await?;
    assert_eq!(count.body["total"], 5);
    assert!(count.body.get("entry").is_none());
    // A producer sees only its own pointers.
    let own = search(&mh, &n1, &patient, &[LIN]).await?;
    assert_eq!(own.body["total"], 1);

    // The registry is data: an operator registers a type and allows it to a
    // producer, without a restart; before that the producer is refused.
    const TEST_TYPE: &str = "1234567000";
    let op = c.http("operator");
    let admin = |path: &str| format!("{}{path}", n2.trim_end_matches("/fhir"));
    let r = reply(op.put(admin("/admin/pointer-types")).json(&json!({
        "code": TEST_TYPE, "display": "A pointer type for this test",
        "category": "734163000", "category_display": "Care plan"
    })))
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut eol = pointer_body(&patient, "A81001", "contract-eol");
    eol["type"]["coding"][0]["code"] = json!(TEST_TYPE);
    let r = create_pointer(&gp, &n3, &eol).await?;
    assert_eq!(
        (r.status, r.code()),
        (403, "AUTHOR_CREDENTIALS_ERROR"),
        "a registered type the producer is not allowed"
    );
    let r = reply(op.put(admin("/admin/producers/A81001")).json(&json!({
        "pointer_types": ["http://snomed.info/sct|736253002", "http://snomed.info/sct|736373009", format!("http://snomed.info/sct|{TEST_TYPE}")]
    })))
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = create_pointer(&gp, &n3, &eol).await?;
    assert_eq!(r.status, 201, "allowed now: {}", r.body);
    let r = reply(gp.put(admin("/admin/producers/A81001")).json(&json!({ "pointer_types": [] }))).await?;
    assert_eq!(r.status, 403, "only an operator changes the registry");

    // The command-line client finds the same pointers.
    let out = hie(&["search", &patient, "--cluster", &c.cluster_json(), "--node", "3", "--linearizable"])?;
    assert!(out.starts_with("6 pointer(s)"), "{out}");
    let out = hie(&["holders", &patient, "--cluster", &c.cluster_json()])?;
    assert!(out.contains("A81001  5 pointer(s)") && out.contains("RV3  1 pointer(s)"), "{out}");

    // delete: custodian only
    let r = reply(mh.delete(format!("{n1}/DocumentReference/A81001-local-42"))).await?;
    assert_eq!(r.status, 403);
    let r = reply(gp.delete(format!("{n2}/DocumentReference/A81001-local-42"))).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let gone = get(&consumer, &format!("{n3}/DocumentReference/A81001-local-42")).await?;
    assert_eq!((gone.status, gone.code()), (404, "NO_RECORD_FOUND"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_is_throttled() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "1", "--rate-per-client-per-sec", "5", "--rate-burst", "5"])?;
    let consumer = c.http("ambulance-service");
    let mut statuses = vec![];
    for _ in 0..20 {
        let r = search(&consumer, &c.api_url(1), &nhs(0), &[]).await?;
        if r.status == 429 {
            assert_eq!(r.code(), "RATE_LIMITED");
            assert!(r.header("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    assert!(statuses.iter().filter(|s| **s == 200).count() >= 5);
    assert!(statuses.contains(&429), "{statuses:?}");
    // Another organisation is not affected.
    let other = search(&c.http("out-of-hours-111"), &c.api_url(1), &nhs(0), &[]).await?;
    assert_eq!(other.status, 200);
    Ok(())
}
