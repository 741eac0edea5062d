//! The replica: its parts, starting it, and reading the local state.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hie_domain::audit::AuditSource;
use hie_domain::raft::{NodeId, NodeInfo, Raft};
use hie_metrics::Metrics;
use hie_p2p::{P2p, P2pNetworkFactory, PeerId, ReadIndexError};
use hie_store::{LogStore, ReadView, StateStats, Store};
use tokio::sync::watch;

use crate::coalesce::Coalesce;
use crate::config::ReplicaConfig;
use crate::error::{ReadError, StartError};
use crate::freshness::ContactClock;
use crate::inbound::InboundHandler;
use crate::linearizable::{Restored, follower_round, leader_round, restored_leadership};
use crate::proposals::{Proposals, Proposer};

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
    pub(crate) leader_rounds: Arc<Coalesce<Result<u64, ReadIndexError>>>,
    /// Writes waiting to be proposed on this node while it leads.
    pub(crate) proposals: Proposals,
    /// The peers of the membership this node last saw (voters and
    /// learners): only they are served forwarded writes, votes, read-index
    /// rounds and audit queries.
    pub(crate) members: std::sync::RwLock<HashSet<PeerId>>,
}

impl Core {
    /// Whether `peer` is in the membership this node last saw.
    pub(crate) fn is_member(&self, peer: &PeerId) -> bool {
        self.members.read().expect("members lock").contains(peer)
    }
}

impl Core {
    fn start(
        raft: Raft,
        metrics: Arc<Metrics>,
        audit: Option<Arc<dyn AuditSource>>,
        config: &ReplicaConfig,
        restored: Option<Restored>,
    ) -> Core {
        let round_timeout = config.write_timeout;
        let leader_rounds = {
            let raft = raft.clone();
            Coalesce::new(move || leader_round(raft.clone(), round_timeout, restored))
        };
        let proposals = Proposals::start(Proposer {
            raft: raft.clone(),
            metrics: metrics.clone(),
            write_timeout: config.write_timeout,
            stale_after: config.stale_after(),
        });
        Core {
            raft,
            metrics,
            write_timeout: config.write_timeout,
            stale_after: config.stale_after(),
            audit,
            leader_rounds,
            proposals,
            members: std::sync::RwLock::new(HashSet::new()),
        }
    }
}

pub struct Replica {
    pub(crate) core: Arc<Core>,
    pub(crate) id: NodeId,
    pub(crate) node: NodeInfo,
    reads: ReadView,
    /// `reads`, answering from memory only (tried first on the async thread).
    reads_in_memory: ReadView,
    pub(crate) p2p: P2p,
    pub(crate) clock: Arc<ContactClock>,
    pub(crate) log: LogStore,
    pub(crate) snapshots: Arc<hie_store::SnapshotCounters>,
    pub(crate) subscription_wakes: Arc<hie_store::SubscriptionWakes>,
    pub(crate) data_dir: std::path::PathBuf,
    pub(crate) seeds: HashSet<PeerId>,
    /// On a follower: rounds asking the leader for its read index, shared
    /// by concurrent linearizable reads.
    pub(crate) follower_rounds: Arc<Coalesce<Result<u64, ReadIndexError>>>,
}

impl Replica {
    /// Opens the store, starts the transport and Raft. Runs until `shutdown` fires.
    pub async fn start(
        config: ReplicaConfig,
        metrics: Arc<Metrics>,
        audit: Option<Arc<dyn AuditSource>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Replica>, StartError> {
        let store = Store::open(&config.data_dir.join("store"), config.store.clone())
            .map_err(|source| StartError::OpenStore { dir: config.data_dir.clone(), source })?;
        let key = hie_p2p::load_or_create_key(&config.data_dir.join("node.key"))
            .map_err(|source| StartError::NodeKey { source })?;
        let local_peer = key.public().to_peer_id();
        if config.node.peer_id != local_peer.to_string() {
            return Err(StartError::PeerIdMismatch { configured: config.node.peer_id.clone(), key: local_peer });
        }
        let clock = Arc::new(ContactClock::new());
        let inbound = Arc::new(InboundHandler { core: OnceLock::new(), clock: clock.clone() });
        let seeds: HashSet<PeerId> = config.p2p.seeds.iter().map(|(p, _)| *p).collect();
        let p2p = P2p::start(config.p2p.clone(), key, inbound.clone(), shutdown.clone())
            .await
            .map_err(|source| StartError::Transport { source })?;

        let raft_config =
            config.raft.openraft_config().validate().map_err(|source| StartError::RaftConfig { source })?;
        let log = store.log.clone();
        let snapshots = store.state_machine.counters();
        let subscription_wakes = store.state_machine.subscription_wakes();
        let network = P2pNetworkFactory { p2p: p2p.clone(), local_id: config.node_id };
        let restored = restored_leadership(&mut store.log.clone(), config.node_id)
            .await
            .map_err(|source| StartError::Raft { source: source.into() })?;
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, store.log, store.state_machine)
            .await
            .map_err(|source| StartError::Raft { source })?;
        let follower_rounds = {
            let (raft, p2p, id, round_timeout) = (raft.clone(), p2p.clone(), config.node_id, config.write_timeout);
            Coalesce::new(move || follower_round(raft.clone(), p2p.clone(), id, round_timeout))
        };
        let core = Arc::new(Core::start(raft, metrics, audit, &config, restored));
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
            subscription_wakes,
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

    /// The subscriptions whose replicated record changed (new events, a new
    /// status), for the node's deliverer.
    pub fn subscription_wakes(&self) -> &Arc<hie_store::SubscriptionWakes> {
        &self.subscription_wakes
    }

    /// Whether this node leads now, as far as it knows, and is not stale.
    pub fn leads(&self) -> bool {
        let leader = self.core.raft.metrics().borrow().current_leader;
        leader == Some(self.id) && !self.freshness().stale
    }

    /// Runs a read against the local replica: here, if everything it needs
    /// is in memory (the usual case: a few microseconds, and no hand-off to
    /// another thread and back); otherwise again on a blocking thread, so
    /// that a read from disk never holds up an async thread.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: Fn(&ReadView) -> Result<T, hie_store::StoreError> + Send + 'static,
    {
        match f(&self.reads_in_memory) {
            Err(hie_store::StoreError::WouldBlock) => self.core.metrics.reads_from_disk_total.inc(),
            done => return done.map_err(|source| ReadError::Storage { source }),
        }
        let reads = self.reads.clone();
        tokio::task::spawn_blocking(move || f(&reads))
            .await
            .map_err(|source| ReadError::Task { source })?
            .map_err(|source| ReadError::Storage { source })
    }

    /// (applied index, state digest, records) from one consistent view.
    pub async fn digest(&self) -> Result<(u64, String, u64), ReadError> {
        self.read(|r| r.digest()).await.map(|(applied, d, n)| (applied.map(|l| l.index).unwrap_or(0), d, n))
    }

    /// A consistent view of this replica's state for a backup, to be
    /// written out on a blocking thread (see `hie_store::BackupState`).
    pub fn backup(&self) -> Result<hie_store::BackupState, ReadError> {
        self.reads.backup().map_err(|source| ReadError::Storage { source })
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
}
