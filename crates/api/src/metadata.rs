//! `GET /metadata` (the CapabilityStatement of what this node supports),
//! the OperationDefinitions it links to, and `GET /_status`.

use axum::extract::{Path, State};
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
    let base = &st.config.base_url;
    let token = |name: &str, doc: &str| json!({ "name": name, "type": "token", "documentation": doc });
    let search_params = json!([
        token("subject:identifier", "https://fhir.nhs.uk/Id/nhs-number|<NHS Number> (required)"),
        token("type", "SNOMED CT pointer types, comma-separated for any of them"),
        token("category", "SNOMED CT categories, comma-separated for any of them"),
        token("custodian:identifier", "ODS codes of custodians, comma-separated for any of them"),
        { "name": "_count", "type": "number", "documentation": format!("page size, default {}, at most {}", st.config.limits.page_size_default, st.config.limits.page_size_max) },
        { "name": "_summary", "type": "token", "documentation": "count: the total only" },
        { "name": "next-page-token", "type": "string", "documentation": "the paging token of a next link (also accepted as next)" }
    ]);
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir::instant(now()),
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "software": { "name": "hie", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "hie federated record locator node", "url": base },
        "rest": [{
            "mode": "server",
            "security": { "description": format!(
                "Mutual TLS: a client certificate from the cluster CA naming urn:hie:ods:<ODS> and urn:hie:role:<role> SAN URIs. \
                 Break-glass (X-HIE-Purpose-Of-Use: emergency with X-HIE-Break-Glass-Reason) is for consumers whose organisation \
                 holds the break-glass permission (403 ACCESS_DENIED otherwise), at most {} per organisation per hour on this node \
                 (429 BREAK_GLASS_LIMIT_REACHED with Retry-After beyond), every use and refusal audited.",
                st.config.limits.break_glass_per_org_per_hour
            ) },
            "interaction": [{
                "code": "batch",
                "documentation": format!("POST a batch Bundle of DocumentReference creates (at most {} entries) to the base: one Raft entry, each entry succeeds or fails alone", st.config.limits.bundle_entries_max)
            }],
            "resource": [
                {
                    "type": "DocumentReference",
                    "interaction": [
                        { "code": "read" }, { "code": "vread" }, { "code": "history-instance" }, { "code": "create" },
                        { "code": "update", "documentation": "PUT /DocumentReference/{id}, or PUT /DocumentReference with the id in the body (NRLF's upsert); If-Match optional, without it an unconditional update; a producer may create with its own id <ODS>-<local id>" },
                        { "code": "delete", "documentation": "removes the pointer and its history" },
                        { "code": "search-type", "documentation": "GET, or POST _search with a form or a JSON object; GET _count with the same parameters answers the total only" }
                    ],
                    "versioning": "versioned",
                    "readHistory": true,
                    "updateCreate": true,
                    "conditionalCreate": false,
                    "conditionalUpdate": false,
                    "conditionalDelete": "not-supported",
                    "searchParam": search_params
                },
                {
                    "type": "Consent",
                    "interaction": [{ "code": "create" }],
                    "documentation": "consent-authority only: provision.type deny opts the patient out, permit opts back in"
                },
                {
                    "type": "AuditEvent",
                    "interaction": [{ "code": "search-type" }],
                    "searchParam": [
                        token("entity.identifier", "https://fhir.nhs.uk/Id/nhs-number|<NHS Number> (required)"),
                        { "name": "date", "type": "date", "documentation": "ge and le prefixes" }
                    ],
                    "documentation": "patient-access and consent-authority only: every node's events for the patient"
                },
                {
                    "type": "Subscription",
                    "supportedProfile": [hie_fhir::subscription::SUBSCRIPTION_PROFILE],
                    "extension": [{
                        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical",
                        "valueCanonical": hie_domain::subscription::TOPIC
                    }],
                    "interaction": [{ "code": "create" }, { "code": "read" }, { "code": "delete" }],
                    "operation": [
                        { "name": "status", "definition": format!("{base}/OperationDefinition/subscription-status") },
                        { "name": "events", "definition": format!("{base}/OperationDefinition/subscription-events") }
                    ],
                    "documentation": format!(
                        "consumers only, their own subscriptions: topic {} (a pointer created, updated, superseded, deleted or moved by a merge), filters subject:identifier, type, custodian:identifier (AND); rest-hook to an https endpoint on the operator's allow-list; payload empty, id-only (default) or full-resource; events numbered from 1 per subscription, delivered in order at least once, the last {} retained for $events; no event about an opted-out patient",
                        hie_domain::subscription::TOPIC,
                        hie_domain::Subscription::EVENTS_RETAINED
                    )
                },
                {
                    "type": "Patient",
                    "interaction": [{ "code": "update", "documentation": "IHE ITI-104 feed of a local identifier: PUT /Patient?identifier=<system>|<value> (producers of the assigning organisation); DELETE removes it" }],
                    "operation": [
                        { "name": "record-holders", "definition": format!("{base}/OperationDefinition/record-holders") },
                        { "name": "ihe-pix", "definition": format!("{base}/OperationDefinition/ihe-pix") },
                        { "name": "merge", "definition": format!("{base}/OperationDefinition/merge") }
                    ]
                }
            ]
        }]
    });
    Ok(fhir_json(StatusCode::OK, &body))
}

/// `GET /OperationDefinition/{name}`: the definitions the
/// CapabilityStatement links to.
pub(crate) async fn operation_definition(
    State(st): St,
    _ctx: RequestCtx,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let base = &st.config.base_url;
    let body = match name.as_str() {
        "record-holders" => json!({
            "resourceType": "OperationDefinition",
            "id": "record-holders",
            "url": format!("{base}/OperationDefinition/record-holders"),
            "name": "RecordHolders",
            "status": "active",
            "kind": "operation",
            "code": "record-holders",
            "description": "The organisations holding record pointers for the patient that the caller may see, with how many each.",
            "resource": ["Patient"],
            "system": false,
            "type": false,
            "instance": true,
            "affectsState": false,
            "parameter": [{
                "name": "holder", "use": "out", "min": 0, "max": "*",
                "part": [
                    { "name": "organization", "use": "out", "min": 1, "max": "1", "type": "Identifier" },
                    { "name": "pointers", "use": "out", "min": 1, "max": "1", "type": "integer" }
                ]
            }]
        }),
        "ihe-pix" => json!({
            "resourceType": "OperationDefinition",
            "id": "ihe-pix",
            "url": format!("{base}/OperationDefinition/ihe-pix"),
            "name": "PIXmQuery",
            "status": "active",
            "kind": "operation",
            "code": "ihe-pix",
            "description": "IHE PIXm ITI-83: the identifiers of the patient a source identifier (an NHS Number or a registered local identifier) names. 404 not-found for an unknown identifier, 400 code-invalid for an unregistered source system, 403 code-invalid for an unregistered targetSystem.",
            "resource": ["Patient"],
            "system": false,
            "type": true,
            "instance": false,
            "affectsState": false,
            "parameter": [
                { "name": "sourceIdentifier", "use": "in", "min": 1, "max": "1", "type": "string", "searchType": "token" },
                { "name": "targetSystem", "use": "in", "min": 0, "max": "*", "type": "uri" },
                { "name": "targetIdentifier", "use": "out", "min": 0, "max": "*", "type": "Identifier" },
                { "name": "targetId", "use": "out", "min": 0, "max": "1", "type": "Reference" }
            ]
        }),
        "merge" => json!({
            "resourceType": "OperationDefinition",
            "id": "merge",
            "url": format!("{base}/OperationDefinition/merge"),
            "name": "PatientMerge",
            "status": "active",
            "kind": "operation",
            "code": "merge",
            "description": "Retires an NHS Number into the surviving one in one replicated command: every current pointer moves (same id, a new version, the subject rewritten), holders add up, local identifiers move, an opt-out of either holds. identity-authority only. A patient with more than 10,000 current pointers is refused with 422 too-costly.",
            "resource": ["Patient"],
            "system": false,
            "type": true,
            "instance": false,
            "affectsState": true,
            "parameter": [
                { "name": "source-patient-identifier", "use": "in", "min": 1, "max": "1", "type": "Identifier" },
                { "name": "target-patient-identifier", "use": "in", "min": 1, "max": "1", "type": "Identifier" },
                { "name": "outcome", "use": "out", "min": 1, "max": "1", "type": "OperationOutcome" },
                { "name": "pointers-moved", "use": "out", "min": 1, "max": "1", "type": "integer" },
                { "name": "result", "use": "out", "min": 1, "max": "1", "type": "Patient" }
            ]
        }),
        "subscription-status" => json!({
            "resourceType": "OperationDefinition",
            "id": "subscription-status",
            "url": format!("{base}/OperationDefinition/subscription-status"),
            "name": "SubscriptionStatus",
            "status": "active",
            "kind": "operation",
            "code": "status",
            "description": "The Subscriptions Backport IG's $status (http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status) on one subscription of the caller's: a searchset holding its SubscriptionStatus (status, events-since-subscription-start, error).",
            "resource": ["Subscription"],
            "system": false,
            "type": false,
            "instance": true,
            "affectsState": false,
            "parameter": [{ "name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle" }]
        }),
        "subscription-events" => json!({
            "resourceType": "OperationDefinition",
            "id": "subscription-events",
            "url": format!("{base}/OperationDefinition/subscription-events"),
            "name": "SubscriptionEvents",
            "status": "active",
            "kind": "operation",
            "code": "events",
            "description": "The Subscriptions Backport IG's $events (http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events) on one subscription of the caller's: the retained events from eventsSinceNumber to eventsUntilNumber (at most 100; the last 1,000 are retained) as a query-event history Bundle.",
            "resource": ["Subscription"],
            "system": false,
            "type": false,
            "instance": true,
            "affectsState": false,
            "parameter": [
                { "name": "eventsSinceNumber", "use": "in", "min": 0, "max": "1", "type": "string" },
                { "name": "eventsUntilNumber", "use": "in", "min": 0, "max": "1", "type": "string" },
                { "name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle" }
            ]
        }),
        _ => return Err(ApiError::NotFound("no such OperationDefinition".into())),
    };
    Ok(fhir_json(StatusCode::OK, &body))
}

/// `GET /_status` (NRLF's health check): 200 when this node can serve
/// reads and has a leader with a quorum; 503 otherwise. Needs a client
/// certificate like every API call.
pub(crate) async fn status(State(st): St, _ctx: RequestCtx) -> Result<Response, ApiError> {
    let f = st.replica.freshness();
    if f.stale {
        return Err(ApiError::NoQuorum { reason: "this node has no contact with a quorum".into() });
    }
    Ok(fhir_json(StatusCode::OK, &crate::error::success_outcome("OK", "this node can serve")))
}
