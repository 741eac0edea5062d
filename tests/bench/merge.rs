//! `hie-merge-bench`: the cost of merging a patient with many pointers, on a
//! real 3-node dev cluster (separate processes, RocksDB on disk, libp2p,
//! HTTPS with mTLS). Creates `--pointers` pointers under one NHS Number and
//! one under another, merges the first into the second through a follower,
//! and reports the merge's round trip, how long until every node had
//! applied it, the Raft log entries (count and bytes) each node appended
//! while it ran (`hie_raft_log_entries_appended_total`, `hie_raft_log_entry_bytes_total`), and the search of each number after it.
//! Then checks that every pointer is under the survivor.
//!
//!   benches/merge.sh [--pointers N] [--rounds R]
//!
//! A merge is one command in one log entry that names the two numbers; the
//! pointers move when each node applies it, in one RocksDB write batch.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hie_tests::{Cluster, NHS_SYSTEM, Reply, create_pointer, nhs, pointer_body, reply};
use serde_json::{Value, json};

const USAGE: &str = "usage: hie-merge-bench [--pointers N] [--rounds R] [--connections C]";
const PRODUCER: &str = "gp-practice-a";
const PRODUCER_ODS: &str = "A81001";
const CONSUMER: &str = "ambulance-service";
const AUTHORITY: &str = "demographics-feed";
/// A search page's size at most (DESIGN.md: `_count` up to 100).
const PAGE: usize = 100;
/// Longer than a node takes to refresh its gauges from its counters (at
/// least every 500 ms), so /metrics shows what has been appended.
const METRICS_SETTLE: Duration = Duration::from_millis(1500);

struct Args {
    pointers: u32,
    rounds: u32,
    connections: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args { pointers: 10_000, rounds: 3, connections: 32 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--pointers" => a.pointers = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--connections" => a.connections = v.parse()?,
            _ => bail!("unknown argument {k}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// The node's log entries appended and their bytes, so far.
async fn log_appended(c: &Cluster, id: u64) -> anyhow::Result<(u64, u64)> {
    let text = c.metrics(id).await.context("metrics")?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("no {name} in /metrics"))
    };
    Ok((value("hie_raft_log_entries_appended_total")?, value("hie_raft_log_entry_bytes_total")?))
}

/// Creates `n` pointers under `patient`, `connections` at a time, waiting
/// out the rate limit (429 with Retry-After) where it applies.
async fn create_many(c: &Arc<Cluster>, patient: &str, tag: &str, n: u32, connections: u32) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU32::new(0));
    let mut tasks = vec![];
    for t in 0..connections {
        let (c, next, patient, tag) = (c.clone(), next.clone(), patient.to_owned(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let http = c.http(PRODUCER);
            let ids = c.node_ids();
            let api = c.api_url(ids[t as usize % ids.len()]);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let body = pointer_body(&patient, PRODUCER_ODS, &format!("urn:oid:2.25.{tag}.{i}"));
                loop {
                    let r = create_pointer(&http, &api, &body).await?;
                    match r.status {
                        201 => break,
                        429 | 503 => tokio::time::sleep(Duration::from_millis(200)).await,
                        s => bail!("create answered {s}: {}", r.body),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn merge(c: &Cluster, node: u64, retired: &str, survivor: &str) -> anyhow::Result<Reply> {
    let identifier = |v: &str| json!({ "system": NHS_SYSTEM, "value": v });
    let body = json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "source-patient-identifier", "valueIdentifier": identifier(retired) },
            { "name": "target-patient-identifier", "valueIdentifier": identifier(survivor) },
        ],
    });
    let req = c
        .http(AUTHORITY)
        .post(format!("{}/Patient/$merge", c.api_url(node)))
        .header("content-type", "application/fhir+json")
        .json(&body);
    reply(req).await
}

/// Every pointer found under `patient`, page by page, with the time taken.
async fn all_under(c: &Cluster, node: u64, patient: &str) -> anyhow::Result<(BTreeSet<String>, Duration, usize)> {
    let http = c.http(CONSUMER);
    let started = Instant::now();
    let q = [("subject:identifier", format!("{NHS_SYSTEM}|{patient}")), ("_count", PAGE.to_string())];
    let mut r = reply(http.get(format!("{}/DocumentReference", c.api_url(node))).query(&q)).await?;
    let mut found = BTreeSet::new();
    let mut pages = 0;
    loop {
        ensure!(r.status == 200, "search answered {}: {}", r.status, r.body);
        pages += 1;
        for e in r.body["entry"].as_array().into_iter().flatten() {
            if e["search"]["mode"] == "match"
                && let Some(id) = e["resource"]["id"].as_str()
            {
                found.insert(id.to_owned());
            }
        }
        let next = r.body["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next");
        match next.and_then(|l| l["url"].as_str()) {
            Some(url) => r = reply(http.get(url)).await?,
            None => break,
        }
    }
    Ok((found, started.elapsed(), pages))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // No rate limit: the bench measures the merge, not the limiter.
    let c =
        Arc::new(Cluster::up(&["--patients", "0", "--rate-per-client-per-sec", "1000000", "--rate-burst", "1000000"])?);
    let ids = c.node_ids();
    println!("merge bench: 3 nodes, {} pointers per merge, {} rounds", args.pointers, args.rounds);
    for round in 0..args.rounds {
        let (retired, survivor) = (nhs(8100 + 2 * round), nhs(8101 + 2 * round));
        let loaded = Instant::now();
        create_many(&c, &retired, &format!("{round}"), args.pointers, args.connections).await?;
        create_many(&c, &survivor, &format!("{round}s"), 1, 1).await?;
        let loaded = loaded.elapsed();
        c.wait_converged(&ids, Duration::from_secs(120)).await?;
        let leader = c.wait_leader(Duration::from_secs(15)).await?;
        let via = *ids.iter().find(|i| **i != leader).unwrap_or(&leader);
        tokio::time::sleep(METRICS_SETTLE).await;
        let mut before = vec![];
        for &id in &ids {
            before.push(log_appended(&c, id).await?);
        }

        let started = Instant::now();
        let r = merge(&c, via, &retired, &survivor).await?;
        let answered = started.elapsed();
        ensure!(r.status == 200, "merge answered {}: {}", r.status, r.body);
        c.wait_converged(&ids, Duration::from_secs(120)).await?;
        let everywhere = started.elapsed();

        // What each node appended while the merge ran: its entry, and any
        // other (a new leader's blank entry): so the largest is at most this.
        tokio::time::sleep(METRICS_SETTLE).await;
        let mut appended = vec![];
        for (&id, (entries, bytes)) in ids.iter().zip(&before) {
            let (e, b) = log_appended(&c, id).await?;
            appended.push((e - entries, b - bytes));
        }
        let (under_survivor, survivor_took, pages) = all_under(&c, via, &survivor).await?;
        let (under_retired, retired_took, _) = all_under(&c, via, &retired).await?;
        ensure!(
            under_survivor.len() == args.pointers as usize + 1,
            "{} pointers under the survivor, expected {}",
            under_survivor.len(),
            args.pointers + 1
        );
        ensure!(under_retired == under_survivor, "the retired number answers for the survivor");
        println!(
            "round {round}: {} pointers created in {:.1} s; merge via node {via} (leader {leader}): answered in {}, applied on every node in {}; \
             log entries appended meanwhile per node (entries, bytes) {appended:?}; \
             then every pointer under the survivor in {pages} pages ({}), under the retired number ({})",
            args.pointers,
            loaded.as_secs_f64(),
            ms(answered),
            ms(everywhere),
            ms(survivor_took),
            ms(retired_took),
        );
    }
    // One more pointer than a merge may move is refused whole.
    let max = u32::try_from(hie_domain::model::PatientEntry::MERGE_POINTERS_MAX).unwrap_or(u32::MAX);
    if args.pointers == max {
        let (retired, survivor) = (nhs(8900), nhs(8901));
        create_many(&c, &retired, "over", max + 1, args.connections).await?;
        let started = Instant::now();
        let r = merge(&c, ids[0], &retired, &survivor).await?;
        let v: &Value = &r.body;
        println!(
            "over the limit: {} pointers: merge answered {} {} in {}",
            max + 1,
            r.status,
            v["issue"][0]["details"]["coding"][0]["code"].as_str().unwrap_or(""),
            ms(started.elapsed())
        );
        ensure!(r.status == 422, "a merge of more than MERGE_POINTERS_MAX pointers is refused");
    }
    Ok(())
}
