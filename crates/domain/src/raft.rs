//! openraft's type configuration for the cluster, and the node record kept in
//! the membership.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};

pub type NodeId = u64;

/// What the membership records about a node: enough to reach it and to
/// check its identity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The libp2p PeerId (base58) derived from the node's persistent key.
    pub peer_id: String,
    /// The libp2p multiaddr peers dial.
    pub p2p_addr: String,
    pub region: String,
    #[serde(default)]
    pub api_url: String,
    #[serde(default)]
    pub admin_url: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.region, self.p2p_addr)
    }
}

openraft::declare_raft_types!(
    /// The cluster's Raft types.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        // A file: snapshots are built into, sent from, received into and
        // installed from files, never held whole in memory.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
