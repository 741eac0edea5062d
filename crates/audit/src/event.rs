//! Audit events: stored compactly (the facts of an access: who, what, which
//! patient, why, outcome, request id, node, time) and read back as AuditEvent
//! resources in the shape of IHE Basic Audit Log Patterns (BALP).
//!
//! The stored form is about a tenth of the size of the resource, and every
//! search writes one, so the hot path builds, hashes, writes and fsyncs
//! ~240 bytes instead of ~1.9 KB; the resource is built only when a patient
//! or a SIEM reads the event.

use std::sync::atomic::{AtomicU64, Ordering};

use hie_domain::{NhsNumber, Timestamp};
use hie_fhir::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, instant};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What was done, as AuditEvent.action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// One access to one patient's data, or (no subject) an operator's action.
#[derive(Debug, Clone)]
pub struct Access {
    /// `None` for an operator's action (`/admin/*`): it names no patient and
    /// is not indexed by patient; `hie audit export` has it.
    pub subject: Option<NhsNumber>,
    pub action: Action,
    /// FHIR restful-interaction code: `read`, `search-type`, `create`, ...
    pub interaction: &'static str,
    /// The resource touched, such as `DocumentReference/<id>`, when one was.
    pub resource: Option<String>,
    /// `Some(reason)` for a break-glass (emergency override) access.
    pub emergency_reason: Option<String>,
}

/// Who asked, where and how it ended.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The event's id (unique: the node's id and a random part).
    pub event_id: String,
    pub caller_ods: &'a str,
    pub caller_roles: Vec<&'a str>,
    pub request_id: &'a str,
    /// The client's `X-Correlation-ID`, when it sent one.
    pub correlation_id: Option<&'a str>,
    /// The node that served the request, for example `node-1 (north-east)`.
    pub node: &'a str,
    pub recorded: Timestamp,
    /// The HTTP status answered; [`INTENT`] for the record of a change
    /// written before the change is proposed.
    pub status: u16,
    /// The error code when the request was refused.
    pub error_code: Option<&'a str>,
}

/// An event ready for the log: its stored JSON, and what the log indexes.
#[derive(Debug, Clone)]
pub struct Event {
    /// Compact JSON, keys in sorted order: exactly the form `serde_json`
    /// gives when it reads it back (the chain checks that form).
    pub json: Vec<u8>,
    pub subject: String,
    pub recorded: i64,
}

/// Event ids unique to a node and a run of it: the node's id, a random
/// part drawn at start-up, and a counter (no random draw per event).
#[derive(Debug)]
pub struct EventIds {
    prefix: String,
    next: AtomicU64,
}

impl EventIds {
    pub fn new(node_id: u64) -> EventIds {
        let run = uuid::Uuid::new_v4().as_u64_pair().0 as u32;
        EventIds { prefix: format!("{node_id}-{run:08x}-"), next: AtomicU64::new(1) }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}

/// The stored form of an event (format 2): the facts of the access and
/// nothing that can be derived from them. Fields are in byte order of their
/// names (the canonical form). [`render`] makes the BALP AuditEvent from it
/// when it is read; the chain covers the stored bytes.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    /// AuditEvent.action: C, R, U, D or E.
    action: &'a str,
    /// When it was recorded, in ms since the epoch.
    at: i64,
    /// The client's correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    corr: Option<&'a str>,
    /// The break-glass reason of an emergency override.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    emergency: Option<&'a str>,
    /// The error code of a refused request.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    error: Option<&'a str>,
    id: &'a str,
    /// The FHIR restful-interaction code.
    interaction: &'a str,
    /// The node that served it, for example `node-1 (north-east)`.
    node: &'a str,
    /// The caller's ODS code.
    org: &'a str,
    /// The NHS Number.
    patient: &'a str,
    /// The request id.
    request: &'a str,
    /// The resource touched, such as `DocumentReference/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    resource: Option<&'a str>,
    /// The caller's roles.
    #[serde(borrow)]
    roles: Vec<&'a str>,
    /// The HTTP status answered.
    status: u16,
    /// The stored form's version, [`STORED_FORMAT`]. Format 1 (before
    /// 2026-12) stored the whole AuditEvent: it has `resourceType`, no `v`.
    v: u8,
}

const STORED_FORMAT: u8 = 2;

/// The status of an intent: the record of a change, written and fsynced
/// before the change is proposed, so that no change can be committed
/// without a record of it even if the node stops before it answers. The
/// record of how the change ended (same request id) follows it; a query
/// shows the intent only when that record is missing.
pub const INTENT: u16 = 0;

/// What pairs an intent with the record of how its change ended: request,
/// action, resource and patient.
fn pairing(event: &Value) -> Option<(bool, [&str; 4])> {
    let s = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("");
    let status = event.get("status")?.as_u64()?;
    Some((status == u64::from(INTENT), [s("request"), s("action"), s("resource"), s("patient")]))
}

/// Drops from `events` (stored form, oldest first) every intent that a
/// later record of the same change settles: what remains of an intent is
/// a change whose end the node never recorded.
pub fn hide_settled_intents<T>(events: &mut Vec<T>, stored: impl Fn(&T) -> &Value) {
    let mut settled: std::collections::HashMap<[&str; 4], usize> = std::collections::HashMap::new();
    for e in events.iter() {
        if let Some((false, key)) = pairing(stored(e)) {
            *settled.entry(key).or_default() += 1;
        }
    }
    if settled.is_empty() {
        return;
    }
    let keep: Vec<bool> = events
        .iter()
        .map(|e| match pairing(stored(e)) {
            Some((true, key)) => match settled.get_mut(&key) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            },
            _ => true,
        })
        .collect();
    let mut keep = keep.into_iter();
    events.retain(|_| keep.next().unwrap_or(true));
}

// The resource, typed so it is built without intermediate maps.

#[derive(Serialize)]
struct Coding<'a> {
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
    system: &'a str,
}

#[derive(Serialize)]
struct Concept<'a> {
    coding: Vec<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

#[derive(Serialize)]
struct Ident<'a> {
    system: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct Reference<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identifier: Option<Ident<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

#[derive(Serialize)]
struct Agent<'a> {
    requestor: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    role: Vec<Concept<'a>>,
    #[serde(rename = "type")]
    kind: Concept<'a>,
    who: Reference<'a>,
}

#[derive(Serialize)]
struct Entity<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Coding<'a>>,
    #[serde(rename = "type")]
    kind: Coding<'a>,
    what: Reference<'a>,
}

#[derive(Serialize)]
struct Meta<'a> {
    profile: [&'a str; 1],
}

#[derive(Serialize)]
struct Source<'a> {
    observer: Reference<'a>,
    #[serde(rename = "type")]
    kind: [Coding<'a>; 1],
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct AuditEvent<'a> {
    action: &'a str,
    agent: [Agent<'a>; 2],
    entity: Vec<Entity<'a>>,
    id: &'a str,
    meta: Meta<'a>,
    /// Absent for an intent: how the change ended was never recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcomeDesc: Option<String>,
    purposeOfEvent: [Concept<'a>; 1],
    recorded: String,
    resourceType: &'a str,
    source: Source<'a>,
    subtype: Vec<Coding<'a>>,
    #[serde(rename = "type")]
    kind: Coding<'a>,
}

const fn coding<'a>(system: &'a str, code: &'a str, display: &'a str) -> Coding<'a> {
    Coding { code, display: Some(display), system }
}

/// A BALP request-identifier entity (`XrequestId`) naming `value` in `system`.
fn request_entity<'a>(system: &'a str, value: &'a str) -> Entity<'a> {
    Entity {
        role: None,
        kind: Coding {
            code: "XrequestId",
            display: None,
            system: "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
        },
        what: Reference { display: None, identifier: Some(Ident { system, value }), reference: None },
    }
}

/// The event for an access, in its stored form.
pub fn audit_event(access: &Access, ctx: &Context<'_>) -> Event {
    let subject = access.subject.as_ref().map_or("", NhsNumber::as_str);
    let stored = Stored {
        action: access.action.code(),
        at: ctx.recorded.0,
        corr: ctx.correlation_id,
        emergency: access.emergency_reason.as_deref(),
        error: ctx.error_code,
        id: &ctx.event_id,
        interaction: access.interaction,
        node: ctx.node,
        org: ctx.caller_ods,
        patient: subject,
        request: ctx.request_id,
        resource: access.resource.as_deref(),
        roles: ctx.caller_roles.clone(),
        status: ctx.status,
        v: STORED_FORMAT,
    };
    Event {
        json: serde_json::to_vec(&stored).expect("an audit event serialises"),
        subject: subject.to_owned(),
        recorded: ctx.recorded.0,
    }
}

/// A stored event as the FHIR AuditEvent (IHE BALP) it stands for. A
/// format 1 record is an AuditEvent already.
pub fn render(event: &Value) -> Result<Value, String> {
    match stored(event)? {
        None => Ok(event.clone()),
        Some(stored) => Ok(serde_json::to_value(balp(&stored)).expect("an audit event serialises")),
    }
}

/// Checks that a stored event is one this version can read.
pub fn check(event: &Value) -> Result<(), String> {
    stored(event).map(|_| ())
}

/// The facts of a format 2 event; `None` for format 1 (an AuditEvent).
fn stored(event: &Value) -> Result<Option<Stored<'_>>, String> {
    if event.get("resourceType").and_then(Value::as_str) == Some("AuditEvent") && event.get("v").is_none() {
        return Ok(None);
    }
    let stored = Stored::deserialize(event).map_err(|e| format!("not an audit event: {e}"))?;
    if stored.v != STORED_FORMAT {
        return Err(format!("audit event format {} is not known to this version", stored.v));
    }
    Ok(Some(stored))
}

/// The BALP AuditEvent for the stored facts.
fn balp<'a>(s: &Stored<'a>) -> AuditEvent<'a> {
    // FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure.
    let outcome = match s.status {
        INTENT => None,
        200..=399 => Some("0"),
        400..=499 => Some("4"),
        _ => Some("8"),
    };
    let mut subtype =
        vec![Coding { code: s.interaction, display: None, system: "http://hl7.org/fhir/restful-interaction" }];
    const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
    let purpose = match s.emergency {
        Some(reason) => {
            subtype.push(coding(
                "http://dicom.nema.org/resources/ontology/DCM",
                "110127",
                "Emergency Override Started",
            ));
            Concept { coding: vec![coding(ACT_REASON, "ETREAT", "Emergency Treatment")], text: Some(reason) }
        }
        // An operator's action names no patient.
        None if s.patient.is_empty() => {
            Concept { coding: vec![coding(ACT_REASON, "HOPERAT", "healthcare operations")], text: None }
        }
        None => Concept { coding: vec![coding(ACT_REASON, "TREAT", "treatment")], text: None },
    };
    let mut entity = Vec::with_capacity(4);
    if !s.patient.is_empty() {
        entity.push(Entity {
            role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")),
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"),
            what: Reference {
                display: None,
                identifier: Some(Ident { system: NHS_NUMBER_SYSTEM, value: s.patient }),
                reference: None,
            },
        });
    }
    entity.push(request_entity("urn:hie:request-id", s.request));
    if let Some(corr) = s.corr {
        // The client's correlation id, as a second request identifier.
        entity.push(request_entity("urn:hie:correlation-id", corr));
    }
    if let Some(resource) = s.resource {
        entity.push(Entity {
            role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource")),
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
            what: Reference { display: None, identifier: None, reference: Some(resource) },
        });
    }
    let roles = s
        .roles
        .iter()
        .map(|r| Concept { coding: vec![Coding { code: r, display: None, system: "urn:hie:role" }], text: None })
        .collect();
    let profile = if s.action == "R" || s.action == "E" {
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
    } else {
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientCreate"
    };
    AuditEvent {
        action: s.action,
        agent: [
            Agent {
                requestor: true,
                role: roles,
                kind: Concept {
                    coding: vec![coding(
                        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                        "IRCP",
                        "information recipient",
                    )],
                    text: None,
                },
                who: Reference {
                    display: None,
                    identifier: Some(Ident { system: ODS_SYSTEM, value: s.org }),
                    reference: None,
                },
            },
            Agent {
                requestor: false,
                role: vec![],
                kind: Concept {
                    coding: vec![coding("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID")],
                    text: None,
                },
                who: Reference { display: Some(s.node), identifier: None, reference: None },
            },
        ],
        entity,
        id: s.id,
        meta: Meta { profile: [profile] },
        outcome,
        outcomeDesc: match outcome {
            Some("0") => None,
            Some(_) => Some(format!("HTTP {}{}", s.status, s.error.map(|c| format!(" {c}")).unwrap_or_default())),
            None => Some(
                "intent: recorded before the change was proposed; the node recorded no outcome (it stopped before \
                 answering), so the change may or may not have been made"
                    .to_owned(),
            ),
        },
        purposeOfEvent: [purpose],
        recorded: instant(Timestamp(s.at)),
        resourceType: "AuditEvent",
        source: Source {
            observer: Reference { display: Some(s.node), identifier: None, reference: None },
            kind: [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
        },
        subtype,
        kind: coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"),
    }
}

/// When a stored event was recorded, in ms since the epoch.
pub fn recorded_millis(event: &Value) -> Option<i64> {
    if let Some(at) = event.get("at") {
        return at.as_i64();
    }
    let s = event.get("recorded")?.as_str()?;
    Some(chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_millis())
}

/// The patient a stored event is about (none for an operator's action).
pub fn subject_of(event: &Value) -> Option<&str> {
    if let Some(patient) = event.get("patient") {
        return patient.as_str().filter(|p| !p.is_empty());
    }
    event.get("entity")?.as_array()?.iter().find_map(|e| {
        let id = e.get("what")?.get("identifier")?;
        (id.get("system")?.as_str()? == NHS_NUMBER_SYSTEM).then(|| id.get("value")?.as_str()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain requires a record in exactly the form serde_json gives the
    /// value read back: sorted keys at every level.
    #[test]
    fn events_are_written_in_canonical_form() {
        for (reason, status, resource) in
            [(None, 200, None), (Some("unconscious"), 404, Some("DocumentReference/x".into()))]
        {
            let access = Access {
                subject: Some(hie_domain::mem::testkit::nhs(3)),
                action: Action::Read,
                interaction: "read",
                resource,
                emergency_reason: reason.map(str::to_owned),
            };
            let ctx = Context {
                event_id: "1-abc".into(),
                caller_ods: "RX9",
                caller_roles: vec!["consumer", "producer"],
                request_id: "r-\"quoted\"",
                correlation_id: Some("c-1"),
                node: "node-1 (north-east)",
                recorded: Timestamp(1_700_000_000_123),
                status,
                error_code: Some("NO_RECORD_FOUND"),
            };
            let e = audit_event(&access, &ctx);
            let v: Value = serde_json::from_slice(&e.json).unwrap();
            assert_eq!(serde_json::to_vec(&v).unwrap(), e.json, "{}", String::from_utf8_lossy(&e.json));
            assert_eq!(recorded_millis(&v), Some(e.recorded));
            assert_eq!(subject_of(&v), Some(e.subject.as_str()));
            assert!(e.json.len() < 400, "the stored form stays compact: {} bytes", e.json.len());

            // Read back, it is the BALP AuditEvent, which says the same.
            let r = render(&v).unwrap();
            assert_eq!(r["resourceType"], "AuditEvent");
            assert_eq!(r["id"], "1-abc");
            assert_eq!(r["recorded"], "2023-11-14T22:13:20.123Z");
            assert_eq!(recorded_millis(&r), Some(e.recorded));
            assert_eq!(subject_of(&r), Some(e.subject.as_str()));
            assert_eq!(r["agent"][0]["who"]["identifier"]["value"], "RX9");
            assert_eq!(r["agent"][0]["role"][1]["coding"][0]["code"], "producer");
            assert_eq!(r["source"]["observer"]["display"], "node-1 (north-east)");
            assert_eq!(r["entity"][1]["what"]["identifier"]["value"], "r-\"quoted\"");
            assert_eq!(
                r["entity"][2]["what"]["identifier"],
                serde_json::json!({ "system": "urn:hie:correlation-id", "value": "c-1" })
            );
            assert_eq!(r["subtype"][0]["code"], "read");
            let purpose = &r["purposeOfEvent"][0];
            match reason {
                Some(reason) => {
                    assert_eq!(purpose["coding"][0]["code"], "ETREAT");
                    assert_eq!(purpose["text"], reason);
                    assert_eq!(r["subtype"][1]["code"], "110127");
                }
                None => assert_eq!(purpose["coding"][0]["code"], "TREAT"),
            }
            if status == 404 {
                assert_eq!((&r["outcome"], &r["outcomeDesc"]), (&"4".into(), &"HTTP 404 NO_RECORD_FOUND".into()));
                assert_eq!(r["entity"][3]["what"]["reference"], "DocumentReference/x");
            } else {
                assert_eq!((&r["outcome"], r.get("outcomeDesc")), (&"0".into(), None));
                assert_eq!(r["entity"].as_array().unwrap().len(), 3, "patient, request id, correlation id");
            }
            // A format 1 record (the whole resource) reads back as itself.
            assert_eq!(render(&r).unwrap(), r);
        }
        let mut unknown: Value = serde_json::from_slice(&audit_event(&access(), &context()).json).unwrap();
        unknown["v"] = 3.into();
        assert!(render(&unknown).unwrap_err().contains("format 3"));
    }

    /// An operator's action names no patient, is not indexed by one, and
    /// reads back as an AuditEvent for healthcare operations.
    #[test]
    fn an_operator_action_names_no_patient() {
        let action = Access {
            subject: None,
            action: Action::Execute,
            interaction: "operation",
            resource: Some("GET /admin/backup".into()),
            emergency_reason: None,
        };
        let e = audit_event(&action, &context());
        let v: Value = serde_json::from_slice(&e.json).unwrap();
        assert_eq!(subject_of(&v), None);
        let r = render(&v).unwrap();
        assert_eq!(r["purposeOfEvent"][0]["coding"][0]["code"], "HOPERAT");
        let entities = r["entity"].as_array().unwrap();
        assert!(entities.iter().all(|e| e["what"]["identifier"]["system"] != NHS_NUMBER_SYSTEM), "{r}");
        assert!(entities.iter().any(|e| e["what"]["reference"] == "GET /admin/backup"), "{r}");
    }

    fn access() -> Access {
        Access {
            subject: Some(hie_domain::mem::testkit::nhs(1)),
            action: Action::Create,
            interaction: "create",
            resource: None,
            emergency_reason: None,
        }
    }

    fn context() -> Context<'static> {
        Context {
            event_id: "1-x".into(),
            caller_ods: "A81001",
            caller_roles: vec!["producer"],
            request_id: "r",
            correlation_id: None,
            node: "node-1",
            recorded: Timestamp(0),
            status: 201,
            error_code: None,
        }
    }

    #[test]
    fn event_ids_differ_within_and_across_runs() {
        let (a, b) = (EventIds::new(1), EventIds::new(1));
        let ids: std::collections::BTreeSet<String> = (0..100).flat_map(|_| [a.next(), b.next()]).collect();
        assert_eq!(ids.len(), 200);
        assert!(ids.iter().all(|id| id.starts_with("1-")));
    }
}
