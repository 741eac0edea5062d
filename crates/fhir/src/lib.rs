//! FHIR R4 JSON for the record locator: parsing a `DocumentReference` into a
//! [`RecordPointer`] (validated at the boundary) and rendering one back,
//! Bundles, `$record-holders` Parameters, and search parameters.
//!
//! It knows nothing of HTTP or storage, so its parsers can be fuzzed alone.

mod render;
mod schema;
mod search;

pub use schema::check_document_reference;
pub use search::{SearchLimits, SearchParams, parse_query, parse_search};

use hie_domain::{
    Coding, Content, Context, Identifier, NhsNumber, OdsCode, PointerId, PointerStatus, RecordPointer, SnomedCode,
    Timestamp,
};
use serde::Deserialize;
use serde_json::{Value, json};

use hie_domain::IdError;

/// Why a request body or parameter was refused. Messages never repeat an NHS Number.
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("{0}")]
    InvalidNhsNumber(IdError),
    #[error("{0}")]
    InvalidResource(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    NotWellFormed(String),
}

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub const FHIR_JSON: &str = "application/fhir+json";

// The accepted shape. Unknown fields are refused rather than silently dropped.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DocumentReferenceIn {
    resource_type: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    meta: Option<Value>,
    #[serde(default)]
    master_identifier: Option<IdentifierIn>,
    status: String,
    #[serde(default)]
    doc_status: Option<String>,
    #[serde(rename = "type")]
    type_: CodeableConceptIn,
    category: Vec<CodeableConceptIn>,
    subject: ReferenceIn,
    #[serde(default)]
    date: Option<String>,
    author: Vec<ReferenceIn>,
    custodian: ReferenceIn,
    #[serde(default)]
    relates_to: Vec<RelatesToIn>,
    #[serde(default)]
    description: Option<String>,
    content: Vec<ContentIn>,
    #[serde(default)]
    context: Option<ContextIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifierIn {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodingIn {
    system: Option<String>,
    code: Option<String>,
    display: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeableConceptIn {
    coding: Vec<CodingIn>,
    /// Accepted (FHIR defines it) but not stored: the coding is authoritative.
    #[serde(default)]
    #[allow(dead_code)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceIn {
    #[serde(default)]
    identifier: Option<IdentifierIn>,
    #[serde(default)]
    reference: Option<String>,
    /// Accepted (FHIR defines it) but not stored: the identifier is authoritative.
    #[serde(default)]
    #[allow(dead_code)]
    display: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelatesToIn {
    code: String,
    target: ReferenceIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AttachmentIn {
    content_type: Option<String>,
    url: Option<String>,
    #[serde(default)]
    creation: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    language: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentIn {
    attachment: AttachmentIn,
    #[serde(default)]
    format: Option<CodingIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodIn {
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ContextIn {
    #[serde(default)]
    practice_setting: Option<CodeableConceptIn>,
    #[serde(default)]
    period: Option<PeriodIn>,
}

fn invalid(msg: impl Into<String>) -> FhirError {
    FhirError::InvalidResource(msg.into())
}

fn text_field(field: &str, s: Option<String>) -> Result<String, FhirError> {
    let s = s.ok_or_else(|| invalid(format!("{field} is required")))?;
    if s.is_empty() || s.len() > RecordPointer::TEXT_LEN_MAX {
        return Err(invalid(format!("{field} must be 1 to {} characters", RecordPointer::TEXT_LEN_MAX)));
    }
    Ok(s)
}

fn optional_text(field: &str, s: Option<String>) -> Result<Option<String>, FhirError> {
    match s {
        None => Ok(None),
        Some(s) => text_field(field, Some(s)).map(Some),
    }
}

fn snomed_coding(field: &str, c: &CodeableConceptIn) -> Result<(SnomedCode, Option<String>), FhirError> {
    let coding = c
        .coding
        .iter()
        .find(|c| c.system.as_deref() == Some(SnomedCode::SYSTEM))
        .ok_or_else(|| invalid(format!("{field} needs a coding with system {}", SnomedCode::SYSTEM)))?;
    let code = coding.code.as_deref().ok_or_else(|| invalid(format!("{field}.coding.code is required")))?;
    let code = SnomedCode::parse(code).map_err(|e| invalid(format!("{field}: {e}")))?;
    Ok((code, coding.display.clone()))
}

fn ods_reference(field: &str, r: &ReferenceIn) -> Result<OdsCode, FhirError> {
    let ident = r.identifier.as_ref().ok_or_else(|| invalid(format!("{field}.identifier is required")))?;
    if ident.system.as_deref() != Some(ODS_SYSTEM) {
        return Err(invalid(format!("{field}.identifier.system must be {ODS_SYSTEM}")));
    }
    let value = ident.value.as_deref().ok_or_else(|| invalid(format!("{field}.identifier.value is required")))?;
    OdsCode::parse(value).map_err(|e| invalid(format!("{field}: {e}")))
}

fn status(s: &str) -> Result<PointerStatus, FhirError> {
    match s {
        "current" => Ok(PointerStatus::Current),
        "superseded" => Ok(PointerStatus::Superseded),
        "entered-in-error" => Ok(PointerStatus::EnteredInError),
        _ => Err(invalid("status must be current, superseded or entered-in-error")),
    }
}

/// Parses an NHS Number from a subject reference: the error is the
/// contract's INVALID_NHS_NUMBER when the number itself is wrong.
fn subject(r: &ReferenceIn) -> Result<NhsNumber, FhirError> {
    let ident = r.identifier.as_ref().ok_or_else(|| invalid("subject.identifier is required"))?;
    if ident.system.as_deref() != Some(NHS_NUMBER_SYSTEM) {
        return Err(invalid(format!("subject.identifier.system must be {NHS_NUMBER_SYSTEM}")));
    }
    let value = ident.value.as_deref().ok_or_else(|| invalid("subject.identifier.value is required"))?;
    NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)
}

/// The id in a `relatesTo.target`: `reference` `DocumentReference/<id>`, or an identifier value.
fn relates_to_target(r: &ReferenceIn) -> Result<PointerId, FhirError> {
    let raw = if let Some(reference) = &r.reference {
        reference.rsplit_once("DocumentReference/").map(|(_, id)| id.to_owned()).unwrap_or_else(|| reference.clone())
    } else if let Some(value) = r.identifier.as_ref().and_then(|i| i.value.clone()) {
        value
    } else {
        return Err(invalid("relatesTo.target needs a reference or an identifier"));
    };
    PointerId::parse(&raw).map_err(|e| invalid(format!("relatesTo.target: {e}")))
}

/// What a request body says, before the server assigns id, version and times.
pub struct ParsedPointer {
    pub id: Option<PointerId>,
    pub pointer: RecordPointer,
}

/// Parses a DocumentReference. `id`, `version`, `created` and `updated` are
/// placeholders the caller replaces.
/// Parses a request body as JSON and checks its `resourceType`.
fn parse_resource(body: &[u8], resource_type: &str) -> Result<Value, FhirError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| FhirError::NotWellFormed(e.to_string()))?;
    match value.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == resource_type => Ok(value),
        Some(other) => Err(invalid(format!("resourceType must be {resource_type}, not {other}"))),
        None => Err(invalid("resourceType is required")),
    }
}

pub fn parse_document_reference(body: &[u8]) -> Result<ParsedPointer, FhirError> {
    document_reference_of(parse_resource(body, "DocumentReference")?)
}

/// What a `batch` Bundle asks for: one create of a DocumentReference per
/// entry, each with its own result (an entry that does not parse fails
/// alone, as FHIR's batch semantics say).
pub struct BatchIn {
    pub entries: Vec<Result<ParsedPointer, FhirError>>,
}

/// Parses a FHIR `batch` Bundle whose entries each create a pointer
/// (`request.method` `POST`, `request.url` `DocumentReference`). The shape of
/// the Bundle and of each entry's `request` is checked for all entries (any
/// fault refuses the whole Bundle); each entry's resource is parsed alone.
/// More than `entries_max` entries is [`BatchError::TooManyEntries`].
pub fn parse_batch(body: &[u8], entries_max: usize) -> Result<BatchIn, BatchError> {
    let value = parse_resource(body, "Bundle")?;
    let Value::Object(mut bundle) = value else { return Err(invalid("a Bundle must be a JSON object").into()) };
    match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => {}
        Some("transaction") => {
            return Err(invalid(
                "only batch Bundles are accepted: each entry succeeds or fails alone; transaction (all or nothing) is not supported",
            )
            .into());
        }
        Some(other) => return Err(invalid(format!("Bundle.type must be batch, not {other}")).into()),
        None => return Err(invalid("Bundle.type is required (batch)").into()),
    }
    for key in bundle.keys() {
        if !matches!(key.as_str(), "resourceType" | "type" | "entry" | "id" | "meta" | "identifier" | "timestamp") {
            return Err(invalid(format!("unknown Bundle field {key}")).into());
        }
    }
    let entries = match bundle.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("Bundle.entry must be an array").into()),
    };
    if entries.len() > entries_max {
        return Err(BatchError::TooManyEntries { given: entries.len(), max: entries_max });
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Value::Object(mut entry) = entry else {
            return Err(invalid(format!("Bundle.entry[{i}] must be an object")).into());
        };
        for key in entry.keys() {
            if !matches!(key.as_str(), "fullUrl" | "resource" | "request") {
                return Err(invalid(format!("unknown field {key} in Bundle.entry[{i}]")).into());
            }
        }
        let request = entry.get("request");
        let method = request.and_then(|r| r.get("method")).and_then(Value::as_str);
        let url = request.and_then(|r| r.get("url")).and_then(Value::as_str);
        if method != Some("POST") || url != Some("DocumentReference") {
            return Err(invalid(format!(
                "Bundle.entry[{i}].request must be method POST, url DocumentReference (a batch creates pointers)"
            ))
            .into());
        }
        let parsed = match entry.remove("resource") {
            None => Err(invalid("entry has no resource")),
            Some(r) => match r.get("resourceType").and_then(Value::as_str) {
                Some("DocumentReference") => document_reference_of(r),
                _ => Err(invalid("entry resource must be a DocumentReference")),
            },
        };
        out.push(parsed);
    }
    Ok(BatchIn { entries: out })
}

/// Why a whole batch Bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Fhir(#[from] FhirError),
    #[error("the Bundle has {given} entries; at most {max} are accepted in one batch")]
    TooManyEntries { given: usize, max: usize },
}

/// One entry of a `batch-response` Bundle: the status line (`201 Created`),
/// the new pointer's location and ETag, or the OperationOutcome of its failure.
pub struct BatchEntryOut {
    pub status: String,
    pub location: Option<String>,
    pub etag: Option<String>,
    pub outcome: Option<Value>,
}

/// The `batch-response` Bundle: one entry per request entry, in order.
pub fn batch_response(entries: &[BatchEntryOut]) -> Value {
    let entry: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut response = serde_json::Map::new();
            response.insert("status".into(), Value::String(e.status.clone()));
            if let Some(l) = &e.location {
                response.insert("location".into(), Value::String(l.clone()));
            }
            if let Some(t) = &e.etag {
                response.insert("etag".into(), Value::String(t.clone()));
            }
            if let Some(o) = &e.outcome {
                response.insert("outcome".into(), o.clone());
            }
            json!({ "response": response })
        })
        .collect();
    json!({ "resourceType": "Bundle", "type": "batch-response", "entry": entry })
}

fn document_reference_of(value: Value) -> Result<ParsedPointer, FhirError> {
    let doc: DocumentReferenceIn = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    debug_assert_eq!(doc.resource_type, "DocumentReference");
    let _ = (&doc.meta, &doc.doc_status, &doc.date, &doc.description);

    let subject = subject(&doc.subject)?;
    let custodian = ods_reference("custodian", &doc.custodian)?;
    let author = match doc.author.as_slice() {
        [one] => ods_reference("author", one)?,
        [] => return Err(invalid("author is required")),
        _ => return Err(invalid("exactly one author is supported")),
    };
    let (type_code, type_display) = snomed_coding("type", &doc.type_)?;
    let (category, category_display) = match doc.category.as_slice() {
        [one] => snomed_coding("category", one)?,
        [] => return Err(invalid("category is required")),
        _ => return Err(invalid("exactly one category is supported")),
    };
    if doc.content.is_empty() || doc.content.len() > RecordPointer::CONTENT_MAX {
        return Err(invalid(format!("content must have 1 to {} entries", RecordPointer::CONTENT_MAX)));
    }
    let mut content = Vec::with_capacity(doc.content.len());
    for c in doc.content {
        let url = text_field("content.attachment.url", c.attachment.url)?;
        if !(url.starts_with("https://") || url.starts_with("http://") || url.starts_with("ssp://")) {
            return Err(invalid("content.attachment.url must be an absolute http(s) or ssp URL"));
        }
        let _ = (&c.attachment.title, &c.attachment.language);
        content.push(Content {
            url,
            content_type: text_field("content.attachment.contentType", c.attachment.content_type)?,
            creation: optional_text("content.attachment.creation", c.attachment.creation)?,
            format: match c.format {
                None => None,
                Some(f) => Some(Coding {
                    system: text_field("content.format.system", f.system)?,
                    code: text_field("content.format.code", f.code)?,
                    display: optional_text("content.format.display", f.display)?,
                }),
            },
        });
    }
    let context = match doc.context {
        None => None,
        Some(ctx) => Some(Context {
            practice_setting: match ctx.practice_setting.and_then(|p| p.coding.into_iter().next()) {
                None => None,
                Some(c) => Some(Coding {
                    system: text_field("context.practiceSetting.coding.system", c.system)?,
                    code: text_field("context.practiceSetting.coding.code", c.code)?,
                    display: optional_text("context.practiceSetting.coding.display", c.display)?,
                }),
            },
            period_start: ctx.period.as_ref().and_then(|p| p.start.clone()),
            period_end: ctx.period.and_then(|p| p.end),
        }),
    };
    let master_identifier = match doc.master_identifier {
        None => None,
        Some(m) => Some(Identifier {
            system: text_field("masterIdentifier.system", m.system)?,
            value: text_field("masterIdentifier.value", m.value)?,
        }),
    };
    let replaces = match doc.relates_to.as_slice() {
        [] => None,
        [r] if r.code == "replaces" => Some(relates_to_target(&r.target)?),
        [_] => return Err(invalid("relatesTo.code must be replaces")),
        _ => return Err(invalid("at most one relatesTo is supported")),
    };
    let id = doc.id.as_deref().map(PointerId::parse).transpose().map_err(|e| invalid(format!("id: {e}")))?;
    let placeholder_id = id.clone().unwrap_or_else(|| PointerId::new(&custodian, uuid::Uuid::nil()));
    Ok(ParsedPointer {
        id,
        pointer: RecordPointer {
            id: placeholder_id,
            version: 1,
            subject,
            custodian,
            author,
            type_code,
            type_display,
            category,
            category_display,
            master_identifier,
            content,
            context,
            status: status(&doc.status)?,
            replaces,
            created: Timestamp(0),
            updated: Timestamp(0),
        },
    })
}

pub fn instant(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Renders a pointer as a FHIR R4 DocumentReference (JSON text, straight
/// from the pointer).
pub fn document_reference(p: &RecordPointer) -> String {
    serde_json::to_string(&render::DocumentReference::of(p)).expect("a DocumentReference serialises")
}

/// A searchset Bundle of pointers, as JSON text (rendered straight from the
/// pointers: the hot path of every search).
pub fn searchset(base: &str, total: u64, pointers: &[RecordPointer], next: Option<&str>) -> String {
    serde_json::to_string(&render::Searchset::of(base, total, pointers, next)).expect("a Bundle serialises")
}

/// `$record-holders`: one `holder` per organisation with its pointer count.
pub fn record_holders(holders: &[(OdsCode, u64)]) -> Value {
    let holders: Vec<Value> = holders
        .iter()
        .map(|(ods, n)| {
            json!({
                "name": "holder",
                "part": [
                    { "name": "organization", "valueIdentifier": { "system": ODS_SYSTEM, "value": ods.as_str() } },
                    { "name": "pointers", "valueInteger": n },
                ]
            })
        })
        .collect();
    json!({ "resourceType": "Parameters", "parameter": holders })
}

/// Nesting depth of a JSON document, scanning bytes (strings skipped); stops
/// counting at `max + 1`, so a hostile body costs one pass.
pub fn json_depth_exceeds(body: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample(nhs: &str) -> Value {
        json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "masterIdentifier": { "system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3" },
            "type": { "coding": [{ "system": "http://snomed.info/sct", "code": "736253002", "display": "Mental health crisis plan" }] },
            "category": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "734163000", "display": "Care plan" }] }],
            "subject": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": nhs } },
            "author": [{ "identifier": { "system": ODS_SYSTEM, "value": "A81001" } }],
            "custodian": { "identifier": { "system": ODS_SYSTEM, "value": "A81001" } },
            "content": [{ "attachment": { "contentType": "application/pdf", "url": "https://a81001.example.nhs.uk/r/1" } }]
        })
    }

    #[test]
    fn round_trip() {
        let body = serde_json::to_vec(&sample("9434765919")).unwrap();
        let parsed = parse_document_reference(&body).unwrap();
        let rendered = document_reference(&parsed.pointer);
        let again = parse_document_reference(rendered.as_bytes()).unwrap();
        assert_eq!(again.pointer.subject, parsed.pointer.subject);
        assert_eq!(again.pointer.content, parsed.pointer.content);
        assert_eq!(again.pointer.master_identifier, parsed.pointer.master_identifier);
    }

    /// The searchset is rendered straight to text: it is well-formed FHIR
    /// JSON with `resourceType` first, and each entry parses back.
    #[test]
    fn searchset_text() {
        let mut v = sample("9434765919");
        v["context"] = json!({ "period": { "start": "2026-01-01" } });
        v["content"][0]["format"] = json!({ "system": "urn:x", "code": "f" });
        let parsed = parse_document_reference(&serde_json::to_vec(&v).unwrap()).unwrap();
        let pointers = vec![parsed.pointer.clone(), parsed.pointer];
        let text =
            searchset("https://n.example/fhir", 7, &pointers, Some("https://n.example/fhir/DocumentReference?next=t"));
        assert!(text.starts_with(r#"{"resourceType":"Bundle","type":"searchset","total":7,"#), "{text}");
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(b["link"][0]["relation"], "next");
        assert_eq!(b["entry"].as_array().unwrap().len(), 2);
        let e = &b["entry"][0];
        assert_eq!(e["search"]["mode"], "match");
        assert!(e["fullUrl"].as_str().unwrap().ends_with(e["resource"]["id"].as_str().unwrap()));
        assert_eq!(e["resource"]["context"]["period"]["start"], "2026-01-01");
        assert_eq!(e["resource"]["content"][0]["format"]["code"], "f");
        assert!(e["resource"].get("relatesTo").is_none());
        let again = parse_document_reference(&serde_json::to_vec(&e["resource"]).unwrap()).unwrap();
        assert_eq!(again.pointer.content, pointers[0].content);
        assert_eq!(again.pointer.context, pointers[0].context);
        let empty = searchset("https://n.example/fhir", 0, &[], None);
        assert_eq!(empty, r#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#);
    }

    #[test]
    fn refusals() {
        let bad_nhs = serde_json::to_vec(&sample("9434765918")).unwrap();
        assert!(matches!(parse_document_reference(&bad_nhs), Err(FhirError::InvalidNhsNumber(_))));
        assert!(matches!(parse_document_reference(b"{not json"), Err(FhirError::NotWellFormed(_))));
        let mut v = sample("9434765919");
        v["resourceType"] = json!("Patient");
        assert!(matches!(
            parse_document_reference(&serde_json::to_vec(&v).unwrap()),
            Err(FhirError::InvalidResource(_))
        ));
        let mut v = sample("9434765919");
        v.as_object_mut().unwrap().remove("custodian");
        assert!(matches!(
            parse_document_reference(&serde_json::to_vec(&v).unwrap()),
            Err(FhirError::InvalidResource(_))
        ));
        let mut v = sample("9434765919");
        v["unknownField"] = json!(1);
        assert!(matches!(
            parse_document_reference(&serde_json::to_vec(&v).unwrap()),
            Err(FhirError::InvalidResource(_))
        ));
    }

    #[test]
    fn depth() {
        let deep = "[".repeat(65) + &"]".repeat(65);
        assert!(json_depth_exceeds(deep.as_bytes(), 64));
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(!json_depth_exceeds(ok.as_bytes(), 64));
        assert!(!json_depth_exceeds(
            br#"{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#,
            2
        ));
    }
}

/// A patient's sharing preference, from a FHIR `Consent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentIn {
    pub patient: NhsNumber,
    /// `provision.type` `deny`: the patient opts out of sharing.
    pub opted_out: bool,
}

/// Parses a `Consent` recording a sharing preference: `status` `active`, the
/// patient by NHS Number, and `provision.type` `deny` (opt out) or `permit`
/// (opt back in).
pub fn parse_consent(body: &[u8]) -> Result<ConsentIn, FhirError> {
    let v = parse_resource(body, "Consent")?;
    if v.get("status").and_then(Value::as_str) != Some("active") {
        return Err(invalid("status must be active"));
    }
    let ident = v.pointer("/patient/identifier").ok_or_else(|| invalid("patient.identifier is required"))?;
    if ident.get("system").and_then(Value::as_str) != Some(NHS_NUMBER_SYSTEM) {
        return Err(invalid(format!("patient.identifier.system must be {NHS_NUMBER_SYSTEM}")));
    }
    let value =
        ident.get("value").and_then(Value::as_str).ok_or_else(|| invalid("patient.identifier.value is required"))?;
    let patient = NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)?;
    let opted_out = match v.pointer("/provision/type").and_then(Value::as_str) {
        Some("deny") => true,
        Some("permit") => false,
        _ => return Err(invalid("provision.type must be deny (opt out) or permit (opt in)")),
    };
    Ok(ConsentIn { patient, opted_out })
}

/// The stored Consent, as FHIR R4.
pub fn consent_resource(id: &str, consent: &ConsentIn, at: Timestamp) -> Value {
    json!({
        "resourceType": "Consent",
        "id": id,
        "meta": { "lastUpdated": instant(at) },
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent" }] }],
        "patient": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": consent.patient.as_str() } },
        "dateTime": instant(at),
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": if consent.opted_out { "OPTOUT" } else { "OPTIN" } }] },
        "provision": { "type": if consent.opted_out { "deny" } else { "permit" } },
    })
}
