//! `hie bench`: the load generator. HTTPS with client certificates and
//! keep-alive, one TLS connection per simulated client, closed loop (each
//! connection sends its next request when the last is answered) or open
//! loop (requests are due at a fixed rate whatever the answers; latency is
//! counted from when a request was due, so queueing is not hidden), with
//! HDR-histogram latencies.
//!
//! The same generator drives etcd (`--target etcd`) through its v3 JSON
//! gateway, so both systems see the same client, connections and TLS.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use hie_domain::mem::testkit;
use rand::Rng;
use serde_json::json;

use crate::client::ClusterFile;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Create a pointer (a replicated, fsynced write).
    Create,
    /// Search a patient's pointers on the node called (a local read).
    Search,
    /// Search with X-HIE-Consistency: linearizable (the leader's read index).
    Linearizable,
    /// 90% searches, 10% creates.
    Mix,
    /// Write one record per patient 0..patients, then stop (etcd preload).
    Preload,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    Hie,
    Etcd,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to run against: a hie dev cluster or an etcd cluster.
    #[arg(long, value_enum, default_value = "hie")]
    target: TargetKind,
    /// The hie dev cluster's cluster.json (its CA and client certificates are
    /// also used for etcd when --etcd-endpoints are https).
    #[arg(long, default_value = ".hie-dev/cluster.json")]
    cluster: PathBuf,
    /// etcd client URLs, comma separated (with --target etcd).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// What each request does.
    #[arg(long, value_enum, default_value = "search")]
    workload: Workload,
    /// Concurrent connections (each its own TLS session, kept alive).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// Open loop: requests due per second in total. Without it: closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Patients searched and written are 0..patients of the sample data.
    #[arg(long, default_value_t = 1000)]
    patients: u32,
    /// Only these node ids (default: every node; connections spread over them).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<u64>,
    /// Print one JSON line of results as well.
    #[arg(long)]
    json: bool,
    /// Runtime worker threads for the generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Open loop: requests due but not yet sent, at most.
const OPEN_LOOP_BACKLOG_MAX: usize = 1 << 20;
/// Per-request timeout of the generator's clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies recorded up to this (µs); longer ones are clamped to it.
const LATENCY_MAX_MICROS: u64 = 60_000_000;

struct Endpoint {
    http: reqwest::Client,
    base: String,
}

fn client(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<reqwest::Client> {
    let tls = hie_pki::client_config(ca, Some((cert, key)))?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// One connection's endpoints: (reader client, writer client) on one node.
fn endpoints(args: &BenchArgs, cluster: &ClusterFile) -> anyhow::Result<Vec<(Endpoint, Endpoint)>> {
    let consumer = cluster.client_with_role("consumer").context("no consumer client in cluster.json")?;
    let producer = cluster.clients.iter().find(|c| c.is("producer")).context("no producer in cluster.json")?;
    let bases: Vec<String> = match args.target {
        TargetKind::Hie => cluster
            .nodes
            .iter()
            .filter(|n| args.nodes.is_empty() || args.nodes.contains(&n.id))
            .map(|n| n.api_url.clone())
            .collect(),
        TargetKind::Etcd => args.etcd_endpoints.iter().map(|e| e.trim_end_matches('/').to_owned()).collect(),
    };
    if bases.is_empty() {
        bail!("no endpoints to call");
    }
    (0..args.connections)
        .map(|i| {
            let base = bases[i % bases.len()].clone();
            Ok((
                Endpoint { http: client(&cluster.ca_cert, &consumer.cert, &consumer.key)?, base: base.clone() },
                Endpoint { http: client(&cluster.ca_cert, &producer.cert, &producer.key)?, base },
            ))
        })
        .collect()
}

/// The producer's ODS code, for the custodian of created pointers.
fn producer_ods(cluster: &ClusterFile) -> String {
    cluster.clients.iter().find(|c| c.is("producer")).map(|c| c.ods.clone()).unwrap_or_default()
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Read { linearizable: bool },
}

struct Shared {
    workload: Workload,
    target: TargetKind,
    patients: u32,
    ods: String,
    run: String,
    counter: AtomicU64,
}

/// Sends one operation; Ok(true) when the answer was a success.
async fn send(shared: &Shared, conn: &(Endpoint, Endpoint), op: Op, patient: u32) -> anyhow::Result<bool> {
    let nhs = testkit::nhs(patient);
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let resp = match (shared.target, op) {
        (TargetKind::Hie, Op::Create) => {
            let master = format!("bench-{}-{n}", shared.run);
            let mut doc =
                crate::dev::sample_pointer(nhs.as_str(), &shared.ods, testkit::MENTAL_HEALTH_CRISIS_PLAN, patient);
            doc["masterIdentifier"]["value"] = json!(master);
            let w = &conn.1;
            w.http
                .post(format!("{}/DocumentReference", w.base))
                .header("content-type", "application/fhir+json")
                .header("prefer", "return=minimal")
                .json(&doc)
                .send()
                .await?
        }
        (TargetKind::Hie, Op::Read { linearizable }) => {
            let r = &conn.0;
            let mut req = r
                .http
                .get(format!("{}/DocumentReference", r.base))
                .query(&[("subject:identifier", format!("https://fhir.nhs.uk/Id/nhs-number|{}", nhs.as_str()))]);
            if linearizable {
                req = req.header("x-hie-consistency", "linearizable");
            }
            req.send().await?
        }
        (TargetKind::Etcd, Op::Create) => {
            // A value the size of a pointer: the same DocumentReference JSON.
            let doc =
                crate::dev::sample_pointer(nhs.as_str(), &shared.ods, testkit::MENTAL_HEALTH_CRISIS_PLAN, patient);
            let key = if shared.workload == Workload::Preload {
                format!("/bench/patient/{}", nhs.as_str())
            } else {
                format!("/bench/patient/{}/{}-{n}", nhs.as_str(), shared.run)
            };
            let body = json!({ "key": b64(key.as_bytes()), "value": b64(doc.to_string().as_bytes()) });
            let w = &conn.1;
            w.http.post(format!("{}/v3/kv/put", w.base)).json(&body).send().await?
        }
        (TargetKind::Etcd, Op::Read { linearizable }) => {
            let key = format!("/bench/patient/{}", nhs.as_str());
            let body = json!({ "key": b64(key.as_bytes()), "serializable": !linearizable });
            let r = &conn.0;
            r.http.post(format!("{}/v3/kv/range", r.base)).json(&body).send().await?
        }
    };
    let ok = resp.status().is_success();
    // Read the whole answer, as a client would.
    let _ = resp.bytes().await?;
    Ok(ok)
}

fn pick(workload: Workload, rng: &mut impl Rng) -> Op {
    match workload {
        Workload::Create | Workload::Preload => Op::Create,
        Workload::Search => Op::Read { linearizable: false },
        Workload::Linearizable => Op::Read { linearizable: true },
        Workload::Mix => {
            if rng.random_range(0..10) == 0 {
                Op::Create
            } else {
                Op::Read { linearizable: false }
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    ok: u64,
    failed: u64,
}

pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(&args.cluster)?;
    if args.target == TargetKind::Etcd && args.etcd_endpoints.is_empty() {
        bail!("--target etcd needs --etcd-endpoints");
    }
    if args.patients == 0 {
        bail!("--patients must be 1 or more");
    }
    let conns: Vec<Arc<(Endpoint, Endpoint)>> = endpoints(&args, &cluster)?.into_iter().map(Arc::new).collect();
    let shared = Arc::new(Shared {
        workload: args.workload,
        target: args.target,
        patients: args.patients,
        ods: producer_ods(&cluster),
        run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        counter: AtomicU64::new(0),
    });

    if args.workload == Workload::Preload {
        return preload(&args, shared, conns).await;
    }

    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let measured = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measured;

    // Open loop: a dispatcher hands out the times requests are due.
    let (due_tx, due_rx) = async_channel::bounded::<Instant>(OPEN_LOOP_BACKLOG_MAX);
    let dropped = Arc::new(AtomicU64::new(0));
    if let Some(rate) = args.rate {
        let dropped = dropped.clone();
        if rate == 0 {
            bail!("--rate must be above 0");
        }
        tokio::spawn(async move {
            let mut k: u64 = 0;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                // Every request due by now, then sleep a little.
                loop {
                    let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                    if due > now {
                        break;
                    }
                    // A backlog beyond the limit is counted and reported,
                    // not queued without bound.
                    if due_tx.try_send(due).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    k += 1;
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            due_tx.close();
        });
    } else {
        drop(due_tx);
    }

    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        let shared = shared.clone();
        let due_rx = due_rx.clone();
        let open = args.rate.is_some();
        let workload = args.workload;
        tasks.spawn(async move {
            let mut tally = Tally {
                hist: Some(Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("histogram bounds")),
                ..Tally::default()
            };
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
            loop {
                let began = if open {
                    match due_rx.recv().await {
                        Ok(due) => due,
                        Err(_) => break,
                    }
                } else {
                    Instant::now()
                };
                if began >= end {
                    break;
                }
                let op = pick(workload, &mut rng);
                let patient = rng.random_range(0..shared.patients);
                let ok = send(&shared, &conn, op, patient).await.unwrap_or(false);
                let done = Instant::now();
                if began >= measure_from && done <= end + Duration::from_secs(1) {
                    let micros = (done - began).as_micros() as u64;
                    let h = tally.hist.as_mut().expect("histogram");
                    let _ = h.record(micros.clamp(1, LATENCY_MAX_MICROS));
                    if ok {
                        tally.ok += 1;
                    } else {
                        tally.failed += 1;
                    }
                }
            }
            tally
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_MICROS, 3)?;
    let (mut ok, mut failed) = (0u64, 0u64);
    while let Some(t) = tasks.join_next().await {
        let t = t?;
        hist.add(t.hist.as_ref().expect("histogram"))?;
        ok += t.ok;
        failed += t.failed;
    }
    let secs = measured.as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let mode = match args.rate {
        Some(r) => format!("open loop at {r}/s"),
        None => "closed loop".into(),
    };
    println!(
        "{:?} {:?}: {} connections, {mode}, {:.1} s measured after {:.1} s warm-up",
        args.target, args.workload, args.connections, secs, args.warmup_seconds
    );
    println!("  ops {ok} ok, {failed} failed: {:.1} ok/s", ok as f64 / secs);
    let dropped = dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        println!("  {dropped} requests fell due beyond a backlog of {OPEN_LOOP_BACKLOG_MAX} and were never sent");
    }
    println!(
        "  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
    if args.json {
        println!(
            "{}",
            json!({
                "target": format!("{:?}", args.target).to_lowercase(),
                "workload": format!("{:?}", args.workload).to_lowercase(),
                "connections": args.connections,
                "rate": args.rate,
                "seconds": secs,
                "ok": ok,
                "failed": failed,
                "throughput": ok as f64 / secs,
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "p999_ms": ms(0.999),
                "max_ms": hist.max() as f64 / 1000.0,
            })
        );
    }
    if ok == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}

/// One write per patient, spread over the connections.
async fn preload(args: &BenchArgs, shared: Arc<Shared>, conns: Vec<Arc<(Endpoint, Endpoint)>>) -> anyhow::Result<()> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        let (shared, next, failed) = (shared.clone(), next.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= u64::from(shared.patients) {
                    break;
                }
                if !send(&shared, &conn, Op::Create, i as u32).await.unwrap_or(false) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    let failed = failed.load(Ordering::Relaxed);
    println!("preloaded {} records in {:.1} s ({failed} failed)", args.patients, started.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} preload writes failed");
    }
    Ok(())
}
