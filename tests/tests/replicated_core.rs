//! The replicated core with real node processes: `hie dev up` clusters of
//! separate processes talking libp2p, RocksDB on disk, HTTPS with mutual TLS.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hie_tests::*;
use nix::sys::signal::Signal;

/// 1. A write sent to any node (forwarded to the leader) is readable on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_any_node_is_readable_on_every_node() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "10"])?;
    let gp = c.http("gp-practice-a");
    let consumer = c.http("ambulance-service");
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    for (i, id) in c.node_ids().into_iter().enumerate() {
        let patient = nhs(500 + i as u32);
        let r =
            create_pointer(&gp, &c.api_url(id), &pointer_body(&patient, "A81001", &format!("any-node-{id}"))).await?;
        assert_eq!(r.status, 201, "create on node {id} (leader {leader}): {}", r.body);
        assert!(r.header("location").unwrap().contains("/_history/1"));
        assert_eq!(r.header("etag"), Some("W/\"1\""));
        let pointer_id = r.body["id"].as_str().unwrap().to_owned();
        assert!(pointer_id.starts_with("A81001-"));
        // Readable on every node (linearizable so the check does not race replication).
        for other in c.node_ids() {
            let s = search(&consumer, &c.api_url(other), &patient, &[("x-hie-consistency", "linearizable")]).await?;
            assert_eq!(s.status, 200, "{}", s.body);
            assert_eq!(s.body["total"], 1, "node {other} after a write to node {id}: {}", s.body);
            assert_eq!(s.body["entry"][0]["resource"]["id"], pointer_id.as_str());
            assert_eq!(s.header("x-hie-stale"), Some("false"));
            let r = reply(consumer.get(format!("{}/DocumentReference/{pointer_id}", c.api_url(other)))).await?;
            assert_eq!(r.status, 200);
        }
    }
    // Sample data is there too, on a follower.
    let follower = c.node_ids().into_iter().find(|id| *id != leader).unwrap();
    let h = reply(consumer.get(format!("{}/Patient/{}/$record-holders", c.api_url(follower), nhs(0)))).await?;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["resourceType"], "Parameters");
    assert!(!h.body["parameter"].as_array().unwrap().is_empty());
    // No NHS Number in clear in any node's log.
    let logs = c.all_logs();
    for i in (0..10).chain(500..503) {
        assert!(!logs.contains(&nhs(i)), "a test NHS Number appears in a log");
    }
    Ok(())
}

/// Times one check's search is retried after a 429.
const CHECK_RETRIES_MAX: usize = 30;

/// 2. SIGKILL the leader during a stream of writes: a new leader within 5 s;
/// after the killed node restarts, every acknowledged write is on every node
/// and all replicas hold identical state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let c = Arc::new(Cluster::up(&["--patients", "0"])?);
    let old_leader = c.wait_leader(Duration::from_secs(10)).await?;
    let ids = c.node_ids();
    let followers: Vec<u64> = ids.iter().copied().filter(|i| *i != old_leader).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let mut writers = vec![];
    for w in 0..4u32 {
        let (c, stop, acked, failures, followers) =
            (c.clone(), stop.clone(), acked.clone(), failures.clone(), followers.clone());
        writers.push(tokio::spawn(async move {
            let gp = c.http("gp-practice-a");
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Writers send to the followers, which forward to whoever leads.
                let node = followers[(i as usize + w as usize) % followers.len()];
                let patient = nhs(1000 + w * 100_000 + i);
                let body = pointer_body(&patient, "A81001", &format!("stream-{w}-{i}"));
                match create_pointer(&gp, &c.api_url(node), &body).await {
                    Ok(r) if r.status == 201 => {
                        acked.lock().unwrap().push((patient, r.body["id"].as_str().unwrap().to_owned()))
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 0, "writes flow before the kill");

    c.kill9(old_leader);
    let killed_at = Instant::now();
    let new_leader = loop {
        if let Some(l) = c.leader().await
            && l != old_leader
        {
            break l;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(5), "no new leader within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let failover = killed_at.elapsed();
    eprintln!("leader {old_leader} killed; node {new_leader} leads after {} ms", failover.as_millis());

    // Writes resume under the new leader.
    let at_failover = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(acked.lock().unwrap().len() > at_failover, "writes resume after failover");

    c.restart(old_leader)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} writes acknowledged, {} failed or timed out", acked.len(), failures.load(Ordering::Relaxed));

    let (applied, digest) = c.wait_converged(&ids, Duration::from_secs(30)).await?;
    eprintln!("converged at applied index {applied}, digest {digest}");
    // Every acknowledged write is on every node, including the restarted one.
    let consumer = c.http("ambulance-service");
    for id in &ids {
        for (patient, pointer_id) in &acked {
            // Thousands of checks in a row meet the consumer's rate limit:
            // a 429 is waited out as its Retry-After says, never read as a miss.
            let mut s = search(&consumer, &c.api_url(*id), patient, &[]).await?;
            for _ in 0..CHECK_RETRIES_MAX {
                if s.status != 429 {
                    break;
                }
                let wait = s.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1u64);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                s = search(&consumer, &c.api_url(*id), patient, &[]).await?;
            }
            let found: BTreeSet<&str> =
                s.body["entry"].as_array().into_iter().flatten().filter_map(|e| e["resource"]["id"].as_str()).collect();
            assert!(
                found.contains(pointer_id.as_str()),
                "node {id} lacks acknowledged pointer {pointer_id}: search answered {} {}",
                s.status,
                s.body.to_string().chars().take(400).collect::<String>()
            );
        }
    }
    Ok(())
}

/// 4. A node cut off from the majority (the others stopped with SIGSTOP)
/// serves reads flagged stale and answers writes with NO_QUORUM within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_serves_stale_reads_and_refuses_writes() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "5"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    for isolated in [leader, c.node_ids().into_iter().find(|i| *i != leader).unwrap()] {
        let others: Vec<u64> = c.node_ids().into_iter().filter(|i| *i != isolated).collect();
        for o in &others {
            c.signal(*o, Signal::SIGSTOP);
        }
        let consumer = c.http("ambulance-service");
        let gp = c.http("gp-practice-a");
        // Within twice the election timeout the node knows it is cut off.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let s = search(&consumer, &c.api_url(isolated), &nhs(0), &[]).await?;
        assert_eq!(s.status, 200, "reads go on: {}", s.body);
        assert_eq!(s.header("x-hie-stale"), Some("true"), "node {isolated} flags its reads stale");
        assert!(s.body["total"].as_u64().unwrap() >= 1);

        let started = Instant::now();
        let w =
            create_pointer(&gp, &c.api_url(isolated), &pointer_body(&nhs(7), "A81001", &format!("cut-off-{isolated}")))
                .await?;
        let took = started.elapsed();
        assert_eq!(w.status, 503, "{}", w.body);
        assert_eq!(w.code(), "NO_QUORUM");
        assert!(w.header("retry-after").is_some());
        assert!(took < Duration::from_secs(5), "no-quorum answer took {took:?}");
        eprintln!("isolated node {isolated} (leader was {leader}): no-quorum answer in {} ms", took.as_millis());

        let lin = search(&consumer, &c.api_url(isolated), &nhs(0), &[("x-hie-consistency", "linearizable")]).await?;
        assert_eq!(lin.status, 503, "a linearizable read needs a quorum");
        assert_eq!(lin.code(), "NO_QUORUM");

        for o in &others {
            c.signal(*o, Signal::SIGCONT);
        }
        c.wait_leader(Duration::from_secs(10)).await?;
        // Healed: the write goes through now.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = create_pointer(
                &gp,
                &c.api_url(isolated),
                &pointer_body(&nhs(7), "A81001", &format!("healed-{isolated}")),
            )
            .await?;
            if w.status == 201 {
                break;
            }
            assert!(Instant::now() < deadline, "writes did not resume after healing: {}", w.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// 5. All nodes stopped and restarted: state intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_the_state() -> anyhow::Result<()> {
    let mut c = Cluster::up(&["--patients", "50"])?;
    let ids = c.node_ids();
    let (applied, digest) = c.wait_converged(&ids, Duration::from_secs(20)).await?;
    hie(&["dev", "down", "--dir", &c.dir_str()])?;
    for id in &ids {
        assert!(c.pid(*id).is_none(), "node {id} stopped");
        let log = std::fs::read_to_string(c.dir.path().join(format!("node-{id}/hie.log")))?;
        assert!(log.contains("SIGTERM: shutting down") && log.contains("node stopped"), "node {id} shut down cleanly");
    }
    // `dev up` on a stopped cluster starts it again on its data; on a running one it refuses.
    hie(&["dev", "up", "--dir", &c.dir_str()])?;
    c.reload();
    assert!(hie(&["dev", "up", "--dir", &c.dir_str()]).is_err(), "a running cluster is not started twice");
    let (applied_after, digest_after) = c.wait_converged(&ids, Duration::from_secs(20)).await?;
    assert!(applied_after >= applied);
    assert_eq!(digest_after, digest, "state digest survives a full restart");
    let consumer = c.http("ambulance-service");
    let s = search(&consumer, &c.api_url(ids[1]), &nhs(3), &[]).await?;
    assert_eq!(s.status, 200);
    assert!(s.body["total"].as_u64().unwrap() >= 1);
    Ok(())
}
