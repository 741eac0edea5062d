//! The replica's status as the operator sees it: Raft's state, the
//! freshness and every member with its replication lag.

use std::collections::BTreeSet;

use hie_domain::raft::NodeId;
use serde::Serialize;

use crate::freshness::Freshness;
use crate::replica::Replica;

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

impl Replica {
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
}
