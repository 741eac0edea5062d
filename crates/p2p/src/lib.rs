//! Node-to-node transport over libp2p: TCP + Noise + yamux, one
//! request-response protocol carrying Raft RPCs, forwarded client writes and
//! read-index requests, identify and ping for liveness.
//!
//! Only peers in the allow-list (the cluster membership and the configured
//! seed peers) may connect; every message is length-prefixed and bounded.
//! This is the only crate that knows libp2p.

mod codec;
mod key;
mod network;
mod service;
mod wire;

pub use codec::{HieCodec, PROTOCOL};
pub use key::{load_or_create_key, peer_id_of_key_file};
pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use network::{P2pNetwork, P2pNetworkFactory};
pub use service::{Inbound, P2p, P2pConfig, P2pCounters, SendError};
pub use wire::{ForwardError, ReadIndexError, Request, Response, SnapshotChunk};

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("node key {path}: {message}")]
    Key { path: String, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("transport: {0}")]
    Transport(String),
}
