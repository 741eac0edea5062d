//! The shape of a FHIR R4 DocumentReference, element by element, so that a
//! pointer is kept as its producer sent it: every element R4 defines (and
//! every extension) is accepted, anything else is refused with its path.
//!
//! A `modifierExtension` changes the meaning of what holds it; hie
//! understands none, so any is refused rather than silently ignored.

use serde_json::{Map, Value};

use crate::FhirError;

/// How deep `contained` resources and nested extensions may go.
const NESTING_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prim {
    Str,
    Code,
    Uri,
    Boolean,
    Integer,
    UnsignedInt,
    PositiveInt,
    Decimal,
    Base64,
    Date,
    DateTime,
    Instant,
    Time,
    Id,
    Xhtml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    P(Prim),
    /// A complex datatype or a backbone element, by name.
    C(&'static str),
    /// Any resource (`contained`): checked for a `resourceType` only.
    Resource,
}

use Prim::*;
use Ty::*;

/// (element, type, repeats)
type Elements = &'static [(&'static str, Ty, bool)];

/// Elements every element has.
const ELEMENT: Elements = &[("id", P(Str), false), ("extension", C("Extension"), true)];
/// Elements every backbone element has, besides [`ELEMENT`]'s.
const BACKBONE: Elements = &[("modifierExtension", C("Extension"), true)];

fn complex(name: &str) -> Option<(Elements, bool)> {
    // (elements, is a backbone element)
    Some(match name {
        "DocumentReference" => (DOCUMENT_REFERENCE, false),
        "DocumentReference.relatesTo" => (&[("code", P(Code), false), ("target", C("Reference"), false)], true),
        "DocumentReference.content" => {
            (&[("attachment", C("Attachment"), false), ("format", C("Coding"), false)], true)
        }
        "DocumentReference.context" => (CONTEXT, true),
        "Meta" => (META, false),
        "Narrative" => (&[("status", P(Code), false), ("div", P(Xhtml), false)], false),
        "Identifier" => (IDENTIFIER, false),
        "CodeableConcept" => (&[("coding", C("Coding"), true), ("text", P(Str), false)], false),
        "Coding" => (CODING, false),
        "Reference" => (REFERENCE, false),
        "Attachment" => (ATTACHMENT, false),
        "Period" => (&[("start", P(DateTime), false), ("end", P(DateTime), false)], false),
        "Quantity" => (QUANTITY, false),
        "Range" => (&[("low", C("Quantity"), false), ("high", C("Quantity"), false)], false),
        "Ratio" => (&[("numerator", C("Quantity"), false), ("denominator", C("Quantity"), false)], false),
        "Annotation" => (ANNOTATION, false),
        "ContactPoint" => (CONTACT_POINT, false),
        "HumanName" => (HUMAN_NAME, false),
        "Address" => (ADDRESS, false),
        "Extension" => (&[("url", P(Uri), false)], false),
        _ => return None,
    })
}

const DOCUMENT_REFERENCE: Elements = &[
    ("resourceType", P(Code), false),
    ("meta", C("Meta"), false),
    ("implicitRules", P(Uri), false),
    ("language", P(Code), false),
    ("text", C("Narrative"), false),
    ("contained", Resource, true),
    ("modifierExtension", C("Extension"), true),
    ("masterIdentifier", C("Identifier"), false),
    ("identifier", C("Identifier"), true),
    ("status", P(Code), false),
    ("docStatus", P(Code), false),
    ("type", C("CodeableConcept"), false),
    ("category", C("CodeableConcept"), true),
    ("subject", C("Reference"), false),
    ("date", P(Instant), false),
    ("author", C("Reference"), true),
    ("authenticator", C("Reference"), false),
    ("custodian", C("Reference"), false),
    ("relatesTo", C("DocumentReference.relatesTo"), true),
    ("description", P(Str), false),
    ("securityLabel", C("CodeableConcept"), true),
    ("content", C("DocumentReference.content"), true),
    ("context", C("DocumentReference.context"), false),
];

const CONTEXT: Elements = &[
    ("encounter", C("Reference"), true),
    ("event", C("CodeableConcept"), true),
    ("period", C("Period"), false),
    ("facilityType", C("CodeableConcept"), false),
    ("practiceSetting", C("CodeableConcept"), false),
    ("sourcePatientInfo", C("Reference"), false),
    ("related", C("Reference"), true),
];

const META: Elements = &[
    ("versionId", P(Id), false),
    ("lastUpdated", P(Instant), false),
    ("source", P(Uri), false),
    ("profile", P(Uri), true),
    ("security", C("Coding"), true),
    ("tag", C("Coding"), true),
];

const IDENTIFIER: Elements = &[
    ("use", P(Code), false),
    ("type", C("CodeableConcept"), false),
    ("system", P(Uri), false),
    ("value", P(Str), false),
    ("period", C("Period"), false),
    ("assigner", C("Reference"), false),
];

const CODING: Elements = &[
    ("system", P(Uri), false),
    ("version", P(Str), false),
    ("code", P(Code), false),
    ("display", P(Str), false),
    ("userSelected", P(Boolean), false),
];

const REFERENCE: Elements = &[
    ("reference", P(Str), false),
    ("type", P(Uri), false),
    ("identifier", C("Identifier"), false),
    ("display", P(Str), false),
];

const ATTACHMENT: Elements = &[
    ("contentType", P(Code), false),
    ("language", P(Code), false),
    ("data", P(Base64), false),
    ("url", P(Uri), false),
    ("size", P(UnsignedInt), false),
    ("hash", P(Base64), false),
    ("title", P(Str), false),
    ("creation", P(DateTime), false),
];

const QUANTITY: Elements = &[
    ("value", P(Decimal), false),
    ("comparator", P(Code), false),
    ("unit", P(Str), false),
    ("system", P(Uri), false),
    ("code", P(Code), false),
];

const ANNOTATION: Elements = &[
    ("authorReference", C("Reference"), false),
    ("authorString", P(Str), false),
    ("time", P(DateTime), false),
    ("text", P(Str), false),
];

const CONTACT_POINT: Elements = &[
    ("system", P(Code), false),
    ("value", P(Str), false),
    ("use", P(Code), false),
    ("rank", P(PositiveInt), false),
    ("period", C("Period"), false),
];

const HUMAN_NAME: Elements = &[
    ("use", P(Code), false),
    ("text", P(Str), false),
    ("family", P(Str), false),
    ("given", P(Str), true),
    ("prefix", P(Str), true),
    ("suffix", P(Str), true),
    ("period", C("Period"), false),
];

const ADDRESS: Elements = &[
    ("use", P(Code), false),
    ("type", P(Code), false),
    ("text", P(Str), false),
    ("line", P(Str), true),
    ("city", P(Str), false),
    ("district", P(Str), false),
    ("state", P(Str), false),
    ("postalCode", P(Str), false),
    ("country", P(Str), false),
    ("period", C("Period"), false),
];

/// The types an extension's `value[x]` may take, by suffix.
fn extension_value(suffix: &str) -> Option<Ty> {
    Some(match suffix {
        "Boolean" => P(Boolean),
        "Code" => P(Code),
        "String" | "Markdown" => P(Str),
        "Uri" | "Url" | "Canonical" | "Oid" | "Uuid" => P(Uri),
        "Integer" => P(Integer),
        "UnsignedInt" => P(UnsignedInt),
        "PositiveInt" => P(PositiveInt),
        "Decimal" => P(Decimal),
        "Base64Binary" => P(Base64),
        "Date" => P(Date),
        "DateTime" => P(DateTime),
        "Instant" => P(Instant),
        "Time" => P(Time),
        "Id" => P(Id),
        "Coding" | "CodeableConcept" | "Identifier" | "Reference" | "Period" | "Attachment" | "Quantity" | "Range"
        | "Ratio" | "Annotation" | "ContactPoint" | "HumanName" | "Address" | "Meta" => {
            return complex_name(suffix);
        }
        "Age" | "Count" | "Distance" | "Duration" | "Money" => C("Quantity"),
        _ => return None,
    })
}

fn complex_name(suffix: &str) -> Option<Ty> {
    ["Coding", "CodeableConcept", "Identifier", "Reference", "Period", "Attachment", "Quantity", "Range", "Ratio"]
        .into_iter()
        .chain(["Annotation", "ContactPoint", "HumanName", "Address", "Meta"])
        .find(|n| *n == suffix)
        .map(C)
}

/// Checks a DocumentReference against FHIR R4's definition.
pub fn check_document_reference(value: &Value) -> Result<(), FhirError> {
    let Value::Object(map) = value else { return Err(bad("DocumentReference", "must be a JSON object")) };
    check_object("DocumentReference", "DocumentReference", map, 0)
}

fn bad(path: &str, what: &str) -> FhirError {
    FhirError::InvalidResource(format!("{path} {what}"))
}

fn check_object(path: &str, type_name: &str, map: &Map<String, Value>, depth: usize) -> Result<(), FhirError> {
    if depth > NESTING_MAX {
        return Err(bad(path, "is nested too deeply"));
    }
    let (own, backbone) = complex(type_name).expect("every type named in the tables is defined");
    let find = |name: &str| -> Option<(Ty, bool)> {
        let tables: [Elements; 3] = [own, ELEMENT, if backbone { BACKBONE } else { &[] }];
        tables.into_iter().flatten().find(|(n, _, _)| *n == name).map(|(_, t, r)| (*t, *r))
    };
    if type_name == "Extension" {
        return check_extension(path, map, depth);
    }
    if map.is_empty() {
        return Err(bad(path, "must not be empty (FHIR: an element has a value or children)"));
    }
    for (name, v) in map {
        let here = format!("{path}.{name}");
        if name == "modifierExtension" {
            return Err(bad(
                &here,
                "is not understood by this server (a modifier extension changes the meaning of its element, so it is refused rather than ignored)",
            ));
        }
        if let Some(base) = name.strip_prefix('_') {
            // A primitive's id and extensions.
            match find(base) {
                Some((P(_), repeats)) => check_value(&here, C("Extension.holder"), repeats, v, depth)?,
                _ => return Err(bad(&here, "is not an element of FHIR R4")),
            }
            continue;
        }
        let (ty, repeats) = find(name).ok_or_else(|| bad(&here, "is not an element of FHIR R4"))?;
        check_value(&here, ty, repeats, v, depth)?;
    }
    Ok(())
}

fn check_value(path: &str, ty: Ty, repeats: bool, v: &Value, depth: usize) -> Result<(), FhirError> {
    match (repeats, v) {
        (true, Value::Array(items)) => {
            if items.is_empty() {
                return Err(bad(path, "must not be an empty array"));
            }
            for (i, item) in items.iter().enumerate() {
                check_one(&format!("{path}[{i}]"), ty, item, depth)?;
            }
            Ok(())
        }
        (true, _) => Err(bad(path, "must be an array")),
        (false, Value::Array(_)) => Err(bad(path, "must not be an array")),
        (false, v) => check_one(path, ty, v, depth),
    }
}

fn check_one(path: &str, ty: Ty, v: &Value, depth: usize) -> Result<(), FhirError> {
    match ty {
        P(p) => check_primitive(path, p, v),
        C("Extension.holder") => match v {
            // `_x`: only id and extension, or null in an array.
            Value::Object(m) => {
                for (k, item) in m {
                    match k.as_str() {
                        "id" => check_primitive(&format!("{path}.id"), Str, item)?,
                        "extension" => {
                            check_value(&format!("{path}.extension"), C("Extension"), true, item, depth + 1)?
                        }
                        _ => return Err(bad(&format!("{path}.{k}"), "is not an element of FHIR R4")),
                    }
                }
                Ok(())
            }
            Value::Null => Ok(()),
            _ => Err(bad(path, "must be an object")),
        },
        C(name) => match v {
            Value::Object(m) => check_object(path, name, m, depth + 1),
            _ => Err(bad(path, "must be an object")),
        },
        Resource => match v {
            Value::Object(m) if m.get("resourceType").and_then(Value::as_str).is_some_and(|t| !t.is_empty()) => Ok(()),
            _ => Err(bad(path, "must be a resource with a resourceType")),
        },
    }
}

fn check_extension(path: &str, map: &Map<String, Value>, depth: usize) -> Result<(), FhirError> {
    match map.get("url") {
        Some(Value::String(u)) if !u.trim().is_empty() => {}
        _ => return Err(bad(&format!("{path}.url"), "is required (a non-empty URI)")),
    }
    let mut values = 0;
    for (name, v) in map {
        let here = format!("{path}.{name}");
        match name.as_str() {
            "url" => {}
            "id" => check_primitive(&here, Str, v)?,
            "extension" => check_value(&here, C("Extension"), true, v, depth)?,
            _ if name.starts_with("value") => {
                let ty = extension_value(&name["value".len()..])
                    .ok_or_else(|| bad(&here, "is not a value[x] type of FHIR R4"))?;
                values += 1;
                check_one(&here, ty, v, depth)?;
            }
            _ if name.starts_with('_') => check_one(&here, C("Extension.holder"), v, depth)?,
            _ => return Err(bad(&here, "is not an element of FHIR R4")),
        }
    }
    match (values, map.contains_key("extension")) {
        (0, false) => Err(bad(path, "needs a value[x] or nested extensions")),
        (1, false) | (0, true) => Ok(()),
        _ => Err(bad(path, "has both a value[x] and nested extensions, or more than one value[x]")),
    }
}

fn check_primitive(path: &str, p: Prim, v: &Value) -> Result<(), FhirError> {
    let text = || v.as_str().ok_or_else(|| bad(path, "must be a string"));
    let ok = match p {
        Boolean => v.is_boolean(),
        Integer => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        UnsignedInt => v.as_u64().is_some_and(|n| i32::try_from(n).is_ok()),
        PositiveInt => v.as_u64().is_some_and(|n| n >= 1 && i32::try_from(n).is_ok()),
        Decimal => v.is_number(),
        Str | Xhtml => !text()?.trim().is_empty(),
        Code => {
            let s = text()?;
            !s.is_empty() && s.trim() == s
        }
        Uri => {
            let s = text()?;
            !s.is_empty() && !s.chars().any(char::is_whitespace)
        }
        Id => {
            let s = text()?;
            (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
        Base64 => {
            let s = text()?;
            s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b' '))
        }
        Date => date_like(text()?, false),
        DateTime => date_like(text()?, true),
        Instant => chrono::DateTime::parse_from_rfc3339(text()?).is_ok(),
        Time => chrono::NaiveTime::parse_from_str(text()?, "%H:%M:%S%.f").is_ok(),
    };
    if ok { Ok(()) } else { Err(bad(path, &format!("is not a valid FHIR {p:?}"))) }
}

/// FHIR's partial dates (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`) and, for a
/// dateTime, an RFC 3339 instant.
fn date_like(s: &str, time_allowed: bool) -> bool {
    let year = |y: &str| y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit());
    match s.len() {
        4 => year(s),
        7 => year(&s[..4]) && chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").is_ok(),
        10 => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        _ => time_allowed && chrono::DateTime::parse_from_rfc3339(s).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(v: Value) -> Result<(), String> {
        check_document_reference(&v).map_err(|e| e.to_string())
    }

    #[test]
    fn every_r4_element_passes_and_nothing_else_does() {
        let full = json!({
            "resourceType": "DocumentReference",
            "id": "Y05868-1634567890",
            "meta": { "profile": ["https://fhir.nhs.uk/England/StructureDefinition/NRL-DocumentReference"], "versionId": "1" },
            "extension": [{ "url": "https://example.org/ext", "valueBoolean": true }],
            "masterIdentifier": { "system": "urn:ietf:rfc:3986", "value": "urn:oid:1.3.6.1.4.1.21367.2005.3.7" },
            "identifier": [{ "system": "urn:ietf:rfc:3986", "value": "urn:uuid:0a7e8c1e-0c1b-4b2a-9d46-2f3e3f6a7a10" }],
            "status": "current",
            "docStatus": "final",
            "type": { "coding": [{ "system": "http://snomed.info/sct", "code": "736253002", "display": "Mental health crisis plan" }] },
            "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "734163000", "display": "Care plan" }] }],
            "subject": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009" } },
            "date": "2024-01-01T00:00:00.000Z",
            "author": [{ "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y05868" } }],
            "custodian": { "identifier": { "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y05868" } },
            "relatesTo": [{ "code": "replaces", "target": { "type": "DocumentReference", "identifier": { "value": "Y05868-1" } } }],
            "description": "A crisis plan",
            "securityLabel": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N" }] }],
            "content": [{
                "attachment": { "contentType": "application/pdf", "url": "ssp://example.org/r/1", "size": 3654, "hash": "2jmj7l5rSw0yVb/vlWAYkK/YBwk=", "title": "Plan", "language": "en-GB", "creation": "2024-01-01" },
                "format": { "system": "https://fhir.nhs.uk/England/CodeSystem/England-NRLFormatCode", "code": "urn:nhs-ic:unstructured", "display": "Unstructured Document" },
                "extension": [{ "url": "https://fhir.nhs.uk/England/StructureDefinition/Extension-England-ContentStability",
                    "valueCodeableConcept": { "coding": [{ "system": "https://fhir.nhs.uk/England/CodeSystem/England-NRLContentStability", "code": "static", "display": "Static" }] } }]
            }],
            "context": {
                "event": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "1234567" }] }],
                "period": { "start": "2024-01-01T00:00:00+00:00" },
                "facilityType": { "coding": [{ "system": "http://snomed.info/sct", "code": "390826005" }] },
                "practiceSetting": { "coding": [{ "system": "http://snomed.info/sct", "code": "788002001" }] },
                "sourcePatientInfo": { "identifier": { "system": "https://example.org/mrn", "value": "M1" } },
                "related": [{ "identifier": { "system": "https://fhir.nhs.uk/Id/nhsSpineASID", "value": "230811201350" } }],
                "encounter": [{ "reference": "Encounter/1" }]
            },
            "_status": { "extension": [{ "url": "https://example.org/why", "valueString": "because" }] }
        });
        assert_eq!(check(full.clone()), Ok(()));

        let with = |path: &[&str], value: Value| {
            let mut v = full.clone();
            let mut at = &mut v;
            for p in &path[..path.len() - 1] {
                at = match p.parse::<usize>() {
                    Ok(i) => &mut at[i],
                    Err(_) => &mut at[*p],
                };
            }
            at[path[path.len() - 1]] = value;
            check(v)
        };
        let err = with(&["colour"], json!("red")).unwrap_err();
        assert!(err.contains("DocumentReference.colour is not an element"), "{err}");
        let err = with(&["content", "0", "attachment", "colour"], json!("red")).unwrap_err();
        assert!(err.contains("content[0].attachment.colour"), "{err}");
        let err = with(&["modifierExtension"], json!([{ "url": "https://x", "valueBoolean": true }])).unwrap_err();
        assert!(err.contains("modifierExtension is not understood"), "{err}");
        let err = with(&["content", "0", "modifierExtension"], json!([{ "url": "https://x", "valueCode": "a" }]))
            .unwrap_err();
        assert!(err.contains("content[0].modifierExtension"), "{err}");
        assert!(with(&["extension"], json!([{ "url": "https://x" }])).is_err(), "no value");
        assert!(with(&["extension"], json!([{ "url": "https://x", "valueColour": "red" }])).is_err());
        assert!(with(&["identifier"], json!({ "value": "x" })).is_err(), "not an array");
        assert!(with(&["description"], json!(["x"])).is_err(), "an array");
        assert!(with(&["date"], json!("yesterday")).is_err());
        assert!(with(&["content", "0", "attachment", "size"], json!(-1)).is_err());
        assert!(with(&["_colour"], json!({})).is_err());
        assert!(with(&["context", "period"], json!({})).is_err(), "empty");
    }
}
