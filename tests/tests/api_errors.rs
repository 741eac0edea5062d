//! Bad input gets a clear OperationOutcome with the right status, the node
//! stays healthy, and nothing is stored or changed.

use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    client: &'static str,
    method: &'static str,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

fn case(
    name: &'static str,
    client: &'static str,
    method: &'static str,
    path: String,
    body: Value,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        client,
        method,
        path,
        content_type: "application/fhir+json",
        body: serde_json::to_vec(&body).unwrap(),
        headers: vec![],
        status,
        code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_operation_outcome_and_changes_nothing() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "3"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let ids = c.node_ids();
    let (_, digest_before) = c.wait_converged(&ids, Duration::from_secs(20)).await?;
    let good = pointer_body(&nhs(1), "A81001", "table-good");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let mut cases = vec![
        case(
            "invalid NHS Number in body",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["subject"]["identifier"]["value"] = json!("9434765918")),
            400,
            "INVALID_NHS_NUMBER",
        ),
        case(
            "wrong resourceType",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["resourceType"] = json!("Patient")),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "missing custodian",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| {
                v.as_object_mut().unwrap().remove("custodian");
            }),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "missing content url",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| {
                v["content"][0]["attachment"].as_object_mut().unwrap().remove("url");
            }),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "category not the registered one",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["category"][0]["coding"][0]["code"] = json!("419891008")),
            400,
            "BAD_REQUEST",
        ),
        case(
            "consumer writing",
            "ambulance-service",
            "POST",
            "/DocumentReference".into(),
            good.clone(),
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "producer publishing for another organisation",
            "mental-health-trust",
            "POST",
            "/DocumentReference".into(),
            good.clone(),
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "type not in the registry",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["type"]["coding"][0]["code"] = json!("1234567000")),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "an element FHIR R4 does not define",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["content"][0]["attachment"]["colour"] = json!("red")),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "a modifierExtension hie does not understand",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| {
                v["modifierExtension"] = json!([{ "url": "https://example.org/fhir/not-really", "valueBoolean": true }])
            }),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "an ssp:// URL without a Spine ASID",
            "gp-practice-a",
            "POST",
            "/DocumentReference".into(),
            with(&|v| v["content"][0]["attachment"]["url"] = json!("ssp://a81001.example.nhs.uk/records/1")),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "a malformed next-page-token",
            "ambulance-service",
            "GET",
            "/DocumentReference?next-page-token=not%2Fa%2Ftoken".into(),
            Value::Null,
            400,
            "INVALID_PARAMETER",
        ),
        case(
            "invalid NHS Number in a search",
            "ambulance-service",
            "GET",
            "/DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number|1234567890".into(),
            Value::Null,
            400,
            "INVALID_NHS_NUMBER",
        ),
        case(
            "unknown search parameter",
            "ambulance-service",
            "GET",
            format!("/DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number|{}&colour=blue", nhs(1)),
            Value::Null,
            400,
            "INVALID_PARAMETER",
        ),
        case(
            "search without a subject",
            "ambulance-service",
            "GET",
            "/DocumentReference?type=736253002".into(),
            Value::Null,
            400,
            "INVALID_PARAMETER",
        ),
        case(
            "invalid NHS Number for record holders",
            "ambulance-service",
            "GET",
            "/Patient/0000000000/$record-holders".into(),
            Value::Null,
            400,
            "INVALID_NHS_NUMBER",
        ),
        case(
            "no such pointer",
            "ambulance-service",
            "GET",
            "/DocumentReference/A81001-nope".into(),
            Value::Null,
            404,
            "NO_RECORD_FOUND",
        ),
        case(
            "malformed pointer id",
            "ambulance-service",
            "GET",
            "/DocumentReference/X26%60DROP%20TABLE%20%27pointers%27%3B--Something-000000000-000000000".into(),
            Value::Null,
            404,
            "NO_RECORD_FOUND",
        ),
        case(
            "delete of a pointer that does not exist",
            "gp-practice-a",
            "DELETE",
            "/DocumentReference/A81001-nope".into(),
            Value::Null,
            404,
            "NO_RECORD_FOUND",
        ),
        case(
            "operator route as a consumer",
            "ambulance-service",
            "GET",
            "/../admin/status".into(),
            Value::Null,
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
    ];
    // Patient identity: the merge and the local-identifier feed.
    let merge = |source: &str, source_system: &str, target: &str| {
        json!({
            "resourceType": "Parameters",
            "parameter": [
                { "name": "source-patient-identifier", "valueIdentifier": { "system": source_system, "value": source } },
                { "name": "target-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": target } },
            ],
        })
    };
    let feed = |nhs_number: &str, system: &str, value: &str| {
        json!({
            "resourceType": "Patient",
            "identifier": [{ "system": NHS_SYSTEM, "value": nhs_number }, { "system": system, "value": value }],
        })
    };
    const RV3_MRN: &str = "https://rv3.example.nhs.uk/Id/mrn";
    cases.extend([
        case(
            "merge Parameters without a target",
            "demographics-feed",
            "POST",
            "/Patient/$merge".into(),
            json!({ "resourceType": "Parameters", "parameter": [
                { "name": "source-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": nhs(1) } },
            ] }),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "merge body that is not Parameters",
            "demographics-feed",
            "POST",
            "/Patient/$merge".into(),
            good.clone(),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "merge of an identifier that is not an NHS Number",
            "demographics-feed",
            "POST",
            "/Patient/$merge".into(),
            merge("RV3-000001", RV3_MRN, &nhs(2)),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "merge of an invalid NHS Number",
            "demographics-feed",
            "POST",
            "/Patient/$merge".into(),
            merge("9434765918", NHS_SYSTEM, &nhs(2)),
            400,
            "INVALID_NHS_NUMBER",
        ),
        case(
            "merge of a number into itself",
            "demographics-feed",
            "POST",
            "/Patient/$merge".into(),
            merge(&nhs(1), NHS_SYSTEM, &nhs(1)),
            400,
            "INVALID_RESOURCE",
        ),
        case(
            "consumer merging",
            "ambulance-service",
            "POST",
            "/Patient/$merge".into(),
            merge(&nhs(1), NHS_SYSTEM, &nhs(2)),
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "feed under an unregistered assigning authority",
            "mental-health-trust",
            "PUT",
            "/Patient?identifier=https://nobody.example.org/id|1".into(),
            feed(&nhs(1), "https://nobody.example.org/id", "1"),
            400,
            "INVALID_IDENTIFIER_SYSTEM",
        ),
        case(
            "producer feeding another organisation's system",
            "gp-practice-a",
            "PUT",
            format!("/Patient?identifier={RV3_MRN}|RV3-777777"),
            feed(&nhs(1), RV3_MRN, "RV3-777777"),
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "feed with an invalid NHS Number",
            "mental-health-trust",
            "PUT",
            format!("/Patient?identifier={RV3_MRN}|RV3-777777"),
            feed("9434765918", RV3_MRN, "RV3-777777"),
            400,
            "INVALID_NHS_NUMBER",
        ),
        case(
            "search by an unregistered identifier system",
            "ambulance-service",
            "GET",
            "/DocumentReference?subject:identifier=https://nobody.example.org/id|1".into(),
            Value::Null,
            400,
            "INVALID_IDENTIFIER_SYSTEM",
        ),
        case(
            "PIX query by an unregistered identifier system",
            "ambulance-service",
            "GET",
            "/Patient/$ihe-pix?sourceIdentifier=https://nobody.example.org/id|1".into(),
            Value::Null,
            400,
            "INVALID_IDENTIFIER_SYSTEM",
        ),
    ]);
    let mut malformed = case(
        "malformed JSON",
        "gp-practice-a",
        "POST",
        "/DocumentReference".into(),
        Value::Null,
        400,
        "MESSAGE_NOT_WELL_FORMED",
    );
    malformed.body = b"{\"resourceType\": \"DocumentReference\", ".to_vec();
    cases.push(malformed);
    let mut deep = case(
        "JSON nested too deep",
        "gp-practice-a",
        "POST",
        "/DocumentReference".into(),
        Value::Null,
        400,
        "MESSAGE_NOT_WELL_FORMED",
    );
    deep.body = format!("{}{}", "[".repeat(100), "]".repeat(100)).into_bytes();
    cases.push(deep);
    let mut big = case(
        "body over 1 MiB",
        "gp-practice-a",
        "POST",
        "/DocumentReference".into(),
        Value::Null,
        413,
        "PAYLOAD_TOO_LARGE",
    );
    big.body = format!("{{\"x\":\"{}\"}}", "a".repeat(1 << 20)).into_bytes();
    cases.push(big);
    let mut ct = case(
        "wrong Content-Type",
        "gp-practice-a",
        "POST",
        "/DocumentReference".into(),
        good.clone(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    ct.content_type = "text/plain";
    cases.push(ct);
    let mut not_object = case(
        "a JSON _search body that is not an object",
        "ambulance-service",
        "POST",
        "/DocumentReference/_search".into(),
        json!(["subject:identifier", "https://fhir.nhs.uk/Id/nhs-number|9000000009"]),
        400,
        "MESSAGE_NOT_WELL_FORMED",
    );
    not_object.content_type = "application/json";
    cases.push(not_object);
    let mut rid = case(
        "bad X-Request-ID",
        "ambulance-service",
        "GET",
        "/metadata".into(),
        Value::Null,
        400,
        "MISSING_OR_INVALID_HEADER",
    );
    rid.headers.push(("x-request-id", "has spaces and ;".into()));
    cases.push(rid);
    // The security review's findings that have an input.
    let search_1 = format!("/DocumentReference?subject:identifier={NHS_SYSTEM}|{}", nhs(1));
    let glass = |name, client, status, code| {
        let mut k = case(name, client, "GET", search_1.clone(), Value::Null, status, code);
        k.headers.push(("x-hie-purpose-of-use", "emergency".into()));
        k.headers.push(("x-hie-break-glass-reason", "unconscious, no history available".into()));
        k
    };
    cases.push(glass("break-glass by an organisation without the permission", "gp-practice-a", 403, "ACCESS_DENIED"));
    let mut no_reason = glass("break-glass without a reason", "ambulance-service", 400, "MISSING_OR_INVALID_HEADER");
    no_reason.headers.retain(|(h, _)| *h != "x-hie-break-glass-reason");
    cases.push(no_reason);
    cases.extend([
        // Another organisation's id: the same answer whether or not such a
        // pointer exists, so the answer reveals nothing.
        case(
            "delete of another organisation's id that does not exist",
            "gp-practice-a",
            "DELETE",
            "/DocumentReference/RV3-does-not-exist".into(),
            Value::Null,
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "update of another organisation's id that does not exist",
            "gp-practice-a",
            "PUT",
            "/DocumentReference/RV3-does-not-exist".into(),
            with(&|v| v["id"] = json!("RV3-does-not-exist")),
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
        case(
            "an operator route by a producer",
            "gp-practice-a",
            "GET",
            "/../admin/audit-anchors".into(),
            Value::Null,
            403,
            "AUTHOR_CREDENTIALS_ERROR",
        ),
    ]);

    let api = c.api_url(ids[1]);
    for k in &cases {
        let http = c.http(k.client);
        let url = if let Some(rest) = k.path.strip_prefix("/..") {
            format!("{}{rest}", api.trim_end_matches("/fhir"))
        } else {
            format!("{api}{}", k.path)
        };
        let mut req = match k.method {
            "POST" => http.post(&url).header("content-type", k.content_type).body(k.body.clone()),
            "PUT" => http.put(&url).header("content-type", k.content_type).body(k.body.clone()),
            "DELETE" => http.delete(&url),
            _ => http.get(&url),
        };
        for (h, v) in &k.headers {
            req = req.header(*h, v);
        }
        let r = reply(req).await?;
        assert_eq!(r.status, k.status, "{}: {}", k.name, r.body);
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", k.name);
        assert_eq!(r.code(), k.code, "{}: {}", k.name, r.body);
        assert_eq!(r.header("content-type"), Some("application/fhir+json"), "{}", k.name);
        assert!(r.header("x-request-id").is_some(), "{}", k.name);
    }

    // A request id is echoed back.
    let r =
        reply(c.http("ambulance-service").get(format!("{api}/metadata")).header("x-request-id", "abc-123.X_y")).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("abc-123.X_y"));
    assert_eq!(r.body["fhirVersion"], "4.0.1");

    // No certificate, or one from another CA: no data.
    let ca = std::path::PathBuf::from(c.file["ca_cert"].as_str().unwrap());
    let anonymous = https_client(&ca, None);
    assert!(anonymous.get(format!("{api}/metadata")).send().await.is_err(), "no certificate, no answer");
    let other = tempfile::tempdir()?;
    let other_ca = hie_pki::DevCa::generate()?;
    let pem =
        other_ca.issue_client("intruder", &hie_domain::OdsCode::parse("A81001")?, &[hie_domain::Role::Consumer])?;
    std::fs::write(other.path().join("c.pem"), &pem.cert)?;
    std::fs::write(other.path().join("c.key"), &pem.key)?;
    let intruder = https_client(&ca, Some((&other.path().join("c.pem"), &other.path().join("c.key"))));
    assert!(
        intruder.get(format!("{api}/metadata")).send().await.is_err(),
        "a certificate from another CA gets no answer"
    );

    // Neither the valid nor the invalid NHS Numbers sent appear in any log.
    let logs = c.all_logs();
    for n in [nhs(1), nhs(2), "9434765918".to_owned(), "1234567890".to_owned(), "0000000000".to_owned()] {
        assert!(!logs.contains(&n), "an NHS Number appears in a log");
    }

    // Nothing changed, and every node is still healthy.
    let (_, digest_after) = c.wait_converged(&ids, Duration::from_secs(20)).await?;
    assert_eq!(digest_after, digest_before, "bad input changed nothing");
    for id in ids {
        let h = reqwest::get(format!("{}/healthz", c.admin_url(id))).await?;
        assert!(h.status().is_success());
    }
    Ok(())
}
