//! The monitoring listener (plain HTTP): the status page `/`, `/metrics`,
//! `/healthz`, `/readyz`, `/status` and `/digest`. It serves no patient data; bind it to a private
//! interface. Changes to the cluster go through the API listener's
//! operator-only `/admin/*` routes, which need a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hie_replica::Replica;
use serde_json::json;
use tokio::sync::watch;

/// `/readyz` fails when the replica is more entries than this behind the leader's commit.
pub const READY_BEHIND_ENTRIES_MAX: u64 = 1_000;
/// `/readyz` fails when the replica has been behind the leader for longer than this.
pub const READY_LAG_MS_MAX: u64 = 5_000;

pub async fn serve_monitoring(
    listen: SocketAddr,
    replica: Arc<Replica>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/digest", get(digest))
        .with_state(replica)
        // The status page of any node reads the others' /status and /metrics.
        .layer(axum::middleware::map_response(|mut r: Response| async move {
            r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, axum::http::HeaderValue::from_static("*"));
            r
        }));
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

/// A live map of the cluster that refreshes itself (served as one file).
async fn status_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("status.html")).into_response()
}

async fn metrics(State(r): State<Arc<Replica>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], r.metrics().render()).into_response()
}

async fn readyz(State(r): State<Arc<Replica>>) -> Response {
    let s = r.status();
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

async fn status(State(r): State<Arc<Replica>>) -> Response {
    axum::Json(r.status()).into_response()
}

async fn digest(State(r): State<Arc<Replica>>) -> Response {
    match r.digest().await {
        Ok((applied, digest, records)) => {
            axum::Json(json!({ "applied_index": applied, "digest": digest, "records": records })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
