//! 3. After 10,000 writes and a log purge, a 4th region joins as a learner,
//!    catches up by snapshot and serves reads; it is promoted to voter,
//!    demoted to learner and promoted again; another node is removed; the
//!    cluster keeps accepting writes throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hie_tests::*;

const WRITES: u32 = 10_000;
const WRITERS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_region_catches_up_by_snapshot_then_votes_while_another_leaves() -> anyhow::Result<()> {
    let mut c = Cluster::up(&["--patients", "0", "--snapshot-logs-since-last", "1000"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;

    // 10,000 writes, spread over the nodes.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let c_arc = Arc::new(c.http("gp-practice-a"));
    let urls: Vec<String> = c.node_ids().iter().map(|id| c.api_url(*id)).collect();
    let mut tasks = vec![];
    for _ in 0..WRITERS {
        let (next, gp, urls) = (next.clone(), c_arc.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as u32;
                if i >= WRITES {
                    return Ok::<_, anyhow::Error>(());
                }
                let r = create_pointer(
                    &gp,
                    &urls[i as usize % urls.len()],
                    &pointer_body(&nhs(i % 5000), "A81001", &format!("bulk-{i}")),
                )
                .await?;
                anyhow::ensure!(r.status == 201, "write {i}: {} {}", r.status, r.body);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let took = started.elapsed();
    eprintln!("{WRITES} writes in {:.1} s ({:.0}/s)", took.as_secs_f64(), f64::from(WRITES) / took.as_secs_f64());

    // 16 writers at once: the leader grouped writes into shared log entries
    // (fewer entries than writes), each still answered on its own.
    let m = c.metrics(leader).await.unwrap_or_default();
    let value = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    let (grouped, entries) = (value("hie_raft_batched_writes_total"), value("hie_raft_log_entries_appended_total"));
    eprintln!("{grouped} of {WRITES} writes grouped; {entries} log entries");
    assert!(grouped > 0.0, "concurrent writes were grouped into shared entries");
    assert!(entries < f64::from(WRITES), "fewer log entries ({entries}) than writes");

    // The log behind the snapshot has been purged on the leader.
    let status = c.admin(leader, "/status").await.unwrap();
    let purged = status["purged_index"].as_u64().unwrap_or(0);
    assert!(purged > 1000, "log purged behind a snapshot: {status}");

    // Keep writing through everything that follows.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, ok, failed, gp, url) = (stop.clone(), ok.clone(), failed.clone(), c_arc.clone(), c.api_url(leader));
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r =
                    create_pointer(&gp, &url, &pointer_body(&nhs(6000 + i), "A81001", &format!("during-{i}"))).await;
                match r {
                    Ok(r) if r.status == 201 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("write during membership change failed: {} {}", r.status, r.body);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("write during membership change failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let join_started = Instant::now();
    hie(&["dev", "add-node", "--dir", &c.dir_str(), "--region", "south-west"])?;
    c.reload();
    let new_id = *c.node_ids().iter().max().unwrap();
    assert_eq!(new_id, 4);
    let log = std::fs::read_to_string(c.dir.path().join("node-4/hie.log"))?;
    assert!(log.contains("installed snapshot"), "the learner caught up by snapshot:\n{}", c.logs_tail(20));
    eprintln!("learner joined and ready in {} ms", join_started.elapsed().as_millis());

    // The learner serves reads of data written before it joined.
    let consumer = c.http("ambulance-service");
    let s = search(&consumer, &c.api_url(4), &nhs(42), &[]).await?;
    assert_eq!(s.status, 200);
    assert!(s.body["total"].as_u64().unwrap() >= 2, "{}", s.body);
    let status = c.admin(c.wait_leader(Duration::from_secs(5)).await?, "/status").await.unwrap();
    let me = status["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).cloned();
    assert_eq!(me.map(|m| m["voter"].clone()), Some(serde_json::json!(false)), "node 4 is a learner: {status}");

    // Promote it; demote it (a learner again, still a member) and promote
    // it back; then remove a node that is not the leader.
    hie(&["cluster", "promote", "4", "--cluster", &c.cluster_json()])?;
    hie(&["cluster", "demote", "4", "--cluster", &c.cluster_json()])?;
    let status = c.admin(c.wait_leader(Duration::from_secs(10)).await?, "/status").await.unwrap();
    assert!(members(&status).contains(&(4, false)), "node 4 demoted to learner: {status}");
    hie(&["cluster", "promote", "4", "--cluster", &c.cluster_json()])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let victim = c.node_ids().into_iter().find(|id| *id != leader && *id != 4).unwrap();
    hie(&["cluster", "remove", &victim.to_string(), "--cluster", &c.cluster_json()])?;
    let status = c.admin(leader, "/status").await.unwrap();
    let members = members(&status);
    assert!(members.contains(&(4, true)), "node 4 votes: {status}");
    assert!(!members.iter().any(|(id, _)| *id == victim), "node {victim} removed: {status}");

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    eprintln!(
        "{} writes during the membership changes, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "the cluster kept accepting writes");

    let remaining: Vec<u64> = c.node_ids().into_iter().filter(|id| *id != victim).collect();
    c.wait_converged(&remaining, Duration::from_secs(30)).await?;
    Ok(())
}
