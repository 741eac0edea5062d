//! Anchoring this node's audit chain in the replicated state.
//!
//! At a bounded interval, while the chain grows, the node proposes its last
//! fsynced record's `(seq, hash)` through Raft (`AnchorAudit`). Every
//! replica then holds a head the node's own disk cannot take back: `hie
//! audit verify --cluster` finds a chain cut short or rewritten (even
//! consistently) against it. Before each proposal the node checks that its
//! chain still holds the anchor the cluster has for it; if not, it stops
//! anchoring (so that anchor stays as evidence), says so in its log and sets
//! `hie_audit_anchor_mismatch`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hie_audit::AuditLog;
use hie_audit::chain::{AnchorCheck, check_anchor};
use hie_domain::{AuditAnchor, Caller, Command, CommandV1, OdsCode, Timestamp};
use hie_replica::Replica;
use tokio::sync::watch;

/// The caller a node's own commands carry (no client role: the apply of
/// `AnchorAudit` and `SubscriptionProgress` asks for none, and a forwarded
/// anchor is taken only from the node it names).
pub(crate) fn node_caller() -> Caller {
    Caller { ods: OdsCode::parse("HIENODE").expect("a valid ODS-shaped code"), roles: BTreeSet::new() }
}

pub(crate) fn now() -> Timestamp {
    Timestamp(chrono::Utc::now().timestamp_millis())
}

/// Runs until `shutdown`: checks and anchors every `interval`.
pub async fn run(
    replica: Arc<Replica>,
    audit: Arc<AuditLog>,
    node: u64,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = replica.metrics().clone();
    // The anchor this node last saw hold (or proposed itself): checking it
    // again would read the disk for nothing.
    let mut known_good: Option<(u64, String)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let stored = match replica.audit_anchors().await {
            Ok(all) => all.into_iter().find(|a| a.node == node),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the audit anchors yet");
                continue;
            }
        };
        if let Some(a) = &stored {
            metrics.audit_anchored_seq.set(a.seq as i64);
            if known_good.as_ref() != Some(&(a.seq, a.hash.clone())) {
                let dir = audit.dir().to_owned();
                let (seq, hash) = (a.seq, a.hash.clone());
                let checked = tokio::task::spawn_blocking(move || check_anchor(&dir, seq, &hash)).await;
                match checked {
                    Ok(Ok(AnchorCheck::Holds)) => known_good = Some((a.seq, a.hash.clone())),
                    Ok(Ok(bad)) => {
                        metrics.audit_anchor_mismatch.set(1);
                        let what = match bad {
                            AnchorCheck::CutShort { records } => {
                                format!("the chain ends at record {records}: records were cut off")
                            }
                            _ => "the anchored record's hash differs: the chain was rewritten".to_owned(),
                        };
                        tracing::error!(
                            anchor_seq = a.seq,
                            anchor_hash = %a.hash,
                            "this node's audit chain does not hold the head the cluster anchored for it ({what}); anchoring stopped, see ops/RUNBOOK.md#audit-anchor-mismatch"
                        );
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the anchored audit record; trying again");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the audit anchor check did not finish");
                        continue;
                    }
                }
            }
        }
        let head = match audit.durable_head() {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit chain's head");
                continue;
            }
        };
        if stored.as_ref().is_some_and(|a| a.seq >= head.0) {
            continue;
        }
        let anchor = AuditAnchor { node, seq: head.0, hash: head.1.clone(), at: now() };
        let command = Command::V1(CommandV1::AnchorAudit { anchor });
        let request_id = format!("audit-anchor-{node}-{}", head.0);
        match replica.write(&node_caller(), command, &request_id).await {
            Ok(_) => {
                metrics.audit_anchored_seq.set(head.0 as i64);
                known_good = Some(head);
            }
            // No quorum or no leader: the next tick tries again.
            Err(e) => tracing::debug!(error = %e, "audit anchor not committed; trying again"),
        }
    }
}
