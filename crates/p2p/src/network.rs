//! openraft's network over the libp2p transport.

use std::time::Duration;

use hie_domain::raft::{NodeId, NodeInfo, TypeConfig};
use libp2p::PeerId;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
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
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&Msg("response of the wrong kind".into())))
    }
}

impl RaftNetwork<TypeConfig> for P2pNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.call(RPCTypes::AppendEntries, Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(Ok(r)) => Ok(r),
            Response::AppendEntries(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
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
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(RPCTypes::Vote, Request::Vote(rpc), &option).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    fn backoff(&self) -> Backoff {
        // Unreachable peers are retried at 200 ms, doubling to 2 s: a restarted
        // node rejoins quickly, a dead one costs little.
        Backoff::new((0..).map(|i: u32| Duration::from_millis(200u64.saturating_mul(1 << i.min(3)).min(2000))))
    }
}
