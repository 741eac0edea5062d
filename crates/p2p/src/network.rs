//! openraft's network over the libp2p transport.

use std::time::Duration;

use hie_domain::raft::{Entry, NodeId, NodeInfo, TypeConfig};
use libp2p::PeerId;
use openraft::EntryPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use crate::service::{P2p, SendError};
use crate::wire::{Request, Response};

pub struct P2pNetworkFactory {
    pub p2p: P2p,
    pub local_id: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for P2pNetworkFactory {
    type Network = P2pNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> P2pNetwork {
        let peer = node.peer_id.parse::<PeerId>().ok();
        if let Some(peer) = peer {
            self.p2p.allow(peer, node.p2p_addr.parse().ok()).await;
        } else {
            tracing::error!(target, "member has an invalid peer id; it cannot be reached");
        }
        P2pNetwork { p2p: self.p2p.clone(), local_id: self.local_id, target, peer }
    }
}

pub struct P2pNetwork {
    p2p: P2p,
    local_id: NodeId,
    target: NodeId,
    peer: Option<PeerId>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl P2pNetwork {
    async fn call<E: std::error::Error>(
        &self,
        action: RPCTypes,
        request: Request,
        option: &RPCOption,
    ) -> Result<Response, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        let Some(peer) = self.peer else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg("invalid peer id".into()))));
        };
        let ttl = option.hard_ttl();
        let timeout = |ttl: Duration| Timeout { action, id: self.local_id, target: self.target, timeout: ttl };
        match tokio::time::timeout(ttl, self.p2p.request(peer, request)).await {
            Err(_) => Err(RPCError::Timeout(timeout(ttl))),
            Ok(Ok(Response::Refused(reason))) => Err(RPCError::Network(NetworkError::new(&Msg(reason)))),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(SendError::Timeout(_))) => Err(RPCError::Timeout(timeout(ttl))),
            Ok(Err(e @ (SendError::Unreachable(..) | SendError::Stopped))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(e @ SendError::Failed(..))) => Err(RPCError::Network(NetworkError::new(&e))),
            // Only append-entries can be made smaller; it looks for this.
            Ok(Err(SendError::TooLarge(..))) if action == RPCTypes::AppendEntries => {
                Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(1)))
            }
            Ok(Err(e @ SendError::TooLarge(..))) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>() -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&Msg("response of the wrong kind".into())))
    }
}

/// About how many bytes of entries one append-entries message carries at
/// most (a single larger entry still goes alone). Within one heartbeat
/// interval (100 ms) such a message is sent, decoded and fsynced.
pub const APPEND_ENTRIES_BYTES_BUDGET: usize = 2 << 20;

/// How many of the first `entries` fit in `budget` bytes (estimated without
/// encoding them); at least one.
fn entries_within(entries: &[Entry], budget: usize) -> u64 {
    let mut total = 0usize;
    let mut n = 0u64;
    for e in entries {
        total += match &e.payload {
            EntryPayload::Normal(c) => c.approx_bytes(),
            EntryPayload::Membership(_) => 512,
            EntryPayload::Blank => 32,
        };
        if total > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

impl RaftNetwork<TypeConfig> for P2pNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len() as u64;
        // openraft waits one heartbeat interval for an answer: a message of
        // many large entries (batch Bundles) could never arrive in time, so
        // fewer are sent at once. openraft retries at once with the hint.
        let fit = entries_within(&rpc.entries, APPEND_ENTRIES_BYTES_BUDGET);
        if fit < entries {
            tracing::debug!(target = self.target, entries, fit, "append-entries over its byte budget; sending fewer");
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        let sent = match self.call(RPCTypes::AppendEntries, Request::AppendEntries(rpc), &option).await {
            // Too many large entries (batch Bundles) for one message: openraft
            // retries at once with at most the hinted number of entries. One
            // entry too large to send is a network error, retried with backoff
            // (proposals are bounded so that it does not happen).
            Err(RPCError::PayloadTooLarge(_)) if entries > 1 => {
                tracing::debug!(target = self.target, entries, "append-entries too large; sending fewer entries");
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)));
            }
            Err(RPCError::PayloadTooLarge(_)) => {
                let e = Msg(format!(
                    "one log entry is larger than message_bytes_max; it cannot be sent to node {}",
                    self.target
                ));
                tracing::error!(target = self.target, "{e}");
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            other => other?,
        };
        match sent {
            Response::AppendEntries(Ok(r)) => Ok(r),
            Response::AppendEntries(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(RPCTypes::InstallSnapshot, Request::InstallSnapshot(rpc.into()), &option).await? {
            Response::InstallSnapshot(Ok(r)) => Ok(r),
            Response::InstallSnapshot(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(RPCTypes::Vote, Request::Vote(rpc), &option).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(Self::unexpected()),
        }
    }

    fn backoff(&self) -> Backoff {
        // Unreachable peers are retried at 200 ms, doubling to 2 s: a restarted
        // node rejoins quickly, a dead one costs little.
        Backoff::new((0..).map(|i: u32| Duration::from_millis(200u64.saturating_mul(1 << i.min(3)).min(2000))))
    }
}
