//! The versioned Raft command set and what applying a command answers.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{
    AuditAnchor, ConsumerPermission, Identifier, PagingKey, PointerType, ProducerPermission, RecordPointer, Timestamp,
};
use crate::subscription::{Progress, Subscription, SubscriptionId};

/// What a client certificate says its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Producer,
    Consumer,
    ConsentAuthority,
    PatientAccess,
    /// The demographics feed: merges NHS Numbers.
    IdentityAuthority,
    Operator,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Producer,
        Role::Consumer,
        Role::ConsentAuthority,
        Role::PatientAccess,
        Role::IdentityAuthority,
        Role::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::ConsentAuthority => "consent-authority",
            Role::PatientAccess => "patient-access",
            Role::IdentityAuthority => "identity-authority",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The original caller of a write: decided on the node that terminated the
/// client's TLS and carried through forwarding, so the leader authorizes the
/// caller and never the relaying node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub ods: OdsCode,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// A command in the Raft log. The outer enum is the wire and disk version:
/// a node refuses to apply a version it does not know rather than guess.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    V1(CommandV1),
}

impl CommandV1 {
    fn approx_bytes(&self) -> usize {
        fn pointer(p: &RecordPointer) -> usize {
            // Field names, ids, codes and times: about 300 bytes of CBOR.
            300 + p.body.len() + p.date.as_ref().map_or(0, String::len)
        }
        match self {
            CommandV1::CreatePointer { pointer: p, .. } | CommandV1::PutPointer { pointer: p, .. } => 64 + pointer(p),
            CommandV1::PutPointerType { entry, .. } => 256 + entry.display.len() + entry.category_display.len(),
            CommandV1::SetProducerTypes { types, .. } | CommandV1::SetConsumerTypes { types: Some(types), .. } => {
                128 + 24 * types.len()
            }
            CommandV1::PutAuthority { system, .. } => 160 + system.len(),
            CommandV1::PutLocalId { id, .. } | CommandV1::DeleteLocalId { id, .. } => {
                160 + id.system.len() + id.value.len()
            }
            CommandV1::SetConsumerTypes { types: None, .. }
            | CommandV1::DeletePointer { .. }
            | CommandV1::SetConsent { .. }
            | CommandV1::MergePatients { .. }
            | CommandV1::SetPagingKey { .. } => 160,
            CommandV1::AnchorAudit { .. } => 160,
            CommandV1::CreateSubscription { subscription: s, .. } => {
                400 + s.reason.len() + s.endpoint.len() + s.criteria.iter().map(String::len).sum::<usize>()
            }
            CommandV1::DeleteSubscription { .. } => 160,
            CommandV1::SubscriptionProgress { updates } => {
                16 + updates.iter().map(|u| 96 + u.error.as_ref().map_or(0, String::len)).sum::<usize>()
            }
            CommandV1::Batch(commands) => 16 + commands.iter().map(CommandV1::approx_bytes).sum::<usize>(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV1 {
    /// Publish a pointer. If `pointer.replaces` is set, the replaced pointer
    /// is superseded in the same step.
    CreatePointer {
        caller: Caller,
        pointer: RecordPointer,
    },
    /// A PUT: decided where it is applied, from the replicated state. If
    /// the pointer exists, its mutable parts are replaced (when `if_match`
    /// is given, only at that version); if not, it is created with the
    /// producer's own id, as `CreatePointer` would.
    PutPointer {
        caller: Caller,
        pointer: RecordPointer,
        if_match: Option<u64>,
    },
    DeletePointer {
        caller: Caller,
        id: PointerId,
        at: Timestamp,
    },
    /// Register (or change) a pointer type. Operator only.
    PutPointerType {
        caller: Caller,
        entry: PointerType,
    },
    /// Set the pointer types a producer organisation may publish, and its
    /// permissions. Operator only.
    SetProducerTypes {
        caller: Caller,
        ods: OdsCode,
        types: Vec<SnomedCode>,
        #[serde(default)]
        permissions: BTreeSet<ProducerPermission>,
    },
    /// Set a consumer organisation's entry: the pointer types it may read
    /// (`None`: every type) and its permissions (`break-glass`); both
    /// replaced. Every type and no permission removes the entry. Operator
    /// only.
    SetConsumerTypes {
        caller: Caller,
        ods: OdsCode,
        types: Option<Vec<SnomedCode>>,
        #[serde(default)]
        permissions: BTreeSet<ConsumerPermission>,
    },
    /// Set the key that seals paging tokens, if none is set yet (the first
    /// wins; later ones are ignored). Proposed by a node, not a client.
    SetPagingKey {
        key: PagingKey,
    },
    /// Anchor a node's audit chain head in the replicated state. Proposed
    /// by the node itself, not a client; an anchor that does not move the
    /// node's head forward is ignored, so a chain cut short and grown again
    /// never replaces the anchor it no longer matches.
    AnchorAudit {
        anchor: AuditAnchor,
    },
    /// Record a patient's sharing preference. Consent authority only.
    SetConsent {
        caller: Caller,
        subject: NhsNumber,
        opted_out: bool,
        at: Timestamp,
    },
    /// Register a local identifier system with the organisation that
    /// assigns it (`ods: None` removes it). Operator only.
    PutAuthority {
        caller: Caller,
        system: String,
        ods: Option<OdsCode>,
    },
    /// Record that a local identifier names a patient (IHE ITI-104). Only
    /// a producer of the organisation that assigns the identifier's system.
    PutLocalId {
        caller: Caller,
        id: Identifier,
        subject: NhsNumber,
        at: Timestamp,
    },
    DeleteLocalId {
        caller: Caller,
        id: Identifier,
        at: Timestamp,
    },
    /// Retire `source` into `target`: every current pointer of `source`
    /// becomes `target`'s (a new version, the subject rewritten), holders
    /// add up, local identifiers move, an opt-out of either holds, and
    /// `source` redirects to `target`. Identity authority only.
    MergePatients {
        caller: Caller,
        source: NhsNumber,
        target: NhsNumber,
        at: Timestamp,
    },
    /// Subscribe to the `pointer-changed` topic. Consumer only, for its
    /// own organisation.
    CreateSubscription {
        caller: Caller,
        subscription: Subscription,
    },
    /// Remove a subscription and its events. Its owner only.
    DeleteSubscription {
        caller: Caller,
        id: SubscriptionId,
    },
    /// What a deliverer learnt: the events endpoints acknowledged and the
    /// subscriptions' status. Proposed by a node, not a client; `acked`
    /// only moves forward.
    SubscriptionProgress {
        updates: Vec<Progress>,
    },
    /// Several commands proposed together as one entry (the leader groups
    /// the writes waiting to be proposed). Each is applied in order, as if
    /// it were its own entry, and has its own outcome; a batch inside a
    /// batch is rejected.
    Batch(Vec<CommandV1>),
}

impl Command {
    /// About how many bytes this command takes in a log entry or a message,
    /// without encoding it: enough to keep messages of many entries within
    /// a budget (`hie_p2p` splits append-entries by it).
    pub fn approx_bytes(&self) -> usize {
        match self {
            Command::V1(c) => c.approx_bytes(),
        }
    }

    /// A short name for logs and metrics (never the content).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::V1(c) => match c {
                CommandV1::CreatePointer { .. } => "create_pointer",
                CommandV1::PutPointer { .. } => "put_pointer",
                CommandV1::DeletePointer { .. } => "delete_pointer",
                CommandV1::PutPointerType { .. } => "put_pointer_type",
                CommandV1::SetProducerTypes { .. } => "set_producer_types",
                CommandV1::SetConsumerTypes { .. } => "set_consumer_types",
                CommandV1::SetPagingKey { .. } => "set_paging_key",
                CommandV1::AnchorAudit { .. } => "anchor_audit",
                CommandV1::SetConsent { .. } => "set_consent",
                CommandV1::PutAuthority { .. } => "put_authority",
                CommandV1::PutLocalId { .. } => "put_local_id",
                CommandV1::DeleteLocalId { .. } => "delete_local_id",
                CommandV1::MergePatients { .. } => "merge_patients",
                CommandV1::CreateSubscription { .. } => "create_subscription",
                CommandV1::DeleteSubscription { .. } => "delete_subscription",
                CommandV1::SubscriptionProgress { .. } => "subscription_progress",
                CommandV1::Batch(_) => "batch",
            },
        }
    }
}

/// What applying one command answered. Rejections are deterministic results
/// (every replica reaches the same one), not storage failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A blank or membership entry: nothing for the client.
    None,
    Created {
        pointer: RecordPointer,
        /// The pointer it superseded (`relatesTo` `replaces`), if any.
        superseded: Option<PointerId>,
    },
    Updated {
        pointer: RecordPointer,
    },
    Deleted {
        id: PointerId,
    },
    Done,
    /// A local identifier recorded: `created` when it named no patient before.
    LocalIdPut {
        created: bool,
    },
    /// A local identifier removed: the patient it named.
    LocalIdDeleted {
        subject: NhsNumber,
    },
    /// A merge: how many current pointers moved to the survivor (0 for a
    /// repeat of a merge already made).
    Merged {
        moved: u64,
    },
    /// A subscription as stored (its filter's subject followed to the survivor).
    SubscriptionCreated {
        subscription: Subscription,
    },
    Rejected(Rejection),
    /// A batch's outcomes, one for each of its commands, in order.
    Batch(Vec<Outcome>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("the caller may not do this: {reason}")]
    Forbidden { reason: String },
    #[error("pointer type {code} is not registered")]
    UnknownType { code: SnomedCode },
    #[error("category {given} does not match the registered category {registered} of the type")]
    CategoryMismatch { given: SnomedCode, registered: SnomedCode },
    #[error("a pointer with this masterIdentifier already exists for the custodian: {existing}")]
    Duplicate { existing: PointerId },
    #[error("pointer {id} already exists")]
    AlreadyExists { id: PointerId },
    #[error("no pointer {id}")]
    NotFound { id: PointerId },
    #[error("version {given} does not match the current version {current}")]
    VersionConflict { given: u64, current: u64 },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error("identifier system {system} has no registered assigning authority")]
    UnknownSystem { system: String },
    #[error("no patient has this local identifier")]
    UnknownLocalId,
    #[error("the patient has {pointers} current pointers, more than the {max} one merge may move")]
    MergeTooLarge { pointers: u64, max: u64 },
    #[error("no such subscription")]
    SubscriptionNotFound,
    #[error("command version not understood by this node")]
    UnknownVersion,
}
