//! A deterministic simulation of a hie cluster: the real state machine
//! ([`hie_domain::apply`] over [`hie_domain::mem::MemState`]) and the real
//! openraft, over an in-memory network that drops, delays, partitions and
//! restarts on a seeded schedule, with Raft's safety properties checked after
//! every step.
//!
//! Everything runs on one thread with tokio's clock paused, so simulated time
//! costs no wall time and a seed replays exactly (built with
//! `--cfg tokio_unstable`, tokio's own scheduling randomness is seeded too:
//! `tests/sim.sh` does that).

use std::io::Cursor;

use hie_domain::command::{Command, Outcome};
use hie_domain::raft::NodeInfo;

pub mod check;
pub mod net;
pub mod runtime;
pub mod store;
pub mod world;

openraft::declare_raft_types!(
    /// The cluster's Raft types, on the simulation's runtime.
    pub SimConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<SimConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::SimRuntime,
);

pub type NodeId = u64;
pub type Entry = openraft::Entry<SimConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::Snapshot<SimConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<SimConfig>;
