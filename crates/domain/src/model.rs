//! The replicated data: record pointers, the pointer-type registry, producers
//! and the patient index.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};

/// Milliseconds since the Unix epoch, UTC. Chosen by the node that accepted a
/// request and carried in the command, so applying never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

/// A FHIR `Identifier` (system and value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub system: String,
    pub value: String,
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

/// What a producer sent of a DocumentReference, kept as sent, except what
/// the server owns (`resourceType`, `id`, `meta.versionId`,
/// `meta.lastUpdated`, `status` and `date`, which the pointer's typed fields
/// hold). Both are the members of a JSON object without its braces, in
/// canonical (sorted) order, so rendering a pointer splices text and never
/// parses it again.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PointerBody {
    /// The members of the producer's `meta` other than the server's
    /// (`profile`, `security`, `tag`, `source`, ...); often empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub meta: String,
    /// Every other member the producer sent.
    pub members: String,
}

impl PointerBody {
    /// The body of these JSON objects' members.
    pub fn of(
        meta: &serde_json::Map<String, serde_json::Value>,
        members: &serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        PointerBody { meta: members_text(meta), members: members_text(members) }
    }

    /// One member of the body, parsed (for the few checks that need one:
    /// the immutable fields of an update). `None` if absent.
    pub fn member(&self, name: &str) -> Option<serde_json::Value> {
        let text = format!("{{{}}}", self.members);
        let serde_json::Value::Object(mut m) = serde_json::from_str(&text).ok()? else { return None };
        m.remove(name)
    }

    /// The body with its `subject.identifier.value` (the NHS Number)
    /// replaced, everything else as it was: how a merge moves a pointer.
    pub fn with_subject_value(&self, nhs: &str) -> PointerBody {
        let text = format!("{{{}}}", self.members);
        let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str(&text) else { return self.clone() };
        if let Some(ident) = m.get_mut("subject").and_then(|s| s.get_mut("identifier")).and_then(|i| i.as_object_mut())
        {
            ident.insert("value".into(), serde_json::Value::String(nhs.to_owned()));
        }
        PointerBody { meta: self.meta.clone(), members: members_text(&m) }
    }

    pub fn len(&self) -> usize {
        self.meta.len() + self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An object's members as JSON text, without the braces.
fn members_text(map: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut text = serde_json::to_string(map).expect("a JSON object serialises");
    text.pop();
    text.remove(0);
    text
}

/// A record pointer (an NRL-shaped FHIR `DocumentReference`): the fields
/// the state machine decides on, typed, and everything else as its
/// producer sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPointer {
    pub id: PointerId,
    /// Starts at 1 and grows by one with every change (an update, or being
    /// superseded).
    pub version: u64,
    pub subject: NhsNumber,
    pub custodian: OdsCode,
    pub type_code: SnomedCode,
    pub category: SnomedCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_identifier: Option<Identifier>,
    pub status: PointerStatus,
    /// The pointer this one supersedes (its `relatesTo` entry with code
    /// `replaces`; other `relatesTo` entries are in `body`, unchecked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<PointerId>,
    /// The producer's own `date`, kept only for a producer with the
    /// `migration` permission; otherwise the pointer's date is `created`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    pub created: Timestamp,
    pub updated: Timestamp,
    pub body: PointerBody,
}

impl RecordPointer {
    /// Upper bounds on what a producer may send, so no pointer grows unbounded.
    pub const CONTENT_MAX: usize = 16;
    pub const TEXT_LEN_MAX: usize = 2048;
    /// The body as sent, in bytes of JSON (an NRL pointer is 2 to 3 KB).
    pub const BODY_BYTES_MAX: usize = 64 * 1024;
    /// Versions of a pointer kept besides the current one; older ones are
    /// forgotten as new ones are made.
    pub const PAST_VERSIONS_MAX: u64 = 100;
}

/// A registered pointer type: a SNOMED CT type and the category it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointerType {
    pub code: SnomedCode,
    pub display: String,
    pub category: SnomedCode,
    pub category_display: String,
}

/// What a producer organisation may do beyond publishing its types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProducerPermission {
    /// Its pointers keep the `date` it sends (backfill of existing
    /// records); NRLF's `audit-dates-from-payload`.
    Migration,
}

impl ProducerPermission {
    pub const ALL: [ProducerPermission; 1] = [ProducerPermission::Migration];

    pub fn as_str(self) -> &'static str {
        match self {
            ProducerPermission::Migration => "migration",
        }
    }

    pub fn parse(s: &str) -> Option<ProducerPermission> {
        ProducerPermission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A producer organisation: the pointer types it may publish and its permissions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub allowed_types: Vec<SnomedCode>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub permissions: BTreeSet<ProducerPermission>,
}

/// What a consumer organisation may do beyond reading its types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumerPermission {
    /// It may break the glass: read an opted-out patient's pointers in an
    /// emergency, with a reason (audited, counted, limited per hour).
    BreakGlass,
}

impl ConsumerPermission {
    pub const ALL: [ConsumerPermission; 1] = [ConsumerPermission::BreakGlass];

    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerPermission::BreakGlass => "break-glass",
        }
    }

    pub fn parse(s: &str) -> Option<ConsumerPermission> {
        ConsumerPermission::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A consumer organisation's registry entry: the pointer types it may read
/// and its permissions. A consumer with no entry is the default: every
/// type, no permission.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsumerEntry {
    /// The only types it may read; `None`: every type. (Entries stored
    /// before permissions existed hold a list, read as `Some`.)
    #[serde(default)]
    pub allowed_types: Option<Vec<SnomedCode>>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub permissions: BTreeSet<ConsumerPermission>,
}

impl ConsumerEntry {
    pub fn may(&self, permission: ConsumerPermission) -> bool {
        self.permissions.contains(&permission)
    }
}

/// The head of one node's audit chain as the cluster last agreed it: the
/// record `seq` of node `node`'s log had hash `hash`. `hie audit verify
/// --cluster` checks a node's chain against it, so records cut off the end
/// or rewritten (even consistently) are found. Only ever moves forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    pub node: u64,
    pub seq: u64,
    /// SHA-256 of the record, 64 lowercase hex digits (`hie_audit::chain`).
    pub hash: String,
    /// When the node proposed it.
    pub at: Timestamp,
}

impl AuditAnchor {
    /// Whether `hash` has the form of a record's hash.
    pub fn well_formed(&self) -> bool {
        self.seq > 0
            && self.hash.len() == 64
            && self.hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// The key that seals paging tokens, the same on every node: set once by
/// the first command that proposes one, never changed after.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagingKey(pub [u8; 32]);

impl std::fmt::Debug for PagingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PagingKey(..)")
    }
}

/// The patient index entry for one NHS Number: everything about the
/// patient is here or keyed under the NHS Number, so the key space can be
/// split by NHS Number.
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
    /// The patient's local identifiers (each also in the cross-reference
    /// table, which finds the NHS Number from one).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub local_ids: BTreeSet<Identifier>,
    /// Set when this NHS Number was retired by a merge: the surviving
    /// number, which every read and write of this one is redirected to.
    /// Always a number that is not itself retired (a later merge of the
    /// survivor rewrites the redirects that name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<NhsNumber>,
    /// The retired numbers redirected to this one.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub merged_from: BTreeSet<NhsNumber>,
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
        self.held.is_empty()
            && !self.opted_out
            && self.consent_updated.is_none()
            && self.local_ids.is_empty()
            && self.merged_into.is_none()
            && self.merged_from.is_empty()
    }
}

impl PatientEntry {
    /// Local identifiers one patient may have.
    pub const LOCAL_IDS_MAX: usize = 32;
    /// Current pointers one merge may move: it is one replicated command,
    /// applied in one atomic write on every node, so this bounds that
    /// write (about 7 KB per pointer moved: the new version, the old one
    /// kept as history, and the index entries).
    pub const MERGE_POINTERS_MAX: u64 = 10_000;
    /// Retired numbers one survivor may stand for.
    pub const MERGED_FROM_MAX: usize = 64;
}

/// The organisation that issues a local identifier system (a hospital's
/// patient administration system, an ambulance service's dispatch
/// numbers): only it may feed cross-references of that system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssigningAuthority {
    pub system: String,
    pub ods: OdsCode,
}

impl AssigningAuthority {
    /// Bytes of an identifier system URI, and of a local identifier's value.
    pub const SYSTEM_LEN_MAX: usize = 256;
    pub const VALUE_LEN_MAX: usize = 64;
}

/// The replicated registry, whole: for an operator to read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    pub types: Vec<PointerType>,
    pub producers: BTreeMap<OdsCode, ProducerEntry>,
    pub consumers: BTreeMap<OdsCode, ConsumerEntry>,
    /// Local identifier systems and the organisations that assign them.
    pub authorities: Vec<AssigningAuthority>,
}
