//! Delivering subscription notifications (FHIR Subscriptions, rest-hook).
//!
//! Events are made and numbered by the replicated state machine, so any
//! node can deliver them from its own replica. One node delivers at a time:
//! the leader (while it is not stale). It runs one task per subscription,
//! which sends the handshake, then each run of waiting events in order
//! (at most `max_count` at once) and heartbeats while idle, retrying with
//! backoff. What endpoints acknowledged is replicated every
//! `progress_interval` (`SubscriptionProgress`), so a new leader resumes
//! after the last acknowledged event: nothing is lost, a repeat is possible
//! (receivers dedupe by event number). Before a notification that names a
//! patient is sent, its disclosure is in this node's audit log, fsynced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hie_audit::{Access, Action, AuditLog, EventIds};

use crate::anchor::{node_caller, now};
use hie_domain::{Command, CommandV1, Progress, Subscription, SubscriptionEvent, SubscriptionId, SubscriptionStatus};
use hie_fhir::subscription::{EventOut, NotificationType, notification_bundle};
use hie_metrics::Metrics;
use hie_replica::Replica;
use tokio::sync::{Notify, Semaphore, watch};

/// Subscriptions a deliverer loads when it takes over (the most the
/// cluster can hold: `Subscription::PER_OWNER_MAX` times the organisations
/// is bounded by this).
pub const SUBSCRIPTIONS_LOADED_MAX: usize = 200_000;
/// How often the status gauges are recomputed from the replica.
const GAUGES_INTERVAL: Duration = Duration::from_secs(5);
/// How often a node that does not lead checks whether it does now.
const LEADERSHIP_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct DeliverConfig {
    pub node_id: u64,
    pub node_label: String,
    /// The node's public FHIR base, for references in notifications.
    pub base_url: String,
    pub hosts_allowed: Vec<String>,
    pub timeout: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Failed attempts in a row before the subscription shows `error`.
    pub failures_before_error: u32,
    pub progress_interval: Duration,
    pub in_flight_max: usize,
}

/// The start of the error a subscription shows while its handshake fails.
const HANDSHAKE_FAILING: &str = "handshake failing";
/// ... and while its notifications fail.
const DELIVERY_FAILING: &str = "delivery failing";

/// What the tasks of one term of leadership share.
struct Shared {
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    http: reqwest::Client,
    config: DeliverConfig,
    metrics: Arc<Metrics>,
    progress: Mutex<BTreeMap<SubscriptionId, Progress>>,
    in_flight: Semaphore,
    event_ids: EventIds,
    /// Cleared when this node stops leading: every task then ends.
    leading: watch::Receiver<bool>,
}

/// Runs until `shutdown`: delivers while this node leads, and keeps the
/// subscription gauges current on every node.
pub async fn run(
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    http: reqwest::Client,
    config: DeliverConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = replica.metrics().clone();
    tokio::spawn(gauges(replica.clone(), shutdown.clone()));
    loop {
        while !replica.leads() {
            tokio::select! {
                _ = tokio::time::sleep(LEADERSHIP_POLL) => {}
                _ = shutdown.changed() => return,
            }
        }
        metrics.subscription_deliverer.set(1);
        let (leading_tx, leading) = watch::channel(true);
        let shared = Arc::new(Shared {
            replica: replica.clone(),
            audit: audit.clone(),
            http: http.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            progress: Mutex::new(BTreeMap::new()),
            in_flight: Semaphore::new(config.in_flight_max),
            event_ids: EventIds::new(config.node_id),
            leading,
        });
        tracing::info!("leading: delivering subscription notifications");
        let stop = lead(shared.clone(), &mut shutdown).await;
        let _ = leading_tx.send(false);
        // What was acknowledged before leadership ended is replicated if it still can be.
        flush_progress(&shared).await;
        metrics.subscription_deliverer.set(0);
        tracing::info!("no longer leading: subscription delivery stopped here");
        if stop {
            return;
        }
    }
}

/// Delivers while this node leads; true when the node is shutting down.
async fn lead(shared: Arc<Shared>, shutdown: &mut watch::Receiver<bool>) -> bool {
    let replica = &shared.replica;
    let wakes = replica.subscription_wakes().clone();
    // Changes from before are covered by the full load below.
    wakes.take();
    let mut tasks: HashMap<SubscriptionId, (Arc<Notify>, tokio::task::JoinHandle<()>)> = HashMap::new();
    let all = loop {
        match replica.subscriptions(SUBSCRIPTIONS_LOADED_MAX).await {
            Ok(all) => break all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the subscriptions; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    for s in all {
        if s.status != SubscriptionStatus::Off {
            start(&shared, &mut tasks, s.id);
        }
    }
    let mut progress_tick = tokio::time::interval(shared.config.progress_interval);
    progress_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leadership_tick = tokio::time::interval(LEADERSHIP_POLL);
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = wakes.changed() => {
                for id in wakes.take() {
                    match tasks.get(&id) {
                        Some((wake, handle)) if !handle.is_finished() => wake.notify_one(),
                        _ => start(&shared, &mut tasks, id),
                    }
                }
            }
            _ = progress_tick.tick() => {
                // Beside the loop, so a slow write never holds up wakes; one at a time.
                if flushing.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    let shared = shared.clone();
                    flushing = Some(tokio::spawn(async move { flush_progress(&shared).await }));
                }
                tasks.retain(|_, (_, h)| !h.is_finished());
            }
            _ = leadership_tick.tick() => {
                if !replica.leads() {
                    return false;
                }
            }
            _ = shutdown.changed() => return true,
        }
    }
}

fn start(
    shared: &Arc<Shared>,
    tasks: &mut HashMap<SubscriptionId, (Arc<Notify>, tokio::task::JoinHandle<()>)>,
    id: SubscriptionId,
) {
    let wake = Arc::new(Notify::new());
    let handle = tokio::spawn(deliver(shared.clone(), id.clone(), wake.clone()));
    tasks.insert(id, (wake, handle));
}

/// Proposes what endpoints acknowledged since the last flush, in one command.
async fn flush_progress(shared: &Shared) {
    let updates: Vec<Progress> =
        std::mem::take(&mut *shared.progress.lock().expect("progress lock")).into_values().collect();
    if updates.is_empty() {
        return;
    }
    let command = Command::V1(CommandV1::SubscriptionProgress { updates: updates.clone() });
    let request_id = format!("subscription-progress-{}-{}", shared.config.node_id, now().0);
    if let Err(e) = shared.replica.write(&node_caller(), command, &request_id).await {
        tracing::debug!(error = %e, "subscription progress not committed; kept for the next flush");
        let mut progress = shared.progress.lock().expect("progress lock");
        for u in updates {
            progress.entry(u.id.clone()).or_insert(u);
        }
    }
}

/// Why one notification was not acknowledged.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("the endpoint answered {0}")]
    Status(u16),
    #[error("the endpoint could not be reached: {0}")]
    Transport(String),
    #[error("the endpoint's host is not on this node's allow-list (subscriptions.endpoint_hosts)")]
    HostNotAllowed,
    #[error("the disclosure could not be audited, so nothing was sent: {0}")]
    Audit(String),
}

/// One subscription's delivery, while this node leads and it exists.
async fn deliver(shared: Arc<Shared>, id: SubscriptionId, wake: Arc<Notify>) {
    let mut leading = shared.leading.clone();
    let Ok(Some(first)) = shared.replica.subscription(&id).await else { return };
    let mut delivered = first.acked;
    // A subscription whose handshake never succeeded shakes hands first.
    let never_shook = first.status == SubscriptionStatus::Requested
        || first.error.as_deref().is_some_and(|e| e.starts_with(HANDSHAKE_FAILING));
    let mut status = if never_shook { SubscriptionStatus::Requested } else { first.status };
    let mut shaken = !never_shook;
    let mut failures: u32 = 0;
    let mut last_sent = Instant::now();
    loop {
        if !*leading.borrow() {
            return;
        }
        let mut s = match shared.replica.subscription(&id).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(subscription = %id, error = %e, "cannot read the subscription");
                tokio::time::sleep(shared.config.retry_max).await;
                continue;
            }
        };
        if s.status == SubscriptionStatus::Off {
            return;
        }
        delivered = delivered.max(s.acked);
        // Events dropped before delivery: the status says which (set at apply).
        delivered = delivered.max(s.first_retained() - 1);
        s.status = status;
        let attempt = if !shaken {
            s.status = SubscriptionStatus::Requested;
            Some(send(&shared, &s, NotificationType::Handshake, &[]).await.map(|()| delivered))
        } else if s.events > delivered {
            let max = u64::from(s.max_count.unwrap_or(Subscription::MAX_COUNT_DEFAULT));
            let until = s.events.min(delivered + max);
            match shared.replica.subscription_events(&id, delivered + 1, until, max as usize).await {
                Ok(events) if !events.is_empty() => {
                    let last = events.last().map_or(delivered, |e| e.number);
                    Some(send(&shared, &s, NotificationType::EventNotification, &events).await.map(|()| {
                        let t = now().0;
                        for e in &events {
                            shared.metrics.subscription_delivery_seconds.observe((t - e.at.0).max(0) as f64 / 1000.0);
                        }
                        shared.metrics.subscription_events_delivered_total.inc_by(events.len() as u64);
                        last
                    }))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(subscription = %id, error = %e, "cannot read the subscription's events");
                    None
                }
            }
        } else if s.heartbeat_secs.is_some_and(|h| last_sent.elapsed() >= Duration::from_secs(u64::from(h))) {
            Some(send(&shared, &s, NotificationType::Heartbeat, &[]).await.map(|()| delivered))
        } else {
            None
        };
        match attempt {
            Some(Ok(acked)) => {
                last_sent = Instant::now();
                failures = 0;
                shaken = true;
                let changed = acked > delivered || status != SubscriptionStatus::Active;
                delivered = acked;
                status = SubscriptionStatus::Active;
                if changed {
                    record(&shared, &id, delivered, status, None);
                }
            }
            Some(Err(e)) => {
                last_sent = Instant::now();
                failures = failures.saturating_add(1);
                shared.metrics.subscription_retries_total.inc();
                tracing::debug!(subscription = %id, failures, error = %e, "notification not delivered; retrying");
                if failures >= shared.config.failures_before_error && status != SubscriptionStatus::Error {
                    status = SubscriptionStatus::Error;
                    let what = if shaken { DELIVERY_FAILING } else { HANDSHAKE_FAILING };
                    record(&shared, &id, delivered, status, Some(format!("{what}: {e}")));
                } else if !shaken && failures == 1 {
                    // The first failed handshake shows at once (the backport's handshake rule).
                    status = SubscriptionStatus::Error;
                    record(&shared, &id, delivered, status, Some(format!("{HANDSHAKE_FAILING}: {e}")));
                }
                let backoff =
                    shared.config.retry_min.saturating_mul(1 << failures.min(16)).min(shared.config.retry_max);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = leading.changed() => {}
                }
            }
            None => {
                let idle = s
                    .heartbeat_secs
                    .map(|h| Duration::from_secs(u64::from(h)).saturating_sub(last_sent.elapsed()))
                    .unwrap_or(Duration::from_secs(60));
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(idle.max(Duration::from_millis(10))) => {}
                    _ = leading.changed() => {}
                }
            }
        }
    }
}

fn record(shared: &Shared, id: &SubscriptionId, acked: u64, status: SubscriptionStatus, error: Option<String>) {
    let p = Progress { id: id.clone(), acked, status, error };
    shared.progress.lock().expect("progress lock").insert(id.clone(), p);
}

/// Sends one notification and waits for the endpoint's 2xx.
async fn send(
    shared: &Shared,
    s: &Subscription,
    kind: NotificationType,
    events: &[SubscriptionEvent],
) -> Result<(), SendError> {
    let host = hie_fhir::subscription::https_host(&s.endpoint).map_err(|_| SendError::HostNotAllowed)?;
    if !hie_api::subscriptions::host_allowed(&shared.config.hosts_allowed, &host) {
        return Err(SendError::HostNotAllowed);
    }
    let rendered: Vec<EventOut<'_>> = hie_api::subscriptions::notification_events(&shared.replica, s, events)
        .await
        .map_err(|e| SendError::Transport(format!("reading the events: {e}")))?;
    audit_disclosure(shared, s, &rendered).await?;
    let body =
        notification_bundle(s, kind, &rendered, &shared.config.base_url, now(), &uuid::Uuid::new_v4().to_string());
    let timeout = s.timeout_secs.map_or(shared.config.timeout, |t| Duration::from_secs(u64::from(t)));
    let _permit = shared.in_flight.acquire().await.map_err(|e| SendError::Transport(e.to_string()))?;
    let result = shared
        .http
        .post(&s.endpoint)
        .header("content-type", hie_fhir::FHIR_JSON)
        .timeout(timeout)
        .body(body)
        .send()
        .await;
    let outcome = match result {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(SendError::Status(r.status().as_u16())),
        Err(e) => Err(SendError::Transport(error_chain(&e))),
    };
    let result_label = if outcome.is_ok() { "delivered" } else { "failed" };
    shared.metrics.subscription_notifications_total.with_label_values(&[kind.as_str(), result_label]).inc();
    outcome
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Records, fsynced, each patient a notification discloses to its subscriber.
async fn audit_disclosure(shared: &Shared, s: &Subscription, events: &[EventOut<'_>]) -> Result<(), SendError> {
    let Some(log) = &shared.audit else { return Ok(()) };
    let patients: BTreeSet<_> = events.iter().filter(|e| e.focus).map(|e| e.event.subject).collect();
    let last = patients.len().saturating_sub(1);
    let request_id = format!("notify-{}-{}", s.id, events.last().map_or(0, |e| e.event.number));
    for (i, subject) in patients.iter().enumerate() {
        let access = Access {
            subject: Some(*subject),
            action: Action::Read,
            interaction: "notify",
            resource: Some(format!("Subscription/{}", s.id)),
            emergency_reason: None,
        };
        let ctx = hie_audit::Context {
            event_id: shared.event_ids.next(),
            caller_ods: s.owner.as_str(),
            caller_roles: vec!["consumer"],
            request_id: &request_id,
            correlation_id: None,
            node: &shared.config.node_label,
            recorded: now(),
            status: 200,
            error_code: None,
        };
        log.append(hie_audit::audit_event(&access, &ctx), i == last)
            .await
            .map_err(|e| SendError::Audit(e.to_string()))?;
    }
    Ok(())
}

/// Keeps `hie_subscriptions{status}` and `hie_subscription_events_waiting`
/// current from this replica.
async fn gauges(replica: Arc<Replica>, mut shutdown: watch::Receiver<bool>) {
    let metrics = replica.metrics().clone();
    let mut tick = tokio::time::interval(GAUGES_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Ok(all) = replica.subscriptions(SUBSCRIPTIONS_LOADED_MAX).await else { continue };
        let mut by_status: BTreeMap<&str, i64> =
            ["requested", "active", "error", "off"].into_iter().map(|s| (s, 0)).collect();
        let mut waiting = 0u64;
        for s in &all {
            *by_status.entry(s.status.as_str()).or_default() += 1;
            waiting += s.events.saturating_sub(s.acked);
        }
        for (status, n) in by_status {
            metrics.subscriptions.with_label_values(&[status]).set(n);
        }
        metrics.subscription_events_waiting.set(waiting as i64);
    }
}
