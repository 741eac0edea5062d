//! The in-memory network: every RPC goes through the router, which drops,
//! delays and cuts links on the simulation's seeded schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hie_domain::raft::NodeInfo;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use rand08::rngs::StdRng;
use rand08::{Rng, SeedableRng};

use crate::{NodeId, Raft, SimConfig};

/// The faults in force.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Directed links that carry nothing: (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Percent of messages (each way) lost.
    pub drop_percent: u32,
    /// Each message waits up to this long.
    pub delay_max: Duration,
}

pub struct Router {
    nodes: Mutex<BTreeMap<NodeId, Raft>>,
    pub faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    pub messages: Mutex<u64>,
}

#[derive(Debug)]
struct Lost(&'static str);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Lost {}

impl Router {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Router {
            nodes: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x000e_70e7)),
            messages: Mutex::new(0),
        })
    }

    pub fn up(&self, id: NodeId, raft: Raft) {
        self.nodes.lock().unwrap().insert(id, raft);
    }

    pub fn down(&self, id: NodeId) {
        self.nodes.lock().unwrap().remove(&id);
    }

    /// Whether a message from `from` to `to` gets through, and after how long.
    fn fate(&self, from: NodeId, to: NodeId) -> Option<Duration> {
        let faults = self.faults.lock().unwrap();
        let mut rng = self.rng.lock().unwrap();
        *self.messages.lock().unwrap() += 1;
        let lost = faults.cut.contains(&(from, to)) || rng.gen_range(0..100) < faults.drop_percent;
        let delay = if faults.delay_max.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.gen_range(0..=faults.delay_max.as_micros() as u64))
        };
        (!lost).then_some(delay)
    }

    /// Carries one request and its response, each subject to the faults.
    async fn carry<T, F, Fut>(&self, from: NodeId, to: NodeId, call: F) -> Result<T, Unreachable>
    where
        F: FnOnce(Raft) -> Fut,
        Fut: Future<Output = T>,
    {
        let lost = || Unreachable::new(&Lost("message lost"));
        let Some(delay) = self.fate(from, to) else {
            // A lost message is noticed by a timeout, not at once.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(lost());
        };
        tokio::time::sleep(delay).await;
        let Some(raft) = self.nodes.lock().unwrap().get(&to).cloned() else {
            return Err(Unreachable::new(&Lost("node down")));
        };
        let out = call(raft).await;
        let Some(delay) = self.fate(to, from) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(lost());
        };
        tokio::time::sleep(delay).await;
        Ok(out)
    }
}

pub struct SimNetworkFactory {
    pub router: Arc<Router>,
    pub local: NodeId,
}

impl RaftNetworkFactory<SimConfig> for SimNetworkFactory {
    type Network = SimNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> SimNetwork {
        SimNetwork { router: self.router.clone(), from: self.local, to: target }
    }
}

pub struct SimNetwork {
    router: Arc<Router>,
    from: NodeId,
    to: NodeId,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

#[allow(clippy::result_large_err)] // openraft's RPCError, what RaftNetwork returns
fn remote<T, E: std::error::Error>(to: NodeId, r: Result<T, RaftError<NodeId, E>>) -> RpcResult<T, E> {
    r.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
}

impl RaftNetwork<SimConfig> for SimNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let r = self.router.carry(self.from, self.to, |raft| async move { raft.append_entries(rpc).await }).await;
        remote(self.to, r.map_err(RPCError::Unreachable)?)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<SimConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let r = self.router.carry(self.from, self.to, |raft| async move { raft.install_snapshot(rpc).await }).await;
        remote(self.to, r.map_err(RPCError::Unreachable)?)
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let r = self.router.carry(self.from, self.to, |raft| async move { raft.vote(rpc).await }).await;
        remote(self.to, r.map_err(RPCError::Unreachable)?)
    }
}

impl Router {
    pub fn get(&self, id: NodeId) -> Option<Raft> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.lock().unwrap().keys().copied().collect()
    }
}
