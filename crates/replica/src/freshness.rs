//! How fresh this replica's state is, as the API reports it on every read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use openraft::ServerState;

use crate::replica::Replica;

/// Tracks contact with the leader (on followers and learners) so reads can be
/// flagged stale, and how long the replica has been behind the leader's commit.
pub(crate) struct ContactClock {
    origin: Instant,
    /// Milliseconds since `origin` of the last append-entries accepted from a leader (0: never).
    last_leader_contact_ms: AtomicU64,
    /// The leader's commit index as last heard.
    leader_commit: AtomicU64,
    /// Milliseconds since `origin` when this replica fell behind the leader's
    /// commit as last heard (0: not behind).
    behind_since_ms: AtomicU64,
}

impl ContactClock {
    pub(crate) fn new() -> Self {
        ContactClock {
            origin: Instant::now(),
            last_leader_contact_ms: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
            behind_since_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub(crate) fn leader_contact(&self, leader_commit: Option<u64>) {
        self.last_leader_contact_ms.store(self.now_ms(), Ordering::Relaxed);
        if let Some(c) = leader_commit {
            self.leader_commit.fetch_max(c, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the last contact with a leader, if any.
    pub(crate) fn since_leader_contact_ms(&self) -> Option<u64> {
        match self.last_leader_contact_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.now_ms().saturating_sub(t)),
        }
    }

    /// Entries the replica is behind the leader's commit as last heard.
    pub(crate) fn behind_entries(&self, applied: u64) -> u64 {
        self.leader_commit.load(Ordering::Relaxed).saturating_sub(applied)
    }

    /// Notes the applied index and returns how long (ms) the replica has been
    /// behind the leader's commit as last heard (0 when caught up).
    pub(crate) fn lag_ms(&self, applied: u64) -> u64 {
        let now = self.now_ms();
        if self.behind_entries(applied) == 0 {
            self.behind_since_ms.store(0, Ordering::Relaxed);
            return 0;
        }
        match self.behind_since_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => 0,
            Err(since) => now.saturating_sub(since),
        }
    }
}

/// What a read response says about freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Freshness {
    pub applied_index: u64,
    /// True when this node cannot confirm contact with a quorum.
    pub stale: bool,
    pub replication_lag_ms: u64,
    /// Entries behind the leader's commit index as last heard (0 on the leader).
    pub behind_entries: u64,
}

impl Replica {
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
}
