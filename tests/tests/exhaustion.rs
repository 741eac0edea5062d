//! Connection exhaustion on real node processes: a flood of idle TCP
//! connections and slow TLS handshakes from one address leaves room for a
//! client with a certificate, and the node's memory stays bounded; one
//! organisation's connections are capped; idle, slow-header and old
//! connections are closed; the admin listener scans one at a time and
//! answers cross-origin only to the members' own status pages.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hie_tests::*;

/// The flood: idle TCP connections and slow TLS handshakes, each
/// reconnected [`FLOOD_RECONNECT_DELAY`] after the node closes it.
const FLOOD_IDLE_CONNECTIONS: usize = 2_000;
const FLOOD_SLOW_HANDSHAKES: usize = 2_000;
/// Where the flood comes from; the client with a certificate calls from
/// 127.0.0.1.
const FLOOD_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FLOOD_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// A slow handshake sends one more byte of its ClientHello this often.
const SLOW_HANDSHAKE_BYTE_INTERVAL: Duration = Duration::from_millis(500);
/// How long the flood runs before the client starts, and then with it.
const FLOOD_WARM_UP: Duration = Duration::from_secs(3);
const FLOOD_MEASURED: Duration = Duration::from_secs(15);
/// The client's own timeout on each request (the node's request_timeout_ms).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The node's resident memory may grow by at most this much during the flood.
const FLOOD_RSS_GROWTH_MAX_BYTES: u64 = 64 << 20;

/// The sum of a metric's series whose name and labels start with `series`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            name.starts_with(series).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A node's `[api]` setting from its generated config.
fn api_setting(c: &Cluster, id: u64, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(c.dir.path().join(format!("node-{id}.toml")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('=')?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{key} not in node-{id}.toml"))
}

/// Rewrites `[api]` settings of a node's config (the node reads it at start).
fn set_api(c: &Cluster, id: u64, settings: &[(&str, u64)]) -> anyhow::Result<()> {
    let path = c.dir.path().join(format!("node-{id}.toml"));
    let mut text = std::fs::read_to_string(&path)?;
    for (key, value) in settings {
        let line = text
            .lines()
            .find(|l| l.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
            .ok_or_else(|| anyhow::anyhow!("{key} not in {}", path.display()))?
            .to_owned();
        text = text.replace(&line, &format!("{key} = {value}"));
    }
    std::fs::write(&path, text)?;
    Ok(())
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn open_files_max() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn api_addr(c: &Cluster, id: u64) -> SocketAddr {
    c.api_url(id).trim_start_matches("https://").split('/').next().unwrap().parse().expect("api address")
}

#[derive(Default)]
struct FloodStats {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    closed_by_node: AtomicU64,
}

/// One flood connection: connect from [`FLOOD_ADDRESS`], hold the connection
/// (sending nothing, or a ClientHello a byte at a time) until the node
/// closes it, wait, and again, until `stop` (or until aborted).
async fn flood_one(target: SocketAddr, slow_handshake: bool, stats: Arc<FloodStats>, stop: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A TLS handshake record announcing 512 bytes, then a ClientHello's first bytes.
    const CLIENT_HELLO_START: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    while !stop.load(Ordering::Relaxed) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(IpAddr::V4(FLOOD_ADDRESS), 0)).expect("bind the flood address");
        let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await else {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(FLOOD_RECONNECT_DELAY).await;
            continue;
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        let mut sent = 0;
        let mut buf = [0u8; 256];
        let mut tick = tokio::time::interval(SLOW_HANDSHAKE_BYTE_INTERVAL);
        loop {
            tokio::select! {
                r = tcp.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) {
                    stats.closed_by_node.fetch_add(1, Ordering::Relaxed);
                    break;
                },
                _ = tick.tick(), if slow_handshake => {
                    let byte = CLIENT_HELLO_START.get(sent).copied().unwrap_or(0);
                    sent += 1;
                    if tcp.write_all(&[byte]).await.is_err() {
                        stats.closed_by_node.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
            }
        }
        tokio::time::sleep(FLOOD_RECONNECT_DELAY).await;
    }
}

/// 2,000 idle TCP connections and 2,000 slow TLS handshakes from one address,
/// each reopened a second after the node closes it: a client with a
/// certificate, opening a new connection for every request, is answered
/// within its timeout throughout, the flood holds no more than its address's
/// handshake slots, and the node's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_a_flood_from_one_address_leaves_room_for_a_client_with_a_certificate() -> anyhow::Result<()> {
    let files = open_files_max();
    anyhow::ensure!(
        files > (FLOOD_IDLE_CONNECTIONS + FLOOD_SLOW_HANDSHAKES + 500) as u64,
        "the test needs more open files than {files} (ulimit -n)"
    );
    let c = Cluster::up(&["--patients", "20"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let node = 1;
    let pid = c.pid(node).ok_or_else(|| anyhow::anyhow!("node {node} not running"))?;
    let handshakes_max = api_setting(&c, node, "handshakes_per_address_max")?;
    let entry = c.client_entry("ambulance-service");
    let tls = hie_pki::client_config(
        Path::new(c.file["ca_cert"].as_str().unwrap()),
        Some((Path::new(entry["cert"].as_str().unwrap()), Path::new(entry["key"].as_str().unwrap()))),
    )?;
    // No connection kept: every request is a new connection, admitted during the flood.
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(0)
        .timeout(CLIENT_TIMEOUT)
        .build()?;
    let api = c.api_url(node);
    let patient = nhs(1);
    let before = search(&client, &api, &patient, &[]).await?;
    assert_eq!(before.status, 200, "{}", before.body);
    let rss_before = rss_bytes(pid).unwrap_or(0);

    let stats = Arc::new(FloodStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let target = api_addr(&c, node);
    let mut flood = Vec::new();
    for i in 0..FLOOD_IDLE_CONNECTIONS + FLOOD_SLOW_HANDSHAKES {
        flood.push(tokio::spawn(flood_one(target, i >= FLOOD_IDLE_CONNECTIONS, stats.clone(), stop.clone())));
    }
    let started = Instant::now();
    let mut rss_peak = rss_before;
    let mut handshakes_peak = 0.0f64;
    while started.elapsed() < FLOOD_WARM_UP {
        rss_peak = rss_peak.max(rss_bytes(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let measured = Instant::now();
    while measured.elapsed() < FLOOD_MEASURED {
        let t = Instant::now();
        match search(&client, &api, &patient, &[]).await {
            Ok(r) if r.status == 200 => latencies.push(t.elapsed()),
            Ok(r) => failures.push(format!("status {} after {:?}: {}", r.status, t.elapsed(), r.body)),
            // Without the URL: it names the patient.
            Err(e) => failures.push(match e.downcast::<reqwest::Error>() {
                Ok(e) => format!("{:#} after {:?}", anyhow::Error::from(e.without_url()), t.elapsed()),
                Err(e) => format!("{e:#} after {:?}", t.elapsed()),
            }),
        }
        rss_peak = rss_peak.max(rss_bytes(pid).unwrap_or(0));
        if let Some(m) = c.metrics(node).await {
            handshakes_peak = handshakes_peak.max(metric(&m, "hie_api_connections{state=\"handshake\"}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let flood_secs = started.elapsed().as_secs_f64();
    for f in flood {
        f.abort();
    }
    let m = c.metrics(node).await.unwrap_or_default();
    let refused = metric(&m, "hie_api_connections_refused_total{reason=\"address_handshakes\"}");
    let timed_out = metric(&m, "hie_api_connections_closed_total{reason=\"handshake_timeout\"}");
    let connects = stats.connects.load(Ordering::Relaxed);
    latencies.sort();
    let worst = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "flood from {FLOOD_ADDRESS}: {connects} connections in {flood_secs:.1} s ({:.0}/s; {} closed by the node, {} connects failed); \
         node refused {refused} (address_handshakes), timed out {timed_out} handshakes; handshakes held at most {handshakes_peak}; \
         client: {} answered, worst {worst:?}, median {:?}; node RSS {:.1} MiB before, peak {:.1} MiB during the flood (+{:.1} MiB)",
        connects as f64 / flood_secs,
        stats.closed_by_node.load(Ordering::Relaxed),
        stats.connect_errors.load(Ordering::Relaxed),
        latencies.len(),
        latencies.get(latencies.len() / 2).copied().unwrap_or_default(),
        rss_before as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0,
        rss_peak.saturating_sub(rss_before) as f64 / 1048576.0,
    );
    assert!(failures.is_empty(), "the client with a certificate was not answered: {failures:?}");
    assert!(latencies.len() >= 20, "the client made {} requests", latencies.len());
    assert!(worst < CLIENT_TIMEOUT, "{worst:?}");
    assert!(connects > (FLOOD_IDLE_CONNECTIONS + FLOOD_SLOW_HANDSHAKES) as u64, "the flood connected {connects} times");
    assert!(refused > 0.0, "the flood's address was refused handshake slots:\n{m}");
    assert!(timed_out > 0.0, "slow handshakes timed out:\n{m}");
    // The flood's address and the client's own handshake.
    assert!(handshakes_peak <= (handshakes_max + 1) as f64, "handshakes held: {handshakes_peak}");
    let growth = rss_peak.saturating_sub(rss_before);
    assert!(
        growth < FLOOD_RSS_GROWTH_MAX_BYTES,
        "node memory grew by {growth} bytes during the flood (at most {FLOOD_RSS_GROWTH_MAX_BYTES})"
    );
    // Every slot the flood held is given back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.metrics(node).await.unwrap_or_default();
        let held = metric(&m, "hie_api_connections{state=\"handshake\"}");
        if held == 0.0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "handshake slots still held after the flood: {held}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// An HTTP/1.1 connection over TLS with a client certificate, blocking.
struct Conn {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Conn {
    fn open(c: &Cluster, id: u64, client: &str) -> anyhow::Result<Conn> {
        let entry = c.client_entry(client);
        let mut config = hie_pki::client_config(
            Path::new(c.file["ca_cert"].as_str().unwrap()),
            Some((Path::new(entry["cert"].as_str().unwrap()), Path::new(entry["key"].as_str().unwrap()))),
        )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = api_addr(c, id);
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Conn { tls: rustls::StreamOwned::new(conn, tcp) })
    }

    /// One GET; the status, or an error if the connection is closed.
    fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        self.tls.write_all(format!("GET {path} HTTP/1.1\r\nhost: hie\r\n\r\n").as_bytes())?;
        self.tls.flush()?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            anyhow::ensure!(self.tls.read(&mut byte)? == 1, "connection closed");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        self.tls.read_exact(&mut body)?;
        Ok(status)
    }

    /// Sends `bytes` and waits for the node to close the connection; how long that took.
    fn wait_closed(&mut self, bytes: &[u8]) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.tls.write_all(bytes)?;
        self.tls.flush()?;
        let mut buf = [0u8; 1024];
        loop {
            match self.tls.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(t.elapsed()),
                Ok(_) => {}
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "the node did not close the connection");
        }
    }
}

fn within(d: Duration, low_ms: u64, high_ms: u64) -> bool {
    d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
}

/// With small limits on node 1: one organisation holds at most its
/// connections (another is not affected, and a slot closed is free again); a
/// connection that sends nothing is closed when idle, one that never
/// finishes its request head at the header-read timeout, and one in steady
/// use at its maximum age. Each is counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_organisation_cap_and_connection_timeouts() -> anyhow::Result<()> {
    const PER_ORGANISATION: u64 = 3;
    const HEADER_READ_MS: u64 = 1_000;
    const IDLE_MS: u64 = 2_500;
    const AGE_MS: u64 = 6_000;
    let c = Cluster::up(&["--patients", "5"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let node = 1;
    c.kill9(node);
    set_api(
        &c,
        node,
        &[
            ("connections_per_organisation_max", PER_ORGANISATION),
            ("header_read_timeout_ms", HEADER_READ_MS),
            ("idle_timeout_ms", IDLE_MS),
            ("connection_age_max_ms", AGE_MS),
        ],
    )?;
    c.restart(node)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Conn::open(&c, node, "ambulance-service").and_then(|mut k| k.get("/fhir/metadata")).ok() != Some(200) {
        anyhow::ensure!(Instant::now() < deadline, "node {node} did not come back:\n{}", c.logs_tail(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One organisation's connections: the next is closed after TLS; another organisation is served.
    let mut held = Vec::new();
    for _ in 0..PER_ORGANISATION {
        let mut k = Conn::open(&c, node, "gp-practice-a")?;
        assert_eq!(k.get("/fhir/metadata")?, 200);
        held.push(k);
    }
    let mut over = Conn::open(&c, node, "gp-practice-a")?;
    assert!(over.get("/fhir/metadata").is_err(), "a connection over the organisation's limit is closed");
    assert_eq!(Conn::open(&c, node, "ambulance-service")?.get("/fhir/metadata")?, 200, "another organisation");
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(Conn::open(&c, node, "gp-practice-a")?.get("/fhir/metadata")?, 200, "a slot given back");
    drop(held);

    // Idle after TLS: closed at the idle timeout.
    let idle = Conn::open(&c, node, "ambulance-service")?.wait_closed(b"")?;
    assert!(within(idle, IDLE_MS - 200, IDLE_MS + 3_000), "idle connection closed after {idle:?}");
    // A request head never finished: closed at the header-read timeout.
    let slow =
        Conn::open(&c, node, "ambulance-service")?.wait_closed(b"GET /fhir/metadata HTTP/1.1\r\nhost: hie\r\n")?;
    assert!(within(slow, HEADER_READ_MS - 200, IDLE_MS - 200), "slow header closed after {slow:?}");
    // In steady use: closed at its maximum age, between two requests.
    let mut busy = Conn::open(&c, node, "ambulance-service")?;
    let opened = Instant::now();
    let mut answered = 0;
    while busy.get("/fhir/metadata").is_ok_and(|s| s == 200) {
        answered += 1;
        anyhow::ensure!(opened.elapsed() < Duration::from_millis(AGE_MS + 5_000), "never closed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let age = opened.elapsed();
    assert!(within(age, AGE_MS - 200, AGE_MS + 3_000), "busy connection closed after {age:?} ({answered} answers)");

    let m = c.metrics(node).await.unwrap_or_default();
    for series in [
        "hie_api_connections_refused_total{reason=\"organisation_connections\"}",
        "hie_api_connections_closed_total{reason=\"idle\"}",
        "hie_api_connections_closed_total{reason=\"header_read_timeout\"}",
        "hie_api_connections_closed_total{reason=\"age_max\"}",
    ] {
        assert!(metric(&m, series) >= 1.0, "{series} not counted:\n{m}");
    }
    eprintln!("closed: idle after {idle:?}, slow header after {slow:?}, in use after {age:?} ({answered} answers)");
    Ok(())
}

/// The admin listener runs one scan of the state at a time (others are
/// told to come back, and health checks are answered meanwhile), and lets
/// only the members' own status pages read it cross-origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_admin_scans_one_at_a_time_and_no_wildcard_cors() -> anyhow::Result<()> {
    const SCANNERS: usize = 16;
    const SCAN_FOR: Duration = Duration::from_secs(3);
    let c = Cluster::up(&["--patients", "500"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let admin = c.admin_url(1);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;

    let ok = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let mut scanners = Vec::new();
    for _ in 0..SCANNERS {
        let (http, url, ok, busy) = (http.clone(), format!("{admin}/digest"), ok.clone(), busy.clone());
        scanners.push(tokio::spawn(async move {
            let t = Instant::now();
            while t.elapsed() < SCAN_FOR {
                let r = http.get(&url).send().await.expect("digest answered");
                match r.status().as_u16() {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    503 => {
                        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
                        busy.fetch_add(1, Ordering::Relaxed)
                    }
                    s => panic!("digest answered {s}"),
                };
            }
        }));
    }
    let mut health_worst = Duration::ZERO;
    let t = Instant::now();
    while t.elapsed() < SCAN_FOR {
        let h = Instant::now();
        assert!(http.get(format!("{admin}/healthz")).send().await?.status().is_success());
        health_worst = health_worst.max(h.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in scanners {
        s.await?;
    }
    let (ok, busy) = (ok.load(Ordering::Relaxed), busy.load(Ordering::Relaxed));
    eprintln!("digests: {ok} answered, {busy} told to come back; /healthz worst {health_worst:?}");
    assert!(ok > 0 && busy > 0, "{ok} answered, {busy} refused: scans run one at a time");
    assert!(health_worst < Duration::from_secs(1), "{health_worst:?}");

    let status = |origin: Option<String>| {
        let mut r = http.get(format!("{admin}/status"));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        async move { r.send().await }
    };
    let r = status(Some("http://evil.example".to_owned())).await?;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());
    assert!(status(None).await?.headers().get("access-control-allow-origin").is_none());
    let member = c.admin_url(2).trim_end_matches('/').to_owned();
    let r = status(Some(member.clone())).await?;
    assert_eq!(r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some(member.as_str()));
    assert!(r.headers().get_all("vary").iter().any(|v| v.to_str().is_ok_and(|v| v.contains("origin"))));
    Ok(())
}
