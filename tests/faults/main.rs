//! `hie-faults`: Jepsen-style tests of real node processes. Each node runs in
//! its own network namespace (tests/faults/run.sh makes them); concurrent
//! clients create, delete and read pointers through the API while faults are
//! injected on a seeded schedule, and an identity authority merges patients
//! in pairs; every operation's invoke and completion times are recorded and
//! the history is checked: linearizable per pair of patients,
//! no acknowledged write lost, nothing seen that later disappears, every
//! replica converged to one state digest after healing, and every node's
//! audit chain verifies and holds the record of each create it acknowledged.
//!
//! Each node's data lives on its own small ext4 disk image on the machine's
//! disk, seen through `hie-powercut-fs` (tests/powercut) where the machine
//! has FUSE: a power cut kills the node and drops every write and directory
//! entry it had not fsynced, as a machine losing power would.

mod lin;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hie_tests::{Cluster, NHS_SYSTEM, create_pointer, nhs, pointer_body, reply};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use lin::{Kind, Op, Side, Verdict};

const USAGE: &str = "usage: hie-faults --netns PREFIX --seconds N [--seed S] [--nodes 3|5] [--clients C] [--patients P] [--unsafe-local-reads] [--only KIND] [--power-cuts-one-node] [--no-membership-changes]";
/// The subnet run.sh gives the namespaces; node N is .N.
const SUBNET: &str = "10.77.0";
/// How long one client request may take before its outcome counts as unknown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the cluster has to converge once every fault is healed.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Log entries each node keeps behind a snapshot in these runs (the
/// default is 1,000): small, so that a node killed or cut off for a few
/// seconds catches up by snapshot install.
const LOGS_KEPT: u64 = 100;
/// Entries between snapshots in these runs (`hie dev up --snapshot-logs-since-last`).
const SNAPSHOT_EVERY: &str = "300";
/// A patient with this many pointers gets deletes rather than creates.
const POINTERS_PER_PATIENT_MAX: usize = 30;
/// Each client pauses this long (ms, uniform) between operations.
const CLIENT_PAUSE_MS: std::ops::Range<u64> = 5..40;
/// Where each node's log is copied at the end of a run.
const LOGS_DIR: &str = "/tmp/hie-faults-logs";
const PRODUCER: &str = "gp-practice-a";
const PRODUCER_ODS: &str = "A81001";
const CONSUMER: &str = "ambulance-service";
/// The dev cluster's identity authority, which may merge NHS Numbers.
const IDENTITY_AUTHORITY: &str = "demographics-feed";
/// Concurrent clients, and patients they share (in pairs), by default: at
/// 16 clients a 120 s run acknowledges over 100 writes a second (13,907 in
/// 120 s, seed 2), spread over enough patients that each pair's history
/// stays small enough to decide.
const CLIENTS: u32 = 16;
const PATIENTS: u32 = 96;
/// The dev cluster's operator client (membership changes).
const OPERATOR: &str = "operator";
/// The first patient's index in `nhs()`.
const FIRST_PATIENT: u32 = 900_000;
/// Percent of a client's operations that merge its patient's pair, once the
/// pair's merge time has come: before any merge of it is acknowledged, and
/// after (a repeat, which must change nothing).
const MERGE_PERCENT: u32 = 3;
const MERGE_AGAIN_PERCENT: u32 = 1;

/// Patients come in pairs, the first of each the survivor and the second
/// the number merged into it: the pair's key (the survivor) and the side.
fn pair_of(patient: u32) -> (u32, Side) {
    let i = patient - FIRST_PATIENT;
    (FIRST_PATIENT + (i & !1), if i.is_multiple_of(2) { Side::Survivor } else { Side::Retired })
}

struct Args {
    netns: String,
    seconds: u64,
    seed: u64,
    nodes: u64,
    clients: u32,
    patients: u32,
    /// Self-test of the checker: read locally but check those reads as if
    /// they were linearizable. Stale follower reads must then be caught.
    unsafe_local_reads: bool,
    /// Only faults whose name starts with this (for chasing one kind).
    only: Option<String>,
    /// Power cuts hit one node at a time, never every node at once (the
    /// CI run: see docs/RELIABILITY.md, "Power cuts", for why).
    power_cuts_one_node: bool,
    /// No membership changes beside the faults (`churn_membership`).
    no_membership_changes: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        netns: String::new(),
        seconds: 60,
        seed: 0,
        nodes: 3,
        clients: CLIENTS,
        patients: PATIENTS,
        unsafe_local_reads: false,
        only: None,
        power_cuts_one_node: false,
        no_membership_changes: false,
    };
    let mut seed = None;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--unsafe-local-reads" {
            a.unsafe_local_reads = true;
            continue;
        }
        if k == "--power-cuts-one-node" {
            a.power_cuts_one_node = true;
            continue;
        }
        if k == "--no-membership-changes" {
            a.no_membership_changes = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--netns" => a.netns = v,
            "--seconds" => a.seconds = v.parse()?,
            "--seed" => seed = Some(v.parse()?),
            "--nodes" => a.nodes = v.parse()?,
            "--clients" => a.clients = v.parse()?,
            "--patients" => a.patients = v.parse()?,
            "--only" => a.only = Some(v),
            _ => bail!("unknown argument {k}\n{USAGE}"),
        }
    }
    if a.netns.is_empty() {
        bail!("--netns is required (run tests/faults/run.sh)\n{USAGE}");
    }
    a.seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    Ok(a)
}

fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The faults the schedule draws from.
#[derive(Debug, Clone)]
enum Fault {
    Kill(u64),
    KillLeader,
    Pause(u64),
    /// One node cut off from all others.
    Isolate(u64),
    /// Two groups that cannot reach each other.
    Split(Vec<u64>),
    /// a and b cannot reach each other; both still reach the rest.
    Bridge(u64, u64),
    /// a's packets to b are dropped; b's to a still arrive.
    OneWay(u64, u64),
    /// Every node drops this percent of packets from the others.
    Loss(u32),
    /// The node's packets to its peers wait this many ms (an iptables NFQUEUE
    /// rule feeding a userspace delayer, tests/faults/nfq_delay.py: this
    /// kernel has no netem, and nft's own `queue` expression is refused).
    Delay(u64, u64),
    /// The node's data filesystem is full.
    DiskFull(u64),
    /// Every fsync and fdatasync of the running node fails (libfiu's
    /// failpoints, switched on and off through its remote control).
    FsyncErrors(u64),
    /// The node restarts with its wall clock this many seconds off (libfaketime).
    ClockSkew(u64, i64),
    /// These nodes lose power: each is killed and its disk loses every
    /// write, and every directory entry, not fsynced since it was made
    /// (`hie-powercut-fs`, tests/powercut). One node, or all at once.
    PowerCut(Vec<u64>),
    /// The node is killed and a bit flipped in the middle of its current
    /// snapshot file; it restarts on heal and must set the file aside and
    /// build another (docs/RELIABILITY.md, "Corruption").
    DamagedSnapshot(u64),
}

struct Faults {
    cluster: Arc<Cluster>,
    netns: String,
    nodes: u64,
    /// The nodes this fault stopped or restarted under a wrapper.
    killed: BTreeSet<u64>,
    paused: BTreeSet<u64>,
    wrapped: BTreeSet<u64>,
    filled: BTreeSet<u64>,
    /// The nodes whose fsyncs are failing.
    fsync_failing: BTreeSet<u64>,
    /// Running packet delayers.
    delayers: Vec<std::process::Child>,
    /// Each node's disk: a loop-mounted ext4 image, with the power-cut
    /// filesystem over it where the machine has FUSE.
    disks: BTreeMap<u64, Disk>,
    /// Snapshot files this run damaged.
    snapshots_damaged: u64,
}

/// Size of each node's data filesystem (the disk-full fault fills it).
const DISK_BYTES: &str = "256M";
/// Where the disk images and their mount points live (a real disk, not tmpfs).
const DISKS_DIR: &str = "/var/tmp/hie-faults";
/// How long the power-cut filesystem may take to mount, or to roll back and exit.
const POWERCUT_FS_TIMEOUT: Duration = Duration::from_secs(30);

/// One node's disk: `image` loop-mounted at `lower`; the node's data
/// directory is `lower/root` seen through `hie-powercut-fs` (`fs`), or the
/// loop mount itself where there is no FUSE.
struct Disk {
    image: PathBuf,
    lower: PathBuf,
    fs: Option<std::process::Child>,
}

/// True if this machine can run the power-cut filesystem.
fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
}

/// Mounts the power-cut filesystem of `lower/root` at `dir`; waits for it to say it is ready.
fn mount_powercut_fs(lower: &Path, dir: &Path) -> anyhow::Result<std::process::Child> {
    use std::io::BufRead;
    let mut child = Command::new("hie-powercut-fs")
        .arg(lower)
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting hie-powercut-fs")?;
    let stdout = child.stdout.take().context("hie-powercut-fs stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.display().to_string();
    std::thread::spawn(move || {
        let mut ready = Some(tx);
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("ready") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            } else {
                println!("faults: {dir}: {line}");
            }
        }
    });
    rx.recv_timeout(POWERCUT_FS_TIMEOUT).context("hie-powercut-fs did not become ready")?;
    Ok(child)
}

/// Waits for a child to exit, within `timeout`; kills it past that.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Python with NetfilterQueue that run.sh prepares, and the delayer.
const DELAYER_PYTHON_ENV: &str = "HIE_FAULTS_PYTHON";
const DELAYER: &str = "tests/faults/nfq_delay.py";
/// libfiu's remote-control FIFOs are `FIU_CTRL-<pid>.in` and `.out`.
const FIU_CTRL: &str = "/tmp/hie-faults-fiu";
/// The failpoints of fsync and fdatasync in libfiu's POSIX preload.
const FSYNC_FAILPOINTS: &str = "posix/io/sync/*";

impl Faults {
    fn ns(&self, id: u64) -> String {
        format!("{}{id}", self.netns)
    }

    fn nft(&self, id: u64, rules: &str) -> anyhow::Result<()> {
        let ns = self.ns(id);
        sh(&format!("ip netns exec {ns} nft -f - <<'EOF'\n{rules}\nEOF"))?;
        Ok(())
    }

    fn drop_between(&self, a: u64, b: u64, both_ways: bool) -> anyhow::Result<()> {
        self.nft(a, &format!("add rule inet hiefault output ip daddr {SUBNET}.{b} drop"))?;
        if both_ways {
            self.nft(a, &format!("add rule inet hiefault input ip saddr {SUBNET}.{b} drop"))?;
        }
        Ok(())
    }

    /// Sends a libfiu remote-control command to the running node. A node that
    /// is down or stopped (SIGSTOP) cannot answer: bounded by `timeout`.
    fn fiu_ctrl(&self, id: u64, command: &str) -> anyhow::Result<()> {
        let pid = self.cluster.pid(id).with_context(|| format!("node {id} is down"))?;
        sh(&format!("timeout 5 fiu-ctrl -f {FIU_CTRL} -c '{command}' {pid}"))?;
        Ok(())
    }

    /// Restarts a node, its command wrapped after `ip netns exec NS`. With
    /// no wrapper, the node runs under `fiu-run -x`: libfiu's POSIX
    /// failpoints are loaded (all off) and its remote control listens, so
    /// fsync errors can be switched on in the running process.
    fn start_wrapped(&self, id: u64, wrapper: &[String]) -> anyhow::Result<()> {
        let old = self.cluster.pid(id);
        let fiu = [String::from("fiu-run"), String::from("-x"), String::from("-f"), String::from(FIU_CTRL)];
        let wrapper = if wrapper.is_empty() { &fiu[..] } else { wrapper };
        // Logs go to the root filesystem, not the node's own (small) disk, so
        // a full disk does not cost the log of what happened while full.
        std::fs::create_dir_all(LOGS_DIR)?;
        self.cluster.restart_with(id, wrapper, Path::new(&format!("{LOGS_DIR}/node-{id}.log")))?;
        // Wait for the new pid file (a node that cannot start is left down
        // and counted when the cluster fails to converge).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(p) = self.cluster.pid(id)
                && Some(p) != old
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The node's disk loses power: its filesystem (the node already
    /// killed) rolls back everything not fsynced, and is mounted again.
    fn power_cut(&mut self, id: u64) -> anyhow::Result<()> {
        let dir = self.cluster.data_dir(id);
        let disk = self.disks.get_mut(&id).context("no disk")?;
        let mut fs = disk.fs.take().context("no power-cut filesystem on this node")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(fs.id() as i32), Signal::SIGUSR1)?;
        let status = wait_exit(&mut fs, POWERCUT_FS_TIMEOUT).context("hie-powercut-fs power cut")?;
        if !status.success() {
            bail!("hie-powercut-fs for node {id} failed its power cut: {status}");
        }
        disk.fs = Some(mount_powercut_fs(&disk.lower, &dir)?);
        Ok(())
    }

    fn kill(&mut self, id: u64) {
        self.cluster.kill9(id);
        self.killed.insert(id);
    }

    fn inject(&mut self, fault: &Fault, leader: Option<u64>) -> anyhow::Result<()> {
        match fault {
            Fault::Kill(id) => self.kill(*id),
            Fault::KillLeader => {
                if let Some(l) = leader {
                    self.kill(l)
                }
            }
            Fault::Pause(id) => {
                self.cluster.signal(*id, Signal::SIGSTOP);
                self.paused.insert(*id);
            }
            Fault::Isolate(id) => {
                for other in (1..=self.nodes).filter(|o| o != id) {
                    self.drop_between(*id, other, true)?;
                }
            }
            Fault::Split(side) => {
                for a in side {
                    for b in (1..=self.nodes).filter(|b| !side.contains(b)) {
                        self.drop_between(*a, b, true)?;
                    }
                }
            }
            Fault::Bridge(a, b) => self.drop_between(*a, *b, true)?,
            Fault::OneWay(a, b) => self.drop_between(*a, *b, false)?,
            Fault::Loss(p) => {
                for id in 1..=self.nodes {
                    self.nft(
                        id,
                        &format!("add rule inet hiefault input ip saddr {SUBNET}.0/24 ip saddr != {SUBNET}.254 numgen random mod 100 < {p} drop"),
                    )?;
                }
            }
            Fault::Delay(id, ms) => {
                let python = std::env::var(DELAYER_PYTHON_ENV).context("no delayer python (run.sh sets it)")?;
                let queue = 70 + id;
                let child = Command::new("ip")
                    .args(["netns", "exec", &self.ns(*id), &python, DELAYER, &queue.to_string(), &ms.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?;
                self.delayers.push(child);
                std::thread::sleep(Duration::from_millis(300));
                // iptables (nft's compat layer), not an nft `queue` rule:
                // this kernel refuses the latter. `--queue-bypass`: if the
                // delayer is gone, packets pass undelayed.
                for peer in (1..=self.nodes).filter(|p| p != id) {
                    sh(&format!(
                        "ip netns exec {} iptables -A OUTPUT -d {SUBNET}.{peer} -j NFQUEUE --queue-num {queue} --queue-bypass",
                        self.ns(*id)
                    ))?;
                }
            }
            Fault::DiskFull(id) => {
                let dir = self.cluster.data_dir(*id);
                // Fill what is left; dd stops at ENOSPC.
                let _ = sh(&format!("dd if=/dev/zero of={}/filler bs=1M status=none 2>/dev/null; sync", dir.display()));
                self.filled.insert(*id);
            }
            Fault::FsyncErrors(id) => {
                self.fiu_ctrl(*id, &format!("enable name={FSYNC_FAILPOINTS}"))?;
                self.fsync_failing.insert(*id);
            }
            Fault::PowerCut(ids) => {
                for id in ids {
                    self.kill(*id);
                }
                for id in ids {
                    self.power_cut(*id)?;
                }
            }
            Fault::DamagedSnapshot(id) => {
                self.kill(*id);
                let snap = self.cluster.data_dir(*id).join("store/snapshots/current.snap");
                match flip_middle_bit(&snap) {
                    Ok(at) => {
                        println!("faults: node {id}: flipped a bit of {} at byte {at}", snap.display());
                        self.snapshots_damaged += 1;
                    }
                    Err(e) => println!("faults: node {id}: no snapshot file to damage ({e})"),
                }
            }
            Fault::ClockSkew(id, secs) => {
                self.cluster.kill9(*id);
                let wrapper = [
                    "env".to_owned(),
                    "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".to_owned(),
                    format!("FAKETIME={secs:+}s"),
                    "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
                ];
                self.start_wrapped(*id, &wrapper)?;
                self.wrapped.insert(*id);
            }
        }
        Ok(())
    }

    /// Undoes every fault: links, pauses, filled disks, crashed and wrapped nodes.
    fn heal(&mut self) -> anyhow::Result<()> {
        for id in 1..=self.nodes {
            self.nft(id, "flush table inet hiefault")?;
            if !self.delayers.is_empty() {
                // Evidence the delay happened: packets the rules queued.
                let rules = sh(&format!("ip netns exec {} iptables -L OUTPUT -v -n -x", self.ns(id)))?;
                let queued: u64 = rules
                    .lines()
                    .filter(|l| l.contains("NFQUEUE"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum();
                if queued > 0 {
                    println!("faults: node {id} delayed {queued} packets");
                }
            }
            sh(&format!("ip netns exec {} iptables -F OUTPUT", self.ns(id)))?;
        }
        for mut d in std::mem::take(&mut self.delayers) {
            let _ = d.kill();
            let _ = d.wait();
        }
        for id in std::mem::take(&mut self.paused) {
            self.cluster.signal(id, Signal::SIGCONT);
        }
        // The disk works again under the running process (if it survived:
        // a node whose storage fails stops, and is restarted below).
        // One that cannot be told (it hangs) is restarted, which clears it.
        for id in std::mem::take(&mut self.fsync_failing) {
            let disabled = self.cluster.pid(id).is_some()
                && self.fiu_ctrl(id, &format!("disable name={FSYNC_FAILPOINTS}")).is_ok();
            if !disabled {
                self.cluster.kill9(id);
                self.killed.insert(id);
            }
        }
        for id in std::mem::take(&mut self.filled) {
            // Removed and the removal fsynced: on the power-cut filesystem a
            // removed file's space comes back only once its removal is durable.
            let dir = self.cluster.data_dir(id);
            let _ = std::fs::remove_file(dir.join("filler"));
            let _ = std::fs::File::open(&dir).and_then(|d| d.sync_all());
        }
        for id in std::mem::take(&mut self.wrapped) {
            self.cluster.kill9(id);
            self.killed.insert(id);
        }
        for id in std::mem::take(&mut self.killed) {
            if self.cluster.pid(id).is_none() {
                self.start_wrapped(id, &[])?;
            }
        }
        // A node that died on its own (fsync errors may stop it) is restarted too.
        for id in 1..=self.nodes {
            if self.cluster.pid(id).is_none() {
                eprintln!("faults: node {id} was down without being killed; restarting it");
                self.start_wrapped(id, &[])?;
            }
        }
        Ok(())
    }
}

fn draw(rng: &mut StdRng, nodes: u64, power_cuts: bool, one_node_cuts: bool) -> Fault {
    let pick = |rng: &mut StdRng| rng.random_range(1..=nodes);
    let two = |rng: &mut StdRng| {
        let a = rng.random_range(1..=nodes);
        let b = (a + rng.random_range(1..nodes) - 1) % nodes + 1;
        (a, b)
    };
    match rng.random_range(0..if power_cuts { 15 } else { 13 }) {
        12 => Fault::DamagedSnapshot(pick(rng)),
        13 => Fault::PowerCut(vec![pick(rng)]),
        14 if one_node_cuts => Fault::PowerCut(vec![pick(rng)]),
        14 => Fault::PowerCut((1..=nodes).collect()),
        0 => Fault::Kill(pick(rng)),
        1 => Fault::KillLeader,
        2 => Fault::Pause(pick(rng)),
        3 => Fault::Isolate(pick(rng)),
        4 => {
            let mut side: Vec<u64> = (1..=nodes).filter(|_| rng.random_bool(0.5)).collect();
            if side.is_empty() {
                side.push(pick(rng));
            }
            Fault::Split(side)
        }
        5 => {
            let (a, b) = two(rng);
            Fault::Bridge(a, b)
        }
        6 => {
            let (a, b) = two(rng);
            Fault::OneWay(a, b)
        }
        7 => Fault::Loss(rng.random_range(5..40)),
        8 => Fault::DiskFull(pick(rng)),
        9 => Fault::FsyncErrors(pick(rng)),
        10 => Fault::Delay(pick(rng), rng.random_range(20..200)),
        11 => Fault::ClockSkew(pick(rng), if rng.random_bool(0.5) { 1 } else { -1 } * rng.random_range(30..600)),
        _ => unreachable!("drawn from 0..15"),
    }
}

/// One recorded client operation on a pair of patients (`pair_of`).
#[derive(Debug, Clone)]
struct Record {
    pair: u32,
    op: Op,
}

#[derive(Default)]
struct History {
    records: Vec<Record>,
    /// Pointers whose creation was acknowledged: masterIdentifier → (patient, id).
    created: BTreeMap<String, (u32, String)>,
    /// masterIdentifiers a create was attempted for.
    attempted: BTreeSet<String>,
    /// masterIdentifiers a delete was attempted for.
    delete_attempted: BTreeSet<String>,
    /// Pointers seen by reads: masterIdentifier → (patient, id).
    known: BTreeMap<String, (u32, String)>,
    /// How many pointers the last read of each patient found.
    last_count: BTreeMap<u32, usize>,
    /// masterIdentifiers seen by any read (local or linearizable).
    seen: BTreeMap<String, u32>,
    /// Local (non-linearizable) reads that returned a pointer never written.
    invented: Vec<String>,
    acknowledged: u64,
    /// Acknowledged creates' pointer ids, and the node that answered each:
    /// that node's audit log must hold the create's record.
    served: BTreeMap<String, u64>,
    /// Operations that failed to connect (`Outcome::NotSent`).
    not_sent: Vec<Record>,
    /// Pairs whose merge was acknowledged, and how many merges were.
    merged: BTreeSet<u32>,
    merges_acknowledged: u64,
}

struct Clients {
    cluster: Arc<Cluster>,
    producer: reqwest::Client,
    consumer: reqwest::Client,
    authority: reqwest::Client,
    started: Instant,
    /// When (since `started`) each pair, by key, begins to be merged:
    /// spread over the run so that pairs are merged under different faults
    /// and each has a history before and after its merge.
    merge_from: BTreeMap<u32, Duration>,
    history: Mutex<History>,
    counter: AtomicU64,
    /// Every operation a client started (reads that failed included).
    operations: AtomicU64,
    nodes: u64,
    patients: u32,
    unsafe_local_reads: bool,
    stop: AtomicBool,
}

enum Outcome<T> {
    Ok(T),
    Failed,
    /// No connection could be made, so the request cannot have reached a
    /// node. Kept aside rather than trusted blindly: if its effect shows
    /// up after all, it joins the history as an unknown operation.
    NotSent,
    Unknown,
}

/// True if a request failed before it reached a node (no connection could
/// be made: the node is down, or cut off): it cannot have taken effect.
fn never_sent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect)
}

/// The pointers of a one-page search Bundle: masterIdentifier → id.
fn masters(bundle: &Value) -> Option<BTreeMap<String, String>> {
    if bundle["link"].as_array().is_some_and(|l| l.iter().any(|l| l["relation"] == "next")) {
        return None; // More than one page: not a whole read.
    }
    Some(
        bundle["entry"]
            .as_array()
            .map(|es| {
                es.iter()
                    .filter(|e| e["resource"]["resourceType"] == "DocumentReference")
                    .filter_map(|e| {
                        let r = &e["resource"];
                        Some((r["masterIdentifier"]["value"].as_str()?.to_owned(), r["id"].as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

impl Clients {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    async fn read(&self, node: u64, patient: u32, linearizable: bool) -> Outcome<BTreeMap<String, String>> {
        let headers: &[(&str, &str)] = if linearizable { &[("X-HIE-Consistency", "linearizable")] } else { &[] };
        let mut req = self
            .consumer
            .get(format!("{}/DocumentReference", self.cluster.api_url(node)))
            .query(&[("subject:identifier", format!("{NHS_SYSTEM}|{}", nhs(patient))), ("_count", "100".to_owned())]);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, reply(req)).await {
            Ok(Ok(r)) if r.status == 200 => masters(&r.body).map_or(Outcome::Failed, Outcome::Ok),
            _ => Outcome::Failed,
        }
    }

    async fn create(&self, node: u64, patient: u32, master: &str) -> Outcome<String> {
        let body = pointer_body(&nhs(patient), PRODUCER_ODS, master);
        match tokio::time::timeout(REQUEST_TIMEOUT, create_pointer(&self.producer, &self.cluster.api_url(node), &body))
            .await
        {
            Ok(Ok(r)) if r.status == 201 => {
                r.body["id"].as_str().map_or(Outcome::Unknown, |id| Outcome::Ok(id.to_owned()))
            }
            // A refusal before anything was proposed: definitely not applied.
            Ok(Ok(r)) if (400..500).contains(&r.status) && r.status != 408 => Outcome::Failed,
            Ok(Err(e)) if never_sent(&e) => Outcome::NotSent,
            _ => Outcome::Unknown,
        }
    }

    /// Merges the pair's second number into its first.
    async fn merge(&self, node: u64, pair: u32) -> Outcome<()> {
        let identifier = |p: u32| serde_json::json!({ "system": NHS_SYSTEM, "value": nhs(p) });
        let body = serde_json::json!({
            "resourceType": "Parameters",
            "parameter": [
                { "name": "source-patient-identifier", "valueIdentifier": identifier(pair + 1) },
                { "name": "target-patient-identifier", "valueIdentifier": identifier(pair) },
            ],
        });
        let req = self
            .authority
            .post(format!("{}/Patient/$merge", self.cluster.api_url(node)))
            .header("content-type", "application/fhir+json")
            .json(&body);
        match tokio::time::timeout(REQUEST_TIMEOUT, reply(req)).await {
            Ok(Ok(r)) if r.status == 200 => Outcome::Ok(()),
            Ok(Ok(r)) if (400..500).contains(&r.status) && r.status != 408 => {
                if r.status != 429 {
                    eprintln!("faults: a merge was refused: {} {}", r.status, r.body);
                }
                Outcome::Failed
            }
            Ok(Err(e)) if never_sent(&e) => Outcome::NotSent,
            _ => Outcome::Unknown,
        }
    }

    async fn delete(&self, node: u64, id: &str) -> Outcome<bool> {
        let req = self.producer.delete(format!("{}/DocumentReference/{id}", self.cluster.api_url(node)));
        match tokio::time::timeout(REQUEST_TIMEOUT, reply(req)).await {
            Ok(Ok(r)) if r.status == 200 || r.status == 204 => Outcome::Ok(true),
            Ok(Ok(r)) if r.status == 404 => Outcome::Ok(false),
            Ok(Ok(r)) if r.status == 429 || r.status == 403 || r.status == 400 => Outcome::Failed,
            Ok(Err(e)) if never_sent(&e) => Outcome::NotSent,
            _ => Outcome::Unknown,
        }
    }

    async fn run(self: Arc<Self>, c: u32, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919).wrapping_add(u64::from(c)));
        while !self.stop.load(Ordering::SeqCst) {
            let node = rng.random_range(1..=self.nodes);
            let patient = rng.random_range(0..self.patients) + FIRST_PATIENT;
            let (pair, side) = pair_of(patient);
            let roll = rng.random_range(0..100);
            // Paced, so a failing node does not spin a client.
            tokio::time::sleep(Duration::from_millis(rng.random_range(CLIENT_PAUSE_MS))).await;
            let invoke = self.now();
            self.operations.fetch_add(1, Ordering::SeqCst);
            if roll < 45 {
                let linearizable = roll < 35;
                let r = self.read(node, patient, linearizable && !self.unsafe_local_reads).await;
                let complete = self.now();
                if let Outcome::Ok(found) = r {
                    let mut h = self.history.lock().unwrap();
                    for (m, id) in &found {
                        if !h.attempted.contains(m) {
                            h.invented.push(m.clone());
                        }
                        h.seen.insert(m.clone(), patient);
                        // Creates whose outcome was unknown but did happen
                        // become known here, so they can be deleted too and
                        // a patient's pointers stay within one page.
                        h.known.insert(m.clone(), (patient, id.clone()));
                    }
                    h.last_count.insert(patient, found.len());
                    let set: BTreeSet<String> = found.into_keys().collect();
                    if linearizable {
                        h.records.push(Record {
                            pair,
                            op: Op { kind: Kind::Read { side, set }, invoke, complete: Some(complete) },
                        });
                    }
                }
                continue;
            }
            if let Some(from) = self.merge_from.get(&pair)
                && self.started.elapsed() >= *from
            {
                let merged = self.history.lock().unwrap().merged.contains(&pair);
                if roll < 45 + if merged { MERGE_AGAIN_PERCENT } else { MERGE_PERCENT } {
                    let r = self.merge(node, pair).await;
                    let complete = self.now();
                    let mut h = self.history.lock().unwrap();
                    let complete = match r {
                        Outcome::Ok(()) => {
                            h.acknowledged += 1;
                            h.merges_acknowledged += 1;
                            h.merged.insert(pair);
                            Some(complete)
                        }
                        Outcome::Unknown => None,
                        Outcome::NotSent => {
                            h.not_sent.push(Record { pair, op: Op { kind: Kind::Merge, invoke, complete: None } });
                            continue;
                        }
                        Outcome::Failed => continue,
                    };
                    h.records.push(Record { pair, op: Op { kind: Kind::Merge, invoke, complete } });
                    continue;
                }
            }
            let mine: Vec<(String, String)> = {
                let h = self.history.lock().unwrap();
                h.created
                    .iter()
                    .chain(h.known.iter())
                    .filter(|(m, (p, _))| *p == patient && !h.delete_attempted.contains(*m))
                    .map(|(m, (_, id))| (m.clone(), id.clone()))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect()
            };
            let count = mine.len().max(self.history.lock().unwrap().last_count.get(&patient).copied().unwrap_or(0));
            if roll < 80 && count < POINTERS_PER_PATIENT_MAX {
                let master = format!("urn:oid:2.25.77{}", self.counter.fetch_add(1, Ordering::SeqCst));
                self.history.lock().unwrap().attempted.insert(master.clone());
                let r = self.create(node, patient, &master).await;
                let complete = self.now();
                let mut h = self.history.lock().unwrap();
                let kind = Kind::Add { item: master.clone(), side };
                match r {
                    Outcome::Ok(id) => {
                        h.acknowledged += 1;
                        h.served.insert(id.clone(), node);
                        h.created.insert(master, (patient, id));
                        h.records.push(Record { pair, op: Op { kind, invoke, complete: Some(complete) } });
                    }
                    Outcome::Unknown => h.records.push(Record { pair, op: Op { kind, invoke, complete: None } }),
                    Outcome::NotSent => h.not_sent.push(Record { pair, op: Op { kind, invoke, complete: None } }),
                    Outcome::Failed => {}
                }
            } else if let Some((master, id)) = mine.get(rng.random_range(0..mine.len().max(1))).cloned() {
                self.history.lock().unwrap().delete_attempted.insert(master.clone());
                let r = self.delete(node, &id).await;
                let complete = self.now();
                let mut h = self.history.lock().unwrap();
                match r {
                    Outcome::Ok(present) => {
                        h.acknowledged += 1;
                        let kind = Kind::Remove { item: master, present };
                        h.records.push(Record { pair, op: Op { kind, invoke, complete: Some(complete) } });
                    }
                    Outcome::Unknown => {
                        let kind = Kind::Remove { item: master, present: true };
                        h.records.push(Record { pair, op: Op { kind, invoke, complete: None } });
                    }
                    Outcome::NotSent => {
                        let kind = Kind::Remove { item: master, present: true };
                        h.not_sent.push(Record { pair, op: Op { kind, invoke, complete: None } });
                    }
                    Outcome::Failed => {}
                }
            }
        }
    }
}

/// Moves each node's data onto its own disk: a small ext4 image (so a disk
/// can fill) on the machine's real disk, loop-mounted, seen through the
/// power-cut filesystem where there is FUSE. The data is copied onto the
/// ext4 below the power-cut filesystem, so all of it starts out durable.
/// Also tunes each node so that snapshots are built and installed within a
/// run (a node behind by more than `LOGS_KEPT` entries gets one).
fn give_each_node_a_disk(cluster: &Cluster, faults: &mut Faults, power_cuts: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(DISKS_DIR)?;
    for id in cluster.node_ids() {
        let dir: PathBuf = cluster.data_dir(id);
        cluster.kill9(id);
        let config = cluster.dir.path().join(format!("node-{id}.toml"));
        let text = std::fs::read_to_string(&config)?;
        let kept = text
            .lines()
            .map(|l| {
                if l.starts_with("logs_kept_after_snapshot") {
                    format!("logs_kept_after_snapshot = {LOGS_KEPT}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        if kept == text.trim_end() {
            bail!("{} has no logs_kept_after_snapshot to tune", config.display());
        }
        std::fs::write(&config, kept + "\n")?;
        let image = PathBuf::from(format!("{DISKS_DIR}/node-{id}.img"));
        let lower = PathBuf::from(format!("{DISKS_DIR}/node-{id}.lower"));
        let _ = sh(&format!("umount -l {} 2>/dev/null", lower.display()));
        let loop_mounted = sh(&format!(
            "rm -f {i} && truncate -s {DISK_BYTES} {i} && mkfs.ext4 -q -F {i} && mkdir -p {l} && mount -o loop {i} {l}",
            i = image.display(),
            l = lower.display()
        ));
        if let Err(e) = loop_mounted {
            // No loop devices here: a tmpfs of the same size, so a disk can
            // still fill (the power-cut filesystem works over it alike).
            println!("faults: skipped: a real disk under node {id} ({e:#}); a {DISK_BYTES} tmpfs instead");
            sh(&format!(
                "mkdir -p {l} && mount -t tmpfs -o size={DISK_BYTES} hie-faults-{id} {l}",
                l = lower.display()
            ))?;
        }
        let root = if power_cuts { lower.join("root") } else { lower.clone() };
        sh(&format!("mkdir -p {r} && cp -a {d}/. {r}/ && sync", r = root.display(), d = dir.display()))?;
        let fs = if power_cuts {
            Some(mount_powercut_fs(&lower, &dir)?)
        } else {
            sh(&format!("rm -rf {d} && mkdir {d} && mount --bind {l} {d}", d = dir.display(), l = lower.display()))?;
            None
        };
        faults.disks.insert(id, Disk { image, lower, fs });
        faults.start_wrapped(id, &[])?;
    }
    Ok(())
}

/// Unmounts the disks, keeping each node's log (the harness checks every
/// log for NHS Numbers in clear when the cluster is dropped).
fn unmount_disks(cluster: &Cluster, faults: &mut Faults) {
    for id in cluster.node_ids() {
        let dir = cluster.data_dir(id);
        let mut log = std::fs::read(format!("{LOGS_DIR}/node-{id}.log")).unwrap_or_default();
        log.extend(std::fs::read(dir.join("hie.log")).unwrap_or_default());
        if let Some(disk) = faults.disks.remove(&id) {
            if let Some(mut fs) = disk.fs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(fs.id() as i32), Signal::SIGTERM);
                if wait_exit(&mut fs, POWERCUT_FS_TIMEOUT).is_err() {
                    eprintln!("faults: hie-powercut-fs of node {id} did not stop; unmounting it");
                }
            }
            let _ = sh(&format!("umount -l {} 2>/dev/null", dir.display()));
            let _ = sh(&format!("umount -l {}", disk.lower.display()));
            let _ = std::fs::remove_file(&disk.image);
            let _ = std::fs::remove_dir(&disk.lower);
        }
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("hie.log"), log);
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ = std::fs::remove_dir_all(LOGS_DIR);
    println!("faults: seed {} (replay the schedule with --seed {})", args.seed, args.seed);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let nodes = args.nodes.to_string();
    if let Some(bug) = hie_store_planted() {
        println!("faults: the nodes run with a durability bug planted on purpose: {bug}");
    }
    let power_cuts = fuse_available();
    if !power_cuts {
        println!("faults: skipped: power cuts (no /dev/fuse on this machine)");
    }
    let cluster = Arc::new(Cluster::up(&[
        "--nodes",
        &nodes,
        "--patients",
        "0",
        "--netns",
        &args.netns,
        "--snapshot-logs-since-last",
        SNAPSHOT_EVERY,
    ])?);
    let mut faults = Faults {
        cluster: cluster.clone(),
        netns: args.netns.clone(),
        nodes: args.nodes,
        killed: BTreeSet::new(),
        paused: BTreeSet::new(),
        wrapped: BTreeSet::new(),
        filled: BTreeSet::new(),
        fsync_failing: BTreeSet::new(),
        delayers: Vec::new(),
        disks: BTreeMap::new(),
        snapshots_damaged: 0,
    };
    for id in 1..=args.nodes {
        let ns = faults.ns(id);
        sh(&format!(
            "ip netns exec {ns} nft add table inet hiefault && \
             ip netns exec {ns} nft add chain inet hiefault input '{{ type filter hook input priority 0; }}' && \
             ip netns exec {ns} nft add chain inet hiefault output '{{ type filter hook output priority 0; }}'"
        ))?;
    }
    let result = rt.block_on(async {
        give_each_node_a_disk(&cluster, &mut faults, power_cuts)?;
        cluster.wait_leader(Duration::from_secs(30)).await?;
        run(&args, &cluster, &mut faults, power_cuts).await
    });
    rt.block_on(async {
        let _ = faults.heal();
    });
    let _ = hie_tests::hie(&["dev", "down", "--dir", &cluster.dir_str()]);
    unmount_disks(&cluster, &mut faults);
    // libfiu's remote-control FIFOs of every node process that ran.
    let _ = sh(&format!("rm -f {FIU_CTRL}-*"));
    result
}

/// The durability bug the nodes run with (`HIE_TEST_PLANT_DURABILITY_BUG`,
/// passed on to every node this harness starts), if any.
fn hie_store_planted() -> Option<String> {
    std::env::var("HIE_TEST_PLANT_DURABILITY_BUG").ok().filter(|v| !v.is_empty())
}

async fn run(args: &Args, cluster: &Arc<Cluster>, faults: &mut Faults, power_cuts: bool) -> anyhow::Result<()> {
    // Pairs with both numbers, merged from 1/(n+1), 2/(n+1), ... of the run.
    let pairs: Vec<u32> = (0..args.patients / 2).map(|k| FIRST_PATIENT + 2 * k).collect();
    let merge_from = pairs
        .iter()
        .enumerate()
        .map(|(k, &pair)| {
            let share = (k as f64 + 1.0) / (pairs.len() as f64 + 1.0);
            (pair, Duration::from_secs_f64(args.seconds as f64 * share))
        })
        .collect();
    let clients = Arc::new(Clients {
        cluster: cluster.clone(),
        producer: cluster.http(PRODUCER),
        consumer: cluster.http(CONSUMER),
        authority: cluster.http(IDENTITY_AUTHORITY),
        merge_from,
        started: Instant::now(),
        history: Mutex::default(),
        counter: AtomicU64::new(args.seed % 1_000_000 * 1_000_000),
        operations: AtomicU64::new(0),
        nodes: args.nodes,
        patients: args.patients,
        unsafe_local_reads: args.unsafe_local_reads,
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..args.clients).map(|c| tokio::spawn(clients.clone().run(c, args.seed))).collect();
    let churn = (!args.no_membership_changes).then(|| tokio::spawn(churn_membership(clients.clone(), args.seed)));

    let mut rng = StdRng::seed_from_u64(args.seed);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut injected = 0u64;
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    while Instant::now() < deadline {
        let fault = draw(&mut rng, args.nodes, power_cuts, args.power_cuts_one_node);
        if args.only.as_ref().is_some_and(|o| !format!("{fault:?}").starts_with(o.as_str())) {
            continue;
        }
        let hold = Duration::from_millis(rng.random_range(1000..6000));
        let leader = cluster.leader().await;
        let name = format!("{fault:?}");
        let kind = name.split(['(', ' ']).next().unwrap_or("").to_owned();
        println!(
            "faults: {:>6.1}s inject {name} for {:.1}s",
            clients.started.elapsed().as_secs_f64(),
            hold.as_secs_f64()
        );
        if let Err(e) = faults.inject(&fault, leader) {
            eprintln!("faults: injecting {name} failed: {e:#}");
            if matches!(fault, Fault::PowerCut(_)) {
                // A disk left half rolled back, or unmounted under its node,
                // is not a disk after a power cut: nothing after it is a test.
                bail!("a power cut failed: {e:#}");
            }
        } else {
            injected += 1;
            *kinds.entry(kind).or_default() += 1;
        }
        tokio::time::sleep(hold).await;
        faults.heal()?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
    }
    faults.heal()?;
    // Quiet time for the clients after the last fault, then stop them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    clients.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let membership_changes = match churn {
        Some(t) => t.await.unwrap_or_default(),
        None => Churned::default(),
    };
    if !args.no_membership_changes {
        restore_voters(cluster).await?;
        println!(
            "faults: membership: {} demotions and {} promotions acknowledged ({} attempts unanswered or refused); every node a voter again",
            membership_changes.demoted, membership_changes.promoted, membership_changes.failed
        );
        // A run long enough for several changes that made none tests nothing of them.
        if args.seconds >= 60 && membership_changes.demoted == 0 {
            bail!("no membership change was acknowledged in {} s", args.seconds);
        }
    }

    let ids = cluster.node_ids();
    let converged = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;
    // Every operation that was going to take effect has: the replicas agree
    // and no client has run for longer than a request may take.
    let settled = clients.now();
    // Final reads on every node, recorded as linearizable reads at the end.
    let mut final_states: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut diverged_reads = 0;
    let mut final_failures = Vec::new();
    for patient in (0..args.patients).map(|p| p + FIRST_PATIENT) {
        let (pair, side) = pair_of(patient);
        for &id in &ids {
            let invoke = clients.now();
            if let Outcome::Ok(found) = clients.read(id, patient, true).await {
                let set: BTreeSet<String> = found.into_keys().collect();
                let complete = clients.now();
                if let Some(prev) = final_states.get(&patient)
                    && *prev != set
                {
                    diverged_reads += 1;
                }
                final_states.insert(patient, set.clone());
                clients
                    .history
                    .lock()
                    .unwrap()
                    .records
                    .push(Record { pair, op: Op { kind: Kind::Read { side, set }, invoke, complete: Some(complete) } });
            } else {
                final_failures.push(id);
            }
        }
    }

    let mut h = clients.history.lock().unwrap();
    // An operation that could not connect cannot have taken effect; should
    // its effect show all the same (a pointer seen, one gone from the final
    // state, a pair merged with no merge acknowledged), it joins the
    // history as unknown and is counted, rather than make a violation.
    let not_sent = std::mem::take(&mut h.not_sent);
    let mut took_effect = 0;
    for r in not_sent {
        let showed = match &r.op.kind {
            Kind::Add { item, .. } => h.seen.contains_key(item),
            Kind::Remove { item, .. } => {
                let patient = h.created.get(item).or_else(|| h.known.get(item)).map(|(p, _)| *p);
                patient.is_some_and(|p| !final_states.get(&p).is_some_and(|s| s.contains(item)))
            }
            Kind::Merge => !h.merged.contains(&r.pair),
            Kind::Read { .. } => false,
        };
        if showed {
            if !matches!(r.op.kind, Kind::Merge) {
                took_effect += 1;
            }
            h.records.push(r);
        }
    }
    if took_effect > 0 {
        println!("faults: {took_effect} creates or deletes that failed to connect took effect (kept as unknown)");
    }
    if !final_failures.is_empty() {
        final_failures.dedup();
        bail!(
            "final linearizable reads failed on nodes {final_failures:?} ({converged:?}): the cluster did not recover, or a patient's pointers exceed one page; logs in {LOGS_DIR}"
        );
    }
    // No acknowledged write lost: every acknowledged create is in the final
    // state unless a delete of it was attempted.
    let mut lost = 0;
    for (m, (patient, _)) in &h.created {
        if !h.delete_attempted.contains(m) && !final_states.get(patient).is_some_and(|s| s.contains(m)) {
            eprintln!("faults: LOST acknowledged pointer {m}");
            lost += 1;
        }
    }
    // Nothing visible that later disappears (local reads included).
    for (m, patient) in &h.seen {
        if !h.delete_attempted.contains(m) && !final_states.get(patient).is_some_and(|s| s.contains(m)) {
            eprintln!("faults: pointer {m} was seen and then disappeared");
            lost += 1;
        }
    }
    for m in &h.invented {
        eprintln!("faults: a read returned {m}, which was never written");
        lost += 1;
    }

    let mut violations = 0;
    let mut undecided = 0;
    let by_pair: BTreeMap<u32, Vec<Op>> = h.records.iter().fold(BTreeMap::new(), |mut acc, r| {
        acc.entry(r.pair).or_default().push(r.op.clone());
        acc
    });
    let merges = h.records.iter().filter(|r| r.op.kind == Kind::Merge).count();
    println!(
        "faults: checking {} operations ({merges} merges, {} acknowledged, of pairs {:?}) on {} pairs of patients",
        h.records.len(),
        h.merges_acknowledged,
        h.merged,
        by_pair.len()
    );
    for (pair, ops) in &by_pair {
        let ops = ops.clone();
        let verdict = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(move || lin::check(&ops, settled))
            .expect("checker thread")
            .join()
            .expect("checker");
        match verdict {
            Verdict::Linearizable => {}
            Verdict::Violation { op } => {
                violations += 1;
                eprintln!("faults: pair {pair}: not linearizable (stuck at operation {op}: {:?})", by_pair[pair][op]);
                // The pair's whole history, one operation a line, for the post-mortem.
                let path = format!("{LOGS_DIR}/pair-{pair}.history");
                let text: String = by_pair[pair].iter().enumerate().map(|(i, o)| format!("{i} {o:?}\n")).collect();
                if std::fs::write(&path, text).is_ok() {
                    eprintln!("faults: pair {pair}'s history is in {path}");
                }
            }
            Verdict::Unknown => undecided += 1,
        }
    }
    let audit_missing = check_audit(cluster, &h.served)?;
    // Every damaged snapshot file was found and set aside (renamed
    // `damaged-<time>.snap`, the rename fsynced) when its node restarted.
    let set_aside: u64 = ids
        .iter()
        .map(|id| {
            std::fs::read_dir(cluster.data_dir(*id).join("store/snapshots"))
                .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("damaged-")).count() as u64)
                .unwrap_or(0)
        })
        .sum();
    if faults.snapshots_damaged > 0 || set_aside > 0 {
        println!("faults: {} snapshot files damaged, {set_aside} set aside by their nodes", faults.snapshots_damaged);
    }
    let snapshots_missed = set_aside != faults.snapshots_damaged;
    let operations = clients.operations.load(Ordering::SeqCst);
    println!("faults: by kind {kinds:?}");
    if undecided > 0 {
        println!("faults: {undecided} pairs' histories too large to decide within the checker's budget");
    }
    let converged_text = match &converged {
        Ok((applied, digest)) if diverged_reads == 0 => {
            println!(
                "faults: {} nodes at applied index {applied}, digest {}",
                ids.len(),
                &digest[..16.min(digest.len())]
            );
            "converged".to_owned()
        }
        Ok(_) => format!("NOT converged ({diverged_reads} final reads differ between nodes)"),
        Err(e) => format!("NOT converged ({e})"),
    };
    println!(
        "faults: {injected} injected, {operations} operations, {} acknowledged, {lost} lost, {violations} linearizability violations, {converged_text}",
        h.acknowledged
    );
    if lost > 0
        || violations > 0
        || converged.is_err()
        || diverged_reads > 0
        || undecided > 0
        || audit_missing > 0
        || snapshots_missed
    {
        bail!("the history shows a fault (see above)");
    }
    Ok(())
}

/// Checks every node's audit log: its chain verifies (`hie audit verify`),
/// and it holds the record of every acknowledged create that node answered
/// (a change is answered only once its record is fsynced, so a power cut
/// must not take one away). The number of creates whose record is missing.
fn check_audit(cluster: &Cluster, served: &BTreeMap<String, u64>) -> anyhow::Result<usize> {
    let mut missing = 0;
    for id in cluster.node_ids() {
        let config = cluster.dir.path().join(format!("node-{id}.toml")).display().to_string();
        hie_tests::hie(&["audit", "verify", "--config", &config])
            .with_context(|| format!("node {id}'s audit chain does not verify"))?;
        let out = format!("{LOGS_DIR}/audit-{id}.ndjson");
        hie_tests::hie(&["audit", "export", "--config", &config, "--out", &out])?;
        let mut recorded = BTreeSet::new();
        for line in std::fs::read_to_string(&out)?.lines() {
            let event: Value = serde_json::from_str(line)?;
            for e in event["entity"].as_array().into_iter().flatten() {
                if let Some(r) = e["what"]["reference"].as_str()
                    && let Some(pointer) = r.strip_prefix("DocumentReference/")
                {
                    recorded.insert(pointer.to_owned());
                }
            }
        }
        let mine: Vec<&String> = served.iter().filter(|(_, n)| **n == id).map(|(p, _)| p).collect();
        let absent = mine.iter().filter(|p| !recorded.contains(p.as_str())).count();
        if absent > 0 {
            eprintln!(
                "faults: node {id}'s audit log lacks the record of {absent} of the {} creates it acknowledged",
                mine.len()
            );
        }
        missing += absent;
    }
    println!("faults: audit: every node's chain verifies; {missing} acknowledged creates without their record");
    Ok(missing)
}

/// Flips one bit in the middle of a file (fsynced); the byte offset.
fn flip_middle_bit(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let at = f.metadata()?.len() / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at)?;
    f.write_all_at(&[b[0] ^ 0x08], at)?;
    f.sync_all()?;
    Ok(at)
}

/// Membership changes made beside the faults.
#[derive(Default)]
struct Churned {
    demoted: u64,
    promoted: u64,
    failed: u64,
}

/// Pause between membership changes.
const CHURN_PAUSE_MS: std::ops::Range<u64> = 4_000..12_000;

/// Changes the membership while the faults run, independent of their
/// schedule: every 4 to 12 s it demotes a random voter to learner
/// (`POST /admin/nodes/N/demote`: a joint-consensus change) when all are
/// voters, or promotes the learner back. Each request goes to every node in
/// turn until one (the leader) accepts it; a change nobody accepts, or
/// whose answer is lost, is tried again from the membership then read.
async fn churn_membership(clients: Arc<Clients>, seed: u64) -> Churned {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(17));
    let operator = clients.cluster.http(OPERATOR);
    let mut done = Churned::default();
    while !clients.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(CHURN_PAUSE_MS))).await;
        if clients.stop.load(Ordering::SeqCst) {
            break;
        }
        let Some(members) = membership(&clients.cluster, clients.nodes).await else {
            done.failed += 1;
            continue;
        };
        let learner = members.iter().find(|(_, voter)| !voter).map(|(id, _)| *id);
        let (action, id) = match learner {
            Some(id) => ("promote", id),
            None => ("demote", members[rng.random_range(0..members.len())].0),
        };
        let at = clients.started.elapsed().as_secs_f64();
        let ok = change_membership(&operator, &clients.cluster, clients.nodes, action, id).await;
        println!(
            "faults: {at:>6.1}s membership: {action} {id}: {}",
            if ok { "acknowledged" } else { "not acknowledged" }
        );
        match (ok, action) {
            (true, "demote") => done.demoted += 1,
            (true, _) => done.promoted += 1,
            (false, _) => done.failed += 1,
        }
    }
    done
}

/// The members (id, voter) as the leader sees them, or else the first node
/// that answers (a node cut off may hold an older membership).
async fn membership(cluster: &Cluster, nodes: u64) -> Option<Vec<(u64, bool)>> {
    let leader = cluster.leader().await;
    for id in leader.into_iter().chain(1..=nodes) {
        if let Some(status) = cluster.admin(id, "/status").await
            && status["members"].is_array()
        {
            return Some(hie_tests::members(&status));
        }
    }
    None
}

/// Asks each node in turn to `action` (promote or demote) node `id`; true
/// once one answers 2xx.
async fn change_membership(operator: &reqwest::Client, cluster: &Cluster, nodes: u64, action: &str, id: u64) -> bool {
    for via in 1..=nodes {
        // The API's base, without the FHIR root `api_url` ends in.
        let base = cluster.api_url(via);
        let url = format!("{}/admin/nodes/{id}/{action}", base.trim_end_matches("/fhir"));
        if let Ok(r) = operator.post(url).send().await
            && r.status().is_success()
        {
            return true;
        }
    }
    false
}

/// After the run: every node a voter again, so the end state is the
/// cluster the run began with.
async fn restore_voters(cluster: &Cluster) -> anyhow::Result<()> {
    let operator = cluster.http(OPERATOR);
    let nodes = cluster.node_ids().len() as u64;
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let members = membership(cluster, nodes).await.unwrap_or_default();
        let learners: Vec<u64> = members.iter().filter(|(_, v)| !v).map(|(id, _)| *id).collect();
        if members.len() as u64 == nodes && learners.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the membership was not restored to {nodes} voters: {members:?}");
        }
        for id in learners {
            change_membership(&operator, cluster, nodes, "promote", id).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
