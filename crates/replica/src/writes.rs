//! Writes: proposed on this node while it leads, otherwise forwarded to the
//! leader.

use std::time::{Duration, Instant};

use hie_domain::{Caller, Command, Outcome};
use hie_p2p::{ForwardError, Request, Response};

use crate::error::WriteError;
use crate::membership::member_peer;
use crate::replica::{Core, Replica};

/// Propose a command on this node, which must be the leader (grouped with
/// the other writes waiting: see `proposals`).
pub(crate) async fn propose_local(core: &Core, command: Command) -> Result<Outcome, ForwardError> {
    core.proposals.propose(command).await
}

impl Replica {
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
                return Err(WriteError::NoLeader);
            }
            if current_leader == Some(self.id) {
                return propose_local(&self.core, command).await.map_err(WriteError::from);
            }
            if current_leader.is_some() && self.freshness().stale {
                return Err(WriteError::LostLeader);
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
                Ok(Ok(other)) => return Err(WriteError::UnexpectedAnswer { answer: format!("{other:?}") }),
                Ok(Err(hie_p2p::SendError::Unreachable(..))) => {
                    // Not delivered, so not applied: wait for the next leader
                    // (a failover takes about one election timeout) and retry.
                    let mut rx = self.core.raft.metrics();
                    let _ = tokio::time::timeout(remaining.min(Duration::from_millis(200)), rx.changed()).await;
                }
                Ok(Err(source)) => return Err(WriteError::Forwarding { source }),
                Err(_) => return Err(WriteError::LeaderTimeout),
            }
        }
    }
}
