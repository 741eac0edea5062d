//! Patient identity in the state machine: local identifiers that name a
//! patient (IHE PIXm's cross-references, fed by ITI-104) and merges of NHS
//! Numbers, so that no pointer is lost when a patient turns out to have had
//! two numbers.
//!
//! A merge is one command: every replica applies it in one atomic write,
//! so it has happened entirely or not at all. It retires `source` into
//! `target`: `source`'s entry keeps only a redirect, which every later read
//! and write of `source` follows. Redirects always name a number that is
//! not itself retired: merging a survivor rewrites the redirects of the
//! numbers merged into it, so a chain resolves in one step.

use crate::apply::{
    ApplyError, ApplyResult, InvariantBroken, StateTxn, forbidden, holder_add, keep_past_version, save_patient,
    survivor,
};
use crate::command::{Caller, Outcome, Rejection, Role};
use crate::ids::NhsNumber;
use crate::model::{Identifier, PatientEntry, PointerStatus, Timestamp};

fn rejected(r: Rejection) -> Outcome {
    Outcome::Rejected(r)
}

fn invalid(reason: &str) -> Outcome {
    rejected(Rejection::Invalid { reason: reason.to_owned() })
}

/// May `caller` feed identifiers of `id`'s system? The assigning
/// authority's producers only.
fn check_feeder<T: StateTxn>(txn: &mut T, caller: &Caller, id: &Identifier) -> ApplyResult<Option<Outcome>, T::Error> {
    let Some(assigner) = txn.authority(&id.system).map_err(ApplyError::Storage)? else {
        return Ok(Some(rejected(Rejection::UnknownSystem { system: id.system.clone() })));
    };
    if !caller.has(Role::Producer) || assigner != caller.ods {
        return Ok(Some(forbidden(&format!(
            "identifier system {} is assigned by {assigner}, not by the caller's organisation {}",
            id.system, caller.ods
        ))));
    }
    Ok(None)
}

/// ITI-104: `id` names `subject` (or the survivor `subject` was merged into).
pub(crate) fn put_local_id<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    id: &Identifier,
    subject: &NhsNumber,
) -> ApplyResult<Outcome, T::Error> {
    if let Some(refused) = check_feeder(txn, caller, id)? {
        return Ok(refused);
    }
    let (subject, entry) = survivor(txn, subject)?;
    let before = txn.local_id(id).map_err(ApplyError::Storage)?;
    if before == Some(subject) {
        return Ok(Outcome::LocalIdPut { created: false });
    }
    let mut entry = entry.unwrap_or_default();
    if entry.local_ids.len() >= PatientEntry::LOCAL_IDS_MAX {
        return Ok(invalid(&format!("a patient may have at most {} local identifiers", PatientEntry::LOCAL_IDS_MAX)));
    }
    if let Some(other) = before {
        // The identifier named another patient: it names this one now.
        let mut old = txn
            .patient(&other)
            .map_err(ApplyError::Storage)?
            .ok_or_else(|| InvariantBroken("a cross-reference names a patient with no entry".into()))?;
        old.local_ids.remove(id);
        save_patient(txn, &other, &old);
    }
    entry.local_ids.insert(id.clone());
    txn.put_patient(&subject, &entry);
    txn.put_local_id(id, &subject);
    Ok(Outcome::LocalIdPut { created: before.is_none() })
}

pub(crate) fn delete_local_id<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    id: &Identifier,
) -> ApplyResult<Outcome, T::Error> {
    if let Some(refused) = check_feeder(txn, caller, id)? {
        return Ok(refused);
    }
    let Some(subject) = txn.local_id(id).map_err(ApplyError::Storage)? else {
        return Ok(rejected(Rejection::UnknownLocalId));
    };
    let mut entry = txn
        .patient(&subject)
        .map_err(ApplyError::Storage)?
        .ok_or_else(|| InvariantBroken("a cross-reference names a patient with no entry".into()))?;
    entry.local_ids.remove(id);
    save_patient(txn, &subject, &entry);
    txn.delete_local_id(id);
    Ok(Outcome::LocalIdDeleted { subject })
}

/// Retires `source` into `target` (see the module's description).
pub(crate) fn merge<T: StateTxn>(
    txn: &mut T,
    caller: &Caller,
    source: &NhsNumber,
    target: &NhsNumber,
    at: Timestamp,
) -> ApplyResult<Outcome, T::Error> {
    if !caller.has(Role::IdentityAuthority) {
        return Ok(forbidden("only an identity authority may merge NHS Numbers"));
    }
    if source == target {
        return Ok(invalid("a number cannot be merged into itself"));
    }
    let mut into = txn.patient(target).map_err(ApplyError::Storage)?.unwrap_or_default();
    let from = txn.patient(source).map_err(ApplyError::Storage)?.unwrap_or_default();
    match from.merged_into {
        Some(t) if t == *target => return Ok(Outcome::Merged { moved: 0 }),
        Some(_) => return Ok(invalid("the source number was already merged into another number")),
        None => {}
    }
    if into.merged_into.is_some() {
        return Ok(invalid("the target number is retired: merge into its survivor"));
    }
    let pointers = from.pointer_count();
    if pointers > PatientEntry::MERGE_POINTERS_MAX {
        return Ok(rejected(Rejection::MergeTooLarge { pointers, max: PatientEntry::MERGE_POINTERS_MAX }));
    }
    if into.merged_from.len() + from.merged_from.len() + 1 > PatientEntry::MERGED_FROM_MAX {
        return Ok(invalid(&format!(
            "a surviving number may stand for at most {} retired ones",
            PatientEntry::MERGED_FROM_MAX
        )));
    }
    if into.local_ids.union(&from.local_ids).count() > PatientEntry::LOCAL_IDS_MAX {
        return Ok(invalid(&format!(
            "the merged patient would have more than {} local identifiers",
            PatientEntry::LOCAL_IDS_MAX
        )));
    }

    // Every current pointer: a new version under the survivor.
    let limit = usize::try_from(pointers).unwrap_or(usize::MAX).saturating_add(1);
    let ids = txn.index_ids(source, limit).map_err(ApplyError::Storage)?;
    if ids.len() as u64 != pointers {
        return Err(InvariantBroken(format!(
            "the patient entry counts {pointers} current pointers, the index holds {}",
            ids.len()
        ))
        .into());
    }
    let target_text = target.as_str().to_owned();
    let mut moved_pointers = Vec::with_capacity(ids.len());
    for id in &ids {
        let old = txn
            .pointer(id)
            .map_err(ApplyError::Storage)?
            .ok_or_else(|| InvariantBroken(format!("the index names a missing pointer {id}")))?;
        if old.status != PointerStatus::Current || old.subject != *source {
            return Err(InvariantBroken(format!("indexed pointer {id} is not a current pointer of the patient")).into());
        }
        keep_past_version(txn, &old);
        let mut moved = old.clone();
        moved.version += 1;
        moved.updated = at;
        moved.subject = *target;
        moved.body = old.body.with_subject_value(&target_text);
        txn.put_pointer(&moved);
        txn.index_remove(source, id);
        txn.index_add(&moved);
        holder_add(&mut into, &moved);
        moved_pointers.push(moved);
    }

    // Local identifiers now name the survivor.
    for local in &from.local_ids {
        txn.put_local_id(local, target);
    }
    into.local_ids.extend(from.local_ids.iter().cloned());
    // An opt-out of either holds; the later change of preference is kept.
    into.opted_out |= from.opted_out;
    into.consent_updated = into.consent_updated.max(from.consent_updated);
    // Numbers retired into the source now redirect to the survivor.
    for retired in &from.merged_from {
        let mut r = txn
            .patient(retired)
            .map_err(ApplyError::Storage)?
            .ok_or_else(|| InvariantBroken("a retired number has no entry".into()))?;
        r.merged_into = Some(*target);
        txn.put_patient(retired, &r);
    }
    into.merged_from.extend(from.merged_from.iter().copied());
    into.merged_from.insert(*source);
    txn.put_patient(target, &into);
    txn.put_patient(source, &PatientEntry { merged_into: Some(*target), ..PatientEntry::default() });
    // Subscribers hear of every pointer moved (after the opt-outs are
    // joined), and subscriptions on the retired number follow the survivor.
    for moved in &moved_pointers {
        crate::subscription::pointer_changed(txn, moved, Some(source), crate::subscription::Change::Merged, at)?;
    }
    crate::subscription::subject_merged(txn, source, target)?;
    Ok(Outcome::Merged { moved: pointers })
}

#[cfg(test)]
mod tests {
    use crate::apply::apply;
    use crate::command::{Command, CommandV1, Outcome, Rejection, Role};
    use crate::mem::MemState;
    use crate::mem::testkit::*;
    use crate::model::{Identifier, PatientEntry, Timestamp};

    fn state() -> MemState {
        let mut s = MemState::default();
        for c in registry_commands(&["A81001", "RR8"]).into_iter().chain([authority("RR8")]) {
            assert_eq!(apply(&mut s, &c).unwrap(), Outcome::Done);
        }
        s
    }

    fn run(s: &mut MemState, c: Command) -> Outcome {
        apply(s, &c).unwrap()
    }

    fn rejected(o: Outcome) -> Rejection {
        match o {
            Outcome::Rejected(r) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn feeds_are_the_assigning_authoritys_and_move_an_identifier() {
        let mut s = state();
        assert_eq!(run(&mut s, local_id("RR8", "M1", nhs(1))), Outcome::LocalIdPut { created: true });
        assert_eq!(run(&mut s, local_id("RR8", "M1", nhs(1))), Outcome::LocalIdPut { created: false });
        // The identifier now names another patient: it leaves the first.
        assert_eq!(run(&mut s, local_id("RR8", "M1", nhs(2))), Outcome::LocalIdPut { created: false });
        assert!(!s.patients.contains_key(&nhs(1)), "an entry with nothing left is removed");
        assert_eq!(s.patients[&nhs(2)].local_ids.len(), 1);
        // Another organisation's system, an unregistered one, a consumer.
        let foreign = Command::V1(CommandV1::PutLocalId {
            caller: caller("A81001", &[Role::Producer]),
            id: Identifier { system: local_system("RR8"), value: "M2".into() },
            subject: nhs(3),
            at: Timestamp(0),
        });
        assert!(matches!(rejected(run(&mut s, foreign)), Rejection::Forbidden { .. }));
        assert!(matches!(rejected(run(&mut s, local_id("A81001", "M2", nhs(3)))), Rejection::UnknownSystem { .. }));
        let consumer = Command::V1(CommandV1::PutLocalId {
            caller: caller("RR8", &[Role::Consumer]),
            id: Identifier { system: local_system("RR8"), value: "M2".into() },
            subject: nhs(3),
            at: Timestamp(0),
        });
        assert!(matches!(rejected(run(&mut s, consumer)), Rejection::Forbidden { .. }));
        // Removal: the patient it named, then 404.
        let delete = || {
            Command::V1(CommandV1::DeleteLocalId {
                caller: caller("RR8", &[Role::Producer]),
                id: Identifier { system: local_system("RR8"), value: "M1".into() },
                at: Timestamp(0),
            })
        };
        assert_eq!(run(&mut s, delete()), Outcome::LocalIdDeleted { subject: nhs(2) });
        assert_eq!(rejected(run(&mut s, delete())), Rejection::UnknownLocalId);
        assert!(s.local_ids.is_empty() && s.patients.is_empty());
        // A patient's identifiers are bounded.
        for i in 0..PatientEntry::LOCAL_IDS_MAX {
            assert!(matches!(run(&mut s, local_id("RR8", &format!("L{i}"), nhs(4))), Outcome::LocalIdPut { .. }));
        }
        assert!(matches!(rejected(run(&mut s, local_id("RR8", "one-more", nhs(4)))), Rejection::Invalid { .. }));
    }

    #[test]
    fn merges_refuse_what_they_must() {
        let mut s = state();
        run(&mut s, create("A81001", pointer("A81001", "a", nhs(1), 0)));
        assert!(matches!(rejected(run(&mut s, merge(nhs(1), nhs(1), 1))), Rejection::Invalid { .. }), "self-merge");
        let by_consumer = Command::V1(CommandV1::MergePatients {
            caller: caller("Y01", &[Role::Consumer]),
            source: nhs(1),
            target: nhs(2),
            at: Timestamp(1),
        });
        assert!(matches!(rejected(run(&mut s, by_consumer)), Rejection::Forbidden { .. }));
        assert_eq!(run(&mut s, merge(nhs(1), nhs(2), 1)), Outcome::Merged { moved: 1 });
        assert_eq!(run(&mut s, merge(nhs(1), nhs(2), 2)), Outcome::Merged { moved: 0 }, "a repeat");
        assert!(matches!(rejected(run(&mut s, merge(nhs(3), nhs(1), 3))), Rejection::Invalid { .. }), "into retired");
        assert!(matches!(rejected(run(&mut s, merge(nhs(1), nhs(3), 3))), Rejection::Invalid { .. }), "elsewhere");
        // A merge back would make a cycle: the survivor into its retired number is refused.
        assert!(matches!(rejected(run(&mut s, merge(nhs(2), nhs(1), 4))), Rejection::Invalid { .. }));
        // A merge of an unknown number into another just leaves a redirect.
        assert_eq!(run(&mut s, merge(nhs(5), nhs(2), 5)), Outcome::Merged { moved: 0 });
        assert_eq!(s.patients[&nhs(5)].merged_into, Some(nhs(2)));
        // The redirect of a retired number follows its survivor's merge in one step.
        assert_eq!(run(&mut s, merge(nhs(2), nhs(6), 6)), Outcome::Merged { moved: 1 });
        for n in [1, 2, 5] {
            assert_eq!(s.patients[&nhs(n)].merged_into, Some(nhs(6)), "{n}");
        }
        assert_eq!(s.patients[&nhs(6)].merged_from.len(), 3);
        // A create for a retired number is stored under the survivor.
        assert!(matches!(run(&mut s, create("A81001", pointer("A81001", "b", nhs(1), 7))), Outcome::Created { .. }));
        assert_eq!(s.patients[&nhs(6)].pointer_count(), 2);
        assert!(s.index.iter().all(|(subject, _)| *subject == nhs(6)));
    }

    #[test]
    fn a_merge_moves_at_most_its_limit() {
        let mut s = state();
        let max = PatientEntry::MERGE_POINTERS_MAX as u32;
        for i in 0..=max {
            let c = create("A81001", pointer("A81001", &format!("p{i}"), nhs(1), 0));
            assert!(matches!(run(&mut s, c), Outcome::Created { .. }));
        }
        assert_eq!(
            rejected(run(&mut s, merge(nhs(1), nhs(2), 1))),
            Rejection::MergeTooLarge { pointers: u64::from(max) + 1, max: u64::from(max) }
        );
        assert!(!s.patients.contains_key(&nhs(2)), "nothing moved");
        let delete = Command::V1(CommandV1::DeletePointer {
            caller: caller("A81001", &[Role::Producer]),
            id: crate::PointerId::parse("A81001-p0").unwrap(),
            at: Timestamp(1),
        });
        assert!(matches!(run(&mut s, delete), Outcome::Deleted { .. }));
        assert_eq!(run(&mut s, merge(nhs(1), nhs(2), 2)), Outcome::Merged { moved: u64::from(max) });
    }
}
