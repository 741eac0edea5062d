//! Request to handler: the state every handler shares and the one router
//! of the API listener (FHIR routes under `/fhir`, the operator's under
//! `/admin`).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::middleware;
use axum::routing::{delete, get, post, put};
use hie_audit::AuditLog;
use hie_replica::Replica;

use crate::error::ApiError;
use crate::limits::RateLimiter;
use crate::server::ApiConfig;
use crate::{audit_events, consent, envelope, metadata, operator, patients, pointers, search, subscriptions};

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) replica: Arc<Replica>,
    pub(crate) audit: Option<Arc<AuditLog>>,
    /// This node as audit events name it: `node-<id> (<region>)`.
    pub(crate) node_label: String,
    pub(crate) event_ids: hie_audit::EventIds,
    pub(crate) config: ApiConfig,
    pub(crate) limiter: RateLimiter,
    /// Break-glass uses per organisation in the last hour, on this node.
    pub(crate) break_glass: crate::break_glass::BreakGlassLimiter,
    /// The cluster's paging-token key, once read from the replicated state.
    pub(crate) paging_key: OnceLock<crate::paging::PagingKey>,
    /// The listener's TLS, for the CRLs in force.
    pub(crate) tls: Arc<hie_pki::ReloadingServerTls>,
    /// Backups being streamed (`backup::BACKUPS_AT_ONCE_MAX`).
    pub(crate) backups: Arc<tokio::sync::Semaphore>,
}

pub(crate) type St = State<Arc<AppState>>;

pub(crate) fn router(
    config: ApiConfig,
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    tls: Arc<hie_pki::ReloadingServerTls>,
) -> Router {
    let limits = &config.limits;
    let state = Arc::new(AppState {
        limiter: RateLimiter::new(limits.rate_per_client_per_sec, limits.rate_burst),
        break_glass: crate::break_glass::BreakGlassLimiter::new(limits.break_glass_per_org_per_hour, replica.metrics()),
        paging_key: OnceLock::new(),
        node_label: format!("node-{} ({})", replica.id(), replica.node().region),
        event_ids: hie_audit::EventIds::new(replica.id()),
        replica,
        audit,
        config,
        tls,
        backups: Arc::new(tokio::sync::Semaphore::new(crate::backup::BACKUPS_AT_ONCE_MAX)),
    });
    Router::new()
        .route("/fhir/metadata", get(metadata::capability_statement))
        .route("/fhir", post(pointers::batch).get(metadata::capability_statement))
        .route("/fhir/DocumentReference", post(pointers::create).get(search::search_get).put(pointers::upsert))
        .route("/fhir/DocumentReference/_search", post(search::search_post))
        .route("/fhir/DocumentReference/_count", get(search::count))
        .route("/fhir/DocumentReference/{id}", get(pointers::read).put(pointers::update).delete(pointers::delete))
        .route("/fhir/DocumentReference/{id}/_history", get(pointers::history))
        .route("/fhir/DocumentReference/{id}/_history/{vid}", get(pointers::version))
        .route("/fhir/Patient", put(patients::feed).delete(patients::unfeed))
        .route("/fhir/Patient/$ihe-pix", get(patients::pix))
        .route("/fhir/Patient/$merge", post(patients::merge))
        .route("/fhir/Patient/{nhs}/$record-holders", get(patients::record_holders))
        .route("/fhir/Consent", post(consent::consent))
        .route("/fhir/AuditEvent", get(audit_events::audit_events))
        .route("/fhir/Subscription", post(subscriptions::create))
        .route("/fhir/Subscription/{id}", get(subscriptions::read).delete(subscriptions::delete))
        .route("/fhir/Subscription/{id}/$status", get(subscriptions::status))
        .route("/fhir/Subscription/{id}/$events", get(subscriptions::events))
        .route("/admin/status", get(operator::status))
        .route("/admin/digest", get(operator::digest))
        .route("/admin/learners", post(operator::add_learner))
        .route("/admin/nodes/{id}/promote", post(operator::promote))
        .route("/admin/nodes/{id}/demote", post(operator::demote))
        .route("/admin/nodes/{id}", delete(operator::remove))
        .route("/admin/snapshot", post(operator::snapshot))
        .route("/admin/backup", get(operator::backup))
        .route("/admin/pointer-types", put(operator::put_pointer_type))
        .route("/admin/producers/{ods}", put(operator::put_producer))
        .route("/admin/consumers/{ods}", put(operator::put_consumer))
        .route("/admin/authorities", put(operator::put_authority))
        .route("/admin/registry", get(operator::registry))
        .route("/admin/audit-anchors", get(operator::audit_anchors))
        .route("/fhir/OperationDefinition/{name}", get(metadata::operation_definition))
        .route("/_status", get(metadata::status))
        .route("/fhir/_status", get(metadata::status))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), envelope::envelope))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
