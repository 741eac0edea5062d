//! A sandbox for tests that run real `hie` node processes: starts a dev
//! cluster in a temporary directory with `hie dev up`, talks to it over
//! HTTPS with the generated client certificates, kills and restarts nodes by
//! pid, and stops everything it started when dropped.

pub use hie_api::receiver;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The `hie` binary built beside this test.
pub fn hie_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HIE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/hie
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("hie");
    assert!(bin.exists(), "{} not found: build the workspace first (cargo build)", bin.display());
    bin
}

pub fn hie(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(hie_bin()).args(args).output().context("running hie")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("hie {} failed: {}\n{}", args.join(" "), stdout, String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

/// This package's directory, read at run time (nextest and cargo set it), so
/// a test binary built from another checkout sharing the target directory
/// still reads this checkout's files.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub file: Value,
}

/// A reply: status, headers, JSON body.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The `id` of the resource in the body (a create's answer).
    pub fn body_id(&self) -> String {
        self.body["id"].as_str().unwrap_or_default().to_owned()
    }
    pub fn code(&self) -> &str {
        self.body.pointer("/issue/0/details/coding/0/code").and_then(Value::as_str).unwrap_or("")
    }
}

impl Cluster {
    /// `hie dev up` in a new temporary directory.
    pub fn up(extra: &[&str]) -> anyhow::Result<Cluster> {
        // Every HTTP client in a test (TLS or not) uses the ring provider.
        hie_pki::install_default_provider();
        let dir = tempfile::Builder::new().prefix("hie-test-").tempdir()?;
        let d = dir.path().display().to_string();
        let mut args = vec!["dev", "up", "--dir", &d];
        args.extend_from_slice(extra);
        let cluster = Cluster { file: Value::Null, dir };
        let mut cluster = cluster;
        match hie(&args) {
            Ok(_) => {}
            Err(e) => {
                cluster.reload();
                return Err(e.context(cluster.logs_tail(40)));
            }
        }
        cluster.reload();
        Ok(cluster)
    }

    pub fn reload(&mut self) {
        if let Ok(text) = std::fs::read_to_string(self.dir.path().join("cluster.json")) {
            self.file = serde_json::from_str(&text).unwrap_or(Value::Null);
        }
    }

    pub fn dir_str(&self) -> String {
        self.dir.path().display().to_string()
    }

    pub fn cluster_json(&self) -> String {
        self.dir.path().join("cluster.json").display().to_string()
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.file["nodes"].as_array().into_iter().flatten().filter_map(|n| n["id"].as_u64()).collect()
    }

    pub fn node(&self, id: u64) -> &Value {
        self.file["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .expect("node in cluster.json")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        PathBuf::from(self.node(id)["data_dir"].as_str().unwrap())
    }

    /// The live pid of a node, from its pid file.
    pub fn pid(&self, id: u64) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir(id).join("hie.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        kill(Pid::from_raw(pid), None).ok().map(|_| pid)
    }

    pub fn signal(&self, id: u64, sig: Signal) {
        if let Some(pid) = self.pid(id) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// SIGKILL a node and wait until it is gone.
    pub fn kill9(&self, id: u64) {
        if let Some(pid) = self.pid(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
                // Reap it if it is our child; otherwise its parent (hie dev) is gone and init reaps it.
                std::thread::sleep(Duration::from_millis(20));
                if std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(false) {
                    break;
                }
            }
        }
    }

    /// Runs the node's `command` from cluster.json again, on the same data.
    pub fn restart(&self, id: u64) -> anyhow::Result<()> {
        self.restart_with(id, &[], &self.data_dir(id).join("hie.log"))
    }

    /// Restarts a node with `wrapper` put before the node binary (after
    /// `ip netns exec NS` for a node in a namespace), logging to `log`. The
    /// child is reaped when it exits: a zombie still answers kill(pid, 0),
    /// and a dead node would look alive.
    pub fn restart_with(&self, id: u64, wrapper: &[String], log: &Path) -> anyhow::Result<()> {
        let mut cmd: Vec<String> =
            self.node(id)["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        let at = if cmd.first().map(String::as_str) == Some("ip") { 4 } else { 0 };
        cmd.splice(at..at, wrapper.iter().cloned());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .spawn()?;
        std::thread::spawn(move || child.wait());
        Ok(())
    }

    pub fn client_entry(&self, name: &str) -> &Value {
        self.file["clients"].as_array().unwrap().iter().find(|c| c["name"] == name).expect("client in cluster.json")
    }

    /// An HTTPS client acting as a client of cluster.json.
    pub fn http(&self, client: &str) -> reqwest::Client {
        let c = self.client_entry(client);
        https_client(
            Path::new(self.file["ca_cert"].as_str().unwrap()),
            Some((Path::new(c["cert"].as_str().unwrap()), Path::new(c["key"].as_str().unwrap()))),
        )
    }

    pub fn api_url(&self, id: u64) -> String {
        self.node(id)["api_url"].as_str().unwrap().to_owned()
    }

    pub fn admin_url(&self, id: u64) -> String {
        self.node(id)["admin_url"].as_str().unwrap().to_owned()
    }

    /// GET on a node's admin listener; None if it does not answer.
    pub async fn admin(&self, id: u64, path: &str) -> Option<Value> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
        let r = http.get(format!("{}{path}", self.admin_url(id))).send().await.ok()?;
        r.json().await.ok()
    }

    pub async fn metrics(&self, id: u64) -> Option<String> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
        http.get(format!("{}/metrics", self.admin_url(id))).send().await.ok()?.text().await.ok()
    }

    /// The leader as seen by any live node (agreed by the nodes that answer).
    pub async fn leader(&self) -> Option<u64> {
        for id in self.node_ids() {
            if self.pid(id).is_none() {
                continue;
            }
            if let Some(s) = self.admin(id, "/status").await
                && let Some(l) = s["leader_id"].as_u64()
                && self.pid(l).is_some()
            {
                return Some(l);
            }
        }
        None
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every listed node answers the same applied index and digest.
    pub async fn wait_converged(&self, ids: &[u64], timeout: Duration) -> anyhow::Result<(u64, String)> {
        let deadline = Instant::now() + timeout;
        let mut last = vec![];
        loop {
            let mut digests = vec![];
            for &id in ids {
                digests.push(self.admin(id, "/digest").await.map(|d| {
                    (d["applied_index"].as_u64().unwrap_or(0), d["digest"].as_str().unwrap_or("").to_owned())
                }));
            }
            if let Some(Some(first)) = digests.first()
                && digests.iter().all(|d| d.as_ref() == Some(first))
            {
                return Ok(first.clone());
            }
            last = digests;
            if Instant::now() > deadline {
                bail!("replicas did not converge within {timeout:?}: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of every node's log (for failure messages).
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for id in self.node_ids() {
            let text = std::fs::read_to_string(self.data_dir(id).join("hie.log")).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node {id} ---\n{}\n", all[all.len().saturating_sub(lines)..].join("\n")));
        }
        out
    }

    /// Every node's whole log.
    pub fn all_logs(&self) -> String {
        self.node_ids()
            .iter()
            .map(|id| std::fs::read_to_string(self.data_dir(*id).join("hie.log")).unwrap_or_default())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let d = self.dir_str();
        let _ = hie(&["dev", "down", "--dir", &d]);
        for id in self.node_ids() {
            if let Some(pid) = self.pid(id) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Every cluster of the suite is checked as it ends: no node may
        // have logged a patient's NHS Number in clear.
        if !std::thread::panicking() {
            let found: Vec<String> = self
                .node_ids()
                .iter()
                .flat_map(|id| {
                    let text = std::fs::read_to_string(self.data_dir(*id).join("hie.log")).unwrap_or_default();
                    nhs_numbers_in(&text).into_iter().map(move |(line, n)| format!("node {id} log line {line}: {n}"))
                })
                .collect();
            if !found.is_empty() {
                let path = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
                panic!(
                    "NHS Numbers in clear in node logs (kept in {}):\n{}",
                    path.display(),
                    found.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
                );
            }
        }
        if std::env::var("HIE_KEEP_TEST_DIRS").is_ok() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept {}", path.display());
        }
    }
}

/// Test NHS Numbers the suite and the sample data use.
fn test_nhs_numbers() -> &'static std::collections::HashSet<String> {
    static SET: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let mut set: std::collections::HashSet<String> = (0..200_000).map(nhs).collect();
        set.extend(["9434765919".to_owned(), "9434765918".to_owned()]);
        set
    })
}

/// (line number, number) of every test NHS Number standing alone (not part
/// of a longer run of digits) in a text.
pub fn nhs_numbers_in(text: &str) -> Vec<(usize, String)> {
    let set = test_nhs_numbers();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let mut j = 0;
        while j < b.len() {
            if b[j].is_ascii_digit() {
                let start = j;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                if j - start == 10 && set.contains(&line[start..j]) {
                    out.push((i + 1, line[start..j].to_owned()));
                }
            } else {
                j += 1;
            }
        }
    }
    out
}

pub fn https_client(ca: &Path, cert: Option<(&Path, &Path)>) -> reqwest::Client {
    hie_pki::install_default_provider();
    let tls = hie_pki::client_config(ca, cert).expect("client tls config");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client")
}

pub async fn reply(r: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    Ok(Reply { status, headers, body })
}

pub const NHS_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// The i-th test NHS Number (begins with 9), the same as the node's sample data uses.
/// The members of a node's admin `/status` answer: (id, voter).
pub fn members(status: &Value) -> Vec<(u64, bool)> {
    status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["id"].as_u64()?, m["voter"].as_bool()?)))
        .collect()
}

pub fn nhs(i: u32) -> String {
    hie_domain::mem::testkit::nhs(i).as_str().to_owned()
}

/// A DocumentReference body for a producer.
pub fn pointer_body(nhs: &str, ods: &str, master: &str) -> Value {
    json!({
        "resourceType": "DocumentReference",
        "status": "current",
        "masterIdentifier": { "system": "urn:ietf:rfc:3986", "value": master },
        "type": { "coding": [{ "system": "http://snomed.info/sct", "code": "736253002", "display": "Mental health crisis plan" }] },
        "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "734163000", "display": "Care plan" }] }],
        "subject": { "identifier": { "system": NHS_SYSTEM, "value": nhs } },
        "author": [{ "identifier": { "system": ODS_SYSTEM, "value": ods } }],
        "custodian": { "identifier": { "system": ODS_SYSTEM, "value": ods } },
        "content": [{ "attachment": { "contentType": "application/pdf", "url": format!("https://{}.example.nhs.uk/r/{master}", ods.to_lowercase()) } }]
    })
}

/// POST a pointer as the given client to a node. Ok(id) when created.
pub async fn create_pointer(http: &reqwest::Client, api_url: &str, body: &Value) -> anyhow::Result<Reply> {
    reply(http.post(format!("{api_url}/DocumentReference")).header("content-type", "application/fhir+json").json(body))
        .await
}

pub async fn search(
    http: &reqwest::Client,
    api_url: &str,
    nhs: &str,
    extra_headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut r = http
        .get(format!("{api_url}/DocumentReference"))
        .query(&[("subject:identifier", format!("{NHS_SYSTEM}|{nhs}"))]);
    for (k, v) in extra_headers {
        r = r.header(*k, *v);
    }
    reply(r).await
}
