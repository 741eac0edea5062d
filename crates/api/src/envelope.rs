//! Around every request: the request and correlation ids, authentication,
//! the rate limit, the fail-closed audit check, the timeout, metrics and an
//! access log line (never with an NHS Number); and the [`RequestCtx`] that
//! every handler takes.

use std::time::Instant;

use axum::Extension;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hie_domain::{Caller, Purpose, Reader, Role};
use tracing::Instrument;

use crate::audit_slot::{AuditSlot, record_accesses};
use crate::break_glass::ReadOf;
use crate::error::{ApiError, ErrorCode};
use crate::router::{AppState, St};
use crate::server::ConnIdentity;

/// What every handler needs of its request, built once by the envelope.
#[derive(Debug, Clone)]
pub(crate) struct RequestCtx {
    /// Who the client certificate says is calling.
    pub(crate) caller: Caller,
    /// The client's `X-Request-ID` (checked) or a new one.
    pub(crate) request_id: String,
    /// The client's `X-Correlation-ID` (checked), when it sent one.
    pub(crate) correlation_id: Option<String>,
    /// The accesses to patients' data this request makes, recorded by the
    /// envelope once the answer is known.
    pub(crate) audit: AuditSlot,
    /// Why a read happens (`X-HIE-Purpose-Of-Use`), or why the headers
    /// saying so are refused; asked for by reads only.
    purpose: Result<Purpose, String>,
}

impl RequestCtx {
    pub(crate) fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.caller.has(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("this needs the {} role", role.as_str())))
        }
    }

    /// The caller as a reader of pointers (a consumer or a producer).
    pub(crate) fn reader(&self) -> Result<Reader, ApiError> {
        Reader::new(&self.caller).map_err(|e| ApiError::Forbidden(e.to_string()))
    }

    /// The purpose of a read of `of`, checked before anything is read:
    /// breaking the glass needs the registry's permission and a use left in
    /// the organisation's hourly limit, and is counted, logged and audited
    /// (`break_glass.rs`), a refused attempt too.
    pub(crate) async fn read_purpose(&self, st: &AppState, of: ReadOf) -> Result<Purpose, ApiError> {
        let purpose = self.purpose.clone().map_err(ApiError::InvalidHeader)?;
        crate::break_glass::authorize(st, self, &purpose, of).await?;
        Ok(purpose)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCtx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<RequestCtx>().cloned().ok_or_else(|| ApiError::Internal("no request context".into()))
    }
}

/// Longest break-glass reason accepted.
const BREAK_GLASS_REASON_LEN_MAX: usize = 500;

/// Reads `X-HIE-Purpose-Of-Use` and `X-HIE-Break-Glass-Reason`.
fn purpose(headers: &HeaderMap) -> Result<Purpose, String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().map(str::trim).unwrap_or(""));
    match text("x-hie-purpose-of-use") {
        None | Some("directcare") => Ok(Purpose::DirectCare),
        Some("emergency") => {
            let reason = text("x-hie-break-glass-reason").unwrap_or("");
            if reason.is_empty() || reason.len() > BREAK_GLASS_REASON_LEN_MAX {
                return Err(format!(
                    "breaking the glass needs X-HIE-Break-Glass-Reason (1 to {BREAK_GLASS_REASON_LEN_MAX} characters)"
                ));
            }
            Ok(Purpose::BreakGlass { reason: reason.to_owned() })
        }
        Some(_) => Err("X-HIE-Purpose-Of-Use must be directcare or emergency".into()),
    }
}

fn valid_request_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The request's `X-Request-ID` and `X-Correlation-ID`, each checked.
fn request_ids(headers: &HeaderMap, len_max: usize) -> Result<(Option<String>, Option<String>), ApiError> {
    let one = |name: &str| match headers.get(name) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if valid_request_id(s, len_max) => Ok(Some(s.to_owned())),
            _ => Err(ApiError::InvalidHeader(format!("{name} must be 1 to {len_max} characters of A-Z a-z 0-9 . _ -"))),
        },
    };
    Ok((one("x-request-id")?, one("x-correlation-id")?))
}

/// Why a request is refused before its handler runs, if it is.
fn refusal(st: &AppState, identity: &ConnIdentity, method: &Method, route: &str) -> Option<ApiError> {
    // A connection opened before its certificate was revoked is refused
    // from the next request on.
    if identity.cert.as_ref().is_some_and(|id| st.tls.is_revoked(id)) {
        return Some(ApiError::Forbidden("the client certificate has been revoked".into()));
    }
    match &identity.caller {
        Err(reason) => {
            return Some(ApiError::Forbidden(format!(
                "the client certificate names no organisation and role: {reason}"
            )));
        }
        Ok(c) if !st.limiter.allow(&c.ods) => return Some(ApiError::RateLimited),
        Ok(_) => {}
    }
    // Fail closed, before any effect: while the audit log cannot be written,
    // refuse requests that would change patient data or the cluster
    // (`/admin/*`) rather than make the change and fail to record it (the
    // batch route is the base, `/fhir`).
    let changes =
        method != Method::GET && (route == "/fhir" || route.starts_with("/fhir/") || route.starts_with("/admin/"));
    (changes && st.audit.as_ref().is_some_and(|a| a.failing())).then(|| {
        ApiError::AuditUnavailable(
            "the audit log of this node cannot be written at the moment; nothing was changed".into(),
        )
    })
}

pub(crate) async fn envelope(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let limits = &st.config.limits;
    let (ids, early) = match request_ids(req.headers(), limits.request_id_len_max) {
        Ok(ids) => (ids, refusal(&st, &identity, &method, &route)),
        Err(e) => ((None, None), Some(e)),
    };
    let (request_id, correlation_id) = ids;
    let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let slot = AuditSlot::default();
    if route.starts_with("/admin/") {
        slot.operator(&method, req.uri().path());
    }
    let caller = identity.caller;
    if let Ok(c) = &caller {
        let ctx = RequestCtx {
            caller: c.clone(),
            request_id: request_id.clone(),
            correlation_id: correlation_id.clone(),
            audit: slot.clone(),
            purpose: purpose(req.headers()),
        };
        req.extensions_mut().insert(ctx);
    }
    let mut resp = match early {
        Some(e) => e.into_response(),
        // Every line logged while serving the request carries its ids.
        None => {
            let span = tracing::info_span!("request", request_id = %request_id, correlation_id = correlation_id.as_deref().unwrap_or(""));
            match tokio::time::timeout(limits.request_timeout, next.run(req).instrument(span)).await {
                Ok(r) => r,
                Err(_) => ApiError::Timeout { millis: limits.request_timeout.as_millis() as u64 }.into_response(),
            }
        }
    };
    if let (Some(log), Ok(c)) = (&st.audit, &caller) {
        resp = record_accesses(&st, log, slot.take(), c, (&request_id, correlation_id.as_deref()), resp).await;
    }
    let status = resp.status();
    let m = st.replica.metrics();
    m.api_requests_total.with_label_values(&[&route, status.as_str()]).inc();
    m.api_request_duration_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        m.api_rejected_total.with_label_values(&[code]).inc();
    }
    for (name, value) in [("x-request-id", Some(&request_id)), ("x-correlation-id", correlation_id.as_ref())] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            resp.headers_mut().insert(name, v);
        }
    }
    tracing::info!(
        request_id,
        correlation_id = correlation_id.as_deref().unwrap_or(""),
        method = %method,
        route,
        status = status.as_u16(),
        ods = caller.as_ref().map(|c| c.ods.as_str().to_owned()).unwrap_or_default(),
        micros = started.elapsed().as_micros() as u64,
        "api request"
    );
    resp
}
