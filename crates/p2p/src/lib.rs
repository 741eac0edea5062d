//! Node-to-node transport over libp2p: TCP + Noise + yamux. Raft's
//! append-entries and votes, forwarded client writes and read-index requests
//! go on one long-lived stream to each peer (a lane, `lane.rs`); snapshot
//! chunks and audit queries on request-response; identify and ping for
//! liveness.
//!
//! Only peers in the allow-list (the cluster membership and the configured
//! seed peers) may connect; every message is length-prefixed and bounded.
//! This is the only crate that knows libp2p.

mod addresses;
mod codec;
#[doc(hidden)]
pub mod fuzzing;
mod key;
mod lane;
mod network;
mod service;
mod wire;

pub use codec::{HieCodec, PROTOCOL};
pub use key::{load_or_create_key, peer_id_of_key_file};
pub use lane::{
    LANE_IN_FLIGHT_MAX, LANE_OPEN_TIMEOUT, LANE_PROTOCOL, LANE_QUEUE_MAX, LANE_SILENCE_MAX, LANE_WRITE_BYTES_MAX,
    LANES_INBOUND_MAX,
};
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
