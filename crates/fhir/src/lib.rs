//! FHIR R4 JSON for the record locator: parsing a `DocumentReference` into a
//! [`RecordPointer`] (validated at the boundary) and rendering one back,
//! Bundles, `$record-holders` Parameters, and search parameters.
//!
//! It knows nothing of HTTP or storage, so its parsers can be fuzzed alone.

mod patient;
mod render;
mod schema;
mod search;
pub mod subscription;

pub use patient::{
    MergeIn, PIX_TARGETS_MAX, PixQuery, fed_patient, merge_parameters, merged_notice, nhs_identifier,
    parse_identifier_token, parse_merge, parse_patient_feed, parse_pix_query, pix_parameters, warning_outcome,
};
pub use schema::check_document_reference;
pub use search::{SearchLimits, SearchParams, parse_json_search, parse_query, parse_search, printable};

use hie_domain::{
    Identifier, NhsNumber, OdsCode, PointerBody, PointerId, PointerStatus, RecordPointer, SnomedCode, Timestamp,
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
    /// A coded search value of a system other than the one the parameter
    /// takes (a `type` outside SNOMED CT): NRL's `INVALID_CODE_SYSTEM`.
    #[error("{0}")]
    InvalidCodeSystem(String),
    /// A pointer's subject identified in a system other than the NHS
    /// Number's: NRL's `INVALID_IDENTIFIER_SYSTEM`.
    #[error("{0}")]
    InvalidIdentifierSystem(String),
}

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub const FHIR_JSON: &str = "application/fhir+json";

/// The Spine ASID identifier system, required on `context.related` for an
/// `ssp://` attachment URL (NRL's rule).
pub const SPINE_ASID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsSpineASID";

/// The `relatesTo` codes FHIR R4 defines: only `replaces` supersedes.
const RELATION_CODES: [&str; 4] = ["replaces", "transforms", "signs", "appends"];

// The parts the record locator decides on, read from a body that the schema
// check has already passed (so every element here is well typed; elements
// not named here are kept as sent, unread).

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DocumentReferenceIn {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    master_identifier: Option<IdentifierIn>,
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "type")]
    #[serde(default)]
    type_: Option<CodeableConceptIn>,
    #[serde(default)]
    category: Vec<CodeableConceptIn>,
    #[serde(default)]
    subject: Option<ReferenceIn>,
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    author: Vec<Value>,
    #[serde(default)]
    custodian: Option<ReferenceIn>,
    #[serde(default)]
    relates_to: Vec<RelatesToIn>,
    #[serde(default)]
    content: Vec<ContentIn>,
    #[serde(default)]
    context: Option<ContextIn>,
}

#[derive(Deserialize)]
struct IdentifierIn {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct CodingIn {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct CodeableConceptIn {
    #[serde(default)]
    coding: Vec<CodingIn>,
}

#[derive(Deserialize)]
struct ReferenceIn {
    #[serde(default)]
    identifier: Option<IdentifierIn>,
    #[serde(default)]
    reference: Option<String>,
}

#[derive(Deserialize)]
struct RelatesToIn {
    code: Option<String>,
    target: Option<ReferenceIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentIn {
    content_type: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct ContentIn {
    attachment: Option<AttachmentIn>,
}

#[derive(Deserialize)]
struct ContextIn {
    #[serde(default)]
    related: Vec<ReferenceIn>,
}

fn invalid(msg: impl Into<String>) -> FhirError {
    FhirError::InvalidResource(msg.into())
}

fn text_field(field: &str, s: Option<&str>) -> Result<String, FhirError> {
    let s = s.ok_or_else(|| invalid(format!("{field} is required")))?;
    if s.is_empty() || s.len() > RecordPointer::TEXT_LEN_MAX {
        return Err(invalid(format!("{field} must be 1 to {} characters", RecordPointer::TEXT_LEN_MAX)));
    }
    Ok(s.to_owned())
}

fn snomed_coding(field: &str, c: &CodeableConceptIn) -> Result<SnomedCode, FhirError> {
    let coding = c
        .coding
        .iter()
        .find(|c| c.system.as_deref() == Some(SnomedCode::SYSTEM))
        .ok_or_else(|| invalid(format!("{field} needs a coding with system {}", SnomedCode::SYSTEM)))?;
    let code = coding.code.as_deref().ok_or_else(|| invalid(format!("{field}.coding.code is required")))?;
    SnomedCode::parse(code).map_err(|e| invalid(format!("{field}: {e}")))
}

fn ods_reference(field: &str, r: Option<&ReferenceIn>) -> Result<OdsCode, FhirError> {
    let r = r.ok_or_else(|| invalid(format!("{field} is required")))?;
    let ident = r.identifier.as_ref().ok_or_else(|| invalid(format!("{field}.identifier is required")))?;
    if ident.system.as_deref() != Some(ODS_SYSTEM) {
        return Err(invalid(format!("{field}.identifier.system must be {ODS_SYSTEM}")));
    }
    let value = ident.value.as_deref().ok_or_else(|| invalid(format!("{field}.identifier.value is required")))?;
    OdsCode::parse(value).map_err(|e| invalid(format!("{field}: {e}")))
}

fn status(s: Option<&str>) -> Result<PointerStatus, FhirError> {
    match s {
        Some("current") => Ok(PointerStatus::Current),
        Some("superseded") => Ok(PointerStatus::Superseded),
        Some("entered-in-error") => Ok(PointerStatus::EnteredInError),
        Some(_) => Err(invalid("status must be current, superseded or entered-in-error")),
        None => Err(invalid("status is required")),
    }
}

/// Parses an NHS Number from a subject reference: the error is the
/// contract's INVALID_NHS_NUMBER when the number itself is wrong.
fn subject(r: Option<&ReferenceIn>) -> Result<NhsNumber, FhirError> {
    let r = r.ok_or_else(|| invalid("subject is required"))?;
    let ident = r.identifier.as_ref().ok_or_else(|| invalid("subject.identifier is required"))?;
    match ident.system.as_deref() {
        Some(NHS_NUMBER_SYSTEM) => {}
        Some(_) => {
            return Err(FhirError::InvalidIdentifierSystem(format!(
                "subject.identifier.system must be {NHS_NUMBER_SYSTEM}"
            )));
        }
        None => return Err(invalid(format!("subject.identifier.system must be {NHS_NUMBER_SYSTEM}"))),
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

/// NRL's rule for `ssp://` URLs: the pointer names the Spine ASID of the
/// system that serves it, as a `context.related` identifier of 12 digits.
fn check_ssp(doc: &DocumentReferenceIn) -> Result<(), FhirError> {
    let ssp = doc
        .content
        .iter()
        .any(|c| c.attachment.as_ref().and_then(|a| a.url.as_deref()).is_some_and(|u| u.starts_with("ssp://")));
    if !ssp {
        return Ok(());
    }
    let asid = doc.context.iter().flat_map(|c| &c.related).find_map(|r| {
        r.identifier
            .as_ref()
            .filter(|i| i.system.as_deref() == Some(SPINE_ASID_SYSTEM))
            .and_then(|i| i.value.as_deref())
    });
    match asid {
        Some(v) if v.len() == 12 && v.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        Some(_) => Err(invalid(format!("context.related {SPINE_ASID_SYSTEM} must be 12 digits"))),
        None => Err(invalid(format!(
            "an ssp:// attachment URL needs a context.related identifier with system {SPINE_ASID_SYSTEM}"
        ))),
    }
}

/// The pointer `relatesTo` supersedes (its `replaces` entry), after
/// checking every entry's code.
fn replaces(doc: &DocumentReferenceIn) -> Result<Option<PointerId>, FhirError> {
    let mut replaced = None;
    for r in &doc.relates_to {
        let code = r.code.as_deref().ok_or_else(|| invalid("relatesTo.code is required"))?;
        if !RELATION_CODES.contains(&code) {
            return Err(invalid(format!("relatesTo.code must be one of {}", RELATION_CODES.join(", "))));
        }
        let target = r.target.as_ref().ok_or_else(|| invalid("relatesTo.target is required"))?;
        if code == "replaces" {
            if replaced.is_some() {
                return Err(invalid("at most one relatesTo may replace a pointer"));
            }
            replaced = Some(relates_to_target(target)?);
        }
    }
    Ok(replaced)
}

fn document_reference_of(value: Value) -> Result<ParsedPointer, FhirError> {
    check_document_reference(&value)?;
    let doc = DocumentReferenceIn::deserialize(&value).map_err(|e| invalid(e.to_string()))?;
    let subject = subject(doc.subject.as_ref())?;
    let custodian = ods_reference("custodian", doc.custodian.as_ref())?;
    if doc.author.is_empty() {
        return Err(invalid("author is required"));
    }
    let type_code = snomed_coding("type", doc.type_.as_ref().ok_or_else(|| invalid("type is required"))?)?;
    let category = match doc.category.as_slice() {
        [one] => snomed_coding("category", one)?,
        [] => return Err(invalid("category is required")),
        _ => return Err(invalid("exactly one category is supported")),
    };
    if doc.content.is_empty() || doc.content.len() > RecordPointer::CONTENT_MAX {
        return Err(invalid(format!("content must have 1 to {} entries", RecordPointer::CONTENT_MAX)));
    }
    for c in &doc.content {
        let a = c.attachment.as_ref().ok_or_else(|| invalid("content.attachment is required"))?;
        let url = text_field("content.attachment.url", a.url.as_deref())?;
        if !(url.starts_with("https://") || url.starts_with("http://") || url.starts_with("ssp://")) {
            return Err(invalid("content.attachment.url must be an absolute http(s) or ssp URL"));
        }
        text_field("content.attachment.contentType", a.content_type.as_deref())?;
    }
    check_ssp(&doc)?;
    let master_identifier = match &doc.master_identifier {
        None => None,
        Some(m) => Some(Identifier {
            system: text_field("masterIdentifier.system", m.system.as_deref())?,
            value: text_field("masterIdentifier.value", m.value.as_deref())?,
        }),
    };
    let replaces = replaces(&doc)?;
    let id = doc.id.as_deref().map(PointerId::parse).transpose().map_err(|e| invalid(format!("id: {e}")))?;
    let placeholder_id = id.clone().unwrap_or_else(|| PointerId::new(&custodian, uuid::Uuid::nil()));
    let status = status(doc.status.as_deref())?;
    let date = doc.date;
    let body = body_of(value)?;
    Ok(ParsedPointer {
        id,
        pointer: RecordPointer {
            id: placeholder_id,
            version: 1,
            subject,
            custodian,
            type_code,
            category,
            master_identifier,
            status,
            replaces,
            date,
            created: Timestamp(0),
            updated: Timestamp(0),
            body,
        },
    })
}

/// What is kept as sent: everything but the members the server owns.
fn body_of(value: Value) -> Result<PointerBody, FhirError> {
    let Value::Object(mut members) = value else { return Err(invalid("a DocumentReference must be an object")) };
    for owned in ["resourceType", "id", "status", "date"] {
        members.remove(owned);
    }
    let mut meta = match members.remove("meta") {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    meta.remove("versionId");
    meta.remove("lastUpdated");
    let body = PointerBody::of(&meta, &members);
    if body.len() > RecordPointer::BODY_BYTES_MAX {
        return Err(invalid(format!(
            "a DocumentReference may be at most {} bytes of JSON",
            RecordPointer::BODY_BYTES_MAX
        )));
    }
    Ok(body)
}

pub fn instant(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Renders a pointer as a FHIR R4 DocumentReference (JSON text: the
/// server's members, then the producer's as stored).
pub fn document_reference(p: &RecordPointer) -> String {
    let mut out = String::with_capacity(320 + p.body.len());
    render::document_reference(&mut out, p);
    out
}

/// A searchset Bundle of pointers, as JSON text (spliced from the stored
/// pointers: the hot path of every search), with its `self` link, a
/// `next` link when there is a next page, and a warning entry (`search.mode`
/// `outcome`) when `notice` is given.
pub fn searchset(
    base: &str,
    total: u64,
    pointers: &[RecordPointer],
    self_url: &str,
    next: Option<&str>,
    notice: Option<&str>,
) -> String {
    render::searchset(base, total, pointers, self_url, next, notice)
}

/// A `history` Bundle of a pointer's versions, newest first.
pub fn history(base: &str, versions: &[RecordPointer], self_url: &str) -> String {
    render::history(base, versions, self_url)
}

/// `$record-holders`: one `holder` per organisation with its pointer count,
/// and a `warning` OperationOutcome when `notice` is given (the number
/// asked for was merged).
pub fn record_holders(holders: &[(OdsCode, u64)], notice: Option<&str>) -> Value {
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
    let mut holders = holders;
    if let Some(n) = notice {
        holders.push(json!({ "name": "warning", "resource": warning_outcome(n) }));
    }
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

    /// What the server adds to a pointer on the way out.
    fn without_server_members(mut v: Value) -> Value {
        let m = v.as_object_mut().unwrap();
        m.remove("id");
        m.remove("date");
        if let Some(Value::Object(meta)) = m.get_mut("meta") {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            if meta.is_empty() {
                m.remove("meta");
            }
        }
        v
    }

    /// A pointer is kept as sent: rendered back, it is the same JSON but
    /// for the server's members; and it parses back to the same pointer.
    #[test]
    fn round_trip() {
        let mut v = sample("9434765919");
        v["meta"] = json!({ "profile": ["https://fhir.nhs.uk/StructureDefinition/NRL-DocumentReference"] });
        v["description"] = json!("Crisis plan, reviewed with the patient");
        v["docStatus"] = json!("final");
        v["content"][0]["attachment"]["title"] = json!("Crisis plan");
        v["content"][0]["attachment"]["size"] = json!(48213);
        v["content"][0]["extension"] = json!([{ "url": "https://fhir.nhs.uk/England/StructureDefinition/Extension-England-ContentStability",
            "valueCodeableConcept": { "coding": [{ "system": "https://fhir.nhs.uk/England/CodeSystem/England-NRLContentStability", "code": "static", "display": "Static" }] } }]);
        v["author"][0]["display"] = json!("A GP practice");
        let parsed = parse_document_reference(&serde_json::to_vec(&v).unwrap()).unwrap();
        let rendered: Value = serde_json::from_str(&document_reference(&parsed.pointer)).unwrap();
        assert_eq!(rendered["resourceType"], "DocumentReference");
        assert_eq!(rendered["meta"]["versionId"], "1");
        assert_eq!(without_server_members(rendered.clone()), v);
        let again = parse_document_reference(&serde_json::to_vec(&rendered).unwrap()).unwrap();
        assert_eq!(again.pointer.body, parsed.pointer.body);
        assert_eq!(again.pointer.subject, parsed.pointer.subject);
        assert_eq!(again.pointer.master_identifier, parsed.pointer.master_identifier);
    }

    /// The searchset is spliced as text: well-formed FHIR JSON with
    /// `resourceType` first, a `self` link, and each entry as stored.
    #[test]
    fn searchset_text() {
        let mut v = sample("9434765919");
        v["context"] = json!({ "period": { "start": "2026-01-01" } });
        v["content"][0]["format"] = json!({ "system": "urn:x", "code": "f" });
        let parsed = parse_document_reference(&serde_json::to_vec(&v).unwrap()).unwrap();
        let pointers = vec![parsed.pointer.clone(), parsed.pointer];
        let text = searchset(
            "https://n.example/fhir",
            7,
            &pointers,
            "https://n.example/fhir/DocumentReference?_count=2",
            Some("https://n.example/fhir/DocumentReference?next=t"),
            None,
        );
        assert!(text.starts_with(r#"{"resourceType":"Bundle","type":"searchset","total":7,"#), "{text}");
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(b["link"][0]["relation"], "self");
        assert_eq!(b["link"][1]["relation"], "next");
        assert_eq!(b["entry"].as_array().unwrap().len(), 2);
        let e = &b["entry"][0];
        assert_eq!(e["search"]["mode"], "match");
        assert!(e["fullUrl"].as_str().unwrap().ends_with(e["resource"]["id"].as_str().unwrap()));
        assert_eq!(without_server_members(e["resource"].clone()), v);
        let empty = searchset("https://n.example/fhir", 0, &[], "https://n.example/fhir/DocumentReference", None, None);
        assert_eq!(
            empty,
            r#"{"resourceType":"Bundle","type":"searchset","total":0,"link":[{"relation":"self","url":"https://n.example/fhir/DocumentReference"}],"entry":[]}"#
        );
        // A search of a retired number says so in an outcome entry, last.
        let n = NhsNumber::parse("9434765870").unwrap();
        let text = searchset("https://n.example/fhir", 2, &pointers, "s", None, Some(&merged_notice(&n)));
        let b: Value = serde_json::from_str(&text).unwrap();
        let last = b["entry"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["search"]["mode"], "outcome");
        assert_eq!(last["resource"]["issue"][0]["severity"], "warning");
        assert!(last["resource"]["issue"][0]["diagnostics"].as_str().unwrap().contains("9434765870"));
        let alone: Value = serde_json::from_str(&searchset("b", 0, &[], "s", None, Some(&merged_notice(&n)))).unwrap();
        assert_eq!(alone["entry"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn nrl_rules() {
        let refused = |v: &Value| parse_document_reference(&serde_json::to_vec(v).unwrap()).err();
        // ssp:// needs the Spine ASID.
        let mut v = sample("9434765919");
        v["content"][0]["attachment"]["url"] = json!("ssp://a81001.example.nhs.uk/records/1");
        assert!(matches!(refused(&v), Some(FhirError::InvalidResource(m)) if m.contains("nhsSpineASID")));
        v["context"] = json!({ "related": [{ "identifier": { "system": SPINE_ASID_SYSTEM, "value": "2000000001" } }] });
        assert!(matches!(refused(&v), Some(FhirError::InvalidResource(m)) if m.contains("12 digits")));
        v["context"]["related"][0]["identifier"]["value"] = json!("200000000117");
        assert!(refused(&v).is_none());
        // relatesTo: the four R4 codes, one replaces at most.
        let mut v = sample("9434765919");
        v["relatesTo"] = json!([
            { "code": "transforms", "target": { "reference": "DocumentReference/A81001-old1" } },
            { "code": "appends", "target": { "identifier": { "value": "A81001-old2" }, "type": "DocumentReference" } }
        ]);
        let p = parse_document_reference(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(p.pointer.replaces, None, "only replaces supersedes");
        v["relatesTo"][1]["code"] = json!("replaces");
        let p = parse_document_reference(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(p.pointer.replaces.unwrap().as_str(), "A81001-old2");
        v["relatesTo"][0]["code"] = json!("replaces");
        assert!(refused(&v).is_some(), "two replaces");
        v["relatesTo"][0]["code"] = json!("incorporates");
        assert!(refused(&v).is_some(), "not an R4 code");
        // Undefined elements and modifier extensions stay refused.
        let mut v = sample("9434765919");
        v["content"][0]["attachment"]["colour"] = json!("red");
        assert!(matches!(refused(&v), Some(FhirError::InvalidResource(_))));
        let mut v = sample("9434765919");
        v["modifierExtension"] = json!([{ "url": "https://example.org/x", "valueBoolean": true }]);
        assert!(matches!(refused(&v), Some(FhirError::InvalidResource(_))));
        // Any kind of author reference.
        let mut v = sample("9434765919");
        v["author"] = json!([{ "reference": "Practitioner/abc", "display": "Dr A" }]);
        assert!(refused(&v).is_none());
        v["author"] = json!([]);
        assert!(refused(&v).is_some());
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
        // NRLF's "valid number but wrong system": INVALID_IDENTIFIER_SYSTEM.
        let mut v = sample("9434765919");
        v["subject"]["identifier"]["system"] = json!("https://fhir.nhs.uk/Id/not-nhs-number");
        assert!(matches!(
            parse_document_reference(&serde_json::to_vec(&v).unwrap()),
            Err(FhirError::InvalidIdentifierSystem(_))
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
