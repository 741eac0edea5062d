//! The node's two client-facing listeners:
//!
//! - the FHIR R4 record-locator API over HTTPS with mutual TLS (rustls): the
//!   caller's organisation and roles come from its certificate's SAN URIs;
//!   the operator's `/admin/*` routes share it, behind the `operator` role;
//! - the monitoring listener (plain HTTP, bind it to a private interface):
//!   Prometheus metrics, health, readiness, cluster status and state digest.
//!
//! This is the only crate that knows HTTP and FHIR JSON. A request runs one
//! way: [`router`] picks the handler, the [`envelope`] wraps it (ids,
//! authentication, rate limit, timeout, audit, metrics), the handler takes a
//! [`envelope::RequestCtx`] and calls a typed read or a write of the
//! replica; the access rules are `hie_domain::access`'s.
//!
//! One file per family of operations: [`pointers`] (create, batch, read,
//! update, delete), [`search`] (searches, `_count`, paging), [`patients`]
//! (`$record-holders`), [`consent`], [`audit_events`] (who looked),
//! [`operator`] (`/admin/*`, and [`backup`], the body of a backup) and
//! [`metadata`]; [`respond`] and
//! [`audit_slot`] hold what they share, [`error`] maps every error to a
//! status and an OperationOutcome.

mod audit_events;
mod audit_slot;
pub mod backup;
mod break_glass;
mod consent;
mod envelope;
pub mod error;
mod limits;
mod metadata;
mod monitoring;
mod operator;
mod paging;
mod patients;
mod pointers;
pub mod receiver;
mod respond;
mod router;
mod search;
mod server;
pub mod subscriptions;

pub use break_glass::{BREAK_GLASS_PER_ORG_PER_HOUR, BREAK_GLASS_PER_ORG_PER_HOUR_MAX};
pub use limits::ApiLimits;
pub use monitoring::{READY_BEHIND_ENTRIES_MAX, serve_monitoring};
pub use server::{ApiConfig, TLS_RELOAD_INTERVAL, serve_api};
