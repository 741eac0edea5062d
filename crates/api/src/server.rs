//! The HTTPS listener: TLS handshakes with client certificates, a bound on
//! connections, and hyper serving the routes with the caller attached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Extension;
use hie_audit::AuditLog;
use hie_domain::Caller;
use hie_replica::Replica;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::limits::ApiLimits;
use crate::router;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// This node's public base URL, `https://HOST:PORT/fhir`.
    pub base_url: String,
    pub limits: ApiLimits,
}

/// Who the client certificate says the caller is, or why it names no one.
#[derive(Debug, Clone)]
pub(crate) struct ConnIdentity(pub Result<Caller, String>);

/// Serves the API until `shutdown` fires. Binds before returning.
pub async fn serve_api(
    config: ApiConfig,
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let tls = hie_pki::server_config(&config.cert, &config.key, &config.ca).map_err(|e| e.to_string())?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener =
        TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let limits = config.limits.clone();
    let metrics = replica.metrics().clone();
    let app = router::router(config.clone(), replica, audit);
    let connections = Arc::new(Semaphore::new(limits.connections_max));
    tracing::info!(listen = %config.listen, "api listening (https, client certificates required)");
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                },
                _ = shutdown.changed() => break,
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                metrics.api_rejected_total.with_label_values(&["CONNECTION_LIMIT"]).inc();
                tracing::warn!(%peer, limit = limits.connections_max, "connection refused: connections_max reached");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let app = app.clone();
            let metrics = metrics.clone();
            let limits = limits.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let stream = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        metrics.api_tls_handshake_failures_total.inc();
                        tracing::info!(%peer, error = %e, "tls handshake refused");
                        return;
                    }
                    Err(_) => {
                        metrics.api_tls_handshake_failures_total.inc();
                        tracing::info!(%peer, "tls handshake timed out");
                        return;
                    }
                };
                let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(der) => hie_pki::caller_from_cert(der).map_err(|e| e.to_string()),
                    None => Err("no client certificate".to_owned()),
                };
                let svc = Extension(ConnIdentity(identity)).layer(app);
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().max_buf_size(limits.header_bytes_max.max(8192) * 4);
                builder.http2().max_header_list_size(limits.header_bytes_max as u32).max_concurrent_streams(256);
                let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with an error"); },
                    _ = shutdown.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(limits.request_timeout, conn).await;
                    }
                }
            });
        }
        tracing::info!("api listener stopped");
    }))
}
