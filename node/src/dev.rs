//! `hie dev`: a local multi-region cluster on loopback, with a dev CA, node
//! and client certificates, sample data and `cluster.json`.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hie_domain::mem::testkit;
use hie_domain::{OdsCode, Role};
use hie_pki::DevCa;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::client::{Api, ClientEntry, ClusterFile, NodeEntry, operator_call};
use crate::config::{
    AdminSection, ApiSection, AuditSection, ClusterSection, Config, LogSection, Member, NodeSection, P2pSection,
    RaftSection, SeedPeer, SubscriptionsSection,
};

#[derive(Args, Debug)]
pub struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCmd>,
    #[command(flatten)]
    up: UpArgs,
}

#[derive(Subcommand, Debug)]
enum DevCmd {
    /// Start the cluster in the background and return once every node is ready.
    Up(UpArgs),
    /// Stop exactly the node processes of the cluster (by their pid files).
    Down(DirArg),
    /// Start one more region and add it as a learner (`--voter` promotes it once caught up).
    AddNode(AddNodeArgs),
    /// Revoke a dev client's certificate: add it to the dev CA's CRL, which
    /// every node reads again within 2 s (no restart; connections already
    /// open are refused from their next request).
    Revoke(RevokeArgs),
}

#[derive(Args, Debug, Clone)]
struct RevokeArgs {
    /// The client's name in cluster.json (e.g. gp-practice-a).
    client: String,
    /// The cluster's directory.
    #[arg(long, default_value = ".hie-dev")]
    dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct DirArg {
    /// The cluster's directory.
    #[arg(long, default_value = ".hie-dev")]
    dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct UpArgs {
    /// The cluster's directory (certificates, configs, data, cluster.json).
    #[arg(long, default_value = ".hie-dev")]
    dir: PathBuf,
    /// Voting regions.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Extra non-voting regions.
    #[arg(long, default_value_t = 0)]
    learners: u64,
    /// Synthetic patients to create (each with pointers from one or more organisations).
    #[arg(long, default_value_t = 1000)]
    patients: u32,
    /// The synthetic pointers' shape: `minimal` (NRL's required elements,
    /// about 600 bytes of JSON) or `nrlf` (every element of NRLF's sample
    /// pointers, about 2.3 KB).
    #[arg(long, default_value = "minimal", value_parser = ["minimal", "nrlf"])]
    sample: String,
    /// Raft snapshot threshold for the dev nodes (entries since the last snapshot).
    #[arg(long)]
    snapshot_logs_since_last: Option<u64>,
    /// Requests per second each client organisation may make (api.rate_per_client_per_sec).
    #[arg(long)]
    rate_per_client_per_sec: Option<u32>,
    /// Burst above that rate (api.rate_burst).
    #[arg(long)]
    rate_burst: Option<u32>,
    /// Run the nodes without an audit log (audit.enabled = false): only to
    /// measure what auditing costs.
    #[arg(long)]
    no_audit: bool,
    /// Run node N inside the existing network namespace `<PREFIX>N`, at
    /// 10.77.0.N (the fault harness, tests/faults/run.sh, creates them).
    #[arg(long, value_name = "PREFIX")]
    netns: Option<String>,
}

/// Where the fault harness's namespaces put node N: 10.77.0.N.
const NETNS_SUBNET: [u8; 3] = [10, 77, 0];
/// Ports inside a node's own namespace (nothing else listens there).
const NETNS_PORTS: (u16, u16, u16) = (8443, 9100, 7000);

/// Settings `hie dev up` passes to every node it configures.
#[derive(Debug, Clone, Copy, Default)]
struct Tuning {
    snapshot_logs_since_last: Option<u64>,
    rate_per_client_per_sec: Option<u32>,
    rate_burst: Option<u32>,
    no_audit: bool,
}

impl UpArgs {
    fn tuning(&self) -> Tuning {
        Tuning {
            snapshot_logs_since_last: self.snapshot_logs_since_last,
            rate_per_client_per_sec: self.rate_per_client_per_sec,
            rate_burst: self.rate_burst,
            no_audit: self.no_audit,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct AddNodeArgs {
    /// The cluster's directory.
    #[arg(long, default_value = ".hie-dev")]
    dir: PathBuf,
    /// The new node's region.
    #[arg(long)]
    region: String,
    /// Promote the new node to voter once it has caught up.
    #[arg(long)]
    voter: bool,
    /// Start the new node from this backup (`hie cluster backup`) instead of empty.
    #[arg(long)]
    restore_from: Option<PathBuf>,
    /// The key of that backup (default: the cluster's, <dir>/backup.key).
    #[arg(long, requires = "restore_from")]
    key_file: Option<PathBuf>,
}

/// The dev cluster's backup key, in its directory.
const BACKUP_KEY: &str = "backup.key";

/// Regions used for dev nodes, in order.
const REGIONS: &[&str] = &[
    "north-east",
    "north-west",
    "yorkshire",
    "midlands",
    "east",
    "london",
    "south-east",
    "south-west",
    "cumbria",
    "kent",
];
/// How long `hie dev up` waits for every node to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `hie dev down` waits for a node to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts to find a loopback port not yet handed out.
const FREE_PORT_TRIES: usize = 100;
/// How long `add-node` waits on each node's API port to find one that is up.
const LIVE_NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Batch Bundles in flight while seeding sample data.
const SEED_BUNDLES_IN_FLIGHT: usize = 4;
/// Pointers in each batch Bundle while seeding.
const SEED_BUNDLE_ENTRIES: usize = 500;

struct DevClient {
    name: &'static str,
    ods: &'static str,
    roles: &'static [Role],
    /// Which pointer types its registry entry names.
    types: DevTypes,
    permissions: &'static [&'static str],
    /// The local identifier system it assigns (producers).
    identifier_system: Option<&'static str>,
}

enum DevTypes {
    /// None: not a producer, or a consumer of every type.
    None,
    /// A producer of every registered type.
    All,
    /// A consumer of these types only.
    Only(&'static [&'static str]),
}

const CLIENTS: &[DevClient] = &[
    DevClient {
        name: "gp-practice-a",
        ods: "A81001",
        roles: &[Role::Producer],
        types: DevTypes::All,
        permissions: &[],
        identifier_system: Some("https://a81001.example.nhs.uk/Id/patient-number"),
    },
    DevClient {
        name: "mental-health-trust",
        ods: "RV3",
        roles: &[Role::Producer],
        types: DevTypes::All,
        permissions: &["migration"],
        identifier_system: Some("https://rv3.example.nhs.uk/Id/mrn"),
    },
    DevClient {
        name: "ambulance-service",
        ods: "RX9",
        roles: &[Role::Consumer],
        types: DevTypes::None,
        permissions: &["break-glass"],
        identifier_system: None,
    },
    DevClient {
        name: "out-of-hours-111",
        ods: "NLO10",
        roles: &[Role::Consumer],
        types: DevTypes::Only(&[testkit::MENTAL_HEALTH_CRISIS_PLAN]),
        permissions: &["break-glass"],
        identifier_system: None,
    },
    DevClient {
        name: "consent-authority",
        ods: "X26",
        roles: &[Role::ConsentAuthority],
        types: DevTypes::None,
        permissions: &[],
        identifier_system: None,
    },
    DevClient {
        name: "patient-app",
        ods: "X27",
        roles: &[Role::PatientAccess],
        types: DevTypes::None,
        permissions: &[],
        identifier_system: None,
    },
    DevClient {
        name: "demographics-feed",
        ods: "X28",
        roles: &[Role::IdentityAuthority],
        types: DevTypes::None,
        permissions: &[],
        identifier_system: None,
    },
    DevClient {
        name: "operator",
        ods: "X26OPS",
        roles: &[Role::Operator],
        types: DevTypes::None,
        permissions: &[],
        identifier_system: None,
    },
];

pub fn main(args: DevArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.command {
        Some(DevCmd::Up(up)) => rt.block_on(up_cmd(up)).map(|_| ()),
        Some(DevCmd::Down(d)) => down(&abs(&d.dir)?),
        Some(DevCmd::AddNode(a)) => rt.block_on(add_node(a)),
        Some(DevCmd::Revoke(r)) => revoke(&abs(&r.dir)?, &r.client),
        None => {
            let dir = abs(&args.up.dir)?;
            rt.block_on(up_cmd(args.up))?;
            println!("\nrunning in the foreground; Ctrl-C stops the cluster");
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            down(&dir)
        }
    }
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_owned() } else { std::env::current_dir()?.join(p) })
}

/// A loopback port nothing listens on, and not handed out before by this
/// process: the kernel may return a port it just released to the next
/// bind, which would give two nodes (or a node's API and a peer's p2p) the
/// same port.
fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().expect("port set lock");
    for _ in 0..FREE_PORT_TRIES {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found in {FREE_PORT_TRIES} tries")
}

/// The pid in a node's pid file, if that process is alive and is a hie node.
pub fn running_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(crate::node::pid_file(data_dir)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (kill(Pid::from_raw(pid), None).is_ok() && cmdline.contains("node\0run")).then_some(pid)
}

async fn up_cmd(args: UpArgs) -> anyhow::Result<ClusterFile> {
    let dir = abs(&args.dir)?;
    let cluster_json = dir.join("cluster.json");
    let started = Instant::now();
    let cluster = if cluster_json.exists() {
        let mut cluster = ClusterFile::load(&cluster_json)?;
        if let Some(n) = cluster.nodes.iter().find(|n| running_pid(&n.data_dir).is_some()) {
            bail!(
                "the cluster in {} is already running (node {} is up); `hie dev down --dir {}` stops it",
                dir.display(),
                n.id,
                dir.display()
            );
        }
        println!("restarting the stopped cluster in {}", dir.display());
        for n in &mut cluster.nodes {
            n.pid = spawn_node(&n.command, &n.data_dir)?;
        }
        write_cluster(&dir, &cluster)?;
        wait_ready(&cluster.nodes).await?;
        cluster
    } else {
        create(&dir, &args).await?
    };
    println!("cluster ready in {:.1} s: {}", started.elapsed().as_secs_f64(), cluster_json.display());
    print_hints(&dir, &cluster);
    Ok(cluster)
}

/// The dev CA's CRL, in the certificates directory; every dev node's
/// `api.crl`.
const CRL_FILE: &str = "ca.crl.pem";

/// Writes the dev CA's CRL listing `revoked`, atomically (a node that reads
/// it mid-write would keep the last good one anyway).
fn write_crl(certs: &Path, ca: &DevCa, revoked: &[Vec<u8>]) -> anyhow::Result<()> {
    // Unix seconds number the CRLs: each one is newer than the last.
    let number = chrono::Utc::now().timestamp().max(1) as u64;
    let tmp = certs.join(format!("{CRL_FILE}.tmp"));
    write_pem(&tmp, &ca.issue_crl(revoked, number)?)?;
    std::fs::rename(&tmp, certs.join(CRL_FILE)).with_context(|| format!("replacing {CRL_FILE}"))
}

fn revoke(dir: &Path, client: &str) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(&dir.join("cluster.json"))?;
    let entry = cluster.clients.iter().find(|c| c.name == client).with_context(|| {
        let names: Vec<&str> = cluster.clients.iter().map(|c| c.name.as_str()).collect();
        format!("no client {client} in cluster.json (there are: {})", names.join(", "))
    })?;
    let certs = dir.join("certs");
    let ca = DevCa::load(&certs.join("ca.pem"), &certs.join("ca.key"))?;
    let crl = certs.join(CRL_FILE);
    if !crl.exists() {
        bail!("{} does not exist: this cluster's nodes read no CRL (create the cluster again)", crl.display());
    }
    let id = hie_pki::CertId::of_pem_file(&entry.cert)?;
    let mut revoked = hie_pki::crl_serials(&crl)?;
    if revoked.contains(&id.serial) {
        println!("{client}'s certificate (serial {}) is already revoked", id.serial_hex());
        return Ok(());
    }
    revoked.push(id.serial.clone());
    write_crl(&certs, &ca, &revoked)?;
    println!(
        "revoked {client}'s certificate (serial {}); every node refuses it within about {} s",
        id.serial_hex(),
        hie_api::TLS_RELOAD_INTERVAL.as_secs()
    );
    Ok(())
}

fn write_pem(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}

struct NodePlan {
    id: u64,
    region: String,
    data_dir: PathBuf,
    config_path: PathBuf,
    host: Ipv4Addr,
    /// The network namespace the node runs in, if any.
    netns: Option<String>,
    api_port: u16,
    admin_port: u16,
    p2p_port: u16,
    peer_id: String,
}

fn plan_node(dir: &Path, id: u64, region: &str, netns: Option<&str>) -> anyhow::Result<NodePlan> {
    let data_dir = dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&data_dir)?;
    let peer_id = hie_p2p::peer_id_of_key_file(&data_dir.join("node.key"))?.to_string();
    let (host, (api_port, admin_port, p2p_port)) = match netns {
        Some(_) => {
            let [a, b, c] = NETNS_SUBNET;
            let last =
                u8::try_from(id).ok().filter(|n| (1..=250).contains(n)).context("netns node ids are 1 to 250")?;
            (Ipv4Addr::new(a, b, c, last), NETNS_PORTS)
        }
        None => (Ipv4Addr::LOCALHOST, (free_port()?, free_port()?, free_port()?)),
    };
    Ok(NodePlan {
        id,
        region: region.to_owned(),
        config_path: dir.join(format!("node-{id}.toml")),
        data_dir,
        host,
        netns: netns.map(|p| format!("{p}{id}")),
        api_port,
        admin_port,
        p2p_port,
        peer_id,
    })
}

impl NodePlan {
    fn p2p_addr(&self) -> String {
        format!("/ip4/{}/tcp/{}", self.host, self.p2p_port)
    }
    fn api_url(&self) -> String {
        format!("https://{}:{}/fhir", self.host, self.api_port)
    }
    fn admin_url(&self) -> String {
        format!("http://{}:{}", self.host, self.admin_port)
    }
    fn member(&self) -> Member {
        Member {
            id: self.id,
            region: self.region.clone(),
            peer_id: self.peer_id.clone(),
            p2p_addr: self.p2p_addr(),
            api_url: self.api_url(),
            admin_url: self.admin_url(),
        }
    }
}

fn node_config(
    dir: &Path,
    plan: &NodePlan,
    members: &[Member],
    seeds: &[SeedPeer],
    bootstrap: bool,
    tuning: Tuning,
) -> Config {
    let certs = dir.join("certs");
    let mut raft = RaftSection::default();
    if let Some(n) = tuning.snapshot_logs_since_last {
        raft.snapshot_logs_since_last = n;
    }
    Config {
        node: NodeSection { id: plan.id, region: plan.region.clone(), data_dir: plan.data_dir.clone() },
        p2p: P2pSection {
            listen: plan.p2p_addr(),
            advertise: None,
            seeds: seeds.to_vec(),
            request_timeout_ms: crate::config::defaults::p2p_request_timeout_ms(),
            message_bytes_max: crate::config::defaults::p2p_message_bytes_max(),
            connections_max: crate::config::defaults::p2p_connections_max(),
        },
        api: ApiSection {
            listen: std::net::SocketAddr::from((plan.host, plan.api_port)),
            public_url: plan.api_url(),
            cert: certs.join(format!("node-{}.pem", plan.id)),
            key: certs.join(format!("node-{}.key", plan.id)),
            ca: certs.join("ca.pem"),
            crl: Some(certs.join(CRL_FILE)).filter(|p| p.exists()),
            body_bytes_max: crate::config::defaults::body_bytes_max(),
            bundle_entries_max: crate::config::defaults::bundle_entries_max(),
            json_depth_max: crate::config::defaults::json_depth_max(),
            header_bytes_max: crate::config::defaults::header_bytes_max(),
            page_size_max: crate::config::defaults::page_size_max(),
            connections_max: crate::config::defaults::connections_max(),
            connections_per_address_max: crate::config::defaults::connections_per_address_max(),
            handshakes_per_address_max: crate::config::defaults::handshakes_per_address_max(),
            connections_per_organisation_max: crate::config::defaults::connections_per_organisation_max(),
            tls_handshake_timeout_ms: crate::config::defaults::tls_handshake_timeout_ms(),
            header_read_timeout_ms: crate::config::defaults::header_read_timeout_ms(),
            idle_timeout_ms: crate::config::defaults::idle_timeout_ms(),
            connection_age_max_ms: crate::config::defaults::connection_age_max_ms(),
            request_timeout_ms: crate::config::defaults::request_timeout_ms(),
            rate_per_client_per_sec: tuning
                .rate_per_client_per_sec
                .unwrap_or_else(crate::config::defaults::rate_per_client_per_sec),
            rate_burst: tuning.rate_burst.unwrap_or_else(crate::config::defaults::rate_burst),
            break_glass_per_org_per_hour: crate::config::defaults::break_glass_per_org_per_hour(),
        },
        admin: AdminSection {
            listen: std::net::SocketAddr::from((plan.host, plan.admin_port)),
            public_url: plan.admin_url(),
        },
        raft,
        cluster: ClusterSection { bootstrap, initial_members: if bootstrap { members.to_vec() } else { vec![] } },
        log: LogSection::default(),
        audit: AuditSection {
            enabled: !tuning.no_audit,
            benchmark_only_without_audit: tuning.no_audit,
            // Often, so that a test sees an anchor within a second or two.
            anchor_interval_ms: 1_000,
            ..AuditSection::default()
        },
        // Receivers on this machine only (`hie subscribe` runs one).
        subscriptions: SubscriptionsSection {
            endpoint_hosts: vec!["127.0.0.1".into(), "localhost".into(), "::1".into()],
            ..SubscriptionsSection::default()
        },
    }
}

fn write_config(path: &Path, config: &Config) -> anyhow::Result<()> {
    let header = "# Generated by `hie dev`. Fields are documented in cluster/node.example.toml.\n";
    std::fs::write(path, format!("{header}{}", toml::to_string_pretty(config)?))
        .with_context(|| format!("writing {}", path.display()))
}

fn issue_node_cert(ca: &DevCa, certs: &Path, id: u64, host: Ipv4Addr) -> anyhow::Result<()> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if host != Ipv4Addr::LOCALHOST {
        ips.push(IpAddr::V4(host));
    }
    let pem = ca.issue_node(&format!("hie node {id}"), &["localhost"], &ips)?;
    write_pem(&certs.join(format!("node-{id}.pem")), &pem.cert)?;
    write_pem(&certs.join(format!("node-{id}.key")), &pem.key)
}

fn command_for(plan: &NodePlan) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe()?.canonicalize()?;
    // `ip netns exec` execs the node, so the pid started is the node's.
    let mut command = match &plan.netns {
        Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()],
        None => vec![],
    };
    command.extend([
        exe.display().to_string(),
        "node".into(),
        "run".into(),
        "--config".into(),
        plan.config_path.display().to_string(),
    ]);
    Ok(command)
}

/// Starts a node process in its own process group, logging to `<data_dir>/hie.log`.
fn spawn_node(command: &[String], data_dir: &Path) -> anyhow::Result<u32> {
    let log_path = data_dir.join("hie.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let child = std::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", command[0]))?;
    Ok(child.id())
}

async fn wait_ready(nodes: &[NodeEntry]) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    for n in nodes {
        loop {
            let ok = http
                .get(format!("{}/readyz", n.admin_url))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} was not ready within {} s; see {}",
                    n.id,
                    READY_TIMEOUT.as_secs(),
                    n.data_dir.join("hie.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Shows a new node catching up with the leader's log (by snapshot or by
/// log) until it is within the readiness bound.
async fn wait_caught_up(node: &NodeEntry, others: &[NodeEntry]) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let status = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    let bar = crate::progress::items(0, "catch-up");
    loop {
        let mut target = 0;
        for o in others {
            if let Some(s) = status(format!("{}/status", o.admin_url)).await {
                target = target.max(s["last_log_index"].as_u64().unwrap_or(0));
            }
        }
        let applied =
            status(format!("{}/status", node.admin_url)).await.and_then(|s| s["applied_index"].as_u64()).unwrap_or(0);
        bar.set_length(target);
        bar.set_position(applied.min(target));
        if target > 0 && applied + hie_api::READY_BEHIND_ENTRIES_MAX >= target {
            bar.finish_and_clear();
            return Ok(());
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!("node {} did not catch up within {} s", node.id, READY_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes cluster.json, and the Prometheus file-discovery targets beside it
/// (ops/prometheus/prometheus.yml reads them).
fn write_cluster(dir: &Path, cluster: &ClusterFile) -> anyhow::Result<()> {
    let write = |name: &str, bytes: Vec<u8>| -> anyhow::Result<()> {
        let tmp = dir.join(format!("{name}.partial"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    };
    write("cluster.json", serde_json::to_vec_pretty(cluster)?)?;
    let targets: Vec<serde_json::Value> = cluster
        .nodes
        .iter()
        .map(|n| {
            json!({
                "targets": [n.admin_url.trim_start_matches("http://")],
                "labels": { "node": n.id.to_string(), "region": n.region },
            })
        })
        .collect();
    write("prometheus-targets.json", serde_json::to_vec_pretty(&targets)?)
}

async fn create(dir: &Path, args: &UpArgs) -> anyhow::Result<ClusterFile> {
    if args.nodes == 0 || args.nodes + args.learners > REGIONS.len() as u64 {
        bail!("--nodes plus --learners must be 1 to {}", REGIONS.len());
    }
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    println!("creating a {}-region cluster in {}", args.nodes, dir.display());
    let ca = DevCa::generate()?;
    write_pem(&certs.join("ca.pem"), &ca.pem.cert)?;
    write_pem(&certs.join("ca.key"), &ca.pem.key)?;
    write_crl(&certs, &ca, &[])?;
    // The key `hie cluster backup` seals this cluster's backups with.
    crate::backup::BackupKey::create(&dir.join(BACKUP_KEY))?;

    let mut clients = Vec::new();
    let snomed = |code: &str| format!("http://snomed.info/sct|{code}");
    let every_type: Vec<String> = hie_domain::nrl::pointer_types().iter().map(|t| snomed(t.code.as_str())).collect();
    for c in CLIENTS {
        let pem = ca.issue_client(c.name, &OdsCode::parse(c.ods)?, c.roles)?;
        let cert = certs.join(format!("client-{}.pem", c.name));
        let key = certs.join(format!("client-{}.key", c.name));
        write_pem(&cert, &pem.cert)?;
        write_pem(&key, &pem.key)?;
        clients.push(ClientEntry {
            name: c.name.into(),
            ods: c.ods.into(),
            roles: c.roles.iter().map(|r| r.as_str().to_owned()).collect(),
            pointer_types: match c.types {
                DevTypes::None => vec![],
                DevTypes::All => every_type.clone(),
                DevTypes::Only(codes) => codes.iter().map(|c| snomed(c)).collect(),
            },
            permissions: c.permissions.iter().map(|p| (*p).to_owned()).collect(),
            identifier_system: c.identifier_system.map(str::to_owned),
            cert,
            key,
        });
    }

    let plans: Vec<NodePlan> = (1..=args.nodes)
        .map(|id| plan_node(dir, id, REGIONS[(id - 1) as usize], args.netns.as_deref()))
        .collect::<Result<_, _>>()?;
    let members: Vec<Member> = plans.iter().map(NodePlan::member).collect();
    let mut nodes = Vec::new();
    for plan in &plans {
        issue_node_cert(&ca, &certs, plan.id, plan.host)?;
        let config = node_config(dir, plan, &members, &[], true, args.tuning());
        write_config(&plan.config_path, &config)?;
        let command = command_for(plan)?;
        let pid = spawn_node(&command, &plan.data_dir)?;
        nodes.push(entry(plan, true, pid, command));
    }
    let mut cluster = ClusterFile { ca_cert: certs.join("ca.pem"), ca_key: Some(certs.join("ca.key")), nodes, clients };
    write_cluster(dir, &cluster)?;
    wait_ready(&cluster.nodes).await?;
    seed(&cluster, args.patients, args.sample == "nrlf").await?;
    for i in 0..args.learners {
        let id = args.nodes + i + 1;
        let region = REGIONS[(id - 1) as usize];
        let node = start_learner(dir, &ca, &cluster, id, region, args.tuning(), None).await?;
        cluster.nodes.push(node);
        write_cluster(dir, &cluster)?;
    }
    Ok(cluster)
}

fn entry(plan: &NodePlan, voter: bool, pid: u32, command: Vec<String>) -> NodeEntry {
    NodeEntry {
        id: plan.id,
        region: plan.region.clone(),
        voter,
        api_url: plan.api_url(),
        admin_url: plan.admin_url(),
        p2p_addr: plan.p2p_addr(),
        peer_id: plan.peer_id.clone(),
        pid,
        data_dir: plan.data_dir.clone(),
        config: plan.config_path.clone(),
        command,
    }
}

fn operator_api(cluster: &ClusterFile, node: &NodeEntry) -> anyhow::Result<Api> {
    let op = cluster.client_with_role("operator").context("no operator client")?;
    Api::new(&node.api_url, &cluster.ca_cert, &op.cert, &op.key)
}

/// The operator's API on the first node that accepts connections (a node
/// may be down, or refusing to start, when another is added to replace it).
async fn live_operator_api(cluster: &ClusterFile) -> anyhow::Result<Api> {
    for node in &cluster.nodes {
        let Some(addr) = reqwest::Url::parse(&node.api_url).ok().and_then(|u| u.socket_addrs(|| None).ok()) else {
            continue;
        };
        let Some(addr) = addr.first() else { continue };
        let connect = tokio::net::TcpStream::connect(addr);
        if matches!(tokio::time::timeout(LIVE_NODE_CONNECT_TIMEOUT, connect).await, Ok(Ok(_))) {
            return operator_api(cluster, node);
        }
    }
    bail!("no node of the cluster accepts connections")
}

/// Starts a new region as a learner and adds it through the leader.
async fn start_learner(
    dir: &Path,
    ca: &DevCa,
    cluster: &ClusterFile,
    id: u64,
    region: &str,
    tuning: Tuning,
    restore_from: Option<(&Path, &Path)>,
) -> anyhow::Result<NodeEntry> {
    let plan = plan_node(dir, id, region, None)?;
    issue_node_cert(ca, &dir.join("certs"), id, plan.host)?;
    let seeds: Vec<SeedPeer> =
        cluster.nodes.iter().map(|n| SeedPeer { peer_id: n.peer_id.clone(), addr: n.p2p_addr.clone() }).collect();
    let config = node_config(dir, &plan, &[], &seeds, false, tuning);
    write_config(&plan.config_path, &config)?;
    if let Some((backup, key)) = restore_from {
        crate::backup::restore(&plan.config_path, backup, key)?;
    }
    let command = command_for(&plan)?;
    let pid = spawn_node(&command, &plan.data_dir)?;
    let api = live_operator_api(cluster).await?;
    let body = json!({
        "id": id, "peer_id": plan.peer_id, "p2p_addr": plan.p2p_addr(), "region": region,
        "api_url": plan.api_url(), "admin_url": plan.admin_url(),
    });
    let (status, answer) = operator_call(&api, "POST", "/admin/learners", Some(&body)).await?;
    if !status.is_success() {
        bail!("adding learner {id} failed: {status} {answer}");
    }
    let node = entry(&plan, false, pid, command);
    wait_caught_up(&node, &cluster.nodes).await?;
    wait_ready(std::slice::from_ref(&node)).await?;
    println!("region {region} joined as learner {id}");
    Ok(node)
}

async fn add_node(args: AddNodeArgs) -> anyhow::Result<()> {
    let dir = abs(&args.dir)?;
    let mut cluster = ClusterFile::load(&dir.join("cluster.json"))?;
    let certs = dir.join("certs");
    let ca = DevCa::load(&certs.join("ca.pem"), &certs.join("ca.key"))?;
    let id = cluster.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
    let restore_from = args.restore_from.as_ref().map(|p| abs(p)).transpose()?;
    let key_file = args.key_file.clone().unwrap_or_else(|| dir.join(BACKUP_KEY));
    let restore_from = restore_from.as_deref().map(|b| (b, key_file.as_path()));
    let mut node = start_learner(&dir, &ca, &cluster, id, &args.region, Tuning::default(), restore_from).await?;
    if args.voter {
        let api = live_operator_api(&cluster).await?;
        let (status, answer) = operator_call(&api, "POST", &format!("/admin/nodes/{id}/promote"), None).await?;
        if !status.is_success() {
            bail!("promoting {id} failed: {status} {answer}");
        }
        node.voter = true;
        println!("node {id} promoted to voter");
    }
    cluster.nodes.push(node);
    write_cluster(&dir, &cluster)
}

/// Registers NRL's pointer types, the producers and the consumers' entries
/// (types, the break-glass permission), then creates synthetic patients.
async fn seed(cluster: &ClusterFile, patients: u32, nrlf: bool) -> anyhow::Result<()> {
    let api = operator_api(cluster, &cluster.nodes[0])?;
    for t in hie_domain::nrl::pointer_types() {
        let body = json!({ "code": t.code.as_str(), "display": t.display, "category": t.category.as_str(), "category_display": t.category_display });
        registry_put(&api, "/admin/pointer-types", &body)
            .await
            .with_context(|| format!("registering pointer type {}", t.code.as_str()))?;
    }
    for c in cluster.clients.iter().filter(|c| c.is("producer")) {
        let body = json!({ "pointer_types": c.pointer_types, "permissions": c.permissions });
        registry_put(&api, &format!("/admin/producers/{}", c.ods), &body)
            .await
            .with_context(|| format!("allowing producer {}", c.ods))?;
    }
    // A consumer's entry: its types (none listed: every type) and its
    // permissions (`break-glass`).
    let has_entry = |c: &&ClientEntry| !(c.pointer_types.is_empty() && c.permissions.is_empty());
    for c in cluster.clients.iter().filter(|c| c.is("consumer")).filter(has_entry) {
        let types = (!c.pointer_types.is_empty()).then_some(&c.pointer_types);
        let body = json!({ "pointer_types": types, "permissions": c.permissions });
        registry_put(&api, &format!("/admin/consumers/{}", c.ods), &body)
            .await
            .with_context(|| format!("registering consumer {}", c.ods))?;
    }
    for c in cluster.clients.iter() {
        if let Some(system) = &c.identifier_system {
            let body = json!({ "system": system, "ods": c.ods });
            registry_put(&api, "/admin/authorities", &body)
                .await
                .with_context(|| format!("registering {}'s identifier system", c.ods))?;
        }
    }
    if patients == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let producers: Vec<&ClientEntry> = cluster.clients.iter().filter(|c| c.is("producer")).collect();
    let mut apis = Vec::new();
    for (i, p) in producers.iter().enumerate() {
        let node = &cluster.nodes[i % cluster.nodes.len()];
        apis.push((Arc::new(Api::new(&node.api_url, &cluster.ca_cert, &p.cert, &p.key)?), p.ods.clone()));
    }
    // Every patient has a GP pointer; every second one a mental-health pointer
    // too. Each producer's pointers go in batch Bundles (the bulk-load path:
    // one Raft entry a Bundle), several Bundles at once; each Bundle is made
    // only when it is sent, so memory stays bounded.
    let wanted = |k: usize, i: u32| k == 0 || i.is_multiple_of(2);
    let mut bundles: Vec<(usize, std::ops::Range<u32>)> = Vec::new();
    let mut planned = 0u32;
    for k in 0..apis.len() {
        let (mut from, mut n) = (0u32, 0usize);
        for i in 0..patients {
            if !wanted(k, i) {
                continue;
            }
            n += 1;
            planned += 1;
            if n == SEED_BUNDLE_ENTRIES {
                bundles.push((k, from..i + 1));
                (from, n) = (i + 1, 0);
            }
        }
        if n > 0 {
            bundles.push((k, from..patients));
        }
    }
    let bar = crate::progress::items(u64::from(planned), "seeding");
    let sem = Arc::new(tokio::sync::Semaphore::new(SEED_BUNDLES_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for (k, range) in bundles {
        let (api, ods) = (apis[k].0.clone(), apis[k].1.clone());
        // Bounded: wait for a slot before making the next task.
        let permit = sem.clone().acquire_owned().await?;
        while let Some(r) = tasks.try_join_next() {
            bar.inc(r??);
        }
        tasks.spawn(async move {
            let _permit = permit;
            let entries: Vec<serde_json::Value> = range
                .filter(|&i| wanted(k, i))
                .map(|i| {
                    let code = if (i + k as u32).is_multiple_of(3) {
                        testkit::END_OF_LIFE_CARE_PLAN
                    } else {
                        testkit::MENTAL_HEALTH_CRISIS_PLAN
                    };
                    let mut doc = sample_pointer(testkit::nhs(i).as_str(), &ods, code, i);
                    if nrlf {
                        nrlf_elements(&mut doc, &ods, i);
                    }
                    json!({ "resource": doc, "request": { "method": "POST", "url": "DocumentReference" } })
                })
                .collect();
            let n = entries.len() as u64;
            let bundle = json!({ "resourceType": "Bundle", "type": "batch", "entry": entries });
            let resp = api
                .http
                .post(api.fhir_url(""))
                .header("content-type", "application/fhir+json")
                .json(&bundle)
                .send()
                .await?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!("seeding a batch of pointers: {status} {text}");
            }
            // Each entry created, or already there from an earlier seeding.
            let body: serde_json::Value = serde_json::from_str(&text)?;
            for e in body["entry"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let s = e["response"]["status"].as_str().unwrap_or("");
                if !(s.starts_with("201") || s.starts_with("409")) {
                    bail!("seeding a pointer: {s} {}", e["response"]["outcome"]);
                }
            }
            Ok(n)
        });
    }
    while let Some(r) = tasks.join_next().await {
        bar.inc(r??);
    }
    bar.finish_and_clear();
    println!("seeded {patients} patients with {planned} pointers in {:.1} s", started.elapsed().as_secs_f64());
    seed_local_ids(cluster, patients).await
}

/// Patients whose local identifier each producer feeds while seeding.
const SEED_LOCAL_IDS: u32 = 10;

/// Each producer with an identifier system feeds the local identifiers of
/// the first patients it holds pointers for (ITI-104), so that PIXm queries
/// and searches by local identifier have something to find.
async fn seed_local_ids(cluster: &ClusterFile, patients: u32) -> anyhow::Result<()> {
    for (k, p) in cluster.clients.iter().filter(|c| c.is("producer")).enumerate() {
        let Some(system) = &p.identifier_system else { continue };
        let node = &cluster.nodes[k % cluster.nodes.len()];
        let api = Api::new(&node.api_url, &cluster.ca_cert, &p.cert, &p.key)?;
        for i in (0..patients).filter(|&i| k == 0 || i.is_multiple_of(2)).take(SEED_LOCAL_IDS as usize) {
            let nhs = testkit::nhs(i);
            let value = local_id_value(&p.ods, i);
            let body = json!({
                "resourceType": "Patient",
                "identifier": [
                    { "system": hie_domain::NhsNumber::SYSTEM, "value": nhs.as_str() },
                    { "system": system, "value": value },
                ],
            });
            let resp = api
                .http
                .put(api.fhir_url("/Patient"))
                .query(&[("identifier", format!("{system}|{value}"))])
                .header("content-type", "application/fhir+json")
                .json(&body)
                .send()
                .await?;
            let status = resp.status();
            if !status.is_success() {
                bail!("feeding a local identifier of {}: {status} {}", p.ods, resp.text().await.unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// The local identifier producer `ods` gives seeded patient `i`.
pub fn local_id_value(ods: &str, i: u32) -> String {
    format!("{ods}-{:06}", i + 1)
}

pub fn sample_pointer(nhs: &str, ods: &str, code: &str, i: u32) -> serde_json::Value {
    let display =
        if code == testkit::END_OF_LIFE_CARE_PLAN { "End of life care plan" } else { "Mental health crisis plan" };
    json!({
        "resourceType": "DocumentReference",
        "status": "current",
        "masterIdentifier": { "system": "urn:ietf:rfc:3986", "value": format!("urn:hie:dev:{ods}:{i}") },
        "type": { "coding": [{ "system": "http://snomed.info/sct", "code": code, "display": display }] },
        "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": testkit::CARE_PLAN_CATEGORY, "display": "Care plan" }] }],
        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs } },
        "author": [{ "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods } }],
        "custodian": { "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods } },
        "content": [{ "attachment": { "contentType": "application/pdf", "url": format!("https://{}.example.nhs.uk/records/{i}", ods.to_lowercase()) } }]
    })
}

/// Times a registry change is tried while the operator's rate limit refuses it.
const REGISTRY_PUT_TRIES: u32 = 30;

/// A registry change as the operator, waiting out the rate limit (a dev
/// cluster may be started with a low one).
async fn registry_put(api: &Api, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    for _ in 0..REGISTRY_PUT_TRIES {
        let resp = api.http.put(api.admin_url(path)).json(body).send().await?;
        if resp.status().is_success() {
            return Ok(());
        }
        if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
            bail!("{}", resp.text().await?);
        }
        let wait = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    bail!("still rate limited after {REGISTRY_PUT_TRIES} tries")
}

/// Adds to a sample pointer every element NRLF's sample pointers use
/// (`tests/data/nrlf/`), with values of its own: an NRLF-sized pointer.
fn nrlf_elements(doc: &mut serde_json::Value, ods: &str, i: u32) {
    let host = format!("{}.example.nhs.uk", ods.to_lowercase());
    doc["docStatus"] = json!("final");
    doc["description"] = json!(format!("Care plan {i}, agreed with the patient and their family at a review meeting"));
    doc["securityLabel"] = json!([{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N", "display": "normal" }] }]);
    doc["content"] = json!([{
        "attachment": {
            "contentType": "application/pdf",
            "language": "en-GB",
            "url": format!("https://{host}/records/care-plans/{i}/document%20{i}.pdf"),
            "size": 182_734 + i % 5000,
            "hash": "2jmj7l5rSw0yVb/vlWAYkK/YBwk=",
            "title": format!("Care plan for patient {i}"),
            "creation": "2026-03-14T10:12:00+00:00"
        },
        "format": { "system": "https://fhir.nhs.uk/England/CodeSystem/England-NRLFormatCode", "code": "urn:nhs-ic:unstructured", "display": "Unstructured Document" },
        "extension": [{
            "url": "https://fhir.nhs.uk/England/StructureDefinition/Extension-England-ContentStability",
            "valueCodeableConcept": { "coding": [{ "system": "https://fhir.nhs.uk/England/CodeSystem/England-NRLContentStability", "code": "static", "display": "Static" }] }
        }]
    }]);
    doc["context"] = json!({
        "practiceSetting": { "coding": [{ "system": "http://snomed.info/sct", "code": "788002001", "display": "Adult mental health service" }] },
        "sourcePatientInfo": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": doc["subject"]["identifier"]["value"].clone() } },
        "period": { "start": "2026-03-14T10:00:00+00:00" }
    });
}

/// Stops the nodes found in the cluster's pid files: SIGTERM, then SIGKILL
/// after a grace period. Processes it did not start are never touched.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(&dir.join("cluster.json"))?;
    let mut stopping = Vec::new();
    for n in &cluster.nodes {
        if let Some(pid) = running_pid(&n.data_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            stopping.push((n.id, pid, n.data_dir.clone()));
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (id, pid, data_dir) in stopping {
        while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if kill(Pid::from_raw(pid), None).is_ok() {
            eprintln!("node {id} (pid {pid}) did not stop within {} s; killing it", STOP_TIMEOUT.as_secs());
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = std::fs::remove_file(crate::node::pid_file(&data_dir));
        }
        println!("stopped node {id} (pid {pid})");
    }
    Ok(())
}

fn print_hints(dir: &Path, cluster: &ClusterFile) {
    let c = dir.join("cluster.json");
    let nhs = testkit::nhs(0);
    println!("\nnodes:");
    for n in &cluster.nodes {
        println!(
            "  {} {:<12} {}  api {}  admin {}",
            n.id,
            n.region,
            if n.voter { "voter  " } else { "learner" },
            n.api_url,
            n.admin_url
        );
    }
    println!("\ntry:");
    println!("  hie cluster status --cluster {}", c.display());
    println!("  hie search {} --cluster {}", nhs.as_str(), c.display());
    println!("  hie holders {} --cluster {} --node 2", nhs.as_str(), c.display());
    println!(
        "  hie search {} --cluster {} --as out-of-hours-111   # a consumer allowed one type",
        nhs.as_str(),
        c.display()
    );
    println!(
        "  hie pointer create --file tests/data/nrlf/valid.json --cluster {}   # an NRLF pointer, kept as sent",
        c.display()
    );
    println!("  hie registry list --cluster {}", c.display());
    println!(
        "  hie subscribe --nhs {} --cluster {}   # watch changes arrive; create pointers in another terminal",
        nhs.as_str(),
        c.display()
    );
    println!(
        "  hie pointer create --nhs {} --record-url https://gp.example.nhs.uk/r/1 --cluster {}",
        nhs.as_str(),
        c.display()
    );
    println!("  curl -s {}/metrics | grep hie_raft", cluster.nodes[0].admin_url);
    println!("  hie dev down --dir {}", dir.display());
}
