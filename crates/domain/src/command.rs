//! The versioned Raft command set and what applying a command answers.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{NhsNumber, OdsCode, PointerId, SnomedCode};
use crate::model::{Coding, PointerType, RecordPointer, Timestamp};

/// What a client certificate says its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Producer,
    Consumer,
    ConsentAuthority,
    PatientAccess,
    Operator,
}

impl Role {
    pub const ALL: [Role; 5] =
        [Role::Producer, Role::Consumer, Role::ConsentAuthority, Role::PatientAccess, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::ConsentAuthority => "consent-authority",
            Role::PatientAccess => "patient-access",
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
        fn coding(c: &Option<Coding>) -> usize {
            c.as_ref().map_or(0, |c| 32 + c.system.len() + c.code.len() + c.display.as_ref().map_or(0, String::len))
        }
        fn text(t: &Option<String>) -> usize {
            t.as_ref().map_or(0, String::len)
        }
        fn pointer(p: &RecordPointer) -> usize {
            // Field names, ids, codes and times: about 400 bytes of CBOR.
            let fixed = 400 + text(&p.type_display) + text(&p.category_display);
            let master = p.master_identifier.as_ref().map_or(0, |m| m.system.len() + m.value.len());
            let content: usize = p
                .content
                .iter()
                .map(|c| 48 + c.url.len() + c.content_type.len() + text(&c.creation) + coding(&c.format))
                .sum();
            let context = p
                .context
                .as_ref()
                .map_or(0, |c| 64 + coding(&c.practice_setting) + text(&c.period_start) + text(&c.period_end));
            fixed + master + content + context
        }
        match self {
            CommandV1::CreatePointer { pointer: p, .. } | CommandV1::UpdatePointer { pointer: p, .. } => {
                64 + pointer(p)
            }
            CommandV1::PutPointerType { entry, .. } => 256 + entry.display.len() + entry.category_display.len(),
            CommandV1::SetProducerTypes { types, .. } => 128 + 24 * types.len(),
            CommandV1::DeletePointer { .. } | CommandV1::SetConsent { .. } => 160,
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
    /// Replace the mutable parts of a pointer, if its version is `if_match`.
    UpdatePointer {
        caller: Caller,
        pointer: RecordPointer,
        if_match: u64,
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
    /// Set the pointer types a producer organisation may publish. Operator only.
    SetProducerTypes {
        caller: Caller,
        ods: OdsCode,
        types: Vec<SnomedCode>,
    },
    /// Record a patient's sharing preference. Consent authority only.
    SetConsent {
        caller: Caller,
        subject: NhsNumber,
        opted_out: bool,
        at: Timestamp,
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
                CommandV1::UpdatePointer { .. } => "update_pointer",
                CommandV1::DeletePointer { .. } => "delete_pointer",
                CommandV1::PutPointerType { .. } => "put_pointer_type",
                CommandV1::SetProducerTypes { .. } => "set_producer_types",
                CommandV1::SetConsent { .. } => "set_consent",
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
    },
    Updated {
        pointer: RecordPointer,
    },
    Deleted {
        id: PointerId,
    },
    Done,
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
    #[error("command version not understood by this node")]
    UnknownVersion,
}
