//! The state machine's business logic: applies one command to a state.
//!
//! Pure and deterministic: the same command on the same state gives the same
//! outcome and the same changes on every replica. Storage supplies a
//! [`StateTxn`], which reads through its own uncommitted changes.

use crate::command::{Caller, Command, CommandV1, Outcome, Rejection, Role};
use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{
    AssigningAuthority, AuditAnchor, ConsumerEntry, Identifier, PagingKey, PatientEntry, PointerStatus, PointerType,
    ProducerEntry, ProducerPermission, RecordPointer, Timestamp,
};
use crate::subscription::{self, Change, Subscription, SubscriptionEvent, SubscriptionId};

/// Reads and changes state within one apply. Reads see the transaction's
/// own earlier writes.
pub trait StateTxn {
    type Error;

    fn pointer(&mut self, id: &PointerId) -> Result<Option<RecordPointer>, Self::Error>;
    fn put_pointer(&mut self, pointer: &RecordPointer);
    fn delete_pointer(&mut self, id: &PointerId);

    fn patient(&mut self, subject: &NhsNumber) -> Result<Option<PatientEntry>, Self::Error>;
    fn put_patient(&mut self, subject: &NhsNumber, entry: &PatientEntry);
    fn delete_patient(&mut self, subject: &NhsNumber);

    /// The patient's list of current pointers (each entry names the
    /// pointer's custodian and type, so a search can filter without
    /// reading the pointer).
    fn index_add(&mut self, pointer: &RecordPointer);
    fn index_remove(&mut self, subject: &NhsNumber, id: &PointerId);
    /// The ids in the patient's list of current pointers, in id order, at
    /// most `limit`.
    fn index_ids(&mut self, subject: &NhsNumber, limit: usize) -> Result<Vec<PointerId>, Self::Error>;

    /// The cross-reference table: a local identifier to the NHS Number it names.
    fn local_id(&mut self, id: &Identifier) -> Result<Option<NhsNumber>, Self::Error>;
    fn put_local_id(&mut self, id: &Identifier, subject: &NhsNumber);
    fn delete_local_id(&mut self, id: &Identifier);

    /// The organisation that assigns an identifier system.
    fn authority(&mut self, system: &str) -> Result<Option<OdsCode>, Self::Error>;
    fn put_authority(&mut self, entry: &AssigningAuthority);
    fn delete_authority(&mut self, system: &str);

    /// `(custodian, masterIdentifier)` to pointer id.
    fn idempotency(&mut self, custodian: &OdsCode, key: &str) -> Result<Option<PointerId>, Self::Error>;
    fn put_idempotency(&mut self, custodian: &OdsCode, key: &str, id: &PointerId);
    fn delete_idempotency(&mut self, custodian: &OdsCode, key: &str);

    fn pointer_type(&mut self, code: &SnomedCode) -> Result<Option<PointerType>, Self::Error>;
    fn put_pointer_type(&mut self, entry: &PointerType);

    fn producer(&mut self, ods: &OdsCode) -> Result<Option<ProducerEntry>, Self::Error>;
    fn put_producer(&mut self, ods: &OdsCode, entry: &ProducerEntry);

    fn consumer(&mut self, ods: &OdsCode) -> Result<Option<ConsumerEntry>, Self::Error>;
    fn put_consumer(&mut self, ods: &OdsCode, entry: &ConsumerEntry);
    fn delete_consumer(&mut self, ods: &OdsCode);

    /// A version of a pointer that is no longer its current one.
    fn put_past_version(&mut self, pointer: &RecordPointer);
    fn delete_past_version(&mut self, id: &PointerId, version: u64);
    /// Every past version of the pointer.
    fn delete_past_versions(&mut self, id: &PointerId);

    fn paging_key(&mut self) -> Result<Option<PagingKey>, Self::Error>;
    fn put_paging_key(&mut self, key: &PagingKey);

    fn audit_anchor(&mut self, node: u64) -> Result<Option<AuditAnchor>, Self::Error>;
    fn put_audit_anchor(&mut self, anchor: &AuditAnchor);

    fn subscription(&mut self, id: &SubscriptionId) -> Result<Option<Subscription>, Self::Error>;
    fn put_subscription(&mut self, subscription: &Subscription);
    fn delete_subscription(&mut self, id: &SubscriptionId);
    /// The subscriptions filed under `key` (a filter's value or an owner), in id order.
    fn subscription_keys(&mut self, key: &str) -> Result<Vec<SubscriptionId>, Self::Error>;
    fn put_subscription_key(&mut self, key: &str, id: &SubscriptionId);
    fn delete_subscription_key(&mut self, key: &str, id: &SubscriptionId);
    fn put_subscription_event(&mut self, id: &SubscriptionId, event: &SubscriptionEvent);
    fn delete_subscription_event(&mut self, id: &SubscriptionId, number: u64);
}

/// An invariant of the state that applying found broken: the replica's data
/// is not what the commands before it should have made. Fatal.
#[derive(Debug, thiserror::Error)]
#[error("state invariant broken: {0}")]
pub struct InvariantBroken(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError<E> {
    #[error("storage: {0}")]
    Storage(E),
    #[error(transparent)]
    Invariant(#[from] InvariantBroken),
}

pub(crate) type ApplyResult<T, E> = Result<T, ApplyError<E>>;

/// The idempotency key of a masterIdentifier.
pub fn master_identifier_key(system: &str, value: &str) -> String {
    format!("{system}|{value}")
}

pub fn apply<T: StateTxn>(txn: &mut T, command: &Command) -> ApplyResult<Outcome, T::Error> {
    match command {
        Command::V1(c) => apply_v1(txn, c),
    }
}

fn apply_v1<T: StateTxn>(txn: &mut T, command: &CommandV1) -> ApplyResult<Outcome, T::Error> {
    let outcome = match command {
        CommandV1::CreatePointer { caller, pointer } => create(txn, caller, pointer)?,
        CommandV1::PutPointer { caller, pointer, if_match } => put(txn, caller, pointer, *if_match)?,
        CommandV1::DeletePointer { caller, id, at } => delete(txn, caller, id, *at)?,
        CommandV1::PutPointerType { caller, entry } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may change the pointer-type registry"));
            }
            txn.put_pointer_type(entry);
            Outcome::Done
        }
        CommandV1::SetProducerTypes { caller, ods, types, permissions } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may change a producer's pointer types"));
            }
            let entry = ProducerEntry { allowed_types: sorted(types), permissions: permissions.clone() };
            txn.put_producer(ods, &entry);
            Outcome::Done
        }
        CommandV1::SetConsumerTypes { caller, ods, types, permissions } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may change a consumer's pointer types"));
            }
            let entry = ConsumerEntry { allowed_types: types.as_deref().map(sorted), permissions: permissions.clone() };
            // No entry reads as the default: every type, no permission.
            if entry == ConsumerEntry::default() {
                txn.delete_consumer(ods);
            } else {
                txn.put_consumer(ods, &entry);
            }
            Outcome::Done
        }
        CommandV1::SetPagingKey { key } => {
            if txn.paging_key().map_err(ApplyError::Storage)?.is_none() {
                txn.put_paging_key(key);
            }
            Outcome::Done
        }
        CommandV1::AnchorAudit { anchor } => {
            if !anchor.well_formed() {
                return Ok(Outcome::Rejected(Rejection::Invalid {
                    reason: "an audit anchor needs a seq and a SHA-256 hash".into(),
                }));
            }
            let stored = txn.audit_anchor(anchor.node).map_err(ApplyError::Storage)?;
            if stored.is_none_or(|s| s.seq < anchor.seq) {
                txn.put_audit_anchor(anchor);
            }
            Outcome::Done
        }
        CommandV1::SetConsent { caller, subject, opted_out, at } => {
            if !caller.has(Role::ConsentAuthority) {
                return Ok(forbidden("only a consent authority may record a sharing preference"));
            }
            let (subject, entry) = survivor(txn, subject)?;
            let mut entry = entry.unwrap_or_default();
            entry.opted_out = *opted_out;
            entry.consent_updated = Some(*at);
            txn.put_patient(&subject, &entry);
            Outcome::Done
        }
        CommandV1::PutAuthority { caller, system, ods } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may register an identifier system"));
            }
            match ods {
                Some(ods) => txn.put_authority(&AssigningAuthority { system: system.clone(), ods: ods.clone() }),
                None => txn.delete_authority(system),
            }
            Outcome::Done
        }
        CommandV1::PutLocalId { caller, id, subject, .. } => crate::identity::put_local_id(txn, caller, id, subject)?,
        CommandV1::DeleteLocalId { caller, id, .. } => crate::identity::delete_local_id(txn, caller, id)?,
        CommandV1::MergePatients { caller, source, target, at } => {
            crate::identity::merge(txn, caller, source, target, *at)?
        }
        CommandV1::CreateSubscription { caller, subscription: sub } => subscription::create(txn, caller, sub)?,
        CommandV1::DeleteSubscription { caller, id } => subscription::delete(txn, caller, id)?,
        CommandV1::SubscriptionProgress { updates } => subscription::progress(txn, updates)?,
        CommandV1::Batch(commands) => {
            let mut outcomes = Vec::with_capacity(commands.len());
            for c in commands {
                outcomes.push(match c {
                    CommandV1::Batch(_) => {
                        Outcome::Rejected(Rejection::Invalid { reason: "a batch may not hold another batch".into() })
                    }
                    c => apply_v1(txn, c)?,
                });
            }
            Outcome::Batch(outcomes)
        }
    };
    Ok(outcome)
}

fn sorted(types: &[SnomedCode]) -> Vec<SnomedCode> {
    let mut out = types.to_vec();
    out.sort();
    out.dedup();
    out
}

pub(crate) fn forbidden(reason: &str) -> Outcome {
    Outcome::Rejected(Rejection::Forbidden { reason: reason.to_owned() })
}

/// Checks that the caller may publish or change this pointer: a producer,
/// custodian of it, allowed its type, whose category matches the registry.
/// The producer's registry entry, or why it may not.
fn check_producer<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    pointer: &RecordPointer,
) -> ApplyResult<Result<ProducerEntry, Rejection>, T::Error> {
    if !caller.has(Role::Producer) {
        return Ok(Err(Rejection::Forbidden { reason: "only a producer may publish pointers".into() }));
    }
    if pointer.custodian != caller.ods {
        return Ok(Err(Rejection::Forbidden {
            reason: format!("custodian {} is not the caller's organisation {}", pointer.custodian, caller.ods),
        }));
    }
    if pointer.id.custodian() != pointer.custodian {
        return Ok(Err(Rejection::Forbidden {
            reason: "a producer may only choose ids beginning with its own ODS code".into(),
        }));
    }
    let Some(registered) = txn.pointer_type(&pointer.type_code).map_err(ApplyError::Storage)? else {
        return Ok(Err(Rejection::UnknownType { code: pointer.type_code.clone() }));
    };
    if registered.category != pointer.category {
        return Ok(Err(Rejection::CategoryMismatch {
            given: pointer.category.clone(),
            registered: registered.category,
        }));
    }
    let producer = txn.producer(&caller.ods).map_err(ApplyError::Storage)?.unwrap_or_default();
    if !producer.allowed_types.contains(&pointer.type_code) {
        return Ok(Err(Rejection::Forbidden {
            reason: format!("organisation {} may not publish pointers of type {}", caller.ods, pointer.type_code),
        }));
    }
    Ok(Ok(producer))
}

/// Keeps `version` as a past version of its pointer, forgetting the one
/// [`RecordPointer::PAST_VERSIONS_MAX`] before it.
pub(crate) fn keep_past_version<T: StateTxn>(txn: &mut T, version: &RecordPointer) {
    txn.put_past_version(version);
    if version.version > RecordPointer::PAST_VERSIONS_MAX {
        txn.delete_past_version(&version.id, version.version - RecordPointer::PAST_VERSIONS_MAX);
    }
}

pub(crate) fn holder_add(entry: &mut PatientEntry, pointer: &RecordPointer) {
    let types = entry.held.entry(pointer.custodian.clone()).or_default();
    *types.entry(pointer.type_code.clone()).or_insert(0) += 1;
}

fn holder_remove(entry: &mut PatientEntry, pointer: &RecordPointer) -> Result<(), InvariantBroken> {
    let (custodian, code) = (&pointer.custodian, &pointer.type_code);
    let below_zero =
        || InvariantBroken(format!("the count of {custodian}'s pointers of type {code} would go below zero"));
    let types = entry.held.get_mut(custodian).ok_or_else(below_zero)?;
    match types.get_mut(code) {
        Some(n) if *n > 1 => *n -= 1,
        Some(_) => {
            types.remove(code);
            if types.is_empty() {
                entry.held.remove(custodian);
            }
        }
        None => return Err(below_zero()),
    }
    Ok(())
}

pub(crate) fn save_patient<T: StateTxn>(txn: &mut T, subject: &NhsNumber, entry: &PatientEntry) {
    if entry.is_empty() {
        txn.delete_patient(subject);
    } else {
        txn.put_patient(subject, entry);
    }
}

/// The number `subject` stands for now (itself, or the survivor of the
/// merge that retired it), and that number's entry.
pub(crate) fn survivor<T: StateTxn>(
    txn: &mut T,
    subject: &NhsNumber,
) -> ApplyResult<(NhsNumber, Option<PatientEntry>), T::Error> {
    let entry = txn.patient(subject).map_err(ApplyError::Storage)?;
    match entry.as_ref().and_then(|e| e.merged_into) {
        None => Ok((*subject, entry)),
        Some(target) => {
            let entry = txn.patient(&target).map_err(ApplyError::Storage)?;
            if entry.as_ref().is_some_and(|e| e.merged_into.is_some()) {
                return Err(InvariantBroken("a merge redirect names a retired number".into()).into());
            }
            Ok((target, entry))
        }
    }
}

/// The pointer as its survivor's, if its subject was retired by a merge.
fn under_survivor<T: StateTxn>(txn: &mut T, sent: &RecordPointer) -> ApplyResult<RecordPointer, T::Error> {
    let (subject, _) = survivor(txn, &sent.subject)?;
    let mut pointer = sent.clone();
    if subject != sent.subject {
        pointer.subject = subject;
        pointer.body = sent.body.with_subject_value(subject.as_str());
    }
    Ok(pointer)
}

fn create<T: StateTxn>(txn: &mut T, caller: &Caller, sent: &RecordPointer) -> ApplyResult<Outcome, T::Error> {
    let producer = match check_producer(txn, caller, sent)? {
        Ok(p) => p,
        Err(r) => return Ok(Outcome::Rejected(r)),
    };
    // A create for a retired number is stored under the survivor.
    let mut pointer = under_survivor(txn, sent)?;
    if !producer.permissions.contains(&ProducerPermission::Migration) {
        // The server's time of the create: only a migration keeps its own.
        pointer.date = None;
    }
    let pointer = &pointer;
    if pointer.status != PointerStatus::Current || pointer.version != 1 {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            reason: "a new pointer must be `current` at version 1".into(),
        }));
    }
    if let Some(existing) = txn.pointer(&pointer.id).map_err(ApplyError::Storage)? {
        return Ok(Outcome::Rejected(Rejection::AlreadyExists { id: existing.id }));
    }
    let idem_key = pointer.master_identifier.as_ref().map(|m| master_identifier_key(&m.system, &m.value));
    if let Some(key) = &idem_key
        && let Some(existing) = txn.idempotency(&pointer.custodian, key).map_err(ApplyError::Storage)?
    {
        return Ok(Outcome::Rejected(Rejection::Duplicate { existing }));
    }

    let mut patient = txn.patient(&pointer.subject).map_err(ApplyError::Storage)?.unwrap_or_default();

    let mut superseded = None;
    if let Some(old_id) = &pointer.replaces {
        // Decided from the id alone first: the same answer for another
        // organisation's pointer whether or not it exists.
        if old_id.custodian() != caller.ods {
            return Ok(forbidden("a pointer may only replace a pointer of the same custodian"));
        }
        let Some(mut old) = txn.pointer(old_id).map_err(ApplyError::Storage)? else {
            return Ok(Outcome::Rejected(Rejection::Invalid {
                reason: format!("relatesTo target {old_id} does not exist"),
            }));
        };
        if old.custodian != caller.ods {
            return Ok(forbidden("a pointer may only replace a pointer of the same custodian"));
        }
        if old.subject != pointer.subject || old.type_code != pointer.type_code {
            return Ok(Outcome::Rejected(Rejection::Invalid {
                reason: "a replaced pointer must be of the same patient and type".into(),
            }));
        }
        if old.status != PointerStatus::Current {
            return Ok(Outcome::Rejected(Rejection::Invalid {
                reason: format!("relatesTo target {old_id} is not current"),
            }));
        }
        keep_past_version(txn, &old);
        old.status = PointerStatus::Superseded;
        old.version += 1;
        old.updated = pointer.created;
        txn.put_pointer(&old);
        txn.index_remove(&old.subject, &old.id);
        holder_remove(&mut patient, &old)?;
        superseded = Some(old);
    }

    txn.put_pointer(pointer);
    txn.index_add(pointer);
    if let Some(key) = &idem_key {
        txn.put_idempotency(&pointer.custodian, key, &pointer.id);
    }
    holder_add(&mut patient, pointer);
    save_patient(txn, &pointer.subject, &patient);
    subscription::pointer_changed(txn, pointer, None, Change::Created, pointer.created)?;
    if let Some(old) = &superseded {
        subscription::pointer_changed(txn, old, None, Change::Superseded, pointer.created)?;
    }
    Ok(Outcome::Created { pointer: pointer.clone(), superseded: pointer.replaces.clone() })
}

/// A PUT: an update if the pointer exists here, at apply, else a create
/// with the producer's own id.
fn put<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    pointer: &RecordPointer,
    if_match: Option<u64>,
) -> ApplyResult<Outcome, T::Error> {
    let pointer = &under_survivor(txn, pointer)?;
    match txn.pointer(&pointer.id).map_err(ApplyError::Storage)? {
        Some(old) => update(txn, caller, old, pointer, if_match),
        None => {
            let mut new = pointer.clone();
            new.version = 1;
            new.created = pointer.updated;
            create(txn, caller, &new)
        }
    }
}

/// What an update may not change (NRL's immutable fields): the typed ones,
/// and `author` and `relatesTo` as sent.
fn immutable_changed(old: &RecordPointer, new: &RecordPointer) -> bool {
    old.subject != new.subject
        || old.custodian != new.custodian
        || old.type_code != new.type_code
        || old.master_identifier != new.master_identifier
        || old.replaces != new.replaces
        || old.status != new.status
        || old.body.member("author") != new.body.member("author")
        || old.body.member("relatesTo") != new.body.member("relatesTo")
}

fn update<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    old: RecordPointer,
    new: &RecordPointer,
    if_match: Option<u64>,
) -> ApplyResult<Outcome, T::Error> {
    if old.custodian != caller.ods || !caller.has(Role::Producer) {
        return Ok(forbidden("only the custodian may change a pointer"));
    }
    if let Err(r) = check_producer(txn, caller, new)? {
        return Ok(Outcome::Rejected(r));
    }
    if let Some(given) = if_match
        && given != old.version
    {
        return Ok(Outcome::Rejected(Rejection::VersionConflict { given, current: old.version }));
    }
    if immutable_changed(&old, new) {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            reason: "an update may not change masterIdentifier, status, type, subject, custodian, author or relatesTo"
                .into(),
        }));
    }
    let mut stored = new.clone();
    stored.version = old.version + 1;
    stored.created = old.created;
    // An update never changes the date.
    stored.date = old.date.clone();
    keep_past_version(txn, &old);
    txn.put_pointer(&stored);
    subscription::pointer_changed(txn, &stored, None, Change::Updated, stored.updated)?;
    Ok(Outcome::Updated { pointer: stored })
}

fn delete<T: StateTxn>(txn: &mut T, caller: &Caller, id: &PointerId, at: Timestamp) -> ApplyResult<Outcome, T::Error> {
    // Decided from the id alone first, so that the answer for another
    // organisation's id is the same whether or not the pointer exists.
    if id.custodian() != caller.ods || !caller.has(Role::Producer) {
        return Ok(forbidden("only the custodian may delete a pointer"));
    }
    let Some(old) = txn.pointer(id).map_err(ApplyError::Storage)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound { id: id.clone() }));
    };
    if old.custodian != caller.ods {
        return Ok(forbidden("only the custodian may delete a pointer"));
    }
    txn.delete_pointer(id);
    // NRL's hard delete: the history goes too.
    txn.delete_past_versions(id);
    if let Some(m) = &old.master_identifier {
        txn.delete_idempotency(&old.custodian, &master_identifier_key(&m.system, &m.value));
    }
    if old.status == PointerStatus::Current {
        txn.index_remove(&old.subject, id);
        let mut patient = txn
            .patient(&old.subject)
            .map_err(ApplyError::Storage)?
            .ok_or_else(|| InvariantBroken(format!("current pointer {id} has no patient entry")))?;
        holder_remove(&mut patient, &old)?;
        save_patient(txn, &old.subject, &patient);
    }
    subscription::pointer_changed(txn, &old, None, Change::Deleted, at)?;
    Ok(Outcome::Deleted { id: id.clone() })
}
