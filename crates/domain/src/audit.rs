//! What nodes ask each other about their audit logs ("who looked at my
//! record"), and the trait a node's audit log answers it through.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::{NhsNumber, Timestamp};

/// One patient's audit events on one node, within an optional time range
/// (both ends inclusive), newest `limit` of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditQuery {
    pub subject: NhsNumber,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub limit: u32,
}

/// A node's answer: FHIR AuditEvent resources as JSON text, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditPage {
    pub events: Vec<String>,
    /// More events matched than `limit`; the oldest were left out.
    pub truncated: bool,
    /// Sequence numbers of matching records that failed their integrity
    /// check and were left out.
    pub damaged: Vec<u64>,
}

pub type AuditFuture = Pin<Box<dyn Future<Output = Result<AuditPage, String>> + Send>>;

/// A node's own audit log, as seen by the replica answering peers.
pub trait AuditSource: Send + Sync + 'static {
    fn query(&self, query: AuditQuery) -> AuditFuture;
}
