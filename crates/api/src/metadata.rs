//! `GET /metadata`: the CapabilityStatement of what this node supports.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use hie_fhir::{self as fhir, FHIR_JSON};
use serde_json::json;

use crate::audit_slot::now;
use crate::envelope::RequestCtx;
use crate::error::ApiError;
use crate::respond::fhir_json;
use crate::router::St;

/// Every caller with a valid certificate may read it (the envelope has
/// checked that before this runs).
pub(crate) async fn capability_statement(State(st): St, _ctx: RequestCtx) -> Result<Response, ApiError> {
    let search_params = json!([
        { "name": "subject:identifier", "type": "token", "documentation": "https://fhir.nhs.uk/Id/nhs-number|<NHS Number> (required)" },
        { "name": "type", "type": "token" },
        { "name": "custodian:identifier", "type": "token" },
        { "name": "_count", "type": "number" }
    ]);
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir::instant(now()),
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "software": { "name": "hie", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "hie federated record locator node", "url": st.config.base_url },
        "rest": [{
            "mode": "server",
            "security": { "description": "Mutual TLS: a client certificate from the cluster CA naming urn:hie:ods:<ODS> and urn:hie:role:<role> SAN URIs." },
            "interaction": [{
                "code": "batch",
                "documentation": format!("POST a batch Bundle of DocumentReference creates (at most {} entries) to the base: one Raft entry, each entry succeeds or fails alone", st.config.limits.bundle_entries_max)
            }],
            "resource": [
                {
                    "type": "DocumentReference",
                    "interaction": [
                        { "code": "read" }, { "code": "create" }, { "code": "update" }, { "code": "delete" }, { "code": "search-type" }
                    ],
                    "versioning": "versioned-update",
                    "updateCreate": true,
                    "conditionalCreate": false,
                    "searchParam": search_params
                },
                {
                    "type": "Consent",
                    "interaction": [{ "code": "create" }],
                    "documentation": "consent-authority only: provision.type deny opts the patient out, permit opts back in"
                },
                {
                    "type": "Patient",
                    "operation": [{ "name": "record-holders", "definition": format!("{}/OperationDefinition/record-holders", st.config.base_url) }]
                }
            ]
        }]
    });
    Ok(fhir_json(StatusCode::OK, &body))
}
