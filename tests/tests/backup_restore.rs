//! A backup taken under write load is streamed by the node (its memory does
//! not grow with the backup), written to a file only its owner can read,
//! sealed with the cluster's backup key, audited as an operator action,
//! and holds the node's audit segments. A tampered or wrongly keyed copy is
//! refused; the backup itself restores into a fresh node, which joins as a
//! learner, catches up from the backup's point by log, and ends with the
//! same state digest as the others.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hie_tests::*;
use serde_json::Value;

/// Patients seeded (NRLF-shaped pointers, about 2.3 KB each, and their
/// audit records): enough that the backup (about 50 MiB) is several times
/// the memory the node may take to send it.
const PATIENTS: &str = "60000";
/// How much node 2's resident memory may grow while it sends the backup:
/// the frames queued and the one being filled (5 MiB), RocksDB's read-ahead
/// (2 MiB), the compressor, and what the writes going on meanwhile take.
const RSS_GROWTH_MAX_BYTES: u64 = 16 << 20;

fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|k| k * 1024)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `N` in "... <label> N ..." of a line of output.
fn number_after(out: &str, label: &str) -> Option<u64> {
    out.split(label).nth(1)?.split_whitespace().next()?.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()
}

/// The audit events of `hie audit export` with these arguments.
fn export(c: &Cluster, at: &[&str]) -> anyhow::Result<Vec<Value>> {
    let out = c.dir.path().join("export.ndjson");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["audit", "export", "--out", out.to_str().unwrap()];
    args.extend_from_slice(at);
    hie(&args)?;
    Ok(std::fs::read_to_string(&out)?.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

/// How many of `events` are the operator's successful backups.
fn backups_by_operator(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["entity"].as_array().into_iter().flatten().any(|x| x["what"]["reference"] == "GET /admin/backup"))
        .filter(|e| e["agent"][0]["who"]["identifier"]["value"] == "X26OPS" && e["outcome"] == "0")
        .filter(|e| e["purposeOfEvent"][0]["coding"][0]["code"] == "HOPERAT")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_streamed_sealed_private_audited_and_restores_into_a_node_that_joins() -> anyhow::Result<()> {
    let mut c = Cluster::up(&["--patients", PATIENTS, "--sample", "nrlf"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    // Where the seeded data ends: a backup taken later must hold at least that.
    let (seeded_index, _) = c.wait_converged(&c.node_ids(), Duration::from_secs(60)).await?;
    let key = c.dir.path().join("backup.key");
    assert_eq!(mode(&key), 0o600, "the dev cluster's backup key is its owner's alone");
    let key = key.to_str().unwrap().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    // Set once the backup is taken: the entries after it (these writes,
    // those made while the backup ran, the nodes' audit anchors) stay
    // within what the leader keeps of its log after a snapshot (1,000
    // entries), so that node 4 can catch up from the backup by the log, as
    // the test asserts, however slow the machine.
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let writer = {
        let (stop, written, limit, gp, url) =
            (stop.clone(), written.clone(), limit.clone(), c.http("gp-practice-a"), c.api_url(leader));
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && written.load(Ordering::Relaxed) < limit.load(Ordering::Relaxed) {
                let r =
                    create_pointer(&gp, &url, &pointer_body(&nhs(300_000 + i), "A81001", &format!("backup-{i}"))).await;
                if matches!(r, Ok(ref r) if r.status == 201) {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Node 2's resident memory, sampled while it sends the backup.
    let pid = c.pid(2).expect("node 2 runs");
    let rss_before = rss_bytes(pid).expect("node 2's memory");
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_bytes(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let backup = c.dir.path().join("node-2.backup");
    let b = backup.to_str().unwrap().to_owned();
    let cluster_json = c.cluster_json();
    let out = tokio::task::spawn_blocking(move || {
        hie(&["cluster", "backup", "--out", &b, "--key-file", &key, "--node", "2", "--cluster", &cluster_json])
    })
    .await??;
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let key = c.dir.path().join("backup.key").to_str().unwrap().to_owned();
    assert!(out.starts_with("backup of node-2 "), "{out}");
    let at_backup = written.load(Ordering::Relaxed);
    limit.store(at_backup + 200, Ordering::Relaxed);

    // The file: its owner's alone, nothing left beside it.
    assert_eq!(mode(&backup), 0o600, "{out}");
    assert!(!c.dir.path().join("node-2.backup.partial").exists());
    let file_bytes = std::fs::metadata(&backup)?.len();
    let state_bytes = number_after(&out, "state").expect("state bytes in the output");
    let audit_segments = number_after(&out, "bytes,").expect("audit segments in the output");
    let audit_bytes = number_after(&out, "audit segments (").expect("audit bytes in the output");
    assert!(audit_segments >= 1 && audit_bytes > 0, "the node's audit segments are in the backup: {out}");
    assert!(file_bytes > state_bytes + audit_bytes, "{out}");

    // The node streamed it: its memory grew by far less than the backup.
    let growth = peak.load(Ordering::Relaxed).saturating_sub(rss_before);
    eprint!("{out}");
    eprintln!(
        "backup of {} MiB ({} MiB state, {} MiB audit in {audit_segments} segments): node 2 RSS {} MiB before, +{:.1} MiB at most while sending",
        file_bytes >> 20,
        state_bytes >> 20,
        audit_bytes >> 20,
        rss_before >> 20,
        growth as f64 / f64::from(1 << 20)
    );
    assert!(
        file_bytes > 2 * RSS_GROWTH_MAX_BYTES,
        "the backup ({file_bytes} bytes) must dwarf the bound for the check to mean anything"
    );
    assert!(growth < RSS_GROWTH_MAX_BYTES, "node 2's memory grew by {growth} bytes while it sent the backup");

    // Taking it is an operator action in node 2's audit log.
    let config2 = c.dir.path().join("node-2.toml").to_str().unwrap().to_owned();
    assert_eq!(backups_by_operator(&export(&c, &["--config", &config2])?), 1, "one backup by the operator, audited");

    // A changed byte, another key, a file cut short: each refused, saying
    // why, and the new node's data directory is left as it was.
    let sealed = std::fs::read(&backup)?;
    let copy = |name: &str, bytes: &[u8]| {
        let p = c.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    // A byte inside the ciphertext of a chunk half way through (a file
    // header of 48 bytes, then chunks of a 4-byte length, 1 MiB and a tag).
    let mut tampered = sealed.clone();
    let chunk_bytes = 4 + (1 << 20) + 16;
    tampered[48 + (sealed.len() - 48) / chunk_bytes / 2 * chunk_bytes + 4 + 500] ^= 0x01;
    let tampered = copy("tampered.backup", &tampered);
    let cut = copy("cut.backup", &sealed[..sealed.len() * 2 / 3]);
    let other_key = c.dir.path().join("other.key").to_str().unwrap().to_owned();
    let made = hie(&["cluster", "backup-key", "--out", &other_key])?;
    assert!(made.contains("mode 0600") && mode(Path::new(&other_key)) == 0o600, "{made}");
    let dir = c.dir_str();
    for (from, key, why) in [
        (&tampered, &key, "does not authenticate under this key"),
        (&cut, &key, "cut short"),
        (&b_str(&backup), &other_key, "sealed with another key"),
    ] {
        let refused = hie(&[
            "dev",
            "add-node",
            "--dir",
            &dir,
            "--region",
            "south-west",
            "--restore-from",
            from,
            "--key-file",
            key,
        ])
        .expect_err("refused");
        assert!(format!("{refused:#}").contains(why), "{from}: wanted {why:?}: {refused:#}");
    }

    let out = hie(&["dev", "add-node", "--dir", &dir, "--region", "south-west", "--restore-from", &b_str(&backup)])?;
    c.reload();
    let restored_index =
        number_after(&out, "at log index ").unwrap_or_else(|| panic!("restore reported its index: {out}"));
    assert!(restored_index >= seeded_index, "the backup holds the seeded data (to index {seeded_index}): {out}");
    // Node 2's audit segments, beside node 4's own log: intact, with the
    // backup's own record (fsynced before the node sent the first byte).
    let trail = c.data_dir(4).join("backup-audit/node-2");
    let trail = trail.to_str().unwrap();
    let verified = hie(&["audit", "verify", "--dir", trail])?;
    assert!(verified.contains("audit chain intact"), "{verified}");
    let records = number_after(&verified, "intact:").unwrap_or(0);
    assert!(records > 1000, "node 2 recorded the seeding it served: {verified}");
    assert_eq!(backups_by_operator(&export(&c, &["--dir", trail])?), 1, "the backup's own record is in it");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    assert!(written.load(Ordering::Relaxed) > at_backup, "writes went on after the backup");

    let (applied, digest) = c.wait_converged(&c.node_ids(), Duration::from_secs(60)).await?;
    assert!(applied > restored_index);
    eprintln!("restored at index {restored_index}; all 4 nodes converged at {applied} ({digest})");
    // It started from the backup: the leader never had to send it a snapshot.
    let log = std::fs::read_to_string(c.data_dir(4).join("hie.log"))?;
    assert!(!log.contains("installed snapshot"), "node 4 caught up from the backup, not a snapshot");
    // `hie node restore` on its own: into a new data directory, then
    // refused there, since it now holds a node's state.
    let node4 = std::fs::read_to_string(c.dir.path().join("node-4.toml"))?;
    let again = c.dir.path().join("restored-again");
    let config = c.dir.path().join("restored-again.toml");
    std::fs::write(&config, node4.replace(&b_str(&c.data_dir(4)), &b_str(&again)))?;
    let args = ["node", "restore", "--config", config.to_str().unwrap(), "--from", &b_str(&backup), "--key-file", &key];
    let out = hie(&args)?;
    assert_eq!(number_after(&out, "at log index "), Some(restored_index), "{out}");
    assert!(again.join("backup-audit/node-2").is_dir(), "{out}");
    let refused = hie(&args).expect_err("refused");
    assert!(format!("{refused:#}").contains("already holds a node's state"), "{refused:#}");
    Ok(())
}

fn b_str(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}
