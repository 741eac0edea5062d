//! Audit queries across the cluster: every member asked for a patient's
//! audit events at once, each answer reported on its own.

use std::time::Duration;

use hie_domain::audit::{AuditPage, AuditQuery};
use hie_domain::raft::{NodeId, NodeInfo};
use hie_p2p::{PeerId, Request, Response};

use crate::replica::Replica;

/// One member's answer to an audit query.
#[derive(Debug, Clone)]
pub struct AuditAnswer {
    pub id: NodeId,
    pub region: String,
    pub result: Result<AuditPage, String>,
}

impl Replica {
    /// Asks every member (voters and learners, this node included) for a
    /// patient's audit events, all at once; each answers within `timeout`
    /// or is reported as not reached.
    pub async fn audit_query_all(&self, query: AuditQuery, timeout: Duration) -> Vec<AuditAnswer> {
        let m = self.core.raft.metrics().borrow().clone();
        let members: Vec<(NodeId, NodeInfo)> =
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.clone())).collect();
        let asks = members.into_iter().map(|(id, node)| {
            let query = query.clone();
            async move {
                let result = if id == self.id {
                    self.audit_here(query).await
                } else {
                    self.audit_of(&node, query, timeout).await
                };
                AuditAnswer { id, region: node.region, result }
            }
        });
        futures::future::join_all(asks).await
    }

    /// This node's answer, from its own audit log.
    async fn audit_here(&self, query: AuditQuery) -> Result<AuditPage, String> {
        match &self.core.audit {
            Some(audit) => audit.query(query).await,
            None => Err("this node keeps no audit log".into()),
        }
    }

    /// Member `node`'s answer, over the transport within `timeout`.
    async fn audit_of(&self, node: &NodeInfo, query: AuditQuery, timeout: Duration) -> Result<AuditPage, String> {
        let Ok(peer) = node.peer_id.parse::<PeerId>() else {
            return Err(format!("bad peer id {}", node.peer_id));
        };
        let r = tokio::time::timeout(timeout, self.p2p.request(peer, Request::AuditQuery(query))).await;
        let result = match r {
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            Ok(Err(e)) => Err(format!("not reached: {e}")),
            Ok(Ok(Response::AuditQuery(r))) => r,
            Ok(Ok(other)) => Err(format!("unexpected answer {}", other.kind())),
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.core.metrics.audit_queries_total.with_label_values(&["out", label]).inc();
        result
    }
}
