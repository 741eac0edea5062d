//! Proposing writes on the leader, grouped: the commands waiting while the
//! leader is busy go into the log as one entry (`CommandV1::Batch`).
//!
//! On the leader every entry costs a WAL fsync, an append-entries message to
//! each follower and an apply. With writes arriving one at a time faster than
//! that, entries went out one by one (one fsync each on the leader). Here at
//! most [`IN_FLIGHT_MAX`] proposals are in Raft at once; commands arriving
//! while all are busy wait and go together in the next one (at most
//! [`BATCH_COMMANDS_MAX`]). A lone write is proposed at once, on its own, so
//! a quiet leader adds no delay. Each command keeps its own outcome: a
//! batch is applied as if each command were its own entry, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hie_domain::raft::Raft;
use hie_domain::{Command, CommandV1, Outcome};
use hie_metrics::Metrics;
use hie_p2p::ForwardError;
use openraft::ServerState;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Proposals in Raft at once; past this, commands wait and are grouped.
pub const IN_FLIGHT_MAX: usize = 4;
/// Most commands in one entry.
pub const BATCH_COMMANDS_MAX: usize = 128;
/// About the most bytes of commands grouped into one entry (estimated with
/// `Command::approx_bytes`); a single larger write still goes alone. Keeps
/// every entry well within one node-to-node message.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// Commands waiting to be proposed; past this, a write waits for room
/// (within its write timeout).
pub const WAITING_MAX: usize = 4096;

/// Where a waiting write's outcome goes.
type Answer = oneshot::Sender<Result<Outcome, ForwardError>>;
type Waiting = (Command, Answer);

/// What proposing needs: cheap to clone into each proposal's task.
#[derive(Clone)]
pub(crate) struct Proposer {
    pub(crate) raft: Raft,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) write_timeout: Duration,
    pub(crate) stale_after: Duration,
}

/// The queue of commands waiting to be proposed on this node.
pub(crate) struct Proposals {
    tx: mpsc::Sender<Waiting>,
    proposer: Proposer,
}

impl Proposals {
    /// Starts the task that groups and proposes; it ends when this is dropped.
    pub(crate) fn start(proposer: Proposer) -> Proposals {
        let (tx, rx) = mpsc::channel(WAITING_MAX);
        tokio::spawn(run(proposer.clone(), rx));
        Proposals { tx, proposer }
    }

    /// Proposes a command on this node, which must be the leader; its outcome.
    pub(crate) async fn propose(&self, command: Command) -> Result<Outcome, ForwardError> {
        let p = &self.proposer;
        let (leads, quorum_ack_ms) = {
            let m = p.raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader, m.millis_since_quorum_ack)
        };
        // `None` right after an election: the votes were a quorum's contact.
        if leads && quorum_ack_ms.is_some_and(|ms| ms > p.stale_after.as_millis() as u64) {
            return Err(ForwardError::NoQuorum("the leader has not heard from a quorum recently".into()));
        }
        let (done, answer) = oneshot::channel();
        let deadline = Instant::now() + p.write_timeout;
        match tokio::time::timeout_at(deadline.into(), self.tx.send((command, done))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ForwardError::NoQuorum("this node is shutting down".into())),
            // Never queued, so never applied.
            Err(_) => return Err(ForwardError::NoQuorum("too many writes waiting to be proposed".into())),
        }
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(ForwardError::NoQuorum("this node is shutting down".into())),
            Err(_) => Err(not_committed(p.write_timeout)),
        }
    }
}

/// A write not known to be committed within its timeout, which may still be.
fn not_committed(timeout: Duration) -> ForwardError {
    ForwardError::NoQuorum(format!("not committed within {} ms; it may still be applied", timeout.as_millis()))
}

async fn run(proposer: Proposer, mut rx: mpsc::Receiver<Waiting>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    // A write taken off the queue that did not fit in the last entry.
    let mut held: Option<Waiting> = None;
    loop {
        let first = match held.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => break,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        // Whatever queued while every proposal was busy goes together, up to
        // `BATCH_COMMANDS_MAX` commands and `BATCH_BYTES_MAX` bytes (a
        // client's batch may be larger, and then goes alone).
        let mut commands = commands_in(&first.0);
        let mut bytes = first.0.approx_bytes();
        let mut batch = vec![first];
        while commands < BATCH_COMMANDS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(w)
                    if commands + commands_in(&w.0) > BATCH_COMMANDS_MAX
                        || bytes + w.0.approx_bytes() > BATCH_BYTES_MAX =>
                {
                    held = Some(w);
                    break;
                }
                Ok(w) => {
                    commands += commands_in(&w.0);
                    bytes += w.0.approx_bytes();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let proposer = proposer.clone();
        tokio::spawn(async move {
            propose_batch(&proposer, batch).await;
            drop(permit);
        });
    }
}

/// How many commands a write puts in an entry.
fn commands_in(c: &Command) -> usize {
    match c {
        Command::V1(CommandV1::Batch(inner)) => inner.len(),
        Command::V1(_) => 1,
    }
}

/// The entry for the waiting writes, their answers, and how many commands
/// each put in (`None`: one, not a batch of its own).
fn one_entry(batch: Vec<Waiting>) -> (Command, Vec<Answer>, Vec<Option<usize>>) {
    if batch.len() == 1 {
        let (c, done) = batch.into_iter().next().expect("one");
        return (c, vec![done], vec![None]);
    }
    // A client's own batch (a FHIR batch Bundle) is spread into the
    // group, since a batch may not hold another; `sizes` says how many
    // commands each waiting write put in, so its outcomes go back to it.
    let mut commands = Vec::new();
    let mut answers = Vec::with_capacity(batch.len());
    let mut sizes = Vec::with_capacity(batch.len());
    for (c, done) in batch {
        match c {
            Command::V1(CommandV1::Batch(inner)) => {
                sizes.push(Some(inner.len()));
                commands.extend(inner);
            }
            Command::V1(c) => {
                sizes.push(None);
                commands.push(c);
            }
        }
        answers.push(done);
    }
    (Command::V1(CommandV1::Batch(commands)), answers, sizes)
}

/// Proposes one entry for the commands and answers each.
async fn propose_batch(p: &Proposer, batch: Vec<Waiting>) {
    let started = Instant::now();
    let kinds: Vec<&'static str> = batch.iter().map(|(c, _)| c.kind()).collect();
    let (command, answers, sizes) = one_entry(batch);
    let grouped = answers.len() > 1;
    let commands_total: usize = sizes.iter().map(|s| s.unwrap_or(1)).sum();
    let result = match tokio::time::timeout(p.write_timeout, p.raft.client_write(command)).await {
        Err(_) => Err(not_committed(p.write_timeout)),
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(ForwardError::NotLeader { leader: f.leader_id, leader_node: f.leader_node })
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(ForwardError::Refused(e.to_string()))
        }
        Ok(Err(RaftError::Fatal(e))) => Err(ForwardError::NoQuorum(format!("raft stopped: {e}"))),
    };
    #[allow(clippy::result_large_err)] // ForwardError, the p2p crate's wire type
    let outcomes: Vec<Result<Outcome, ForwardError>> = match result {
        Ok(Outcome::Batch(outcomes)) if grouped && outcomes.len() == commands_total => {
            let mut outcomes = outcomes.into_iter();
            sizes
                .iter()
                .map(|size| match size {
                    None => Ok(outcomes.next().expect("counted")),
                    Some(n) => Ok(Outcome::Batch(outcomes.by_ref().take(*n).collect())),
                })
                .collect()
        }
        // A whole batch refused (a command version this node does not know).
        Ok(Outcome::Rejected(r)) if grouped => vec![Ok(Outcome::Rejected(r)); answers.len()],
        Ok(other) if grouped => {
            let e = ForwardError::Refused(format!("unexpected outcome of a batch: {other:?}"));
            vec![Err(e); answers.len()]
        }
        other => vec![other],
    };
    if grouped {
        p.metrics.raft_batched_writes_total.inc_by(answers.len() as u64);
    }
    for ((outcome, done), kind) in outcomes.into_iter().zip(answers).zip(kinds) {
        let label = match &outcome {
            Ok(Outcome::Rejected(_)) => "rejected",
            Ok(_) => "ok",
            Err(ForwardError::NotLeader { .. }) => "not_leader",
            Err(_) => "no_quorum",
        };
        if outcome.is_ok() {
            p.metrics.raft_commit_seconds.observe(started.elapsed().as_secs_f64());
        }
        p.metrics.writes_total.with_label_values(&[kind, label]).inc();
        let _ = done.send(outcome);
    }
}
