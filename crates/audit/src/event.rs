//! AuditEvent resources in the shape of IHE Basic Audit Log Patterns (BALP):
//! who (organisation and roles), what (interaction and resource), which
//! patient (NHS Number), why (purpose of use), outcome, request id, node, time.

use hie_domain::{NhsNumber, Timestamp};
use hie_fhir::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, instant};
use serde::Serialize;
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

/// One access to one patient's data.
#[derive(Debug, Clone)]
pub struct Access {
    pub subject: NhsNumber,
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
    /// The node that served the request, for example `node-1 (north-east)`.
    pub node: &'a str,
    pub recorded: Timestamp,
    /// The HTTP status answered.
    pub status: u16,
    /// The error code when the request was refused.
    pub error_code: Option<&'a str>,
}

/// An AuditEvent ready for the log: its JSON, and what the log indexes.
#[derive(Debug, Clone)]
pub struct Event {
    /// Compact JSON, keys in sorted order: exactly the form `serde_json`
    /// gives when it reads it back (the chain checks that form).
    pub json: Vec<u8>,
    pub subject: String,
    pub recorded: i64,
}

// The resource, typed so it is written straight to bytes. Fields are in
// byte order of their JSON names at every level (see `Event::json`).

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
    outcome: &'a str,
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

/// The AuditEvent for an access.
pub fn audit_event(access: &Access, ctx: &Context) -> Event {
    // FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure.
    let outcome = match ctx.status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut subtype =
        vec![Coding { code: access.interaction, display: None, system: "http://hl7.org/fhir/restful-interaction" }];
    const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
    let purpose = match &access.emergency_reason {
        Some(reason) => {
            subtype.push(coding(
                "http://dicom.nema.org/resources/ontology/DCM",
                "110127",
                "Emergency Override Started",
            ));
            Concept { coding: vec![coding(ACT_REASON, "ETREAT", "Emergency Treatment")], text: Some(reason) }
        }
        None => Concept { coding: vec![coding(ACT_REASON, "TREAT", "treatment")], text: None },
    };
    let subject = access.subject.as_str();
    let mut entity = vec![
        Entity {
            role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")),
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"),
            what: Reference {
                display: None,
                identifier: Some(Ident { system: NHS_NUMBER_SYSTEM, value: subject }),
                reference: None,
            },
        },
        Entity {
            role: None,
            kind: Coding {
                code: "XrequestId",
                display: None,
                system: "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
            },
            what: Reference {
                display: None,
                identifier: Some(Ident { system: "urn:hie:request-id", value: ctx.request_id }),
                reference: None,
            },
        },
    ];
    if let Some(resource) = &access.resource {
        entity.push(Entity {
            role: Some(coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource")),
            kind: coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
            what: Reference { display: None, identifier: None, reference: Some(resource) },
        });
    }
    let roles = ctx
        .caller_roles
        .iter()
        .map(|r| Concept { coding: vec![Coding { code: r, display: None, system: "urn:hie:role" }], text: None })
        .collect();
    let profile = if access.action == Action::Read || access.action == Action::Execute {
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
    } else {
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientCreate"
    };
    let event = AuditEvent {
        action: access.action.code(),
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
                    identifier: Some(Ident { system: ODS_SYSTEM, value: ctx.caller_ods }),
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
                who: Reference { display: Some(ctx.node), identifier: None, reference: None },
            },
        ],
        entity,
        id: &ctx.event_id,
        meta: Meta { profile: [profile] },
        outcome,
        outcomeDesc: (outcome != "0")
            .then(|| format!("HTTP {}{}", ctx.status, ctx.error_code.map(|c| format!(" {c}")).unwrap_or_default())),
        purposeOfEvent: [purpose],
        recorded: instant(ctx.recorded),
        resourceType: "AuditEvent",
        source: Source {
            observer: Reference { display: Some(ctx.node), identifier: None, reference: None },
            kind: [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
        },
        subtype,
        kind: coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"),
    };
    Event {
        json: serde_json::to_vec(&event).expect("an audit event serialises"),
        subject: subject.to_owned(),
        recorded: ctx.recorded.0,
    }
}

/// When an event was recorded, in ms since the epoch.
pub fn recorded_millis(event: &Value) -> Option<i64> {
    let s = event.get("recorded")?.as_str()?;
    Some(chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_millis())
}

/// The patient an event is about.
pub fn subject_of(event: &Value) -> Option<&str> {
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
                subject: hie_domain::mem::testkit::nhs(3),
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
        }
    }
}
