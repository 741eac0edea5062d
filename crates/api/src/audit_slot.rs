//! The accesses a request makes to patients' data, and their audit records:
//! a handler notes each access in the request's [`AuditSlot`]; the envelope
//! writes the records once the answer is known, and answers only then.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hie_audit::{Access, Action, AuditLog};
use hie_domain::{Caller, NhsNumber, Purpose, Timestamp};

use crate::error::{ApiError, ErrorCode};
use crate::router::AppState;

/// The accesses a handler made (one, or one per entry of a batch Bundle).
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditSlot(Arc<Mutex<Vec<Slotted>>>);

#[derive(Debug)]
pub(crate) struct Slotted {
    access: Access,
    /// The status and error code of this access when it differs from the
    /// response's (an entry of a batch).
    outcome: Option<(u16, Option<&'static str>)>,
}

/// An access to `subject`'s data for `purpose`.
pub(crate) fn access(subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) -> Access {
    let emergency_reason = match purpose {
        Purpose::BreakGlass { reason } => Some(reason.clone()),
        Purpose::DirectCare => None,
    };
    Access { subject: *subject, action, interaction, resource: None, emergency_reason }
}

impl AuditSlot {
    fn lock(&self) -> MutexGuard<'_, Vec<Slotted>> {
        self.0.lock().expect("audit slot lock")
    }

    /// The request's one access.
    pub(crate) fn set(&self, subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) {
        *self.lock() = vec![Slotted { access: access(subject, action, interaction, purpose), outcome: None }];
    }

    /// Names the resource of the last access (added).
    pub(crate) fn resource(&self, resource: String) {
        if let Some(a) = self.lock().last_mut() {
            a.access.resource = Some(resource);
        }
    }

    /// Adds one access of several (a batch); its index.
    pub(crate) fn push(&self, access: Access) -> usize {
        let mut slot = self.lock();
        slot.push(Slotted { access, outcome: None });
        slot.len() - 1
    }

    /// Sets how access `i` of a batch ended.
    pub(crate) fn outcome(&self, i: usize, status: StatusCode, code: Option<&'static str>) {
        if let Some(a) = self.lock().get_mut(i) {
            a.outcome = Some((status.as_u16(), code));
        }
    }

    pub(crate) fn take(&self) -> Vec<Slotted> {
        std::mem::take(&mut *self.lock())
    }
}

/// Now, as the node's clock says.
pub(crate) fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

/// Writes the audit records of a request's accesses and answers only once
/// they are written (a change's: durable); if one cannot be written, the
/// answer becomes a 503 (fail closed).
pub(crate) async fn record_accesses(
    st: &AppState,
    log: &AuditLog,
    accesses: Vec<Slotted>,
    caller: &Caller,
    ids: (&str, Option<&str>),
    resp: Response,
) -> Response {
    let (request_id, correlation_id) = ids;
    let roles: Vec<&str> = caller.roles.iter().map(|r| r.as_str()).collect();
    let last = accesses.len().saturating_sub(1);
    let mut change = false;
    for (i, Slotted { access, outcome }) in accesses.into_iter().enumerate() {
        let (status, error_code) =
            outcome.unwrap_or_else(|| (resp.status().as_u16(), resp.extensions().get::<ErrorCode>().map(|c| c.0)));
        let ctx = hie_audit::Context {
            event_id: st.event_ids.next(),
            caller_ods: caller.ods.as_str(),
            caller_roles: roles.clone(),
            request_id,
            correlation_id,
            node: &st.node_label,
            recorded: now(),
            status,
            error_code,
        };
        let event = hie_audit::audit_event(&access, &ctx);
        // A change's record is fsynced before the change is answered; a
        // read's is written before the answer and fsynced within the sync
        // interval. One fsync, waited for after the last record, serves all.
        change |= access.action != Action::Read && access.action != Action::Execute;
        if let Err(e) = log.append(event, change && i == last).await {
            let changed = resp.status().is_success() && change;
            let msg = if changed {
                format!("{e}; the change was applied but could not be audited, so it is reported as failed")
            } else {
                format!("{e}; the answer is withheld (fail closed)")
            };
            return ApiError::AuditUnavailable(msg).into_response();
        }
    }
    resp
}
