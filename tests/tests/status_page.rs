//! The status page on the admin listener, in headless Chromium: it shows the
//! leader and every region, and a killed node as down. Takes a screenshot.

use std::process::Command;
use std::time::Duration;

use hie_tests::*;

fn chromium(user_data: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new("which").arg(b).output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| anyhow::anyhow!("chromium missing: tests/run.sh installs Debian's chromium"))?;
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=6000",
            "--window-size=1300,600",
        ])
        .arg(format!("--user-data-dir={}", user_data.display()))
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `data-*` attributes of the row for node `id` in the dumped DOM.
fn row(dom: &str, id: u64) -> &str {
    let start = dom.find(&format!("<tr data-node=\"{id}\"")).unwrap_or_else(|| panic!("no row for node {id}:\n{dom}"));
    &dom[start..start + dom[start..].find('>').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_leader_every_region_and_a_dead_node() -> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "20"])?;
    let leader = c.wait_leader(Duration::from_secs(10)).await?;
    let victim = c.node_ids().into_iter().find(|id| *id != leader).unwrap();
    let watcher = c.node_ids().into_iter().find(|id| *id != leader && *id != victim).unwrap();
    let user_data = c.dir.path().join("chromium");
    let page = format!("{}/", c.admin_url(watcher));

    let dom = chromium(&user_data, &["--dump-dom", &page])?;
    assert!(dom.contains(&format!("leader: node {leader}")), "{dom}");
    for id in c.node_ids() {
        let r = row(&dom, id);
        assert!(r.contains(&format!("data-region=\"{}\"", c.node(id)["region"].as_str().unwrap())), "{r}");
        let expected = if id == leader { "leader" } else { "follower" };
        assert!(r.contains(&format!("data-state=\"{expected}\"")), "node {id}: {r}");
    }

    c.kill9(victim);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shot = c.dir.path().join("status.png");
    chromium(&user_data, &[&format!("--screenshot={}", shot.display()), &page])?;
    let dom = chromium(&user_data, &["--dump-dom", &page])?;
    assert!(row(&dom, victim).contains("data-state=\"down\""), "{dom}");
    assert!(row(&dom, leader).contains("data-state=\"leader\""), "{dom}");
    assert!(dom.contains("2 of 3 nodes up"), "{dom}");
    let png = std::fs::read(&shot)?;
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    if let Ok(dir) = std::env::var("HIE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png"))?;
    }
    Ok(())
}
