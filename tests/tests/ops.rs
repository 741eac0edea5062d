//! Operations material checked against live nodes: every node's metrics pass
//! `promtool check metrics`, the alert rules pass their unit tests, the
//! Prometheus config is valid, and every metric the Grafana dashboard
//! queries is one a node really exports.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use hie_tests::*;

fn ops(path: &str) -> String {
    manifest_dir().join("../ops").join(path).display().to_string()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool (Debian package prometheus; tests/run.sh installs it): {e}"))?;
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "promtool {}: {text}", args.join(" "));
    Ok(text)
}

/// Metric family names in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `hie_*` names in every `expr` of a Grafana dashboard.
fn dashboard_metrics(dashboard: &serde_json::Value) -> (usize, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut panels = 0;
    for p in dashboard["panels"].as_array().unwrap() {
        panels += 1;
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("hie_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    (panels, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_alerts_and_dashboard_agree_with_live_nodes() -> anyhow::Result<()> {
    promtool(&["test", "rules", &ops("prometheus/alerts_test.yml")], None)?;
    promtool(&["check", "config", "--syntax-only", &ops("prometheus/prometheus.yml")], None)?;

    let c = Cluster::up(&["--patients", "20"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    // Traffic that makes every labelled series appear: writes through a
    // follower (forwarded), reads, a rejection.
    let follower = c.node_ids().into_iter().find(|id| *id != leader).unwrap();
    let gp = c.http("gp-practice-a");
    for i in 0..5 {
        create_pointer(&gp, &c.api_url(follower), &pointer_body(&nhs(900 + i), "A81001", &format!("ops-{i}"))).await?;
    }
    let consumer = c.http("ambulance-service");
    search(&consumer, &c.api_url(follower), &nhs(1), &[]).await?;
    let r = search(&consumer, &c.api_url(leader), "1234567890", &[]).await?;
    assert_eq!(r.status, 400);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut all = BTreeSet::new();
    for id in c.node_ids() {
        let text = c.metrics(id).await.expect("metrics answer");
        promtool(&["check", "metrics"], Some(&text))?;
        all.extend(exported(&text));
    }
    for required in [
        "hie_raft_term",
        "hie_raft_leader_id",
        "hie_raft_last_log_index",
        "hie_raft_applied_index",
        "hie_raft_replication_lag_entries",
        "hie_api_requests_total",
        "hie_api_request_duration_seconds",
        "hie_pointers",
        "hie_patients",
        "hie_p2p_connected_peers",
        "hie_audit_events_total",
        "hie_rocksdb_size_bytes",
    ] {
        assert!(all.contains(required), "DESIGN.md requires {required}");
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ops("grafana/hie-dashboard.json"))?)?;
    let (panels, queried) = dashboard_metrics(&dashboard);
    assert!(panels >= 10, "the dashboard has {panels} panels");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| m.strip_suffix(s)).unwrap_or(m);
            !all.contains(m.as_str()) && !all.contains(base)
        })
        .collect();
    assert!(missing.is_empty(), "the dashboard queries metrics no node exports: {missing:?}");

    // The dev cluster writes Prometheus targets for every node.
    let targets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.path().join("prometheus-targets.json"))?)?;
    assert_eq!(targets.as_array().unwrap().len(), c.node_ids().len());
    Ok(())
}
