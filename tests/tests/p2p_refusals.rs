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

/// Serves nothing: the test's transport only sends.
struct Deaf;

impl hie_p2p::Inbound for Deaf {
    fn handle(
        &self,
        _: hie_p2p::PeerId,
        _: hie_p2p::Request,
    ) -> futures::future::BoxFuture<'static, hie_p2p::Response> {
        Box::pin(async { hie_p2p::Response::Refused("the test serves nothing".into()) })
    }
}

/// What `peer` answers to an audit query and a read-index request sent by
/// `key` over the real transport: `"audit answered"`, `"read-index
/// answered"`, or why not.
async fn as_peer(key: Keypair, peer: hie_p2p::PeerId, addr: Multiaddr) -> Vec<String> {
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let config = hie_p2p::P2pConfig {
        listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        seeds: vec![(peer, addr)],
        request_timeout: Duration::from_secs(3),
        message_bytes_max: 16 << 20,
        connections_max: 8,
        reconnect_backoff_min: Duration::from_millis(100),
        reconnect_backoff_max: Duration::from_secs(1),
        concurrent_streams_max: 8,
    };
    let p2p = hie_p2p::P2p::start(config, key, std::sync::Arc::new(Deaf), shutdown).await.unwrap();
    let query = hie_domain::audit::AuditQuery {
        subject: hie_domain::NhsNumber::parse(&nhs(1)).unwrap(),
        since: None,
        until: None,
        limit: 10,
    };
    let mut outcomes = vec![];
    // The first request may race the connection being set up: a few tries.
    for (name, request) in [("audit", hie_p2p::Request::AuditQuery(query)), ("read-index", hie_p2p::Request::ReadIndex)]
    {
        let mut outcome = String::new();
        for _ in 0..5 {
            let request = match &request {
                hie_p2p::Request::AuditQuery(q) => hie_p2p::Request::AuditQuery(q.clone()),
                _ => hie_p2p::Request::ReadIndex,
            };
            outcome = match tokio::time::timeout(Duration::from_secs(5), p2p.request(peer, request)).await {
                Ok(Ok(hie_p2p::Response::AuditQuery(Ok(_)) | hie_p2p::Response::ReadIndex(_))) => {
                    format!("{name} answered")
                }
                Ok(Ok(hie_p2p::Response::Refused(why))) => format!("{name} refused: {why}"),
                Ok(Ok(other)) => format!("{name} answered {}", other.kind()),
                Ok(Err(e)) => format!("{name} not delivered: {e}"),
                Err(_) => format!("{name} timed out"),
            };
            if outcome.ends_with("answered") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// A node that joined with seed peers allows them only until it is a member
/// itself: the key of a seed that was then removed from the membership gets
/// no audit trail and no read-index answer (nor, on the same lanes,
/// forwarded writes or votes), where the same key was served while it was a
/// member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_seed_peers_key_is_served_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::up(&["--patients", "3"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    // Node 4 joins with nodes 1 to 3 as its seeds.
    hie(&["dev", "add-node", "--dir", &c.dir_str(), "--region", "south-west"])?;
    c.reload();
    let victim = c.node_ids().into_iter().find(|id| *id != leader && *id != 4).unwrap();
    let victim_key =
        Keypair::from_protobuf_encoding(&std::fs::read(c.dir.path().join(format!("node-{victim}/node.key")))?)?;
    let node4_peer: hie_p2p::PeerId = c.node(4)["peer_id"].as_str().unwrap().parse()?;
    let node4_addr: Multiaddr = c.node(4)["p2p_addr"].as_str().unwrap().parse()?;

    // The victim's key, while it is a member, is served (its own process is
    // stopped so that only the test speaks with that identity).
    c.kill9(victim);
    let member = as_peer(victim_key.clone(), node4_peer, node4_addr.clone()).await;
    eprintln!("as a member: {member:?}");
    assert_eq!(member, ["audit answered", "read-index answered"], "a member is served");

    // Decommissioned: removed from the membership. Node 4 sees it go.
    hie(&["cluster", "remove", &victim.to_string(), "--cluster", &c.cluster_json(), "--node", "4"])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = c.admin(4, "/status").await.unwrap_or_default();
        let gone = status["members"].as_array().is_some_and(|m| !m.iter().any(|m| m["id"] == victim));
        if gone {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "node 4 never saw {victim} removed: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let removed = as_peer(victim_key, node4_peer, node4_addr).await;
    eprintln!("after removal: {removed:?}");
    assert!(removed.iter().all(|o| !o.ends_with("answered")), "a removed seed's key was served: {removed:?}");
    let log = std::fs::read_to_string(c.dir.path().join("node-4/hie.log"))?;
    assert!(log.contains("peer left the membership; refusing it from now on"), "the refusal is logged");
    Ok(())
}
