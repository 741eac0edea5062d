//! A backup taken under write load restores into a fresh node, which joins
//! as a learner, catches up from the backup's point by log, and ends with
//! the same state digest as the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hie_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_node_that_joins_and_matches() -> anyhow::Result<()> {
    let mut c = Cluster::up(&["--patients", "200"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    // Where the seeded data ends: a backup taken later must hold at least that.
    let (seeded_index, _) = c.wait_converged(&c.node_ids(), Duration::from_secs(20)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, gp, url) = (stop.clone(), written.clone(), c.http("gp-practice-a"), c.api_url(leader));
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r =
                    create_pointer(&gp, &url, &pointer_body(&nhs(3000 + i), "A81001", &format!("backup-{i}"))).await;
                if matches!(r, Ok(ref r) if r.status == 201) {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let backup = c.dir.path().join("node-2.backup");
    let out =
        hie(&["cluster", "backup", "--out", backup.to_str().unwrap(), "--node", "2", "--cluster", &c.cluster_json()])?;
    assert!(out.starts_with("backup of "), "{out}");
    let at_backup = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let out = hie(&[
        "dev",
        "add-node",
        "--dir",
        &c.dir_str(),
        "--region",
        "south-west",
        "--restore-from",
        backup.to_str().unwrap(),
    ])?;
    c.reload();
    let restored_index: u64 = out
        .lines()
        .find_map(|l| l.split("at log index ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("restore reported its index: {out}"));
    assert!(restored_index >= seeded_index, "the backup holds the seeded data (to index {seeded_index}): {out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    assert!(written.load(Ordering::Relaxed) > at_backup, "writes went on after the backup");

    let (applied, digest) = c.wait_converged(&c.node_ids(), Duration::from_secs(30)).await?;
    assert!(applied > restored_index);
    eprintln!("restored at index {restored_index}; all 4 nodes converged at {applied} ({digest})");
    // It started from the backup: the leader never had to send it a snapshot.
    let log = std::fs::read_to_string(c.dir.path().join("node-4/hie.log"))?;
    assert!(!log.contains("installed snapshot"), "node 4 caught up from the backup, not a snapshot");
    // A restore refuses a data directory that already holds a node.
    let config = c.dir.path().join("node-1.toml");
    assert!(
        hie(&["node", "restore", "--config", config.to_str().unwrap(), "--from", backup.to_str().unwrap()]).is_err()
    );
    Ok(())
}
