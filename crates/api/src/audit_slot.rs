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
    /// Its intent is fsynced in the log (see [`record_intents`]).
    intent: bool,
}

/// Whether an access changes data (and so has an intent recorded first).
fn is_change(action: Action) -> bool {
    action != Action::Read && action != Action::Execute
}

/// An access to `subject`'s data for `purpose`.
pub(crate) fn access(subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) -> Access {
    let emergency_reason = match purpose {
        Purpose::BreakGlass { reason } => Some(reason.clone()),
        Purpose::DirectCare => None,
    };
    Access { subject: Some(*subject), action, interaction, resource: None, emergency_reason }
}

impl AuditSlot {
    fn lock(&self) -> MutexGuard<'_, Vec<Slotted>> {
        self.0.lock().expect("audit slot lock")
    }

    /// The request's one access.
    pub(crate) fn set(&self, subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) {
        *self.lock() =
            vec![Slotted { access: access(subject, action, interaction, purpose), outcome: None, intent: false }];
    }

    /// A read refused before anything was read (a break-glass attempt
    /// without the permission or beyond the limit): of `subject` when the
    /// request names one, else of `resource`. With no patient it is
    /// fsynced before the answer, as an operator's action is.
    pub(crate) fn refused_read(
        &self,
        subject: Option<&NhsNumber>,
        interaction: &'static str,
        resource: Option<String>,
        purpose: &Purpose,
    ) {
        let emergency_reason = match purpose {
            Purpose::BreakGlass { reason } => Some(reason.clone()),
            Purpose::DirectCare => None,
        };
        let access =
            Access { subject: subject.copied(), action: Action::Read, interaction, resource, emergency_reason };
        *self.lock() = vec![Slotted { access, outcome: None, intent: false }];
    }

    /// An operator's action (`/admin/*`): `method` on `path`. Recorded,
    /// fsynced, before the answer, whoever asked (a refused attempt too).
    pub(crate) fn operator(&self, method: &axum::http::Method, path: &str) {
        use axum::http::Method;
        let (action, interaction) = match *method {
            Method::GET | Method::HEAD => (Action::Read, "read"),
            Method::PUT => (Action::Update, "update"),
            Method::DELETE => (Action::Delete, "delete"),
            _ => (Action::Execute, "operation"),
        };
        let access = Access {
            subject: None,
            action,
            interaction,
            resource: Some(format!("{method} {path}")),
            emergency_reason: None,
        };
        self.lock().push(Slotted { access, outcome: None, intent: false });
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
        slot.push(Slotted { access, outcome: None, intent: false });
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

/// The context of a request's audit records.
fn context<'a>(
    st: &'a AppState,
    caller: &'a Caller,
    roles: &[&'a str],
    (request_id, correlation_id): (&'a str, Option<&'a str>),
    (status, error_code): (u16, Option<&'a str>),
) -> hie_audit::Context<'a> {
    hie_audit::Context {
        event_id: st.event_ids.next(),
        caller_ods: caller.ods.as_str(),
        caller_roles: roles.to_vec(),
        request_id,
        correlation_id,
        node: &st.node_label,
        recorded: now(),
        status,
        error_code,
    }
}

/// Records the intent of every change in the slot, fsynced, before the
/// change is proposed: a change is never committed without a record of
/// it, even if this node stops before it answers (the record of how it
/// ended then never follows, and a query shows the intent). Fails, having
/// changed nothing, when the log cannot take them.
pub(crate) async fn record_intents(
    st: &AppState,
    log: &AuditLog,
    slot: &AuditSlot,
    caller: &Caller,
    ids: (&str, Option<&str>),
) -> Result<(), ApiError> {
    let pending: Vec<(usize, Access)> = slot
        .lock()
        .iter()
        .enumerate()
        .filter(|(_, s)| is_change(s.access.action) && !s.intent)
        .map(|(i, s)| (i, s.access.clone()))
        .collect();
    let roles: Vec<&str> = caller.roles.iter().map(|r| r.as_str()).collect();
    let last = pending.len().saturating_sub(1);
    for (n, (_, access)) in pending.iter().enumerate() {
        let ctx = context(st, caller, &roles, ids, (hie_audit::INTENT, None));
        // One fsync, after the last, serves them all.
        log.append(hie_audit::audit_event(access, &ctx), n == last).await.map_err(|e| {
            ApiError::AuditUnavailable(format!(
                "{e}; the change's audit record could not be written, so nothing was changed"
            ))
        })?;
    }
    let mut slotted = slot.lock();
    for (i, _) in pending {
        if let Some(s) = slotted.get_mut(i) {
            s.intent = true;
        }
    }
    Ok(())
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
    let mut unrecorded_change = false;
    for (i, Slotted { access, outcome, intent }) in accesses.into_iter().enumerate() {
        let (status, error_code) =
            outcome.unwrap_or_else(|| (resp.status().as_u16(), resp.extensions().get::<ErrorCode>().map(|c| c.0)));
        let ctx = context(st, caller, &roles, (request_id, correlation_id), (status, error_code));
        let event = hie_audit::audit_event(&access, &ctx);
        // A change's intent was fsynced before it was proposed, so how it
        // ended is written like a read's record: before the answer, and
        // fsynced within the sync interval. A change refused before it was
        // proposed (no intent) has its record fsynced before the answer.
        // One fsync, waited for after the last record, serves all.
        change |= is_change(access.action);
        // An operator's action is fsynced before it is answered, read or not.
        unrecorded_change |= (is_change(access.action) && !intent) || access.subject.is_none();
        if let Err(e) = log.append(event, unrecorded_change && i == last).await {
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
