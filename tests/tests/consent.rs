//! Opt-out, opt back in, break-glass with and without a reason, and the
//! roles that may not set consent.

use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

const LIN: (&str, &str) = ("x-hie-consistency", "linearizable");

fn consent(nhs: &str, provision: &str) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "identifier": { "system": NHS_SYSTEM, "value": nhs } },
        "provision": { "type": provision }
    })
}

async fn post_consent(http: &reqwest::Client, api: &str, body: &Value) -> anyhow::Result<Reply> {
    reply(http.post(format!("{api}/Consent")).header("content-type", "application/fhir+json").json(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_out_opt_in_and_break_glass() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let gp = c.http("gp-practice-a");
    let consumer = c.http("ambulance-service");
    let authority = c.http("consent-authority");
    let patient = nhs(8080);
    let created = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "consent-1")).await?;
    assert_eq!(created.status, 201);
    let id = created.body["id"].as_str().unwrap().to_owned();

    // Roles that may not set consent.
    for who in ["gp-practice-a", "ambulance-service", "patient-app", "operator"] {
        let r = post_consent(&c.http(who), &n2, &consent(&patient, "deny")).await?;
        assert_eq!((r.status, r.code()), (403, "AUTHOR_CREDENTIALS_ERROR"), "{who} set consent");
    }
    let bad = post_consent(&authority, &n2, &consent("9434765918", "deny")).await?;
    assert_eq!((bad.status, bad.code()), (400, "INVALID_NHS_NUMBER"));
    let bad = post_consent(&authority, &n2, &consent(&patient, "maybe")).await?;
    assert_eq!((bad.status, bad.code()), (400, "INVALID_RESOURCE"));

    // Opt out (recorded on node 2, read on node 3).
    let r = post_consent(&authority, &n2, &consent(&patient, "deny")).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["resourceType"], "Consent");
    assert_eq!(r.body["provision"]["type"], "deny");
    let s = search(&consumer, &n3, &patient, &[LIN]).await?;
    assert_eq!((s.status, s.body["total"].as_u64()), (200, Some(0)), "{}", s.body);
    let count = reply(
        consumer
            .get(format!("{n3}/DocumentReference/_count"))
            .header(LIN.0, LIN.1)
            .query(&[("subject:identifier", format!("{NHS_SYSTEM}|{patient}"))]),
    )
    .await?;
    assert_eq!(count.body["total"], 0);
    let one = reply(consumer.get(format!("{n3}/DocumentReference/{id}"))).await?;
    assert_eq!((one.status, one.code()), (404, "NO_RECORD_FOUND"));
    let holders = reply(consumer.get(format!("{n3}/Patient/{patient}/$record-holders"))).await?;
    assert_eq!(holders.body["parameter"].as_array().map(Vec::len), Some(0), "{}", holders.body);
    // Producers still see their own pointers.
    assert_eq!(search(&gp, &n3, &patient, &[]).await?.body["total"], 1);

    // Break the glass: a reason is required.
    let no_reason = search(&consumer, &n1, &patient, &[("x-hie-purpose-of-use", "emergency")]).await?;
    assert_eq!((no_reason.status, no_reason.code()), (400, "MISSING_OR_INVALID_HEADER"));
    let bad_purpose = search(&consumer, &n1, &patient, &[("x-hie-purpose-of-use", "curiosity")]).await?;
    assert_eq!(bad_purpose.status, 400);
    let glass = [("x-hie-purpose-of-use", "emergency"), ("x-hie-break-glass-reason", "unconscious patient in ED")];
    let s = search(&consumer, &n1, &patient, &glass).await?;
    assert_eq!(s.body["total"], 1, "the override shows the pointers: {}", s.body);
    let one = reply(
        consumer
            .get(format!("{n1}/DocumentReference/{id}"))
            .header(glass[0].0, glass[0].1)
            .header(glass[1].0, glass[1].1),
    )
    .await?;
    assert_eq!(one.status, 200);
    let metrics = c.metrics(1).await.unwrap();
    let count: f64 = metrics
        .lines()
        .find(|l| l.starts_with("hie_break_glass_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(count >= 2.0, "break-glass accesses counted: {count}");
    let log = std::fs::read_to_string(c.dir.path().join("node-1/hie.log"))?;
    assert!(log.contains("break-glass access"));
    assert!(!log.contains(&patient), "no NHS Number in the log");

    // Opt back in.
    let r = post_consent(&authority, &n3, &consent(&patient, "permit")).await?;
    assert_eq!(r.status, 201);
    let s = search(&consumer, &n2, &patient, &[LIN]).await?;
    assert_eq!(s.body["total"], 1);
    Ok(())
}
