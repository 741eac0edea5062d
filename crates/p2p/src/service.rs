//! The swarm: one task owns it; everyone else talks to it through a channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, dial_opts::DialOpts};
use libp2p::{
    Multiaddr, PeerId, Swarm, allow_block_list, connection_limits, identify, identity::Keypair, noise, ping, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

use crate::P2pError;
use crate::addresses::KnownAddresses;
use crate::codec::{HieCodec, PROTOCOL};
use crate::lane::Lanes;
use crate::wire::{Request, Response};

/// Handles requests from peers.
pub trait Inbound: Send + Sync + 'static {
    fn handle(&self, peer: PeerId, request: Request) -> BoxFuture<'static, Response>;
}

#[derive(Debug, Clone)]
pub struct P2pConfig {
    pub listen: Multiaddr,
    /// Peers allowed before the membership is known (seeds), with addresses.
    pub seeds: Vec<(PeerId, Multiaddr)>,
    pub request_timeout: Duration,
    pub message_bytes_max: usize,
    pub connections_max: u32,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Inbound requests handled at once; more wait in the stream limit.
    pub concurrent_streams_max: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// The request was not delivered (no connection could be made): safe to retry.
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(PeerId, String),
    #[error("request to {0} timed out")]
    Timeout(PeerId),
    #[error("request to {0} failed: {1}")]
    Failed(PeerId, String),
    /// Not sent: the message is larger than `message_bytes_max`.
    #[error("request to {0} not sent: {1}")]
    TooLarge(PeerId, String),
    #[error("the transport has stopped")]
    Stopped,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct P2pCounters {
    pub connected_peers: AtomicU64,
    pub refused_connections: AtomicU64,
    pub inbound_failures: AtomicU64,
    /// Inbound messages refused as oversized, malformed or truncated.
    pub refused_messages: Arc<AtomicU64>,
    pub outbound_failures: AtomicU64,
    pub requests_sent: AtomicU64,
    pub requests_received: AtomicU64,
}

enum Cmd {
    Send { peer: PeerId, request: Request, reply: oneshot::Sender<Result<Response, SendError>> },
    Respond { channel: ResponseChannel<Response>, response: Response },
    Allow { peer: PeerId, addr: Option<Multiaddr> },
    Disallow { peer: PeerId },
}

/// A handle on the running transport. Cheap to clone.
#[derive(Clone)]
pub struct P2p {
    tx: mpsc::Sender<Cmd>,
    local: PeerId,
    counters: Arc<P2pCounters>,
    lanes: Arc<Lanes>,
    /// Mirrors the swarm's allow-list, for requests sent on lanes.
    allowed: Arc<std::sync::Mutex<std::collections::HashSet<PeerId>>>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    limits: connection_limits::Behaviour,
    rpc: request_response::Behaviour<HieCodec>,
    lanes: libp2p_stream::Behaviour,
    addresses: KnownAddresses,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Commands waiting for the swarm task; a bounded queue.
const COMMAND_QUEUE_MAX: usize = 4096;
const RECONNECT_TICK: Duration = Duration::from_millis(500);

struct Peer {
    addr: Option<Multiaddr>,
    backoff: Duration,
    next_dial: Instant,
}

impl P2p {
    /// Starts listening and returns a handle; the swarm runs until `shutdown` fires.
    pub async fn start(
        config: P2pConfig,
        key: Keypair,
        inbound: Arc<dyn Inbound>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<P2p, P2pError> {
        let local = key.public().to_peer_id();
        let codec = HieCodec::new(config.message_bytes_max);
        let refused_messages = codec.refused.clone();
        let rr_config = request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(config.concurrent_streams_max);
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.connections_max))
            .with_max_established_per_peer(Some(4))
            .with_max_pending_incoming(Some(64));
        let identify_cfg = identify::Config::new("/hie/1.0.0".into(), key.public());
        let lanes = libp2p_stream::Behaviour::new();
        let lane_control = lanes.new_control();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| P2pError::Transport(e.to_string()))?
            .with_behaviour(|_| Behaviour {
                allow: Default::default(),
                limits: connection_limits::Behaviour::new(limits),
                rpc: request_response::Behaviour::with_codec(codec, [(PROTOCOL, ProtocolSupport::Full)], rr_config),
                lanes,
                addresses: KnownAddresses::default(),
                identify: identify::Behaviour::new(identify_cfg),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            })
            .map_err(|e| P2pError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        swarm
            .listen_on(config.listen.clone())
            .map_err(|e| P2pError::Listen { addr: config.listen.to_string(), message: e.to_string() })?;

        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let counters = Arc::new(P2pCounters { refused_messages, ..P2pCounters::default() });
        let lanes = Arc::new(Lanes::start(
            lane_control,
            inbound.clone(),
            counters.clone(),
            config.message_bytes_max,
            config.request_timeout,
            config.concurrent_streams_max,
        ));
        let allowed = Arc::new(std::sync::Mutex::new(config.seeds.iter().map(|(p, _)| *p).collect()));
        let handle = P2p { tx: tx.clone(), local, counters: counters.clone(), lanes, allowed };
        let mut peers = HashMap::new();
        for (peer, addr) in &config.seeds {
            swarm.behaviour_mut().allow.allow_peer(*peer);
            swarm.behaviour_mut().addresses.set(*peer, addr.clone());
            peers.insert(
                *peer,
                Peer { addr: Some(addr.clone()), backoff: config.reconnect_backoff_min, next_dial: Instant::now() },
            );
        }
        let task = SwarmTask { swarm, rx, tx, inbound, peers, pending: HashMap::new(), counters, config, shutdown };
        tokio::spawn(task.run());
        Ok(handle)
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    pub fn counters(&self) -> Arc<P2pCounters> {
        self.counters.clone()
    }

    /// Sends a request and waits for its response (bounded by the request
    /// timeout). The small, frequent ones go on the peer's lane; snapshot
    /// chunks and audit queries on a stream of their own each.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, SendError> {
        if matches!(
            request,
            Request::AppendEntries(_) | Request::Vote(_) | Request::ClientWrite { .. } | Request::ReadIndex
        ) {
            if !self.allowed.lock().expect("allowed lock").contains(&peer) {
                return Err(SendError::Unreachable(peer, "not a member".into()));
            }
            return self.lanes.request(peer, &request).await;
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Send { peer, request, reply }).await.map_err(|_| SendError::Stopped)?;
        rx.await.map_err(|_| SendError::Stopped)?
    }

    /// Lets `peer` connect, and dials it at `addr` when it is known.
    pub async fn allow(&self, peer: PeerId, addr: Option<Multiaddr>) {
        if peer != self.local {
            self.allowed.lock().expect("allowed lock").insert(peer);
        }
        let _ = self.tx.send(Cmd::Allow { peer, addr }).await;
    }

    /// Refuses `peer` from now on and closes its connections.
    pub async fn disallow(&self, peer: PeerId) {
        self.allowed.lock().expect("allowed lock").remove(&peer);
        self.lanes.forget(&peer);
        let _ = self.tx.send(Cmd::Disallow { peer }).await;
    }
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<Cmd>,
    inbound: Arc<dyn Inbound>,
    peers: HashMap<PeerId, Peer>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, SendError>>>,
    counters: Arc<P2pCounters>,
    config: P2pConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl SwarmTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(RECONNECT_TICK);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = tick.tick() => self.redial(),
                _ = self.shutdown.changed() => break,
            }
        }
        tracing::info!("p2p transport stopped");
    }

    fn on_command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Send { peer, request, reply } => {
                if !self.swarm.behaviour().allow.allowed_peers().contains(&peer) {
                    let _ = reply.send(Err(SendError::Unreachable(peer, "not a member".into())));
                    return;
                }
                self.counters.requests_sent.fetch_add(1, Ordering::Relaxed);
                let id = match self.peers.get(&peer).and_then(|p| p.addr.clone()) {
                    Some(addr) => {
                        self.swarm.behaviour_mut().rpc.send_request_with_addresses(&peer, request, vec![addr])
                    }
                    None => self.swarm.behaviour_mut().rpc.send_request(&peer, request),
                };
                self.pending.insert(id, reply);
            }
            Cmd::Respond { channel, response } => {
                if self.swarm.behaviour_mut().rpc.send_response(channel, response).is_err() {
                    tracing::debug!("response dropped: the peer's stream closed first");
                }
            }
            Cmd::Allow { peer, addr } => {
                if peer == *self.swarm.local_peer_id() {
                    return;
                }
                self.swarm.behaviour_mut().allow.allow_peer(peer);
                let entry = self.peers.entry(peer).or_insert(Peer {
                    addr: None,
                    backoff: self.config.reconnect_backoff_min,
                    next_dial: Instant::now(),
                });
                if let Some(addr) = addr {
                    self.swarm.behaviour_mut().addresses.set(peer, addr.clone());
                    entry.addr = Some(addr);
                }
            }
            Cmd::Disallow { peer } => {
                self.swarm.behaviour_mut().allow.disallow_peer(peer);
                self.swarm.behaviour_mut().addresses.remove(&peer);
                self.peers.remove(&peer);
            }
        }
    }

    /// Dials members we are not connected to, each with exponential backoff.
    fn redial(&mut self) {
        let now = Instant::now();
        let local = *self.swarm.local_peer_id();
        let targets: Vec<(PeerId, Multiaddr)> = self
            .peers
            .iter()
            .filter(|(id, p)| **id != local && p.next_dial <= now && p.addr.is_some())
            .filter(|(id, _)| !self.swarm.is_connected(id))
            .map(|(id, p)| (*id, p.addr.clone().unwrap()))
            .collect();
        for (peer, addr) in targets {
            let p = self.peers.get_mut(&peer).unwrap();
            p.next_dial = now + p.backoff;
            p.backoff = (p.backoff * 2).min(self.config.reconnect_backoff_max);
            let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "dial not started");
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "p2p listening"),
            SwarmEvent::ConnectionEstablished { peer_id, num_established, .. } => {
                if num_established.get() == 1 {
                    self.counters.connected_peers.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %peer_id, "peer connected");
                }
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.backoff = self.config.reconnect_backoff_min;
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                self.counters.connected_peers.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, peer_id, .. } => {
                self.counters.refused_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(from = %send_back_addr, peer = ?peer_id.map(|p| p.to_string()), error = %error, "refused incoming connection");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id.map(|p| p.to_string()), error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(ev)) => self.on_rpc(ev),
            _ => {}
        }
    }

    fn on_rpc(&mut self, ev: request_response::Event<Request, Response>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                self.counters.requests_received.fetch_add(1, Ordering::Relaxed);
                let fut = self.inbound.handle(peer, request);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let response = fut.await;
                    let _ = tx.send(Cmd::Respond { channel, response }).await;
                });
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                self.counters.outbound_failures.fetch_add(1, Ordering::Relaxed);
                let err = match error {
                    request_response::OutboundFailure::DialFailure => {
                        SendError::Unreachable(peer, "dial failed".into())
                    }
                    // The request may have been delivered: not `Unreachable`, which promises it was not.
                    request_response::OutboundFailure::ConnectionClosed => {
                        SendError::Failed(peer, "connection closed".into())
                    }
                    request_response::OutboundFailure::Timeout => SendError::Timeout(peer),
                    request_response::OutboundFailure::Io(e)
                        if e.get_ref().is_some_and(|inner| inner.is::<crate::codec::TooLarge>()) =>
                    {
                        SendError::TooLarge(peer, e.to_string())
                    }
                    other => SendError::Failed(peer, other.to_string()),
                };
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(err));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                self.counters.inbound_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %error, "refused inbound message");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}
