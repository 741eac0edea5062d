//! Every read and write of patient data, recorded on the node that served it
//! as a FHIR AuditEvent (IHE BALP shape) in an append-only, hash-chained log.
//!
//! - Not in the Raft log: recording an access never waits for other nodes.
//! - Fail closed: a request is answered only once its record is in the log:
//!   a change's fsynced (one fsync for every record waiting), a read's
//!   written into the page cache and fsynced within `sync_interval`.
//! - Tamper-evident: [`chain::verify`] names the first record whose bytes,
//!   hash, sequence or link to the record before it is wrong.
//! - Queried by patient through an index beside the log, which can always be
//!   rebuilt from it.

pub mod chain;
pub mod event;
mod log;

pub use event::{Access, Action, Context, Event, EventIds, INTENT, audit_event, render};
pub use log::{AuditConfig, AuditError, AuditLog};
