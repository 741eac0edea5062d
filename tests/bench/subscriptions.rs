//! `hie-subscription-bench`: what FHIR Subscriptions cost and how soon a
//! subscriber hears of a change, on a real 3-node dev cluster (separate
//! processes, RocksDB on disk, libp2p, HTTPS with mTLS both ways: the
//! receiver checks the leader's client certificate).
//!
//!   benches/subscriptions.sh latency [--subscriptions 100] [--rates 100,1000] [--seconds 20]
//!   benches/subscriptions.sh cost [--counts 0,100,10000] [--seconds 20] [--connections 64]
//!
//! `latency`: N subscriptions (id-only), one per patient; creates at a fixed
//! rate (open loop) spread over those patients; for each acknowledged create
//! (the producer's 201), the time until the receiver's 2xx for the
//! notification naming it. `cost`: creates/s with `connections` creates in
//! flight (closed loop) with 0, 100 and 10,000 subscriptions, each create
//! matching one subscription when there are any, in the order given and
//! then reversed (ABBA), all in one cluster; `--matching no` sends the
//! creates to other patients, so that only the subscriptions' lookup is paid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hie_tests::receiver::Receiver;
use hie_tests::{Cluster, NHS_SYSTEM, create_pointer, nhs, pointer_body, reply};
use serde_json::{Value, json};

const USAGE: &str = "usage: hie-subscription-bench latency|cost [--subscriptions N] [--rates R,R] [--counts N,N] [--seconds S] [--connections C] [--matching yes|no]";
/// Where the patients of creates that match no subscription start.
const UNSUBSCRIBED_PATIENTS_FROM: u32 = 50_000;
const PRODUCER: &str = "gp-practice-a";
const PRODUCER_ODS: &str = "A81001";
const CONSUMER: &str = "ambulance-service";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
/// Patients a `cost` run writes to when it has no subscriptions.
const PATIENTS_WITHOUT_SUBSCRIPTIONS: u32 = 10_000;
/// Subscriptions made at once.
const SUBSCRIBE_CONCURRENCY: usize = 64;
/// Creates in flight at most in an open-loop run.
const OPEN_LOOP_IN_FLIGHT_MAX: usize = 512;

struct Args {
    mode: String,
    subscriptions: u32,
    rates: Vec<u32>,
    counts: Vec<u32>,
    seconds: u64,
    connections: usize,
    /// `cost`: whether each create matches a subscription (else the creates
    /// go to other patients: the lookup's cost alone).
    matching: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context(USAGE)?;
    let mut a = Args {
        mode,
        subscriptions: 100,
        rates: vec![100, 1000],
        counts: vec![0, 100, 10_000],
        seconds: 20,
        connections: 64,
        matching: true,
    };
    let list = |v: &str| v.split(',').map(str::parse).collect::<Result<Vec<u32>, _>>();
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--subscriptions" => a.subscriptions = v.parse()?,
            "--rates" => a.rates = list(&v)?,
            "--counts" => a.counts = list(&v)?,
            "--seconds" => a.seconds = v.parse()?,
            "--connections" => a.connections = v.parse()?,
            "--matching" => a.matching = v == "yes",
            _ => bail!("unknown argument {k}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn patient(i: u32) -> String {
    nhs(600_000 + i)
}

fn subscription(endpoint: &str, nhs: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "benchmark",
        "criteria": "urn:hie:SubscriptionTopic:pointer-changed",
        "_criteria": { "extension": [{
            "url": format!("{BACKPORT}backport-filter-criteria"),
            "valueString": format!("DocumentReference?subject:identifier={NHS_SYSTEM}|{nhs}"),
        }] },
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": format!("{BACKPORT}backport-payload-content"), "valueCode": "id-only" }] },
        },
    })
}

/// Subscribes `n` patients (from `first`); their ids.
async fn subscribe(c: &Arc<Cluster>, rx: &Receiver, first: u32, n: u32) -> anyhow::Result<Vec<String>> {
    let http = c.http(CONSUMER);
    let api = c.api_url(1);
    let mut ids = vec![];
    let all: Vec<u32> = (first..first + n).collect();
    for chunk in all.chunks(SUBSCRIBE_CONCURRENCY) {
        let mut tasks = vec![];
        for &i in chunk {
            let (http, api, body) = (http.clone(), api.clone(), subscription(&rx.url(), &patient(i)));
            tasks.push(tokio::spawn(async move {
                loop {
                    // A burst of new connections can meet the node's limit on
                    // TLS handshakes per address: try again.
                    let Ok(r) = reply(
                        http.post(format!("{api}/Subscription"))
                            .header("content-type", "application/fhir+json")
                            .json(&body),
                    )
                    .await
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    match r.status {
                        201 => return Ok::<String, anyhow::Error>(r.body_id()),
                        429 | 503 => tokio::time::sleep(Duration::from_millis(50)).await,
                        s => bail!("subscribe answered {s}: {}", r.body),
                    }
                }
            }));
        }
        for t in tasks {
            ids.push(t.await??);
        }
    }
    Ok(ids)
}

async fn unsubscribe(c: &Arc<Cluster>, ids: &[String]) -> anyhow::Result<()> {
    let http = c.http(CONSUMER);
    let api = c.api_url(1);
    for chunk in ids.chunks(SUBSCRIBE_CONCURRENCY) {
        let mut tasks = vec![];
        for id in chunk {
            let (http, url) = (http.clone(), format!("{api}/Subscription/{id}"));
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    if let Ok(r) = reply(http.delete(&url)).await
                        && r.status == 200
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                bail!("{url} could not be deleted")
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(c: Arc<Cluster>, rx: &Receiver, a: &Args) -> anyhow::Result<()> {
    let n = a.subscriptions;
    let t = Instant::now();
    subscribe(&c, rx, 0, n).await?;
    println!("{n} subscriptions made in {:.1} s", t.elapsed().as_secs_f64());
    for &rate in &a.rates {
        // Each acknowledged create: (sent, acknowledged).
        let acked: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Arc::default();
        let before = rx.received().len();
        let http = c.http(PRODUCER);
        let ids = c.node_ids();
        let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_IN_FLIGHT_MAX));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let total = u64::from(rate) * a.seconds;
        let start = Instant::now();
        let mut refused = 0u64;
        let mut tasks = vec![];
        for k in 0..total {
            tick.tick().await;
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                refused += 1;
                continue;
            };
            let api = c.api_url(ids[k as usize % ids.len()]);
            let body = pointer_body(&patient((k % u64::from(n)) as u32), PRODUCER_ODS, &format!("lat-{rate}-{k}"));
            let (http, acked) = (http.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let r = create_pointer(&http, &api, &body).await;
                let at = Instant::now();
                drop(permit);
                if let Ok(r) = r
                    && r.status == 201
                {
                    acked.lock().unwrap().insert(r.body_id(), (sent, at));
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let offered = start.elapsed();
        let want = acked.lock().unwrap().len();
        // Wait for the notifications of every acknowledged create.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut arrived: HashMap<String, Instant> = HashMap::new();
        loop {
            arrived.clear();
            for r in &rx.received()[before..] {
                for (_, focus) in r.events() {
                    if let Some(f) = focus {
                        let id = f.rsplit('/').next().unwrap_or("").to_owned();
                        arrived.entry(id).or_insert(r.at);
                    }
                }
            }
            let all_arrived = acked.lock().unwrap().keys().all(|k| arrived.contains_key(k));
            if all_arrived || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let acked = acked.lock().unwrap();
        let mut lat: Vec<f64> = vec![];
        let mut from_sent: Vec<f64> = vec![];
        let mut create: Vec<f64> = acked.values().map(|(s, a)| (*a - *s).as_secs_f64() * 1000.0).collect();
        create.sort_by(f64::total_cmp);
        let mut before_ack = 0;
        for (id, (sent, at)) in acked.iter() {
            if let Some(got) = arrived.get(id) {
                from_sent.push(got.saturating_duration_since(*sent).as_secs_f64() * 1000.0);
                match got.checked_duration_since(*at) {
                    Some(d) => lat.push(d.as_secs_f64() * 1000.0),
                    None => {
                        before_ack += 1;
                        lat.push(0.0);
                    }
                }
            }
        }
        lat.sort_by(f64::total_cmp);
        from_sent.sort_by(f64::total_cmp);
        println!(
            "rate {rate}/s for {:.1} s: {} creates acknowledged ({:.0}/s), {} notified ({} before the producer's 201), not sent (in flight over {OPEN_LOOP_IN_FLIGHT_MAX}) {refused}; create acknowledged to receiver 2xx: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; create sent to receiver 2xx: p50 {:.1} ms, p99 {:.1} ms; the create itself: p50 {:.1} ms, p99 {:.1} ms",
            offered.as_secs_f64(),
            want,
            want as f64 / offered.as_secs_f64(),
            lat.len(),
            before_ack,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
            percentile(&from_sent, 0.5),
            percentile(&from_sent, 0.99),
            percentile(&create, 0.5),
            percentile(&create, 0.99),
        );
    }
    Ok(())
}

/// Creates/s with `connections` in flight for `seconds`, writing to `patients` patients.
async fn closed_loop(c: &Arc<Cluster>, tag: &str, patients: u32, a: &Args) -> anyhow::Result<f64> {
    let offset = if a.matching { 0 } else { UNSUBSCRIBED_PATIENTS_FROM };
    let stop = Instant::now() + Duration::from_secs(a.seconds);
    let start = Instant::now();
    let mut tasks = vec![];
    for w in 0..a.connections {
        let (c, tag) = (c.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let http = c.http(PRODUCER);
            let offset = offset;
            let ids = c.node_ids();
            let api = c.api_url(ids[w % ids.len()]);
            let mut ok = 0u64;
            let mut failures = 0;
            let mut k = w as u64;
            while Instant::now() < stop {
                let p = patient(offset + (k % u64::from(patients)) as u32);
                match create_pointer(&http, &api, &pointer_body(&p, PRODUCER_ODS, &format!("{tag}-{w}-{k}"))).await {
                    Ok(r) if r.status == 201 => ok += 1,
                    Ok(r) if failures < 3 => {
                        failures += 1;
                        eprintln!("a create answered {}: {}", r.status, r.body);
                    }
                    Err(e) if failures < 3 => {
                        failures += 1;
                        eprintln!("a create failed: {e:#}");
                    }
                    _ => {}
                }
                k += 64;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await?;
    }
    Ok(ok as f64 / start.elapsed().as_secs_f64())
}

async fn cost(c: Arc<Cluster>, rx: &Receiver, a: &Args) -> anyhow::Result<()> {
    let mut order = a.counts.clone();
    order.extend(a.counts.iter().rev());
    let mut held: Vec<String> = vec![];
    let mut results: HashMap<u32, Vec<f64>> = HashMap::new();
    for (round, &n) in order.iter().enumerate() {
        let have = held.len() as u32;
        if n > have {
            let t = Instant::now();
            held.extend(subscribe(&c, rx, have, n - have).await?);
            println!("  {} subscriptions made in {:.1} s", n - have, t.elapsed().as_secs_f64());
        } else if n < have {
            let gone = held.split_off(n as usize);
            unsubscribe(&c, &gone).await?;
        }
        let patients = if n == 0 { PATIENTS_WITHOUT_SUBSCRIPTIONS } else { n };
        let rate = closed_loop(&c, &format!("cost-{round}"), patients, a).await?;
        println!("round {round}: {n} subscriptions, {} in flight: {rate:.0} creates/s", a.connections);
        results.entry(n).or_default().push(rate);
    }
    let base = results.get(&0).map(|v| v.iter().sum::<f64>() / v.len() as f64);
    for &n in &a.counts {
        let v = &results[&n];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let vs = base.map_or(String::new(), |b| format!(", {:.3} of 0 subscriptions", mean / b));
        println!("{n} subscriptions: {mean:.0} creates/s (rounds {v:.0?}){vs}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let c = Arc::new(Cluster::up(&[
            "--patients",
            "0",
            "--rate-per-client-per-sec",
            "1000000",
            "--rate-burst",
            "1000000",
        ])?);
        c.wait_leader(Duration::from_secs(10)).await?;
        let certs = c.dir.path().join("certs");
        let rx = Receiver::start(&certs.join("ca.pem"), &certs.join("ca.key"), &c.dir.path().join("receiver"))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        match a.mode.as_str() {
            "latency" => latency(c.clone(), &rx, &a).await,
            "cost" => cost(c.clone(), &rx, &a).await,
            _ => bail!("{USAGE}"),
        }
    })
}
