//! The state machine on RocksDB, and the read view the API serves from.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hie_domain::apply::{ApplyError, StateTxn, apply};
use hie_domain::codec;
use hie_domain::query::{Scanned, StateRead};
use hie_domain::raft::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use hie_domain::{
    AssigningAuthority, AuditAnchor, ConsumerEntry, Identifier, NhsNumber, OdsCode, Outcome, PagingKey, PatientEntry,
    PointerId, PointerType, ProducerEntry, RecordPointer, Registry, SnomedCode, Subscription, SubscriptionEvent,
    SubscriptionId,
};
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, RaftLogId, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{DB, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::snapshot::{self, OwnedSnapshot, SnapshotFiles};
use crate::{StoreError, cf, handle, keys};

fn sm_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

/// Counters of snapshot work, for metrics.
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    pub built_total: AtomicU64,
    pub installed_total: AtomicU64,
    /// Snapshot files that failed their checksum and were set aside.
    pub damaged_total: AtomicU64,
    pub last_bytes: AtomicU64,
    pub last_build_millis: AtomicU64,
    pub last_install_millis: AtomicU64,
}

/// The subscriptions whose record changed in an apply (new events, a new
/// status, created or deleted), for the node's deliverer: it waits on
/// [`SubscriptionWakes::changed`] instead of scanning every subscription.
#[derive(Debug, Default)]
pub struct SubscriptionWakes {
    changed: std::sync::Mutex<std::collections::BTreeSet<SubscriptionId>>,
    notify: tokio::sync::Notify,
}

impl SubscriptionWakes {
    fn mark(&self, ids: Vec<SubscriptionId>) {
        if ids.is_empty() {
            return;
        }
        self.changed.lock().expect("wakes lock").extend(ids);
        self.notify.notify_one();
    }

    /// Waits until some subscription changed (at once if one did since the
    /// last `take`).
    pub async fn changed(&self) {
        if !self.changed.lock().expect("wakes lock").is_empty() {
            return;
        }
        self.notify.notified().await
    }

    /// The subscriptions changed since the last call.
    pub fn take(&self) -> std::collections::BTreeSet<SubscriptionId> {
        std::mem::take(&mut *self.changed.lock().expect("wakes lock"))
    }
}

pub struct StateMachine {
    counters: Arc<SnapshotCounters>,
    wakes: Arc<SubscriptionWakes>,
    db: Arc<DB>,
    files: SnapshotFiles,
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot_seq: u64,
}

impl StateMachine {
    pub(crate) fn new(db: Arc<DB>, snapshot_dir: PathBuf) -> Result<StateMachine, StoreError> {
        let files = SnapshotFiles::open(snapshot_dir)?;
        snapshot::finish_interrupted_install(&db, &files.dir)?;
        let meta = handle(&db, cf::SM_META);
        let applied = match db.get_cf(meta, keys::APPLIED)? {
            Some(b) => codec::decode::<Option<LogId>>(&b).map_err(|e| corrupt(cf::SM_META, "applied", e))?,
            None => None,
        };
        let membership = match db.get_cf(meta, keys::MEMBERSHIP)? {
            Some(b) => codec::decode(&b).map_err(|e| corrupt(cf::SM_META, "membership", e))?,
            None => StoredMembership::default(),
        };
        Ok(StateMachine {
            counters: Arc::default(),
            wakes: Arc::default(),
            db,
            files,
            applied,
            membership,
            snapshot_seq: 0,
        })
    }

    pub fn counters(&self) -> Arc<SnapshotCounters> {
        self.counters.clone()
    }

    pub fn subscription_wakes(&self) -> Arc<SubscriptionWakes> {
        self.wakes.clone()
    }
}

/// A corrupt value's error, naming its key with any NHS Number in it (a
/// run of ten or more digits: patients' keys begin with one) masked, as the
/// error reaches logs and 500 answers.
fn corrupt(cf: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { cf, key: mask_digits(key), message: e.to_string() }
}

/// `key` with each run of ten or more digits replaced by `#`s.
fn mask_digits(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 10 {
            out.extend(std::iter::repeat_n('#', run.len()));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in key.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Stops an iterator at the end of `prefix`'s keys. Without a bound, a
/// seek that finds no live key under its prefix walks on over every
/// deleted key after it (a table of deleted subscriptions made each
/// create's lookups walk tens of thousands of tombstones).
fn bound_to_prefix(reads: &mut rocksdb::ReadOptions, prefix: &[u8]) {
    if let Some(end) = prefix_end(prefix) {
        reads.set_iterate_upper_bound(end);
    }
}

/// The first key after every key that begins with `prefix` (`None` when
/// there is none: a prefix of 0xff bytes only).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One apply's reads and writes: reads see the batch's own earlier writes.
struct RocksTxn<'a> {
    db: &'a DB,
    batch: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
    /// Reads answer only from memory (memtables, block cache); one that
    /// would need the disk fails with [`StoreError::WouldBlock`].
    reads: rocksdb::ReadOptions,
    memory_only: bool,
    /// Whether a subscription key was written (only then does a lookup of
    /// keys look through the overlay).
    subscription_keys_written: bool,
}

impl<'a> RocksTxn<'a> {
    fn new(db: &'a DB, memory_only: bool) -> Self {
        let mut reads = rocksdb::ReadOptions::default();
        if memory_only {
            reads.set_read_tier(rocksdb::ReadTier::BlockCache);
        }
        RocksTxn {
            db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            reads,
            memory_only,
            subscription_keys_written: false,
        }
    }

    fn get<T: DeserializeOwned>(&mut self, cf_name: &'static str, key: Vec<u8>) -> Result<Option<T>, StoreError> {
        let raw = match self.overlay.get(&(cf_name, key.clone())) {
            Some(v) => v.clone(),
            None => self.db.get_cf_opt(handle(self.db, cf_name), &key, &self.reads).map_err(StoreError::from_read)?,
        };
        match raw {
            None => Ok(None),
            Some(b) => codec::decode(&b).map(Some).map_err(|e| corrupt(cf_name, &String::from_utf8_lossy(&key), e)),
        }
    }

    fn put<T: Serialize + ?Sized>(&mut self, cf_name: &'static str, key: Vec<u8>, value: &T) {
        self.put_raw(cf_name, key, codec::encode(value))
    }

    fn put_raw(&mut self, cf_name: &'static str, key: Vec<u8>, bytes: Vec<u8>) {
        self.batch.put_cf(handle(self.db, cf_name), &key, &bytes);
        self.overlay.insert((cf_name, key), Some(bytes));
    }

    fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.batch.delete_cf(handle(self.db, cf_name), &key);
        self.overlay.insert((cf_name, key), None);
    }

    /// The rest of every key under `prefix`: what the database holds, with
    /// this transaction's own changes on top (`look_in_overlay`: whether
    /// it may have any).
    fn keys_under(
        &self,
        cf_name: &'static str,
        prefix: &[u8],
        look_in_overlay: bool,
    ) -> Result<std::collections::BTreeSet<Vec<u8>>, StoreError> {
        let mut found = std::collections::BTreeSet::new();
        let mut reads = rocksdb::ReadOptions::default();
        if self.memory_only {
            reads.set_read_tier(rocksdb::ReadTier::BlockCache);
        }
        bound_to_prefix(&mut reads, prefix);
        let mut it = self.db.raw_iterator_cf_opt(handle(self.db, cf_name), reads);
        it.seek(prefix);
        while let Some(k) = it.key() {
            if !k.starts_with(prefix) {
                break;
            }
            found.insert(k[prefix.len()..].to_vec());
            it.next();
        }
        it.status().map_err(StoreError::from_read)?;
        if look_in_overlay {
            for ((name, key), value) in &self.overlay {
                if *name == cf_name && key.starts_with(prefix) {
                    let rest = key[prefix.len()..].to_vec();
                    match value {
                        Some(_) => found.insert(rest),
                        None => found.remove(&rest),
                    };
                }
            }
        }
        Ok(found)
    }
}

impl StateTxn for RocksTxn<'_> {
    type Error = StoreError;

    fn pointer(&mut self, id: &PointerId) -> Result<Option<RecordPointer>, StoreError> {
        self.get(cf::POINTERS, keys::pointer(id))
    }
    fn put_pointer(&mut self, pointer: &RecordPointer) {
        self.put(cf::POINTERS, keys::pointer(&pointer.id), pointer)
    }
    fn delete_pointer(&mut self, id: &PointerId) {
        self.delete(cf::POINTERS, keys::pointer(id))
    }
    fn patient(&mut self, subject: &NhsNumber) -> Result<Option<PatientEntry>, StoreError> {
        self.get(cf::PATIENTS, keys::patient(subject))
    }
    fn put_patient(&mut self, subject: &NhsNumber, entry: &PatientEntry) {
        self.put(cf::PATIENTS, keys::patient(subject), entry)
    }
    fn delete_patient(&mut self, subject: &NhsNumber) {
        self.delete(cf::PATIENTS, keys::patient(subject))
    }
    fn index_add(&mut self, pointer: &RecordPointer) {
        let value = keys::index_value(&pointer.custodian, &pointer.type_code);
        self.put_raw(cf::INDEX, keys::index(&pointer.subject, &pointer.id), value)
    }
    fn index_remove(&mut self, subject: &NhsNumber, id: &PointerId) {
        self.delete(cf::INDEX, keys::index(subject, id))
    }
    fn index_ids(&mut self, subject: &NhsNumber, limit: usize) -> Result<Vec<PointerId>, StoreError> {
        let ids = self.keys_under(cf::INDEX, &keys::patient(subject), true)?;
        ids.iter().take(limit).map(|id| pointer_id(id)).collect()
    }
    fn local_id(&mut self, id: &Identifier) -> Result<Option<NhsNumber>, StoreError> {
        self.get(cf::LOCAL_IDS, keys::local_id(id))
    }
    fn put_local_id(&mut self, id: &Identifier, subject: &NhsNumber) {
        self.put(cf::LOCAL_IDS, keys::local_id(id), subject)
    }
    fn delete_local_id(&mut self, id: &Identifier) {
        self.delete(cf::LOCAL_IDS, keys::local_id(id))
    }
    fn authority(&mut self, system: &str) -> Result<Option<OdsCode>, StoreError> {
        Ok(self.get::<AssigningAuthority>(cf::REGISTRY, keys::authority(system))?.map(|a| a.ods))
    }
    fn put_authority(&mut self, entry: &AssigningAuthority) {
        self.put(cf::REGISTRY, keys::authority(&entry.system), entry)
    }
    fn delete_authority(&mut self, system: &str) {
        self.delete(cf::REGISTRY, keys::authority(system))
    }
    fn idempotency(&mut self, custodian: &OdsCode, key: &str) -> Result<Option<PointerId>, StoreError> {
        self.get(cf::IDEMPOTENCY, keys::idempotency(custodian, key))
    }
    fn put_idempotency(&mut self, custodian: &OdsCode, key: &str, id: &PointerId) {
        self.put(cf::IDEMPOTENCY, keys::idempotency(custodian, key), id)
    }
    fn delete_idempotency(&mut self, custodian: &OdsCode, key: &str) {
        self.delete(cf::IDEMPOTENCY, keys::idempotency(custodian, key))
    }
    fn pointer_type(&mut self, code: &SnomedCode) -> Result<Option<PointerType>, StoreError> {
        self.get(cf::REGISTRY, keys::pointer_type(code))
    }
    fn put_pointer_type(&mut self, entry: &PointerType) {
        self.put(cf::REGISTRY, keys::pointer_type(&entry.code), entry)
    }
    fn producer(&mut self, ods: &OdsCode) -> Result<Option<ProducerEntry>, StoreError> {
        self.get(cf::REGISTRY, keys::producer(ods))
    }
    fn put_producer(&mut self, ods: &OdsCode, entry: &ProducerEntry) {
        self.put(cf::REGISTRY, keys::producer(ods), entry)
    }
    fn consumer(&mut self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, StoreError> {
        self.get(cf::REGISTRY, keys::consumer(ods))
    }
    fn put_consumer(&mut self, ods: &OdsCode, entry: &ConsumerEntry) {
        self.put(cf::REGISTRY, keys::consumer(ods), entry)
    }
    fn delete_consumer(&mut self, ods: &OdsCode) {
        self.delete(cf::REGISTRY, keys::consumer(ods))
    }
    fn put_past_version(&mut self, pointer: &RecordPointer) {
        self.put(cf::HISTORY, keys::history(&pointer.id, pointer.version), pointer)
    }
    fn delete_past_version(&mut self, id: &PointerId, version: u64) {
        self.delete(cf::HISTORY, keys::history(id, version))
    }
    fn delete_past_versions(&mut self, id: &PointerId) {
        // A range delete in the batch: nothing in one apply reads a past
        // version back, so the overlay need not know of it.
        let (from, to) = (keys::history(id, 0), keys::history(id, u64::MAX));
        self.batch.delete_range_cf(handle(self.db, cf::HISTORY), &from, &to);
        self.batch.delete_cf(handle(self.db, cf::HISTORY), &to);
    }
    fn paging_key(&mut self) -> Result<Option<PagingKey>, StoreError> {
        self.get(cf::REGISTRY, keys::PAGING_KEY.to_vec())
    }
    fn put_paging_key(&mut self, key: &PagingKey) {
        self.put(cf::REGISTRY, keys::PAGING_KEY.to_vec(), key)
    }
    fn audit_anchor(&mut self, node: u64) -> Result<Option<AuditAnchor>, StoreError> {
        self.get(cf::REGISTRY, keys::audit_anchor(node))
    }
    fn put_audit_anchor(&mut self, anchor: &AuditAnchor) {
        self.put(cf::REGISTRY, keys::audit_anchor(anchor.node), anchor)
    }
    fn subscription(&mut self, id: &SubscriptionId) -> Result<Option<Subscription>, StoreError> {
        self.get(cf::SUBSCRIPTIONS, keys::subscription(id))
    }
    fn put_subscription(&mut self, subscription: &Subscription) {
        self.put(cf::SUBSCRIPTIONS, keys::subscription(&subscription.id), subscription)
    }
    fn delete_subscription(&mut self, id: &SubscriptionId) {
        self.delete(cf::SUBSCRIPTIONS, keys::subscription(id))
    }
    fn subscription_keys(&mut self, key: &str) -> Result<Vec<SubscriptionId>, StoreError> {
        let found =
            self.keys_under(cf::SUBSCRIPTIONS, &keys::subscription_key_prefix(key), self.subscription_keys_written)?;
        found
            .iter()
            .map(|id| {
                std::str::from_utf8(id)
                    .ok()
                    .and_then(SubscriptionId::parse)
                    .ok_or_else(|| corrupt(cf::SUBSCRIPTIONS, &String::from_utf8_lossy(id), "not a subscription id"))
            })
            .collect()
    }
    fn put_subscription_key(&mut self, key: &str, id: &SubscriptionId) {
        self.subscription_keys_written = true;
        let k = [keys::subscription_key_prefix(key).as_slice(), id.as_str().as_bytes()].concat();
        self.put_raw(cf::SUBSCRIPTIONS, k, vec![])
    }
    fn delete_subscription_key(&mut self, key: &str, id: &SubscriptionId) {
        self.subscription_keys_written = true;
        let k = [keys::subscription_key_prefix(key).as_slice(), id.as_str().as_bytes()].concat();
        self.delete(cf::SUBSCRIPTIONS, k)
    }
    fn put_subscription_event(&mut self, id: &SubscriptionId, event: &SubscriptionEvent) {
        self.put(cf::SUBSCRIPTIONS, keys::subscription_event(id, event.number), event)
    }
    fn delete_subscription_event(&mut self, id: &SubscriptionId, number: u64) {
        self.delete(cf::SUBSCRIPTIONS, keys::subscription_event(id, number))
    }
}

/// Batches of at most this many entries are first applied on the async
/// thread that asks, from memory; longer ones (a follower catching up) on a
/// blocking thread.
const APPLY_INLINE_ENTRIES_MAX: usize = 32;

/// Why a batch was not applied.
enum BatchError {
    /// A memory-only apply needed the disk; nothing was written.
    WouldBlock,
    /// Boxed: openraft's error is large, and this one is rarely made.
    Storage(Box<StorageError>),
}

impl From<StorageError> for BatchError {
    fn from(e: StorageError) -> Self {
        BatchError::Storage(Box::new(e))
    }
}

/// What a batch's apply gives: each entry's outcome, the last log id, and
/// the subscriptions whose record it changed.
type Applied = (Vec<Outcome>, Option<LogId>, Vec<SubscriptionId>);

/// Applies a batch of entries in one RocksDB write. `memory_only`: its
/// reads answer from memory only, and the batch fails with
/// [`BatchError::WouldBlock`], having written nothing, if one cannot.
fn apply_batch(
    db: &DB,
    entries: &[Entry],
    membership: &mut StoredMembership,
    memory_only: bool,
) -> Result<Applied, BatchError> {
    let mut txn = RocksTxn::new(db, memory_only);
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut last = None;
    for entry in entries {
        let log_id = *entry.get_log_id();
        let outcome = match &entry.payload {
            EntryPayload::Blank => Outcome::None,
            EntryPayload::Membership(m) => {
                *membership = StoredMembership::new(Some(log_id), m.clone());
                Outcome::None
            }
            EntryPayload::Normal(command) => match apply(&mut txn, command) {
                Ok(outcome) => outcome,
                Err(ApplyError::Storage(StoreError::WouldBlock)) => return Err(BatchError::WouldBlock),
                Err(ApplyError::Storage(e)) => {
                    return Err(StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))).into());
                }
                Err(ApplyError::Invariant(e)) => {
                    tracing::error!(index = log_id.index, error = %e, "state machine invariant broken; stopping");
                    return Err(StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))).into());
                }
            },
        };
        outcomes.push(outcome);
        last = Some(log_id);
    }
    let meta = handle(db, cf::SM_META);
    txn.batch.put_cf(meta, keys::APPLIED, codec::encode(&last));
    txn.batch.put_cf(meta, keys::MEMBERSHIP, codec::encode(&*membership));
    let changed: Vec<SubscriptionId> = txn
        .overlay
        .keys()
        .filter(|(name, key)| *name == cf::SUBSCRIPTIONS && key.starts_with(keys::SUBSCRIPTION_PREFIX))
        .filter_map(|(_, key)| {
            SubscriptionId::parse(std::str::from_utf8(&key[keys::SUBSCRIPTION_PREFIX.len()..]).ok()?)
        })
        .collect();
    db.write(txn.batch).map_err(sm_write)?;
    Ok((outcomes, last, changed))
}

impl From<BatchError> for StorageError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Storage(e) => *e,
            // Only a memory-only apply can need the disk.
            BatchError::WouldBlock => sm_write(StoreError::WouldBlock),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(vec![]);
        }
        // A few entries apply in tens of microseconds (memtable writes,
        // reads from memory): less than handing them to a blocking thread
        // and back, which costs two thread switches a batch. The log
        // store's append writes inline the same way. A batch whose reads
        // need the disk, or a catch-up's long batch, goes to a blocking
        // thread, so that neither holds up an async thread.
        let inline = (entries.len() <= APPLY_INLINE_ENTRIES_MAX).then(|| {
            let mut membership = self.membership.clone();
            apply_batch(&self.db, &entries, &mut membership, true).map(|(o, l, c)| (o, l, c, membership))
        });
        let (outcomes, last, changed, membership) = match inline {
            Some(Ok(applied)) => applied,
            Some(Err(BatchError::Storage(e))) => return Err(*e),
            Some(Err(BatchError::WouldBlock)) | None => {
                let db = self.db.clone();
                let mut membership = self.membership.clone();
                tokio::task::spawn_blocking(move || {
                    apply_batch(&db, &entries, &mut membership, false).map(|(o, l, c)| (o, l, c, membership))
                })
                .await
                .map_err(sm_write)??
            }
        };
        self.applied = last.or(self.applied);
        self.membership = membership;
        self.wakes.mark(changed);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            view: OwnedSnapshot::new(self.db.clone()),
            applied: self.applied,
            membership: self.membership.clone(),
            files: self.files.clone(),
            seq: self.snapshot_seq,
            counters: self.counters.clone(),
        }
    }

    /// A new file to receive a snapshot into (one at a time: openraft
    /// receives one stream, and a new one replaces it).
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.files.receiving_path();
        let file = tokio::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(StoreError::Io { path, source: e }))?;
        Ok(Box::new(file))
    }

    /// Installs a received snapshot: fsyncs and checks the file, makes it
    /// the current snapshot, then replaces the state from it in batches
    /// (see `snapshot`): memory stays bounded whatever its size.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Box<tokio::fs::File>) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let path = self.files.receiving_path();
        let received = data.into_std().await;
        let db = self.db.clone();
        let files = self.files.clone();
        let meta_owned = meta.clone();
        let size = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            use std::io::{Seek, SeekFrom};
            use std::os::unix::fs::MetadataExt;
            let io = |source| StoreError::Io { path: path.clone(), source };
            let mut received = received;
            let a = received.metadata().map_err(io)?;
            let ours = std::fs::metadata(&path).is_ok_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino()));
            let planted = crate::is_planted(crate::PlantedBug::SnapshotFsync);
            if ours {
                if !planted {
                    received.sync_all().map_err(io)?;
                }
            } else {
                // Some other file (openraft's API allows any): copied into
                // the receiving file first, streamed.
                received.seek(SeekFrom::Start(0)).map_err(io)?;
                let mut copy = std::fs::File::create(&path).map_err(io)?;
                std::io::copy(&mut received, &mut copy).map_err(io)?;
                if !planted {
                    copy.sync_all().map_err(io)?;
                }
            }
            snapshot::verify_file(&path, Some(&meta_owned))?;
            files.publish(&path, meta_owned.last_log_id, true)?;
            snapshot::install_file(&db, &files.current_path())?;
            Ok(std::fs::metadata(files.current_path()).map(|m| m.len()).unwrap_or(0))
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        tracing::info!(
            last_log_index = meta.last_log_id.map(|l| l.index),
            bytes = size,
            millis = started.elapsed().as_millis() as u64,
            "installed snapshot"
        );
        let c = &self.counters;
        c.installed_total.fetch_add(1, Ordering::Relaxed);
        c.last_bytes.store(size, Ordering::Relaxed);
        c.last_install_millis.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    /// The current snapshot file, checked whole first (it is read whole to
    /// be sent anyway): one that fails its checksum is set aside and a new
    /// one built from the state, so a damaged file is never sent, and a
    /// leader with one neither stops (openraft treats a snapshot it cannot
    /// read as fatal) nor stops its followers (who would refuse it).
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let files = self.files.clone();
        let opened = tokio::task::spawn_blocking(move || files.open_current_checked())
            .await
            .map_err(snap_err)?
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e))))?;
        match opened {
            snapshot::Current::Good(meta, file) => {
                Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
            }
            snapshot::Current::None => Ok(None),
            snapshot::Current::SetAside => {
                self.counters.damaged_total.fetch_add(1, Ordering::Relaxed);
                let mut builder = self.get_snapshot_builder().await;
                builder.build_snapshot().await.map(Some)
            }
        }
    }
}

/// Builds a snapshot from the consistent view taken when it was created.
pub struct SnapshotBuilder {
    view: OwnedSnapshot,
    applied: Option<LogId>,
    membership: StoredMembership,
    files: SnapshotFiles,
    seq: u64,
    counters: Arc<SnapshotCounters>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let snapshot_id = match self.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone(), snapshot_id };
        let view = self.view.clone();
        let files = self.files.clone();
        let path = files.building_path(self.seq);
        let meta_owned = meta.clone();
        let started = std::time::Instant::now();
        // Streamed from the view into the file: memory stays bounded.
        let (file, size) = tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64), StoreError> {
            let (file, size) = view.write_file(&meta_owned, &path)?;
            if !files.publish(&path, meta_owned.last_log_id, false)? {
                tracing::info!("a newer snapshot was installed meanwhile; this one is not kept");
            }
            Ok((file, size))
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        tracing::info!(
            last_log_index = meta.last_log_id.map(|l| l.index),
            bytes = size,
            millis = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        let c = &self.counters;
        c.built_total.fetch_add(1, Ordering::Relaxed);
        c.last_bytes.store(size, Ordering::Relaxed);
        c.last_build_millis.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

/// Counts for metrics (RocksDB estimates for the large tables).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateStats {
    pub pointers_estimate: u64,
    pub patients_estimate: u64,
    pub live_data_bytes: u64,
    pub sst_bytes: u64,
    pub memtable_bytes: u64,
}

/// Reads from the local replica. Methods may block on disk: call them from
/// a blocking thread, or on a [`ReadView::memory_only`] view, which never
/// touches the disk.
#[derive(Clone)]
pub struct ReadView {
    db: Arc<DB>,
    /// Read only what is in memory (memtables and the block cache); a read
    /// that would need the disk fails with [`StoreError::WouldBlock`].
    memory_only: bool,
}

impl ReadView {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        ReadView { db, memory_only: false }
    }

    /// The same view, answering only from memory, so that it can be called
    /// on an async thread: a read that would need the disk fails with
    /// [`StoreError::WouldBlock`] instead of blocking, and is then made
    /// again from a blocking thread.
    pub fn memory_only(&self) -> ReadView {
        ReadView { db: self.db.clone(), memory_only: true }
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    fn options(&self) -> rocksdb::ReadOptions {
        let mut o = rocksdb::ReadOptions::default();
        if self.memory_only {
            o.set_read_tier(rocksdb::ReadTier::BlockCache);
        }
        o
    }

    fn get<T: DeserializeOwned>(&self, cf_name: &'static str, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_cf_opt(handle(&self.db, cf_name), key, &self.options()).map_err(StoreError::from_read)? {
            None => Ok(None),
            Some(b) => codec::decode(&b).map(Some).map_err(|e| corrupt(cf_name, &String::from_utf8_lossy(key), e)),
        }
    }

    pub fn pointer(&self, id: &PointerId) -> Result<Option<RecordPointer>, StoreError> {
        self.get(cf::POINTERS, &keys::pointer(id))
    }

    pub fn patient(&self, subject: &NhsNumber) -> Result<Option<PatientEntry>, StoreError> {
        self.get(cf::PATIENTS, &keys::patient(subject))
    }

    pub fn pointer_type(&self, code: &SnomedCode) -> Result<Option<PointerType>, StoreError> {
        self.get(cf::REGISTRY, &keys::pointer_type(code))
    }

    pub fn producer(&self, ods: &OdsCode) -> Result<Option<ProducerEntry>, StoreError> {
        self.get(cf::REGISTRY, &keys::producer(ods))
    }

    pub fn pointer_types(&self) -> Result<Vec<PointerType>, StoreError> {
        self.scan_prefix(cf::REGISTRY, keys::TYPE_PREFIX)
    }

    /// The registry, whole: types, producers and consumers.
    pub fn registry(&self) -> Result<Registry, StoreError> {
        let entries = |prefix: &'static [u8]| -> Result<Vec<(OdsCode, Vec<u8>)>, StoreError> {
            let mut out = vec![];
            let mut it = self.db.raw_iterator_cf_opt(handle(&self.db, cf::REGISTRY), self.options());
            it.seek(prefix);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(prefix) {
                    break;
                }
                let ods = std::str::from_utf8(&k[prefix.len()..]).ok().and_then(|s| OdsCode::parse(s).ok());
                let ods = ods.ok_or_else(|| corrupt(cf::REGISTRY, &String::from_utf8_lossy(k), "not an ODS code"))?;
                out.push((ods, v.to_vec()));
                it.next();
            }
            it.status().map_err(StoreError::from_read)?;
            Ok(out)
        };
        let mut registry = Registry {
            types: self.pointer_types()?,
            authorities: self.scan_prefix(cf::REGISTRY, keys::AUTHORITY_PREFIX)?,
            ..Registry::default()
        };
        for (ods, v) in entries(keys::PRODUCER_PREFIX)? {
            let entry = codec::decode(&v).map_err(|e| corrupt(cf::REGISTRY, ods.as_str(), e))?;
            registry.producers.insert(ods, entry);
        }
        for (ods, v) in entries(keys::CONSUMER_PREFIX)? {
            let entry = codec::decode(&v).map_err(|e| corrupt(cf::REGISTRY, ods.as_str(), e))?;
            registry.consumers.insert(ods, entry);
        }
        Ok(registry)
    }

    fn scan_prefix<T: DeserializeOwned>(&self, cf_name: &'static str, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        let mut out = vec![];
        let mut reads = self.options();
        bound_to_prefix(&mut reads, prefix);
        let mut it = self.db.raw_iterator_cf_opt(handle(&self.db, cf_name), reads);
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            out.push(codec::decode(v).map_err(|e| corrupt(cf_name, &String::from_utf8_lossy(k), e))?);
            it.next();
        }
        it.status().map_err(StoreError::from_read)?;
        Ok(out)
    }

    pub fn stats(&self) -> StateStats {
        let prop = |cf_name: &str, name: &str| {
            self.db.property_int_value_cf(handle(&self.db, cf_name), name).ok().flatten().unwrap_or(0)
        };
        let sum = |name: &str| cf::ALL.iter().map(|c| prop(c, name)).sum::<u64>();
        StateStats {
            pointers_estimate: prop(cf::POINTERS, "rocksdb.estimate-num-keys"),
            patients_estimate: prop(cf::PATIENTS, "rocksdb.estimate-num-keys"),
            live_data_bytes: sum("rocksdb.estimate-live-data-size"),
            sst_bytes: sum("rocksdb.total-sst-files-size"),
            memtable_bytes: sum("rocksdb.cur-size-all-mem-tables"),
        }
    }

    /// The applied log id and a SHA-256 over every state-machine table, read
    /// from one consistent view. Replicas at the same applied index must agree.
    pub fn digest(&self) -> Result<(Option<LogId>, String, u64), StoreError> {
        OwnedSnapshot::new(self.db.clone()).digest()
    }

    /// A consistent view of the state for a backup, written out as it is
    /// read (`backup.rs`). `Store::restore` loads it into a new node.
    pub fn backup(&self) -> Result<crate::backup::BackupState, StoreError> {
        crate::backup::BackupState::new(OwnedSnapshot::new(self.db.clone()))
    }
}

impl StateRead for ReadView {
    type Error = StoreError;

    fn pointer(&self, id: &PointerId) -> Result<Option<RecordPointer>, StoreError> {
        ReadView::pointer(self, id)
    }

    fn patient(&self, subject: &NhsNumber) -> Result<Option<PatientEntry>, StoreError> {
        ReadView::patient(self, subject)
    }

    fn consumer(&self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, StoreError> {
        self.get(cf::REGISTRY, &keys::consumer(ods))
    }

    fn pointer_types(&self) -> Result<Vec<PointerType>, StoreError> {
        ReadView::pointer_types(self)
    }

    fn paging_key(&self) -> Result<Option<PagingKey>, StoreError> {
        self.get(cf::REGISTRY, keys::PAGING_KEY)
    }

    fn audit_anchors(&self) -> Result<Vec<AuditAnchor>, StoreError> {
        self.scan_prefix(cf::REGISTRY, keys::AUDIT_ANCHOR_PREFIX)
    }

    fn subscription(&self, id: &SubscriptionId) -> Result<Option<Subscription>, StoreError> {
        self.get(cf::SUBSCRIPTIONS, &keys::subscription(id))
    }

    fn subscriptions(&self, limit: usize) -> Result<Vec<Subscription>, StoreError> {
        let mut all: Vec<Subscription> = self.scan_prefix(cf::SUBSCRIPTIONS, keys::SUBSCRIPTION_PREFIX)?;
        all.truncate(limit);
        Ok(all)
    }

    fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<SubscriptionEvent>, StoreError> {
        let mut out = vec![];
        if from > until {
            return Ok(out);
        }
        let end = keys::subscription_event(id, until);
        let mut reads = self.options();
        bound_to_prefix(&mut reads, &keys::subscription_events_prefix(id));
        let mut it = self.db.raw_iterator_cf_opt(handle(&self.db, cf::SUBSCRIPTIONS), reads);
        it.seek(keys::subscription_event(id, from));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k > end.as_slice() || out.len() >= limit {
                break;
            }
            out.push(codec::decode(v).map_err(|e| corrupt(cf::SUBSCRIPTIONS, &String::from_utf8_lossy(k), e))?);
            it.next();
        }
        it.status().map_err(StoreError::from_read)?;
        Ok(out)
    }

    fn local_id(&self, id: &Identifier) -> Result<Option<NhsNumber>, StoreError> {
        self.get(cf::LOCAL_IDS, &keys::local_id(id))
    }

    fn authority(&self, system: &str) -> Result<Option<OdsCode>, StoreError> {
        Ok(self.get::<AssigningAuthority>(cf::REGISTRY, &keys::authority(system))?.map(|a| a.ods))
    }

    fn past_version(&self, id: &PointerId, version: u64) -> Result<Option<RecordPointer>, StoreError> {
        self.get(cf::HISTORY, &keys::history(id, version))
    }

    /// Walks the pointer's past versions backwards from the newest.
    fn past_versions(&self, id: &PointerId, limit: usize) -> Result<Vec<RecordPointer>, StoreError> {
        let prefix = keys::history_prefix(id);
        let mut out = vec![];
        let mut it = self.db.raw_iterator_cf_opt(handle(&self.db, cf::HISTORY), self.options());
        it.seek_for_prev(keys::history(id, u64::MAX));
        while out.len() < limit
            && let (Some(k), Some(v)) = (it.key(), it.value())
        {
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(codec::decode(v).map_err(|e| corrupt(cf::HISTORY, &String::from_utf8_lossy(k), e))?);
            it.prev();
        }
        it.status().map_err(StoreError::from_read)?;
        Ok(out)
    }

    /// Seeks to the patient's first index entry after `after` and walks
    /// the index in key order; the index entry and the pointers it names
    /// are read from one RocksDB snapshot.
    fn scan(
        &self,
        subject: &NhsNumber,
        after: Option<&PointerId>,
        limit: usize,
        scan_max: usize,
        keep: &mut dyn FnMut(&str, &str) -> bool,
    ) -> Result<Scanned, StoreError> {
        let prefix = keys::patient(subject);
        let snap = self.db.snapshot();
        let mut it = snap.raw_iterator_cf_opt(handle(&self.db, cf::INDEX), self.options());
        match after {
            Some(a) => {
                let start = keys::index(subject, a);
                it.seek(&start);
                if it.key() == Some(start.as_slice()) {
                    it.next();
                }
            }
            None => it.seek(&prefix),
        }
        let pointers = handle(&self.db, cf::POINTERS);
        let read_pointer = |id: &[u8]| -> Result<RecordPointer, StoreError> {
            let name = || String::from_utf8_lossy(id).into_owned();
            let raw = snap
                .get_cf_opt(pointers, id, self.options())
                .map_err(StoreError::from_read)?
                .ok_or_else(|| corrupt(cf::INDEX, &name(), "index names a missing pointer"))?;
            codec::decode(&raw).map_err(|e| corrupt(cf::POINTERS, &name(), e))
        };
        let mut out = Scanned::default();
        let mut looked: Option<Vec<u8>> = None;
        let mut n = 0;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix) {
                break;
            }
            let id = &k[prefix.len()..];
            if n == scan_max.max(1) {
                out.resume_after = looked.as_deref().map(pointer_id).transpose()?;
                return Ok(out);
            }
            n += 1;
            looked = Some(id.to_vec());
            // The index entry names the custodian and type; one that does
            // not (written before index entries carried them) is decided
            // on the pointer.
            let (wanted, pointer) = match keys::parse_index_value(v) {
                Some((custodian, type_code)) => (keep(custodian, type_code), None),
                None => {
                    let p = read_pointer(id)?;
                    (keep(p.custodian.as_str(), p.type_code.as_str()), Some(p))
                }
            };
            if wanted {
                if out.pointers.len() == limit {
                    out.resume_after = out.pointers.last().map(|p| p.id.clone());
                    return Ok(out);
                }
                out.pointers.push(match pointer {
                    Some(p) => p,
                    None => read_pointer(id)?,
                });
            }
            it.next();
        }
        it.status().map_err(StoreError::from_read)?;
        Ok(out)
    }
}

/// A pointer id from an index key's tail.
fn pointer_id(bytes: &[u8]) -> Result<PointerId, StoreError> {
    let text = String::from_utf8_lossy(bytes);
    PointerId::parse(&text).map_err(|e| corrupt(cf::INDEX, &text, e))
}

#[cfg(test)]
mod prefix_tests {
    #[test]
    fn a_prefix_ends_where_its_keys_do() {
        assert_eq!(super::prefix_end(b"k/a\0"), Some(b"k/a\x01".to_vec()));
        assert_eq!(super::prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(super::prefix_end(b"\xff"), None);
    }
}

#[cfg(test)]
mod tests {
    use hie_domain::mem::testkit;
    use hie_domain::raft::Entry;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    /// A corrupt patient record's error names its key without the NHS Number.
    #[test]
    fn a_corrupt_keys_nhs_number_is_masked() {
        let e = super::corrupt("patients", "9000000009\u{0}RX9-1234", "bad cbor");
        let text = e.to_string();
        assert!(!text.contains("9000000009"), "{text}");
        assert!(text.contains("##########") && text.contains("RX9-1234"), "{text}");
    }

    use hie_domain::query::StateRead;

    use crate::{Store, StoreError, StoreOptions, cf, handle};

    fn entry(index: u64, command: hie_domain::Command) -> Entry {
        Entry {
            log_id: hie_domain::raft::LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    /// Applies a producer and 40 pointers (4 for each of patients 0 to 9);
    /// the index of the last entry.
    async fn apply_forty_pointers(store: &mut Store) -> u64 {
        let mut cmds = testkit::registry_commands(&["A81001"]);
        for i in 0..40u32 {
            cmds.push(testkit::create("A81001", testkit::pointer("A81001", &format!("p{i}"), testkit::nhs(i % 10), 0)));
        }
        let n = cmds.len() as u64;
        store.state_machine.apply(cmds.into_iter().zip(1..).map(|(c, i)| entry(i, c))).await.unwrap();
        n
    }

    /// Flushes every table to SST files and opens the store again, with an
    /// empty block cache: its data is then only on disk.
    fn reopen_from_disk(store: Store, dir: &std::path::Path) -> Store {
        for name in cf::ALL {
            store.reads.db().flush_cf(handle(store.reads.db(), name)).unwrap();
        }
        drop(store);
        Store::open(dir, StoreOptions::default()).unwrap()
    }

    fn search(view: &super::ReadView, i: u32) -> Result<usize, StoreError> {
        let nhs = testkit::nhs(i);
        view.patient(&nhs)?;
        Ok(StateRead::scan(view, &nhs, None, 100, 10_000, &mut |_, _| true)?.pointers.len())
    }

    /// A memory-only view answers what is in memory exactly as the normal
    /// view does, and refuses (rather than reads the disk) what is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_memory_only_read_answers_from_memory_or_says_it_needs_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        apply_forty_pointers(&mut store).await;
        // In the memtable: both views agree.
        for i in 0..10 {
            assert_eq!(search(&store.reads.memory_only(), i).unwrap(), 4);
            assert_eq!(search(&store.reads, i).unwrap(), 4);
        }
        // Flushed to SST files and reopened with an empty block cache: only
        // the disk has it.
        let store = reopen_from_disk(store, dir.path());
        assert!(matches!(search(&store.reads.memory_only(), 3), Err(StoreError::WouldBlock)));
        assert_eq!(search(&store.reads, 3).unwrap(), 4);
        // Whether the normal read's blocks are still cached is RocksDB's
        // business (its background work after a reopen may replace the
        // files they came from): from memory the answer is the right one
        // or "needs the disk", never a wrong one.
        match search(&store.reads.memory_only(), 3) {
            Ok(n) => assert_eq!(n, 4),
            Err(StoreError::WouldBlock) => {}
            Err(e) => panic!("{e}"),
        }
    }

    /// A short batch is applied first from memory on the async thread; when
    /// its reads need the disk it writes nothing there and is applied again
    /// on a blocking thread, with the same result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_apply_whose_reads_need_the_disk_writes_nothing_from_memory_and_is_applied_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let n = apply_forty_pointers(&mut store).await;
        let mut store = reopen_from_disk(store, dir.path());
        // A create for patient 3 reads the producer, its pointer types and
        // the patient's entry, all on disk only.
        let more =
            vec![entry(n + 1, testkit::create("A81001", testkit::pointer("A81001", "p-more", testkit::nhs(3), 0)))];
        let mut membership = Default::default();
        let db = store.reads.db();
        assert!(matches!(super::apply_batch(db, &more, &mut membership, true), Err(super::BatchError::WouldBlock)));
        assert_eq!(search(&store.reads, 3).unwrap(), 4, "the memory-only attempt wrote nothing");
        store.state_machine.apply(more).await.unwrap();
        assert_eq!(search(&store.reads, 3).unwrap(), 5);
    }
}
