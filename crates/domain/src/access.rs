//! Who may see what: the read side's access rules, beside the write side's
//! in [`crate::apply`]. Every read route asks these, so a read by id, a
//! search, a count and `$record-holders` cannot disagree.
//!
//! The rules:
//! - reading pointers needs the `consumer` or the `producer` role;
//! - a producer sees its own pointers (those whose custodian it is), always,
//!   opted-out patients' included;
//! - a consumer sees every custodian's pointers, unless the patient has
//!   opted out; breaking the glass (an emergency, with a reason) lifts the
//!   opt-out for that request.

use crate::command::{Caller, Role};
use crate::ids::OdsCode;
use crate::model::{PatientEntry, RecordPointer};

/// Why a read happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Direct care, the default.
    DirectCare,
    /// An emergency override that shows opted-out patients' pointers, with
    /// the reason given; audited and counted.
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

    /// What this reader may see of one patient's pointers.
    pub fn scope(&self, patient: Option<&PatientEntry>, purpose: &Purpose) -> ReadScope {
        let opted_out = patient.is_some_and(|p| p.opted_out);
        ReadScope {
            own: self.producer.then(|| self.ods.clone()),
            everyone: self.consumer && (!opted_out || purpose.breaks_glass()),
        }
    }

    /// May this reader see `pointer`, whose patient's entry is `patient`?
    pub fn may_see(&self, pointer: &RecordPointer, patient: Option<&PatientEntry>, purpose: &Purpose) -> bool {
        self.scope(patient, purpose).allows(pointer.custodian.as_str(), pointer.type_code.as_str())
    }
}

/// The pointers of one patient a reader may see, as a rule on each
/// pointer's custodian and type: the same rule filters a search's pages,
/// counts its `total` from the patient index, and decides a read by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadScope {
    /// A custodian whose pointers are seen whatever the patient's
    /// preference: the reader's own organisation, when it is a producer.
    own: Option<OdsCode>,
    /// Every custodian's pointers are seen.
    everyone: bool,
}

impl ReadScope {
    /// May a pointer of this custodian and type (as text) be seen?
    pub fn allows(&self, custodian: &str, _type_code: &str) -> bool {
        self.everyone || self.own.as_ref().is_some_and(|o| o.as_str() == custodian)
    }

    /// Nothing of this patient is visible.
    pub fn is_empty(&self) -> bool {
        !self.everyone && self.own.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::testkit::{caller, nhs, ods, pointer};

    fn opted_out() -> PatientEntry {
        PatientEntry { opted_out: true, ..PatientEntry::default() }
    }

    #[test]
    fn the_read_rules() {
        let theirs = pointer("RV3", "x", nhs(1), 0);
        let ours = pointer("A81001", "y", nhs(1), 0);
        let glass = Purpose::BreakGlass { reason: "unconscious, no records to hand".into() };
        let care = Purpose::DirectCare;

        assert_eq!(Reader::new(&caller("X26", &[Role::Operator])), Err(ReadDenied::NoReadRole));

        let consumer = Reader::new(&caller("A81001", &[Role::Consumer])).unwrap();
        assert!(consumer.may_see(&theirs, None, &care));
        assert!(!consumer.may_see(&theirs, Some(&opted_out()), &care), "opted out");
        assert!(!consumer.may_see(&ours, Some(&opted_out()), &care), "a consumer only: not its own either");
        assert!(consumer.may_see(&theirs, Some(&opted_out()), &glass), "the glass broken");

        let producer = Reader::new(&caller("A81001", &[Role::Producer])).unwrap();
        assert!(producer.may_see(&ours, None, &care));
        assert!(producer.may_see(&ours, Some(&opted_out()), &care), "its own, whatever the preference");
        assert!(!producer.may_see(&theirs, None, &care), "a producer sees only its own");
        assert!(!producer.may_see(&theirs, None, &glass), "breaking the glass is for consumers");

        let both = Reader::new(&caller("A81001", &[Role::Consumer, Role::Producer])).unwrap();
        assert!(both.may_see(&theirs, None, &care));
        assert!(!both.may_see(&theirs, Some(&opted_out()), &care));
        assert!(both.may_see(&ours, Some(&opted_out()), &care));
        assert!(!both.scope(Some(&opted_out()), &care).is_empty());
        assert!(consumer.scope(Some(&opted_out()), &care).is_empty());
        assert_eq!(both.ods(), &ods("A81001"));
    }
}
