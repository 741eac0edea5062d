//! A replica of the cluster: Raft (openraft), the RocksDB store and the libp2p
//! transport wired together. It answers reads from the local state, sends
//! writes through the leader (forwarding them when this node is not the
//! leader), serves linearizable reads by the leader's read index, tracks how
//! fresh its state is, and changes the membership.
//!
//! It knows nothing of HTTP or FHIR: the API crate calls it.

mod coalesce;
mod config;
mod freshness;
mod inbound;
mod proposals;
mod replica;

pub use config::{RaftTuning, ReplicaConfig};
pub use freshness::Freshness;
pub use replica::{AuditAnswer, ClusterStatus, MemberStatus, MembershipError, ReadError, Replica, WriteError};
