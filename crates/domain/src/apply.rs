//! The state machine's business logic: applies one command to a state.
//!
//! Pure and deterministic: the same command on the same state gives the same
//! outcome and the same changes on every replica. Storage supplies a
//! [`StateTxn`], which reads through its own uncommitted changes.

use crate::command::{Caller, Command, CommandV1, Outcome, Rejection, Role};
use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{PatientEntry, PointerStatus, PointerType, ProducerEntry, RecordPointer, Timestamp};

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

    /// `(custodian, masterIdentifier)` to pointer id.
    fn idempotency(&mut self, custodian: &OdsCode, key: &str) -> Result<Option<PointerId>, Self::Error>;
    fn put_idempotency(&mut self, custodian: &OdsCode, key: &str, id: &PointerId);
    fn delete_idempotency(&mut self, custodian: &OdsCode, key: &str);

    fn pointer_type(&mut self, code: &SnomedCode) -> Result<Option<PointerType>, Self::Error>;
    fn put_pointer_type(&mut self, entry: &PointerType);

    fn producer(&mut self, ods: &OdsCode) -> Result<Option<ProducerEntry>, Self::Error>;
    fn put_producer(&mut self, ods: &OdsCode, entry: &ProducerEntry);
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

type ApplyResult<T, E> = Result<T, ApplyError<E>>;

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
        CommandV1::UpdatePointer { caller, pointer, if_match } => update(txn, caller, pointer, *if_match)?,
        CommandV1::DeletePointer { caller, id, at } => delete(txn, caller, id, *at)?,
        CommandV1::PutPointerType { caller, entry } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may change the pointer-type registry"));
            }
            txn.put_pointer_type(entry);
            Outcome::Done
        }
        CommandV1::SetProducerTypes { caller, ods, types } => {
            if !caller.has(Role::Operator) {
                return Ok(forbidden("only an operator may change a producer's pointer types"));
            }
            let mut allowed = types.clone();
            allowed.sort();
            allowed.dedup();
            txn.put_producer(ods, &ProducerEntry { allowed_types: allowed });
            Outcome::Done
        }
        CommandV1::SetConsent { caller, subject, opted_out, at } => {
            if !caller.has(Role::ConsentAuthority) {
                return Ok(forbidden("only a consent authority may record a sharing preference"));
            }
            let mut entry = txn.patient(subject).map_err(ApplyError::Storage)?.unwrap_or_default();
            entry.opted_out = *opted_out;
            entry.consent_updated = Some(*at);
            txn.put_patient(subject, &entry);
            Outcome::Done
        }
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

fn forbidden(reason: &str) -> Outcome {
    Outcome::Rejected(Rejection::Forbidden { reason: reason.to_owned() })
}

/// Checks that the caller may publish or change this pointer: a producer,
/// custodian of it, allowed its type, whose category matches the registry.
fn check_producer<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    pointer: &RecordPointer,
) -> ApplyResult<Option<Rejection>, T::Error> {
    if !caller.has(Role::Producer) {
        return Ok(Some(Rejection::Forbidden { reason: "only a producer may publish pointers".into() }));
    }
    if pointer.custodian != caller.ods {
        return Ok(Some(Rejection::Forbidden {
            reason: format!("custodian {} is not the caller's organisation {}", pointer.custodian, caller.ods),
        }));
    }
    if pointer.id.custodian() != pointer.custodian {
        return Ok(Some(Rejection::Invalid {
            reason: "the pointer id must begin with the custodian's ODS code".into(),
        }));
    }
    let Some(registered) = txn.pointer_type(&pointer.type_code).map_err(ApplyError::Storage)? else {
        return Ok(Some(Rejection::UnknownType { code: pointer.type_code.clone() }));
    };
    if registered.category != pointer.category {
        return Ok(Some(Rejection::CategoryMismatch {
            given: pointer.category.clone(),
            registered: registered.category,
        }));
    }
    let allowed = txn.producer(&caller.ods).map_err(ApplyError::Storage)?.unwrap_or_default();
    if !allowed.allowed_types.contains(&pointer.type_code) {
        return Ok(Some(Rejection::Forbidden {
            reason: format!("organisation {} may not publish pointers of type {}", caller.ods, pointer.type_code),
        }));
    }
    Ok(None)
}

fn holder_add(entry: &mut PatientEntry, pointer: &RecordPointer) {
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

fn save_patient<T: StateTxn>(txn: &mut T, subject: &NhsNumber, entry: &PatientEntry) {
    if entry.is_empty() {
        txn.delete_patient(subject);
    } else {
        txn.put_patient(subject, entry);
    }
}

fn create<T: StateTxn>(txn: &mut T, caller: &Caller, pointer: &RecordPointer) -> ApplyResult<Outcome, T::Error> {
    if let Some(r) = check_producer(txn, caller, pointer)? {
        return Ok(Outcome::Rejected(r));
    }
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

    if let Some(old_id) = &pointer.replaces {
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
        old.status = PointerStatus::Superseded;
        old.version += 1;
        old.updated = pointer.created;
        txn.put_pointer(&old);
        txn.index_remove(&old.subject, &old.id);
        holder_remove(&mut patient, &old)?;
    }

    txn.put_pointer(pointer);
    txn.index_add(pointer);
    if let Some(key) = &idem_key {
        txn.put_idempotency(&pointer.custodian, key, &pointer.id);
    }
    holder_add(&mut patient, pointer);
    save_patient(txn, &pointer.subject, &patient);
    Ok(Outcome::Created { pointer: pointer.clone() })
}

fn update<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    new: &RecordPointer,
    if_match: u64,
) -> ApplyResult<Outcome, T::Error> {
    let Some(old) = txn.pointer(&new.id).map_err(ApplyError::Storage)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound { id: new.id.clone() }));
    };
    if old.custodian != caller.ods || !caller.has(Role::Producer) {
        return Ok(forbidden("only the custodian may change a pointer"));
    }
    if let Some(r) = check_producer(txn, caller, new)? {
        return Ok(Outcome::Rejected(r));
    }
    if old.version != if_match {
        return Ok(Outcome::Rejected(Rejection::VersionConflict { given: if_match, current: old.version }));
    }
    let immutable_changed = old.subject != new.subject
        || old.custodian != new.custodian
        || old.author != new.author
        || old.type_code != new.type_code
        || old.master_identifier != new.master_identifier
        || old.replaces != new.replaces
        || old.status != new.status;
    if immutable_changed {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            reason: "an update may not change masterIdentifier, status, type, subject, custodian, author or relatesTo"
                .into(),
        }));
    }
    let mut stored = new.clone();
    stored.version = old.version + 1;
    stored.created = old.created;
    txn.put_pointer(&stored);
    Ok(Outcome::Updated { pointer: stored })
}

fn delete<T: StateTxn>(txn: &mut T, caller: &Caller, id: &PointerId, _at: Timestamp) -> ApplyResult<Outcome, T::Error> {
    let Some(old) = txn.pointer(id).map_err(ApplyError::Storage)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound { id: id.clone() }));
    };
    if old.custodian != caller.ods || !caller.has(Role::Producer) {
        return Ok(forbidden("only the custodian may delete a pointer"));
    }
    txn.delete_pointer(id);
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
    Ok(Outcome::Deleted { id: id.clone() })
}
