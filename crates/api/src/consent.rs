//! `POST /Consent`: a consent authority records a patient's sharing
//! preference (`deny` opts out, `permit` opts back in), replicated by Raft.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use hie_audit::Action;
use hie_domain::{Command, CommandV1, Purpose, Role};
use hie_fhir as fhir;

use crate::audit_slot::now;
use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::pointers::run_write;
use crate::respond::{FhirBody, fhir_json};
use crate::router::St;

pub(crate) async fn consent(State(st): St, ctx: RequestCtx, FhirBody(body): FhirBody) -> Result<Response, ApiError> {
    ctx.require(Role::ConsentAuthority)?;
    let consent = fhir::parse_consent(&body)?;
    ctx.audit.set(&consent.patient, Action::Create, "create", &Purpose::DirectCare);
    let at = now();
    let cmd = Command::V1(CommandV1::SetConsent {
        caller: ctx.caller.clone(),
        subject: consent.patient,
        opted_out: consent.opted_out,
        at,
    });
    run_write(&st, &ctx, cmd).await?;
    let id = uuid::Uuid::new_v4().to_string();
    ctx.audit.resource(format!("Consent/{id}"));
    let mut resp = fhir_json(StatusCode::CREATED, &fhir::consent_resource(&id, &consent, at));
    if let Ok(v) = HeaderValue::from_str(&format!("{}/Consent/{id}", st.config.base_url)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}
