//! Every Prometheus metric a hie node exports, declared in one place. Names
//! follow `hie_<subsystem>_<thing>_{total,seconds,bytes}`; the dashboard and
//! alert rules in `ops/` use only names declared here.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The node's metrics. Built once at start-up and shared.
pub struct Metrics {
    pub registry: Registry,

    pub raft_term: IntGauge,
    pub raft_leader_id: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_last_log_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_committed_index: IntGauge,
    pub raft_snapshot_index: IntGauge,
    pub raft_purged_index: IntGauge,
    pub raft_replication_lag_entries: IntGaugeVec,
    pub raft_voters: IntGauge,
    pub raft_learners: IntGauge,
    pub raft_millis_since_quorum_ack: IntGauge,
    pub raft_stale: IntGauge,
    pub raft_leader_changes_total: IntCounter,
    pub raft_commit_seconds: Histogram,
    pub raft_log_fsyncs_total: IntCounter,
    pub raft_batched_writes_total: IntCounter,
    pub raft_log_entries_appended_total: IntCounter,
    pub raft_log_entry_bytes_total: IntCounter,
    pub raft_log_entry_bytes_max: IntGauge,

    pub raft_apply_lag_entries: IntGauge,
    pub raft_apply_lag_seconds: prometheus::Gauge,
    pub snapshots_built_total: IntCounter,
    pub snapshots_installed_total: IntCounter,
    pub snapshot_files_damaged_total: IntCounter,
    pub snapshot_last_size_bytes: IntGauge,
    pub snapshot_last_build_seconds: prometheus::Gauge,
    pub snapshot_last_install_seconds: prometheus::Gauge,
    pub disk_free_bytes: IntGauge,
    pub disk_total_bytes: IntGauge,
    pub tls_cert_expiry_timestamp_seconds: IntGauge,
    pub tls_reloads_total: IntCounter,
    pub tls_files_failing: IntGauge,
    pub tls_revoked_certificates: IntGauge,

    pub writes_total: IntCounterVec,
    pub forwarded_writes_total: IntCounterVec,
    pub p2p_non_member_requests_total: IntCounterVec,

    pub api_requests_total: IntCounterVec,
    pub api_request_duration_seconds: HistogramVec,
    pub api_rejected_total: IntCounterVec,
    pub api_tls_handshake_failures_total: IntCounter,
    /// Connections the API listener closed at once, by the limit reached.
    pub api_connections_refused_total: IntCounterVec,
    /// Connections the API listener closed because a timeout passed.
    pub api_connections_closed_total: IntCounterVec,
    /// Connections the API listener holds, in the TLS handshake and open.
    pub api_connections: IntGaugeVec,

    pub pointers: IntGauge,
    pub patients: IntGauge,
    pub rocksdb_size_bytes: IntGauge,
    pub rocksdb_memtable_bytes: IntGauge,
    pub reads_from_disk_total: IntCounter,

    pub p2p_connected_peers: IntGauge,
    pub p2p_refused_connections_total: IntCounter,
    pub p2p_inbound_failures_total: IntCounter,
    pub p2p_outbound_failures_total: IntCounter,

    pub audit_events_total: IntCounter,
    pub audit_write_failures_total: IntCounter,
    /// 1 once an audit fsync failed: the log stopped until the node restarts.
    pub audit_stopped: IntGauge,
    /// The sequence number of this node's audit record last anchored in the
    /// replicated state.
    pub audit_anchored_seq: IntGauge,
    /// 1 when this node's audit chain does not hold the head the cluster
    /// anchored for it (records cut off or rewritten).
    pub audit_anchor_mismatch: IntGauge,
    pub audit_write_seconds: Histogram,
    pub audit_queries_total: IntCounterVec,
    pub break_glass_total: IntCounter,
    /// Break-glass attempts refused, by why (`not_permitted`, `limit`).
    pub break_glass_refused_total: IntCounterVec,
    /// Current pointers moved to a surviving NHS Number by merges this node answered.
    pub merged_pointers_total: IntCounter,
    /// Subscriptions by status, as this replica holds them.
    pub subscriptions: IntGaugeVec,
    /// Events made and not yet acknowledged by their endpoints (replicated view).
    pub subscription_events_waiting: IntGauge,
    /// 1 on the node delivering notifications (the leader).
    pub subscription_deliverer: IntGauge,
    /// Notifications this node sent, by type and result.
    pub subscription_notifications_total: IntCounterVec,
    /// Events acknowledged by endpoints (2xx) after this node sent them.
    pub subscription_events_delivered_total: IntCounter,
    /// Notifications sent again after a failure.
    pub subscription_retries_total: IntCounter,
    /// From an event's change (its command's time) to the endpoint's 2xx.
    pub subscription_delivery_seconds: Histogram,
}

/// Latency buckets from 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone())).expect("metric names are unique");
                m
            }};
        }
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        Metrics {
            raft_term: reg!(gauge("hie_raft_term", "Current Raft term.")),
            raft_leader_id: reg!(gauge("hie_raft_leader_id", "Node id of the current leader, 0 while there is none.")),
            raft_is_leader: reg!(gauge("hie_raft_is_leader", "1 if this node is the leader.")),
            raft_last_log_index: reg!(gauge("hie_raft_last_log_index", "Index of the last entry in this node's log.")),
            raft_applied_index: reg!(gauge(
                "hie_raft_applied_index",
                "Index of the last entry applied to the state machine."
            )),
            raft_committed_index: reg!(gauge(
                "hie_raft_committed_index",
                "Highest log index known committed (leader view)."
            )),
            raft_snapshot_index: reg!(gauge(
                "hie_raft_snapshot_index",
                "Last log index included in the current snapshot."
            )),
            raft_purged_index: reg!(gauge("hie_raft_purged_index", "Last purged log index.")),
            raft_replication_lag_entries: reg!(
                IntGaugeVec::new(
                    Opts::new(
                        "hie_raft_replication_lag_entries",
                        "Entries each peer is behind the leader's log (on the leader)."
                    ),
                    &["peer"]
                )
                .expect("valid metric")
            ),
            raft_voters: reg!(gauge("hie_raft_voters", "Voters in the membership.")),
            raft_learners: reg!(gauge("hie_raft_learners", "Learners in the membership.")),
            raft_millis_since_quorum_ack: reg!(gauge(
                "hie_raft_millis_since_quorum_ack",
                "On the leader, milliseconds since a quorum last acknowledged it; -1 elsewhere."
            )),
            raft_stale: reg!(gauge(
                "hie_raft_stale",
                "1 when this node cannot confirm contact with a quorum (reads are stale)."
            )),
            raft_leader_changes_total: reg!(counter(
                "hie_raft_leader_changes_total",
                "Times this node saw the leader change."
            )),
            raft_commit_seconds: reg!(
                Histogram::with_opts(
                    HistogramOpts::new("hie_raft_commit_seconds", "Time from proposing a write to its being applied.")
                        .buckets(LATENCY_BUCKETS.to_vec())
                )
                .expect("valid metric")
            ),
            raft_batched_writes_total: reg!(counter(
                "hie_raft_batched_writes_total",
                "Writes proposed grouped with others in one log entry (on the leader)."
            )),
            raft_log_fsyncs_total: reg!(counter(
                "hie_raft_log_fsyncs_total",
                "WAL fsyncs made for log appends (group commits)."
            )),
            raft_log_entries_appended_total: reg!(counter(
                "hie_raft_log_entries_appended_total",
                "Log entries appended."
            )),
            raft_log_entry_bytes_total: reg!(counter(
                "hie_raft_log_entry_bytes_total",
                "Bytes of the log entries appended (with hie_raft_log_entries_appended_total: their mean size)."
            )),
            raft_log_entry_bytes_max: reg!(gauge(
                "hie_raft_log_entry_bytes_max",
                "The largest log entry this node has appended since it started, in bytes (refused above the store's entry_bytes_max, 4 MiB)."
            )),
            raft_apply_lag_entries: reg!(gauge(
                "hie_raft_apply_lag_entries",
                "Entries this replica has yet to apply of the leader's commit index as last heard (0 on the leader)."
            )),
            raft_apply_lag_seconds: reg!(
                prometheus::Gauge::new(
                    "hie_raft_apply_lag_seconds",
                    "How long this replica has been behind the leader's commit."
                )
                .expect("valid metric")
            ),
            snapshots_built_total: reg!(counter("hie_snapshots_built_total", "Snapshots built by this node.")),
            snapshots_installed_total: reg!(counter(
                "hie_snapshots_installed_total",
                "Snapshots received and installed."
            )),
            snapshot_files_damaged_total: reg!(counter(
                "hie_snapshot_files_damaged_total",
                "Snapshot files found damaged (failing their checksum) and set aside; a new one is built from the state."
            )),
            snapshot_last_size_bytes: reg!(gauge(
                "hie_snapshot_last_size_bytes",
                "Size of the last snapshot built or installed."
            )),
            snapshot_last_build_seconds: reg!(
                prometheus::Gauge::new("hie_snapshot_last_build_seconds", "How long the last snapshot build took.")
                    .expect("valid metric")
            ),
            snapshot_last_install_seconds: reg!(
                prometheus::Gauge::new("hie_snapshot_last_install_seconds", "How long the last snapshot install took.")
                    .expect("valid metric")
            ),
            disk_free_bytes: reg!(gauge("hie_disk_free_bytes", "Free bytes on the filesystem of the data directory.")),
            disk_total_bytes: reg!(gauge("hie_disk_total_bytes", "Size of the filesystem of the data directory.")),
            tls_cert_expiry_timestamp_seconds: reg!(gauge(
                "hie_tls_cert_expiry_timestamp_seconds",
                "When the API server certificate expires (Unix time)."
            )),
            writes_total: reg!(counter_vec(
                "hie_writes_total",
                "Writes by command kind and result.",
                &["kind", "result"]
            )),
            forwarded_writes_total: reg!(counter_vec(
                "hie_forwarded_writes_total",
                "Writes forwarded to the leader (direction out) or received from another node (in).",
                &["direction"]
            )),
            p2p_non_member_requests_total: reg!(counter_vec(
                "hie_p2p_non_member_requests_total",
                "Requests refused because the peer is not in the membership (forwarded writes, votes, read-index, audit queries).",
                &["kind"]
            )),
            api_requests_total: reg!(counter_vec(
                "hie_api_requests_total",
                "API requests by route and status.",
                &["route", "status"]
            )),
            api_request_duration_seconds: reg!(
                HistogramVec::new(
                    HistogramOpts::new("hie_api_request_duration_seconds", "API request duration by route.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route"]
                )
                .expect("valid metric")
            ),
            api_rejected_total: reg!(counter_vec(
                "hie_api_rejected_total",
                "API requests refused, by reason code.",
                &["reason"]
            )),
            tls_reloads_total: reg!(counter(
                "hie_tls_reloads_total",
                "Times a changed TLS certificate, key, CA bundle or CRL was taken up without a restart."
            )),
            tls_files_failing: reg!(gauge(
                "hie_tls_files_failing",
                "1 while the TLS files have changed but do not load (the last good ones stay in use)."
            )),
            tls_revoked_certificates: reg!(gauge(
                "hie_tls_revoked_certificates",
                "Client certificates the CRLs in force list."
            )),
            api_tls_handshake_failures_total: reg!(counter(
                "hie_api_tls_handshake_failures_total",
                "Client TLS handshakes that failed."
            )),
            api_connections_refused_total: reg!(counter_vec(
                "hie_api_connections_refused_total",
                "API connections closed as soon as accepted or after TLS, by the limit reached (connections_max, address_connections, address_handshakes, organisation_connections).",
                &["reason"]
            )),
            api_connections_closed_total: reg!(counter_vec(
                "hie_api_connections_closed_total",
                "API connections closed by the server because a timeout passed (handshake_timeout, header_read_timeout, idle, age_max).",
                &["reason"]
            )),
            api_connections: reg!(
                IntGaugeVec::new(
                    Opts::new(
                        "hie_api_connections",
                        "API connections held now: in the TLS handshake (handshake) and past it (open)."
                    ),
                    &["state"]
                )
                .expect("valid metric")
            ),
            pointers: reg!(gauge("hie_pointers", "Record pointers in this replica (estimate).")),
            patients: reg!(gauge("hie_patients", "Patients in this replica's index (estimate).")),
            rocksdb_size_bytes: reg!(gauge("hie_rocksdb_size_bytes", "Size of the RocksDB SST files.")),
            rocksdb_memtable_bytes: reg!(gauge("hie_rocksdb_memtable_bytes", "Bytes in RocksDB memtables.")),
            reads_from_disk_total: reg!(counter(
                "hie_reads_from_disk_total",
                "Local reads that needed the disk (not all in memory), so ran again on a blocking thread."
            )),
            p2p_connected_peers: reg!(gauge("hie_p2p_connected_peers", "Peers with an open libp2p connection.")),
            p2p_refused_connections_total: reg!(counter(
                "hie_p2p_refused_connections_total",
                "Incoming p2p connections refused."
            )),
            p2p_inbound_failures_total: reg!(counter(
                "hie_p2p_inbound_failures_total",
                "Inbound p2p messages refused or failed."
            )),
            p2p_outbound_failures_total: reg!(counter(
                "hie_p2p_outbound_failures_total",
                "Outbound p2p requests that failed."
            )),
            audit_events_total: reg!(counter("hie_audit_events_total", "Audit events written.")),
            audit_write_failures_total: reg!(counter(
                "hie_audit_write_failures_total",
                "Failed audit writes, fsyncs and index writes (a failed write or fsync fails its requests: fail closed)."
            )),
            audit_stopped: reg!(gauge(
                "hie_audit_stopped",
                "1 once an audit fsync failed: the audit log stopped and the node refuses patient-data requests until it is restarted."
            )),
            audit_anchored_seq: reg!(gauge(
                "hie_audit_anchored_seq",
                "Sequence number of this node's last audit record anchored in the replicated state."
            )),
            audit_anchor_mismatch: reg!(gauge(
                "hie_audit_anchor_mismatch",
                "1 when this node's audit chain does not hold the head the cluster anchored for it (records cut off or rewritten); the node stops anchoring."
            )),
            audit_write_seconds: reg!(
                Histogram::with_opts(
                    HistogramOpts::new(
                        "hie_audit_write_seconds",
                        "Time for one audit record to be acknowledged: written to the OS, and for a change fsynced too."
                    )
                    .buckets(LATENCY_BUCKETS.to_vec())
                )
                .expect("valid histogram")
            ),
            audit_queries_total: reg!(counter_vec(
                "hie_audit_queries_total",
                "Audit queries answered for other nodes or asked of them, by result.",
                &["direction", "result"]
            )),
            break_glass_total: reg!(counter("hie_break_glass_total", "Emergency (break-glass) accesses.")),
            break_glass_refused_total: reg!(counter_vec(
                "hie_break_glass_refused_total",
                "Break-glass attempts refused: not_permitted (no break-glass permission in the registry), limit (api.break_glass_per_org_per_hour reached on this node).",
                &["reason"]
            )),
            merged_pointers_total: reg!(counter(
                "hie_merged_pointers_total",
                "Current pointers moved to a surviving NHS Number by merges this node answered."
            )),
            subscriptions: reg!(
                IntGaugeVec::new(
                    Opts::new("hie_subscriptions", "Subscriptions by status (requested, active, error, off)."),
                    &["status"]
                )
                .expect("valid metric")
            ),
            subscription_events_waiting: reg!(gauge(
                "hie_subscription_events_waiting",
                "Subscription events made and not yet acknowledged by their endpoints (as last replicated)."
            )),
            subscription_deliverer: reg!(gauge(
                "hie_subscription_deliverer",
                "1 on the node that delivers notifications (the leader)."
            )),
            subscription_notifications_total: reg!(counter_vec(
                "hie_subscription_notifications_total",
                "Notifications sent by this node, by type (handshake, heartbeat, event-notification) and result (delivered, failed).",
                &["type", "result"]
            )),
            subscription_events_delivered_total: reg!(counter(
                "hie_subscription_events_delivered_total",
                "Subscription events acknowledged (2xx) by their endpoints after this node sent them."
            )),
            subscription_retries_total: reg!(counter(
                "hie_subscription_retries_total",
                "Notifications sent again after a failed attempt."
            )),
            subscription_delivery_seconds: reg!(
                Histogram::with_opts(
                    HistogramOpts::new(
                        "hie_subscription_delivery_seconds",
                        "From a change being made (its command's time) to the endpoint's 2xx for its event."
                    )
                    .buckets(LATENCY_BUCKETS.to_vec())
                )
                .expect("valid histogram")
            ),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_default()
    }
}

/// Brings a counter up to a total kept elsewhere (an atomic in a crate that
/// does not know Prometheus). Totals only grow, so this only adds.
pub fn sync_counter(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
