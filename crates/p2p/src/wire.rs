//! The messages nodes exchange.

use hie_domain::audit::{AuditPage, AuditQuery};
use hie_domain::raft::{NodeId, NodeInfo, SnapshotMeta, TypeConfig, Vote};
use hie_domain::{Caller, Command, Outcome};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

/// A snapshot chunk, with its bytes encoded compactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        SnapshotChunk { vote: r.vote, meta: r.meta, offset: r.offset, data: r.data, done: r.done }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        InstallSnapshotRequest { vote: c.vote, meta: c.meta, offset: c.offset, data: c.data, done: c.done }
    }
}

// A message lives only from decode to dispatch and is never stored: boxing
// its large variants would add an allocation per message and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(SnapshotChunk),
    /// A client write accepted by another node, carrying the original caller.
    ClientWrite {
        caller: Caller,
        command: Command,
        request_id: String,
    },
    /// Asks the leader for a linearizable read point.
    ReadIndex,
    /// Asks a node for one patient's events in its own audit log.
    AuditQuery(AuditQuery),
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::AppendEntries(_) => "append_entries",
            Request::Vote(_) => "vote",
            Request::InstallSnapshot(_) => "install_snapshot",
            Request::ClientWrite { .. } => "client_write",
            Request::ReadIndex => "read_index",
            Request::AuditQuery(_) => "audit_query",
        }
    }
}

/// Why a forwarded write was not applied.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId>, leader_node: Option<NodeInfo> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("the forwarded write was refused: {0}")]
    Refused(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ReadIndexError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
}

// A message lives only from decode to dispatch and is never stored: boxing
// its large variants would add an allocation per message and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    ClientWrite(Result<Outcome, ForwardError>),
    /// The log index a linearizable read must wait for.
    ReadIndex(Result<u64, ReadIndexError>),
    AuditQuery(Result<AuditPage, String>),
    /// The request was not understood or not allowed.
    Refused(String),
}

impl Response {
    pub fn kind(&self) -> &'static str {
        match self {
            Response::AppendEntries(_) => "append_entries",
            Response::Vote(_) => "vote",
            Response::InstallSnapshot(_) => "install_snapshot",
            Response::ClientWrite(_) => "client_write",
            Response::ReadIndex(_) => "read_index",
            Response::AuditQuery(_) => "audit_query",
            Response::Refused(_) => "refused",
        }
    }
}
