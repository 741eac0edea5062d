//! What the handlers share on the way in and out: bodies read within their
//! limits, FHIR JSON answers, ETags, and the freshness headers of reads.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hie_domain::PointerId;
use hie_fhir::{self as fhir, FHIR_JSON};
use hie_replica::Replica;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ApiLimits;
use crate::error::ApiError;
use crate::router::AppState;

/// What a request body must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// `application/fhir+json` (or `application/json`), nesting checked.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

/// Reads a body of the expected kind, at most `body_bytes_max`.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: &ApiLimits,
    kind: BodyKind,
) -> Result<Bytes, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let ok = match kind {
        BodyKind::Form => mime == "application/x-www-form-urlencoded",
        BodyKind::Json => mime == FHIR_JSON || mime == "application/json",
    };
    if !ok {
        let expected = if kind == BodyKind::Form { "application/x-www-form-urlencoded" } else { FHIR_JSON };
        return Err(ApiError::UnsupportedMediaType(format!("Content-Type must be {expected}")));
    }
    let bytes = axum::body::to_bytes(body, limits.body_bytes_max)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit: limits.body_bytes_max })?;
    if kind == BodyKind::Json && fhir::json_depth_exceeds(&bytes, limits.json_depth_max) {
        return Err(ApiError::NotWellFormed(format!("JSON nested deeper than {}", limits.json_depth_max)));
    }
    Ok(bytes)
}

/// Adds the freshness headers every read carries.
pub(crate) fn with_freshness(mut resp: Response, replica: &Replica) -> Response {
    let f = replica.freshness();
    let h = resp.headers_mut();
    h.insert("x-hie-applied-index", HeaderValue::from(f.applied_index));
    h.insert("x-hie-stale", HeaderValue::from_static(if f.stale { "true" } else { "false" }));
    h.insert("x-hie-replication-lag-ms", HeaderValue::from(f.replication_lag_ms));
    resp
}

/// Honours `X-HIE-Consistency`: `linearizable` waits for the leader's read
/// index before the read; `local` (the default) reads at once.
pub(crate) async fn consistency(headers: &HeaderMap, replica: &Replica) -> Result<(), ApiError> {
    match headers.get("x-hie-consistency").map(|v| v.to_str().unwrap_or("")) {
        None | Some("local") => Ok(()),
        Some("linearizable") => replica.linearizable_barrier().await.map(|_| ()).map_err(ApiError::from),
        Some(_) => Err(ApiError::InvalidHeader("X-HIE-Consistency must be linearizable or local".into())),
    }
}

pub(crate) fn fhir_json(status: StatusCode, body: &Value) -> Response {
    fhir_text(status, serde_json::to_string(body).unwrap_or_default())
}

/// A FHIR resource already rendered to JSON text.
pub(crate) fn fhir_text(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

pub(crate) fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\"")).expect("digits")
}

/// A pointer id from a URL path that names a pointer to write: a malformed
/// one is 400.
pub(crate) fn path_id(id: &str) -> Result<PointerId, ApiError> {
    PointerId::parse(id).map_err(|e| ApiError::InvalidParameter(format!("id: {e}")))
}

/// A pointer id from a URL path that names a pointer to read or delete: a
/// malformed id names no pointer, so it is 404 `NO_RECORD_FOUND`, as NRLF
/// answers. The id is not echoed: it is whatever the caller typed.
pub(crate) fn lookup_id(id: &str) -> Result<PointerId, ApiError> {
    PointerId::parse(id).map_err(|_| ApiError::NotFound("no pointer has that id".into()))
}

/// A request body of FHIR JSON (`application/fhir+json`), read within the
/// API's limits.
pub(crate) struct FhirBody(pub(crate) Bytes);

impl FromRequest<Arc<AppState>> for FhirBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        read_body(body, &parts.headers, &st.config.limits, BodyKind::Json).await.map(FhirBody)
    }
}

/// A JSON body of the operator's API, every field known.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ApiError> {
        let FhirBody(bytes) = FhirBody::from_request(req, st).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| ApiError::InvalidResource(e.to_string()))
    }
}
