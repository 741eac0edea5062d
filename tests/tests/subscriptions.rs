//! FHIR Subscriptions (the R5 Backport IG on R4) against a real cluster and
//! a real HTTPS receiver that checks the node's client certificate:
//! handshake, events in order for every kind of change of the subscribed
//! patient only, heartbeats, `$status` and `$events`; the deliverer killed
//! mid-stream; a receiver that fails and recovers; the bad-input table.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hie_tests::receiver::{Mode, Received, Receiver};
use hie_tests::*;
use serde_json::{Value, json};

const TOPIC: &str = "urn:hie:SubscriptionTopic:pointer-changed";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

fn subscription(endpoint: &str, criteria: &[String], content: &str, heartbeat: Option<u32>) -> Value {
    let filters: Vec<Value> = criteria
        .iter()
        .map(|c| json!({ "url": format!("{BACKPORT}backport-filter-criteria"), "valueString": c }))
        .collect();
    let mut channel = json!({
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": { "extension": [{ "url": format!("{BACKPORT}backport-payload-content"), "valueCode": content }] },
        "extension": [{ "url": format!("{BACKPORT}backport-timeout"), "valueUnsignedInt": 1 }],
    });
    if let Some(h) = heartbeat {
        channel["extension"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": h }));
    }
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Crisis plans for patients in the ambulance service's care",
        "criteria": TOPIC,
        "_criteria": { "extension": filters },
        "channel": channel,
    })
}

fn for_patient(nhs: &str) -> Vec<String> {
    vec![format!("DocumentReference?subject:identifier={NHS_SYSTEM}|{nhs}")]
}

async fn subscribe(http: &reqwest::Client, api: &str, body: &Value) -> anyhow::Result<Reply> {
    reply(http.post(format!("{api}/Subscription")).header("content-type", "application/fhir+json").json(body)).await
}

async fn status_of(http: &reqwest::Client, api: &str, id: &str) -> anyhow::Result<(String, u64)> {
    let r = reply(http.get(format!("{api}/Subscription/{id}/$status"))).await?;
    anyhow::ensure!(r.status == 200, "$status answered {}: {}", r.status, r.body);
    let params = r.body["entry"][0]["resource"]["parameter"].as_array().cloned().unwrap_or_default();
    let get = |n: &str| params.iter().find(|p| p["name"] == n).cloned().unwrap_or(Value::Null);
    let status = get("status")["valueCode"].as_str().unwrap_or("").to_owned();
    let events = get("events-since-subscription-start")["valueString"].as_str().unwrap_or("0").parse()?;
    Ok((status, events))
}

async fn wait_status(http: &reqwest::Client, api: &str, id: &str, want: &str, timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let (status, _) = status_of(http, api, id).await?;
        if status == want {
            return Ok(());
        }
        if Instant::now() >= until {
            let r = reply(http.get(format!("{api}/Subscription/{id}"))).await?;
            anyhow::bail!("subscription {id} is {status}, not {want}, after {timeout:?}: {}", r.body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The numbers arrive in order (a repeat is allowed: at least once), none
/// is skipped, and the last is `n`.
fn assert_in_order_without_gaps(numbers: &[u64], n: u64) {
    let mut max = 0;
    for (i, &k) in numbers.iter().enumerate() {
        assert!(k <= max + 1, "event {k} arrived at position {i} after only 1..={max}: {numbers:?}");
        max = max.max(k);
    }
    assert_eq!(max, n, "every event up to {n} arrived: {numbers:?}");
    let distinct: BTreeSet<u64> = numbers.iter().copied().collect();
    assert_eq!(distinct, (1..=n).collect::<BTreeSet<u64>>());
}

async fn receiver(c: &Cluster) -> anyhow::Result<Receiver> {
    let certs = c.dir.path().join("certs");
    Receiver::start(&certs.join("ca.pem"), &certs.join("ca.key"), &c.dir.path().join("receiver"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_each_change_of_its_patient_in_order_and_catches_up() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let rx = receiver(&c).await?;
    let (n1, n2, n3) = (c.api_url(1), c.api_url(2), c.api_url(3));
    let consumer = c.http("ambulance-service");
    let gp = c.http("gp-practice-a");
    let feed = c.http("demographics-feed");
    let (patient, other, retired) = (nhs(8101), nhs(8102), nhs(8103));

    let r = subscribe(&consumer, &n2, &subscription(&rx.url(), &for_patient(&patient), "id-only", Some(1))).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "requested");
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(r.header("location").is_some_and(|l| l.ends_with(&format!("/Subscription/{id}"))));
    assert!(rx.wait_for(Duration::from_secs(10), |got| got.iter().any(|g| g.kind() == "handshake")).await);
    wait_status(&consumer, &n3, &id, "active", Duration::from_secs(10)).await?;

    // Every kind of change of the patient: create, update, supersede (the
    // new pointer and the replaced one), delete, and a merge into it.
    let created = create_pointer(&gp, &n1, &pointer_body(&patient, "A81001", "sub-1")).await?;
    assert_eq!(created.status, 201, "{}", created.body);
    let first = created.body_id();
    let _ = create_pointer(&gp, &n1, &pointer_body(&other, "A81001", "sub-other")).await?;
    let current =
        reply(gp.get(format!("{n1}/DocumentReference/{first}")).header("x-hie-consistency", "linearizable")).await?;
    let mut updated = current.body.clone();
    updated["description"] = json!("Reviewed");
    let r = reply(
        gp.put(format!("{n1}/DocumentReference/{first}"))
            .header("content-type", "application/fhir+json")
            .header("if-match", current.header("etag").unwrap_or("W/\"1\""))
            .json(&updated),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut replacing = pointer_body(&patient, "A81001", "sub-2");
    replacing["relatesTo"] =
        json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{first}") } }]);
    let r = create_pointer(&gp, &n1, &replacing).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let second = r.body_id();
    let r = reply(gp.delete(format!("{n1}/DocumentReference/{second}"))).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = create_pointer(&gp, &n1, &pointer_body(&retired, "A81001", "sub-3")).await?;
    let moved = r.body_id();
    let merge = json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "source-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": retired } },
            { "name": "target-patient-identifier", "valueIdentifier": { "system": NHS_SYSTEM, "value": patient } },
        ],
    });
    let r =
        reply(feed.post(format!("{n3}/Patient/$merge")).header("content-type", "application/fhir+json").json(&merge))
            .await?;
    assert_eq!(r.status, 200, "{}", r.body);

    // 1 create, 2 update, 3 supersede's create, 4 the superseded, 5 delete, 6 merge.
    let want = 6;
    assert!(
        rx.wait_for(Duration::from_secs(15), |_| rx.event_numbers(&id).iter().max() == Some(&want)).await,
        "events so far: {:?}",
        rx.event_numbers(&id)
    );
    assert_in_order_without_gaps(&rx.event_numbers(&id), want);
    let foci: Vec<String> = rx
        .received()
        .iter()
        .flat_map(|r| r.events())
        .filter_map(|(_, f)| f)
        .map(|f| f.rsplit('/').next().unwrap_or("").to_owned())
        .collect();
    let ours: BTreeSet<&str> = [first.as_str(), second.as_str(), moved.as_str()].into();
    assert!(foci.iter().all(|f| ours.contains(f.as_str())), "only the subscribed patient's pointers: {foci:?}");
    assert!(foci.contains(&moved), "the merged pointer is an event");

    // Heartbeats while idle (period 1 s).
    let before = rx.received().iter().filter(|r| r.kind() == "heartbeat").count();
    assert!(
        rx.wait_for(Duration::from_secs(5), |got| got.iter().filter(|r| r.kind() == "heartbeat").count() >= before + 2)
            .await,
        "heartbeats while idle"
    );

    // $status on any node, and $events for a subscriber that was away.
    let (status, events) = status_of(&consumer, &n1, &id).await?;
    assert_eq!((status.as_str(), events), ("active", want));
    let r =
        reply(consumer.get(format!("{n3}/Subscription/{id}/$events?eventsSinceNumber=2&eventsUntilNumber=4"))).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["type"], "history");
    let got = Received { at: Instant::now(), bundle: r.body.clone() };
    assert_eq!(got.kind(), "query-event");
    assert_eq!(got.events().iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 4]);

    // The disclosures are in the deliverer's audit trail.
    let audit = reply(
        c.http("patient-app")
            .get(format!("{n1}/AuditEvent"))
            .query(&[("entity.identifier", format!("{NHS_SYSTEM}|{patient}"))]),
    )
    .await?;
    assert_eq!(audit.status, 200, "{}", audit.body);
    let text = audit.body.to_string();
    assert!(text.contains(&format!("Subscription/{id}")), "a notification is audited as a disclosure: {text}");

    // Only the owner reads or deletes it.
    let other_consumer = c.http("out-of-hours-111");
    assert_eq!(reply(other_consumer.get(format!("{n1}/Subscription/{id}"))).await?.status, 404);
    assert_eq!(reply(other_consumer.delete(format!("{n1}/Subscription/{id}"))).await?.status, 404);
    let r = reply(consumer.get(format!("{n1}/Subscription/{id}"))).await?;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("active")));
    assert_eq!(reply(consumer.delete(format!("{n2}/Subscription/{id}"))).await?.status, 200);
    assert_eq!(
        reply(consumer.get(format!("{n1}/Subscription/{id}")).header("x-hie-consistency", "linearizable"))
            .await?
            .status,
        404
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deliverer_killed_mid_stream_loses_no_event() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let rx = receiver(&c).await?;
    let follower = c.node_ids().into_iter().find(|&n| n != leader).unwrap();
    let api = c.api_url(follower);
    let consumer = c.http("ambulance-service");
    let gp = c.http("gp-practice-a");
    let patient = nhs(8201);
    let r = subscribe(&consumer, &api, &subscription(&rx.url(), &for_patient(&patient), "id-only", None)).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    wait_status(&consumer, &api, &id, "active", Duration::from_secs(10)).await?;

    let mut acknowledged = 0u64;
    let mut killed_at = None;
    for i in 0..150 {
        if i == 60 {
            c.kill9(leader);
            killed_at = Some(Instant::now());
        }
        // A create refused while there is no leader is tried again.
        let body = pointer_body(&patient, "A81001", &format!("kill-{i}"));
        loop {
            let r = create_pointer(&gp, &api, &body).await;
            match r {
                Ok(r) if r.status == 201 => {
                    acknowledged += 1;
                    break;
                }
                Ok(r) if r.status == 409 => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let killed_at = killed_at.unwrap();
    let (_, made) = status_of(&consumer, &api, &id).await?;
    assert!(made >= acknowledged, "an event for each acknowledged create: {made} >= {acknowledged}");
    assert!(
        rx.wait_for(Duration::from_secs(30), |_| rx.event_numbers(&id).iter().max() == Some(&made)).await,
        "events so far: {:?}",
        rx.event_numbers(&id)
    );
    assert_in_order_without_gaps(&rx.event_numbers(&id), made);
    // Delivery resumed within 10 s of the kill.
    let resumed = rx.received().iter().filter(|r| r.at > killed_at && !r.events().is_empty()).map(|r| r.at).min();
    let took = resumed.map(|t| t - killed_at);
    assert!(took.is_some_and(|t| t < Duration::from_secs(10)), "delivery resumed after {took:?}");
    eprintln!(
        "deliverer killed: delivery resumed after {took:?}; {made} events, {} arrivals",
        rx.event_numbers(&id).len()
    );
    c.restart(leader)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_then_recovers_gets_every_retained_event() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let rx = receiver(&c).await?;
    let api = c.api_url(1);
    let consumer = c.http("ambulance-service");
    let gp = c.http("gp-practice-a");
    let patient = nhs(8301);
    let r = subscribe(&consumer, &api, &subscription(&rx.url(), &for_patient(&patient), "full-resource", None)).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    wait_status(&consumer, &api, &id, "active", Duration::from_secs(10)).await?;

    rx.set_mode(Mode::Fail500);
    for i in 0..20 {
        assert_eq!(
            create_pointer(&gp, &api, &pointer_body(&patient, "A81001", &format!("fail-{i}"))).await?.status,
            201
        );
    }
    wait_status(&consumer, &api, &id, "error", Duration::from_secs(15)).await?;
    let attempts = rx.attempts();
    rx.set_mode(Mode::Hang);
    for i in 0..10 {
        assert_eq!(
            create_pointer(&gp, &api, &pointer_body(&patient, "A81001", &format!("hang-{i}"))).await?.status,
            201
        );
    }
    // Retried while hanging (timeouts of 1 s).
    assert!(rx.wait_for(Duration::from_secs(10), |_| rx.attempts() >= attempts + 2).await);
    assert!(rx.event_numbers(&id).is_empty(), "nothing acknowledged yet");
    rx.set_mode(Mode::Accept);
    assert!(
        rx.wait_for(Duration::from_secs(40), |_| rx.event_numbers(&id).iter().max() == Some(&30)).await,
        "events so far: {:?}",
        rx.event_numbers(&id)
    );
    assert_in_order_without_gaps(&rx.event_numbers(&id), 30);
    wait_status(&consumer, &api, &id, "active", Duration::from_secs(10)).await?;
    // full-resource: each event's pointer travels with it.
    let with_resources = rx.received().iter().filter(|r| r.kind() == "event-notification").all(|r| {
        let entries = r.bundle["entry"].as_array().map_or(0, Vec::len);
        entries == 1 + r.events().len()
    });
    assert!(with_resources, "a full-resource notification carries each pointer");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscriptions_get_a_clear_operation_outcome() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "0"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let api = c.api_url(1);
    let consumer = c.http("ambulance-service");
    let good = "https://127.0.0.1:9/notify";
    let patient = for_patient(&nhs(8401));
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("an http endpoint", subscription("http://127.0.0.1:9/notify", &patient, "id-only", None), 400, "https"),
        (
            "a host not on the allow-list",
            subscription("https://records.example.org/notify", &patient, "id-only", None),
            400,
            "allow-list",
        ),
        (
            "an unknown topic",
            {
                let mut s = subscription(good, &patient, "id-only", None);
                s["criteria"] = json!("urn:hie:SubscriptionTopic:everything");
                s
            },
            400,
            "topic",
        ),
        (
            "an unsupported filter",
            subscription(good, &["DocumentReference?status=current".to_owned()], "id-only", None),
            400,
            "not supported",
        ),
        ("an unknown payload content", subscription(good, &patient, "everything", None), 400, "payload-content"),
        (
            "a websocket channel",
            {
                let mut s = subscription(good, &patient, "id-only", None);
                s["channel"]["type"] = json!("websocket");
                s
            },
            400,
            "rest-hook",
        ),
        (
            "no reason",
            {
                let mut s = subscription(good, &patient, "id-only", None);
                s.as_object_mut().unwrap().remove("reason");
                s
            },
            400,
            "reason",
        ),
    ];
    for (what, body, status, needle) in cases {
        let r = subscribe(&consumer, &api, &body).await?;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{what}");
        let text = r.body.to_string();
        assert!(text.contains(needle), "{what}: the outcome names {needle}: {text}");
        assert!(!text.contains(&nhs(8401)), "{what}: no NHS Number in the outcome");
    }
    let r = reply(
        consumer
            .post(format!("{api}/Subscription"))
            .header("content-type", "application/fhir+json")
            .body("{\"resourceType\":"),
    )
    .await?;
    assert_eq!((r.status, r.code()), (400, "MESSAGE_NOT_WELL_FORMED"));
    // A producer may not subscribe; nobody reads a subscription that is not theirs.
    let r = subscribe(&c.http("gp-practice-a"), &api, &subscription(good, &patient, "id-only", None)).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = subscribe(&consumer, &api, &subscription(good, &patient, "id-only", None)).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap();
    for other in ["out-of-hours-111", "gp-practice-a"] {
        let r = reply(c.http(other).get(format!("{api}/Subscription/{id}/$status"))).await?;
        assert!(r.status == 404 || r.status == 403, "{other}: {}", r.status);
    }
    assert_eq!(reply(consumer.get(format!("{api}/Subscription/no-such-one"))).await?.status, 404);
    let r = reply(consumer.get(format!("{api}/Subscription/{id}/$events?eventsSinceNumber=x"))).await?;
    assert_eq!(r.status, 400, "{}", r.body);
    Ok(())
}
