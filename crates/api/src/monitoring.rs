//! The monitoring listener (plain HTTP): the status page `/`, `/metrics`,
//! `/healthz`, `/readyz`, `/status` and `/digest`. It serves no patient
//! data; bind it to a private interface. Only pages served by the members'
//! own admin listeners may read it cross-origin, and its one scan of the
//! whole state (`/digest`) runs on a blocking thread, one at a time. Changes
//! to the cluster go through the API listener's operator-only `/admin/*`
//! routes, which need a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hie_replica::Replica;
use serde_json::json;
use tokio::sync::{Semaphore, watch};

/// `/readyz` fails when the replica is more entries than this behind the leader's commit.
pub const READY_BEHIND_ENTRIES_MAX: u64 = 1_000;
/// `/readyz` fails when the replica has been behind the leader for longer than this.
pub const READY_LAG_MS_MAX: u64 = 5_000;

/// Scans of the whole state (`/digest`) running at once on this listener; a
/// request that finds one running is answered 503 with `Retry-After`.
pub const ADMIN_SCANS_AT_ONCE_MAX: usize = 1;

/// What the admin routes share.
struct Admin {
    replica: Arc<Replica>,
    /// Permits for [`ADMIN_SCANS_AT_ONCE_MAX`] scans.
    scans: Arc<Semaphore>,
}

pub async fn serve_monitoring(
    listen: SocketAddr,
    replica: Arc<Replica>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let admin = Arc::new(Admin { replica, scans: Arc::new(Semaphore::new(ADMIN_SCANS_AT_ONCE_MAX)) });
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/digest", get(digest))
        .layer(axum::middleware::from_fn_with_state(admin.clone(), members_only_cors))
        .with_state(admin);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "admin listening (http)");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
    }))
}

/// The status page of any node reads the other members' `/status` and
/// `/metrics` from the browser: a request from a page served by a member's
/// admin listener (its `Origin` is a member's `admin_url`) may be read
/// cross-origin; no other site's may.
async fn members_only_cors(State(a): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut r = next.run(req).await;
    if let Some(origin) = origin
        && let Ok(o) = origin.to_str()
        && a.replica.status().members.iter().any(|m| origin_of(&m.admin_url).is_some_and(|m| m.eq_ignore_ascii_case(o)))
    {
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    r.headers_mut().append(header::VARY, HeaderValue::from_static("origin"));
    r
}

/// `scheme://host[:port]` of a URL: what a browser sends as `Origin`.
fn origin_of(url: &str) -> Option<&str> {
    let after_scheme = url.find("://")? + 3;
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    (end > after_scheme).then(|| &url[..end])
}

/// A live map of the cluster that refreshes itself (served as one file).
async fn status_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("status.html")).into_response()
}

async fn metrics(State(a): State<Arc<Admin>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], a.replica.metrics().render()).into_response()
}

async fn readyz(State(a): State<Arc<Admin>>) -> Response {
    let s = a.replica.status();
    let f = s.freshness;
    let (ok, reason) = if s.leader_id.is_none() {
        (false, "no leader")
    } else if f.stale {
        (false, "no recent contact with a quorum")
    } else if f.behind_entries > READY_BEHIND_ENTRIES_MAX || f.replication_lag_ms > READY_LAG_MS_MAX {
        (false, "behind the leader")
    } else {
        (true, "ready")
    };
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        axum::Json(
            json!({ "ready": ok, "reason": reason, "leader_id": s.leader_id, "applied_index": f.applied_index }),
        ),
    )
        .into_response()
}

async fn status(State(a): State<Arc<Admin>>) -> Response {
    axum::Json(a.replica.status()).into_response()
}

/// The state digest, computed on a blocking thread (it reads every table),
/// one at a time ([`ADMIN_SCANS_AT_ONCE_MAX`]).
async fn digest(State(a): State<Arc<Admin>>) -> Response {
    let Ok(permit) = a.scans.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "a scan is running; try again\n")
            .into_response();
    };
    let replica = a.replica.clone();
    let runtime = tokio::runtime::Handle::current();
    let scan = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        runtime.block_on(replica.digest())
    });
    match scan.await {
        Ok(Ok((applied, digest, records))) => {
            axum::Json(json!({ "applied_index": applied, "digest": digest, "records": records })).into_response()
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::origin_of;

    #[test]
    fn an_origin_is_scheme_host_and_port() {
        assert_eq!(origin_of("http://10.0.0.1:9001"), Some("http://10.0.0.1:9001"));
        assert_eq!(origin_of("http://10.0.0.1:9001/"), Some("http://10.0.0.1:9001"));
        assert_eq!(origin_of("https://admin.example.nhs.uk/hie/"), Some("https://admin.example.nhs.uk"));
        assert_eq!(origin_of("http://"), None);
        assert_eq!(origin_of(""), None);
    }
}
