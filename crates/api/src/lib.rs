//! The node's two client-facing listeners:
//!
//! - the FHIR R4 record-locator API over HTTPS with mutual TLS (rustls): the
//!   caller's organisation and roles come from its certificate's SAN URIs;
//! - the admin listener (plain HTTP, bind it to a private interface):
//!   Prometheus metrics, health, readiness, cluster status and state digest.
//!
//! This is the only crate that knows HTTP and FHIR JSON.

mod admin;
pub mod error;
mod limits;
mod routes;
mod server;

pub use admin::{READY_BEHIND_ENTRIES_MAX, serve_admin};
pub use limits::ApiLimits;
pub use server::{ApiConfig, serve_api};
