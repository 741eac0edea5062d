//! The replica's errors: starting it, writing, reading and changing the
//! membership. Each kind says whether trying again (here or on another node)
//! can help: `is_retryable` is what the API answers 503 for, the rest is 500.
//!
//! A start-up error is printed with its chain (`{:#}`), so its message leaves
//! the cause to `source()`. A write or read error is shown to the client by
//! its message alone (the OperationOutcome's diagnostics), so its message
//! says the cause too.

use std::path::PathBuf;

use hie_domain::raft::{NodeId, NodeInfo};
use hie_p2p::{ForwardError, P2pError, PeerId, SendError};
use hie_store::StoreError;

/// Why the replica did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the store in {}", .dir.display())]
    OpenStore { dir: PathBuf, source: StoreError },
    /// The node key could not be read or created (the message names the file).
    #[error(transparent)]
    NodeKey { source: P2pError },
    /// The configured peer id is not the one the node key gives.
    #[error("configured peer id {configured} does not match the node key's {key}")]
    PeerIdMismatch { configured: String, key: PeerId },
    #[error(transparent)]
    Transport { source: P2pError },
    #[error("raft settings")]
    RaftConfig { source: openraft::ConfigError },
    #[error("starting raft")]
    Raft { source: openraft::error::Fatal<NodeId> },
}

/// Why a write was not answered with its outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    // Retryable: a leader with a quorum may take it shortly.
    /// No leader took the write within the write timeout: none was known,
    /// none could be reached, or leadership kept moving.
    #[error("no leader accepted the write in time")]
    NoLeader,
    /// This node knows a leader but has not heard from it recently, so it
    /// does not forward to it.
    #[error("this node has lost contact with the leader")]
    LostLeader,
    /// This node lost the leadership before it proposed the write.
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// No leader with a quorum answered in time. The write may or may not
    /// have been applied if it was already proposed; retrying an idempotent
    /// write (one with a masterIdentifier) is safe.
    #[error("{reason}")]
    NoQuorum { reason: String },
    /// The write was sent to the leader but no answer came back (the
    /// request may have been delivered).
    #[error("forwarding to the leader failed: {source}")]
    Forwarding { source: SendError },
    /// The leader did not answer the forwarded write within the write
    /// timeout; it may still be applied.
    #[error("the leader did not answer in time")]
    LeaderTimeout,
    // Fatal: trying again gets the same answer.
    /// The leader refused to propose the command.
    #[error("{reason}")]
    Refused { reason: String },
    /// The leader answered with something other than a write's outcome.
    #[error("unexpected answer {answer}")]
    UnexpectedAnswer { answer: String },
}

impl WriteError {
    /// Whether the write may succeed if tried again (on this node or
    /// another): no quorum, no leader or a timeout, not a refusal.
    pub fn is_retryable(&self) -> bool {
        match self {
            WriteError::NoLeader
            | WriteError::LostLeader
            | WriteError::NotLeader { .. }
            | WriteError::NoQuorum { .. }
            | WriteError::Forwarding { .. }
            | WriteError::LeaderTimeout => true,
            WriteError::Refused { .. } | WriteError::UnexpectedAnswer { .. } => false,
        }
    }
}

impl From<ForwardError> for WriteError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::NotLeader { leader, .. } => WriteError::NotLeader { leader },
            ForwardError::NoQuorum(reason) => WriteError::NoQuorum { reason },
            ForwardError::Refused(reason) => WriteError::Refused { reason },
        }
    }
}

/// Why a read was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    // Retryable: only linearizable reads, which need the leader's read index.
    /// No leader confirmed a read index within the write timeout.
    #[error("no leader confirmed a read index in time")]
    ReadIndexTimeout,
    /// The leader could not confirm with a quorum that it still leads.
    #[error("{reason}")]
    NoQuorum { reason: String },
    /// This replica did not apply up to the read index in time.
    #[error("did not catch up to the read index in time: {source}")]
    CatchUp { index: u64, source: openraft::metrics::WaitError },
    // Fatal: the local replica could not read.
    #[error(transparent)]
    Storage { source: StoreError },
    /// The read's blocking task panicked or was cancelled.
    #[error(transparent)]
    Task { source: tokio::task::JoinError },
}

impl ReadError {
    /// Whether the read may succeed if tried again (on this node or
    /// another): no quorum or a timeout, not a storage failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReadError::ReadIndexTimeout | ReadError::NoQuorum { .. } | ReadError::CatchUp { .. } => true,
            ReadError::Storage { .. } | ReadError::Task { .. } => false,
        }
    }
}

/// Why a membership change (or a snapshot, or the bootstrap) was not made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    /// Retryable on the leader, which `leader` names if one is known.
    #[error("this node is not the leader")]
    NotLeader { leader: Option<NodeInfo> },
    /// The request is wrong (not a member, a bad peer id or address, the
    /// last voter): trying again gets the same answer.
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    /// Raft did not make the change (another change in progress, no
    /// quorum, Raft stopped).
    #[error("membership change failed: {reason}")]
    Failed { reason: String },
}

impl MembershipError {
    /// Whether the change may be made if asked again (of the leader).
    pub fn is_retryable(&self) -> bool {
        match self {
            MembershipError::NotLeader { .. } | MembershipError::Failed { .. } => true,
            MembershipError::Invalid { .. } => false,
        }
    }
}

// The binary's `?` into anyhow, and the API's tasks, need these.
const _: () = {
    const fn shareable<T: std::error::Error + Send + Sync + 'static>() {}
    shareable::<StartError>();
    shareable::<WriteError>();
    shareable::<ReadError>();
    shareable::<MembershipError>();
};
