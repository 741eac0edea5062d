//! One simulated run: nodes, clients, a seeded fault schedule, and the checks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hie_domain::command::{Command, CommandV1, Outcome, Role};
use hie_domain::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use hie_domain::mem::{MemState, testkit};
use hie_domain::model::{PointerStatus, Timestamp};
use hie_domain::raft::NodeInfo;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, LeaderId, ServerState, SnapshotPolicy};
use rand08::rngs::StdRng;
use rand08::{Rng, SeedableRng};
use sha2::Digest;

use crate::check::Checker;
use crate::net::{Router, SimNetworkFactory};
use crate::store::{Defect, MemLog, MemSm};
use crate::{LogId, NodeId, Raft};

/// Limits of one run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Cluster size (3 or 5 are the interesting ones).
    pub nodes: u64,
    /// Fault-schedule steps.
    pub steps: u32,
    /// Concurrent clients writing.
    pub clients: u32,
    /// A storage bug to plant (to test the checks themselves).
    pub defect: Option<Defect>,
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub faults: u64,
    pub restarts: u64,
    pub writes_acked: u64,
    pub writes_unknown: u64,
    /// Acknowledged merges, and those answered `Merged` (the rest refused).
    pub merges_acked: u64,
    pub merges_done: u64,
    /// Pointers moved to a survivor by acknowledged merges.
    pub pointers_moved: u64,
    pub elections: usize,
    pub snapshots_installed: u64,
    pub applies: u64,
    pub messages: u64,
    pub simulated: Duration,
    /// Equal for two runs of one seed.
    pub trace: String,
    pub violations: Vec<String>,
}

/// Simulated time a run may take to converge once every fault is healed.
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);
/// How long a client waits for one write.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
const PRODUCERS: [&str; 2] = ["A81001", "RR8"];
/// Patients the clients write for: few, so pointers of one patient interleave.
const PATIENTS: u32 = 16;
/// The share of client commands (in percent) that merge two patients.
const MERGE_PERCENT: u32 = 3;

struct Node {
    /// The node's "disk": it outlives crashes.
    log: MemLog,
    sm: MemSm,
    /// The running node and its handles on the disk.
    raft: Option<Raft>,
    handles: Option<(MemLog, MemSm)>,
}

/// An acknowledged write.
#[derive(Debug, Clone)]
struct Acked {
    log_id: LogId,
    outcome: Outcome,
    /// The acknowledging node's leader id just after the acknowledgement:
    /// the entry was committed under this leader or an earlier one, so every
    /// later leader must hold it.
    committed_by: LeaderId<NodeId>,
}

#[derive(Default)]
struct History {
    acked: Vec<Acked>,
    unknown: u64,
    /// Every pointer a create was attempted for, with the patient it named,
    /// and every delete attempted.
    created_attempted: BTreeMap<PointerId, NhsNumber>,
    delete_attempted: BTreeSet<PointerId>,
    /// Every merge attempted, as (retired, survivor) asked for.
    merge_attempted: BTreeSet<(NhsNumber, NhsNumber)>,
    /// The acknowledged merges, as asked for, and what each answered.
    merges_acked: Vec<(NhsNumber, NhsNumber, Outcome)>,
}

pub struct World {
    opts: Options,
    rng: StdRng,
    router: Arc<Router>,
    checker: Arc<Mutex<Checker>>,
    nodes: BTreeMap<NodeId, Node>,
    config: Arc<Config>,
    history: Arc<Mutex<History>>,
    report: Report,
}

fn node_info(id: NodeId) -> NodeInfo {
    NodeInfo { region: format!("sim-{id}"), ..NodeInfo::default() }
}

impl World {
    pub fn new(opts: Options) -> Self {
        let config = Config {
            cluster_name: "sim".into(),
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            // Small, so snapshots are built, sent and installed often.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(40),
            max_in_snapshot_log_to_keep: 8,
            purge_batch_size: 1,
            ..Config::default()
        };
        let checker = Arc::new(Mutex::new(Checker::default()));
        let nodes = (1..=opts.nodes)
            .map(|id| {
                (
                    id,
                    Node {
                        log: MemLog::with_defect(opts.defect),
                        sm: MemSm::new(id, checker.clone(), opts.defect),
                        raft: None,
                        handles: None,
                    },
                )
            })
            .collect();
        World {
            rng: StdRng::seed_from_u64(opts.seed),
            router: Router::new(opts.seed),
            checker,
            nodes,
            config: Arc::new(config.validate().expect("valid raft config")),
            history: Arc::default(),
            report: Report { seed: opts.seed, ..Report::default() },
            opts,
        }
    }

    async fn start(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let network = SimNetworkFactory { router: self.router.clone(), local: id };
        let (log, sm) = (node.log.incarnation(), node.sm.incarnation());
        let raft = Raft::new(id, self.config.clone(), network, log.clone(), sm.clone()).await.expect("raft starts");
        self.router.up(id, raft.clone());
        node.raft = Some(raft);
        node.handles = Some((log, sm));
    }

    async fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(raft) = node.raft.take() {
            self.router.down(id);
            // Dead at once: nothing the old run has in flight reaches the disk.
            if let Some((log, sm)) = node.handles.take() {
                log.kill();
                sm.kill();
            }
            let _ = raft.shutdown().await;
        }
    }

    fn up(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.raft.is_some()).map(|(id, _)| *id).collect()
    }

    fn down(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.raft.is_none()).map(|(id, _)| *id).collect()
    }

    fn note(&self, what: String) {
        self.checker.lock().unwrap().note(what.as_bytes());
    }

    pub async fn run(mut self) -> Report {
        let started = tokio::time::Instant::now();
        for id in 1..=self.opts.nodes {
            self.start(id).await;
        }
        let members: BTreeMap<NodeId, NodeInfo> = (1..=self.opts.nodes).map(|id| (id, node_info(id))).collect();
        self.nodes[&1].raft.as_ref().unwrap().initialize(members).await.expect("cluster initializes");
        for command in testkit::registry_commands(&PRODUCERS) {
            write_until_done(&self.router, command, &self.history).await;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..self.opts.clients)
            .map(|c| {
                let rng = StdRng::seed_from_u64(self.opts.seed.wrapping_mul(31).wrapping_add(u64::from(c)));
                tokio::spawn(client(c, rng, self.router.clone(), self.history.clone(), stop.clone()))
            })
            .collect();

        for step in 0..self.opts.steps {
            self.step(step).await;
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(5..60))).await;
            self.check_step(step);
        }

        // Heal everything and let the cluster converge.
        *self.router.faults.lock().unwrap() = Default::default();
        for id in self.down() {
            self.start(id).await;
            self.report.restarts += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            let _ = c.await;
        }
        self.converge().await;
        self.check_history();
        self.report.simulated = started.elapsed();
        for id in self.up() {
            self.crash(id).await;
        }
        let checker = self.checker.lock().unwrap();
        let history = self.history.lock().unwrap();
        self.report.writes_acked = history.acked.len() as u64;
        self.report.writes_unknown = history.unknown;
        self.report.merges_acked = history.merges_acked.len() as u64;
        for (_, _, outcome) in &history.merges_acked {
            if let Outcome::Merged { moved } = outcome {
                self.report.merges_done += 1;
                self.report.pointers_moved += moved;
            }
        }
        self.report.elections = checker.elections();
        self.report.snapshots_installed = checker.snapshots_installed;
        self.report.applies = checker.applies;
        self.report.messages = *self.router.messages.lock().unwrap();
        self.report.violations = checker.violations.clone();
        self.report.trace = hex::encode(checker.trace.clone().finalize());
        self.report.clone()
    }

    /// One step of the fault schedule.
    async fn step(&mut self, step: u32) {
        let n = self.opts.nodes;
        let pick = |rng: &mut StdRng| rng.gen_range(1..=n);
        let roll = self.rng.gen_range(0..100);
        let action = match roll {
            0..=44 => {
                let ms = self.rng.gen_range(10..300);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("wait {ms}ms")
            }
            45..=54 => {
                let isolated = pick(&mut self.rng);
                let mut f = self.router.faults.lock().unwrap();
                for other in 1..=n {
                    if other != isolated {
                        f.cut.insert((isolated, other));
                        f.cut.insert((other, isolated));
                    }
                }
                format!("isolate {isolated}")
            }
            55..=59 => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                if a != b {
                    self.router.faults.lock().unwrap().cut.insert((a, b));
                }
                format!("cut one way {a}->{b}")
            }
            60..=64 => {
                // Split into two sides, each node on a side chosen at random.
                let side: Vec<bool> = (0..n).map(|_| self.rng.gen_bool(0.5)).collect();
                let mut f = self.router.faults.lock().unwrap();
                for a in 1..=n {
                    for b in 1..=n {
                        if side[(a - 1) as usize] != side[(b - 1) as usize] {
                            f.cut.insert((a, b));
                        }
                    }
                }
                format!("split {side:?}")
            }
            65..=74 => {
                self.router.faults.lock().unwrap().cut.clear();
                "heal".into()
            }
            75..=82 => {
                let id = pick(&mut self.rng);
                self.crash(id).await;
                format!("crash {id}")
            }
            83..=91 => {
                let down = self.down();
                if down.is_empty() {
                    "restart none".into()
                } else {
                    let id = down[self.rng.gen_range(0..down.len())];
                    self.start(id).await;
                    self.report.restarts += 1;
                    format!("restart {id}")
                }
            }
            92..=96 => {
                let drop_percent = self.rng.gen_range(0..30);
                let delay_max = Duration::from_millis(self.rng.gen_range(0..40));
                let mut f = self.router.faults.lock().unwrap();
                f.drop_percent = drop_percent;
                f.delay_max = delay_max;
                format!("lossy {drop_percent}% delay<{delay_max:?}")
            }
            _ => {
                let mut f = self.router.faults.lock().unwrap();
                f.drop_percent = 0;
                f.delay_max = Duration::ZERO;
                "clean links".into()
            }
        };
        if roll >= 45 {
            self.report.faults += 1;
        }
        self.note(format!("step {step} {action}"));
    }

    /// Raft's safety properties, checked after every step.
    fn check_step(&self, step: u32) {
        let history = self.history.lock().unwrap();
        let mut checker = self.checker.lock().unwrap();
        // Election safety, and leader completeness: a leader of term T holds
        // every entry committed in a term before T.
        for (id, node) in &self.nodes {
            let Some(raft) = &node.raft else { continue };
            let metrics = raft.metrics();
            let m = metrics.borrow().clone();
            // A Raft core that died (a panic, a fatal storage error) drops its
            // metrics sender; a running node never does.
            if let Err(fatal) = &m.running_state {
                checker.violation(format!("liveness: node {id}'s raft stopped: {fatal}"));
            } else if metrics.has_changed().is_err() {
                checker.violation(format!("liveness: node {id}'s raft core is gone (panicked)"));
            }
            let entries = node.log.entries();
            checker.note(
                format!(
                    "{step} {id} {:?} {} {:?} log {:?}..{:?} vote {:?}",
                    m.state,
                    m.current_term,
                    m.last_applied,
                    entries.first().map(|e| e.0),
                    entries.last().map(|e| e.0),
                    m.vote
                )
                .as_bytes(),
            );
            if m.state != ServerState::Leader {
                continue;
            }
            checker.on_leader(*id, &m.vote);
            let leader = *m.vote.leader_id();
            let entries: BTreeMap<u64, LogId> = node.log.entries().into_iter().map(|(l, _)| (l.index, l)).collect();
            let applied = node.sm.applied().map_or(0, |l| l.index);
            for a in &history.acked {
                if a.committed_by >= leader {
                    continue;
                }
                let held = entries.get(&a.log_id.index) == Some(&a.log_id) || applied >= a.log_id.index;
                if !held {
                    checker.violation(format!(
                        "leader completeness: leader {id} ({leader}) lacks acknowledged entry {} committed under {}",
                        a.log_id, a.committed_by
                    ));
                }
            }
        }
        // Log matching: entries with one log id (index, leader) are the same entry.
        let mut seen: BTreeMap<LogId, ([u8; 32], NodeId)> = BTreeMap::new();
        for (id, node) in &self.nodes {
            for (log_id, digest) in node.log.entries() {
                let key = log_id;
                match seen.get(&key) {
                    Some((d, other)) if *d != digest => checker.violation(format!(
                        "log matching: nodes {other} and {id} hold different entries with log id {key}"
                    )),
                    Some(_) => {}
                    None => {
                        seen.insert(key, (digest, *id));
                    }
                }
            }
        }
    }

    /// Waits until every node has applied the same log, then compares states.
    async fn converge(&mut self) {
        let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
        loop {
            let applied: Vec<Option<LogId>> = self.nodes.values().map(|n| n.sm.applied()).collect();
            let leader_last = self.nodes.values().filter_map(|n| n.raft.as_ref()).find_map(|r| {
                let m = r.metrics().borrow().clone();
                (m.state == ServerState::Leader).then_some(m.last_log_index)
            });
            if let Some(Some(last)) = leader_last
                && applied.iter().all(|a| a.map(|l| l.index) == Some(last))
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let msg = format!("liveness: no convergence {CONVERGE_WITHIN:?} after healing: applied {applied:?}");
                self.checker.lock().unwrap().violation(msg);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let digests: BTreeMap<NodeId, (Option<LogId>, String)> =
            self.nodes.iter().map(|(id, n)| (*id, n.sm.digest())).collect();
        let first = digests.values().next().cloned();
        self.note(format!("converged {first:?}"));
        if digests.values().any(|d| Some(d) != first.as_ref()) {
            self.checker.lock().unwrap().violation(format!("convergence: replicas differ: {digests:?}"));
        }
    }

    /// No acknowledged write lost, nothing invented, every merge whole.
    fn check_history(&self) {
        let history = self.history.lock().unwrap();
        let mut checker = self.checker.lock().unwrap();
        for a in &history.acked {
            if checker.applied_at(a.log_id.index) != Some(a.log_id) {
                let msg = format!("durability: acknowledged entry {} is not what the cluster applied", a.log_id);
                checker.violation(msg);
            }
        }
        let state = self.nodes[&1].sm.state();
        for a in &history.acked {
            if let Outcome::Created { pointer, .. } = &a.outcome
                && !state.pointers.contains_key(&pointer.id)
                && !history.delete_attempted.contains(&pointer.id)
            {
                checker.violation(format!("durability: acknowledged pointer {} is missing", pointer.id));
            }
        }
        for id in state.pointers.keys() {
            if !history.created_attempted.contains_key(id) {
                checker.violation(format!("invention: pointer {id} was never written"));
            }
        }
        for problem in merge_problems(&state, &history) {
            checker.violation(format!("merge: {problem}"));
        }
    }
}

/// What is wrong with the merges in a converged `state`, given what the
/// clients asked and were answered. A merge's ids are unchanged, so the
/// durability and invention checks above hold across merges as they are.
///
/// Merges chain (see [`client`]), and some were applied or not without the
/// client knowing, so the order they were applied in is not known. What is:
/// a retired number is never revived (a retired target or source is
/// refused), and a redirect always names a survivor, one step away. So in
/// the final state `resolve(n)` (n's redirect, else n) is the number n
/// stands for, and:
/// - an acknowledged `Merged` of s into t left s redirecting to resolve(t),
///   and a refused one had s or t retired (or asked s into itself): a
///   retired number stays retired, so it still is;
/// - every redirect was asked for (s into some t with resolve(t) its
///   target), names a survivor, and that survivor lists it in merged_from;
/// - every pointer is under the number its create named, resolved: no
///   pointer is under a retired number, and the body says the same number;
/// - the index and each patient's holder counts are exactly the current
///   pointers'.
fn merge_problems(state: &MemState, history: &History) -> Vec<String> {
    let mut out = Vec::new();
    let redirect = |n: &NhsNumber| state.patients.get(n).and_then(|e| e.merged_into);
    let resolve = |n: &NhsNumber| redirect(n).unwrap_or(*n);
    // NHS Numbers' Debug is redacted; these are test numbers, so say them.
    let say = |n: Option<NhsNumber>| n.map_or_else(|| "none".to_owned(), |n| n.as_str().to_owned());

    for (source, target, outcome) in &history.merges_acked {
        let ok = match outcome {
            Outcome::Merged { .. } => source != target && redirect(source) == Some(resolve(target)),
            Outcome::Rejected(_) => source == target || redirect(source).is_some() || redirect(target).is_some(),
            _ => false,
        };
        if !ok {
            out.push(format!(
                "acknowledged merge of {} into {} answered {outcome:?}, but finally the first redirects to {} and the second to {}",
                source.as_str(),
                target.as_str(),
                say(redirect(source)),
                say(redirect(target))
            ));
        }
    }

    for (n, entry) in &state.patients {
        match entry.merged_into {
            Some(into) => {
                if let Some(further) = redirect(&into) {
                    out.push(format!(
                        "retired {} redirects to {}, itself retired into {}",
                        n.as_str(),
                        into.as_str(),
                        further.as_str()
                    ));
                }
                if !state.patients.get(&into).is_some_and(|e| e.merged_from.contains(n)) {
                    out.push(format!(
                        "retired {} redirects to {}, which does not list it as merged from",
                        n.as_str(),
                        into.as_str()
                    ));
                }
                if !history.merge_attempted.iter().any(|(s, t)| s == n && resolve(t) == into) {
                    out.push(format!("{} is retired into {}, which no client asked for", n.as_str(), into.as_str()));
                }
                if !entry.held.is_empty() || !entry.local_ids.is_empty() {
                    out.push(format!("retired {} still has holders or local identifiers: {entry:?}", n.as_str()));
                }
            }
            None => {
                for r in &entry.merged_from {
                    if redirect(r) != Some(*n) {
                        out.push(format!(
                            "{} lists {} as merged into it, but that redirects to {}",
                            n.as_str(),
                            r.as_str(),
                            say(redirect(r))
                        ));
                    }
                }
            }
        }
    }

    // Pointers: under the survivor of the patient they were created for.
    let mut index = BTreeSet::new();
    let mut held: BTreeMap<NhsNumber, BTreeMap<OdsCode, BTreeMap<SnomedCode, u32>>> = BTreeMap::new();
    for (id, p) in &state.pointers {
        if let Some(asked) = history.created_attempted.get(id)
            && p.subject != resolve(asked)
        {
            out.push(format!(
                "pointer {id} was created for {}, which stands for {}, but is under {}",
                asked.as_str(),
                resolve(asked).as_str(),
                p.subject.as_str()
            ));
        }
        if let Some(into) = redirect(&p.subject) {
            out.push(format!("pointer {id} is under {}, retired into {}", p.subject.as_str(), into.as_str()));
        }
        let body_subject = p.body.member("subject").and_then(|s| s["identifier"]["value"].as_str().map(str::to_owned));
        if body_subject.as_deref() != Some(p.subject.as_str()) {
            out.push(format!("pointer {id} is under {} but its body names {body_subject:?}", p.subject.as_str()));
        }
        if p.status == PointerStatus::Current {
            index.insert((p.subject, id.clone()));
            let by_type = held.entry(p.subject).or_default().entry(p.custodian.clone()).or_default();
            *by_type.entry(p.type_code.clone()).or_default() += 1;
        }
    }
    if index != state.index {
        let missing: Vec<_> = index.difference(&state.index).map(|(n, id)| (n.as_str(), id)).collect();
        let extra: Vec<_> = state.index.difference(&index).map(|(n, id)| (n.as_str(), id)).collect();
        out.push(format!("the index is not the current pointers: missing {missing:?}, extra {extra:?}"));
    }
    let subjects: BTreeSet<&NhsNumber> = held.keys().chain(state.patients.keys()).collect();
    for n in subjects {
        let counted = held.get(n).cloned().unwrap_or_default();
        let entry = state.patients.get(n).map(|e| e.held.clone()).unwrap_or_default();
        if counted != entry {
            out.push(format!("{}'s holders are {entry:?}, its current pointers {counted:?}", n.as_str()));
        }
    }
    out
}

/// The leader as some up node last saw it, else any up node.
fn target(router: &Router, hint: Option<NodeId>, rng: &mut StdRng) -> Option<(NodeId, Raft)> {
    if let Some(id) = hint
        && let Some(r) = router.get(id)
    {
        return Some((id, r));
    }
    let up = router.ids();
    if up.is_empty() {
        return None;
    }
    let id = up[rng.gen_range(0..up.len())];
    router.get(id).map(|r| (id, r))
}

// One per client write, matched on at once.
#[allow(clippy::large_enum_variant)]
enum Written {
    Acked(Acked),
    NotLeader(Option<NodeId>),
    Unknown,
}

async fn write(raft: &Raft, command: Command) -> Written {
    match tokio::time::timeout(CLIENT_WRITE_TIMEOUT, raft.client_write(command)).await {
        Ok(Ok(r)) => {
            let committed_by = *raft.metrics().borrow().vote.leader_id();
            Written::Acked(Acked { log_id: r.log_id, outcome: r.data, committed_by })
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Written::NotLeader(f.leader_id),
        // A timeout or a node shutting down: it may or may not have happened.
        _ => Written::Unknown,
    }
}

async fn write_until_done(router: &Router, command: Command, history: &Mutex<History>) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut hint = None;
    loop {
        if let Some((_, raft)) = target(router, hint, &mut rng) {
            match write(&raft, command.clone()).await {
                Written::Acked(a) => {
                    history.lock().unwrap().acked.push(a);
                    return;
                }
                Written::NotLeader(h) => hint = h,
                Written::Unknown => hint = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client: creates pointers for a few patients, deletes some it created,
/// and now and then (`MERGE_PERCENT`) merges one patient's NHS Number into
/// another's, as the identity authority.
///
/// Merges pick both numbers at random among all the patients, so chains
/// happen and are handled rather than avoided: a survivor is later retired
/// itself (its redirects must then follow to the new survivor), a number is
/// merged into one already retired (refused), merged twice into different
/// numbers (the second refused), merged again into the same one
/// (`Merged { moved: 0 }`), or into itself (refused). `check_history`
/// decides all of it from the final state and the answers, whatever order
/// the merges (and the ones whose fate is unknown) were applied in.
async fn client(c: u32, mut rng: StdRng, router: Arc<Router>, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let mut hint = None;
    let mut n = 0u32;
    let mut mine: Vec<(String, PointerId)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let custodian = PRODUCERS[rng.gen_range(0..PRODUCERS.len())];
        let kind = rng.gen_range(0..100);
        let mut merge = None;
        let command = if kind < MERGE_PERCENT {
            n += 1;
            let (source, target) = (testkit::nhs(rng.gen_range(0..PATIENTS)), testkit::nhs(rng.gen_range(0..PATIENTS)));
            history.lock().unwrap().merge_attempted.insert((source, target));
            merge = Some((source, target));
            testkit::merge(source, target, i64::from(n))
        } else if !mine.is_empty() && kind < MERGE_PERCENT + 20 {
            let (custodian, id) = mine.swap_remove(rng.gen_range(0..mine.len()));
            history.lock().unwrap().delete_attempted.insert(id.clone());
            Command::V1(CommandV1::DeletePointer {
                caller: testkit::caller(&custodian, &[Role::Producer]),
                id,
                at: Timestamp(i64::from(n)),
            })
        } else {
            n += 1;
            let patient = testkit::nhs(rng.gen_range(0..PATIENTS));
            let pointer = testkit::pointer(custodian, &format!("c{c}n{n}"), patient, i64::from(n));
            history.lock().unwrap().created_attempted.insert(pointer.id.clone(), patient);
            testkit::create(custodian, pointer)
        };
        // A write refused as not-leader did not happen; try it at the leader.
        for _ in 0..3 {
            let Some((_, raft)) = target(&router, hint, &mut rng) else { break };
            match write(&raft, command.clone()).await {
                Written::Acked(a) => {
                    if let Outcome::Created { pointer, .. } = &a.outcome {
                        mine.push((pointer.custodian.to_string(), pointer.id.clone()));
                    }
                    if std::env::var_os("HIE_SIM_TRACE").is_some() {
                        eprintln!("acked {}", a.log_id);
                    }
                    let mut h = history.lock().unwrap();
                    if let Some((source, target)) = merge {
                        h.merges_acked.push((source, target, a.outcome.clone()));
                    }
                    h.acked.push(a);
                    break;
                }
                Written::NotLeader(h) => hint = h,
                Written::Unknown => {
                    hint = None;
                    history.lock().unwrap().unknown += 1;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::apply::apply;
    use hie_domain::command::Outcome;
    use hie_domain::mem::{MemState, testkit};

    use super::{History, PRODUCERS, merge_problems};

    /// Two pointers of patient 1, then 1 into 2 and 2 into 3 (a chain), one
    /// refused merge into a retired number and one self-merge, as the
    /// clients would record them.
    fn merged() -> (MemState, History) {
        let mut s = MemState::default();
        let mut h = History::default();
        for c in testkit::registry_commands(&PRODUCERS) {
            apply(&mut s, &c).unwrap();
        }
        let (a, b, c) = (testkit::nhs(1), testkit::nhs(2), testkit::nhs(3));
        for (i, custodian) in PRODUCERS.iter().enumerate() {
            let p = testkit::pointer(custodian, &format!("p{i}"), a, 1);
            h.created_attempted.insert(p.id.clone(), a);
            assert!(matches!(apply(&mut s, &testkit::create(custodian, p)).unwrap(), Outcome::Created { .. }));
        }
        for (source, target) in [(a, b), (b, c), (a, b), (c, b), (c, c)] {
            h.merge_attempted.insert((source, target));
            let outcome = apply(&mut s, &testkit::merge(source, target, 2)).unwrap();
            h.merges_acked.push((source, target, outcome));
        }
        (s, h)
    }

    #[test]
    fn a_chain_of_merges_passes() {
        let (s, h) = merged();
        let answers: Vec<_> = h.merges_acked.iter().map(|(_, _, o)| o.clone()).collect();
        assert!(
            matches!(
                answers[..],
                [
                    Outcome::Merged { moved: 2 },
                    Outcome::Merged { moved: 2 },
                    _,
                    Outcome::Rejected(_),
                    Outcome::Rejected(_)
                ]
            ),
            "{answers:?}"
        );
        assert_eq!(merge_problems(&s, &h), Vec::<String>::new());
    }

    #[test]
    fn a_broken_merge_is_found() {
        let (a, b, c) = (testkit::nhs(1), testkit::nhs(2), testkit::nhs(3));
        let (good, h) = merged();
        let id = good.pointers.keys().next().unwrap().clone();

        // A pointer left under the retired number, index and holders moved with it.
        let mut s = good.clone();
        let mut p = s.pointers[&id].clone();
        s.index.remove(&(p.subject, id.clone()));
        p.subject = a;
        s.index.insert((a, id.clone()));
        s.pointers.insert(id.clone(), p);
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("retired into")), "{:?}", merge_problems(&s, &h));

        // A redirect not rewritten when its survivor was retired.
        let mut s = good.clone();
        s.patients.get_mut(&a).unwrap().merged_into = Some(b);
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("itself retired")));

        // Holder counts that disagree with the pointers.
        let mut s = good.clone();
        s.patients.get_mut(&c).unwrap().held.clear();
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("holders")));

        // A merge answered Merged that the state does not show.
        let mut s = good.clone();
        s.patients.get_mut(&b).unwrap().merged_into = None;
        s.patients.get_mut(&c).unwrap().merged_from.remove(&b);
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("acknowledged merge")));

        // A retirement no client asked for.
        let mut s = good;
        let mut h = h;
        h.merge_attempted.remove(&(b, c));
        h.merges_acked.retain(|(source, _, _)| *source != b);
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("no client asked for")));
        s.pointers.clear();
        assert!(merge_problems(&s, &h).iter().any(|m| m.contains("index")));
    }
}
