//! The node's TOML configuration: one struct with sections, unknown fields
//! refused, defaults in one place, and `validate()` errors that name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hie_api::{ApiConfig, ApiLimits};
use hie_domain::raft::{NodeId, NodeInfo};
use hie_p2p::{Multiaddr, P2pConfig, PeerId};
use hie_replica::{RaftTuning, ReplicaConfig};
use hie_store::StoreOptions;

/// What one entry of a batch Bundle adds to its Raft entry beside the
/// pointer's own JSON (ids, codes and times in CBOR, about 300 bytes), with
/// room to spare.
const BATCH_ENTRY_OVERHEAD_BYTES: usize = 512;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub p2p: P2pSection,
    pub api: ApiSection,
    pub admin: AdminSection,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub subscriptions: SubscriptionsSection,
}

/// Delivering FHIR Subscription notifications (`rest-hook`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionsSection {
    /// Hosts a subscription's endpoint may name (exact, case-insensitive):
    /// a subscription cannot make a node call anywhere else. Empty: no
    /// subscription can be made.
    #[serde(default)]
    pub endpoint_hosts: Vec<String>,
    /// PEM CAs trusted for endpoints besides the cluster CA (`api.ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// How long a notification may take when its subscription names no
    /// `backport-timeout`.
    #[serde(default = "defaults::subscriptions_timeout_ms")]
    pub timeout_ms: u64,
    /// The first wait after a failed notification; it doubles up to `retry_max_ms`.
    #[serde(default = "defaults::subscriptions_retry_min_ms")]
    pub retry_min_ms: u64,
    #[serde(default = "defaults::subscriptions_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Failed notifications in a row before the subscription shows `error`
    /// (it is still retried).
    #[serde(default = "defaults::subscriptions_failures_before_error")]
    pub failures_before_error: u32,
    /// How often what endpoints acknowledged is replicated: at most this
    /// much is sent again after the deliverer changes.
    #[serde(default = "defaults::subscriptions_progress_interval_ms")]
    pub progress_interval_ms: u64,
    /// Notifications in flight at once from this node.
    #[serde(default = "defaults::subscriptions_in_flight_max")]
    pub in_flight_max: usize,
}

impl Default for SubscriptionsSection {
    fn default() -> Self {
        toml::from_str("").expect("every subscriptions field has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Record every access to patient data. Off only with
    /// `benchmark_only_without_audit` as well (the node refuses to start
    /// otherwise): to measure what auditing costs, on test data; a node
    /// without an audit log answers "who looked" queries with an error.
    #[serde(default = "defaults::audit_enabled")]
    pub enabled: bool,
    /// Says that this node serves only test data for a benchmark, so that
    /// `enabled = false` is not a mistake.
    #[serde(default)]
    pub benchmark_only_without_audit: bool,
    /// Where the hash-chained segments and their index live
    /// (default: `<data_dir>/audit`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default = "defaults::audit_segment_bytes_max")]
    pub segment_bytes_max: u64,
    #[serde(default = "defaults::audit_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Records of reads are fsynced within this many ms (changes' before
    /// they are answered): a power cut can lose at most this much of the
    /// read audit.
    #[serde(default = "defaults::audit_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// Fsync every record before answering, reads' too.
    #[serde(default)]
    pub sync_every_access: bool,
    /// Most events one node returns for one "who looked" query.
    #[serde(default = "defaults::audit_query_events_max")]
    pub query_events_max: u32,
    /// How long a "who looked" query waits for each other node.
    #[serde(default = "defaults::audit_fanout_timeout_ms")]
    pub fanout_timeout_ms: u64,
    /// How often, while the chain grows, the node anchors its head (last
    /// fsynced record) in the replicated state: the most records a cut or
    /// rewrite of the chain's end can hide from `hie audit verify --cluster`
    /// are those written in one interval.
    #[serde(default = "defaults::audit_anchor_interval_ms")]
    pub anchor_interval_ms: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        toml::from_str("").expect("every audit field has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's id in the cluster (1 and up, unique, never reused).
    pub id: NodeId,
    /// The region (integrated care system) this node serves.
    pub region: String,
    /// Where the node keeps its store, key, pid file and snapshots.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedPeer {
    pub peer_id: String,
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pSection {
    /// libp2p listen address, e.g. `/ip4/0.0.0.0/tcp/7001`.
    pub listen: String,
    /// The address peers dial (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Peers allowed to connect before the membership names them.
    #[serde(default)]
    pub seeds: Vec<SeedPeer>,
    #[serde(default = "defaults::p2p_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "defaults::p2p_message_bytes_max")]
    pub message_bytes_max: usize,
    #[serde(default = "defaults::p2p_connections_max")]
    pub connections_max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// HTTPS listen address, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// The public base URL of the FHIR API, `https://HOST:PORT/fhir`.
    pub public_url: String,
    /// PEM server certificate, its key, and the CA client certificates must chain to.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// PEM CRLs of the CAs in `ca` (one per CA): listed client certificates
    /// are refused, on connections already open too. The certificate, key,
    /// CA bundle and CRLs are read again every 2 s, so a revocation or a
    /// rotated certificate is in force within seconds, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    #[serde(default = "defaults::body_bytes_max")]
    pub body_bytes_max: usize,
    #[serde(default = "defaults::bundle_entries_max")]
    pub bundle_entries_max: usize,
    #[serde(default = "defaults::json_depth_max")]
    pub json_depth_max: usize,
    #[serde(default = "defaults::header_bytes_max")]
    pub header_bytes_max: usize,
    #[serde(default = "defaults::page_size_max")]
    pub page_size_max: usize,
    #[serde(default = "defaults::connections_max")]
    pub connections_max: usize,
    /// Connections from one source address (an IPv6 /64), TLS handshakes included.
    #[serde(default = "defaults::connections_per_address_max")]
    pub connections_per_address_max: usize,
    /// TLS handshakes in progress from one source address.
    #[serde(default = "defaults::handshakes_per_address_max")]
    pub handshakes_per_address_max: usize,
    /// Connections one organisation (its certificates' ODS code) holds after TLS.
    #[serde(default = "defaults::connections_per_organisation_max")]
    pub connections_per_organisation_max: usize,
    #[serde(default = "defaults::tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight and no byte moved for this long is closed.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A connection this old is closed once its requests in flight are answered.
    #[serde(default = "defaults::connection_age_max_ms")]
    pub connection_age_max_ms: u64,
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "defaults::rate_per_client_per_sec")]
    pub rate_per_client_per_sec: u32,
    #[serde(default = "defaults::rate_burst")]
    pub rate_burst: u32,
    /// Break-glass uses each organisation may make on this node in any
    /// hour; beyond it 429 with Retry-After. Per node: an emergency read
    /// must keep working on a node cut off from the quorum.
    #[serde(default = "defaults::break_glass_per_org_per_hour")]
    pub break_glass_per_org_per_hour: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Plain-HTTP listen address for metrics and health; keep it private.
    pub listen: SocketAddr,
    /// The URL operators and Prometheus use, `http://HOST:PORT`.
    pub public_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    #[serde(default = "defaults::heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "defaults::election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "defaults::election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    #[serde(default = "defaults::snapshot_logs_since_last")]
    pub snapshot_logs_since_last: u64,
    #[serde(default = "defaults::logs_kept_after_snapshot")]
    pub logs_kept_after_snapshot: u64,
    #[serde(default = "defaults::snapshot_chunk_bytes")]
    pub snapshot_chunk_bytes: u64,
    #[serde(default = "defaults::install_snapshot_timeout_ms")]
    pub install_snapshot_timeout_ms: u64,
    #[serde(default = "defaults::append_entries_max")]
    pub append_entries_max: u64,
    #[serde(default = "defaults::write_timeout_ms")]
    pub write_timeout_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        toml::from_str("").expect("every raft field has a default")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Create the cluster from `initial_members` if this node has no state yet.
    #[serde(default)]
    pub bootstrap: bool,
    #[serde(default)]
    pub initial_members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: NodeId,
    pub region: String,
    pub peer_id: String,
    pub p2p_addr: String,
    #[serde(default)]
    pub api_url: String,
    #[serde(default)]
    pub admin_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    #[serde(default = "defaults::log_format")]
    pub format: String,
    /// A tracing filter, e.g. `info` or `info,hie_replica=debug`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: defaults::log_format(), level: defaults::log_level() }
    }
}

/// Defaults, in one place: shared by serde, `Default` and the template.
pub mod defaults {
    use hie_api::ApiLimits;
    use hie_replica::RaftTuning;

    fn api() -> ApiLimits {
        ApiLimits::default()
    }
    fn raft() -> RaftTuning {
        RaftTuning::default()
    }
    pub fn p2p_request_timeout_ms() -> u64 {
        3_000
    }
    pub fn p2p_message_bytes_max() -> usize {
        16 << 20
    }
    pub fn p2p_connections_max() -> u32 {
        256
    }
    pub fn body_bytes_max() -> usize {
        api().body_bytes_max
    }
    pub fn bundle_entries_max() -> usize {
        api().bundle_entries_max
    }
    pub fn json_depth_max() -> usize {
        api().json_depth_max
    }
    pub fn header_bytes_max() -> usize {
        api().header_bytes_max
    }
    pub fn page_size_max() -> usize {
        api().page_size_max
    }
    pub fn connections_max() -> usize {
        api().connections_max
    }
    pub fn connections_per_address_max() -> usize {
        api().connections_per_address_max
    }
    pub fn handshakes_per_address_max() -> usize {
        api().handshakes_per_address_max
    }
    pub fn connections_per_organisation_max() -> usize {
        api().connections_per_organisation_max
    }
    pub fn tls_handshake_timeout_ms() -> u64 {
        api().tls_handshake_timeout.as_millis() as u64
    }
    pub fn header_read_timeout_ms() -> u64 {
        api().header_read_timeout.as_millis() as u64
    }
    pub fn idle_timeout_ms() -> u64 {
        api().idle_timeout.as_millis() as u64
    }
    pub fn connection_age_max_ms() -> u64 {
        api().connection_age_max.as_millis() as u64
    }
    pub fn request_timeout_ms() -> u64 {
        api().request_timeout.as_millis() as u64
    }
    pub fn rate_per_client_per_sec() -> u32 {
        api().rate_per_client_per_sec
    }
    pub fn rate_burst() -> u32 {
        api().rate_burst
    }
    pub fn break_glass_per_org_per_hour() -> u32 {
        api().break_glass_per_org_per_hour
    }
    pub fn heartbeat_interval_ms() -> u64 {
        raft().heartbeat_interval.as_millis() as u64
    }
    pub fn election_timeout_min_ms() -> u64 {
        raft().election_timeout_min.as_millis() as u64
    }
    pub fn election_timeout_max_ms() -> u64 {
        raft().election_timeout_max.as_millis() as u64
    }
    pub fn snapshot_logs_since_last() -> u64 {
        raft().snapshot_logs_since_last
    }
    pub fn logs_kept_after_snapshot() -> u64 {
        raft().logs_kept_after_snapshot
    }
    pub fn snapshot_chunk_bytes() -> u64 {
        raft().snapshot_chunk_bytes
    }
    pub fn install_snapshot_timeout_ms() -> u64 {
        raft().install_snapshot_timeout.as_millis() as u64
    }
    pub fn append_entries_max() -> u64 {
        raft().append_entries_max
    }
    pub fn write_timeout_ms() -> u64 {
        4_000
    }
    pub fn audit_enabled() -> bool {
        true
    }
    pub fn audit_segment_bytes_max() -> u64 {
        64 << 20
    }
    pub fn audit_write_timeout_ms() -> u64 {
        2_000
    }
    pub fn audit_sync_interval_ms() -> u64 {
        100
    }
    pub fn audit_query_events_max() -> u32 {
        1_000
    }
    pub fn subscriptions_timeout_ms() -> u64 {
        5_000
    }
    pub fn subscriptions_retry_min_ms() -> u64 {
        250
    }
    pub fn subscriptions_retry_max_ms() -> u64 {
        30_000
    }
    pub fn subscriptions_failures_before_error() -> u32 {
        3
    }
    pub fn subscriptions_progress_interval_ms() -> u64 {
        200
    }
    pub fn subscriptions_in_flight_max() -> usize {
        256
    }
    pub fn audit_anchor_interval_ms() -> u64 {
        5_000
    }
    pub fn audit_fanout_timeout_ms() -> u64 {
        2_000
    }
    pub fn log_format() -> String {
        "text".into()
    }
    pub fn log_level() -> String {
        "info".into()
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let config: Config = toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        config.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(config)
    }

    /// Checks values serde cannot; each error names its field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node.id == 0 {
            bail!("node.id: must be 1 or more");
        }
        if self.node.region.trim().is_empty() {
            bail!("node.region: must not be empty");
        }
        if !self.node.data_dir.is_absolute() {
            bail!("node.data_dir: must be an absolute path");
        }
        self.p2p.listen.parse::<Multiaddr>().map_err(|e| anyhow::anyhow!("p2p.listen: {e}"))?;
        if let Some(a) = &self.p2p.advertise {
            a.parse::<Multiaddr>().map_err(|e| anyhow::anyhow!("p2p.advertise: {e}"))?;
        }
        for (i, s) in self.p2p.seeds.iter().enumerate() {
            s.peer_id.parse::<PeerId>().map_err(|e| anyhow::anyhow!("p2p.seeds[{i}].peer_id: {e}"))?;
            s.addr.parse::<Multiaddr>().map_err(|e| anyhow::anyhow!("p2p.seeds[{i}].addr: {e}"))?;
        }
        if self.p2p.message_bytes_max < (self.raft.snapshot_chunk_bytes as usize) * 2 {
            bail!("p2p.message_bytes_max: must be at least twice raft.snapshot_chunk_bytes");
        }
        // A batch becomes one Raft entry: it must fit what the log accepts,
        // or a Bundle within the body limit would stop the leader's appends.
        let entry_max = StoreOptions::default().entry_bytes_max;
        let batch_entry = self.api.body_bytes_max * 2 + self.api.bundle_entries_max * BATCH_ENTRY_OVERHEAD_BYTES;
        if batch_entry > entry_max {
            bail!(
                "api.body_bytes_max and api.bundle_entries_max: a full batch could encode to {batch_entry} bytes, more than the Raft log's entry limit of {entry_max} bytes; lower them"
            );
        }
        if self.p2p.message_bytes_max < self.api.body_bytes_max * 4 {
            bail!(
                "p2p.message_bytes_max: must be at least four times api.body_bytes_max (a forwarded write carries the pointer)"
            );
        }
        if !self.api.public_url.starts_with("https://") || !self.api.public_url.ends_with("/fhir") {
            bail!("api.public_url: must be https://HOST:PORT/fhir");
        }
        let crl = self.api.crl.iter().map(|p| ("api.crl", p));
        for (name, p) in
            [("api.cert", &self.api.cert), ("api.key", &self.api.key), ("api.ca", &self.api.ca)].into_iter().chain(crl)
        {
            if !p.exists() {
                bail!("{name}: {} does not exist", p.display());
            }
        }
        if self.api.page_size_max == 0 {
            bail!("api.page_size_max: must be 1 or more");
        }
        if self.api.rate_burst < 1 {
            bail!("api.rate_burst: must be 1 or more");
        }
        let glass_max = hie_api::BREAK_GLASS_PER_ORG_PER_HOUR_MAX;
        if !(1..=glass_max).contains(&self.api.break_glass_per_org_per_hour) {
            bail!("api.break_glass_per_org_per_hour: must be from 1 to {glass_max}");
        }
        let api = &self.api;
        if api.connections_max == 0 {
            bail!("api.connections_max: must be 1 or more");
        }
        if api.connections_per_address_max == 0 || api.connections_per_address_max > api.connections_max {
            bail!("api.connections_per_address_max: must be 1 to api.connections_max");
        }
        if api.handshakes_per_address_max == 0 || api.handshakes_per_address_max > api.connections_per_address_max {
            bail!("api.handshakes_per_address_max: must be 1 to api.connections_per_address_max");
        }
        if api.connections_per_organisation_max == 0 || api.connections_per_organisation_max > api.connections_max {
            bail!("api.connections_per_organisation_max: must be 1 to api.connections_max");
        }
        for (name, ms) in [
            ("api.tls_handshake_timeout_ms", api.tls_handshake_timeout_ms),
            ("api.header_read_timeout_ms", api.header_read_timeout_ms),
            ("api.idle_timeout_ms", api.idle_timeout_ms),
        ] {
            if ms == 0 {
                bail!("{name}: must be above 0");
            }
        }
        if api.connection_age_max_ms <= api.request_timeout_ms {
            bail!("api.connection_age_max_ms: must be above api.request_timeout_ms");
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 || r.heartbeat_interval_ms * 3 > r.election_timeout_min_ms {
            bail!("raft.heartbeat_interval_ms: must be above 0 and at most a third of raft.election_timeout_min_ms");
        }
        if r.election_timeout_min_ms >= r.election_timeout_max_ms {
            bail!("raft.election_timeout_max_ms: must be greater than raft.election_timeout_min_ms");
        }
        if r.write_timeout_ms < r.election_timeout_max_ms || r.write_timeout_ms >= self.api.request_timeout_ms {
            bail!(
                "raft.write_timeout_ms: must be at least raft.election_timeout_max_ms and below api.request_timeout_ms"
            );
        }
        if self.log.format != "text" && self.log.format != "json" {
            bail!("log.format: must be text or json");
        }
        let a = &self.audit;
        if let Some(d) = &a.dir
            && !d.is_absolute()
        {
            bail!("audit.dir: must be an absolute path");
        }
        if !a.enabled && !a.benchmark_only_without_audit {
            bail!(
                "audit.enabled = false: refused: a node that serves patient data records every access; on a node that serves only test data for a benchmark, set audit.benchmark_only_without_audit = true as well"
            );
        }
        if a.segment_bytes_max < 64 << 10 {
            bail!("audit.segment_bytes_max: must be at least 65536");
        }
        if a.query_events_max == 0 {
            bail!("audit.query_events_max: must be 1 or more");
        }
        if a.sync_interval_ms == 0 || a.sync_interval_ms > 1_000 {
            bail!("audit.sync_interval_ms: must be 1 to 1000");
        }
        if a.write_timeout_ms == 0 || a.write_timeout_ms >= self.api.request_timeout_ms {
            bail!("audit.write_timeout_ms: must be above 0 and below api.request_timeout_ms");
        }
        if !(100..=600_000).contains(&a.anchor_interval_ms) {
            bail!("audit.anchor_interval_ms: must be from 100 to 600000");
        }
        let sub = &self.subscriptions;
        if !(100..=60_000).contains(&sub.timeout_ms) {
            bail!("subscriptions.timeout_ms: must be from 100 to 60000");
        }
        if sub.retry_min_ms == 0 || sub.retry_min_ms > sub.retry_max_ms || sub.retry_max_ms > 600_000 {
            bail!("subscriptions.retry_min_ms, retry_max_ms: must be above 0, min at most max, max at most 600000");
        }
        if sub.failures_before_error == 0 {
            bail!("subscriptions.failures_before_error: must be 1 or more");
        }
        if !(10..=10_000).contains(&sub.progress_interval_ms) {
            bail!("subscriptions.progress_interval_ms: must be from 10 to 10000");
        }
        if !(1..=10_000).contains(&sub.in_flight_max) {
            bail!("subscriptions.in_flight_max: must be from 1 to 10000");
        }
        if let Some(b) = &sub.ca_bundle
            && !b.is_absolute()
        {
            bail!("subscriptions.ca_bundle: must be an absolute path");
        }
        if a.fanout_timeout_ms == 0 || a.fanout_timeout_ms >= self.api.request_timeout_ms {
            bail!("audit.fanout_timeout_ms: must be above 0 and below api.request_timeout_ms");
        }
        if self.cluster.bootstrap && self.cluster.initial_members.is_empty() {
            bail!("cluster.initial_members: needed when cluster.bootstrap is true");
        }
        for (i, m) in self.cluster.initial_members.iter().enumerate() {
            m.peer_id.parse::<PeerId>().map_err(|e| anyhow::anyhow!("cluster.initial_members[{i}].peer_id: {e}"))?;
            m.p2p_addr
                .parse::<Multiaddr>()
                .map_err(|e| anyhow::anyhow!("cluster.initial_members[{i}].p2p_addr: {e}"))?;
        }
        Ok(())
    }

    pub fn advertise(&self) -> &str {
        self.p2p.advertise.as_deref().unwrap_or(&self.p2p.listen)
    }

    pub fn node_info(&self, peer_id: &PeerId) -> NodeInfo {
        NodeInfo {
            peer_id: peer_id.to_string(),
            p2p_addr: self.advertise().to_owned(),
            region: self.node.region.clone(),
            api_url: self.api.public_url.clone(),
            admin_url: self.admin.public_url.clone(),
        }
    }

    pub fn replica_config(&self, peer_id: &PeerId) -> ReplicaConfig {
        let r = &self.raft;
        let mut seeds: Vec<(PeerId, Multiaddr)> =
            self.p2p.seeds.iter().filter_map(|s| Some((s.peer_id.parse().ok()?, s.addr.parse().ok()?))).collect();
        for m in &self.cluster.initial_members {
            if let (Ok(p), Ok(a)) = (m.peer_id.parse(), m.p2p_addr.parse()) {
                seeds.push((p, a));
            }
        }
        seeds.retain(|(p, _)| p != peer_id);
        ReplicaConfig {
            node_id: self.node.id,
            node: self.node_info(peer_id),
            data_dir: self.node.data_dir.clone(),
            raft: RaftTuning {
                heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
                election_timeout_min: Duration::from_millis(r.election_timeout_min_ms),
                election_timeout_max: Duration::from_millis(r.election_timeout_max_ms),
                snapshot_logs_since_last: r.snapshot_logs_since_last,
                logs_kept_after_snapshot: r.logs_kept_after_snapshot,
                snapshot_chunk_bytes: r.snapshot_chunk_bytes,
                install_snapshot_timeout: Duration::from_millis(r.install_snapshot_timeout_ms),
                append_entries_max: r.append_entries_max,
            },
            p2p: P2pConfig {
                listen: self.p2p.listen.parse().expect("validated"),
                seeds,
                // The transport's bound on any request. Each caller waits
                // less (its own timeout), except a snapshot's last chunk,
                // whose answer waits for the whole install.
                request_timeout: Duration::from_millis(self.p2p.request_timeout_ms.max(r.install_snapshot_timeout_ms)),
                message_bytes_max: self.p2p.message_bytes_max,
                connections_max: self.p2p.connections_max,
                reconnect_backoff_min: Duration::from_millis(100),
                reconnect_backoff_max: Duration::from_secs(10),
                concurrent_streams_max: 256,
            },
            store: StoreOptions::default(),
            write_timeout: Duration::from_millis(r.write_timeout_ms),
        }
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit.dir.clone().unwrap_or_else(|| self.node.data_dir.join("audit"))
    }

    /// The audit log's settings, or `None` when auditing is off.
    pub fn audit_config(&self) -> Option<hie_audit::AuditConfig> {
        let a = &self.audit;
        a.enabled.then(|| hie_audit::AuditConfig {
            segment_bytes_max: a.segment_bytes_max,
            write_timeout: Duration::from_millis(a.write_timeout_ms),
            sync_interval: Duration::from_millis(a.sync_interval_ms),
            sync_every_access: a.sync_every_access,
            ..hie_audit::AuditConfig::new(self.audit_dir())
        })
    }

    pub fn api_config(&self) -> ApiConfig {
        let a = &self.api;
        ApiConfig {
            listen: a.listen,
            cert: a.cert.clone(),
            key: a.key.clone(),
            ca: a.ca.clone(),
            crl: a.crl.clone(),
            base_url: a.public_url.clone(),
            subscription_hosts: self.subscriptions.endpoint_hosts.clone(),
            limits: ApiLimits {
                body_bytes_max: a.body_bytes_max,
                bundle_entries_max: a.bundle_entries_max,
                json_depth_max: a.json_depth_max,
                header_bytes_max: a.header_bytes_max,
                page_size_max: a.page_size_max,
                connections_max: a.connections_max,
                connections_per_address_max: a.connections_per_address_max,
                handshakes_per_address_max: a.handshakes_per_address_max,
                connections_per_organisation_max: a.connections_per_organisation_max,
                request_timeout: Duration::from_millis(a.request_timeout_ms),
                tls_handshake_timeout: Duration::from_millis(a.tls_handshake_timeout_ms),
                header_read_timeout: Duration::from_millis(a.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(a.idle_timeout_ms),
                connection_age_max: Duration::from_millis(a.connection_age_max_ms),
                rate_per_client_per_sec: a.rate_per_client_per_sec,
                rate_burst: a.rate_burst,
                break_glass_per_org_per_hour: a.break_glass_per_org_per_hour,
                audit_query_events_max: self.audit.query_events_max,
                audit_fanout_timeout: Duration::from_millis(self.audit.fanout_timeout_ms),
                ..ApiLimits::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(dir: &Path) -> String {
        let pem = dir.join("x.pem");
        std::fs::write(&pem, "x").unwrap();
        format!(
            r#"
[node]
id = 1
region = "north-east"
data_dir = "{d}"
[p2p]
listen = "/ip4/127.0.0.1/tcp/7001"
[api]
listen = "127.0.0.1:8443"
public_url = "https://127.0.0.1:8443/fhir"
cert = "{p}"
key = "{p}"
ca = "{p}"
[admin]
listen = "127.0.0.1:9001"
public_url = "http://127.0.0.1:9001"
"#,
            d = dir.display(),
            p = pem.display()
        )
    }

    #[test]
    fn minimal_config_is_valid_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let c: Config = toml::from_str(&minimal(dir.path())).unwrap();
        c.validate().unwrap();
        assert_eq!(c.raft.write_timeout_ms, defaults::write_timeout_ms());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace("[admin]", "[admin]\nlisten_port = 3");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace("id = 1", "id = 0");
        let err = toml::from_str::<Config>(&text).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("node.id"), "{err}");
        let text = minimal(dir.path()).replace("[admin]", "[raft]\nelection_timeout_min_ms = 2000\n[admin]");
        let err = toml::from_str::<Config>(&text).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("raft.election_timeout_max_ms"), "{err}");
    }

    /// The break-glass limit: a default that reaches the API, and a value
    /// out of range refused naming the field.
    #[test]
    fn break_glass_limit_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let c: Config = toml::from_str(&minimal(dir.path())).unwrap();
        assert_eq!(c.api_config().limits.break_glass_per_org_per_hour, hie_api::BREAK_GLASS_PER_ORG_PER_HOUR);
        let max = hie_api::BREAK_GLASS_PER_ORG_PER_HOUR_MAX;
        for n in [0, max + 1] {
            let line = format!("break_glass_per_org_per_hour = {n}");
            let text = minimal(dir.path()).replace("[admin]", &format!("{line}\n[admin]"));
            let err = toml::from_str::<Config>(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.starts_with("api.break_glass_per_org_per_hour"), "{line}: {err}");
        }
        let text = minimal(dir.path()).replace("[admin]", "break_glass_per_org_per_hour = 3\n[admin]");
        let c: Config = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.api_config().limits.break_glass_per_org_per_hour, 3);
    }

    /// A node without an audit log starts only when told it serves a benchmark.
    #[test]
    fn audit_off_is_refused_unless_it_is_a_benchmark() {
        let dir = tempfile::tempdir().unwrap();
        let off = minimal(dir.path()) + "[audit]\nenabled = false\n";
        let err = toml::from_str::<Config>(&off).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("audit.enabled = false: refused"), "{err}");
        let bench = off + "benchmark_only_without_audit = true\n";
        toml::from_str::<Config>(&bench).unwrap().validate().unwrap();
    }

    /// A body limit that would let a full batch outgrow a Raft entry is refused.
    #[test]
    fn a_batch_must_fit_a_raft_entry() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace("[admin]", "body_bytes_max = 4194304\n[admin]");
        let err = toml::from_str::<Config>(&text).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("api.body_bytes_max and api.bundle_entries_max"), "{err}");
    }

    /// Connection limits that contradict each other are refused, naming the field.
    #[test]
    fn connection_limits_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for (line, field) in [
            ("connections_per_address_max = 2000", "api.connections_per_address_max"),
            ("handshakes_per_address_max = 300", "api.handshakes_per_address_max"),
            ("connections_per_organisation_max = 0", "api.connections_per_organisation_max"),
            ("idle_timeout_ms = 0", "api.idle_timeout_ms"),
            ("connection_age_max_ms = 1000", "api.connection_age_max_ms"),
        ] {
            let text = minimal(dir.path()).replace("[admin]", &format!("{line}\n[admin]"));
            let err = toml::from_str::<Config>(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{line}: {err}");
        }
        let c: Config = toml::from_str(&minimal(dir.path())).unwrap();
        let limits = c.api_config().limits;
        assert_eq!(limits.handshakes_per_address_max, defaults::handshakes_per_address_max());
        assert_eq!(limits.idle_timeout, Duration::from_millis(defaults::idle_timeout_ms()));
    }

    #[test]
    fn the_template_parses() {
        let text = include_str!("../../cluster/node.example.toml");
        let c: Config = toml::from_str(text).expect("cluster/node.example.toml parses");
        assert_eq!(c.raft.heartbeat_interval_ms, defaults::heartbeat_interval_ms());
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    /// Every field of the configuration appears in the commented template.
    #[test]
    fn the_template_documents_every_field() {
        let template = include_str!("../../cluster/node.example.toml");
        let mut c: Config = toml::from_str(template).unwrap();
        c.p2p.advertise = Some("/ip4/10.0.0.1/tcp/7001".into());
        c.p2p.seeds = vec![SeedPeer { peer_id: "p".into(), addr: "a".into() }];
        c.cluster.initial_members = vec![Member {
            id: 1,
            region: "r".into(),
            peer_id: "p".into(),
            p2p_addr: "a".into(),
            api_url: "u".into(),
            admin_url: "v".into(),
        }];
        let full = toml::Value::try_from(&c).unwrap();
        fn keys(v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let mut all = vec![];
        keys(&full, &mut all);
        let undocumented: Vec<_> = all
            .iter()
            .filter(|k| {
                !template.contains(&format!("[{k}]"))
                    && !template.contains(&format!("{k} ="))
                    && !template.contains(&format!("[[{k}"))
                    && !template.contains(&format!(".{k}]]"))
            })
            .collect();
        assert!(undocumented.is_empty(), "fields missing from cluster/node.example.toml: {undocumented:?}");
    }
}
