//! The HTTPS listener: TLS handshakes with client certificates, a bound on
//! connections, and hyper serving the routes with the caller attached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use hie_audit::AuditLog;
use hie_domain::Caller;
use hie_pki::{CertId, Reload, ReloadingServerTls, TlsFiles};
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
    /// CRLs of the CAs in `ca`; re-read with the certificate, key and CA
    /// every [`TLS_RELOAD_INTERVAL`].
    pub crl: Option<PathBuf>,
    /// This node's public base URL, `https://HOST:PORT/fhir`.
    pub base_url: String,
    pub limits: ApiLimits,
}

/// How often the TLS files are read again for changes (a new CRL, a
/// rotated certificate): a revocation is in force within this interval.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

impl ApiConfig {
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles { cert: self.cert.clone(), key: self.key.clone(), ca: self.ca.clone(), crl: self.crl.clone() }
    }
}

/// Who the client certificate says the caller is, or why it names no one,
/// and which certificate it was (checked against the CRLs on every request,
/// so a connection opened before a revocation does not outlive it).
#[derive(Debug, Clone)]
pub(crate) struct ConnIdentity {
    pub(crate) caller: Result<Caller, String>,
    pub(crate) cert: Option<CertId>,
}

/// Serves the API until `shutdown` fires. Binds before returning.
pub async fn serve_api(
    config: ApiConfig,
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let tls = Arc::new(ReloadingServerTls::load(config.tls_files()).map_err(|e| e.to_string())?);
    let listener =
        TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let limits = config.limits.clone();
    let metrics = replica.metrics().clone();
    metrics.tls_revoked_certificates.set(tls.revoked_count() as i64);
    tokio::spawn(reload_tls(tls.clone(), metrics.clone(), shutdown.clone()));
    let app = router::router(config.clone(), replica, audit, tls.clone());
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
            let acceptor = TlsAcceptor::from(tls.config());
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
                    Some(der) => ConnIdentity {
                        caller: hie_pki::caller_from_cert(der).map_err(|e| e.to_string()),
                        cert: CertId::of(der).ok(),
                    },
                    None => ConnIdentity { caller: Err("no client certificate".to_owned()), cert: None },
                };
                let svc = Extension(identity).layer(app);
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

/// Reads the TLS files every [`TLS_RELOAD_INTERVAL`] and takes up a change;
/// says once when a change does not load, and once when it loads again.
async fn reload_tls(
    tls: Arc<ReloadingServerTls>,
    metrics: Arc<hie_metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let t = tls.clone();
        let result = match tokio::task::spawn_blocking(move || t.reload()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "tls reload task failed");
                continue;
            }
        };
        match &result {
            Ok(Reload::Unchanged) => {}
            Ok(Reload::Changed) => {
                metrics.tls_reloads_total.inc();
                metrics.tls_revoked_certificates.set(tls.revoked_count() as i64);
                if let Ok(t) = hie_pki::not_after_unix(&tls.files().cert) {
                    metrics.tls_cert_expiry_timestamp_seconds.set(t);
                }
                tracing::info!(revoked = tls.revoked_count(), "tls files changed: new connections use them");
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "tls files changed but do not load; the last good ones stay in use")
            }
            Err(_) => {}
        }
        if failing != result.is_err() {
            failing = result.is_err();
            metrics.tls_files_failing.set(i64::from(failing));
            if !failing {
                tracing::info!("tls files load again");
            }
        }
    }
}
