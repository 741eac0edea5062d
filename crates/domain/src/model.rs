//! The replicated data: record pointers, the pointer-type registry, producers
//! and the patient index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};

/// Milliseconds since the Unix epoch, UTC. Chosen by the node that accepted a
/// request and carried in the command, so applying never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

/// A FHIR `Coding`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// A FHIR `Identifier` (system and value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

/// Where the record is and how to fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub url: String,
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Coding>,
}

/// The clinical context of a pointer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practice_setting: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointerStatus {
    Current,
    Superseded,
    EnteredInError,
}

impl PointerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PointerStatus::Current => "current",
            PointerStatus::Superseded => "superseded",
            PointerStatus::EnteredInError => "entered-in-error",
        }
    }
}

/// A record pointer (an NRL-shaped FHIR `DocumentReference`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPointer {
    pub id: PointerId,
    /// Starts at 1 and grows by one with every accepted update.
    pub version: u64,
    pub subject: NhsNumber,
    pub custodian: OdsCode,
    pub author: OdsCode,
    pub type_code: SnomedCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_display: Option<String>,
    pub category: SnomedCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_identifier: Option<Identifier>,
    pub content: Vec<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    pub status: PointerStatus,
    /// The pointer this one replaces (`relatesTo` code `replaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<PointerId>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

impl RecordPointer {
    /// Upper bounds on the free-form parts, so no pointer grows unbounded.
    pub const CONTENT_MAX: usize = 16;
    pub const TEXT_LEN_MAX: usize = 2048;
}

/// A registered pointer type: a SNOMED CT type and the category it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointerType {
    pub code: SnomedCode,
    pub display: String,
    pub category: SnomedCode,
    pub category_display: String,
}

/// A producer organisation and the pointer types it may publish.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub allowed_types: Vec<SnomedCode>,
}

/// The patient index entry for one NHS Number.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PatientEntry {
    /// How many current pointers each custodian holds, by pointer type: the
    /// record holders, and the exact `total` of any search by type and
    /// custodian without counting the pointers themselves.
    #[serde(default)]
    pub held: BTreeMap<OdsCode, BTreeMap<SnomedCode, u32>>,
    /// The patient has opted out of sharing.
    #[serde(default)]
    pub opted_out: bool,
    /// When the sharing preference last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_updated: Option<Timestamp>,
}

impl PatientEntry {
    /// Custodians holding current pointers, with how many each holds, in ODS order.
    pub fn holders(&self) -> impl Iterator<Item = (&OdsCode, u64)> {
        self.held.iter().map(|(ods, types)| (ods, types.values().map(|&n| u64::from(n)).sum()))
    }

    pub fn pointer_count(&self) -> u64 {
        self.holders().map(|(_, n)| n).sum()
    }

    /// Current pointers of the custodians and types `keep` accepts.
    pub fn count_where(&self, mut keep: impl FnMut(&OdsCode, &SnomedCode) -> bool) -> u64 {
        let mut total = 0;
        for (ods, types) in &self.held {
            for (code, n) in types {
                if keep(ods, code) {
                    total += u64::from(*n);
                }
            }
        }
        total
    }

    /// An entry with nothing in it need not be stored.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && !self.opted_out && self.consent_updated.is_none()
    }
}
