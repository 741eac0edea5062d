//! Patient identity across node processes: local identifiers fed on one
//! node and found on another (IHE PMIR ITI-104, PIXm ITI-83, searches by a
//! local identifier), and a merge of NHS Numbers under a stream of creates
//! to both numbers from two nodes, after which no pointer is lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hie_tests::*;
use serde_json::{Value, json};

const LIN: (&str, &str) = ("x-hie-consistency", "linearizable");
const RV3_SYSTEM: &str = "https://rv3.example.nhs.uk/Id/mrn";

fn feed_body(nhs: &str, system: &str, value: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": NHS_SYSTEM, "value": nhs }, { "system": system, "value": value }],
        "name": [{ "family": "Test", "given": ["Pat"] }],
    })
}

async fn feed(http: &reqwest::Client, api: &str, nhs: &str, system: &str, value: &str) -> anyhow::Result<Reply> {
    reply(
        http.put(format!("{api}/Patient"))
            .query(&[("identifier", format!("{system}|{value}"))])
            .header("content-type", "application/fhir+json")
            .json(&feed_body(nhs, system, value)),
    )
    .await
}

async fn pix(http: &reqwest::Client, api: &str, query: &[(&str, String)]) -> anyhow::Result<Reply> {
    reply(http.get(format!("{api}/Patient/$ihe-pix")).header(LIN.0, LIN.1).query(query)).await
}

fn merge_body(source: &str, target: &str) -> Value {
    json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "source-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": source } },
            { "name": "target-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": target } },
        ],
    })
}

async fn merge(http: &reqwest::Client, api: &str, body: &Value) -> anyhow::Result<Reply> {
    reply(http.post(format!("{api}/Patient/$merge")).header("content-type", "application/fhir+json").json(body)).await
}

fn ids_of(r: &Reply) -> BTreeSet<String> {
    r.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "match")
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_identifiers_are_fed_on_one_node_and_found_on_another() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let (n1, n3) = (c.api_url(1), c.api_url(3));
    let (gp, mh, consumer) = (c.http("gp-practice-a"), c.http("mental-health-trust"), c.http("ambulance-service"));
    assert_eq!(c.client_entry("mental-health-trust")["identifier_system"], RV3_SYSTEM);
    let patient = nhs(7001);
    let created = create_pointer(&mh, &n1, &pointer_body(&patient, "RV3", "id-1")).await?;
    assert_eq!(created.status, 201, "{}", created.body);

    // Fed on node 1: 201, then 200 for the same again.
    let r = feed(&mh, &n1, &patient, RV3_SYSTEM, "RV3-MRN-1").await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(feed(&mh, &n1, &patient, RV3_SYSTEM, "RV3-MRN-1").await?.status, 200);

    // PIXm on node 3: the NHS Number and the patient.
    let q = |v: &str| vec![("sourceIdentifier", format!("{RV3_SYSTEM}|{v}"))];
    let r = pix(&consumer, &n3, &q("RV3-MRN-1")).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["resourceType"], "Parameters");
    let params = r.body["parameter"].as_array().unwrap();
    assert!(params.iter().any(|p| p["name"] == "targetIdentifier" && p["valueIdentifier"]["value"] == patient));
    assert!(params.iter().any(|p| p["valueReference"]["reference"] == format!("Patient/{patient}")));
    // From the NHS Number, the local identifier.
    let r = pix(&gp, &n3, &[("sourceIdentifier", format!("{NHS_SYSTEM}|{patient}"))]).await?;
    assert!(r.body["parameter"].as_array().unwrap().iter().any(|p| p["valueIdentifier"]["value"] == "RV3-MRN-1"));
    // PIXm's errors.
    let r = pix(&consumer, &n3, &q("RV3-MRN-404")).await?;
    assert_eq!((r.status, r.body["issue"][0]["code"].as_str()), (404, Some("not-found")));
    let r = pix(&consumer, &n3, &[("sourceIdentifier", "https://nobody.example/id|1".into())]).await?;
    assert_eq!((r.status, r.body["issue"][0]["code"].as_str()), (400, Some("code-invalid")));
    let mut with_target = q("RV3-MRN-1");
    with_target.push(("targetSystem", "https://nobody.example/id".into()));
    let r = pix(&consumer, &n3, &with_target).await?;
    assert_eq!((r.status, r.body["issue"][0]["code"].as_str()), (403, Some("code-invalid")));

    // A search and a count by the local identifier on node 3.
    let local = ("subject:identifier", format!("{RV3_SYSTEM}|RV3-MRN-1"));
    let s =
        reply(consumer.get(format!("{n3}/DocumentReference")).header(LIN.0, LIN.1).query(std::slice::from_ref(&local)))
            .await?;
    assert_eq!((s.status, s.body["total"].as_u64()), (200, Some(1)), "{}", s.body);
    let count =
        reply(consumer.get(format!("{n3}/DocumentReference/_count")).header(LIN.0, LIN.1).query(&[local])).await?;
    assert_eq!(count.body["total"], 1);
    let nobody = ("subject:identifier", format!("{RV3_SYSTEM}|RV3-MRN-404"));
    let s = reply(consumer.get(format!("{n3}/DocumentReference")).query(&[nobody])).await?;
    assert_eq!((s.status, s.body["total"].as_u64()), (200, Some(0)));

    // Bad input: a producer feeding another organisation's system, an
    // unregistered system, an invalid NHS Number, an NHS Number as the
    // local identifier, a consumer feeding.
    let r = feed(&gp, &n1, &patient, RV3_SYSTEM, "RV3-MRN-2").await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = feed(&mh, &n1, &patient, "https://nobody.example/id", "1").await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_IDENTIFIER_SYSTEM"), "{}", r.body);
    let r = feed(&mh, &n1, "9434765918", RV3_SYSTEM, "RV3-MRN-3").await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_NHS_NUMBER"));
    let r = feed(&mh, &n1, &patient, NHS_SYSTEM, &patient).await?;
    assert_eq!(r.status, 400);
    assert_eq!(feed(&consumer, &n1, &patient, RV3_SYSTEM, "RV3-MRN-4").await?.status, 403);
    let r = reply(
        mh.put(format!("{n1}/Patient?identifier={RV3_SYSTEM}|x"))
            .header("content-type", "application/fhir+json")
            .body("{not json"),
    )
    .await?;
    assert_eq!((r.status, r.code()), (400, "MESSAGE_NOT_WELL_FORMED"));

    // Removed on node 3; then 404 on PIXm and on a second removal.
    let del = || reply(mh.delete(format!("{n3}/Patient")).query(&[("identifier", format!("{RV3_SYSTEM}|RV3-MRN-1"))]));
    assert_eq!(del().await?.status, 200);
    assert_eq!(del().await?.status, 404);
    assert_eq!(pix(&consumer, &n1, &q("RV3-MRN-1")).await?.status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_under_creates_from_two_nodes_loses_no_pointer() -> anyhow::Result<()> {
    let c = Arc::new(Cluster::up(&["--patients", "0"])?);
    c.wait_leader(Duration::from_secs(10)).await?;
    let ids = c.node_ids();
    let (retired, survivor) = (nhs(7101), nhs(7102));
    let authority = c.http("demographics-feed");

    // Bad merges first: a consumer, malformed Parameters, a non-NHS
    // system, an invalid number, a self-merge.
    let n2 = c.api_url(2);
    let r = merge(&c.http("ambulance-service"), &n2, &merge_body(&retired, &survivor)).await?;
    assert_eq!(r.status, 403);
    let r = merge(
        &authority,
        &n2,
        &json!({ "resourceType": "Parameters", "parameter": [{ "name": "source-patient-identifier" }] }),
    )
    .await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_RESOURCE"), "{}", r.body);
    let mut other_system = merge_body(&retired, &survivor);
    other_system["parameter"][0]["valueIdentifier"]["system"] = json!(RV3_SYSTEM);
    assert_eq!(merge(&authority, &n2, &other_system).await?.status, 400);
    let r = merge(&authority, &n2, &merge_body("9434765918", &survivor)).await?;
    assert_eq!((r.status, r.code()), (400, "INVALID_NHS_NUMBER"));
    assert_eq!(merge(&authority, &n2, &merge_body(&survivor, &survivor)).await?.status, 400);

    // Creates to both numbers, from producers on nodes 1 and 3.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![];
    for (w, (client, ods, node)) in
        [("gp-practice-a", "A81001", 1u64), ("mental-health-trust", "RV3", 3)].into_iter().enumerate()
    {
        let (c, stop) = (c.clone(), stop.clone());
        let (retired, survivor) = (retired.clone(), survivor.clone());
        writers.push(tokio::spawn(async move {
            let http = c.http(client);
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let patient = if i.is_multiple_of(2) { &retired } else { &survivor };
                let body = pointer_body(patient, ods, &format!("merge-{w}-{i}"));
                if let Ok(r) = create_pointer(&http, &c.api_url(node), &body).await
                    && r.status == 201
                {
                    acked.push(r.body["id"].as_str().unwrap().to_owned());
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = merge(&authority, &n2, &merge_body(&retired, &survivor)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in writers {
        acked.extend(w.await?);
    }
    assert!(acked.len() > 10, "creates flowed: {}", acked.len());
    // A repeat moves nothing and is 200; a merge into the retired number is 400.
    let again = merge(&authority, &c.api_url(1), &merge_body(&retired, &survivor)).await?;
    assert_eq!(again.status, 200);
    let moved = again.body["parameter"].as_array().unwrap().iter().find(|p| p["name"] == "pointers-moved").unwrap();
    assert_eq!(moved["valueInteger"], 0);
    assert_eq!(merge(&authority, &n2, &merge_body(&nhs(7103), &retired)).await?.status, 400);

    let (_, digest) = c.wait_converged(&ids, Duration::from_secs(30)).await?;
    eprintln!("{} creates acknowledged; converged at digest {digest}", acked.len());
    let consumer = c.http("ambulance-service");
    for id in &ids {
        let api = c.api_url(*id);
        let (survivor_page, under_survivor) = all_under(&consumer, &api, &survivor).await?;
        let (retired_page, under_retired) = all_under(&consumer, &api, &retired).await?;
        // (A create whose answer was lost may be there too: at least every acknowledged one.)
        assert!(acked.is_subset(&under_survivor), "node {id}: every acknowledged pointer under the survivor");
        assert_eq!(under_retired, under_survivor, "node {id}: the retired number answers for the survivor");
        assert_eq!(survivor_page["total"].as_u64(), Some(under_survivor.len() as u64));
        let outcome = retired_page["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome");
        let outcome = outcome.expect("a searchset of a retired number says so");
        assert_eq!(outcome["resource"]["issue"][0]["severity"], "warning");
        assert!(outcome["resource"]["issue"][0]["diagnostics"].as_str().unwrap().contains(survivor.as_str()));
        // Holders add up, under either number.
        for n in [&survivor, &retired] {
            let h = reply(consumer.get(format!("{api}/Patient/{n}/$record-holders"))).await?;
            let total: u64 = h.body["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["name"] == "holder")
                .map(|p| p["part"][1]["valueInteger"].as_u64().unwrap())
                .sum();
            assert_eq!(total, under_survivor.len() as u64, "node {id}");
        }
    }
    Ok(())
}

/// Every pointer found under `patient` on one node, page by page, and the
/// first page (which carries the searchset's outcome entry, if any).
async fn all_under(consumer: &reqwest::Client, api: &str, patient: &str) -> anyhow::Result<(Value, BTreeSet<String>)> {
    let q = [("subject:identifier", format!("{NHS_SYSTEM}|{patient}")), ("_count", "100".to_owned())];
    let mut r = reply(consumer.get(format!("{api}/DocumentReference")).query(&q)).await?;
    anyhow::ensure!(r.status == 200, "search answered {}: {}", r.status, r.body);
    let first = r.body.clone();
    let mut found = BTreeSet::new();
    loop {
        found.extend(ids_of(&r));
        let next = r.body["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next");
        match next.and_then(|l| l["url"].as_str()) {
            Some(url) => r = reply(consumer.get(url)).await?,
            None => break,
        }
    }
    Ok((first, found))
}

fn says_merged(page: &Value) -> bool {
    page["entry"].as_array().into_iter().flatten().any(|e| e["search"]["mode"] == "outcome")
}

/// 2. The leader is killed while a merge is in flight: on every node the
/// merge happened entirely or not at all (never some pointers moved and
/// others not), the nodes' digests agree, and a repeat completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_while_the_leader_is_killed_happens_entirely_or_not_at_all() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    let ids = c.node_ids();
    let authority = c.http("demographics-feed");
    let (gp, consumer) = (c.http("gp-practice-a"), c.http("ambulance-service"));
    const POINTERS: u32 = 150;
    // The kill follows the merge request by these delays, so that rounds
    // meet the merge before it is proposed, while it replicates and after
    // it commits.
    let delays_ms = [0u64, 2, 5, 15];
    let mut outcomes = vec![];
    for (round, delay) in delays_ms.into_iter().enumerate() {
        let leader = c.wait_leader(Duration::from_secs(15)).await?;
        let via = *ids.iter().find(|i| **i != leader).unwrap();
        let (retired, survivor) = (nhs(7200 + 2 * round as u32), nhs(7201 + 2 * round as u32));
        let mut moved = BTreeSet::new();
        for i in 0..POINTERS {
            let r = create_pointer(&gp, &c.api_url(via), &pointer_body(&retired, "A81001", &format!("k{round}-{i}")))
                .await?;
            anyhow::ensure!(r.status == 201, "create: {} {}", r.status, r.body);
            moved.insert(r.body["id"].as_str().unwrap().to_owned());
        }
        let r =
            create_pointer(&gp, &c.api_url(via), &pointer_body(&survivor, "A81001", &format!("k{round}-s"))).await?;
        anyhow::ensure!(r.status == 201, "create: {}", r.body);
        let own = r.body["id"].as_str().unwrap().to_owned();

        let request = {
            let (authority, api) = (authority.clone(), c.api_url(via));
            let body = merge_body(&retired, &survivor);
            tokio::spawn(async move { merge(&authority, &api, &body).await })
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        c.kill9(leader);
        let answered = request.await?.map(|r| r.status).ok();
        c.restart(leader)?;
        c.wait_leader(Duration::from_secs(15)).await?;
        let (_, digest) = c.wait_converged(&ids, Duration::from_secs(30)).await?;

        // All or nothing, the same on every node.
        let mut merged_on = vec![];
        for id in &ids {
            let api = c.api_url(*id);
            let (survivor_page, under_survivor) = all_under(&consumer, &api, &survivor).await?;
            let (retired_page, under_retired) = all_under(&consumer, &api, &retired).await?;
            assert!(!says_merged(&survivor_page), "round {round} node {id}: the survivor is not retired");
            let merged = says_merged(&retired_page);
            if merged {
                let mut all = moved.clone();
                all.insert(own.clone());
                assert_eq!(under_survivor, all, "round {round} node {id}: every pointer moved to the survivor");
                assert_eq!(under_retired, all, "round {round} node {id}: the retired number answers for the survivor");
            } else {
                assert_eq!(under_retired, moved, "round {round} node {id}: no pointer left the retired number");
                assert_eq!(under_survivor, BTreeSet::from([own.clone()]), "round {round} node {id}: none arrived");
            }
            merged_on.push(merged);
        }
        assert!(merged_on.iter().all(|m| *m == merged_on[0]), "round {round}: nodes disagree: {merged_on:?}");
        if answered == Some(200) {
            assert!(merged_on[0], "round {round}: an acknowledged merge happened");
        }
        eprintln!(
            "round {round}: leader {leader} killed {delay} ms after the merge was sent via node {via}; \
             answer {answered:?}; merged: {}; digest {digest}",
            merged_on[0]
        );
        outcomes.push(merged_on[0]);

        // A repeat completes it (or moves nothing if it was done).
        let again = merge(&authority, &c.api_url(via), &merge_body(&retired, &survivor)).await?;
        assert_eq!(again.status, 200, "round {round}: {}", again.body);
        // The answer means committed on a majority, not yet applied on the
        // node that relayed it: read once every node has applied it.
        c.wait_converged(&ids, Duration::from_secs(30)).await?;
        let (_, under_survivor) = all_under(&consumer, &c.api_url(via), &survivor).await?;
        assert!(
            moved.is_subset(&under_survivor),
            "round {round}: after the repeat every pointer is under the survivor"
        );
    }
    eprintln!("merged before the repeat, by round: {outcomes:?}");
    Ok(())
}
