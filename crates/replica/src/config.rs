//! The replica's settings.

use std::path::PathBuf;
use std::time::Duration;

use hie_domain::raft::{NodeId, NodeInfo};
use hie_p2p::P2pConfig;
use hie_store::StoreOptions;
use openraft::SnapshotPolicy;

#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind the snapshot (for followers slightly behind).
    pub logs_kept_after_snapshot: u64,
    pub snapshot_chunk_bytes: u64,
    /// Most entries in one append-entries message.
    pub append_entries_max: u64,
    pub install_snapshot_timeout: Duration,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval: Duration::from_millis(100),
            // openraft will not start an election until its leader lease
            // (the maximum timeout) and then a random timeout have passed
            // since it last heard the leader: 1.1 s to 1.4 s here, so that
            // writes resume within 2 s of a leader's death (500 to 1000 ms
            // gave 1.5 s to 2.0 s, and failovers of up to 2.3 s).
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(700),
            snapshot_logs_since_last: 5000,
            logs_kept_after_snapshot: 1000,
            snapshot_chunk_bytes: 2 << 20,
            append_entries_max: 256,
            install_snapshot_timeout: Duration::from_secs(60),
        }
    }
}

impl RaftTuning {
    /// openraft's settings for these (to validate before use).
    pub(crate) fn openraft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "hie".into(),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            install_snapshot_timeout: self.install_snapshot_timeout.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.append_entries_max,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub node: NodeInfo,
    pub data_dir: PathBuf,
    pub raft: RaftTuning,
    pub p2p: P2pConfig,
    pub store: StoreOptions,
    /// The longest a write waits for its commit before answering no-quorum.
    pub write_timeout: Duration,
}

impl ReplicaConfig {
    /// Reads are flagged stale when this node has not been in contact with a
    /// quorum for longer than this: twice the longest election timeout.
    pub fn stale_after(&self) -> Duration {
        self.raft.election_timeout_max * 2
    }
}
