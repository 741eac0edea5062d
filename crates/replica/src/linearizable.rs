//! Linearizable reads: the leader's read index, from a round of its own or
//! asked for by a follower, and the barrier a read waits at until the local
//! state has caught up to it.

use std::time::{Duration, Instant};

use hie_domain::raft::{NodeId, Raft};
use hie_p2p::{P2p, ReadIndexError, Request, Response};
use hie_store::LogStore;
use openraft::StorageError;
use openraft::error::RaftError;
use openraft::storage::RaftLogStorage;

use crate::error::ReadError;
use crate::membership::member_peer;
use crate::replica::{Core, Replica};

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

/// Leadership this node held when it stopped and that openraft restored
/// at start-up, without an election (from a committed vote of its own):
/// that term, and the last log index the store held at start-up.
///
/// openraft's read index is the larger of the commit index and the first
/// entry of the leader's term. A restored leader's commit index starts at
/// its state machine's applied index, which a power cut sets back behind
/// entries already committed and acknowledged (state-machine writes are not
/// fsynced by themselves), and the first entry of its term is older still.
/// So until a new term begins, a read index must also cover every entry
/// the log held at start-up: any of them may have been acknowledged. (Seen
/// in the fault harness: after a power cut of every node, two linearizable
/// searches missed a create acknowledged before the cut.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct Restored {
    term: u64,
    last_index: u64,
}

/// The leadership openraft will restore at start-up, read from the log
/// store before `Raft::new` opens it.
pub(crate) async fn restored_leadership(
    log: &mut LogStore,
    id: NodeId,
) -> Result<Option<Restored>, StorageError<NodeId>> {
    let Some(vote) = log.read_vote().await? else { return Ok(None) };
    if !vote.is_committed() || vote.leader_id().voted_for() != Some(id) {
        return Ok(None);
    }
    let last_index = log.get_log_state().await?.last_log_id.map_or(0, |l| l.index);
    Ok(Some(Restored { term: vote.leader_id().get_term(), last_index }))
}

/// One leadership round: a quorum confirms this node still leads, and the
/// commit index at its start is the read index (raised for a restored
/// leader, see [`Restored`]). Bounded by `timeout`: a round that hung
/// would hold up every read waiting for the next one.
pub(crate) async fn leader_round(
    raft: Raft,
    timeout: Duration,
    restored: Option<Restored>,
) -> Result<u64, ReadIndexError> {
    match tokio::time::timeout(timeout, raft.get_read_log_id()).await {
        Err(_) => Err(ReadIndexError::NoQuorum("the leader could not confirm its quorum in time".into())),
        Ok(Ok((read_log_id, _))) => {
            let index = read_log_id.map(|l| l.index).unwrap_or(0);
            let term = raft.metrics().borrow().current_term;
            Ok(match restored {
                Some(r) if r.term == term => index.max(r.last_index),
                _ => index,
            })
        }
        Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(ReadIndexError::NotLeader { leader: f.leader_id })
        }
        Ok(Err(e)) => Err(ReadIndexError::NoQuorum(e.to_string())),
    }
}

/// One follower round: the current leader is asked for its read index over
/// libp2p (its answer comes from a leader round of its own).
pub(crate) async fn follower_round(raft: Raft, p2p: P2p, id: NodeId, timeout: Duration) -> Result<u64, ReadIndexError> {
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

impl Replica {
    /// Waits until the local state reflects every write committed before this
    /// call (the leader's read index), so a read after it is linearizable.
    /// Concurrent calls share leadership rounds (`coalesce`).
    pub async fn linearizable_barrier(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + self.core.write_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ReadError::ReadIndexTimeout);
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
                Err(_) => return Err(ReadError::ReadIndexTimeout),
                Ok(Ok(i)) => i,
                // No leader yet, or it moved: ask again shortly.
                Ok(Err(ReadIndexError::NotLeader { .. })) => {
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                    continue;
                }
                Ok(Err(ReadIndexError::NoQuorum(reason))) => return Err(ReadError::NoQuorum { reason }),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match self.core.raft.wait(Some(remaining)).applied_index_at_least(Some(index), "read index").await {
                Ok(_) => Ok(index),
                Err(source) => Err(ReadError::CatchUp { index, source }),
            };
        }
    }
}
