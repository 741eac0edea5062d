//! A replica of the cluster: Raft (openraft), the RocksDB store and the libp2p
//! transport wired together. It answers reads from the local state, sends
//! writes through the leader (forwarding them when this node is not the
//! leader), serves linearizable reads by the leader's read index, tracks how
//! fresh its state is, and changes the membership.
//!
//! It knows nothing of HTTP or FHIR: the API crate calls it.

mod audit_fanout;
mod coalesce;
mod config;
mod error;
mod freshness;
mod gauges;
mod inbound;
mod linearizable;
mod membership;
mod proposals;
mod query;
mod replica;
mod status;
mod writes;

pub use audit_fanout::AuditAnswer;
pub use config::{RaftTuning, ReplicaConfig};
pub use error::{MembershipError, ReadError, StartError, WriteError};
pub use freshness::Freshness;
pub use replica::Replica;
pub use status::{ClusterStatus, MemberStatus};
