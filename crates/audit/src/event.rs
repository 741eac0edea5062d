//! AuditEvent resources in the shape of IHE Basic Audit Log Patterns (BALP):
//! who (organisation and roles), what (interaction and resource), which
//! patient (NHS Number), why (purpose of use), outcome, request id, node, time.

use hie_domain::{NhsNumber, Timestamp};
use serde_json::{Value, json};

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

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

pub fn instant(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The AuditEvent for an access, without its `id` (the log gives it one).
pub fn audit_event(access: &Access, ctx: &Context) -> Value {
    // FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure.
    let outcome = match ctx.status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut subtype = vec![json!({
        "system": "http://hl7.org/fhir/restful-interaction",
        "code": access.interaction,
    })];
    let purpose = match &access.emergency_reason {
        Some(reason) => {
            subtype.push(json!({
                "system": "http://dicom.nema.org/resources/ontology/DCM",
                "code": "110127",
                "display": "Emergency Override Started",
            }));
            json!({
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": "ETREAT",
                    "display": "Emergency Treatment",
                }],
                "text": reason,
            })
        }
        None => json!({
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "code": "TREAT",
                "display": "treatment",
            }]
        }),
    };
    let mut entity = vec![
        json!({
            "what": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": access.subject.as_str() } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" },
        }),
        json!({
            "what": { "identifier": { "system": "urn:hie:request-id", "value": ctx.request_id } },
            "type": { "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType", "code": "XrequestId" },
        }),
    ];
    if let Some(resource) = &access.resource {
        entity.push(json!({
            "what": { "reference": resource },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource" },
        }));
    }
    let roles: Vec<Value> =
        ctx.caller_roles.iter().map(|r| json!({ "coding": [{ "system": "urn:hie:role", "code": r }] })).collect();
    let mut event = json!({
        "resourceType": "AuditEvent",
        "meta": { "profile": [ if access.action == Action::Read || access.action == Action::Execute {
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
        } else {
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientCreate"
        } ] },
        "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation" },
        "subtype": subtype,
        "action": access.action.code(),
        "recorded": instant(ctx.recorded),
        "outcome": outcome,
        "purposeOfEvent": [purpose],
        "agent": [
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient" }] },
                "who": { "identifier": { "system": ODS_SYSTEM, "value": ctx.caller_ods } },
                "role": roles,
                "requestor": true,
            },
            {
                "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
                "who": { "display": ctx.node },
                "requestor": false,
            }
        ],
        "source": {
            "observer": { "display": ctx.node },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }],
        },
        "entity": entity,
    });
    if outcome != "0" {
        event["outcomeDesc"] =
            json!(format!("HTTP {}{}", ctx.status, ctx.error_code.map(|c| format!(" {c}")).unwrap_or_default()));
    }
    event
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
