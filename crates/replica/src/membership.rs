//! The membership: creating the cluster, adding, promoting and removing
//! members, snapshots on request, and keeping the transport's allow-list
//! equal to the membership.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hie_domain::raft::{NodeId, NodeInfo};
use hie_p2p::{Multiaddr, PeerId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, LogId, RaftMetrics};
use tokio::sync::watch;

use crate::error::MembershipError;
use crate::replica::Replica;

/// The most often the Raft gauges are refreshed while the metrics change.
const GAUGES_INTERVAL: Duration = Duration::from_millis(100);

/// The members' peers and their addresses, as the transport allows them.
type Peers = Vec<(PeerId, Option<Multiaddr>)>;

/// The libp2p peer of member `id`, from the membership.
pub(crate) fn member_peer(m: &RaftMetrics<NodeId, NodeInfo>, id: NodeId) -> Option<PeerId> {
    m.membership_config.membership().get_node(&id).and_then(|n| n.peer_id.parse().ok())
}

impl Replica {
    /// Creates the cluster with `members` as voters, if this node has no state yet.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<bool, MembershipError> {
        let initialized = self.core.raft.is_initialized().await.map_err(failed)?;
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
            Err(e) => Err(failed(e)),
        }
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
            other => failed(other),
        }
    }

    /// Adds a node as a non-voting learner. It catches up in the background
    /// (by snapshot when the log it needs was purged).
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<(), MembershipError> {
        self.require_leader()?;
        let peer: PeerId = info.peer_id.parse().map_err(|_| invalid(format!("bad peer id {}", info.peer_id)))?;
        let addr = info.p2p_addr.parse().map_err(|_| invalid(format!("bad p2p address {}", info.p2p_addr)))?;
        self.p2p.allow(peer, Some(addr)).await;
        self.core.raft.add_learner(id, info, false).await.map_err(|e| self.map_change_err(e))?;
        Ok(())
    }

    /// Makes a learner a voter. Every other node stays a member (`retain`):
    /// without it openraft drops from the membership each node that is a
    /// voter now and not in the new voter set, which, while a demotion is
    /// still in its joint phase, is the node being demoted: it was removed
    /// from the cluster instead (found by the fault harness's membership
    /// changes).
    pub async fn promote(&self, id: NodeId) -> Result<(), MembershipError> {
        self.require_leader()?;
        let m = self.core.raft.metrics().borrow().clone();
        if m.membership_config.membership().get_node(&id).is_none() {
            return Err(invalid(format!("node {id} is not a member")));
        }
        self.core
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(|e| self.map_change_err(e))?;
        Ok(())
    }

    /// Makes a voter a learner: it stays a member and keeps replicating,
    /// but no longer votes or counts towards a quorum (`promote` undoes it).
    /// For taking a region's node out of the quorum for maintenance without
    /// removing it, and for the fault harness's membership changes.
    pub async fn demote(&self, id: NodeId) -> Result<(), MembershipError> {
        self.require_leader()?;
        let m = self.core.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == id) {
            return Err(invalid(format!("node {id} is not a voter")));
        }
        if membership.voter_ids().count() <= 1 {
            return Err(invalid("cannot demote the last voter".into()));
        }
        self.core
            .raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
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
            return Err(invalid(format!("node {id} is not a member")));
        }
        if is_voter && membership.voter_ids().count() <= 1 {
            return Err(invalid("cannot remove the last voter".into()));
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
        self.core.raft.trigger().snapshot().await.map_err(failed)
    }

    /// Keeps the transport's allow-list equal to the membership (plus seeds)
    /// and the Raft gauges current.
    ///
    /// Under load openraft's metrics change with every append and every
    /// commit, a thousand times a second on a leader. The allow-list needs
    /// only membership changes, and the gauges (read by Prometheus every
    /// few seconds) are refreshed at most every `GAUGES_INTERVAL`, at once
    /// when the leader or term changes, and on a tick when nothing changes.
    pub(crate) async fn watch_membership(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.core.raft.metrics();
        let mut watched = Watched::default();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let ticked = tokio::select! {
                r = rx.changed() => if r.is_err() { return } else { false },
                _ = tick.tick() => true,
                _ = shutdown.changed() => return,
            };
            let (members, metrics) = watched.look(&mut rx, ticked);
            if let Some(members) = members {
                self.allow_members(&mut watched.known, members).await;
            }
            if let Some(m) = metrics {
                self.update_gauges(&m, &mut watched.last_leader);
                watched.last_gauges = Some(Instant::now());
            }
        }
    }

    /// Allows the members' peers not allowed yet and refuses those that left
    /// the membership; `known` becomes the members' peers. Seed peers are
    /// allowed only until this node is a member itself: from then on the
    /// membership alone says who may connect, so the key of a seed that
    /// was decommissioned (removed from the membership) opens nothing.
    async fn allow_members(&self, known: &mut HashSet<PeerId>, members: Peers) {
        let mut now: HashSet<PeerId> = HashSet::new();
        for (peer, addr) in members {
            if !known.contains(&peer) {
                self.p2p.allow(peer, addr).await;
            }
            now.insert(peer);
        }
        let member = now.contains(&self.p2p.local_peer_id());
        *self.core.members.write().expect("members lock") = now.clone();
        for gone in known.difference(&now) {
            if member || !self.seeds.contains(gone) {
                tracing::info!(peer = %gone, "peer left the membership; refusing it from now on");
                self.p2p.disallow(*gone).await;
            }
        }
        if member {
            for seed in self.seeds.iter().filter(|s| !now.contains(s) && !known.contains(s)) {
                tracing::info!(peer = %seed, "this node is a member: seed peer not in the membership refused from now on");
                self.p2p.disallow(*seed).await;
            }
        }
        *known = now;
    }
}

/// What the membership watcher remembers from one look at the metrics to the next.
#[derive(Default)]
struct Watched {
    /// The peers allowed for the membership last seen.
    known: HashSet<PeerId>,
    /// The log id of the membership last seen (`Some(None)`: the initial
    /// membership, which has none); `None` before the first look.
    #[allow(clippy::option_option)] // the three cases differ, as above
    seen_membership: Option<Option<LogId<NodeId>>>,
    /// The leader when the gauges were last refreshed.
    last_leader: Option<NodeId>,
    last_term_leader: Option<(u64, Option<NodeId>)>,
    last_gauges: Option<Instant>,
}

impl Watched {
    /// The members' peers if the membership changed, and the metrics if the
    /// gauges are due.
    fn look(
        &mut self,
        rx: &mut watch::Receiver<RaftMetrics<NodeId, NodeInfo>>,
        ticked: bool,
    ) -> (Option<Peers>, Option<RaftMetrics<NodeId, NodeInfo>>) {
        // Copy out what is needed without holding the borrow (a read
        // lock on openraft's metrics) across anything else.
        let m = rx.borrow_and_update();
        let id = *m.membership_config.log_id();
        let members = (self.seen_membership != Some(id)).then(|| {
            self.seen_membership = Some(id);
            m.membership_config
                .membership()
                .nodes()
                .filter_map(|(_, n)| Some((n.peer_id.parse::<PeerId>().ok()?, n.p2p_addr.parse().ok())))
                .collect::<Peers>()
        });
        let term_leader = (m.current_term, m.current_leader);
        let due = ticked
            || members.is_some()
            || self.last_term_leader != Some(term_leader)
            || self.last_gauges.is_none_or(|t| t.elapsed() >= GAUGES_INTERVAL);
        self.last_term_leader = Some(term_leader);
        (members, due.then(|| m.clone()))
    }
}

fn invalid(reason: String) -> MembershipError {
    MembershipError::Invalid { reason }
}

fn failed(e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Failed { reason: e.to_string() }
}
