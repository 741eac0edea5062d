//! A replica whose write-ahead log is damaged refuses to start, naming the
//! file, and is replaced from its peers by the runbook's steps ("A node
//! refuses to start"): remove it, add a new node (a new id and key) as a
//! learner, promote it. The new node holds every pointer the cluster
//! acknowledged, before and after the damage.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hie_tests::*;

/// The live WAL: the newest non-empty `*.log` file of a node's store.
fn newest_wal(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let db = data_dir.join("store").join("db");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&db)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log") && std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect();
    logs.sort();
    logs.pop().ok_or_else(|| anyhow::anyhow!("no WAL in {}", db.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_damaged_wal_refuses_to_start_and_is_replaced_from_its_peers() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "20"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let victim = c.node_ids().into_iter().find(|id| *id != leader).expect("a follower");
    let gp = c.http("gp-practice-a");
    let mut acknowledged = vec![];
    for i in 0..40u32 {
        let r =
            create_pointer(&gp, &c.api_url(leader), &pointer_body(&nhs(900 + i % 8), "A81001", &format!("wal-{i}")))
                .await?;
        anyhow::ensure!(r.status == 201, "create {i}: {} {}", r.status, r.body);
        acknowledged.push((nhs(900 + i % 8), r.body_id()));
    }
    c.wait_converged(&c.node_ids(), Duration::from_secs(20)).await?;

    // Damage the follower's WAL in the middle, among records it fsynced.
    c.kill9(victim);
    let wal = newest_wal(&c.data_dir(victim))?;
    let len = std::fs::metadata(&wal)?.len();
    anyhow::ensure!(len > 4096, "the WAL holds the run's writes: {len} bytes");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&wal)?;
    let mut b = [0u8];
    f.read_exact_at(&mut b, len / 2)?;
    f.write_all_at(&[b[0] ^ 0x04], len / 2)?;
    f.sync_all()?;
    drop(f);

    // It refuses to start, and says which file.
    let log = c.data_dir(victim).join("hie.log");
    let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    c.restart(victim)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = loop {
        let text = std::fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[before as usize..]).into_owned();
        if new.contains("damaged") || Instant::now() > deadline {
            break new;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let name = wal.file_name().unwrap().to_string_lossy().into_owned();
    assert!(said.contains("write-ahead log") && said.contains(&name), "names the damaged WAL {name}:\n{said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.pid(victim).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.pid(victim).is_none(), "the node exited rather than serve without its log:\n{said}");

    // The cluster goes on with two voters; writes still succeed.
    for i in 0..10u32 {
        let r =
            create_pointer(&gp, &c.api_url(leader), &pointer_body(&nhs(950 + i % 4), "A81001", &format!("after-{i}")))
                .await?;
        anyhow::ensure!(r.status == 201, "create after the damage {i}: {} {}", r.status, r.body);
        acknowledged.push((nhs(950 + i % 4), r.body_id()));
    }

    // Replace it from its peers: remove it, add a new node, promote it.
    let cluster = c.cluster_json();
    hie(&["cluster", "remove", &victim.to_string(), "--cluster", &cluster])?;
    let region = c.node(victim)["region"].as_str().unwrap_or("north-west").to_owned();
    hie(&["dev", "add-node", "--dir", &c.dir_str(), "--region", &region, "--voter"])?;
    let mut c = c;
    c.reload();
    let new = c.node_ids().into_iter().max().expect("the new node");
    assert!(new > victim, "a new id: {new}");
    let status = c.admin(leader, "/status").await.expect("status");
    let members = members(&status);
    assert!(members.contains(&(new, true)) && !members.iter().any(|(id, _)| *id == victim), "{status}");

    let live: Vec<u64> = c.node_ids().into_iter().filter(|id| *id != victim).collect();
    c.wait_converged(&live, Duration::from_secs(30)).await?;
    let consumer = c.http("ambulance-service");
    for (patient, id) in &acknowledged {
        let s = search(&consumer, &c.api_url(new), patient, &[]).await?;
        assert_eq!(s.status, 200, "{}", s.body);
        assert!(s.body.to_string().contains(id.as_str()), "pointer {id} on the new node");
    }
    Ok(())
}
