//! The operator's routes on the API listener (`/admin/*`, the `operator`
//! role): cluster status and digest, membership changes, snapshots, backups
//! and the replicated registry of pointer types, producers and consumers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hie_domain::raft::NodeInfo;
use hie_domain::{Command, CommandV1, ConsumerPermission, OdsCode, PointerType, ProducerPermission, Role, SnomedCode};
use hie_replica::MembershipError;
use serde::Deserialize;
use serde_json::json;

use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::pointers::run_write;
use crate::respond::JsonBody;
use crate::router::St;

fn membership_error(e: MembershipError) -> ApiError {
    match e {
        MembershipError::NotLeader { leader } => ApiError::NotLeader(match leader {
            Some(l) => format!("not the leader; send this to {}", l.api_url),
            None => "not the leader, and no leader is known".into(),
        }),
        MembershipError::Invalid { reason } => ApiError::InvalidParameter(reason),
        MembershipError::Failed { reason } => ApiError::NoQuorum { reason },
    }
}

pub(crate) async fn status(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    Ok(Json(st.replica.status()).into_response())
}

pub(crate) async fn digest(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let (applied, digest, records) = st.replica.digest().await?;
    Ok(Json(json!({ "applied_index": applied, "digest": digest, "records": records })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddLearner {
    id: u64,
    peer_id: String,
    p2p_addr: String,
    region: String,
    #[serde(default)]
    api_url: String,
    #[serde(default)]
    admin_url: String,
}

pub(crate) async fn add_learner(
    State(st): St,
    ctx: RequestCtx,
    body: JsonBody<AddLearner>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let JsonBody(req) = body;
    if req.id == 0 {
        return Err(ApiError::InvalidParameter("node ids start at 1".into()));
    }
    let info = NodeInfo {
        peer_id: req.peer_id,
        p2p_addr: req.p2p_addr,
        region: req.region,
        api_url: req.api_url,
        admin_url: req.admin_url,
    };
    st.replica.add_learner(req.id, info).await.map_err(membership_error)?;
    Ok(Json(json!({ "added_learner": req.id })).into_response())
}

pub(crate) async fn promote(State(st): St, ctx: RequestCtx, Path(id): Path<u64>) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    st.replica.promote(id).await.map_err(membership_error)?;
    Ok(Json(json!({ "promoted": id })).into_response())
}

pub(crate) async fn demote(State(st): St, ctx: RequestCtx, Path(id): Path<u64>) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    st.replica.demote(id).await.map_err(membership_error)?;
    Ok(Json(json!({ "demoted": id })).into_response())
}

pub(crate) async fn remove(State(st): St, ctx: RequestCtx, Path(id): Path<u64>) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    st.replica.remove(id).await.map_err(membership_error)?;
    Ok(Json(json!({ "removed": id })).into_response())
}

pub(crate) async fn snapshot(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    st.replica.trigger_snapshot().await.map_err(membership_error)?;
    Ok(Json(json!({ "snapshot": "triggered" })).into_response())
}

/// `GET /admin/backup`: this node's state (one consistent view, taken now)
/// and its audit segments, streamed as they are read (`backup.rs`). The
/// envelope records the operator's action, fsynced, before the first byte.
pub(crate) async fn backup(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let permit = st.backups.clone().try_acquire_owned().map_err(|_| {
        ApiError::Busy(format!(
            "this node is sending as many backups as it sends at once ({}); try again when one has ended",
            crate::backup::BACKUPS_AT_ONCE_MAX
        ))
    })?;
    let state = st.replica.backup()?;
    let about = crate::backup::BackupHeader {
        format: crate::backup::FORMAT,
        node_id: st.replica.id(),
        node: st.node_label.clone(),
        applied_index: state.applied_index(),
        snapshot_id: state.snapshot_id().to_owned(),
        taken_ms: crate::audit_slot::now().0,
        request_id: ctx.request_id.clone(),
    };
    tracing::info!(applied_index = about.applied_index, ods = %ctx.caller.ods, "backup started");
    let audit_dir = st.audit.as_ref().map(|a| a.dir().to_owned());
    let body = crate::backup::body(
        about,
        move |w: &mut crate::backup::Frames| state.write_to(w).map_err(|e| e.to_string()),
        audit_dir,
        permit,
    );
    Ok(([(header::CONTENT_TYPE, "application/vnd.hie.backup")], body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PointerTypeIn {
    code: String,
    display: String,
    category: String,
    category_display: String,
}

pub(crate) async fn put_pointer_type(
    State(st): St,
    ctx: RequestCtx,
    body: JsonBody<PointerTypeIn>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let JsonBody(t) = body;
    let code = |s: &str| SnomedCode::parse(s).map_err(|e| ApiError::InvalidResource(e.to_string()));
    let entry = PointerType {
        code: code(&t.code)?,
        display: t.display,
        category: code(&t.category)?,
        category_display: t.category_display,
    };
    run_write(&st, &ctx, Command::V1(CommandV1::PutPointerType { caller: ctx.caller.clone(), entry })).await?;
    Ok(Json(json!({ "pointer_type": t.code })).into_response())
}

fn snomed_codes(types: &[String]) -> Result<Vec<SnomedCode>, ApiError> {
    types
        .iter()
        .map(|t| SnomedCode::parse(t.strip_prefix(&format!("{}|", SnomedCode::SYSTEM)).unwrap_or(t)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::InvalidResource(e.to_string()))
}

fn ods_param(ods: &str) -> Result<OdsCode, ApiError> {
    OdsCode::parse(ods).map_err(|e| ApiError::InvalidParameter(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProducerIn {
    pointer_types: Vec<String>,
    /// `migration`: the producer's own `date` is kept.
    #[serde(default)]
    permissions: Vec<String>,
}

pub(crate) async fn put_producer(
    State(st): St,
    ctx: RequestCtx,
    Path(ods): Path<String>,
    JsonBody(p): JsonBody<ProducerIn>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let ods = ods_param(&ods)?;
    let types = snomed_codes(&p.pointer_types)?;
    let permissions = p
        .permissions
        .iter()
        .map(|s| {
            ProducerPermission::parse(s)
                .ok_or_else(|| ApiError::InvalidResource(format!("unknown permission {s:?} (known: migration)")))
        })
        .collect::<Result<_, _>>()?;
    let cmd =
        Command::V1(CommandV1::SetProducerTypes { caller: ctx.caller.clone(), ods: ods.clone(), types, permissions });
    run_write(&st, &ctx, cmd).await?;
    Ok(Json(json!({ "producer": ods.as_str(), "pointer_types": p.pointer_types, "permissions": p.permissions }))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsumerIn {
    /// The types the consumer may read; `null` lifts the restriction.
    pointer_types: Option<Vec<String>>,
    /// `break-glass`: it may read opted-out patients' pointers in an
    /// emergency. Absent: none.
    #[serde(default)]
    permissions: Vec<String>,
}

/// `PUT /admin/consumers/{ods}`: a consumer's entry, replaced whole: the
/// pointer types it may read (`null`: every type) and its permissions.
pub(crate) async fn put_consumer(
    State(st): St,
    ctx: RequestCtx,
    Path(ods): Path<String>,
    JsonBody(c): JsonBody<ConsumerIn>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let ods = ods_param(&ods)?;
    let types = c.pointer_types.as_deref().map(snomed_codes).transpose()?;
    let permissions = c
        .permissions
        .iter()
        .map(|s| {
            ConsumerPermission::parse(s)
                .ok_or_else(|| ApiError::InvalidResource(format!("unknown permission {s:?} (known: break-glass)")))
        })
        .collect::<Result<_, _>>()?;
    let cmd =
        Command::V1(CommandV1::SetConsumerTypes { caller: ctx.caller.clone(), ods: ods.clone(), types, permissions });
    run_write(&st, &ctx, cmd).await?;
    Ok(Json(json!({ "consumer": ods.as_str(), "pointer_types": c.pointer_types, "permissions": c.permissions }))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthorityIn {
    /// The local identifier system (a URI).
    system: String,
    /// The ODS code of the organisation that assigns it; `null` removes
    /// the registration.
    ods: Option<String>,
}

/// `PUT /admin/authorities`: register a local identifier system with the
/// organisation that assigns it (or, with `ods: null`, remove it).
pub(crate) async fn put_authority(
    State(st): St,
    ctx: RequestCtx,
    JsonBody(a): JsonBody<AuthorityIn>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let max = hie_domain::AssigningAuthority::SYSTEM_LEN_MAX;
    if a.system.is_empty()
        || a.system.len() > max
        || a.system.chars().any(|c| c.is_control() || c.is_whitespace() || c == '|')
        || !a.system.contains(':')
    {
        return Err(ApiError::InvalidResource(format!("system must be a URI of 1 to {max} characters")));
    }
    if a.system == hie_fhir::NHS_NUMBER_SYSTEM {
        return Err(ApiError::InvalidResource("the NHS Number's system is not a local one".into()));
    }
    let ods = a.ods.as_deref().map(ods_param).transpose()?;
    let cmd = Command::V1(CommandV1::PutAuthority { caller: ctx.caller.clone(), system: a.system.clone(), ods });
    run_write(&st, &ctx, cmd).await?;
    Ok(Json(json!({ "system": a.system, "ods": a.ods })).into_response())
}

/// `GET /admin/registry`: the pointer types, producers and consumers.
pub(crate) async fn registry(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let r = st.replica.registry().await?;
    let codes = |v: &[SnomedCode]| v.iter().map(|c| c.as_str().to_owned()).collect::<Vec<_>>();
    let types: Vec<_> = r
        .types
        .iter()
        .map(|t| json!({ "code": t.code.as_str(), "display": t.display, "category": t.category.as_str(), "category_display": t.category_display }))
        .collect();
    let producers: serde_json::Map<String, serde_json::Value> = r
        .producers
        .iter()
        .map(|(ods, p)| {
            let permissions: Vec<&str> = p.permissions.iter().map(|p| p.as_str()).collect();
            (ods.as_str().to_owned(), json!({ "pointer_types": codes(&p.allowed_types), "permissions": permissions }))
        })
        .collect();
    let consumers: serde_json::Map<String, serde_json::Value> = r
        .consumers
        .iter()
        .map(|(ods, c)| {
            let permissions: Vec<&str> = c.permissions.iter().map(|p| p.as_str()).collect();
            let types = c.allowed_types.as_deref().map(codes);
            (ods.as_str().to_owned(), json!({ "pointer_types": types, "permissions": permissions }))
        })
        .collect();
    let authorities: serde_json::Map<String, serde_json::Value> =
        r.authorities.iter().map(|a| (a.system.clone(), json!(a.ods.as_str()))).collect();
    Ok(Json(
        json!({ "pointer_types": types, "producers": producers, "consumers": consumers, "authorities": authorities }),
    )
    .into_response())
}

/// `GET /admin/audit-anchors`: each node's audit chain head as the cluster
/// last agreed it (`hie audit verify --cluster` checks a chain against it).
pub(crate) async fn audit_anchors(State(st): St, ctx: RequestCtx) -> Result<Response, ApiError> {
    ctx.require(Role::Operator)?;
    let anchors = st.replica.audit_anchors().await?;
    let nodes: Vec<_> =
        anchors.iter().map(|a| json!({ "node": a.node, "seq": a.seq, "hash": a.hash, "at": a.at.0 })).collect();
    Ok(Json(json!({ "applied_index": st.replica.status().applied_index, "anchors": nodes })).into_response())
}
