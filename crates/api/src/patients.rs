//! `GET /Patient/{nhs}/$record-holders`: the organisations holding records
//! for a patient, as the caller may see them.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::{NhsNumber, Role};
use hie_fhir as fhir;

use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::respond::{consistency, fhir_json, with_freshness};
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
    let purpose = ctx.read_purpose(&st)?;
    ctx.audit.set(&subject, Action::Read, "operation", &purpose);
    consistency(&headers, &st.replica).await?;
    let holders = st.replica.record_holders(&reader, &purpose, &subject).await?;
    Ok(with_freshness(fhir_json(StatusCode::OK, &fhir::record_holders(&holders)), &st.replica))
}
