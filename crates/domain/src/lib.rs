//! Domain types of the record locator: identifiers validated at the boundary,
//! record pointers, the patient index and the versioned Raft command set.
//!
//! This crate knows nothing about storage, networking, HTTP or FHIR JSON. Its
//! state machine logic ([`apply`]) is pure and deterministic: it reads no
//! clock and no randomness, only the command and the state it is given.

pub mod access;
pub mod apply;
pub mod audit;
pub mod codec;
pub mod command;
pub mod identity;
pub mod ids;
pub mod mem;
pub mod model;
pub mod nrl;
pub mod query;
pub mod raft;
pub mod subscription;

pub use access::{Purpose, ReadDenied, Reader, Visibility};
pub use command::{Caller, Command, CommandV1, Outcome, Rejection, Role};
pub use ids::{IdError, NhsNumber, OdsCode, PointerId, SnomedCode};
pub use model::{
    AssigningAuthority, AuditAnchor, ConsumerEntry, ConsumerPermission, Identifier, PagingKey, PatientEntry,
    PointerBody, PointerStatus, PointerType, ProducerEntry, ProducerPermission, RecordPointer, Registry, Timestamp,
};
pub use subscription::{
    Change, PayloadContent, Progress, Subscription, SubscriptionEvent, SubscriptionFilter, SubscriptionId,
    SubscriptionStatus,
};
