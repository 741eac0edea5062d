//! The replica's gauges: Raft's state and replication, the transport's, the
//! log's and the snapshots' counters, and the store's size and the disk's.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hie_domain::raft::{NodeId, NodeInfo};
use hie_metrics::sync_counter;
use openraft::RaftMetrics;
use tokio::sync::watch;

use crate::replica::Replica;

impl Replica {
    /// Sets the gauges from openraft's metrics `m` and the counters kept
    /// beside them; `last_leader` is the leader when they were last set.
    pub(crate) fn update_gauges(&self, m: &RaftMetrics<NodeId, NodeInfo>, last_leader: &mut Option<NodeId>) {
        self.raft_gauges(m, last_leader);
        self.replication_gauges(m);
        self.counter_gauges();
    }

    fn raft_gauges(&self, m: &RaftMetrics<NodeId, NodeInfo>, last_leader: &mut Option<NodeId>) {
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
    }

    /// On the leader: each member's lag and the commit index; elsewhere the
    /// commit index as applied here.
    fn replication_gauges(&self, m: &RaftMetrics<NodeId, NodeInfo>) {
        let g = &self.core.metrics;
        g.raft_replication_lag_entries.reset();
        let Some(rep) = &m.replication else {
            g.raft_committed_index.set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
            return;
        };
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let mut committed = Vec::new();
        for (peer, matched) in rep.iter() {
            let idx = matched.map(|l| l.index).unwrap_or(0);
            g.raft_replication_lag_entries.with_label_values(&[&peer.to_string()]).set(last.saturating_sub(idx) as i64);
            if membership.voter_ids().any(|v| v == *peer) {
                committed.push(idx);
            }
        }
        committed.sort_unstable();
        if !committed.is_empty() {
            // The index a majority of voters hold: the commit index.
            g.raft_committed_index.set(committed[(committed.len() - 1) / 2] as i64);
        }
    }

    /// The transport's, the log's and the snapshots' counters, and how far
    /// this replica's apply is behind.
    fn counter_gauges(&self) {
        let g = &self.core.metrics;
        let c = self.p2p.counters();
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
        sync_counter(&g.raft_log_entry_bytes_total, lc.entry_bytes.load(Relaxed));
        g.raft_log_entry_bytes_max.set(lc.entry_bytes_max.load(Relaxed) as i64);
        let f = self.freshness();
        g.raft_apply_lag_entries.set(f.behind_entries as i64);
        g.raft_apply_lag_seconds.set(f.replication_lag_ms as f64 / 1000.0);
        let sc = &self.snapshots;
        sync_counter(&g.snapshots_built_total, sc.built_total.load(Relaxed));
        sync_counter(&g.snapshots_installed_total, sc.installed_total.load(Relaxed));
        sync_counter(&g.snapshot_files_damaged_total, sc.damaged_total.load(Relaxed));
        g.snapshot_last_size_bytes.set(sc.last_bytes.load(Relaxed) as i64);
        g.snapshot_last_build_seconds.set(sc.last_build_millis.load(Relaxed) as f64 / 1000.0);
        g.snapshot_last_install_seconds.set(sc.last_install_millis.load(Relaxed) as f64 / 1000.0);
    }

    /// Every few seconds: the disk's free and total bytes, and the store's
    /// estimated records and sizes.
    pub(crate) async fn refresh_stats(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
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
