//! Pointers one at a time and in bulk: create (`POST /DocumentReference`),
//! a batch Bundle of creates (`POST /fhir`), read, update and delete
//! (`/DocumentReference/{id}`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hie_audit::Action;
use std::sync::Arc;

use hie_domain::{
    Caller, Command, CommandV1, Outcome, PointerId, PointerStatus, Purpose, Reader, RecordPointer, Role, Timestamp,
    Visibility,
};
use hie_fhir as fhir;

use crate::audit_slot::{AuditSlot, access, now, record_intents};
use crate::break_glass::ReadOf;
use crate::envelope::RequestCtx;
use crate::error::{ApiError, success_outcome};
use crate::respond::{FhirBody, consistency, etag, fhir_json, fhir_text, lookup_id, path_id, with_freshness};
use crate::router::{AppState, St};

fn prefer(headers: &HeaderMap) -> &str {
    headers.get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("return=representation")
}

/// The answer to a create or an update: the pointer (or what `Prefer`
/// asks for: nothing, or an OperationOutcome with NRL's success code), its
/// `ETag` and the `Location` of this version.
fn written(st: &AppState, headers: &HeaderMap, outcome: Outcome) -> Result<Response, ApiError> {
    let (status, code, p) = match outcome {
        Outcome::Created { pointer, superseded: None } => (StatusCode::CREATED, "RESOURCE_CREATED", pointer),
        Outcome::Created { pointer, superseded: Some(_) } => (StatusCode::CREATED, "RESOURCE_SUPERSEDED", pointer),
        Outcome::Updated { pointer } => (StatusCode::OK, "RESOURCE_UPDATED", pointer),
        other => return Err(unexpected(other)),
    };
    let location = format!("{}/DocumentReference/{}/_history/{}", st.config.base_url, p.id.as_str(), p.version);
    let mut resp = match prefer(headers) {
        "return=minimal" => status.into_response(),
        "return=OperationOutcome" => {
            fhir_json(status, &success_outcome(code, &format!("pointer {} version {} stored", p.id, p.version)))
        }
        _ => fhir_text(status, fhir::document_reference(&p)),
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag(p.version));
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Sends a command through Raft, once the intent of every change to
/// patient data it makes is fsynced in the audit log; a rejection becomes
/// its error.
pub(crate) async fn run_write(st: &AppState, ctx: &RequestCtx, command: Command) -> Result<Outcome, ApiError> {
    if let Some(log) = &st.audit {
        record_intents(st, log, &ctx.audit, &ctx.caller, (&ctx.request_id, ctx.correlation_id.as_deref())).await?;
    }
    let outcome = st.replica.write(&ctx.caller, command, &ctx.request_id).await?;
    fault_point_after_commit();
    match outcome {
        Outcome::Rejected(r) => Err(r.into()),
        o => Ok(o),
    }
}

/// A fault point for tests: with `HIE_FAULT_ABORT_AFTER_COMMIT=1` in its
/// environment, the node aborts once a write is committed and before it
/// records how it ended or answers (a crash at the worst moment for the
/// audit). Read once.
fn fault_point_after_commit() {
    static ABORT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ABORT.get_or_init(|| std::env::var("HIE_FAULT_ABORT_AFTER_COMMIT").is_ok_and(|v| v == "1")) {
        tracing::error!("HIE_FAULT_ABORT_AFTER_COMMIT: aborting after a commit (a test's fault point)");
        std::process::abort();
    }
}

fn unexpected(outcome: Outcome) -> ApiError {
    ApiError::Internal(format!("unexpected outcome {outcome:?}"))
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
    check_replaces(pointer, caller)?;
    pointer.id = PointerId::new(&pointer.custodian, uuid::Uuid::new_v4());
    pointer.created = at;
    pointer.updated = at;
    Ok(())
}

/// A `replaces` target of another organisation is refused from its id
/// alone (as NRLF does, 400 `BAD_REQUEST`): the same answer whether or not
/// such a pointer exists.
fn check_replaces(pointer: &RecordPointer, caller: &Caller) -> Result<(), ApiError> {
    match &pointer.replaces {
        Some(target) if target.custodian() != caller.ods => Err(ApiError::BadRequest(format!(
            "relatesTo: a pointer may only replace a pointer of its own custodian {}",
            caller.ods
        ))),
        _ => Ok(()),
    }
}

/// Whether this node's registry allows the caller no pointer type at all,
/// as a producer (no entry, or an empty list) or as a consumer (an empty
/// list; no entry reads every type).
async fn registry_entry_empty(st: &AppState, ctx: &RequestCtx, producer: bool) -> bool {
    let Ok(r) = st.replica.registry().await else { return false };
    let ods = &ctx.caller.ods;
    if producer {
        r.producers.get(ods).is_none_or(|p| p.allowed_types.is_empty())
    } else {
        r.consumers.get(ods).and_then(|c| c.allowed_types.as_ref()).is_some_and(Vec::is_empty)
    }
}

/// A write refused as forbidden to a producer that has no pointer types
/// at all is NRLF's 403 `ACCESS_DENIED` (the registry is read only on this
/// failure path, never on a write that succeeds).
async fn no_types_denied(st: &AppState, ctx: &RequestCtx, e: ApiError) -> ApiError {
    if matches!(e, ApiError::Forbidden(_)) && registry_entry_empty(st, ctx, true).await {
        return ApiError::AccessDenied(format!("organisation {} has no pointer types registered", ctx.caller.ods));
    }
    e
}

/// A consumer restricted to no pointer type at all is refused every read
/// and search (403 `ACCESS_DENIED`, as NRLF does), rather than answered as
/// if the patient had no records. Called only when nothing was found.
pub(crate) async fn consumer_without_types(st: &AppState, ctx: &RequestCtx) -> Result<(), ApiError> {
    if ctx.caller.has(Role::Consumer) && !ctx.caller.has(Role::Producer) && registry_entry_empty(st, ctx, false).await {
        return Err(ApiError::AccessDenied(format!("organisation {} is allowed no pointer types", ctx.caller.ods)));
    }
    Ok(())
}

pub(crate) async fn create(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    body: FhirBody,
) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let FhirBody(body) = body;
    // The server names what a POST creates: an `id` in the body is replaced,
    // as FHIR's create and NRLF do (NRLF's own samples carry one). A
    // producer that chooses its id uses PUT.
    let mut pointer = fhir::parse_document_reference(&body)?.pointer;
    ctx.audit.set(&pointer.subject, Action::Create, "create", &Purpose::DirectCare);
    new_pointer(&mut pointer, &ctx.caller, now())?;
    ctx.audit.resource(format!("DocumentReference/{}", pointer.id));
    let cmd = Command::V1(CommandV1::CreatePointer { caller: ctx.caller.clone(), pointer });
    let outcome = match run_write(&st, &ctx, cmd).await {
        Ok(o) => o,
        Err(e) => return Err(no_types_denied(&st, &ctx, e).await),
    };
    written(&st, &headers, outcome)
}

/// A batch's entries on their way through Raft.
struct BatchPlan {
    /// Each entry's answer, or `None` while its create is in `commands`.
    out: Vec<Option<fhir::BatchEntryOut>>,
    commands: Vec<CommandV1>,
    /// For each command: its entry, and its access in the audit slot.
    placed: Vec<(usize, usize)>,
}

/// Turns every entry that parses and passes into a create; answers the
/// others at once.
fn plan_batch(parsed: fhir::BatchIn, caller: &Caller, slot: &AuditSlot) -> BatchPlan {
    let mut plan = BatchPlan { out: Vec::with_capacity(parsed.entries.len()), commands: vec![], placed: vec![] };
    let at = now();
    for (i, entry) in parsed.entries.into_iter().enumerate() {
        // An entry that does not parse names no patient: it is not audited
        // (as a single create that does not parse is not).
        let p = match entry {
            Ok(p) => p,
            Err(e) => {
                plan.out.push(Some(batch_entry_error(&ApiError::from(e))));
                continue;
            }
        };
        let mut pointer = p.pointer;
        let a = slot.push(access(&pointer.subject, Action::Create, "create", &Purpose::DirectCare));
        // A POST entry's `id` is replaced, as a single create's is.
        if let Err(e) = new_pointer(&mut pointer, caller, at) {
            slot.outcome(a, e.status(), Some(e.code()));
            plan.out.push(Some(batch_entry_error(&e)));
            continue;
        }
        slot.resource(format!("DocumentReference/{}", pointer.id));
        plan.commands.push(CommandV1::CreatePointer { caller: caller.clone(), pointer });
        plan.placed.push((i, a));
        plan.out.push(None);
    }
    plan
}

/// The answer to one create of a batch.
fn batch_entry(outcome: Outcome, slot: &AuditSlot, a: usize) -> fhir::BatchEntryOut {
    let e = match outcome {
        Outcome::Created { pointer, .. } => {
            slot.outcome(a, StatusCode::CREATED, None);
            return fhir::BatchEntryOut {
                status: "201 Created".into(),
                location: Some(format!("DocumentReference/{}/_history/{}", pointer.id.as_str(), pointer.version)),
                etag: etag(pointer.version).to_str().ok().map(str::to_owned),
                outcome: None,
            };
        }
        Outcome::Rejected(r) => ApiError::from(r),
        other => unexpected(other),
    };
    slot.outcome(a, e.status(), Some(e.code()));
    batch_entry_error(&e)
}

/// A batch Bundle of creates (`POST /fhir`): the bulk-load path. Every
/// entry that parses becomes one create command, and all of them go through
/// Raft as one entry (one fsync and one round trip for the lot); each entry
/// succeeds or fails alone, as in FHIR's batch, and is audited on its own.
pub(crate) async fn batch(State(st): St, ctx: RequestCtx, FhirBody(body): FhirBody) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let parsed = fhir::parse_batch(&body, st.config.limits.bundle_entries_max).map_err(|e| match e {
        fhir::BatchError::Fhir(e) => ApiError::from(e),
        e @ fhir::BatchError::TooManyEntries { .. } => ApiError::TooManyEntries(e.to_string()),
    })?;
    let BatchPlan { mut out, commands, placed } = plan_batch(parsed, &ctx.caller, &ctx.audit);
    if !commands.is_empty() {
        let n = commands.len();
        let outcomes = match run_write(&st, &ctx, Command::V1(CommandV1::Batch(commands))).await? {
            Outcome::Batch(outcomes) if outcomes.len() == n => outcomes,
            other => return Err(ApiError::Internal(format!("unexpected outcome of a batch: {other:?}"))),
        };
        for ((i, a), outcome) in placed.into_iter().zip(outcomes) {
            out[i] = Some(batch_entry(outcome, &ctx.audit, a));
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

/// `PUT /DocumentReference/{id}`: an update of an existing pointer, or a
/// create with the producer's own id. Which of the two is decided where
/// the command is applied, from the replicated state: never from this
/// node's view, which may not have applied the pointer's create yet.
pub(crate) async fn update(
    State(st): St,
    ctx: RequestCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    put_pointer(&st, &ctx, Some(id), &headers, &body).await
}

/// `PUT /DocumentReference` with the id in the body: NRLF's upsert, the
/// same as a PUT to the pointer's own URL.
pub(crate) async fn upsert(
    State(st): St,
    ctx: RequestCtx,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> Result<Response, ApiError> {
    put_pointer(&st, &ctx, None, &headers, &body).await
}

async fn put_pointer(
    st: &AppState,
    ctx: &RequestCtx,
    path_id: Option<PointerId>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let if_match = parse_if_match(headers)?;
    let parsed = fhir::parse_document_reference(body)?;
    let id = match (path_id, parsed.id) {
        (Some(path), Some(body)) if path == body => path,
        (Some(_), _) => return Err(ApiError::InvalidResource("the body's id must equal the id in the URL".into())),
        (None, Some(body)) => body,
        (None, None) => return Err(ApiError::InvalidResource("a PUT needs the pointer's id in the body".into())),
    };
    let mut pointer = parsed.pointer;
    check_replaces(&pointer, &ctx.caller)?;
    // The patient whose pointer this is, as this node knows it: a PUT to a
    // pointer that names another patient in its body is recorded in the
    // trail of the patient it belongs to, so that no producer can write
    // failed updates into any patient's trail it likes. (A pointer this
    // node has not seen yet is a create of the body's patient.)
    // Another organisation's id is refused from the id alone (as the apply
    // does), the same answer whether or not such a pointer exists.
    if id.custodian() != ctx.caller.ods {
        return Err(ApiError::Forbidden("a producer may only choose ids beginning with its own ODS code".into()));
    }
    let subject = match st.replica.stored_pointer(&id).await? {
        Some(stored) => stored.subject,
        None => pointer.subject,
    };
    ctx.audit.set(&subject, Action::Update, "update", &Purpose::DirectCare);
    ctx.audit.resource(format!("DocumentReference/{id}"));
    pointer.id = id;
    pointer.updated = now();
    let cmd = Command::V1(CommandV1::PutPointer { caller: ctx.caller.clone(), pointer, if_match });
    let outcome = match run_write(st, ctx, cmd).await {
        Ok(o) => o,
        Err(e) => return Err(no_types_denied(st, ctx, e).await),
    };
    written(st, headers, outcome)
}

pub(crate) async fn delete(State(st): St, ctx: RequestCtx, Path(id): Path<String>) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let id = lookup_id(&id)?;
    // Another organisation's id is refused from the id alone: the same
    // answer whether or not such a pointer exists.
    if id.custodian() != ctx.caller.ods {
        return Err(ApiError::Forbidden(format!("only the custodian may delete pointer {id}")));
    }
    if let Some(p) = st.replica.stored_pointer(&id).await? {
        ctx.audit.set(&p.subject, Action::Delete, "delete", &Purpose::DirectCare);
        ctx.audit.resource(format!("DocumentReference/{id}"));
    }
    let cmd = Command::V1(CommandV1::DeletePointer { caller: ctx.caller.clone(), id: id.clone(), at: now() });
    run_write(&st, &ctx, cmd).await?;
    Ok(fhir_json(StatusCode::OK, &success_outcome("RESOURCE_DELETED", &format!("pointer {id} deleted"))))
}

/// The answer for a pointer the reader may not see: 404, as for none (a
/// hidden pointer's existence is not told), or 403 for a type the
/// consumer is not allowed.
fn refuse(visibility: Visibility, id: &PointerId) -> Result<(), ApiError> {
    match visibility {
        Visibility::Visible => Ok(()),
        Visibility::Hidden => Err(ApiError::NotFound(format!("no pointer {id}"))),
        Visibility::TypeNotAllowed => {
            Err(ApiError::AccessDenied(format!("the caller may not read pointer {id}: its type is not permitted")))
        }
    }
}

/// What a read of one pointer (as `interaction`) starts with: the caller
/// as a reader, the id checked, the purpose of use, and the consistency it
/// asks for.
async fn begin_read(
    st: &AppState,
    ctx: &RequestCtx,
    id: &str,
    interaction: &'static str,
    headers: &HeaderMap,
) -> Result<(Reader, PointerId, Purpose), ApiError> {
    let reader = ctx.reader()?;
    let id = lookup_id(id)?;
    // A producer (that is not also a consumer) reads its own pointers
    // only: another organisation's id is refused from the id alone (NRLF's
    // 403), the same answer whether or not such a pointer exists.
    if !ctx.caller.has(Role::Consumer) && id.custodian() != ctx.caller.ods {
        return Err(ApiError::Forbidden(format!("a producer may read only its own pointers, not {id}")));
    }
    // The consistency asked for first: a linearizable read checks the
    // break-glass permission the cluster holds now.
    consistency(headers, &st.replica).await?;
    let of = ReadOf { subject: None, interaction, resource: Some(format!("DocumentReference/{id}")) };
    let purpose = ctx.read_purpose(st, of).await?;
    Ok((reader, id, purpose))
}

/// `GET /DocumentReference/{id}`: one pointer, if the caller may see it
/// (otherwise 404, as for none: a hidden pointer's existence is not told).
pub(crate) async fn read(
    State(st): St,
    ctx: RequestCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (reader, id, purpose) = begin_read(&st, &ctx, &id, "read", &headers).await?;
    let Some(read) = st.replica.pointer(&reader, &purpose, &id).await? else {
        consumer_without_types(&st, &ctx).await?;
        return Err(ApiError::NotFound(format!("no pointer {id}")));
    };
    ctx.audit.set(&read.pointer.subject, Action::Read, "read", &purpose);
    ctx.audit.resource(format!("DocumentReference/{id}"));
    refuse(read.visibility, &id)?;
    let mut resp = fhir_text(StatusCode::OK, fhir::document_reference(&read.pointer));
    resp.headers_mut().insert(header::ETAG, etag(read.pointer.version));
    Ok(with_freshness(resp, &st.replica))
}

/// `GET /DocumentReference/{id}/_history` (every kept version, newest
/// first) and `.../_history/{vid}` (one version), for whoever may read the
/// pointer.
pub(crate) async fn history(
    State(st): St,
    ctx: RequestCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    read_history(st, ctx, id, None, headers).await
}

pub(crate) async fn version(
    State(st): St,
    ctx: RequestCtx,
    Path((id, vid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vid: u64 = vid.parse().map_err(|_| ApiError::NotFound(format!("no version {}", printable(&vid))))?;
    read_history(st, ctx, id, Some(vid), headers).await
}

fn printable(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).take(20).collect()
}

async fn read_history(
    st: Arc<AppState>,
    ctx: RequestCtx,
    id: String,
    vid: Option<u64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let interaction = if vid.is_some() { "vread" } else { "history-instance" };
    let (reader, id, purpose) = begin_read(&st, &ctx, &id, interaction, &headers).await?;
    // Every kept version: the current one and the past ones.
    let limit = usize::try_from(RecordPointer::PAST_VERSIONS_MAX).unwrap_or(usize::MAX).saturating_add(1);
    let read = st.replica.history(&reader, &purpose, &id, vid, limit).await?;
    let Some(read) = read else {
        consumer_without_types(&st, &ctx).await?;
        return Err(ApiError::NotFound(format!("no pointer {id}")));
    };
    let subject = read.versions.first().map(|p| p.subject);
    if let Some(subject) = &subject {
        ctx.audit.set(subject, Action::Read, interaction, &purpose);
    }
    ctx.audit.resource(format!("DocumentReference/{id}"));
    refuse(read.visibility, &id)?;
    let resp = match vid {
        Some(v) => {
            let p =
                read.versions.first().ok_or_else(|| ApiError::NotFound(format!("no version {v} of pointer {id}")))?;
            let mut resp = fhir_text(StatusCode::OK, fhir::document_reference(p));
            resp.headers_mut().insert(header::ETAG, etag(p.version));
            resp
        }
        None => {
            let self_url = format!("{}/DocumentReference/{id}/_history", st.config.base_url);
            fhir_text(StatusCode::OK, fhir::history(&st.config.base_url, &read.versions, &self_url))
        }
    };
    Ok(with_freshness(resp, &st.replica))
}
