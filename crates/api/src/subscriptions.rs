//! `Subscription`: a consumer subscribes to the `pointer-changed` topic
//! (the Subscriptions R5 Backport IG on R4), reads, deletes and catches up
//! with `$status` and `$events`. Subscriptions and their events are
//! replicated; the node's deliverer sends the notifications.

use std::collections::BTreeSet;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use hie_audit::{Access, Action};
use hie_domain::{
    Command, CommandV1, Outcome, PayloadContent, Purpose, Role, Subscription, SubscriptionId, SubscriptionStatus,
};
use hie_fhir as fhir;
use hie_fhir::subscription::{EventOut, NotificationType};

use crate::audit_slot::{access, now};
use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::pointers::run_write;
use crate::respond::{FhirBody, fhir_json, fhir_text};
use crate::router::{AppState, St};

/// The most events one `$events` answer holds.
pub const EVENTS_PAGE_MAX: u64 = 100;

fn subscription_id(id: &str) -> Result<SubscriptionId, ApiError> {
    SubscriptionId::parse(id).ok_or_else(|| ApiError::NotFound("no such subscription".into()))
}

/// The caller's own subscription `id` (another's answers as one that does not exist).
async fn owned(st: &AppState, ctx: &RequestCtx, id: &str) -> Result<Subscription, ApiError> {
    ctx.require(Role::Consumer)?;
    let id = subscription_id(id)?;
    let found = match st.replica.subscription(&id).await? {
        Some(s) => Some(s),
        // Not here yet, perhaps: a create this node forwarded to the leader
        // a moment ago is answered once the leader has applied it, and this
        // replica may still be applying it. Catch up with the leader's
        // commit once before answering that there is no such subscription.
        None => {
            st.replica.linearizable_barrier().await?;
            st.replica.subscription(&id).await?
        }
    };
    match found {
        Some(s) if s.owner == ctx.caller.ods => Ok(s),
        _ => Err(ApiError::NotFound("no such subscription".into())),
    }
}

/// Is `host` on the operator's allow-list (`subscriptions.endpoint_hosts`)?
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
}

pub(crate) async fn create(State(st): St, ctx: RequestCtx, FhirBody(body): FhirBody) -> Result<Response, ApiError> {
    ctx.require(Role::Consumer)?;
    let sent = fhir::subscription::parse_subscription(&body)?;
    if !host_allowed(&st.config.subscription_hosts, &sent.endpoint_host) {
        return Err(ApiError::InvalidResource(format!(
            "endpoint host {} is not on this cluster's allow-list (subscriptions.endpoint_hosts)",
            fhir::printable(&sent.endpoint_host)
        )));
    }
    let id = SubscriptionId::parse(&uuid::Uuid::new_v4().to_string()).expect("a uuid is a subscription id");
    match &sent.filter.subject {
        Some(subject) => ctx.audit.set(subject, Action::Create, "create", &Purpose::DirectCare),
        None => {
            ctx.audit.push(Access {
                subject: None,
                action: Action::Create,
                interaction: "create",
                resource: None,
                emergency_reason: None,
            });
        }
    }
    ctx.audit.resource(format!("Subscription/{id}"));
    let subscription = Subscription {
        id,
        owner: ctx.caller.ods.clone(),
        reason: sent.reason,
        filter: sent.filter,
        criteria: sent.criteria,
        endpoint: sent.endpoint,
        content: sent.content,
        heartbeat_secs: sent.heartbeat_secs,
        timeout_secs: sent.timeout_secs,
        max_count: sent.max_count,
        status: SubscriptionStatus::Requested,
        created: now(),
        events: 0,
        acked: 0,
        error: None,
    };
    let cmd = Command::V1(CommandV1::CreateSubscription { caller: ctx.caller.clone(), subscription });
    let Outcome::SubscriptionCreated { subscription } = run_write(&st, &ctx, cmd).await? else {
        return Err(ApiError::Internal("a subscription create answered something else".into()));
    };
    let mut resp = fhir_json(StatusCode::CREATED, &fhir::subscription::subscription_resource(&subscription));
    if let Ok(v) = HeaderValue::from_str(&format!("{}/Subscription/{}", st.config.base_url, subscription.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

pub(crate) async fn read(State(st): St, ctx: RequestCtx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let s = owned(&st, &ctx, &id).await?;
    Ok(fhir_json(StatusCode::OK, &fhir::subscription::subscription_resource(&s)))
}

pub(crate) async fn delete(State(st): St, ctx: RequestCtx, Path(id): Path<String>) -> Result<Response, ApiError> {
    ctx.require(Role::Consumer)?;
    let id = subscription_id(&id)?;
    ctx.audit.push(Access {
        subject: None,
        action: Action::Delete,
        interaction: "delete",
        resource: Some(format!("Subscription/{id}")),
        emergency_reason: None,
    });
    let cmd = Command::V1(CommandV1::DeleteSubscription { caller: ctx.caller.clone(), id });
    run_write(&st, &ctx, cmd).await?;
    Ok(fhir_json(
        StatusCode::OK,
        &crate::error::success_outcome("RESOURCE_DELETED", "the subscription and its events are deleted"),
    ))
}

pub(crate) async fn status(State(st): St, ctx: RequestCtx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let s = owned(&st, &ctx, &id).await?;
    Ok(fhir_json(StatusCode::OK, &fhir::subscription::status_searchset(&s, &st.config.base_url)))
}

/// `$events?eventsSinceNumber=N&eventsUntilNumber=M`: the retained events
/// from N to M (at most [`EVENTS_PAGE_MAX`]), as a `query-event` history
/// Bundle, each one audited as a disclosure of its patient.
pub(crate) async fn events(
    State(st): St,
    ctx: RequestCtx,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let s = owned(&st, &ctx, &id).await?;
    let (mut since, mut until) = (s.first_retained(), s.events);
    for (k, v) in fhir::parse_query(query.as_deref().unwrap_or(""))? {
        let n = v.parse::<u64>().map_err(|_| ApiError::InvalidParameter(format!("{k} must be a whole number")))?;
        match k.as_str() {
            "eventsSinceNumber" => since = n.max(1),
            "eventsUntilNumber" => until = n,
            other => {
                return Err(ApiError::InvalidParameter(format!(
                    "{} is not a parameter of $events (eventsSinceNumber, eventsUntilNumber)",
                    fhir::printable(other)
                )));
            }
        }
    }
    let until = until.min(s.events).min(since.saturating_add(EVENTS_PAGE_MAX - 1));
    let events = st.replica.subscription_events(&s.id, since, until, EVENTS_PAGE_MAX as usize).await?;
    let rendered = notification_events(&st.replica, &s, &events).await?;
    let patients: BTreeSet<_> = rendered.iter().filter(|e| e.focus).map(|e| e.event.subject).collect();
    for p in &patients {
        let mut a = access(p, Action::Read, "operation", &Purpose::DirectCare);
        a.resource = Some(format!("Subscription/{}/$events", s.id));
        ctx.audit.push(a);
    }
    let bundle = fhir::subscription::notification_bundle(
        &s,
        NotificationType::QueryEvent,
        &rendered,
        &st.config.base_url,
        now(),
        &uuid::Uuid::new_v4().to_string(),
    );
    Ok(fhir_text(StatusCode::OK, bundle))
}

/// The events as a notification carries them for this subscription: the
/// focus withheld when its patient has opted out since, the resource for
/// `full-resource` when it still exists.
pub async fn notification_events<'a>(
    replica: &hie_replica::Replica,
    s: &Subscription,
    events: &'a [hie_domain::SubscriptionEvent],
) -> Result<Vec<EventOut<'a>>, hie_replica::ReadError> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let withheld = replica.opted_out(&e.subject).await?;
        let focus = !withheld && s.content != PayloadContent::Empty;
        let resource = if focus && s.content == PayloadContent::FullResource {
            replica.stored_pointer(&e.focus).await?.map(|p| fhir::document_reference(&p))
        } else {
            None
        };
        out.push(EventOut { event: e, focus, resource });
    }
    Ok(out)
}
