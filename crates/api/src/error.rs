//! The one place errors become HTTP statuses and FHIR OperationOutcomes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hie_domain::{IdError, Rejection};
use hie_replica::{ReadError, WriteError};
use serde_json::json;

use hie_fhir::{FHIR_JSON, FhirError};

/// Seconds a client should wait before retrying after a 503 or 429.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidNhsNumber(IdError),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    InvalidResource(String),
    #[error("{0}")]
    NotWellFormed(String),
    /// NRL's `BAD_REQUEST`: a resource that is well formed but breaks one
    /// of NRL's rules about what it refers to (a category not its type's,
    /// a supersede of another organisation's pointer).
    #[error("{0}")]
    BadRequest(String),
    /// A coded search value outside the parameter's system.
    #[error("{0}")]
    InvalidCodeSystem(String),
    /// A pointer's subject in a system other than the NHS Number's.
    #[error("{0}")]
    InvalidIdentifierSystem(String),
    #[error("{0}")]
    InvalidHeader(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A batch Bundle with more entries than `bundle_entries_max`.
    #[error("{0}")]
    TooManyEntries(String),
    #[error("{0}")]
    NotFound(String),
    /// An identifier system that is neither the NHS Number's nor registered.
    #[error("{0}")]
    UnknownSystem(String),
    /// PIXm: a `targetSystem` that is not registered (its 403).
    #[error("{0}")]
    UnknownTargetSystem(String),
    /// A request whose work would exceed a named limit (a merge of too many pointers).
    #[error("{0}")]
    TooCostly(String),
    #[error("{0}")]
    Forbidden(String),
    /// A consumer's read of a pointer type it is not allowed.
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("If-Match is required to update a pointer")]
    PreconditionRequired,
    #[error("{reason}")]
    NoQuorum { reason: String },
    #[error("too many requests")]
    RateLimited,
    /// The organisation's break-glass uses on this node in the last hour
    /// reached `api.break_glass_per_org_per_hour`.
    #[error(
        "break-glass limit reached: at most {limit} emergency overrides per organisation per hour on this node \
         (api.break_glass_per_org_per_hour); the next is possible in {retry_after_secs} s"
    )]
    BreakGlassLimited { limit: u32, retry_after_secs: u64 },
    #[error("the request took longer than {millis} ms")]
    Timeout { millis: u64 },
    #[error("{0}")]
    NotLeader(String),
    #[error("{0}")]
    Internal(String),
    /// The audit record of this access could not be written, so the access
    /// is refused (fail closed).
    #[error("{0}")]
    AuditUnavailable(String),
    /// A named limit on work of one kind at once is reached (backups).
    #[error("{0}")]
    Busy(String),
}

impl ApiError {
    /// (HTTP status, FHIR issue type, error code, severity).
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            InvalidNhsNumber(_) => (StatusCode::BAD_REQUEST, "invalid", "INVALID_NHS_NUMBER"),
            InvalidParameter(_) => (StatusCode::BAD_REQUEST, "invalid", "INVALID_PARAMETER"),
            InvalidResource(_) => (StatusCode::BAD_REQUEST, "invalid", "INVALID_RESOURCE"),
            NotWellFormed(_) => (StatusCode::BAD_REQUEST, "invalid", "MESSAGE_NOT_WELL_FORMED"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid", "BAD_REQUEST"),
            InvalidCodeSystem(_) => (StatusCode::BAD_REQUEST, "code-invalid", "INVALID_CODE_SYSTEM"),
            InvalidIdentifierSystem(_) => (StatusCode::BAD_REQUEST, "invalid", "INVALID_IDENTIFIER_SYSTEM"),
            InvalidHeader(_) => (StatusCode::BAD_REQUEST, "invalid", "MISSING_OR_INVALID_HEADER"),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported", "UNSUPPORTED_MEDIA_TYPE"),
            PayloadTooLarge { .. } | TooManyEntries(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too-costly", "PAYLOAD_TOO_LARGE")
            }
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "NO_RECORD_FOUND"),
            UnknownSystem(_) => (StatusCode::BAD_REQUEST, "code-invalid", "INVALID_IDENTIFIER_SYSTEM"),
            UnknownTargetSystem(_) => (StatusCode::FORBIDDEN, "code-invalid", "INVALID_IDENTIFIER_SYSTEM"),
            TooCostly(_) => (StatusCode::UNPROCESSABLE_ENTITY, "too-costly", "MERGE_TOO_LARGE"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "AUTHOR_CREDENTIALS_ERROR"),
            AccessDenied(_) => (StatusCode::FORBIDDEN, "forbidden", "ACCESS_DENIED"),
            Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "security", "ACCESS_DENIED"),
            Duplicate(_) => (StatusCode::CONFLICT, "duplicate", "DUPLICATE_REJECTED"),
            VersionConflict(_) => (StatusCode::PRECONDITION_FAILED, "conflict", "VERSION_CONFLICT"),
            PreconditionRequired => (StatusCode::PRECONDITION_REQUIRED, "required", "MISSING_OR_INVALID_HEADER"),
            NoQuorum { .. } => (StatusCode::SERVICE_UNAVAILABLE, "transient", "NO_QUORUM"),
            RateLimited => (StatusCode::TOO_MANY_REQUESTS, "throttled", "RATE_LIMITED"),
            BreakGlassLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled", "BREAK_GLASS_LIMIT_REACHED"),
            Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout", "TIMEOUT"),
            NotLeader(_) => (StatusCode::MISDIRECTED_REQUEST, "transient", "NOT_LEADER"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "exception", "INTERNAL_SERVER_ERROR"),
            AuditUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "transient", "AUDIT_UNAVAILABLE"),
            Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "transient", "SERVICE_BUSY"),
        }
    }

    pub fn code(&self) -> &'static str {
        self.parts().2
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// This error as an OperationOutcome.
    pub fn outcome(&self) -> serde_json::Value {
        let (_, issue_type, code) = self.parts();
        operation_outcome("error", issue_type, code, &self.to_string())
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, issue_type: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": severity,
            "code": issue_type,
            "details": { "coding": [{
                "system": "https://fhir.nhs.uk/CodeSystem/Spine-ErrorOrWarningCode",
                "code": code,
                "display": code.replace('_', " ").to_lowercase(),
            }] },
            "diagnostics": diagnostics,
        }]
    })
}

/// NRL's success codes, answered in an OperationOutcome.
pub const NRL_RESPONSE_CODES: &str = "https://fhir.nhs.uk/ValueSet/NRL-ResponseCode";

/// An OperationOutcome telling of a success in NRL's terms
/// (`RESOURCE_CREATED`, `RESOURCE_SUPERSEDED`, `RESOURCE_UPDATED`, `RESOURCE_DELETED`).
pub fn success_outcome(code: &str, diagnostics: &str) -> serde_json::Value {
    let display = code.replace('_', " ").to_lowercase();
    let display = display[..1].to_uppercase() + &display[1..];
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "information",
            "code": "informational",
            "details": { "coding": [{ "system": NRL_RESPONSE_CODES, "code": code, "display": display }] },
            "diagnostics": diagnostics,
        }]
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, code) = self.parts();
        let body = self.outcome();
        let mut resp = (status, serde_json::to_string(&body).unwrap_or_default()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if let ApiError::BreakGlassLimited { retry_after_secs, .. } = &self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        } else if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
            h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp.extensions_mut().insert(ErrorCode(code));
        resp
    }
}

/// The error code of a response, for metrics of rejected requests.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::Forbidden { .. } => ApiError::Forbidden(r.to_string()),
            Rejection::UnknownType { .. } => ApiError::InvalidResource(r.to_string()),
            Rejection::CategoryMismatch { .. } => ApiError::BadRequest(r.to_string()),
            Rejection::Duplicate { .. } | Rejection::AlreadyExists { .. } => ApiError::Duplicate(r.to_string()),
            Rejection::NotFound { .. } => ApiError::NotFound(r.to_string()),
            Rejection::VersionConflict { .. } => ApiError::VersionConflict(r.to_string()),
            Rejection::Invalid { .. } => ApiError::InvalidResource(r.to_string()),
            Rejection::UnknownSystem { .. } => ApiError::UnknownSystem(r.to_string()),
            Rejection::UnknownLocalId => ApiError::NotFound(r.to_string()),
            Rejection::MergeTooLarge { .. } => ApiError::TooCostly(r.to_string()),
            Rejection::SubscriptionNotFound => ApiError::NotFound(r.to_string()),
            Rejection::UnknownVersion => ApiError::Internal(r.to_string()),
        }
    }
}

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        match e {
            FhirError::InvalidNhsNumber(e) => ApiError::InvalidNhsNumber(e),
            FhirError::InvalidResource(m) => ApiError::InvalidResource(m),
            FhirError::InvalidParameter(m) => ApiError::InvalidParameter(m),
            FhirError::NotWellFormed(m) => ApiError::NotWellFormed(m),
            FhirError::InvalidCodeSystem(m) => ApiError::InvalidCodeSystem(m),
            FhirError::InvalidIdentifierSystem(m) => ApiError::InvalidIdentifierSystem(m),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        // No quorum, no leader or a timeout: 503, try again shortly.
        if e.is_retryable() { ApiError::NoQuorum { reason: e.to_string() } } else { ApiError::Internal(e.to_string()) }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        // No quorum for a linearizable read: 503; a storage failure: 500.
        if e.is_retryable() { ApiError::NoQuorum { reason: e.to_string() } } else { ApiError::Internal(e.to_string()) }
    }
}
