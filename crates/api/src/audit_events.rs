//! `GET /AuditEvent?entity.identifier=https://fhir.nhs.uk/Id/nhs-number|N`:
//! who looked at a patient's record, from every node, merged by time; a
//! node that cannot be reached is said so, never silently left out.

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::audit::AuditQuery;
use hie_domain::{NhsNumber, Purpose, Role, Timestamp};
use hie_fhir::{self as fhir, parse_query};
use hie_replica::AuditAnswer;
use serde_json::{Value, json};

use crate::envelope::RequestCtx;
use crate::error::{ApiError, operation_outcome};
use crate::respond::fhir_json;
use crate::router::{AppState, St};

/// Parses a `date` search value (`YYYY-MM-DD` or an RFC 3339 instant) with
/// its prefix into an inclusive bound: (lower?, millis).
fn date_bound(value: &str) -> Result<(bool, i64), ApiError> {
    let bad = || ApiError::InvalidParameter(format!("date: {value} is not ge/gt/le/lt with a date or instant"));
    let (lower, strict, text) = match (value.get(..2), value.get(2..)) {
        (Some("ge"), Some(rest)) => (true, false, rest),
        (Some("gt"), Some(rest)) => (true, true, rest),
        (Some("le"), Some(rest)) => (false, false, rest),
        (Some("lt"), Some(rest)) => (false, true, rest),
        _ => return Err(bad()),
    };
    let millis = if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = d.and_hms_opt(0, 0, 0).ok_or_else(bad)?.and_utc().timestamp_millis();
        // A whole day: ge/lt the day's start, le/gt the day's end.
        match (lower, strict) {
            (true, false) | (false, true) => day,
            (false, false) | (true, true) => day + 86_400_000 - 1,
        }
    } else {
        chrono::DateTime::parse_from_rfc3339(text).map_err(|_| bad())?.timestamp_millis()
    };
    Ok(match (lower, strict) {
        (true, true) => (true, millis + 1),
        (false, true) => (false, millis - 1),
        (l, false) => (l, millis),
    })
}

/// The query's patient and time bounds.
fn audit_query(uri: &Uri, limit: u32) -> Result<AuditQuery, ApiError> {
    let mut subject = None;
    let (mut since, mut until) = (None, None);
    for (name, value) in parse_query(uri.query().unwrap_or(""))? {
        match name.as_str() {
            "entity.identifier" | "entity:identifier" | "patient.identifier" => {
                let nhs = value.strip_prefix(&format!("{}|", fhir::NHS_NUMBER_SYSTEM)).ok_or_else(|| {
                    ApiError::InvalidParameter(format!("{name} must be {}|<NHS Number>", fhir::NHS_NUMBER_SYSTEM))
                })?;
                if subject.replace(NhsNumber::parse(nhs).map_err(ApiError::InvalidNhsNumber)?).is_some() {
                    return Err(ApiError::InvalidParameter(format!("{name} given more than once")));
                }
            }
            "date" => match date_bound(&value)? {
                (true, t) => since = Some(since.map_or(t, |s: i64| s.max(t))),
                (false, t) => until = Some(until.map_or(t, |u: i64| u.min(t))),
            },
            other => {
                return Err(ApiError::InvalidParameter(format!(
                    "unknown search parameter {other} (supported: entity.identifier, date)"
                )));
            }
        }
    }
    let subject = subject.ok_or_else(|| {
        ApiError::InvalidParameter(format!("entity.identifier={}|<NHS Number> is required", fhir::NHS_NUMBER_SYSTEM))
    })?;
    Ok(AuditQuery { subject, since: since.map(Timestamp), until: until.map(Timestamp), limit })
}

pub(crate) async fn audit_events(State(st): St, ctx: RequestCtx, uri: Uri) -> Result<Response, ApiError> {
    if !(ctx.caller.has(Role::PatientAccess) || ctx.caller.has(Role::ConsentAuthority)) {
        return Err(ApiError::Forbidden(
            "reading audit events needs the patient-access or consent-authority role".into(),
        ));
    }
    let limits = &st.config.limits;
    let query = audit_query(&uri, limits.audit_query_events_max)?;
    ctx.audit.set(&query.subject, Action::Execute, "search-type", &Purpose::DirectCare);
    ctx.audit.resource("AuditEvent".into());
    let answers = st.replica.audit_query_all(query, limits.audit_fanout_timeout).await;
    Ok(fhir_json(StatusCode::OK, &merged_bundle(&st, answers)))
}

/// Every node's events merged by time, then an outcome entry for each node
/// that was not reached, truncated its answer or found damaged records.
fn merged_bundle(st: &AppState, answers: Vec<AuditAnswer>) -> Value {
    let mut events: Vec<(i64, u64, Value)> = Vec::new();
    let mut outcomes: Vec<Value> = Vec::new();
    for a in answers {
        let who = format!("node {} ({})", a.id, a.region);
        let page = match a.result {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(node = a.id, error = %e, "an audit query could not reach a node");
                let text = format!("{who} could not be reached, so its audit events are missing: {e}");
                outcomes.push(operation_outcome("warning", "incomplete", "NODE_UNREACHABLE", &text));
                continue;
            }
        };
        if page.truncated {
            let n = st.config.limits.audit_query_events_max;
            let text = format!("{who} returned only its newest {n} events; narrow the date range");
            outcomes.push(operation_outcome("information", "too-costly", "RESULTS_TRUNCATED", &text));
        }
        if !page.damaged.is_empty() {
            let n = page.damaged.len();
            let text = format!("{who}: {n} audit records failed their integrity check and are left out");
            outcomes.push(operation_outcome("error", "exception", "AUDIT_RECORD_DAMAGED", &text));
        }
        for text in page.events {
            let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
            let at = hie_audit::event::recorded_millis(&v).unwrap_or(0);
            events.push((at, a.id, v));
        }
    }
    events.sort_by_key(|e| (e.0, e.1));
    let total = events.len();
    let base = &st.config.base_url;
    let mut entry: Vec<Value> = events
        .into_iter()
        .map(|(_, _, v)| {
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            json!({ "fullUrl": format!("{base}/AuditEvent/{id}"), "resource": v, "search": { "mode": "match" } })
        })
        .collect();
    entry.extend(outcomes.into_iter().map(|o| json!({ "resource": o, "search": { "mode": "outcome" } })));
    json!({ "resourceType": "Bundle", "type": "searchset", "total": total, "entry": entry })
}
