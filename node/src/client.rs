//! The command-line client: FHIR calls and operator commands over HTTPS
//! with a client certificate, found in the dev cluster's `cluster.json`
//! or given by flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `cluster.json`: the one place tools and tests learn a dev cluster from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub ca_cert: PathBuf,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    pub nodes: Vec<NodeEntry>,
    pub clients: Vec<ClientEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub region: String,
    pub voter: bool,
    pub api_url: String,
    pub admin_url: String,
    pub p2p_addr: String,
    pub peer_id: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientEntry {
    pub name: String,
    pub ods: String,
    pub roles: Vec<String>,
    /// A producer's types, or the only types a restricted consumer may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pointer_types: Vec<String>,
    /// Its registry permissions: a producer's (`migration`), a
    /// consumer's (`break-glass`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// A producer's local identifier system (it is the assigning authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier_system: Option<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientEntry {
    pub fn is(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

impl ClusterFile {
    pub fn load(path: &std::path::Path) -> anyhow::Result<ClusterFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn client_with_role(&self, role: &str) -> Option<&ClientEntry> {
        self.clients.iter().find(|c| c.roles.iter().any(|r| r == role))
    }
}

/// Where to send a request and as whom.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The dev cluster's cluster.json (used when --url is not given).
    #[arg(long, env = "HIE_CLUSTER", default_value = ".hie-dev/cluster.json", global = true)]
    pub cluster: PathBuf,
    /// Which node of cluster.json to call (default: the first that accepts a connection).
    #[arg(long, global = true)]
    pub node: Option<u64>,
    /// Which client of cluster.json to act as (default: one with the needed role).
    #[arg(long = "as", global = true)]
    pub client: Option<String>,
    /// The node's API base URL (https://HOST:PORT/fhir); with --ca, --cert and --key.
    #[arg(long, global = true, requires_all = ["ca", "cert", "key"])]
    pub url: Option<String>,
    /// The cluster CA certificate (PEM), with --url.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), with --url.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM), with --url.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The patient's NHS Number.
    pub nhs_number: String,
    /// Only pointers of this SNOMED CT type.
    #[arg(long = "type")]
    pub type_code: Option<String>,
    /// Read through the leader (linearizable) instead of the local replica.
    #[arg(long)]
    pub linearizable: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct HoldersArgs {
    /// The patient's NHS Number.
    pub nhs_number: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Subcommand, Debug)]
pub enum PointerCmd {
    /// Read one pointer by id.
    Get {
        /// The pointer id (`<ODS>-<id>`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Publish a pointer (producer). Give --file, or --nhs and --record-url.
    Create {
        /// A DocumentReference JSON file.
        #[arg(long, conflicts_with_all = ["nhs", "record_url"])]
        file: Option<PathBuf>,
        /// The patient's NHS Number.
        #[arg(long)]
        nhs: Option<String>,
        /// Where the record is (the pointer's content URL).
        #[arg(long = "record-url")]
        record_url: Option<String>,
        /// SNOMED CT type (default: 736253002, mental health crisis plan).
        #[arg(long = "type", default_value = "736253002")]
        type_code: String,
        /// SNOMED CT category of the type (default: 734163000, care plan).
        #[arg(long, default_value = "734163000")]
        category: String,
        /// The MIME type of the record.
        #[arg(long, default_value = "application/pdf")]
        content_type: String,
        /// The producer's own id for the record (makes retries safe).
        #[arg(long)]
        master_id: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a pointer with a new version (its custodian only): PUT of a
    /// DocumentReference file whose id is the pointer's.
    Update {
        /// The pointer id (`<ODS>-<id>`).
        id: String,
        /// The DocumentReference JSON file (its `id` must be the pointer's).
        #[arg(long)]
        file: PathBuf,
        /// Only if the pointer is at this version (else 412).
        #[arg(long)]
        if_match: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// A pointer's versions, newest first (or one version with --version).
    History {
        /// The pointer id (`<ODS>-<id>`).
        id: String,
        /// Read this version only.
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a pointer and its history (its custodian only).
    Delete {
        /// The pointer id (`<ODS>-<id>`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Nodes, regions, voters and learners, leader, applied index and lag.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Add a node as a non-voting learner (send to the leader).
    AddLearner {
        /// The new node's id (unique, never reused).
        #[arg(long)]
        id: u64,
        /// Its libp2p PeerId (`hie node id --config FILE` prints it).
        #[arg(long)]
        peer_id: String,
        /// The libp2p address other nodes dial, e.g. /ip4/10.0.0.4/tcp/7001.
        #[arg(long)]
        p2p_addr: String,
        /// The region it serves.
        #[arg(long)]
        region: String,
        /// Its FHIR base URL, shown in status.
        #[arg(long, default_value = "")]
        api_url: String,
        /// Its admin URL, shown in status and used by the status page.
        #[arg(long, default_value = "")]
        admin_url: String,
        #[command(flatten)]
        target: Target,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner's node id.
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Make a voter a learner: it stays a member and keeps its copy up to
    /// date, but no longer votes (promote makes it vote again).
    Demote {
        /// The voter's node id.
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node id to remove.
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Build a snapshot now (and purge the log behind it).
    Snapshot {
        #[command(flatten)]
        target: Target,
    },
    /// The state digest of a node (equal on replicas at the same applied index).
    Digest {
        #[command(flatten)]
        target: Target,
    },
    /// Take a backup of a node: its state (one consistent view) and its
    /// audit segments, streamed into a new file readable by its owner only
    /// (mode 0600), encrypted and authenticated with the backup key. The
    /// node records it as an operator action in its audit log. Restore it
    /// into a new node with `hie node restore`.
    Backup {
        /// Where to write the backup (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// The backup key (`hie cluster backup-key`; the dev cluster's is
        /// .hie-dev/backup.key).
        #[arg(long, env = "HIE_BACKUP_KEY_FILE")]
        key_file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Make a new backup key: 32 random bytes, as hex, in a new file of mode 0600.
    BackupKey {
        /// Where to write the key (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The replicated registry (operator): pointer types, producers, consumers.
#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Every pointer type, producer and restricted consumer.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Register a pointer type, or change its display or category.
    Type {
        /// SNOMED CT code of the type.
        code: String,
        /// The type's name, as pointers show it.
        #[arg(long)]
        display: String,
        /// SNOMED CT code of its category.
        #[arg(long)]
        category: String,
        /// The category's name.
        #[arg(long)]
        category_display: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set the types a producer may publish and its permissions.
    Producer {
        /// The producer's ODS code.
        ods: String,
        /// SNOMED CT codes, comma-separated.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// `migration`: keep the date the producer sends.
        #[arg(long = "permission")]
        permissions: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Register a local identifier system and the organisation that assigns
    /// it (or --remove it).
    Authority {
        /// The identifier system (a URI).
        system: String,
        /// The ODS code of the organisation that assigns it.
        #[arg(long, required_unless_present = "remove", conflicts_with = "remove")]
        ods: Option<String>,
        /// Remove the registration.
        #[arg(long)]
        remove: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Set a consumer's entry, replacing it: the pointer types it may read
    /// (or --all-types) and its permissions.
    Consumer {
        /// The consumer's ODS code.
        ods: String,
        /// SNOMED CT codes, comma-separated.
        #[arg(long, value_delimiter = ',', required_unless_present = "all_types", conflicts_with = "all_types")]
        types: Vec<String>,
        /// May read every type.
        #[arg(long)]
        all_types: bool,
        /// `break-glass`: may read opted-out patients' pointers in an
        /// emergency (with a reason; audited, limited per hour). Left out:
        /// the permission is taken away.
        #[arg(long = "permission")]
        permissions: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
}

/// Patient identity: local identifiers (IHE PIXm) and NHS Number merges.
#[derive(Subcommand, Debug)]
pub enum PatientCmd {
    /// Record that a local identifier names a patient (producer of the
    /// organisation that assigns the system; IHE ITI-104).
    Xref {
        /// The patient's NHS Number.
        nhs_number: String,
        /// The local identifier, `<system>|<value>`.
        #[arg(long)]
        identifier: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a local identifier's cross-reference (producer of its assigning organisation).
    Unxref {
        /// The local identifier, `<system>|<value>`.
        #[arg(long)]
        identifier: String,
        #[command(flatten)]
        target: Target,
    },
    /// The patient's other identifiers (IHE PIXm ITI-83; consumer or producer).
    Pix {
        /// The identifier asked about: `<system>|<value>`, or an NHS Number alone.
        source: String,
        /// Only identifiers of this system (repeatable).
        #[arg(long = "target-system")]
        target_systems: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Retire an NHS Number into the surviving one, moving every pointer (identity authority).
    Merge {
        /// The retired NHS Number.
        source: String,
        /// The surviving NHS Number.
        #[arg(long = "into")]
        into: String,
        #[command(flatten)]
        target: Target,
    },
}

pub enum Op {
    Search(SearchArgs),
    Holders(HoldersArgs),
    Pointer(PointerCmd),
    Cluster(ClusterCmd),
    Registry(RegistryCmd),
    Patient(PatientCmd),
}

/// An HTTPS client for one node, acting as one client certificate.
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

/// How long the CLI waits for a node's TCP accept when it picks one.
const PICK_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether the host and port of `api_url` accept a TCP connection.
fn reachable(api_url: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Some(authority) = api_url.split("://").nth(1).and_then(|r| r.split('/').next()) else { return false };
    let Ok(mut addrs) = authority.to_socket_addrs() else { return false };
    addrs.any(|a| std::net::TcpStream::connect_timeout(&a, PICK_CONNECT_TIMEOUT).is_ok())
}

/// How long the CLI waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    pub fn new(base: &str, ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Api> {
        let tls = hie_pki::client_config(ca, Some((cert, key)))?;
        let http = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(CLIENT_TIMEOUT).build()?;
        Ok(Api { http, base: base.trim_end_matches('/').to_owned() })
    }

    pub fn from_target(t: &Target, role: &str) -> anyhow::Result<Api> {
        if let Some(url) = &t.url {
            return Api::new(url, t.ca.as_ref().unwrap(), t.cert.as_ref().unwrap(), t.key.as_ref().unwrap());
        }
        let cluster = ClusterFile::load(&t.cluster).with_context(
            || "no cluster to talk to: start one with `hie dev up`, or give --url, --ca, --cert and --key",
        )?;
        let node = match t.node {
            Some(id) => {
                cluster.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id} in cluster.json"))?
            }
            // The first node that accepts a connection: a cluster command
            // (removing a dead node above all) must not fail because the
            // first node listed is the one that is down.
            None => {
                let first = cluster.nodes.first().context("cluster.json lists no nodes")?;
                cluster.nodes.iter().find(|n| reachable(&n.api_url)).unwrap_or(first)
            }
        };
        let client = match &t.client {
            Some(name) => {
                cluster.clients.iter().find(|c| &c.name == name).with_context(|| format!("no client {name}"))?
            }
            None => cluster.client_with_role(role).with_context(|| format!("no client with role {role}"))?,
        };
        Api::new(&node.api_url, &cluster.ca_cert, &client.cert, &client.key)
    }

    /// The admin routes live beside /fhir on the same listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{}", self.base.trim_end_matches("/fhir"), path)
    }

    pub fn fhir_url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

async fn answer(resp: reqwest::Response) -> anyhow::Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Value)> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    Ok((status, headers, body))
}

fn fail(status: reqwest::StatusCode, body: &Value) -> anyhow::Error {
    let code = body.pointer("/issue/0/details/coding/0/code").and_then(Value::as_str).unwrap_or("");
    let diag = body
        .pointer("/issue/0/diagnostics")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    anyhow::anyhow!("{status} {code}: {diag}")
}

pub fn run(op: Op) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_async(op))
}

async fn run_async(op: Op) -> anyhow::Result<()> {
    match op {
        Op::Search(a) => {
            let api = Api::from_target(&a.target, "consumer")?;
            let mut form =
                vec![("subject:identifier".to_owned(), format!("https://fhir.nhs.uk/Id/nhs-number|{}", a.nhs_number))];
            if let Some(t) = &a.type_code {
                form.push(("type".into(), format!("http://snomed.info/sct|{t}")));
            }
            let mut req = api.http.post(api.fhir_url("/DocumentReference/_search")).form(&form);
            if a.linearizable {
                req = req.header("x-hie-consistency", "linearizable");
            }
            let (status, headers, body) = answer(req.send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned();
            println!(
                "{} pointer(s)  [applied index {}, stale {}, lag {} ms]",
                body["total"],
                h("x-hie-applied-index"),
                h("x-hie-stale"),
                h("x-hie-replication-lag-ms")
            );
            for e in body["entry"].as_array().into_iter().flatten() {
                let r = &e["resource"];
                println!(
                    "  {}  custodian {}  type {} ({})  {}",
                    r["id"].as_str().unwrap_or(""),
                    r["custodian"]["identifier"]["value"].as_str().unwrap_or(""),
                    r["type"]["coding"][0]["code"].as_str().unwrap_or(""),
                    r["type"]["coding"][0]["display"].as_str().unwrap_or(""),
                    r["content"][0]["attachment"]["url"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Op::Holders(a) => {
            let api = Api::from_target(&a.target, "consumer")?;
            let url = api.fhir_url(&format!("/Patient/{}/$record-holders", a.nhs_number));
            let (status, _, body) = answer(api.http.get(url).send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            let holders = body["parameter"].as_array().cloned().unwrap_or_default();
            println!("{} organisation(s) hold records:", holders.len());
            for h in holders {
                println!(
                    "  {}  {} pointer(s)",
                    h["part"][0]["valueIdentifier"]["value"].as_str().unwrap_or(""),
                    h["part"][1]["valueInteger"]
                );
            }
            Ok(())
        }
        Op::Pointer(PointerCmd::Get { id, target }) => {
            let api = Api::from_target(&target, "consumer")?;
            let (status, _, body) =
                answer(api.http.get(api.fhir_url(&format!("/DocumentReference/{id}"))).send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Op::Pointer(PointerCmd::Delete { id, target }) => {
            let api = Api::from_target(&target, "producer")?;
            let (status, _, body) =
                answer(api.http.delete(api.fhir_url(&format!("/DocumentReference/{id}"))).send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            println!("deleted {id}");
            Ok(())
        }
        Op::Pointer(PointerCmd::Create {
            file,
            nhs,
            record_url,
            type_code,
            category,
            content_type,
            master_id,
            target,
        }) => {
            let api = Api::from_target(&target, "producer")?;
            let body = match file {
                Some(f) => std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
                None => {
                    let (Some(nhs), Some(url)) = (nhs, record_url) else {
                        bail!("give --file, or --nhs and --record-url")
                    };
                    let ods = own_ods(&target)?;
                    let mut doc = json!({
                        "resourceType": "DocumentReference",
                        "status": "current",
                        "type": { "coding": [{ "system": "http://snomed.info/sct", "code": type_code }] },
                        "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": category }] }],
                        "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs } },
                        "author": [{ "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods } }],
                        "custodian": { "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods } },
                        "content": [{ "attachment": { "contentType": content_type, "url": url } }]
                    });
                    if let Some(m) = master_id {
                        doc["masterIdentifier"] = json!({ "system": "urn:ietf:rfc:3986", "value": m });
                    }
                    serde_json::to_vec(&doc)?
                }
            };
            let req = api
                .http
                .post(api.fhir_url("/DocumentReference"))
                .header("content-type", "application/fhir+json")
                .body(body);
            let (status, headers, body) = answer(req.send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            println!("created {}", headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or(""));
            Ok(())
        }
        Op::Pointer(PointerCmd::Update { id, file, if_match, target }) => {
            let api = Api::from_target(&target, "producer")?;
            let body = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut req = api
                .http
                .put(api.fhir_url(&format!("/DocumentReference/{id}")))
                .header("content-type", "application/fhir+json")
                .body(body);
            if let Some(v) = if_match {
                req = req.header("if-match", format!("W/\"{v}\""));
            }
            let (status, headers, body) = answer(req.send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            let verb = if status == reqwest::StatusCode::CREATED { "created" } else { "updated" };
            println!("{verb} {}", headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or(""));
            Ok(())
        }
        Op::Pointer(PointerCmd::History { id, version, target }) => {
            let api = Api::from_target(&target, "consumer")?;
            let path = match version {
                Some(v) => format!("/DocumentReference/{id}/_history/{v}"),
                None => format!("/DocumentReference/{id}/_history"),
            };
            let (status, _, body) = answer(api.http.get(api.fhir_url(&path)).send().await?).await?;
            if !status.is_success() {
                return Err(fail(status, &body));
            }
            if target.json || version.is_some() {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            println!("{} version(s) of {id}, newest first:", body["total"]);
            for e in body["entry"].as_array().into_iter().flatten() {
                let r = &e["resource"];
                println!(
                    "  version {}  {}  {}  {}",
                    r["meta"]["versionId"].as_str().unwrap_or(""),
                    r["meta"]["lastUpdated"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or(""),
                    r["content"][0]["attachment"]["url"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Op::Cluster(cmd) => cluster(cmd).await,
        Op::Registry(cmd) => registry(cmd).await,
        Op::Patient(cmd) => patient(cmd).await,
    }
}

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

async fn patient(cmd: PatientCmd) -> anyhow::Result<()> {
    let (status, body) = match cmd {
        PatientCmd::Xref { nhs_number, identifier, target } => {
            let api = Api::from_target(&target, "producer")?;
            let (system, value) = identifier.split_once('|').context("--identifier must be <system>|<value>")?;
            let body = json!({
                "resourceType": "Patient",
                "identifier": [
                    { "system": NHS_NUMBER_SYSTEM, "value": nhs_number },
                    { "system": system, "value": value },
                ],
            });
            let req = api.http.put(api.fhir_url("/Patient")).query(&[("identifier", &identifier)]);
            let (status, _, body) =
                answer(req.header("content-type", "application/fhir+json").json(&body).send().await?).await?;
            (status, body)
        }
        PatientCmd::Unxref { identifier, target } => {
            let api = Api::from_target(&target, "producer")?;
            let req = api.http.delete(api.fhir_url("/Patient")).query(&[("identifier", &identifier)]);
            let (status, _, body) = answer(req.send().await?).await?;
            (status, body)
        }
        PatientCmd::Pix { source, target_systems, target } => {
            let api = Api::from_target(&target, "consumer")?;
            let source = if source.contains('|') { source } else { format!("{NHS_NUMBER_SYSTEM}|{source}") };
            let mut query = vec![("sourceIdentifier", source)];
            query.extend(target_systems.into_iter().map(|t| ("targetSystem", t)));
            let req = api.http.get(api.fhir_url("/Patient/$ihe-pix")).query(&query);
            let (status, _, body) = answer(req.send().await?).await?;
            if status.is_success() && !target.json {
                for p in body["parameter"].as_array().into_iter().flatten() {
                    match p["name"].as_str() {
                        Some("targetIdentifier") => println!(
                            "  {}|{}",
                            p["valueIdentifier"]["system"].as_str().unwrap_or(""),
                            p["valueIdentifier"]["value"].as_str().unwrap_or("")
                        ),
                        Some("targetId") => {
                            println!("  -> {}", p["valueReference"]["reference"].as_str().unwrap_or(""))
                        }
                        _ => {}
                    }
                }
                return Ok(());
            }
            (status, body)
        }
        PatientCmd::Merge { source, into, target } => {
            let api = Api::from_target(&target, "identity-authority")?;
            let id = |v: &str| json!({ "system": NHS_NUMBER_SYSTEM, "value": v });
            let body = json!({
                "resourceType": "Parameters",
                "parameter": [
                    { "name": "source-patient-identifier", "valueIdentifier": id(&source) },
                    { "name": "target-patient-identifier", "valueIdentifier": id(&into) },
                ],
            });
            let req = api.http.post(api.fhir_url("/Patient/$merge")).header("content-type", "application/fhir+json");
            let (status, _, body) = answer(req.json(&body).send().await?).await?;
            if status.is_success() && !target.json {
                let moved = body["parameter"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["name"] == "pointers-moved"))
                    .map(|p| p["valueInteger"].clone())
                    .unwrap_or(Value::Null);
                println!("merged: {moved} pointer(s) moved to the surviving number");
                return Ok(());
            }
            (status, body)
        }
    };
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

async fn registry(cmd: RegistryCmd) -> anyhow::Result<()> {
    let (target, method, path, body) = match cmd {
        RegistryCmd::List { target } => (target, "GET", "/admin/registry".to_owned(), None),
        RegistryCmd::Type { code, display, category, category_display, target } => (
            target,
            "PUT",
            "/admin/pointer-types".to_owned(),
            Some(
                json!({ "code": code, "display": display, "category": category, "category_display": category_display }),
            ),
        ),
        RegistryCmd::Producer { ods, types, permissions, target } => (
            target,
            "PUT",
            format!("/admin/producers/{ods}"),
            Some(json!({ "pointer_types": types, "permissions": permissions })),
        ),
        RegistryCmd::Authority { system, ods, remove: _, target } => {
            (target, "PUT", "/admin/authorities".to_owned(), Some(json!({ "system": system, "ods": ods })))
        }
        RegistryCmd::Consumer { ods, types, all_types, permissions, target } => {
            let types = if all_types { Value::Null } else { json!(types) };
            let body = json!({ "pointer_types": types, "permissions": permissions });
            (target, "PUT", format!("/admin/consumers/{ods}"), Some(body))
        }
    };
    let api = Api::from_target(&target, "operator")?;
    let url = api.admin_url(&path);
    let req = match method {
        "GET" => api.http.get(url),
        _ => api.http.put(url).json(&body.unwrap_or(Value::Null)),
    };
    let (status, _, body) = answer(req.send().await?).await?;
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

fn own_ods(t: &Target) -> anyhow::Result<String> {
    if let Some(cert) = &t.cert {
        let pem = std::fs::read(cert)?;
        let der = rustls_pem_first(&pem)?;
        return Ok(hie_pki::caller_from_cert(&der)?.ods.as_str().to_owned());
    }
    let cluster = ClusterFile::load(&t.cluster)?;
    let c = match &t.client {
        Some(n) => cluster.clients.iter().find(|c| &c.name == n),
        None => cluster.client_with_role("producer"),
    };
    Ok(c.context("no producer client")?.ods.clone())
}

fn rustls_pem_first(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem).map_err(|e| anyhow::anyhow!("{e}"))?.to_vec())
}

async fn cluster(cmd: ClusterCmd) -> anyhow::Result<()> {
    match &cmd {
        ClusterCmd::Backup { out, key_file, target } => return backup(out, key_file, target).await,
        ClusterCmd::BackupKey { out } => {
            let key = crate::backup::BackupKey::create(out)?;
            println!("backup key {} written to {} (mode 0600)", hex_id(&key.id()), out.display());
            return Ok(());
        }
        _ => {}
    }
    let (target, method, path, body) = match cmd {
        ClusterCmd::Backup { .. } | ClusterCmd::BackupKey { .. } => unreachable!("handled above"),
        ClusterCmd::Status { target } => (target, "GET", "/admin/status".to_owned(), None),
        ClusterCmd::Digest { target } => (target, "GET", "/admin/digest".to_owned(), None),
        ClusterCmd::Snapshot { target } => (target, "POST", "/admin/snapshot".to_owned(), None),
        ClusterCmd::Promote { id, target } => (target, "POST", format!("/admin/nodes/{id}/promote"), None),
        ClusterCmd::Demote { id, target } => (target, "POST", format!("/admin/nodes/{id}/demote"), None),
        ClusterCmd::Remove { id, target } => (target, "DELETE", format!("/admin/nodes/{id}"), None),
        ClusterCmd::AddLearner { id, peer_id, p2p_addr, region, api_url, admin_url, target } => (
            target,
            "POST",
            "/admin/learners".to_owned(),
            Some(
                json!({ "id": id, "peer_id": peer_id, "p2p_addr": p2p_addr, "region": region, "api_url": api_url, "admin_url": admin_url }),
            ),
        ),
    };
    let api = Api::from_target(&target, "operator")?;
    let (status, body) = operator_call(&api, method, &path, body.as_ref()).await?;
    if !status.is_success() {
        return Err(fail(status, &body));
    }
    if path == "/admin/status" && !target.json {
        print_status(&body);
    } else {
        println!("{}", serde_json::to_string_pretty(&body)?);
    }
    Ok(())
}

/// Calls an operator route; if this node is not the leader, follows the
/// leader's URL named in the answer once.
pub async fn operator_call(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let mut base = api.base.clone();
    for _ in 0..2 {
        let url = format!("{}{}", base.trim_end_matches("/fhir"), path);
        let mut req = match method {
            "GET" => api.http.get(&url),
            "POST" => api.http.post(&url),
            "DELETE" => api.http.delete(&url),
            _ => bail!("unsupported method {method}"),
        };
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(serde_json::to_vec(b)?);
        }
        let (status, _, value) = answer(req.send().await?).await?;
        if status == reqwest::StatusCode::MISDIRECTED_REQUEST
            && let Some(leader) = value
                .pointer("/issue/0/diagnostics")
                .and_then(Value::as_str)
                .and_then(|d| d.split("send this to ").nth(1))
        {
            base = leader.to_owned();
            continue;
        }
        return Ok((status, value));
    }
    bail!("the leader moved while the command was being sent; try again")
}

/// How long `hie cluster backup` waits for the next bytes of the backup.
const BACKUP_STALL_MAX: Duration = Duration::from_secs(120);
/// The longest a backup may take in all.
const BACKUP_DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

fn hex_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `hie cluster backup`: the node's answer, as it arrives, into a sealed
/// file (`backup.rs`).
async fn backup(out: &std::path::Path, key_file: &std::path::Path, target: &Target) -> anyhow::Result<()> {
    let key = crate::backup::BackupKey::load(key_file)?;
    let api = Api::from_target(target, "operator")?;
    let started = std::time::Instant::now();
    let mut file = crate::backup::BackupWriter::create(out, &key)?;
    let resp = api.http.get(api.admin_url("/admin/backup")).timeout(BACKUP_DURATION_MAX).send().await?;
    let status = resp.status();
    if !status.is_success() {
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        return Err(fail(status, &body));
    }
    let bar = crate::progress::bytes_streamed("backup");
    let mut resp = resp;
    loop {
        let chunk = tokio::time::timeout(BACKUP_STALL_MAX, resp.chunk())
            .await
            .with_context(|| format!("the node sent nothing for {} s", BACKUP_STALL_MAX.as_secs()))??;
        let Some(chunk) = chunk else { break };
        file.write(&chunk)?;
        bar.inc(chunk.len() as u64);
    }
    let done = file.finish()?;
    bar.finish_and_clear();
    let (h, s) = (&done.header, &done.summary);
    println!(
        "backup of {} at log index {}: state {} bytes, {} audit segments ({} bytes); written to {} ({} bytes, mode 0600, key {}) in {:.1} s",
        h.node,
        h.applied_index,
        s.state_bytes,
        s.audit_segments,
        s.audit_bytes,
        out.display(),
        done.file_bytes,
        done.key_id,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_status(s: &Value) {
    println!(
        "node {} ({})  state {}  term {}  leader {}  applied {}  stale {}",
        s["id"],
        s["region"].as_str().unwrap_or(""),
        s["state"].as_str().unwrap_or(""),
        s["term"],
        s["leader_id"],
        s["applied_index"],
        s["freshness"]["stale"]
    );
    println!("{:<4} {:<16} {:<8} {:<10} {:<8} api", "id", "region", "role", "matched", "lag");
    for m in s["members"].as_array().into_iter().flatten() {
        println!(
            "{:<4} {:<16} {:<8} {:<10} {:<8} {}",
            m["id"],
            m["region"].as_str().unwrap_or(""),
            if m["voter"].as_bool() == Some(true) { "voter" } else { "learner" },
            m["matched_index"].to_string(),
            m["lag_entries"].to_string(),
            m["api_url"].as_str().unwrap_or("")
        );
    }
}

/// One node's anchored audit chain head, as the cluster holds it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Anchor {
    pub node: u64,
    pub seq: u64,
    pub hash: String,
}

/// The audit anchors the cluster of `cluster_json` holds, read as its
/// operator from the first node that answers.
pub fn audit_anchors(cluster_json: &std::path::Path) -> anyhow::Result<Vec<Anchor>> {
    let target = Target {
        cluster: cluster_json.to_owned(),
        node: None,
        client: None,
        url: None,
        ca: None,
        cert: None,
        key: None,
        json: false,
    };
    let api = Api::from_target(&target, "operator")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let resp = api.http.get(api.admin_url("/admin/audit-anchors")).send().await?;
        let (status, _, body) = answer(resp).await?;
        if !status.is_success() {
            return Err(fail(status, &body));
        }
        let anchors = body.get("anchors").cloned().context("the answer has no anchors")?;
        Ok(serde_json::from_value(anchors)?)
    })
}
