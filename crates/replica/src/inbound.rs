//! Requests from peers: Raft RPCs, forwarded writes and read-index requests.

use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use futures::future::BoxFuture;
use hie_domain::raft::Raft;
use hie_domain::{Command, CommandV1};
use hie_p2p::{ForwardError, Inbound, PeerId, Request, Response};
use openraft::raft::AppendEntriesResponse;

use crate::freshness::ContactClock;
use crate::membership::member_peer;
use crate::replica::Core;
use crate::writes::propose_local;

/// Serves peers' requests. Installed in the transport before Raft exists,
/// so it answers `Refused` until the replica has started.
pub(crate) struct InboundHandler {
    pub(crate) core: OnceLock<Arc<Core>>,
    pub(crate) clock: Arc<ContactClock>,
}

impl Inbound for InboundHandler {
    fn handle(&self, peer: PeerId, request: Request) -> BoxFuture<'static, Response> {
        let Some(core) = self.core.get().cloned() else {
            return futures::future::ready(Response::Refused("node is starting".into())).boxed();
        };
        let clock = self.clock.clone();
        async move { handle(core, clock, peer, request).await }.boxed()
    }
}

async fn handle(core: Arc<Core>, clock: Arc<ContactClock>, peer: PeerId, request: Request) -> Response {
    let raft: &Raft = &core.raft;
    // Append-entries and snapshots come from the leader, and reach a new
    // learner before it knows any membership; every other request is
    // served only to a member, so that a peer still allowed to connect (a
    // seed, while this node is not yet a member) cannot forge writes, vote,
    // or read audit trails.
    let members_only =
        matches!(request, Request::ClientWrite { .. } | Request::Vote(_) | Request::ReadIndex | Request::AuditQuery(_));
    if members_only && !core.is_member(&peer) {
        core.metrics.p2p_non_member_requests_total.with_label_values(&[request.kind()]).inc();
        tracing::warn!(%peer, kind = request.kind(), "refused a request from a peer that is not a member");
        return Response::Refused("not a member of this node's membership".into());
    }
    match request {
        Request::AppendEntries(req) => {
            let commit = req.leader_commit.map(|l| l.index);
            let result = raft.append_entries(req).await;
            if let Ok(resp) = &result
                && !matches!(resp, AppendEntriesResponse::HigherVote(_))
            {
                clock.leader_contact(commit);
            }
            Response::AppendEntries(result)
        }
        Request::Vote(req) => Response::Vote(raft.vote(req).await),
        // A node receiving a snapshot is not fresh until the leader's next
        // append-entries (which tells it the commit index) reaches it.
        Request::InstallSnapshot(chunk) => Response::InstallSnapshot(raft.install_snapshot(chunk.into()).await),
        Request::ClientWrite { caller, command, request_id } => {
            core.metrics.forwarded_writes_total.with_label_values(&["in"]).inc();
            tracing::debug!(%peer, request_id, kind = command.kind(), ods = %caller.ods, "forwarded write");
            // A node anchors only its own audit chain.
            if let Command::V1(CommandV1::AnchorAudit { anchor }) = &command {
                let m = core.raft.metrics().borrow().clone();
                if member_peer(&m, anchor.node) != Some(peer) {
                    tracing::warn!(%peer, node = anchor.node, "refused an audit anchor for another node");
                    return Response::ClientWrite(Err(ForwardError::Refused(
                        "a node may anchor only its own audit chain".into(),
                    )));
                }
            }
            Response::ClientWrite(propose_local(&core, command).await)
        }
        Request::AuditQuery(q) => {
            let result = match &core.audit {
                Some(audit) => audit.query(q).await,
                None => Err("this node keeps no audit log".into()),
            };
            let label = if result.is_ok() { "ok" } else { "error" };
            core.metrics.audit_queries_total.with_label_values(&["in", label]).inc();
            Response::AuditQuery(result)
        }
        // Followers' read-index requests share rounds with each other and
        // with this node's own linearizable reads.
        Request::ReadIndex => Response::ReadIndex(core.leader_read_index().await),
    }
}
