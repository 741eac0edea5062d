//! The `Patient` routes: `$record-holders` (the organisations holding
//! records for a patient), the IHE PMIR feed of local identifiers
//! (ITI-104: `PUT` and `DELETE /Patient?identifier=`), the PIXm query
//! (ITI-83: `$ihe-pix`) and `$merge` of NHS Numbers. Every one names the
//! patients it touches in the request's audit slot.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::query::PixAnswer;
use hie_domain::{Command, CommandV1, Identifier, NhsNumber, Outcome, Purpose, Role};
use hie_fhir::{self as fhir, NHS_NUMBER_SYSTEM, parse_query};

use crate::audit_slot::{access, now};
use crate::break_glass::ReadOf;
use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::pointers::run_write;
use crate::respond::{FhirBody, consistency, fhir_json, with_freshness};
use crate::router::St;

pub(crate) async fn record_holders(
    State(st): St,
    ctx: RequestCtx,
    Path(nhs): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    ctx.require(Role::Consumer)?;
    let reader = ctx.reader()?;
    let subject = NhsNumber::parse(&nhs).map_err(ApiError::InvalidNhsNumber)?;
    consistency(&headers, &st.replica).await?;
    let of = ReadOf { subject: Some(subject), interaction: "operation", resource: None };
    let purpose = ctx.read_purpose(&st, of).await?;
    ctx.audit.set(&subject, Action::Read, "operation", &purpose);
    let read = st.replica.record_holders(&reader, &purpose, &subject).await?;
    let notice = read.merged_into.map(|n| {
        // The records disclosed are the survivor's: the audit names it.
        ctx.audit.set(&n, Action::Read, "operation", &purpose);
        fhir::merged_notice(&n)
    });
    let body = fhir::record_holders(&read.holders, notice.as_deref());
    Ok(with_freshness(fhir_json(StatusCode::OK, &body), &st.replica))
}

/// The local identifier `?identifier=<system>|<value>` names (once, and not
/// an NHS Number: an NHS Number needs no cross-reference).
fn identifier_param(uri: &Uri) -> Result<Identifier, ApiError> {
    let mut found = None;
    for (k, v) in parse_query(uri.query().unwrap_or(""))? {
        match k.as_str() {
            "identifier" if found.is_none() => found = Some(fhir::parse_identifier_token("identifier", &v)?),
            "identifier" => return Err(ApiError::InvalidParameter("identifier may be given once".into())),
            other => {
                return Err(ApiError::InvalidParameter(format!(
                    "unknown parameter {}: a feed names its patient by identifier only",
                    other.chars().filter(|c| !c.is_control()).take(64).collect::<String>()
                )));
            }
        }
    }
    let id = found.ok_or_else(|| ApiError::InvalidParameter("identifier=<system>|<value> is required".into()))?;
    if id.system == NHS_NUMBER_SYSTEM {
        return Err(ApiError::InvalidParameter(
            "identifier must be a local identifier: an NHS Number is the patient's own and needs no feed".into(),
        ));
    }
    Ok(id)
}

/// ITI-104: records that a local identifier names a patient (201 new, 200
/// changed or already so).
pub(crate) async fn feed(
    State(st): St,
    ctx: RequestCtx,
    uri: Uri,
    FhirBody(body): FhirBody,
) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let id = identifier_param(&uri)?;
    let subject = fhir::parse_patient_feed(&body, &id)?;
    ctx.audit.set(&subject, Action::Update, "update", &Purpose::DirectCare);
    let cmd = Command::V1(CommandV1::PutLocalId { caller: ctx.caller.clone(), id: id.clone(), subject, at: now() });
    let created = match run_write(&st, &ctx, cmd).await? {
        Outcome::LocalIdPut { created } => created,
        o => return Err(ApiError::Internal(format!("unexpected outcome {o:?}"))),
    };
    ctx.audit.resource(format!("Patient/{}", subject.as_str()));
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(fhir_json(status, &fhir::fed_patient(&id, &subject)))
}

/// ITI-104's removal of a cross-reference (404 when none is recorded).
pub(crate) async fn unfeed(State(st): St, ctx: RequestCtx, uri: Uri) -> Result<Response, ApiError> {
    ctx.require(Role::Producer)?;
    let id = identifier_param(&uri)?;
    let cmd = Command::V1(CommandV1::DeleteLocalId { caller: ctx.caller.clone(), id, at: now() });
    match run_write(&st, &ctx, cmd).await? {
        Outcome::LocalIdDeleted { subject } => {
            ctx.audit.set(&subject, Action::Delete, "delete", &Purpose::DirectCare);
            ctx.audit.resource(format!("Patient/{}", subject.as_str()));
        }
        o => return Err(ApiError::Internal(format!("unexpected outcome {o:?}"))),
    }
    Ok(fhir_json(
        StatusCode::OK,
        &crate::error::success_outcome("RESOURCE_DELETED", "the local identifier no longer names the patient"),
    ))
}

/// PIXm ITI-83: the identifiers of the patient a source identifier names,
/// with PIXm's statuses (404 `not-found`, 400 `code-invalid` for the
/// source's system, 403 `code-invalid` for a target system).
pub(crate) async fn pix(State(st): St, ctx: RequestCtx, headers: HeaderMap, uri: Uri) -> Result<Response, ApiError> {
    ctx.reader()?;
    let q = fhir::parse_pix_query(parse_query(uri.query().unwrap_or(""))?)?;
    consistency(&headers, &st.replica).await?;
    let purpose = ctx.read_purpose(&st, ReadOf { subject: None, interaction: "operation", resource: None }).await?;
    match st.replica.pix(&q.source, &q.targets).await? {
        PixAnswer::Found { nhs, identifiers } => {
            ctx.audit.set(&nhs, Action::Read, "operation", &purpose);
            ctx.audit.resource(format!("Patient/{}", nhs.as_str()));
            Ok(with_freshness(fhir_json(StatusCode::OK, &fhir::pix_parameters(&nhs, &identifiers)), &st.replica))
        }
        PixAnswer::NotFound => Err(ApiError::NotFound("no patient has the source identifier".into())),
        PixAnswer::UnknownSourceSystem => Err(ApiError::UnknownSystem(
            "the sourceIdentifier's system is neither the NHS Number's nor a registered local system".into(),
        )),
        PixAnswer::UnknownTargetSystem => {
            Err(ApiError::UnknownTargetSystem("a targetSystem is not a registered identifier system".into()))
        }
    }
}

/// `$merge`: retires the source NHS Number into the target, in one
/// replicated command (see `hie_domain::identity`). Audited under both.
pub(crate) async fn merge(State(st): St, ctx: RequestCtx, FhirBody(body): FhirBody) -> Result<Response, ApiError> {
    ctx.require(Role::IdentityAuthority)?;
    let merge = fhir::parse_merge(&body)?;
    for n in [&merge.source, &merge.target] {
        let mut a = access(n, Action::Update, "operation", &Purpose::DirectCare);
        a.resource = Some(format!("Patient/{}", n.as_str()));
        ctx.audit.push(a);
    }
    let cmd = Command::V1(CommandV1::MergePatients {
        caller: ctx.caller.clone(),
        source: merge.source,
        target: merge.target,
        at: now(),
    });
    let moved = match run_write(&st, &ctx, cmd).await? {
        Outcome::Merged { moved } => moved,
        o => return Err(ApiError::Internal(format!("unexpected outcome {o:?}"))),
    };
    st.replica.metrics().merged_pointers_total.inc_by(moved);
    Ok(fhir_json(StatusCode::OK, &fhir::merge_parameters(&merge, moved)))
}
