//! The safety properties checked while a simulation runs.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use openraft::LeaderId;

use crate::{LogId, NodeId, Vote};

/// What every node has reported, and what broke.
#[derive(Default)]
pub struct Checker {
    /// The entry first applied at each index, by any node.
    applied: BTreeMap<u64, (LogId, [u8; 32])>,
    /// The leaders seen, by openraft's leader id (term, node id).
    leaders: BTreeMap<LeaderId<NodeId>, NodeId>,
    pub violations: Vec<String>,
    /// A digest of everything observed, in order: equal for equal runs.
    pub trace: Sha256,
    pub applies: u64,
    pub snapshots_installed: u64,
}

impl Checker {
    pub fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    pub fn note(&mut self, what: &[u8]) {
        if std::env::var_os("HIE_SIM_TRACE").is_some() {
            eprintln!("{}", String::from_utf8_lossy(what));
        }
        self.trace.update(what);
        self.trace.update(b"\n");
    }

    /// State machine safety: no two nodes apply different entries at one index.
    pub fn on_apply(&mut self, node: NodeId, log_id: LogId, digest: [u8; 32]) {
        self.applies += 1;
        match self.applied.get(&log_id.index) {
            None => {
                self.applied.insert(log_id.index, (log_id, digest));
            }
            Some((first, d)) if *first != log_id || *d != digest => {
                let msg = format!(
                    "state machine safety: node {node} applied {log_id} at index {} where another node applied {first}",
                    log_id.index
                );
                self.violation(msg);
            }
            Some(_) => {}
        }
    }

    /// A snapshot installed must end at an entry the cluster applied.
    pub fn on_install(&mut self, node: NodeId, last: Option<LogId>) {
        self.snapshots_installed += 1;
        self.note(format!("install {node} {last:?}").as_bytes());
        if let Some(last) = last
            && let Some((first, _)) = self.applied.get(&last.index)
            && *first != last
        {
            let msg =
                format!("snapshot safety: node {node} installed a snapshot ending at {last}, applied was {first}");
            self.violation(msg);
        }
    }

    /// Election safety, in openraft's form. openraft (without its
    /// `single-term-leader` feature) orders leaders by (term, node id), so two
    /// nodes may each lead in one term, one after the other; what must hold
    /// is that a node acts as leader only under its own vote, granted by a
    /// quorum (committed), and that one leader id never names two nodes.
    pub fn on_leader(&mut self, node: NodeId, vote: &Vote) {
        let leader = *vote.leader_id();
        if leader.voted_for() != Some(node) || !vote.is_committed() {
            self.violation(format!("election safety: node {node} acts as leader under vote {vote}"));
        }
        match self.leaders.get(&leader) {
            None => {
                self.leaders.insert(leader, node);
                self.note(format!("leader {leader} {node}").as_bytes());
            }
            Some(&other) if other != node => {
                self.violation(format!("election safety: nodes {other} and {node} were both leader {leader}"))
            }
            Some(_) => {}
        }
    }

    /// The entry applied at `index`, if any node applied one.
    pub fn applied_at(&self, index: u64) -> Option<LogId> {
        self.applied.get(&index).map(|(l, _)| *l)
    }

    pub fn elections(&self) -> usize {
        self.leaders.len()
    }
}
