//! What the API returns validates as FHIR R4 with a real FHIR library, and a
//! stock FHIR client can search (following `next` links, from one node to
//! another), read pointers, their history and one version.
//! Runs `tests/fhir/check.py` with the Python environment `tests/run.sh`
//! prepares (`HIE_FHIR_PYTHON`).

use std::time::Duration;

use hie_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_valid_fhir_r4_and_a_stock_client_works() -> anyhow::Result<()> {
    let python = std::env::var("HIE_FHIR_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/hie-venv/bin/python", std::env::var("HOME").unwrap_or_default()));
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} missing: tests/run.sh installs tests/fhir/requirements.txt"
    );
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let gp = c.http("gp-practice-a");
    let mh = c.http("mental-health-trust");
    let patient = nhs(4242);
    let mut body = pointer_body(&patient, "A81001", "fhir-1");
    body["context"] = serde_json::json!({
        "practiceSetting": { "coding": [{ "system": "http://snomed.info/sct", "code": "390826005", "display": "Mental health caregiver support" }] },
        "period": { "start": "2026-01-01T00:00:00Z" }
    });
    let r = create_pointer(&gp, &c.api_url(1), &body).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let mut replacement = pointer_body(&patient, "A81001", "fhir-2");
    replacement["relatesTo"] =
        serde_json::json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{id}") } }]);
    let r = create_pointer(&gp, &c.api_url(1), &replacement).await?;
    assert_eq!(r.status, 201);
    let current = r.body["id"].as_str().unwrap().to_owned();
    // A second version of it, for the history check.
    let mut v2 = r.body.clone();
    v2["description"] = serde_json::json!("Reviewed with the patient");
    let r = reply(
        gp.put(format!("{}/DocumentReference/{current}", c.api_url(1)))
            .header("content-type", "application/fhir+json")
            .json(&v2),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(create_pointer(&mh, &c.api_url(1), &pointer_body(&patient, "RV3", "fhir-3")).await?.status, 201);
    // The check reads node 2: wait until it has applied everything.
    c.wait_converged(&c.node_ids(), Duration::from_secs(10)).await?;
    let script = manifest_dir().join("fhir/check.py");
    let out =
        std::process::Command::new(&python).arg(&script).args([&c.cluster_json(), &patient, &current]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "FHIR conformance check failed");
    assert!(stdout.contains("fhirpy found 2 pointers"), "{stdout}");
    Ok(())
}
