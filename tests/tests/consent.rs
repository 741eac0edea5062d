//! Opt-out, opt back in, break-glass with and without a reason, the roles
//! that may not set consent, and break-glass's registry permission, hourly
//! limit and review list.

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

/// The value of one metric series (`name` with its labels, as exported).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Break-glass is for organisations the registry gives the permission:
/// one without it is refused (403, nothing read, the attempt audited and
/// counted); with it the override works, counted and audited; beyond the
/// hourly limit of one node the next is 429 with Retry-After, for that
/// organisation on that node only; `hie audit break-glass --since` lists
/// every use and refusal for the privacy officer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_needs_the_permission_is_limited_and_reviewed() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let cluster = c.cluster_json();
    let gp = c.http("gp-practice-a");
    let ambulance = c.http("ambulance-service");
    let ooh = c.http("out-of-hours-111");
    let patient = nhs(8090);
    let created = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "glass-1")).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let r = post_consent(&c.http("consent-authority"), &n1, &consent(&patient, "deny")).await?;
    assert_eq!(r.status, 201, "{}", r.body);

    // The dev consumers hold the permission, as the registry lists.
    let registry: Value = serde_json::from_str(&hie(&["registry", "list", "--cluster", &cluster])?)?;
    for ods in ["RX9", "NLO10"] {
        assert_eq!(registry["consumers"][ods]["permissions"], json!(["break-glass"]), "{registry}");
    }
    assert_eq!(registry["consumers"]["RX9"]["pointer_types"], Value::Null, "every type");

    // Taken away (every type, no permission): refused on every read
    // route, nothing read, the attempt audited.
    hie(&["registry", "consumer", "RX9", "--all-types", "--cluster", &cluster])?;
    let reason = "found collapsed at a bus stop, no history";
    let glass = [LIN, ("x-hie-purpose-of-use", "emergency"), ("x-hie-break-glass-reason", reason)];
    let with_glass = |r: reqwest::RequestBuilder| glass.iter().fold(r, |r, (k, v)| r.header(*k, *v));
    let refused = search(&ambulance, &n1, &patient, &glass).await?;
    assert_eq!((refused.status, refused.code()), (403, "ACCESS_DENIED"), "{}", refused.body);
    assert_eq!(refused.body["issue"][0]["code"], "forbidden");
    let said = refused.body["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(said.contains("RX9") && said.contains("break-glass permission"), "{said}");
    let holders = reply(with_glass(ambulance.get(format!("{n1}/Patient/{patient}/$record-holders")))).await?;
    assert_eq!((holders.status, holders.code()), (403, "ACCESS_DENIED"));
    let one = reply(with_glass(ambulance.get(format!("{n1}/DocumentReference/{id}")))).await?;
    assert_eq!((one.status, one.code()), (403, "ACCESS_DENIED"));
    // A producer is no consumer: it may not break the glass either.
    let producer = search(&gp, &n1, &patient, &glass).await?;
    assert_eq!((producer.status, producer.code()), (403, "ACCESS_DENIED"));
    // Direct care is unaffected: the opt-out holds, nothing is refused.
    let care = search(&ambulance, &n1, &patient, &[LIN]).await?;
    assert_eq!((care.status, care.body["total"].as_u64()), (200, Some(0)));
    let m = c.metrics(1).await.unwrap_or_default();
    assert_eq!(metric(&m, r#"hie_break_glass_refused_total{reason="not_permitted"}"#), Some(4.0), "{m}");
    assert_eq!(metric(&m, "hie_break_glass_total"), Some(0.0));

    // Given back: the override shows the opted-out patient's pointer.
    hie(&["registry", "consumer", "RX9", "--all-types", "--permission", "break-glass", "--cluster", &cluster])?;
    let s = search(&ambulance, &n1, &patient, &glass).await?;
    assert_eq!((s.status, s.body["total"].as_u64()), (200, Some(1)), "{}", s.body);
    let one = reply(with_glass(ambulance.get(format!("{n1}/DocumentReference/{id}")))).await?;
    assert_eq!(one.status, 200);
    assert_eq!(metric(&c.metrics(1).await.unwrap_or_default(), "hie_break_glass_total"), Some(2.0));

    // The hourly limit, as node 2 is configured: that many pass, the next
    // is 429 with Retry-After; another organisation, or another node, is
    // not held back.
    let config = std::fs::read_to_string(c.node(2)["config"].as_str().unwrap())?;
    let limit: u32 = config
        .lines()
        .find_map(|l| l.strip_prefix("break_glass_per_org_per_hour = "))
        .and_then(|v| v.trim().parse().ok())
        .expect("api.break_glass_per_org_per_hour in node 2's config");
    for i in 0..limit {
        let s = search(&ambulance, &n2, &patient, &glass).await?;
        assert_eq!((s.status, s.body["total"].as_u64()), (200, Some(1)), "use {} of {limit}: {}", i + 1, s.body);
    }
    let over = search(&ambulance, &n2, &patient, &glass).await?;
    assert_eq!((over.status, over.code()), (429, "BREAK_GLASS_LIMIT_REACHED"), "{}", over.body);
    assert_eq!(over.body["issue"][0]["code"], "throttled");
    let retry: u64 = over.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((1..=3600).contains(&retry), "Retry-After {retry}");
    let other_org = reply(with_glass(ooh.get(format!("{n2}/Patient/{patient}/$record-holders")))).await?;
    assert_eq!(other_org.status, 200, "another organisation: {}", other_org.body);
    assert_eq!(other_org.body["parameter"].as_array().map(Vec::len), Some(1), "{}", other_org.body);
    let other_node = search(&ambulance, &n3, &patient, &glass).await?;
    assert_eq!(other_node.status, 200, "another node counts its own");
    let m = c.metrics(2).await.unwrap_or_default();
    assert_eq!(metric(&m, r#"hie_break_glass_refused_total{reason="limit"}"#), Some(1.0), "{m}");
    assert_eq!(metric(&m, "hie_break_glass_total"), Some(f64::from(limit) + 1.0));

    // The privacy officer's review of node 2: every use and the refusal.
    let node2 = c.node(2)["config"].as_str().unwrap().to_owned();
    let listed: Value =
        serde_json::from_str(&hie(&["audit", "break-glass", "--config", &node2, "--since", "1h", "--json"])?)?;
    let listed = listed.as_array().expect("a JSON array");
    let by = |org: &str, allowed: bool| {
        listed.iter().filter(|u| u["org"] == org && u["allowed"] == allowed).collect::<Vec<_>>()
    };
    assert_eq!(by("RX9", true).len(), limit as usize, "{listed:?}");
    assert_eq!(by("NLO10", true).len(), 1, "{listed:?}");
    let limited = by("RX9", false);
    assert_eq!(limited.len(), 1, "{listed:?}");
    assert_eq!(limited[0]["outcome"], "HTTP 429 BREAK_GLASS_LIMIT_REACHED");
    for u in listed {
        assert_eq!(u["patient"], patient.as_str(), "{u}");
        assert_eq!(u["reason"], reason);
        assert_eq!(u["node"], "node-2 (north-west)");
        assert!(u["recorded"].as_str().is_some_and(|t| t.starts_with("20")), "{u}");
    }
    // Node 1's: the refused attempts (a read by id names its pointer), then the uses.
    let node1 = c.node(1)["config"].as_str().unwrap().to_owned();
    let table = hie(&["audit", "break-glass", "--config", &node1, "--since", "1h"])?;
    assert!(table.contains("6 break-glass event(s)"), "{table}");
    assert!(table.lines().nth(1).is_some_and(|h| h.starts_with("RECORDED")), "{table}");
    let refusals: Vec<&str> = table.lines().filter(|l| l.contains("HTTP 403 ACCESS_DENIED")).collect();
    assert_eq!(refusals.len(), 4, "{table}");
    assert!(refusals.iter().any(|l| l.contains("A81001")), "the producer's attempt: {table}");
    assert!(refusals.iter().any(|l| l.contains(&format!("DocumentReference/{id}"))), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains("RX9") && l.contains(" ok ")).count(), 2, "{table}");
    assert!(table.lines().skip(2).all(|l| l.ends_with(reason)), "{table}");
    let later = hie(&["audit", "break-glass", "--config", &node1, "--since", "2999-01-01T00:00:00Z"])?;
    assert!(later.starts_with("0 break-glass event(s)"), "{later}");

    // The reason is free text: it is in the audit, never in a log line.
    for n in 1..=3 {
        let log = std::fs::read_to_string(c.dir.path().join(format!("node-{n}/hie.log")))?;
        assert!(!log.contains(reason), "node {n} logged the reason");
        assert!(!log.contains(&patient), "node {n} logged the NHS Number");
    }
    assert!(std::fs::read_to_string(c.dir.path().join("node-1/hie.log"))?.contains("break-glass refused"));
    Ok(())
}
