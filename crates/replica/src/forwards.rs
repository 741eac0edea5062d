//! Forwarding writes to the leader, grouped: on a follower, the writes
//! waiting while earlier forwards are in flight go to the leader together,
//! in one request, as one `CommandV1::Batch`.
//!
//! Every forward is a libp2p request: a new yamux stream, its protocol
//! negotiation, Noise frames, a timer, a task on each side. With writes
//! arriving faster than forwards come back, that was paid once per write;
//! here at most [`IN_FLIGHT_MAX`] forwards are in flight from this node, and
//! the writes arriving meanwhile go in the next one (at most
//! [`BATCH_COMMANDS_MAX`] commands; a client's own batch larger than that
//! goes alone). A lone write is forwarded at once, on its own.
//!
//! The leader proposes the batch like any client batch (`proposals.rs`
//! spreads it into its group) and answers each command's outcome; they go
//! back to each write here. A failure of the request (not delivered, or
//! maybe delivered) is every write's failure, and each write's own loop in
//! `Replica::write` decides, as for a single forward, whether to retry.
//! Authorization never depends on the grouping: each command carries its
//! caller, and the leader's state machine checks each.

use std::sync::Arc;

use hie_domain::{Caller, Command, CommandV1, Outcome};
use hie_p2p::{P2p, PeerId, Request, Response, SendError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::proposals::{BATCH_COMMANDS_MAX, commands_in};

/// Forward requests in flight from this node at once.
pub const IN_FLIGHT_MAX: usize = 4;
/// Writes waiting to be forwarded; past this, a write waits for room.
pub const WAITING_MAX: usize = 4096;

struct Waiting {
    leader: PeerId,
    caller: Caller,
    command: Command,
    request_id: String,
    done: oneshot::Sender<Result<Response, SendError>>,
}

pub(crate) struct Forwards {
    tx: mpsc::Sender<Waiting>,
}

impl Forwards {
    /// Starts the task that groups and sends; it ends when this is dropped.
    pub(crate) fn start(p2p: P2p) -> Forwards {
        let (tx, rx) = mpsc::channel(WAITING_MAX);
        tokio::spawn(run(p2p, rx));
        Forwards { tx }
    }

    /// Forwards one write to `leader`: the leader's answer to it, or why the
    /// request failed. The caller bounds the wait.
    pub(crate) async fn forward(
        &self,
        leader: PeerId,
        caller: &Caller,
        command: Command,
        request_id: &str,
    ) -> Result<Response, SendError> {
        let (done, answer) = oneshot::channel();
        let waiting = Waiting { leader, caller: caller.clone(), command, request_id: request_id.to_owned(), done };
        self.tx.send(waiting).await.map_err(|_| SendError::Stopped)?;
        answer.await.map_err(|_| SendError::Stopped)?
    }
}

async fn run(p2p: P2p, mut rx: mpsc::Receiver<Waiting>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
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
        let mut commands = commands_in(&first.command);
        let leader = first.leader;
        let mut group = vec![first];
        while commands < BATCH_COMMANDS_MAX {
            match rx.try_recv() {
                Ok(w) if w.leader != leader || commands + commands_in(&w.command) > BATCH_COMMANDS_MAX => {
                    held = Some(w);
                    break;
                }
                Ok(w) => {
                    commands += commands_in(&w.command);
                    group.push(w);
                }
                Err(_) => break,
            }
        }
        let p2p = p2p.clone();
        tokio::spawn(async move {
            send(&p2p, leader, group).await;
            drop(permit);
        });
    }
}

/// Sends one request for the group and answers each write.
async fn send(p2p: &P2p, leader: PeerId, mut group: Vec<Waiting>) {
    if group.len() == 1 {
        let w = group.pop().expect("one");
        let request = Request::ClientWrite { caller: w.caller, command: w.command, request_id: w.request_id };
        let _ = w.done.send(p2p.request(leader, request).await);
        return;
    }
    // Request ids are for the leader's logs: the first, and how many more.
    let request_id = format!("{}+{}", group[0].request_id, group.len() - 1);
    let caller = group[0].caller.clone();
    let mut sizes = Vec::with_capacity(group.len());
    let mut commands = Vec::new();
    let mut answers = Vec::with_capacity(group.len());
    for w in group {
        match w.command {
            Command::V1(CommandV1::Batch(inner)) => {
                sizes.push(Some(inner.len()));
                commands.extend(inner);
            }
            Command::V1(c) => {
                sizes.push(None);
                commands.push(c);
            }
        }
        answers.push(w.done);
    }
    let total = commands.len();
    let request = Request::ClientWrite { caller, command: Command::V1(CommandV1::Batch(commands)), request_id };
    let replies: Vec<Result<Response, SendError>> = match p2p.request(leader, request).await {
        Ok(Response::ClientWrite(Ok(Outcome::Batch(outcomes)))) if outcomes.len() == total => {
            let mut outcomes = outcomes.into_iter();
            sizes
                .iter()
                .map(|size| {
                    let outcome = match size {
                        None => outcomes.next().expect("counted"),
                        Some(n) => Outcome::Batch(outcomes.by_ref().take(*n).collect()),
                    };
                    Ok(Response::ClientWrite(Ok(outcome)))
                })
                .collect()
        }
        // The same answer for each: a refusal of the whole batch, an error
        // (not the leader, no quorum), or a failed request.
        Ok(Response::ClientWrite(Ok(outcome))) => {
            answers.iter().map(|_| Ok(Response::ClientWrite(Ok(outcome.clone())))).collect()
        }
        Ok(Response::ClientWrite(Err(e))) => {
            answers.iter().map(|_| Ok(Response::ClientWrite(Err(e.clone())))).collect()
        }
        Ok(other) => {
            let reason = format!("unexpected answer to a forwarded batch: {other:?}");
            answers.iter().map(|_| Ok(Response::Refused(reason.clone()))).collect()
        }
        Err(e) => answers.iter().map(|_| Err(e.clone())).collect(),
    };
    for (reply, done) in replies.into_iter().zip(answers) {
        let _ = done.send(reply);
    }
}
