//! Patient identity in FHIR terms: the IHE PMIR feed of a local identifier
//! (ITI-104's `Patient`), the PIXm query's parameters and answer (ITI-83),
//! and `$merge`'s `Parameters`. hie holds no demographics: a fed `Patient`
//! is read for its identifiers only.

use hie_domain::{AssigningAuthority, Identifier, NhsNumber};
use serde_json::{Value, json};

use crate::{FhirError, NHS_NUMBER_SYSTEM, invalid, parse_resource};

fn bad(msg: impl Into<String>) -> FhirError {
    FhirError::InvalidParameter(msg.into())
}

/// Checks a local identifier's system and value against the named limits.
fn checked(system: &str, value: &str, what: &str, err: fn(String) -> FhirError) -> Result<Identifier, FhirError> {
    if system.is_empty() || system.len() > AssigningAuthority::SYSTEM_LEN_MAX {
        return Err(err(format!("{what}: the system must be 1 to {} characters", AssigningAuthority::SYSTEM_LEN_MAX)));
    }
    if system.chars().any(|c| c.is_control() || c.is_whitespace() || c == '|') {
        return Err(err(format!("{what}: the system must be a URI")));
    }
    if value.is_empty() || value.len() > AssigningAuthority::VALUE_LEN_MAX {
        return Err(err(format!("{what}: the value must be 1 to {} characters", AssigningAuthority::VALUE_LEN_MAX)));
    }
    if value.chars().any(char::is_control) {
        return Err(err(format!("{what}: the value holds a control character")));
    }
    Ok(Identifier { system: system.to_owned(), value: value.to_owned() })
}

/// A token parameter `<system>|<value>` naming a patient: an NHS Number
/// (checked) or a local identifier.
pub fn parse_identifier_token(name: &str, token: &str) -> Result<Identifier, FhirError> {
    let (system, value) =
        token.split_once('|').ok_or_else(|| bad(format!("{name} must be <system>|<value>, the system a URI")))?;
    if system == NHS_NUMBER_SYSTEM {
        let n = NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)?;
        return Ok(nhs_identifier(&n));
    }
    checked(system, value, name, FhirError::InvalidParameter)
}

pub fn nhs_identifier(n: &NhsNumber) -> Identifier {
    Identifier { system: NHS_NUMBER_SYSTEM.to_owned(), value: n.as_str().to_owned() }
}

fn identifier_json(id: &Identifier) -> Value {
    json!({ "system": id.system, "value": id.value })
}

/// ITI-104's body: a `Patient` whose `identifier` holds `local` (the one
/// the URL names) and the patient's NHS Number, and no other identifier.
/// Other elements (demographics) are accepted and not kept.
pub fn parse_patient_feed(body: &[u8], local: &Identifier) -> Result<NhsNumber, FhirError> {
    let v = parse_resource(body, "Patient")?;
    let ids = v.get("identifier").and_then(Value::as_array).ok_or_else(|| invalid("identifier is required"))?;
    let (mut nhs, mut named) = (None, false);
    for (i, id) in ids.iter().enumerate() {
        let field = |f: &str| id.get(f).and_then(Value::as_str);
        let (Some(system), Some(value)) = (field("system"), field("value")) else {
            return Err(invalid(format!("identifier[{i}] needs a system and a value")));
        };
        if system == NHS_NUMBER_SYSTEM {
            if nhs.is_some() {
                return Err(invalid("identifier may hold one NHS Number"));
            }
            nhs = Some(NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)?);
        } else if system == local.system && value == local.value {
            named = true;
        } else {
            return Err(invalid(format!(
                "identifier[{i}] is neither the NHS Number nor the identifier the request names; feed each local identifier on its own"
            )));
        }
    }
    if !named {
        return Err(invalid("identifier must hold the identifier the request names"));
    }
    nhs.ok_or_else(|| invalid(format!("identifier must hold the patient's NHS Number ({NHS_NUMBER_SYSTEM})")))
}

/// The cross-reference as recorded: a `Patient` with its two identifiers.
pub fn fed_patient(local: &Identifier, nhs: &NhsNumber) -> Value {
    json!({
        "resourceType": "Patient",
        "id": nhs.as_str(),
        "identifier": [identifier_json(&nhs_identifier(nhs)), identifier_json(local)],
    })
}

/// The parameters of a PIXm query: the source identifier and the target
/// systems asked for (none: every system).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PixQuery {
    pub source: Identifier,
    pub targets: Vec<String>,
}

/// Target systems one PIXm query may name.
pub const PIX_TARGETS_MAX: usize = 16;

pub fn parse_pix_query(pairs: Vec<(String, String)>) -> Result<PixQuery, FhirError> {
    let (mut source, mut targets) = (None, Vec::new());
    for (k, v) in pairs {
        match k.as_str() {
            "sourceIdentifier" => {
                if source.is_some() {
                    return Err(bad("sourceIdentifier may be given once"));
                }
                source = Some(parse_identifier_token("sourceIdentifier", &v)?);
            }
            "targetSystem" => {
                for t in v.split(',') {
                    if t.is_empty() || t.len() > AssigningAuthority::SYSTEM_LEN_MAX {
                        return Err(bad(format!(
                            "targetSystem must be 1 to {} characters",
                            AssigningAuthority::SYSTEM_LEN_MAX
                        )));
                    }
                    if !targets.iter().any(|x| x == t) {
                        targets.push(t.to_owned());
                    }
                }
                if targets.len() > PIX_TARGETS_MAX {
                    return Err(bad(format!("targetSystem may name at most {PIX_TARGETS_MAX} systems")));
                }
            }
            "_format" if v == "json" || v.ends_with("fhir+json") => {}
            other => return Err(bad(format!("unknown parameter {}", crate::search::printable(other)))),
        }
    }
    let source = source.ok_or_else(|| bad("sourceIdentifier is required"))?;
    Ok(PixQuery { source, targets })
}

/// PIXm's answer: a `targetIdentifier` per identifier, and the patient as
/// `targetId`.
pub fn pix_parameters(nhs: &NhsNumber, identifiers: &[Identifier]) -> Value {
    let mut parameter: Vec<Value> = identifiers
        .iter()
        .map(|id| json!({ "name": "targetIdentifier", "valueIdentifier": identifier_json(id) }))
        .collect();
    parameter
        .push(json!({ "name": "targetId", "valueReference": { "reference": format!("Patient/{}", nhs.as_str()) } }));
    json!({ "resourceType": "Parameters", "parameter": parameter })
}

/// `$merge`'s input: the retired number and the surviving one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeIn {
    pub source: NhsNumber,
    pub target: NhsNumber,
}

/// Parses `$merge`'s `Parameters`: `source-patient-identifier` and
/// `target-patient-identifier`, once each, each a `valueIdentifier` of the
/// NHS Number system. Other parameters of FHIR's `$merge` (references to
/// Patient resources, `result-patient`, `preview`) are refused: hie holds
/// no Patient resources.
pub fn parse_merge(body: &[u8]) -> Result<MergeIn, FhirError> {
    let v = parse_resource(body, "Parameters")?;
    let params = v.get("parameter").and_then(Value::as_array).ok_or_else(|| invalid("parameter is required"))?;
    let (mut source, mut target) = (None, None);
    for p in params {
        let name = p.get("name").and_then(Value::as_str).ok_or_else(|| invalid("every parameter needs a name"))?;
        let slot = match name {
            "source-patient-identifier" => &mut source,
            "target-patient-identifier" => &mut target,
            other => {
                return Err(invalid(format!(
                    "parameter {} is not supported: name the numbers by source-patient-identifier and target-patient-identifier",
                    crate::search::printable(other)
                )));
            }
        };
        if slot.is_some() {
            return Err(invalid(format!("{name} may be given once")));
        }
        let id = p.get("valueIdentifier").ok_or_else(|| invalid(format!("{name} must be a valueIdentifier")))?;
        if id.get("system").and_then(Value::as_str) != Some(NHS_NUMBER_SYSTEM) {
            return Err(invalid(format!("{name} must be an identifier of the system {NHS_NUMBER_SYSTEM}")));
        }
        let value = id.get("value").and_then(Value::as_str).ok_or_else(|| invalid(format!("{name} needs a value")))?;
        *slot = Some(NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)?);
    }
    match (source, target) {
        (Some(source), Some(target)) => Ok(MergeIn { source, target }),
        _ => Err(invalid("both source-patient-identifier and target-patient-identifier are required")),
    }
}

/// `$merge`'s answer: the outcome (how many pointers moved) and the
/// surviving patient, linked to the number it replaces.
pub fn merge_parameters(merge: &MergeIn, moved: u64) -> Value {
    let text = if moved == 0 {
        "merged; no pointer needed moving (a repeat of a merge already made moves nothing)".to_owned()
    } else {
        format!("merged; {moved} current pointers moved to the surviving number")
    };
    json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "input", "resource": {
                "resourceType": "Parameters",
                "parameter": [
                    { "name": "source-patient-identifier", "valueIdentifier": identifier_json(&nhs_identifier(&merge.source)) },
                    { "name": "target-patient-identifier", "valueIdentifier": identifier_json(&nhs_identifier(&merge.target)) },
                ]
            } },
            { "name": "outcome", "resource": {
                "resourceType": "OperationOutcome",
                "issue": [{ "severity": "information", "code": "informational", "diagnostics": text }]
            } },
            { "name": "pointers-moved", "valueInteger": moved },
            { "name": "result", "resource": {
                "resourceType": "Patient",
                "id": merge.target.as_str(),
                "identifier": [identifier_json(&nhs_identifier(&merge.target))],
                "link": [{ "other": { "identifier": identifier_json(&nhs_identifier(&merge.source)) }, "type": "replaces" }]
            } },
        ]
    })
}

/// The issue a read of a retired number carries: what it answers for.
pub fn merged_notice(survivor: &NhsNumber) -> String {
    format!(
        "the NHS Number asked for was merged into {NHS_NUMBER_SYSTEM}|{}; this answer is the surviving number's",
        survivor.as_str()
    )
}

/// An OperationOutcome with one warning (for a searchset's `outcome` entry
/// or beside an operation's answer).
pub fn warning_outcome(diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "warning", "code": "informational", "diagnostics": diagnostics }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "https://pas.rr8.example.nhs.uk/mrn";

    fn local() -> Identifier {
        Identifier { system: LOCAL.into(), value: "RR8-000123".into() }
    }

    fn feed(ids: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({ "resourceType": "Patient", "identifier": ids, "name": [{ "family": "Test" }] }))
            .unwrap()
    }

    #[test]
    fn a_feed_names_the_local_identifier_and_one_nhs_number() {
        let nhs = json!({ "system": NHS_NUMBER_SYSTEM, "value": "9434765919" });
        let loc = json!({ "system": LOCAL, "value": "RR8-000123" });
        assert_eq!(parse_patient_feed(&feed(json!([loc, nhs])), &local()).unwrap().as_str(), "9434765919");
        assert!(parse_patient_feed(&feed(json!([nhs])), &local()).is_err(), "without the local identifier");
        assert!(parse_patient_feed(&feed(json!([loc])), &local()).is_err(), "without an NHS Number");
        assert!(parse_patient_feed(&feed(json!([loc, nhs, nhs])), &local()).is_err(), "two NHS Numbers");
        let other = json!({ "system": "https://x.example/id", "value": "1" });
        assert!(parse_patient_feed(&feed(json!([loc, nhs, other])), &local()).is_err(), "a third identifier");
        let bad = json!({ "system": NHS_NUMBER_SYSTEM, "value": "9434765918" });
        assert!(matches!(parse_patient_feed(&feed(json!([loc, bad])), &local()), Err(FhirError::InvalidNhsNumber(_))));
        assert!(parse_patient_feed(b"{\"resourceType\":\"Consent\"}", &local()).is_err());
    }

    #[test]
    fn tokens_and_pix_parameters() {
        let t = parse_identifier_token("sourceIdentifier", &format!("{LOCAL}|RR8-1")).unwrap();
        assert_eq!((t.system.as_str(), t.value.as_str()), (LOCAL, "RR8-1"));
        let n = parse_identifier_token("sourceIdentifier", &format!("{NHS_NUMBER_SYSTEM}|9434765919")).unwrap();
        assert_eq!(n.value, "9434765919");
        for bad in ["nobar", "|x", &format!("{LOCAL}|"), &format!("{NHS_NUMBER_SYSTEM}|9434765918")] {
            assert!(parse_identifier_token("s", bad).is_err(), "{bad}");
        }
        let long = format!("{LOCAL}|{}", "1".repeat(AssigningAuthority::VALUE_LEN_MAX + 1));
        assert!(parse_identifier_token("s", &long).is_err());
        let q = parse_pix_query(vec![
            ("sourceIdentifier".into(), format!("{LOCAL}|RR8-1")),
            ("targetSystem".into(), NHS_NUMBER_SYSTEM.into()),
        ])
        .unwrap();
        assert_eq!(q.targets, vec![NHS_NUMBER_SYSTEM.to_owned()]);
        assert!(parse_pix_query(vec![]).is_err());
        assert!(
            parse_pix_query(vec![("sourceIdentifier".into(), format!("{LOCAL}|1")), ("x".into(), "y".into())]).is_err()
        );
    }

    fn merge_body(params: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({ "resourceType": "Parameters", "parameter": params })).unwrap()
    }

    fn param(name: &str, system: &str, value: &str) -> Value {
        json!({ "name": name, "valueIdentifier": { "system": system, "value": value } })
    }

    #[test]
    fn merge_parameters_are_checked() {
        let ok = merge_body(json!([
            param("source-patient-identifier", NHS_NUMBER_SYSTEM, "9434765919"),
            param("target-patient-identifier", NHS_NUMBER_SYSTEM, "9434765870"),
        ]));
        let m = parse_merge(&ok).unwrap();
        assert_eq!((m.source.as_str(), m.target.as_str()), ("9434765919", "9434765870"));
        let refused = |params: Value| parse_merge(&merge_body(params)).unwrap_err();
        assert!(matches!(
            refused(json!([param("source-patient-identifier", NHS_NUMBER_SYSTEM, "9434765919")])),
            FhirError::InvalidResource(_)
        ));
        assert!(matches!(
            refused(json!([
                param("source-patient-identifier", LOCAL, "9434765919"),
                param("target-patient-identifier", NHS_NUMBER_SYSTEM, "9434765870"),
            ])),
            FhirError::InvalidResource(m) if m.contains("nhs-number")
        ));
        assert!(matches!(
            refused(json!([
                param("source-patient-identifier", NHS_NUMBER_SYSTEM, "9434765918"),
                param("target-patient-identifier", NHS_NUMBER_SYSTEM, "9434765870"),
            ])),
            FhirError::InvalidNhsNumber(_)
        ));
        assert!(matches!(
            refused(json!([{ "name": "source-patient", "valueReference": { "reference": "Patient/1" } }])),
            FhirError::InvalidResource(_)
        ));
        assert!(parse_merge(b"{\"resourceType\":\"Parameters\"}").is_err());
        assert!(matches!(parse_merge(b"[1,2"), Err(FhirError::NotWellFormed(_))));
    }
}
