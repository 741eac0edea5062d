//! The replica: starting it, writing, reading and changing the membership.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hie_domain::audit::{AuditPage, AuditQuery, AuditSource};
use hie_domain::raft::{NodeId, NodeInfo, Raft};
use hie_domain::{Caller, Command, Outcome};
use hie_metrics::{Metrics, sync_counter};
use hie_p2p::{ForwardError, P2p, P2pNetworkFactory, PeerId, ReadIndexError, Request, Response};
use hie_store::{LogStore, ReadView, StateStats, Store};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::sync::watch;

use crate::coalesce::Coalesce;
use crate::config::ReplicaConfig;
use crate::freshness::{ContactClock, Freshness};
use crate::inbound::InboundHandler;
use crate::proposals::{Proposals, Proposer};

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader with a quorum answered in time. The write may or may not
    /// have been applied if it was already proposed; retrying an idempotent
    /// write (one with a masterIdentifier) is safe.
    #[error("no quorum: {reason}")]
    NoQuorum { reason: String },
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("no quorum for a linearizable read: {reason}")]
    NoQuorum { reason: String },
    #[error("storage: {reason}")]
    Storage { reason: String },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<NodeInfo> },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("membership change failed: {0}")]
    Failed(String),
}

/// Shared by the replica and the inbound handler.
pub(crate) struct Core {
    pub(crate) raft: Raft,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) write_timeout: Duration,
    pub(crate) stale_after: Duration,
    pub(crate) audit: Option<Arc<dyn AuditSource>>,
    /// On the leader: rounds confirming leadership and naming the read
    /// index, shared by concurrent linearizable reads (this node's and its
    /// followers').
    leader_rounds: Arc<Coalesce<Result<u64, ReadIndexError>>>,
    /// Writes waiting to be proposed on this node while it leads.
    proposals: Proposals,
}

impl Core {
    /// This node, as leader: the index a linearizable read must wait for,
    /// from a quorum round that started after this call.
    pub(crate) async fn leader_read_index(&self) -> Result<u64, ReadIndexError> {
        self.leader_rounds
            .call()
            .await
            .unwrap_or_else(|| Err(ReadIndexError::NoQuorum("the read-index round failed".into())))
    }
}

/// One leadership round: a quorum confirms this node still leads, and the
/// commit index at its start is the read index. Bounded by `timeout`: a
/// round that hung would hold up every read waiting for the next one.
async fn leader_round(raft: Raft, timeout: Duration) -> Result<u64, ReadIndexError> {
    match tokio::time::timeout(timeout, raft.get_read_log_id()).await {
        Err(_) => Err(ReadIndexError::NoQuorum("the leader could not confirm its quorum in time".into())),
        Ok(Ok((read_log_id, _))) => Ok(read_log_id.map(|l| l.index).unwrap_or(0)),
        Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(ReadIndexError::NotLeader { leader: f.leader_id })
        }
        Ok(Err(e)) => Err(ReadIndexError::NoQuorum(e.to_string())),
    }
}

/// The libp2p peer of member `id`, from the membership.
fn member_peer(m: &openraft::RaftMetrics<NodeId, NodeInfo>, id: NodeId) -> Option<PeerId> {
    m.membership_config.membership().get_node(&id).and_then(|n| n.peer_id.parse().ok())
}

/// One follower round: the current leader is asked for its read index over
/// libp2p (its answer comes from a leader round of its own).
async fn follower_round(raft: Raft, p2p: P2p, id: NodeId, timeout: Duration) -> Result<u64, ReadIndexError> {
    let (leader, peer) = {
        let m = raft.metrics();
        let m = m.borrow();
        (m.current_leader, m.current_leader.filter(|l| *l != id).and_then(|l| member_peer(&m, l)))
    };
    let Some(peer) = peer else { return Err(ReadIndexError::NotLeader { leader }) };
    match tokio::time::timeout(timeout, p2p.request(peer, Request::ReadIndex)).await {
        Ok(Ok(Response::ReadIndex(r))) => r,
        Ok(Ok(other)) => Err(ReadIndexError::NoQuorum(format!("unexpected answer {other:?}"))),
        Ok(Err(e)) => Err(ReadIndexError::NoQuorum(e.to_string())),
        Err(_) => Err(ReadIndexError::NoQuorum("the leader did not answer in time".into())),
    }
}

pub struct Replica {
    core: Arc<Core>,
    id: NodeId,
    node: NodeInfo,
    reads: ReadView,
    /// `reads`, answering from memory only (tried first on the async thread).
    reads_in_memory: ReadView,
    p2p: P2p,
    clock: Arc<ContactClock>,
    log: LogStore,
    snapshots: Arc<hie_store::SnapshotCounters>,
    data_dir: std::path::PathBuf,
    seeds: HashSet<PeerId>,
    /// On a follower: rounds asking the leader for its read index, shared
    /// by concurrent linearizable reads.
    follower_rounds: Arc<Coalesce<Result<u64, ReadIndexError>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub region: String,
    pub voter: bool,
    pub peer_id: String,
    pub p2p_addr: String,
    pub api_url: String,
    pub admin_url: String,
    /// On the leader: the last log index known replicated to this member.
    pub matched_index: Option<u64>,
    /// On the leader: entries this member is behind the leader's log.
    pub lag_entries: Option<u64>,
}

/// One member's answer to an audit query.
#[derive(Debug, Clone)]
pub struct AuditAnswer {
    pub id: NodeId,
    pub region: String,
    pub result: Result<AuditPage, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub id: NodeId,
    pub region: String,
    pub state: String,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub freshness: Freshness,
    pub members: Vec<MemberStatus>,
}

/// Propose a command on this node, which must be the leader (grouped with
/// the other writes waiting: see `proposals`).
pub(crate) async fn propose_local(core: &Core, command: Command) -> Result<Outcome, ForwardError> {
    core.proposals.propose(command).await
}

impl Replica {
    /// Opens the store, starts the transport and Raft. Runs until `shutdown` fires.
    pub async fn start(
        config: ReplicaConfig,
        metrics: Arc<Metrics>,
        audit: Option<Arc<dyn AuditSource>>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow_free::Result<Arc<Replica>> {
        let store = Store::open(&config.data_dir.join("store"), config.store.clone())
            .map_err(|e| anyhow_free::Error(format!("opening the store in {}: {e}", config.data_dir.display())))?;
        let key = hie_p2p::load_or_create_key(&config.data_dir.join("node.key"))
            .map_err(|e| anyhow_free::Error(e.to_string()))?;
        let local_peer = key.public().to_peer_id();
        if config.node.peer_id != local_peer.to_string() {
            return Err(anyhow_free::Error(format!(
                "configured peer id {} does not match the node key's {local_peer}",
                config.node.peer_id
            )));
        }
        let clock = Arc::new(ContactClock::new());
        let inbound = Arc::new(InboundHandler { core: OnceLock::new(), clock: clock.clone() });
        let seeds: HashSet<PeerId> = config.p2p.seeds.iter().map(|(p, _)| *p).collect();
        let p2p = P2p::start(config.p2p.clone(), key, inbound.clone(), shutdown.clone())
            .await
            .map_err(|e| anyhow_free::Error(e.to_string()))?;

        let t = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "hie".into(),
            heartbeat_interval: t.heartbeat_interval.as_millis() as u64,
            election_timeout_min: t.election_timeout_min.as_millis() as u64,
            election_timeout_max: t.election_timeout_max.as_millis() as u64,
            install_snapshot_timeout: t.install_snapshot_timeout.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: t.logs_kept_after_snapshot,
            snapshot_max_chunk_size: t.snapshot_chunk_bytes,
            max_payload_entries: t.append_entries_max,
            ..Default::default()
        }
        .validate()
        .map_err(|e| anyhow_free::Error(format!("raft settings: {e}")))?;

        let log = store.log.clone();
        let snapshots = store.state_machine.counters();
        let network = P2pNetworkFactory { p2p: p2p.clone(), local_id: config.node_id };
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, store.log, store.state_machine)
            .await
            .map_err(|e| anyhow_free::Error(format!("starting raft: {e}")))?;
        let round_timeout = config.write_timeout;
        let leader_rounds = {
            let raft = raft.clone();
            Coalesce::new(move || leader_round(raft.clone(), round_timeout))
        };
        let follower_rounds = {
            let (raft, p2p, id) = (raft.clone(), p2p.clone(), config.node_id);
            Coalesce::new(move || follower_round(raft.clone(), p2p.clone(), id, round_timeout))
        };
        let proposals = Proposals::start(Proposer {
            raft: raft.clone(),
            metrics: metrics.clone(),
            write_timeout: config.write_timeout,
            stale_after: config.stale_after(),
        });
        let core = Arc::new(Core {
            raft,
            metrics,
            write_timeout: config.write_timeout,
            stale_after: config.stale_after(),
            audit,
            leader_rounds,
            proposals,
        });
        let _ = inbound.core.set(core.clone());
        let replica = Arc::new(Replica {
            core,
            id: config.node_id,
            node: config.node.clone(),
            reads_in_memory: store.reads.memory_only(),
            reads: store.reads,
            p2p,
            clock,
            log,
            snapshots,
            data_dir: config.data_dir.clone(),
            seeds,
            follower_rounds,
        });
        tokio::spawn(replica.clone().watch_membership(shutdown.clone()));
        tokio::spawn(replica.clone().refresh_stats(shutdown));
        Ok(replica)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn raft(&self) -> &Raft {
        &self.core.raft
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.core.metrics
    }

    /// Creates the cluster with `members` as voters, if this node has no state yet.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<bool, MembershipError> {
        let initialized = self.core.raft.is_initialized().await.map_err(|e| MembershipError::Failed(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        for info in members.values() {
            if let Ok(peer) = info.peer_id.parse::<PeerId>() {
                self.p2p.allow(peer, info.p2p_addr.parse().ok()).await;
            }
        }
        match self.core.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(MembershipError::Failed(e.to_string())),
        }
    }

    /// How fresh the local state is.
    pub fn freshness(&self) -> Freshness {
        // Every read asks this: copy the four fields out of openraft's
        // metrics rather than clone them all (the replication map is a
        // BTreeMap), and hold the borrow for nothing else.
        let (applied, leads, quorum_ack_ms, leader) = {
            let m = self.core.raft.metrics();
            let m = m.borrow();
            (
                m.last_applied.map(|l| l.index).unwrap_or(0),
                m.state == ServerState::Leader,
                m.millis_since_quorum_ack,
                m.current_leader,
            )
        };
        let stale_ms = self.core.stale_after.as_millis() as u64;
        let (stale, lag, behind) = if leads {
            (quorum_ack_ms.is_some_and(|ms| ms > stale_ms), 0, 0)
        } else {
            let stale = leader.is_none() || self.clock.since_leader_contact_ms().is_none_or(|ms| ms > stale_ms);
            (stale, self.clock.lag_ms(applied), self.clock.behind_entries(applied))
        };
        Freshness { applied_index: applied, stale, replication_lag_ms: lag, behind_entries: behind }
    }

    /// Runs a read against the local replica: here, if everything it needs
    /// is in memory (the usual case: a few microseconds, and no hand-off to
    /// another thread and back); otherwise again on a blocking thread, so
    /// that a read from disk never holds up an async thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: Fn(&ReadView) -> Result<T, hie_store::StoreError> + Send + 'static,
    {
        match f(&self.reads_in_memory) {
            Err(hie_store::StoreError::WouldBlock) => self.core.metrics.reads_from_disk_total.inc(),
            done => return done.map_err(|e| ReadError::Storage { reason: e.to_string() }),
        }
        let reads = self.reads.clone();
        tokio::task::spawn_blocking(move || f(&reads))
            .await
            .map_err(|e| ReadError::Storage { reason: e.to_string() })?
            .map_err(|e| ReadError::Storage { reason: e.to_string() })
    }

    /// Waits until the local state reflects every write committed before this
    /// call (the leader's read index), so a read after it is linearizable.
    /// Concurrent calls share leadership rounds (`coalesce`).
    pub async fn linearizable_barrier(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + self.core.write_timeout;
        let no_quorum = |reason: String| ReadError::NoQuorum { reason };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_quorum("no leader confirmed a read index in time".into()));
            }
            let leads = self.core.raft.metrics().borrow().current_leader == Some(self.id);
            let round = async {
                if leads {
                    self.core.leader_read_index().await
                } else {
                    self.follower_rounds
                        .call()
                        .await
                        .unwrap_or_else(|| Err(ReadIndexError::NoQuorum("the read-index round failed".into())))
                }
            };
            let index = match tokio::time::timeout(remaining, round).await {
                Err(_) => return Err(no_quorum("no leader confirmed a read index in time".into())),
                Ok(Ok(i)) => i,
                // No leader yet, or it moved: ask again shortly.
                Ok(Err(ReadIndexError::NotLeader { .. })) => {
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                    continue;
                }
                Ok(Err(ReadIndexError::NoQuorum(r))) => return Err(no_quorum(r)),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match self.core.raft.wait(Some(remaining)).applied_index_at_least(Some(index), "read index").await {
                Ok(_) => Ok(index),
                Err(e) => Err(no_quorum(format!("did not catch up to the read index in time: {e}"))),
            };
        }
    }

    /// Writes a command: proposed here if this node leads, otherwise forwarded
    /// to the leader with the original caller. Answers within the write timeout.
    pub async fn write(&self, caller: &Caller, command: Command, request_id: &str) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + self.core.write_timeout;
        loop {
            let (current_leader, leader_peer) = {
                let m = self.core.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.current_leader.and_then(|l| member_peer(&m, l)))
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(WriteError::NoQuorum { reason: "no leader accepted the write in time".into() });
            }
            if current_leader == Some(self.id) {
                return propose_local(&self.core, command).await.map_err(WriteError::from);
            }
            if current_leader.is_some() && self.freshness().stale {
                return Err(WriteError::NoQuorum { reason: "this node has lost contact with the leader".into() });
            }
            let Some(leader) = leader_peer else {
                // No leader known: wait for one (an election takes about one timeout).
                let mut rx = self.core.raft.metrics();
                let _ = tokio::time::timeout(remaining.min(Duration::from_millis(200)), rx.changed()).await;
                continue;
            };
            self.core.metrics.forwarded_writes_total.with_label_values(&["out"]).inc();
            let request = Request::ClientWrite {
                caller: caller.clone(),
                command: command.clone(),
                request_id: request_id.to_owned(),
            };
            match tokio::time::timeout(remaining, self.p2p.request(leader, request)).await {
                Ok(Ok(Response::ClientWrite(Ok(outcome)))) => return Ok(outcome),
                Ok(Ok(Response::ClientWrite(Err(ForwardError::NotLeader { .. })))) => {
                    // Leadership moved; look again shortly.
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                }
                Ok(Ok(Response::ClientWrite(Err(e)))) => return Err(e.into()),
                Ok(Ok(other)) => return Err(WriteError::Internal { reason: format!("unexpected answer {other:?}") }),
                Ok(Err(hie_p2p::SendError::Unreachable(..))) => {
                    // Not delivered, so not applied: wait for the next leader
                    // (a failover takes about one election timeout) and retry.
                    let mut rx = self.core.raft.metrics();
                    let _ = tokio::time::timeout(remaining.min(Duration::from_millis(200)), rx.changed()).await;
                }
                Ok(Err(e)) => {
                    return Err(WriteError::NoQuorum { reason: format!("forwarding to the leader failed: {e}") });
                }
                Err(_) => return Err(WriteError::NoQuorum { reason: "the leader did not answer in time".into() }),
            }
        }
    }

    /// Asks every member (voters and learners, this node included) for a
    /// patient's audit events, all at once; each answers within `timeout`
    /// or is reported as not reached.
    pub async fn audit_query_all(&self, query: AuditQuery, timeout: Duration) -> Vec<AuditAnswer> {
        let m = self.core.raft.metrics().borrow().clone();
        let members: Vec<(NodeId, NodeInfo)> =
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.clone())).collect();
        let asks = members.into_iter().map(|(id, node)| {
            let query = query.clone();
            async move {
                let result = if id == self.id {
                    match &self.core.audit {
                        Some(audit) => audit.query(query).await,
                        None => Err("this node keeps no audit log".into()),
                    }
                } else {
                    match node.peer_id.parse::<PeerId>() {
                        Err(_) => Err(format!("bad peer id {}", node.peer_id)),
                        Ok(peer) => {
                            let r =
                                tokio::time::timeout(timeout, self.p2p.request(peer, Request::AuditQuery(query))).await;
                            let result = match r {
                                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                                Ok(Err(e)) => Err(format!("not reached: {e}")),
                                Ok(Ok(Response::AuditQuery(r))) => r,
                                Ok(Ok(other)) => Err(format!("unexpected answer {}", other.kind())),
                            };
                            let label = if result.is_ok() { "ok" } else { "error" };
                            self.core.metrics.audit_queries_total.with_label_values(&["out", label]).inc();
                            result
                        }
                    }
                };
                AuditAnswer { id, region: node.region, result }
            }
        });
        futures::future::join_all(asks).await
    }

    fn leader_info(&self) -> Option<NodeInfo> {
        let m = self.core.raft.metrics().borrow().clone();
        m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned())
    }

    fn require_leader(&self) -> Result<(), MembershipError> {
        let m = self.core.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.id) {
            Ok(())
        } else {
            Err(MembershipError::NotLeader { leader: self.leader_info() })
        }
    }

    fn map_change_err(&self, e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> MembershipError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                MembershipError::NotLeader { leader: self.leader_info() }
            }
            other => MembershipError::Failed(other.to_string()),
        }
    }

    /// Adds a node as a non-voting learner. It catches up in the background
    /// (by snapshot when the log it needs was purged).
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<(), MembershipError> {
        self.require_leader()?;
        let peer: PeerId =
            info.peer_id.parse().map_err(|_| MembershipError::Invalid(format!("bad peer id {}", info.peer_id)))?;
        let addr = info
            .p2p_addr
            .parse()
            .map_err(|_| MembershipError::Invalid(format!("bad p2p address {}", info.p2p_addr)))?;
        self.p2p.allow(peer, Some(addr)).await;
        self.core.raft.add_learner(id, info, false).await.map_err(|e| self.map_change_err(e))?;
        Ok(())
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, id: NodeId) -> Result<(), MembershipError> {
        self.require_leader()?;
        let m = self.core.raft.metrics().borrow().clone();
        if m.membership_config.membership().get_node(&id).is_none() {
            return Err(MembershipError::Invalid(format!("node {id} is not a member")));
        }
        self.core
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.map_change_err(e))?;
        Ok(())
    }

    /// Removes a voter or learner from the cluster.
    pub async fn remove(&self, id: NodeId) -> Result<(), MembershipError> {
        self.require_leader()?;
        let m = self.core.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == id);
        if membership.get_node(&id).is_none() {
            return Err(MembershipError::Invalid(format!("node {id} is not a member")));
        }
        if is_voter && membership.voter_ids().count() <= 1 {
            return Err(MembershipError::Invalid("cannot remove the last voter".into()));
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.core.raft.change_membership(change, false).await.map_err(|e| self.map_change_err(e))?;
        Ok(())
    }

    /// Builds a snapshot now (and purges the log behind it as configured).
    pub async fn trigger_snapshot(&self) -> Result<(), MembershipError> {
        self.core.raft.trigger().snapshot().await.map_err(|e| MembershipError::Failed(e.to_string()))
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.core.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let matched = m.replication.as_ref().and_then(|r| r.get(id)).map(|l| l.map(|l| l.index).unwrap_or(0));
                MemberStatus {
                    id: *id,
                    region: n.region.clone(),
                    voter: voters.contains(id),
                    peer_id: n.peer_id.clone(),
                    p2p_addr: n.p2p_addr.clone(),
                    api_url: n.api_url.clone(),
                    admin_url: n.admin_url.clone(),
                    matched_index: matched,
                    lag_entries: matched.map(|i| last.saturating_sub(i)),
                }
            })
            .collect();
        ClusterStatus {
            id: self.id,
            region: self.node.region.clone(),
            state: format!("{:?}", m.state).to_lowercase(),
            term: m.current_term,
            leader_id: m.current_leader,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            freshness: self.freshness(),
            members,
        }
    }

    /// (applied index, state digest, records) from one consistent view.
    pub async fn digest(&self) -> Result<(u64, String, u64), ReadError> {
        self.read(|r| r.digest()).await.map(|(applied, d, n)| (applied.map(|l| l.index).unwrap_or(0), d, n))
    }

    /// A consistent backup of this replica's state (see `Store::restore`).
    pub async fn backup(&self) -> Result<Vec<u8>, ReadError> {
        self.read(|r| r.backup()).await
    }

    pub async fn stats(&self) -> Result<StateStats, ReadError> {
        self.read(|r| Ok(r.stats())).await
    }

    /// Stops Raft; the transport stops with the shutdown signal.
    pub async fn shutdown(&self) {
        if let Err(e) = self.core.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// Keeps the transport's allow-list equal to the membership (plus seeds)
    /// and the Raft gauges current.
    ///
    /// Under load openraft's metrics change with every append and every
    /// commit, a thousand times a second on a leader. The allow-list needs
    /// only membership changes, and the gauges (read by Prometheus every
    /// few seconds) are refreshed at most every `GAUGES_INTERVAL`, at once
    /// when the leader or term changes, and on a tick when nothing changes.
    async fn watch_membership(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        const GAUGES_INTERVAL: Duration = Duration::from_millis(100);
        let mut rx = self.core.raft.metrics();
        let mut known: HashSet<PeerId> = HashSet::new();
        let mut seen_membership = None;
        let mut last_leader = None;
        let mut last_term_leader = None;
        let mut last_gauges: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let ticked = tokio::select! {
                r = rx.changed() => if r.is_err() { return } else { false },
                _ = tick.tick() => true,
                _ = shutdown.changed() => return,
            };
            // Copy out what is needed without holding the borrow (a read
            // lock on openraft's metrics) across anything else.
            let (members, metrics) = {
                let m = rx.borrow_and_update();
                let id = *m.membership_config.log_id();
                let members = (seen_membership != Some(id)).then(|| {
                    seen_membership = Some(id);
                    m.membership_config
                        .membership()
                        .nodes()
                        .filter_map(|(_, n)| Some((n.peer_id.parse::<PeerId>().ok()?, n.p2p_addr.parse().ok())))
                        .collect::<Vec<_>>()
                });
                let term_leader = (m.current_term, m.current_leader);
                let due = ticked
                    || members.is_some()
                    || last_term_leader != Some(term_leader)
                    || last_gauges.is_none_or(|t| t.elapsed() >= GAUGES_INTERVAL);
                last_term_leader = Some(term_leader);
                (members, due.then(|| m.clone()))
            };
            if let Some(members) = members {
                let mut now: HashSet<PeerId> = HashSet::new();
                for (peer, addr) in members {
                    if !known.contains(&peer) {
                        self.p2p.allow(peer, addr).await;
                    }
                    now.insert(peer);
                }
                for gone in known.difference(&now) {
                    if !self.seeds.contains(gone) {
                        tracing::info!(peer = %gone, "peer left the membership; refusing it from now on");
                        self.p2p.disallow(*gone).await;
                    }
                }
                known = now;
            }
            if let Some(m) = metrics {
                self.update_gauges(&m, &mut last_leader);
                last_gauges = Some(Instant::now());
            }
        }
    }

    fn update_gauges(&self, m: &openraft::RaftMetrics<NodeId, NodeInfo>, last_leader: &mut Option<NodeId>) {
        let g = &self.core.metrics;
        g.raft_term.set(m.current_term as i64);
        g.raft_leader_id.set(m.current_leader.unwrap_or(0) as i64);
        g.raft_is_leader.set(i64::from(m.current_leader == Some(self.id)));
        if m.current_leader != *last_leader {
            if m.current_leader.is_some() {
                g.raft_leader_changes_total.inc();
            }
            *last_leader = m.current_leader;
        }
        g.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        g.raft_applied_index.set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
        g.raft_snapshot_index.set(m.snapshot.map(|l| l.index).unwrap_or(0) as i64);
        g.raft_purged_index.set(m.purged.map(|l| l.index).unwrap_or(0) as i64);
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        g.raft_voters.set(voters as i64);
        g.raft_learners.set(membership.nodes().count().saturating_sub(voters) as i64);
        g.raft_millis_since_quorum_ack.set(m.millis_since_quorum_ack.map(|v| v as i64).unwrap_or(-1));
        g.raft_stale.set(i64::from(self.freshness().stale));
        g.raft_replication_lag_entries.reset();
        if let Some(rep) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            let mut committed = Vec::new();
            for (peer, matched) in rep.iter() {
                let idx = matched.map(|l| l.index).unwrap_or(0);
                g.raft_replication_lag_entries
                    .with_label_values(&[&peer.to_string()])
                    .set(last.saturating_sub(idx) as i64);
                if membership.voter_ids().any(|v| v == *peer) {
                    committed.push(idx);
                }
            }
            committed.sort_unstable();
            if !committed.is_empty() {
                // The index a majority of voters hold: the commit index.
                g.raft_committed_index.set(committed[(committed.len() - 1) / 2] as i64);
            }
        } else {
            g.raft_committed_index.set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
        }
        let c = self.p2p.counters();
        use std::sync::atomic::Ordering::Relaxed;
        g.p2p_connected_peers.set(c.connected_peers.load(Relaxed) as i64);
        sync_counter(&g.p2p_refused_connections_total, c.refused_connections.load(Relaxed));
        sync_counter(
            &g.p2p_inbound_failures_total,
            c.inbound_failures.load(Relaxed) + c.refused_messages.load(Relaxed),
        );
        sync_counter(&g.p2p_outbound_failures_total, c.outbound_failures.load(Relaxed));
        let lc = self.log.counters();
        sync_counter(&g.raft_log_fsyncs_total, lc.fsyncs.load(Relaxed));
        sync_counter(&g.raft_log_entries_appended_total, lc.entries_appended.load(Relaxed));
        let f = self.freshness();
        g.raft_apply_lag_entries.set(f.behind_entries as i64);
        g.raft_apply_lag_seconds.set(f.replication_lag_ms as f64 / 1000.0);
        let sc = &self.snapshots;
        sync_counter(&g.snapshots_built_total, sc.built_total.load(Relaxed));
        sync_counter(&g.snapshots_installed_total, sc.installed_total.load(Relaxed));
        g.snapshot_last_size_bytes.set(sc.last_bytes.load(Relaxed) as i64);
        g.snapshot_last_build_seconds.set(sc.last_build_millis.load(Relaxed) as f64 / 1000.0);
        g.snapshot_last_install_seconds.set(sc.last_install_millis.load(Relaxed) as f64 / 1000.0);
    }

    async fn refresh_stats(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = shutdown.changed() => return,
            }
            if let Ok(fs) = nix::sys::statvfs::statvfs(&self.data_dir) {
                let block = fs.fragment_size() as i64;
                self.core.metrics.disk_free_bytes.set(fs.blocks_available() as i64 * block);
                self.core.metrics.disk_total_bytes.set(fs.blocks() as i64 * block);
            }
            if let Ok(s) = self.stats().await {
                let g = &self.core.metrics;
                g.pointers.set(s.pointers_estimate as i64);
                g.patients.set(s.patients_estimate as i64);
                g.rocksdb_size_bytes.set(s.sst_bytes as i64);
                g.rocksdb_memtable_bytes.set(s.memtable_bytes as i64);
            }
        }
    }
}

/// A plain error type: this crate does not use anyhow (that is for the binary).
pub mod anyhow_free {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Error(pub String);
    pub type Result<T> = std::result::Result<T, Error>;
}
