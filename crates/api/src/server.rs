//! The HTTPS listener: TLS handshakes with client certificates, connections
//! bounded per node, per source address and per organisation, timeouts on
//! every stage of a connection, and hyper serving the routes with the caller
//! attached.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Extension;
use hie_audit::AuditLog;
use hie_domain::{Caller, OdsCode};
use hie_pki::{CertId, Reload, ReloadingServerTls, TlsFiles};
use hie_replica::Replica;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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
    /// Hosts a subscription's endpoint may name (`subscriptions.endpoint_hosts`).
    pub subscription_hosts: Vec<String>,
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
///
/// Each accepted connection is admitted against its source address's count
/// (connections and TLS handshakes), then the node's, before anything is
/// read from it; after TLS it is counted against its organisation too. A
/// connection over a limit is closed at once and counted in
/// `hie_api_connections_refused_total{reason}`.
pub async fn serve_api(
    config: ApiConfig,
    replica: Arc<Replica>,
    audit: Option<Arc<AuditLog>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let tls = Arc::new(ReloadingServerTls::load(config.tls_files()).map_err(|e| e.to_string())?);
    let listener = listen(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let limits = config.limits.clone();
    let metrics = replica.metrics().clone();
    metrics.tls_revoked_certificates.set(tls.revoked_count() as i64);
    tokio::spawn(reload_tls(tls.clone(), metrics.clone(), shutdown.clone()));
    let app = router::router(config.clone(), replica, audit, tls.clone());
    let connections = Arc::new(Semaphore::new(limits.connections_max));
    let counts = Arc::new(ConnCounts::new(metrics.clone()));
    let refusals = Arc::new(RefusalLog::default());
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
            let slot = match counts.admit_address(peer.ip(), &limits) {
                Ok(slot) => slot,
                Err(reason) => {
                    refusals.refused(&metrics, reason, peer);
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                refusals.refused(&metrics, Refused::ConnectionsMax, peer);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.config());
            let conn = Conn {
                app: app.clone(),
                metrics: metrics.clone(),
                limits: limits.clone(),
                counts: counts.clone(),
                refusals: refusals.clone(),
                shutdown: shutdown.clone(),
                peer,
            };
            tokio::spawn(async move {
                let _permit = permit;
                conn.run(acceptor, tcp, slot).await;
            });
        }
        tracing::info!("api listener stopped");
    }))
}

/// Connections the kernel completes and queues for `accept` (capped by
/// `net.core.somaxconn`): deep enough that a burst of new connections
/// (a flood, each closed at once) does not overflow it and leave a client's
/// connection waiting for a SYN retransmission.
const ACCEPT_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Why a connection was closed as soon as it was accepted, or after TLS:
/// the `reason` of `hie_api_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refused {
    /// `connections_max` connections are open on this node.
    ConnectionsMax,
    /// `connections_per_address_max` connections are open from its address.
    AddressConnections,
    /// `handshakes_per_address_max` TLS handshakes are in progress from its address.
    AddressHandshakes,
    /// `connections_per_organisation_max` connections of its organisation are open.
    OrganisationConnections,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::ConnectionsMax => "connections_max",
            Refused::AddressConnections => "address_connections",
            Refused::AddressHandshakes => "address_handshakes",
            Refused::OrganisationConnections => "organisation_connections",
        }
    }
}

/// Why the server closed a connection it had taken: the `reason` of
/// `hie_api_connections_closed_total`.
#[derive(Debug, Clone, Copy)]
enum Closed {
    HandshakeTimeout,
    HeaderReadTimeout,
    Idle,
    AgeMax,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::HandshakeTimeout => "handshake_timeout",
            Closed::HeaderReadTimeout => "header_read_timeout",
            Closed::Idle => "idle",
            Closed::AgeMax => "age_max",
        }
    }
}

/// A refusal is logged at most once per reason in this interval, with the
/// number refused since the last line: a flood counts in the metric, not in
/// the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct RefusalLog {
    /// By reason: when the last line was logged, and refusals since.
    last: Mutex<HashMap<Refused, (Option<Instant>, u64)>>,
}

impl RefusalLog {
    fn refused(&self, metrics: &hie_metrics::Metrics, reason: Refused, peer: SocketAddr) {
        metrics.api_connections_refused_total.with_label_values(&[reason.label()]).inc();
        let now = Instant::now();
        let mut last = self.last.lock().expect("refusal log lock");
        let (at, since) = last.entry(reason).or_default();
        if at.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(%peer, reason = reason.label(), refused_since_last_line = *since, "connection refused: limit reached");
            *at = Some(now);
            *since = 0;
        } else {
            *since += 1;
        }
    }
}

/// The key a source address is counted under: an IPv4 address, or an IPv6
/// address's /64 (one host usually holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// What the listener holds, by source address and by organisation. Each
/// count is held by a slot that gives it back when dropped; an address or
/// organisation with nothing open has no entry, so the maps hold at most
/// `connections_max` entries.
struct ConnCounts {
    addresses: Mutex<HashMap<IpAddr, AddressCount>>,
    organisations: Mutex<HashMap<OdsCode, usize>>,
    metrics: Arc<hie_metrics::Metrics>,
}

#[derive(Default)]
struct AddressCount {
    connections: usize,
    handshakes: usize,
}

impl ConnCounts {
    fn new(metrics: Arc<hie_metrics::Metrics>) -> Self {
        ConnCounts { addresses: Mutex::default(), organisations: Mutex::default(), metrics }
    }

    /// A connection and a TLS handshake from `ip`, if its address has room for both.
    fn admit_address(self: &Arc<Self>, ip: IpAddr, limits: &ApiLimits) -> Result<AddressSlot, Refused> {
        let key = address_key(ip);
        let mut addresses = self.addresses.lock().expect("connection counts lock");
        if let Some(count) = addresses.get(&key) {
            if count.connections >= limits.connections_per_address_max {
                return Err(Refused::AddressConnections);
            }
            if count.handshakes >= limits.handshakes_per_address_max {
                return Err(Refused::AddressHandshakes);
            }
        }
        let count = addresses.entry(key).or_default();
        count.connections += 1;
        count.handshakes += 1;
        self.metrics.api_connections.with_label_values(&["handshake"]).inc();
        Ok(AddressSlot { counts: self.clone(), key, handshaking: true })
    }

    /// A connection of `ods`, if the organisation has room for one more.
    fn admit_organisation(self: &Arc<Self>, ods: &OdsCode, limits: &ApiLimits) -> Option<OrganisationSlot> {
        let mut organisations = self.organisations.lock().expect("connection counts lock");
        if organisations.get(ods).is_some_and(|n| *n >= limits.connections_per_organisation_max) {
            return None;
        }
        *organisations.entry(ods.clone()).or_default() += 1;
        Some(OrganisationSlot { counts: self.clone(), ods: ods.clone() })
    }
}

/// One connection counted against its source address; a TLS handshake too
/// until [`AddressSlot::handshake_done`].
struct AddressSlot {
    counts: Arc<ConnCounts>,
    key: IpAddr,
    handshaking: bool,
}

impl AddressSlot {
    fn handshake_done(&mut self) {
        if std::mem::replace(&mut self.handshaking, false) {
            let mut addresses = self.counts.addresses.lock().expect("connection counts lock");
            if let Some(c) = addresses.get_mut(&self.key) {
                c.handshakes -= 1;
            }
            let g = &self.counts.metrics.api_connections;
            g.with_label_values(&["handshake"]).dec();
            g.with_label_values(&["open"]).inc();
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut addresses = self.counts.addresses.lock().expect("connection counts lock");
        if let Some(c) = addresses.get_mut(&self.key) {
            c.connections -= 1;
            c.handshakes -= usize::from(self.handshaking);
            if c.connections == 0 {
                addresses.remove(&self.key);
            }
        }
        let state = if self.handshaking { "handshake" } else { "open" };
        self.counts.metrics.api_connections.with_label_values(&[state]).dec();
    }
}

/// One connection counted against its organisation.
struct OrganisationSlot {
    counts: Arc<ConnCounts>,
    ods: OdsCode,
}

impl Drop for OrganisationSlot {
    fn drop(&mut self) {
        let mut organisations = self.counts.organisations.lock().expect("connection counts lock");
        if let Some(n) = organisations.get_mut(&self.ods) {
            *n -= 1;
            if *n == 0 {
                organisations.remove(&self.ods);
            }
        }
    }
}

/// Whether a connection has a request in flight, and when it was last
/// active: the idle timeout counts from the end of the last answer or the
/// last byte moved either way, whichever is later (so an answer streamed
/// for long, a backup, is not idle while its bytes flow).
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the last activity.
    active_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { opened: Instant::now(), in_flight: AtomicUsize::new(0), active_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.active_ms.fetch_max(self.opened.elapsed().as_millis() as u64, Ordering::AcqRel);
    }

    /// When the connection will have been idle for `idle_timeout`, if nothing
    /// happens before; `None` while a request is in flight.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.active_ms.load(Ordering::Acquire)) + idle_timeout)
    }
}

/// A connection's stream, noting its [`Activity`] whenever bytes move.
struct Metered<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Held by a request while it is answered.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(a: &Arc<Activity>) -> Busy {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The routes of one connection, marking each request in flight.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for Tracked<S>
where
    S: tower::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let busy = Busy::start(&self.activity);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(busy);
            r
        })
    }
}

/// Whether hyper ended a connection because a request head did not arrive
/// within `header_read_timeout` (hyper's error says so only in its text).
fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.to_string() == "read header from client timeout" {
            return true;
        }
        next = e.source();
    }
    false
}

/// One accepted connection and what it needs to be served.
struct Conn {
    app: axum::Router,
    metrics: Arc<hie_metrics::Metrics>,
    limits: ApiLimits,
    counts: Arc<ConnCounts>,
    refusals: Arc<RefusalLog>,
    shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Conn {
    async fn run(self, acceptor: TlsAcceptor, tcp: TcpStream, mut slot: AddressSlot) {
        let Conn { app, metrics, limits, counts, refusals, mut shutdown, peer } = self;
        let stream = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics.api_tls_handshake_failures_total.inc();
                tracing::info!(%peer, error = %e, "tls handshake refused");
                return;
            }
            Err(_) => {
                metrics.api_tls_handshake_failures_total.inc();
                metrics.api_connections_closed_total.with_label_values(&[Closed::HandshakeTimeout.label()]).inc();
                tracing::debug!(%peer, "tls handshake timed out");
                return;
            }
        };
        slot.handshake_done();
        let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(der) => ConnIdentity {
                caller: hie_pki::caller_from_cert(der).map_err(|e| e.to_string()),
                cert: CertId::of(der).ok(),
            },
            None => ConnIdentity { caller: Err("no client certificate".to_owned()), cert: None },
        };
        // A certificate that names no organisation is answered 401 on each
        // request; it is counted against its address only.
        let _organisation = match &identity.caller {
            Ok(caller) => match counts.admit_organisation(&caller.ods, &limits) {
                Some(s) => Some(s),
                None => {
                    refusals.refused(&metrics, Refused::OrganisationConnections, peer);
                    return;
                }
            },
            Err(_) => None,
        };
        let activity = Arc::new(Activity::new());
        let svc = Tracked { inner: Extension(identity).layer(app), activity: activity.clone() };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.header_bytes_max.max(8192) * 4);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.header_bytes_max as u32)
            .max_concurrent_streams(256);
        let conn = builder.serve_connection(
            TokioIo::new(Metered { inner: stream, activity: activity.clone() }),
            TowerToHyperService::new(svc),
        );
        tokio::pin!(conn);
        let age_max = tokio::time::sleep(limits.connection_age_max);
        tokio::pin!(age_max);
        let closing = loop {
            let idle_at = activity.idle_deadline(limits.idle_timeout);
            // While a request is in flight, look again within the idle timeout.
            let wake = idle_at.unwrap_or_else(|| Instant::now() + limits.idle_timeout);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        if is_header_timeout(e.as_ref()) {
                            metrics.api_connections_closed_total.with_label_values(&[Closed::HeaderReadTimeout.label()]).inc();
                        }
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.changed() => break None,
                _ = &mut age_max => break Some(Closed::AgeMax),
                _ = tokio::time::sleep_until(wake.into()) => {
                    if activity.idle_deadline(limits.idle_timeout).is_some_and(|at| at <= Instant::now()) {
                        break Some(Closed::Idle);
                    }
                }
            }
        };
        if let Some(reason) = closing {
            metrics.api_connections_closed_total.with_label_values(&[reason.label()]).inc();
            tracing::debug!(%peer, reason = reason.label(), "closing connection");
        }
        // Requests in flight are answered (HTTP/1.1 then closes, HTTP/2 sends GOAWAY).
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(limits.request_timeout, conn).await;
    }
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
