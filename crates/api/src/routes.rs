//! The FHIR routes and the operator's admin routes on the API listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hie_audit::{Access, Action, AuditLog};
use hie_domain::audit::AuditQuery;
use hie_domain::raft::NodeInfo;
use hie_domain::{
    Caller, Command, CommandV1, NhsNumber, OdsCode, Outcome, PointerId, PointerStatus, PointerType, RecordPointer,
    Role, SnomedCode, Timestamp,
};
use hie_replica::{MembershipError, Replica};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode, operation_outcome};
use crate::limits::RateLimiter;
use crate::server::{ApiConfig, ConnIdentity};
use hie_fhir::{self as fhir, FHIR_JSON, SearchLimits, parse_query, parse_search};

pub(crate) struct AppState {
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    /// This node as audit events name it: `node-<id> (<region>)`.
    node_label: String,
    event_ids: hie_audit::EventIds,
    config: ApiConfig,
    limiter: RateLimiter,
    cursors: Mutex<Cursors>,
}

type St = State<Arc<AppState>>;

pub(crate) fn router(config: ApiConfig, replica: Arc<Replica>, audit: Option<Arc<AuditLog>>) -> Router {
    let limits = &config.limits;
    let state = Arc::new(AppState {
        limiter: RateLimiter::new(limits.rate_per_client_per_sec, limits.rate_burst),
        cursors: Mutex::new(Cursors::default()),
        node_label: format!("node-{} ({})", replica.id(), replica.node().region),
        event_ids: hie_audit::EventIds::new(replica.id()),
        replica,
        audit,
        config,
    });
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir", post(batch))
        .route("/fhir/DocumentReference", post(create).get(search_get))
        .route("/fhir/DocumentReference/_search", post(search_post))
        .route("/fhir/DocumentReference/_count", get(count))
        .route("/fhir/DocumentReference/{id}", get(read).put(update).delete(delete))
        .route("/fhir/Patient/{nhs}/$record-holders", get(record_holders))
        .route("/fhir/Consent", post(consent))
        .route("/fhir/AuditEvent", get(audit_events))
        .route("/admin/status", get(admin_status))
        .route("/admin/digest", get(admin_digest))
        .route("/admin/learners", post(admin_add_learner))
        .route("/admin/nodes/{id}/promote", post(admin_promote))
        .route("/admin/nodes/{id}", axum::routing::delete(admin_remove))
        .route("/admin/snapshot", post(admin_snapshot))
        .route("/admin/backup", get(admin_backup))
        .route("/admin/pointer-types", axum::routing::put(admin_put_type))
        .route("/admin/producers/{ods}", axum::routing::put(admin_put_producer))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), envelope))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// The request id of a request: the client's (checked) or a new one.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub String);

fn valid_request_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Around every request: request id, authentication, rate limit, timeout,
/// metrics and an access log line (never with an NHS Number).
async fn envelope(
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
    let mut request_id = None;
    let mut early: Option<ApiError> = None;
    for name in ["x-request-id", "x-correlation-id"] {
        if let Some(v) = req.headers().get(name) {
            match v.to_str() {
                Ok(s) if valid_request_id(s, limits.request_id_len_max) => {
                    if name == "x-request-id" {
                        request_id = Some(s.to_owned());
                    }
                }
                _ => {
                    early = Some(ApiError::InvalidHeader(format!(
                        "{name} must be 1 to {} characters of A-Z a-z 0-9 . _ -",
                        limits.request_id_len_max
                    )))
                }
            }
        }
    }
    let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    let caller = identity.0.clone();
    if early.is_none() {
        match &caller {
            Err(reason) => {
                early = Some(ApiError::Forbidden(format!(
                    "the client certificate names no organisation and role: {reason}"
                )))
            }
            Ok(c) if !st.limiter.allow(&c.ods) => early = Some(ApiError::RateLimited),
            Ok(_) => {}
        }
    }
    // Fail closed, before any effect: while the audit log cannot be written,
    // refuse requests that would change patient data rather than change it
    // and fail to record that.
    if early.is_none()
        && method != axum::http::Method::GET
        && route.starts_with("/fhir/")
        && st.audit.as_ref().is_some_and(|a| a.failing())
    {
        early = Some(ApiError::AuditUnavailable(
            "the audit log of this node cannot be written at the moment; nothing was changed".into(),
        ));
    }
    let mut resp = match early {
        Some(e) => e.into_response(),
        // Every line logged while serving the request carries its id.
        None => match tokio::time::timeout(
            limits.request_timeout,
            next.run(req).instrument(tracing::info_span!("request", request_id = %request_id)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => ApiError::Timeout { millis: limits.request_timeout.as_millis() as u64 }.into_response(),
        },
    };
    let accesses = slot.take();
    if let (false, Some(log), Ok(c)) = (accesses.is_empty(), &st.audit, &caller) {
        resp = record_access(&st, log, accesses, c, &request_id, resp).await;
    }
    let status = resp.status();
    let m = st.replica.metrics();
    m.api_requests_total.with_label_values(&[&route, status.as_str()]).inc();
    m.api_request_duration_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        m.api_rejected_total.with_label_values(&[code]).inc();
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        request_id,
        method = %method,
        route,
        status = status.as_u16(),
        ods = caller.as_ref().map(|c| c.ods.as_str().to_owned()).unwrap_or_default(),
        micros = started.elapsed().as_micros() as u64,
        "api request"
    );
    resp
}

/// The accesses a handler made to patients' data (one, or one per entry of
/// a batch Bundle), for the envelope to record once the answer is known.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditSlot(Arc<Mutex<Vec<Slotted>>>);

#[derive(Debug)]
pub(crate) struct Slotted {
    access: Access,
    /// The status and error code of this access when it differs from the
    /// response's (an entry of a batch).
    outcome: Option<(u16, Option<&'static str>)>,
}

fn access(subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) -> Access {
    let emergency_reason = match purpose {
        Purpose::BreakGlass(reason) => Some(reason.clone()),
        Purpose::DirectCare => None,
    };
    Access { subject: subject.clone(), action, interaction, resource: None, emergency_reason }
}

impl AuditSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slotted>> {
        self.0.lock().expect("audit slot lock")
    }

    /// The request's one access.
    fn set(&self, subject: &NhsNumber, action: Action, interaction: &'static str, purpose: &Purpose) {
        *self.lock() = vec![Slotted { access: access(subject, action, interaction, purpose), outcome: None }];
    }

    /// Names the resource of the last access (added).
    fn resource(&self, resource: String) {
        if let Some(a) = self.lock().last_mut() {
            a.access.resource = Some(resource);
        }
    }

    /// Adds one access of several (a batch); its index.
    fn push(&self, access: Access) -> usize {
        let mut slot = self.lock();
        slot.push(Slotted { access, outcome: None });
        slot.len() - 1
    }

    /// Sets how access `i` of a batch ended.
    fn outcome(&self, i: usize, status: StatusCode, code: Option<&'static str>) {
        if let Some(a) = self.lock().get_mut(i) {
            a.outcome = Some((status.as_u16(), code));
        }
    }

    fn take(&self) -> Vec<Slotted> {
        std::mem::take(&mut *self.lock())
    }
}

/// Writes the audit records of a request's accesses and answers only once
/// they are written (a change's: durable); if one cannot be written, the
/// answer becomes a 503 (fail closed).
async fn record_access(
    st: &AppState,
    log: &AuditLog,
    accesses: Vec<Slotted>,
    caller: &Caller,
    request_id: &str,
    resp: Response,
) -> Response {
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

fn caller(identity: &ConnIdentity) -> Result<Caller, ApiError> {
    identity.0.clone().map_err(ApiError::Forbidden)
}

fn require(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if caller.has(role) { Ok(()) } else { Err(ApiError::Forbidden(format!("this needs the {} role", role.as_str()))) }
}

fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

async fn read_body(body: Body, headers: &HeaderMap, limits: &crate::ApiLimits, form: bool) -> Result<Bytes, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let ok = if form {
        mime == "application/x-www-form-urlencoded"
    } else {
        mime == FHIR_JSON || mime == "application/json"
    };
    if !ok {
        let expected = if form { "application/x-www-form-urlencoded" } else { FHIR_JSON };
        return Err(ApiError::UnsupportedMediaType(format!("Content-Type must be {expected}")));
    }
    let bytes = axum::body::to_bytes(body, limits.body_bytes_max)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit: limits.body_bytes_max })?;
    if !form && fhir::json_depth_exceeds(&bytes, limits.json_depth_max) {
        return Err(ApiError::NotWellFormed(format!("JSON nested deeper than {}", limits.json_depth_max)));
    }
    Ok(bytes)
}

/// Adds the freshness headers every read carries.
fn with_freshness(mut resp: Response, replica: &Replica) -> Response {
    let f = replica.freshness();
    let h = resp.headers_mut();
    h.insert("x-hie-applied-index", HeaderValue::from(f.applied_index));
    h.insert("x-hie-stale", HeaderValue::from_static(if f.stale { "true" } else { "false" }));
    h.insert("x-hie-replication-lag-ms", HeaderValue::from(f.replication_lag_ms));
    resp
}

async fn consistency(headers: &HeaderMap, replica: &Replica) -> Result<(), ApiError> {
    match headers.get("x-hie-consistency").map(|v| v.to_str().unwrap_or("")) {
        None | Some("local") => Ok(()),
        Some("linearizable") => replica.linearizable_barrier().await.map(|_| ()).map_err(ApiError::from),
        Some(_) => Err(ApiError::InvalidHeader("X-HIE-Consistency must be linearizable or local".into())),
    }
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    fhir_text(status, serde_json::to_string(body).unwrap_or_default())
}

/// A FHIR resource already rendered to JSON text.
fn fhir_text(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\"")).expect("digits")
}

/// Why a read happens: `directcare` (the default) or an emergency override
/// that shows opted-out patients' pointers, audited and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    DirectCare,
    /// With the reason given.
    BreakGlass(String),
}

/// Reads `X-HIE-Purpose-Of-Use` and `X-HIE-Break-Glass-Reason`.
fn purpose(headers: &HeaderMap, caller: &Caller, st: &AppState, request_id: &RequestId) -> Result<Purpose, ApiError> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().map(str::trim).unwrap_or(""));
    match text("x-hie-purpose-of-use") {
        None | Some("directcare") => Ok(Purpose::DirectCare),
        Some("emergency") => {
            let reason = text("x-hie-break-glass-reason").unwrap_or("");
            if reason.is_empty() || reason.len() > BREAK_GLASS_REASON_LEN_MAX {
                return Err(ApiError::InvalidHeader(format!(
                    "breaking the glass needs X-HIE-Break-Glass-Reason (1 to {BREAK_GLASS_REASON_LEN_MAX} characters)"
                )));
            }
            st.replica.metrics().break_glass_total.inc();
            // The reason is free text (it could name the patient): it goes to
            // the audit record, never to the log.
            tracing::warn!(request_id = %request_id.0, ods = %caller.ods, reason_chars = reason.chars().count(), "break-glass access: emergency override");
            Ok(Purpose::BreakGlass(reason.to_owned()))
        }
        Some(_) => Err(ApiError::InvalidHeader("X-HIE-Purpose-Of-Use must be directcare or emergency".into())),
    }
}

/// Longest break-glass reason accepted.
const BREAK_GLASS_REASON_LEN_MAX: usize = 500;

/// May this caller see this pointer?
fn visible(caller: &Caller, p: &RecordPointer) -> bool {
    caller.has(Role::Consumer) || (caller.has(Role::Producer) && p.custodian == caller.ods)
}

// ---------------------------------------------------------------- metadata

async fn metadata(State(st): St, Extension(identity): Extension<ConnIdentity>) -> Result<Response, ApiError> {
    caller(&identity)?;
    let search_params = json!([
        { "name": "subject:identifier", "type": "token", "documentation": "https://fhir.nhs.uk/Id/nhs-number|<NHS Number> (required)" },
        { "name": "type", "type": "token" },
        { "name": "custodian:identifier", "type": "token" },
        { "name": "_count", "type": "number" }
    ]);
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir::instant(now()),
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "software": { "name": "hie", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "hie federated record locator node", "url": st.config.base_url },
        "rest": [{
            "mode": "server",
            "security": { "description": "Mutual TLS: a client certificate from the cluster CA naming urn:hie:ods:<ODS> and urn:hie:role:<role> SAN URIs." },
            "interaction": [{
                "code": "batch",
                "documentation": format!("POST a batch Bundle of DocumentReference creates (at most {} entries) to the base: one Raft entry, each entry succeeds or fails alone", st.config.limits.bundle_entries_max)
            }],
            "resource": [
                {
                    "type": "DocumentReference",
                    "interaction": [
                        { "code": "read" }, { "code": "create" }, { "code": "update" }, { "code": "delete" }, { "code": "search-type" }
                    ],
                    "versioning": "versioned-update",
                    "updateCreate": true,
                    "conditionalCreate": false,
                    "searchParam": search_params
                },
                {
                    "type": "Consent",
                    "interaction": [{ "code": "create" }],
                    "documentation": "consent-authority only: provision.type deny opts the patient out, permit opts back in"
                },
                {
                    "type": "Patient",
                    "operation": [{ "name": "record-holders", "definition": format!("{}/OperationDefinition/record-holders", st.config.base_url) }]
                }
            ]
        }]
    });
    Ok(fhir_json(StatusCode::OK, &body))
}

// ---------------------------------------------------------------- writes

fn prefer(headers: &HeaderMap) -> &str {
    headers.get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("return=representation")
}

fn written(status: StatusCode, st: &AppState, headers: &HeaderMap, p: &RecordPointer) -> Response {
    let location = format!("{}/DocumentReference/{}/_history/{}", st.config.base_url, p.id.as_str(), p.version);
    let mut resp = match prefer(headers) {
        "return=minimal" => status.into_response(),
        "return=OperationOutcome" => fhir_json(
            status,
            &operation_outcome("information", "informational", "RESOURCE_CREATED", &format!("pointer {} stored", p.id)),
        ),
        _ => fhir_text(status, fhir::document_reference(p)),
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag(p.version));
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    resp
}

async fn run_write(
    st: &AppState,
    caller: &Caller,
    command: Command,
    request_id: &RequestId,
) -> Result<Outcome, ApiError> {
    match st.replica.write(caller, command, &request_id.0).await? {
        Outcome::Rejected(r) => Err(r.into()),
        o => Ok(o),
    }
}

async fn create(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::Producer)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let parsed = fhir::parse_document_reference(&body)?;
    if parsed.id.is_some() {
        return Err(ApiError::InvalidResource(
            "a create by POST must not carry an id (use PUT to choose your own)".into(),
        ));
    }
    let mut pointer = parsed.pointer;
    slot.set(&pointer.subject, Action::Create, "create", &Purpose::DirectCare);
    new_pointer(&mut pointer, &caller, now())?;
    slot.resource(format!("DocumentReference/{}", pointer.id));
    match run_write(&st, &caller, Command::V1(CommandV1::CreatePointer { caller: caller.clone(), pointer }), &rid)
        .await?
    {
        Outcome::Created { pointer } => Ok(written(StatusCode::CREATED, &st, &headers, &pointer)),
        other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

/// Checks a pointer to be created by `caller` (status current, custodian
/// the caller) and gives it a server id and its times.
fn new_pointer(pointer: &mut RecordPointer, caller: &Caller, at: Timestamp) -> Result<(), ApiError> {
    if pointer.status != PointerStatus::Current {
        return Err(ApiError::InvalidResource("a new pointer must have status current".into()));
    }
    if pointer.custodian != caller.ods {
        return Err(ApiError::Forbidden(format!("custodian must be the caller's organisation {}", caller.ods)));
    }
    pointer.id = PointerId::new(&pointer.custodian, uuid::Uuid::new_v4());
    pointer.created = at;
    pointer.updated = at;
    Ok(())
}

/// A batch Bundle of creates (`POST /fhir`): the bulk-load path. Every
/// entry that parses becomes one create command, and all of them go through
/// Raft as one entry (one fsync and one round trip for the lot); each entry
/// succeeds or fails alone, as in FHIR's batch, and is audited on its own.
async fn batch(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::Producer)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let parsed = fhir::parse_batch(&body, st.config.limits.bundle_entries_max).map_err(|e| match e {
        fhir::BatchError::Fhir(e) => ApiError::from(e),
        e @ fhir::BatchError::TooManyEntries { .. } => ApiError::TooManyEntries(e.to_string()),
    })?;
    let mut out: Vec<Option<fhir::BatchEntryOut>> = Vec::with_capacity(parsed.entries.len());
    // For each command: its entry, and its access in the audit slot.
    let mut commands = Vec::new();
    let mut placed: Vec<(usize, usize)> = Vec::new();
    let at = now();
    for (i, entry) in parsed.entries.into_iter().enumerate() {
        // An entry that does not parse names no patient: it is not audited
        // (as a single create that does not parse is not).
        let p = match entry {
            Ok(p) => p,
            Err(e) => {
                out.push(Some(batch_entry_error(&ApiError::from(e))));
                continue;
            }
        };
        let mut pointer = p.pointer;
        let a = slot.push(access(&pointer.subject, Action::Create, "create", &Purpose::DirectCare));
        let checked = match p.id {
            Some(_) => Err(ApiError::InvalidResource("a create in a batch must not carry an id".into())),
            None => new_pointer(&mut pointer, &caller, at),
        };
        if let Err(e) = checked {
            slot.outcome(a, e.status(), Some(e.code()));
            out.push(Some(batch_entry_error(&e)));
            continue;
        }
        slot.resource(format!("DocumentReference/{}", pointer.id));
        commands.push(CommandV1::CreatePointer { caller: caller.clone(), pointer });
        placed.push((i, a));
        out.push(None);
    }
    if !commands.is_empty() {
        let n = commands.len();
        let outcomes = match run_write(&st, &caller, Command::V1(CommandV1::Batch(commands)), &rid).await? {
            Outcome::Batch(outcomes) if outcomes.len() == n => outcomes,
            other => return Err(ApiError::Internal(format!("unexpected outcome of a batch: {other:?}"))),
        };
        for ((i, a), outcome) in placed.into_iter().zip(outcomes) {
            out[i] = Some(match outcome {
                Outcome::Created { pointer } => {
                    slot.outcome(a, StatusCode::CREATED, None);
                    fhir::BatchEntryOut {
                        status: "201 Created".into(),
                        location: Some(format!(
                            "DocumentReference/{}/_history/{}",
                            pointer.id.as_str(),
                            pointer.version
                        )),
                        etag: etag(pointer.version).to_str().ok().map(str::to_owned),
                        outcome: None,
                    }
                }
                Outcome::Rejected(r) => {
                    let e = ApiError::from(r);
                    slot.outcome(a, e.status(), Some(e.code()));
                    batch_entry_error(&e)
                }
                other => {
                    let e = ApiError::Internal(format!("unexpected outcome {other:?}"));
                    slot.outcome(a, e.status(), Some(e.code()));
                    batch_entry_error(&e)
                }
            });
        }
    }
    let entries: Vec<fhir::BatchEntryOut> = out.into_iter().map(|e| e.expect("every entry answered")).collect();
    Ok(fhir_json(StatusCode::OK, &fhir::batch_response(&entries)))
}

/// A failed batch entry: its status line and OperationOutcome.
fn batch_entry_error(e: &ApiError) -> fhir::BatchEntryOut {
    let status = e.status();
    fhir::BatchEntryOut {
        status: format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        location: None,
        etag: None,
        outcome: Some(e.outcome()),
    }
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().map_err(|_| ApiError::InvalidHeader("If-Match is not text".into()))?;
    let s = s.trim().trim_start_matches("W/").trim_matches('"');
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::InvalidHeader("If-Match must be W/\"<version>\" or \"<version>\"".into()))
}

fn path_id(id: &str) -> Result<PointerId, ApiError> {
    PointerId::parse(id).map_err(|e| ApiError::InvalidParameter(format!("id: {e}")))
}

async fn update(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::Producer)?;
    let id = path_id(&id)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let parsed = fhir::parse_document_reference(&body)?;
    if parsed.id.as_ref() != Some(&id) {
        return Err(ApiError::InvalidResource("the body's id must equal the id in the URL".into()));
    }
    let mut pointer = parsed.pointer;
    slot.set(&pointer.subject, Action::Update, "update", &Purpose::DirectCare);
    slot.resource(format!("DocumentReference/{id}"));
    pointer.id = id.clone();
    let lookup = id.clone();
    let existing = st.replica.read(move |r| r.pointer(&lookup)).await?;
    let at = now();
    match existing {
        Some(_) => {
            let if_match = parse_if_match(&headers)?.ok_or(ApiError::PreconditionRequired)?;
            pointer.updated = at;
            let cmd = Command::V1(CommandV1::UpdatePointer { caller: caller.clone(), pointer, if_match });
            match run_write(&st, &caller, cmd, &rid).await? {
                Outcome::Updated { pointer } => Ok(written(StatusCode::OK, &st, &headers, &pointer)),
                other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
        None => {
            if id.custodian() != caller.ods {
                return Err(ApiError::Forbidden(
                    "a producer may only choose ids beginning with its own ODS code".into(),
                ));
            }
            pointer.version = 1;
            pointer.created = at;
            pointer.updated = at;
            let cmd = Command::V1(CommandV1::CreatePointer { caller: caller.clone(), pointer });
            match run_write(&st, &caller, cmd, &rid).await? {
                Outcome::Created { pointer } => Ok(written(StatusCode::CREATED, &st, &headers, &pointer)),
                other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
    }
}

async fn delete(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::Producer)?;
    let id = path_id(&id)?;
    // A pointer's subject never changes, so this replica's copy names it.
    let lookup = id.clone();
    if let Some(p) = st.replica.read(move |r| r.pointer(&lookup)).await? {
        slot.set(&p.subject, Action::Delete, "delete", &Purpose::DirectCare);
        slot.resource(format!("DocumentReference/{id}"));
    }
    let cmd = Command::V1(CommandV1::DeletePointer { caller: caller.clone(), id: id.clone(), at: now() });
    run_write(&st, &caller, cmd, &rid).await?;
    Ok(fhir_json(
        StatusCode::OK,
        &operation_outcome("information", "informational", "RESOURCE_DELETED", &format!("pointer {id} deleted")),
    ))
}

// ---------------------------------------------------------------- reads

async fn read(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    if !(caller.has(Role::Consumer) || caller.has(Role::Producer)) {
        return Err(ApiError::Forbidden("reading pointers needs the consumer or producer role".into()));
    }
    let id = path_id(&id)?;
    let purpose = purpose(&headers, &caller, &st, &rid)?;
    consistency(&headers, &st.replica).await?;
    let lookup = id.clone();
    let (pointer, patient) = st
        .replica
        .read(move |r| {
            let p = r.pointer(&lookup)?;
            let patient = match &p {
                Some(p) => r.patient(&p.subject)?,
                None => None,
            };
            Ok((p, patient))
        })
        .await?;
    let not_found = || ApiError::NotFound(format!("no pointer {id}"));
    let pointer = pointer.ok_or_else(not_found)?;
    slot.set(&pointer.subject, Action::Read, "read", &purpose);
    slot.resource(format!("DocumentReference/{id}"));
    if !visible(&caller, &pointer) {
        return Err(not_found());
    }
    let opted_out = patient.is_some_and(|p| p.opted_out);
    if opted_out && pointer.custodian != caller.ods && !matches!(purpose, Purpose::BreakGlass(_)) {
        return Err(not_found());
    }
    let mut resp = fhir_text(StatusCode::OK, fhir::document_reference(&pointer));
    resp.headers_mut().insert(header::ETAG, etag(pointer.version));
    Ok(with_freshness(resp, &st.replica))
}

/// Continuation tokens: opaque ids standing for a search and a position,
/// so no NHS Number ever appears in a URL. Held on this node for a while.
#[derive(Default)]
pub(crate) struct Cursors {
    entries: HashMap<String, (Instant, CursorState)>,
}

#[derive(Clone)]
struct CursorState {
    subject: NhsNumber,
    type_code: Option<SnomedCode>,
    custodian: Option<OdsCode>,
    count: usize,
    after: PointerId,
    owner: OdsCode,
}

async fn search_get(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    do_search(&st, &identity, &rid, &slot, &headers, pairs, false).await
}

async fn search_post(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Body,
) -> Result<Response, ApiError> {
    caller(&identity)?;
    let body = read_body(body, &headers, &st.config.limits, true).await?;
    let mut pairs = parse_query(uri.query().unwrap_or(""))?;
    pairs.extend(parse_query(
        std::str::from_utf8(&body).map_err(|_| ApiError::NotWellFormed("form is not UTF-8".into()))?,
    )?);
    do_search(&st, &identity, &rid, &slot, &headers, pairs, false).await
}

async fn count(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let pairs = parse_query(uri.query().unwrap_or(""))?;
    do_search(&st, &identity, &rid, &slot, &headers, pairs, true).await
}

async fn do_search(
    st: &AppState,
    identity: &ConnIdentity,
    rid: &RequestId,
    slot: &AuditSlot,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
    count_only: bool,
) -> Result<Response, ApiError> {
    let caller = caller(identity)?;
    if !(caller.has(Role::Consumer) || caller.has(Role::Producer)) {
        return Err(ApiError::Forbidden("searching pointers needs the consumer or producer role".into()));
    }
    let limits = &st.config.limits;
    let purpose = purpose(headers, &caller, st, rid)?;
    let break_glass = matches!(purpose, Purpose::BreakGlass(_));
    let params = parse_search(
        pairs,
        SearchLimits { page_size_default: limits.page_size_default, page_size_max: limits.page_size_max },
    )?;
    let (subject, type_code, custodian, count, after) = match (&params.cursor, params.subject) {
        (Some(token), _) => {
            let mut cursors = st.cursors.lock().expect("cursor lock");
            let c = cursors
                .entries
                .get(token)
                .filter(|(at, c)| at.elapsed() < limits.cursor_ttl && c.owner == caller.ods)
                .map(|(_, c)| c.clone())
                .ok_or_else(|| {
                    ApiError::InvalidParameter("the next token is unknown or expired; search again".into())
                })?;
            cursors.entries.remove(token);
            (c.subject, c.type_code, c.custodian, c.count, Some(c.after))
        }
        (None, Some(subject)) => (subject, params.type_code, params.custodian, params.count, None),
        (None, None) => unreachable!("parse_search requires a subject or a token"),
    };
    slot.set(&subject, Action::Read, "search-type", &purpose);
    consistency(headers, &st.replica).await?;
    let scan_max = limits.search_scan_max;
    let is_consumer = caller.has(Role::Consumer);
    let caller_ods = caller.ods.clone();
    let (type_filter, custodian_filter) = (type_code.clone(), custodian.clone());
    let (matches, patient) = st
        .replica
        .read(move |r| {
            let patient = r.patient(&subject)?;
            let opted_out = patient.as_ref().is_some_and(|p| p.opted_out);
            let (all, _) = r.search(&subject, None, scan_max, |p| {
                let own = p.custodian == caller_ods;
                (own || (is_consumer && (!opted_out || break_glass)))
                    && type_filter.as_ref().is_none_or(|t| *t == p.type_code)
                    && custodian_filter.as_ref().is_none_or(|c| *c == p.custodian)
            })?;
            Ok((all, patient))
        })
        .await?;
    let _ = patient;
    let total = matches.len() as u64;
    let base = &st.config.base_url;
    if count_only {
        let body = json!({ "resourceType": "Bundle", "type": "searchset", "total": total });
        return Ok(with_freshness(fhir_json(StatusCode::OK, &body), &st.replica));
    }
    let start = match &after {
        Some(a) => matches.iter().position(|p| &p.id > a).unwrap_or(matches.len()),
        None => 0,
    };
    let page: Vec<RecordPointer> = matches[start..].iter().take(count).cloned().collect();
    let next = if start + page.len() < matches.len() {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut cursors = st.cursors.lock().expect("cursor lock");
        if cursors.entries.len() >= limits.cursors_max {
            let ttl = limits.cursor_ttl;
            cursors.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if cursors.entries.len() >= limits.cursors_max {
                // Still full of live tokens: drop the oldest.
                if let Some(oldest) = cursors.entries.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) {
                    cursors.entries.remove(&oldest);
                }
            }
        }
        cursors.entries.insert(
            token.clone(),
            (
                Instant::now(),
                CursorState {
                    subject,
                    type_code: type_code.clone(),
                    custodian: custodian.clone(),
                    count,
                    after: page.last().expect("non-empty page").id.clone(),
                    owner: caller.ods.clone(),
                },
            ),
        );
        Some(format!("{base}/DocumentReference?next={token}"))
    } else {
        None
    };
    let body = fhir::searchset(base, total, &page, next.as_deref());
    Ok(with_freshness(fhir_text(StatusCode::OK, body), &st.replica))
}

async fn record_holders(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    Path(nhs): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::Consumer)?;
    let subject = NhsNumber::parse(&nhs).map_err(ApiError::InvalidNhsNumber)?;
    let purpose = purpose(&headers, &caller, &st, &rid)?;
    let break_glass = matches!(purpose, Purpose::BreakGlass(_));
    slot.set(&subject, Action::Read, "operation", &purpose);
    consistency(&headers, &st.replica).await?;
    let entry = st.replica.read(move |r| r.patient(&subject)).await?;
    let visible = entry.filter(|e| !e.opted_out || break_glass);
    Ok(with_freshness(fhir_json(StatusCode::OK, &fhir::record_holders(visible.as_ref())), &st.replica))
}

// ---------------------------------------------------------------- consent

/// `POST /Consent`: a consent authority records a patient's sharing
/// preference (`deny` opts out, `permit` opts back in), replicated by Raft.
async fn consent(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Extension(slot): Extension<AuditSlot>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    require(&caller, Role::ConsentAuthority)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let consent = fhir::parse_consent(&body)?;
    slot.set(&consent.patient, Action::Create, "create", &Purpose::DirectCare);
    let at = now();
    let cmd = Command::V1(CommandV1::SetConsent {
        caller: caller.clone(),
        subject: consent.patient,
        opted_out: consent.opted_out,
        at,
    });
    run_write(&st, &caller, cmd, &rid).await?;
    let id = uuid::Uuid::new_v4().to_string();
    slot.resource(format!("Consent/{id}"));
    let mut resp = fhir_json(StatusCode::CREATED, &fhir::consent_resource(&id, &consent, at));
    if let Ok(v) = HeaderValue::from_str(&format!("{}/Consent/{id}", st.config.base_url)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

// ---------------------------------------------------------------- who looked

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

/// `GET /AuditEvent?entity.identifier=https://fhir.nhs.uk/Id/nhs-number|N`:
/// who looked at a patient's record, from every node, merged by time.
async fn audit_events(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(slot): Extension<AuditSlot>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let caller = caller(&identity)?;
    if !(caller.has(Role::PatientAccess) || caller.has(Role::ConsentAuthority)) {
        return Err(ApiError::Forbidden(
            "reading audit events needs the patient-access or consent-authority role".into(),
        ));
    }
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
    slot.set(&subject, Action::Execute, "search-type", &Purpose::DirectCare);
    slot.resource("AuditEvent".into());
    let limits = &st.config.limits;
    let query = AuditQuery {
        subject,
        since: since.map(Timestamp),
        until: until.map(Timestamp),
        limit: limits.audit_query_events_max,
    };
    let answers = st.replica.audit_query_all(query, limits.audit_fanout_timeout).await;
    let base = &st.config.base_url;
    let mut events: Vec<(i64, u64, Value)> = Vec::new();
    let mut outcomes: Vec<Value> = Vec::new();
    for a in answers {
        let who = format!("node {} ({})", a.id, a.region);
        match a.result {
            Err(e) => {
                tracing::warn!(node = a.id, error = %e, "an audit query could not reach a node");
                outcomes.push(operation_outcome(
                    "warning",
                    "incomplete",
                    "NODE_UNREACHABLE",
                    &format!("{who} could not be reached, so its audit events are missing: {e}"),
                ));
            }
            Ok(page) => {
                if page.truncated {
                    outcomes.push(operation_outcome(
                        "information",
                        "too-costly",
                        "RESULTS_TRUNCATED",
                        &format!(
                            "{who} returned only its newest {} events; narrow the date range",
                            limits.audit_query_events_max
                        ),
                    ));
                }
                if !page.damaged.is_empty() {
                    outcomes.push(operation_outcome(
                        "error",
                        "exception",
                        "AUDIT_RECORD_DAMAGED",
                        &format!(
                            "{who}: {} audit records failed their integrity check and are left out",
                            page.damaged.len()
                        ),
                    ));
                }
                for text in page.events {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    let at = hie_audit::event::recorded_millis(&v).unwrap_or(0);
                    events.push((at, a.id, v));
                }
            }
        }
    }
    events.sort_by(|x, y| (x.0, x.1).cmp(&(y.0, y.1)));
    let total = events.len();
    let mut entry: Vec<Value> = events
        .into_iter()
        .map(|(_, _, v)| {
            let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            json!({ "fullUrl": format!("{base}/AuditEvent/{id}"), "resource": v, "search": { "mode": "match" } })
        })
        .collect();
    entry.extend(outcomes.into_iter().map(|o| json!({ "resource": o, "search": { "mode": "outcome" } })));
    let body = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "entry": entry,
    });
    Ok(fhir_json(StatusCode::OK, &body))
}

// ---------------------------------------------------------------- operator

fn operator(identity: &ConnIdentity) -> Result<Caller, ApiError> {
    let c = caller(identity)?;
    require(&c, Role::Operator)?;
    Ok(c)
}

fn membership_error(e: MembershipError) -> ApiError {
    match e {
        MembershipError::NotLeader { leader } => ApiError::NotLeader(match leader {
            Some(l) => format!("not the leader; send this to {}", l.api_url),
            None => "not the leader, and no leader is known".into(),
        }),
        MembershipError::Invalid(m) => ApiError::InvalidParameter(m),
        MembershipError::Failed(m) => ApiError::NoQuorum { reason: m },
    }
}

async fn admin_status(State(st): St, Extension(identity): Extension<ConnIdentity>) -> Result<Response, ApiError> {
    operator(&identity)?;
    Ok(Json(st.replica.status()).into_response())
}

async fn admin_digest(State(st): St, Extension(identity): Extension<ConnIdentity>) -> Result<Response, ApiError> {
    operator(&identity)?;
    let (applied, digest, records) = st.replica.digest().await?;
    Ok(Json(json!({ "applied_index": applied, "digest": digest, "records": records })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddLearner {
    id: u64,
    #[serde(flatten)]
    node: NodeInfoIn,
}

#[derive(Deserialize)]
struct NodeInfoIn {
    peer_id: String,
    p2p_addr: String,
    region: String,
    #[serde(default)]
    api_url: String,
    #[serde(default)]
    admin_url: String,
}

async fn admin_add_learner(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    operator(&identity)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let req: AddLearner = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidResource(e.to_string()))?;
    if req.id == 0 {
        return Err(ApiError::InvalidParameter("node ids start at 1".into()));
    }
    let n = req.node;
    let info = NodeInfo {
        peer_id: n.peer_id,
        p2p_addr: n.p2p_addr,
        region: n.region,
        api_url: n.api_url,
        admin_url: n.admin_url,
    };
    st.replica.add_learner(req.id, info).await.map_err(membership_error)?;
    Ok(Json(json!({ "added_learner": req.id })).into_response())
}

async fn admin_promote(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    operator(&identity)?;
    st.replica.promote(id).await.map_err(membership_error)?;
    Ok(Json(json!({ "promoted": id })).into_response())
}

async fn admin_remove(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    operator(&identity)?;
    st.replica.remove(id).await.map_err(membership_error)?;
    Ok(Json(json!({ "removed": id })).into_response())
}

async fn admin_snapshot(State(st): St, Extension(identity): Extension<ConnIdentity>) -> Result<Response, ApiError> {
    operator(&identity)?;
    st.replica.trigger_snapshot().await.map_err(membership_error)?;
    Ok(Json(json!({ "snapshot": "triggered" })).into_response())
}

/// A consistent backup of this node's state, in the snapshot file format.
async fn admin_backup(State(st): St, Extension(identity): Extension<ConnIdentity>) -> Result<Response, ApiError> {
    operator(&identity)?;
    let bytes = st.replica.backup().await?;
    tracing::info!(bytes = bytes.len(), "backup taken");
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PointerTypeIn {
    code: String,
    display: String,
    category: String,
    category_display: String,
}

async fn admin_put_type(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = operator(&identity)?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let t: PointerTypeIn = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidResource(e.to_string()))?;
    let entry = PointerType {
        code: SnomedCode::parse(&t.code).map_err(|e| ApiError::InvalidResource(e.to_string()))?,
        display: t.display,
        category: SnomedCode::parse(&t.category).map_err(|e| ApiError::InvalidResource(e.to_string()))?,
        category_display: t.category_display,
    };
    run_write(&st, &caller, Command::V1(CommandV1::PutPointerType { caller: caller.clone(), entry }), &rid).await?;
    Ok(Json(json!({ "pointer_type": t.code })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducerIn {
    pointer_types: Vec<String>,
}

async fn admin_put_producer(
    State(st): St,
    Extension(identity): Extension<ConnIdentity>,
    Extension(rid): Extension<RequestId>,
    Path(ods): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = operator(&identity)?;
    let ods = OdsCode::parse(&ods).map_err(|e| ApiError::InvalidParameter(e.to_string()))?;
    let body = read_body(body, &headers, &st.config.limits, false).await?;
    let p: ProducerIn = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidResource(e.to_string()))?;
    let types = p
        .pointer_types
        .iter()
        .map(|t| SnomedCode::parse(t.strip_prefix(&format!("{}|", SnomedCode::SYSTEM)).unwrap_or(t)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::InvalidResource(e.to_string()))?;
    let cmd = Command::V1(CommandV1::SetProducerTypes { caller: caller.clone(), ods: ods.clone(), types });
    run_write(&st, &caller, cmd, &rid).await?;
    Ok(Json(json!({ "producer": ods.as_str(), "pointer_types": p.pointer_types })).into_response())
}
