//! 6. A peer that is not a member, and malformed or oversized messages from a
//!    member's identity, are refused and logged; the node never panics.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use hie_tests::*;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, identity::Keypair, noise, tcp, yamux};

/// Sends bytes exactly as given, so the test can send what no node would.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = vec![];
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = vec![];
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

/// True if any outcome carried an answer (a refused stream closes with no bytes).
fn answered(outcomes: &[String]) -> bool {
    outcomes.iter().any(|o| o.starts_with("answered") && !o.starts_with("answered 0 bytes"))
}

/// Dials `addr` as `key` and sends each message on a stream of `protocol`
/// of its own; returns how each ended.
async fn rogue(key: Keypair, addr: Multiaddr, protocol: &'static str, messages: Vec<Vec<u8>>) -> Vec<String> {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::<RawCodec>::new(
                [(StreamProtocol::new(protocol), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
            )
        })
        .unwrap()
        .build();
    let peer: libp2p::PeerId = {
        // The target's PeerId is not needed to dial by address.
        swarm.dial(addr.clone()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ev = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
            match ev {
                Ok(SwarmEvent::ConnectionEstablished { peer_id, .. }) => break peer_id,
                Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => return vec![format!("dial refused: {error}")],
                Ok(_) => {}
                Err(_) => return vec!["dial timed out".into()],
            }
        }
    };
    let mut outcomes = vec![];
    for m in messages {
        swarm.behaviour_mut().send_request(&peer, m);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let outcome = loop {
            match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
                Ok(SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                })) => {
                    // A lane's answer is a frame: its 13th byte is the status.
                    break format!("answered {} bytes, status {:?}", response.len(), response.get(12));
                }
                Ok(SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. })) => {
                    break format!("failed: {error}");
                }
                Ok(SwarmEvent::ConnectionClosed { .. }) => break "connection closed".into(),
                Ok(_) => {}
                Err(_) => break "no answer".into(),
            }
        };
        outcomes.push(outcome);
        if !swarm.is_connected(&peer) {
            break;
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_and_bad_messages_are_refused_and_logged() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "5"])?;
    c.wait_leader(Duration::from_secs(10)).await?;
    let target = 1;
    let addr: Multiaddr = c.node(target)["p2p_addr"].as_str().unwrap().parse()?;

    // A stranger with its own key: refused at the connection.
    let outcome = rogue(Keypair::generate_ed25519(), addr.clone(), "/hie/rpc/1", vec![b"hello".to_vec()]).await;
    eprintln!("stranger: {outcome:?}");
    assert!(!answered(&outcome), "a stranger got an answer: {outcome:?}");

    // A member's identity sending garbage, then a frame claiming 2 GiB.
    let member_key = Keypair::from_protobuf_encoding(&std::fs::read(c.dir.path().join("node-3/node.key"))?)?;
    let mut garbage = 16u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0, 1, 2, 3, 4, 5, 6, 7]);
    let mut oversized = 0x7fff_ffffu32.to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 1024]);
    let outcome = rogue(member_key.clone(), addr.clone(), "/hie/rpc/1", vec![garbage]).await;
    eprintln!("malformed: {outcome:?}");
    assert!(!answered(&outcome), "{outcome:?}");
    let outcome = rogue(member_key.clone(), addr.clone(), "/hie/rpc/1", vec![oversized.clone()]).await;
    eprintln!("oversized: {outcome:?}");
    assert!(!answered(&outcome), "{outcome:?}");

    // The same on a lane (`[len u32][id u64][status u8]` frames): a
    // well-framed request that does not decode is answered with a refusal
    // (status 1) for its id, and a frame claiming 2 GiB closes the lane.
    let mut undecodable = 4u32.to_be_bytes().to_vec();
    undecodable.extend_from_slice(&7u64.to_be_bytes());
    undecodable.push(0);
    undecodable.extend_from_slice(&[0xff, 0x00, 0x13, 0x37]);
    let outcome = rogue(member_key.clone(), addr.clone(), "/hie/lane/1", vec![undecodable]).await;
    eprintln!("malformed on a lane: {outcome:?}");
    assert!(outcome.len() == 1 && outcome[0].ends_with("status Some(1)"), "{outcome:?}");
    let outcome = rogue(member_key, addr, "/hie/lane/1", vec![oversized]).await;
    eprintln!("oversized on a lane: {outcome:?}");
    assert!(!answered(&outcome), "{outcome:?}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read_to_string(c.dir.path().join("node-1/hie.log"))?;
    assert!(log.contains("refused incoming connection"), "stranger refusal logged");
    assert!(log.contains("refused inbound message"), "bad messages logged");
    assert!(log.contains("exceeds message_bytes_max"), "oversized message named");
    assert!(log.contains("undecodable request") || log.contains("refused inbound message"), "lane refusal logged");
    assert!(!log.contains("panicked"), "no panic");
    let metrics = c.metrics(target).await.unwrap();
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("hie_p2p_refused_connections_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(refused >= 1.0);

    // The node is still healthy and the cluster still writes through it.
    let health = reqwest::get(format!("{}/healthz", c.admin_url(target))).await?;
    assert!(health.status().is_success());
    let gp = c.http("gp-practice-a");
    let r = create_pointer(&gp, &c.api_url(target), &pointer_body(&nhs(9), "A81001", "after-rogue")).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    Ok(())
}
