//! Who may see what: the read side's access rules, beside the write side's
//! in [`crate::apply`]. Every read route asks these, so a read by id, a
//! search, a count and `$record-holders` cannot disagree.
//!
//! The rules:
//! - reading pointers needs the `consumer` or the `producer` role;
//! - a producer sees its own pointers (those whose custodian it is), always,
//!   opted-out patients' included;
//! - a consumer sees every custodian's pointers of the types it is allowed
//!   (every type, unless the registry restricts it), unless the patient has
//!   opted out; breaking the glass (an emergency, with a reason) lifts the
//!   opt-out for that request, never the type restriction, and only for a
//!   consumer whose organisation holds the `break-glass` permission in the
//!   registry ([`Reader::may_break_glass`]: the API refuses the others with
//!   403 before reading; this rule would hide the patient from them anyway);
//! - a pointer read by id that the reader may not see is not told apart
//!   from none (404), except a pointer of a type the consumer is not
//!   allowed, of a patient who has not opted out: that is refused (403), as
//!   NRL does.

use crate::command::{Caller, Role};
use crate::ids::{OdsCode, SnomedCode};
use crate::model::{ConsumerEntry, ConsumerPermission, PatientEntry, RecordPointer};

/// Why a read happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Direct care, the default.
    DirectCare,
    /// An emergency override that shows opted-out patients' pointers, with
    /// the reason given, to a consumer with the `break-glass` permission;
    /// audited and counted.
    BreakGlass { reason: String },
}

impl Purpose {
    pub fn breaks_glass(&self) -> bool {
        matches!(self, Purpose::BreakGlass { .. })
    }
}

/// Why a caller may not read pointers at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadDenied {
    #[error("reading pointers needs the consumer or producer role")]
    NoReadRole,
}

/// A caller checked for the right to read pointers: built only by
/// [`Reader::new`], so every read starts from that check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    ods: OdsCode,
    consumer: bool,
    producer: bool,
}

impl Reader {
    pub fn new(caller: &Caller) -> Result<Reader, ReadDenied> {
        let (consumer, producer) = (caller.has(Role::Consumer), caller.has(Role::Producer));
        if !consumer && !producer {
            return Err(ReadDenied::NoReadRole);
        }
        Ok(Reader { ods: caller.ods.clone(), consumer, producer })
    }

    pub fn ods(&self) -> &OdsCode {
        &self.ods
    }

    pub fn is_consumer(&self) -> bool {
        self.consumer
    }

    /// May this reader break the glass? Only a consumer whose registry
    /// entry (`entry`) holds the `break-glass` permission.
    pub fn may_break_glass(&self, entry: Option<&ConsumerEntry>) -> bool {
        self.consumer && entry.is_some_and(|e| e.may(ConsumerPermission::BreakGlass))
    }

    /// What this reader may see of one patient's pointers; `restriction`
    /// is the reader's consumer registry entry, if it has one (its types,
    /// and whether it may break the glass).
    pub fn scope(
        &self,
        patient: Option<&PatientEntry>,
        purpose: &Purpose,
        restriction: Option<&ConsumerEntry>,
    ) -> ReadScope {
        let opted_out = patient.is_some_and(|p| p.opted_out);
        let glass = purpose.breaks_glass() && self.may_break_glass(restriction);
        ReadScope {
            own: self.producer.then(|| self.ods.clone()),
            everyone: self.consumer && (!opted_out || glass),
            types: restriction.and_then(|r| r.allowed_types.clone()),
        }
    }

    /// May this reader see `pointer`, whose patient's entry is `patient`?
    pub fn sees(
        &self,
        pointer: &RecordPointer,
        patient: Option<&PatientEntry>,
        purpose: &Purpose,
        restriction: Option<&ConsumerEntry>,
    ) -> Visibility {
        self.scope(patient, purpose, restriction).verdict(pointer.custodian.as_str(), pointer.type_code.as_str())
    }
}

/// What a reader may know of one pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Visible,
    /// As if there were none (404): the patient opted out, or the pointer
    /// is another producer's and the reader is no consumer.
    Hidden,
    /// A type this consumer is not allowed (403).
    TypeNotAllowed,
}

/// The pointers of one patient a reader may see, as a rule on each
/// pointer's custodian and type: the same rule filters a search's pages,
/// counts its `total` from the patient index, and decides a read by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadScope {
    /// A custodian whose pointers are seen whatever the patient's
    /// preference: the reader's own organisation, when it is a producer.
    own: Option<OdsCode>,
    /// Every custodian's pointers are seen (of the allowed `types`).
    everyone: bool,
    /// The only types seen of other custodians' pointers (`None`: all).
    types: Option<Vec<SnomedCode>>,
}

impl ReadScope {
    /// May a pointer of this custodian and type (as text) be seen?
    pub fn allows(&self, custodian: &str, type_code: &str) -> bool {
        self.verdict(custodian, type_code) == Visibility::Visible
    }

    pub fn verdict(&self, custodian: &str, type_code: &str) -> Visibility {
        if self.own.as_ref().is_some_and(|o| o.as_str() == custodian) {
            Visibility::Visible
        } else if !self.everyone {
            Visibility::Hidden
        } else if self.types.as_ref().is_some_and(|t| !t.iter().any(|t| t.as_str() == type_code)) {
            Visibility::TypeNotAllowed
        } else {
            Visibility::Visible
        }
    }

    /// Nothing of this patient is visible.
    pub fn is_empty(&self) -> bool {
        !self.everyone && self.own.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::testkit::{END_OF_LIFE_CARE_PLAN, caller, nhs, ods, pointer, snomed};

    fn opted_out() -> PatientEntry {
        PatientEntry { opted_out: true, ..PatientEntry::default() }
    }

    #[test]
    fn the_read_rules() {
        let theirs = pointer("RV3", "x", nhs(1), 0);
        let ours = pointer("A81001", "y", nhs(1), 0);
        let glass = Purpose::BreakGlass { reason: "unconscious, no records to hand".into() };
        let care = Purpose::DirectCare;
        // Every type, and the permission to break the glass.
        let permitted = ConsumerEntry { allowed_types: None, permissions: [ConsumerPermission::BreakGlass].into() };
        let may = Some(&permitted);

        assert_eq!(Reader::new(&caller("X26", &[Role::Operator])), Err(ReadDenied::NoReadRole));

        let consumer = Reader::new(&caller("A81001", &[Role::Consumer])).unwrap();
        assert!(consumer.sees(&theirs, None, &care, None) == Visibility::Visible);
        assert!(consumer.sees(&theirs, Some(&opted_out()), &care, None) != Visibility::Visible, "opted out");
        assert!(
            consumer.sees(&ours, Some(&opted_out()), &care, None) != Visibility::Visible,
            "a consumer only: not its own either"
        );
        assert!(consumer.sees(&theirs, Some(&opted_out()), &glass, may) == Visibility::Visible, "the glass broken");
        assert!(consumer.may_break_glass(may));
        // Without the permission (no entry, or an entry without it), the
        // glass stays whole: the opt-out holds.
        assert!(!consumer.may_break_glass(None));
        assert_eq!(consumer.sees(&theirs, Some(&opted_out()), &glass, None), Visibility::Hidden);
        let types_only = ConsumerEntry { allowed_types: None, permissions: Default::default() };
        assert!(!consumer.may_break_glass(Some(&types_only)));
        assert_eq!(consumer.sees(&theirs, Some(&opted_out()), &glass, Some(&types_only)), Visibility::Hidden);
        assert_eq!(consumer.sees(&theirs, None, &care, may), Visibility::Visible, "every type");

        let producer = Reader::new(&caller("A81001", &[Role::Producer])).unwrap();
        assert!(producer.sees(&ours, None, &care, None) == Visibility::Visible);
        assert!(
            producer.sees(&ours, Some(&opted_out()), &care, None) == Visibility::Visible,
            "its own, whatever the preference"
        );
        assert!(producer.sees(&theirs, None, &care, None) != Visibility::Visible, "a producer sees only its own");
        assert!(
            producer.sees(&theirs, None, &glass, may) != Visibility::Visible,
            "breaking the glass is for consumers"
        );
        assert!(!producer.may_break_glass(may), "even with the organisation's permission");

        let both = Reader::new(&caller("A81001", &[Role::Consumer, Role::Producer])).unwrap();
        assert!(both.sees(&theirs, None, &care, None) == Visibility::Visible);
        assert!(both.sees(&theirs, Some(&opted_out()), &care, None) != Visibility::Visible);
        assert!(both.sees(&ours, Some(&opted_out()), &care, None) == Visibility::Visible);
        assert!(!both.scope(Some(&opted_out()), &care, None).is_empty());
        assert!(consumer.scope(Some(&opted_out()), &care, None).is_empty());
        assert_eq!(both.ods(), &ods("A81001"));

        // A consumer allowed one type: 403 for another, unless the patient
        // opted out (then nothing is told); its own pointers are its own.
        let only = ConsumerEntry {
            allowed_types: Some(vec![snomed(END_OF_LIFE_CARE_PLAN)]),
            permissions: [ConsumerPermission::BreakGlass].into(),
        };
        let restricted = Some(&only);
        assert_eq!(consumer.sees(&theirs, None, &care, restricted), Visibility::TypeNotAllowed);
        assert_eq!(consumer.sees(&theirs, Some(&opted_out()), &care, restricted), Visibility::Hidden);
        assert_eq!(consumer.sees(&theirs, Some(&opted_out()), &glass, restricted), Visibility::TypeNotAllowed);
        let mut ecp = theirs.clone();
        ecp.type_code = snomed(END_OF_LIFE_CARE_PLAN);
        assert_eq!(consumer.sees(&ecp, None, &care, restricted), Visibility::Visible);
        assert_eq!(both.sees(&ours, None, &care, restricted), Visibility::Visible);
    }
}
