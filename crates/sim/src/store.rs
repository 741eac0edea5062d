//! In-memory Raft log and state machine. What a node "persists" lives in an
//! `Arc` the simulation keeps across restarts, like a disk; the state machine
//! is the real one, [`hie_domain::apply`] over [`MemState`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hie_domain::apply::{ApplyError, apply};
use hie_domain::command::{Command, CommandV1, Outcome};
use hie_domain::mem::MemState;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError};
use sha2::{Digest, Sha256};

use crate::check::Checker;
use crate::{Entry, LogId, NodeId, SimConfig, Snapshot, SnapshotMeta, StorageError, StoredMembership, Vote};

#[derive(Default)]
struct LogInner {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry>,
}

/// One node's Raft log. The data outlives a crash, like a disk; each run of
/// the node gets its own handle, and a crash kills that handle, so nothing
/// the dead run still had in flight reaches the disk (a real process dies
/// with its threads; openraft's shutdown lets some tasks finish).
#[derive(Clone, Default)]
pub struct MemLog {
    inner: Arc<Mutex<LogInner>>,
    alive: Arc<AtomicBool>,
    defect: Option<Defect>,
}

/// A bug planted on purpose in a node's storage or state machine, to show
/// the checks find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// The vote is not durable: a restarted node has forgotten it.
    ForgetVote,
    /// Appends are acknowledged before they are durable: a crash loses the
    /// last entries.
    LoseTail,
    /// A read whose start was purged returns the later entries (hie's
    /// RocksDB store did this until the simulation found it).
    ShiftedRead,
    /// Every node's state machine skips NHS Number merges yet answers that
    /// they were done (`Merged { moved: 0 }`): the replicas still agree with
    /// each other, so only the end-of-run merge checks can see it.
    DropMerge,
}

impl Defect {
    /// How `--defect` names it.
    pub fn as_arg(self) -> &'static str {
        match self {
            Defect::ForgetVote => "forget-vote",
            Defect::LoseTail => "lose-tail",
            Defect::ShiftedRead => "shifted-read",
            Defect::DropMerge => "drop-merge",
        }
    }
}

/// The data behind `m`, unless the run holding this handle has crashed.
#[allow(clippy::result_large_err)] // openraft's StorageError, what its storage traits return
fn guard<'a, T>(alive: &AtomicBool, m: &'a Mutex<T>) -> Result<MutexGuard<'a, T>, StorageError> {
    if !alive.load(Ordering::SeqCst) {
        return Err(StorageIOError::write(AnyError::error("the process using this storage has crashed")).into());
    }
    Ok(m.lock().unwrap())
}

impl MemLog {
    /// A handle for a new run of the node.
    pub fn incarnation(&self) -> MemLog {
        let mut inner = self.inner.lock().unwrap();
        match self.defect {
            Some(Defect::ForgetVote) => inner.vote = None,
            Some(Defect::LoseTail) => {
                for _ in 0..2 {
                    inner.log.pop_last();
                }
            }
            _ => {}
        }
        MemLog { inner: self.inner.clone(), alive: Arc::new(AtomicBool::new(true)), defect: self.defect }
    }

    pub fn with_defect(defect: Option<Defect>) -> MemLog {
        MemLog { defect, ..MemLog::default() }
    }

    /// The run using this handle has crashed.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    #[allow(clippy::result_large_err)] // openraft's StorageError, what its storage traits return
    fn lock(&self) -> Result<MutexGuard<'_, LogInner>, StorageError> {
        guard(&self.alive, &self.inner)
    }

    /// The entries held, for the log-matching check.
    pub fn entries(&self) -> Vec<(LogId, [u8; 32])> {
        self.inner.lock().unwrap().log.values().map(|e| (e.log_id, entry_digest(e))).collect()
    }
}

pub fn entry_digest(entry: &Entry) -> [u8; 32] {
    let mut bytes = Vec::new();
    ciborium::into_writer(&entry.payload, &mut bytes).expect("an entry encodes");
    Sha256::digest(&bytes).into()
}

impl RaftLogReader<SimConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.lock()?.log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock()?;
        let out: Vec<Entry> = inner.log.range(start..end).map(|(_, e)| e.clone()).collect();
        // Replication's reads start where asked, as the RocksDB store's do: a
        // range whose start was purged meanwhile reads as nothing.
        if out.first().is_some_and(|e| e.log_id.index != start) && self.defect != Some(Defect::ShiftedRead) {
            return Ok(vec![]);
        }
        Ok(out)
    }
}

impl RaftLogStorage<SimConfig> for MemLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<SimConfig>, StorageError> {
        let inner = self.lock()?;
        let last = inner.log.values().next_back().map(|e| e.log_id).or(inner.last_purged);
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: last })
    }
    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.lock()?.vote = Some(*vote);
        Ok(())
    }
    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock()?.vote)
    }
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.lock()?.committed = committed;
        Ok(())
    }
    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock()?.committed)
    }
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<SimConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = self.lock()?;
            for e in entries {
                inner.log.insert(e.log_id.index, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        inner.log.split_off(&log_id.index);
        Ok(())
    }
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock()?;
        inner.last_purged = Some(log_id);
        inner.log = inner.log.split_off(&(log_id.index + 1));
        Ok(())
    }
}

struct SmInner {
    state: MemState,
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    snapshot_seq: u64,
}

/// One node's state machine, reporting what it applies to the checker.
#[derive(Clone)]
pub struct MemSm {
    node: NodeId,
    inner: Arc<Mutex<SmInner>>,
    checker: Arc<Mutex<Checker>>,
    alive: Arc<AtomicBool>,
    defect: Option<Defect>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotBody {
    state: MemState,
}

impl MemSm {
    pub fn new(node: NodeId, checker: Arc<Mutex<Checker>>, defect: Option<Defect>) -> Self {
        let inner = SmInner {
            state: MemState::default(),
            applied: None,
            membership: StoredMembership::default(),
            snapshot: None,
            snapshot_seq: 0,
        };
        MemSm { node, inner: Arc::new(Mutex::new(inner)), checker, alive: Arc::new(AtomicBool::new(true)), defect }
    }

    /// A handle for a new run of the node (see [`MemLog::incarnation`]).
    pub fn incarnation(&self) -> MemSm {
        MemSm { alive: Arc::new(AtomicBool::new(true)), ..self.clone() }
    }

    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    #[allow(clippy::result_large_err)] // openraft's StorageError, what its storage traits return
    fn lock(&self) -> Result<MutexGuard<'_, SmInner>, StorageError> {
        guard(&self.alive, &self.inner)
    }

    /// The applied index and a digest of the whole state.
    pub fn digest(&self) -> (Option<LogId>, String) {
        let inner = self.inner.lock().unwrap();
        let mut bytes = Vec::new();
        ciborium::into_writer(&inner.state, &mut bytes).expect("state encodes");
        (inner.applied, hex::encode(Sha256::digest(&bytes)))
    }

    pub fn applied(&self) -> Option<LogId> {
        self.inner.lock().unwrap().applied
    }

    pub fn state(&self) -> MemState {
        self.inner.lock().unwrap().state.clone()
    }
}

fn broken(log_id: LogId, msg: String) -> StorageError {
    StorageIOError::apply(log_id, AnyError::error(msg)).into()
}

impl RaftStateMachine<SimConfig> for MemSm {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.lock()?;
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock()?;
        let mut out = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let expected = inner.applied.map_or(1, |l| l.index + 1);
            // openraft's first entry is index 0 on a fresh cluster.
            if inner.applied.is_some() && log_id.index != expected {
                let msg = format!("node {}: applied index {} after {:?}", self.node, log_id.index, inner.applied);
                self.checker.lock().unwrap().violation(format!("apply order: {msg}"));
                return Err(broken(log_id, msg));
            }
            self.checker.lock().unwrap().on_apply(self.node, log_id, entry_digest(&entry));
            let outcome = match &entry.payload {
                EntryPayload::Blank => Outcome::None,
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(log_id), m.clone());
                    Outcome::None
                }
                EntryPayload::Normal(Command::V1(CommandV1::MergePatients { .. }))
                    if self.defect == Some(Defect::DropMerge) =>
                {
                    Outcome::Merged { moved: 0 }
                }
                EntryPayload::Normal(command) => match apply(&mut inner.state, command) {
                    Ok(o) => o,
                    Err(ApplyError::Storage(never)) => match never {},
                    Err(ApplyError::Invariant(e)) => {
                        let msg = format!("node {}: {e}", self.node);
                        self.checker.lock().unwrap().violation(format!("state invariant: {msg}"));
                        return Err(broken(log_id, msg));
                    }
                },
            };
            inner.applied = Some(log_id);
            out.push(outcome);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let bytes = data.into_inner();
        let body: SnapshotBody = ciborium::from_reader(&bytes[..])
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        let mut inner = self.lock()?;
        inner.state = body.state;
        inner.applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), bytes));
        drop(inner);
        self.checker.lock().unwrap().on_install(self.node, meta.last_log_id);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let inner = self.lock()?;
        Ok(inner
            .snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.clone())) }))
    }
}

impl RaftSnapshotBuilder<SimConfig> for MemSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let mut inner = self.lock()?;
        inner.snapshot_seq += 1;
        let snapshot_id = match inner.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.snapshot_seq),
            None => format!("0-0-{}", inner.snapshot_seq),
        };
        let meta = SnapshotMeta { last_log_id: inner.applied, last_membership: inner.membership.clone(), snapshot_id };
        let mut bytes = Vec::new();
        ciborium::into_writer(&SnapshotBody { state: inner.state.clone() }, &mut bytes).expect("state encodes");
        inner.snapshot = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}
