//! Search parameters: parsed and checked; unknown ones are refused, never ignored.

use hie_domain::{Identifier, NhsNumber, OdsCode, SnomedCode};

use crate::{FhirError, NHS_NUMBER_SYSTEM, ODS_SYSTEM};

#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    pub page_size_default: usize,
    pub page_size_max: usize,
}

/// A checked search. `subject` is `None` only when a paging token
/// (`next`, or NRLF's `next-page-token`) stands in for the parameters it
/// was made from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchParams {
    pub subject: Option<NhsNumber>,
    /// A registered local identifier given as `subject:identifier` in
    /// place of the NHS Number (the caller resolves it).
    pub local_subject: Option<Identifier>,
    /// Each filter is "any of" its values (comma-separated in a request).
    pub types: Vec<SnomedCode>,
    pub categories: Vec<SnomedCode>,
    pub custodians: Vec<OdsCode>,
    pub count: usize,
    /// `_summary=count`: the total only.
    pub summary_count: bool,
    pub cursor: Option<String>,
}

impl SearchParams {
    /// Whether the parameters name a search (anything but paging and page size).
    pub fn names_a_search(&self) -> bool {
        self.subject.is_some()
            || self.local_subject.is_some()
            || !self.types.is_empty()
            || !self.categories.is_empty()
            || !self.custodians.is_empty()
    }

    /// Whether two searches are the same search (page size and paging aside).
    pub fn same_search(&self, other: &SearchParams) -> bool {
        self.subject == other.subject
            && self.local_subject == other.local_subject
            && self.types == other.types
            && self.categories == other.categories
            && self.custodians == other.custodians
    }
}

/// Longest paging token accepted, in characters.
pub const CURSOR_LEN_MAX: usize = 4096;
/// Values one filter parameter may list (comma-separated).
pub const FILTER_VALUES_MAX: usize = 32;

/// The values of a comma-separated parameter, each without the `system|`
/// prefix when it is `system`'s.
fn values<'a>(name: &str, v: &'a str, system: &str) -> Result<Vec<&'a str>, FhirError> {
    let items: Vec<&str> = v.split(',').collect();
    if items.len() > FILTER_VALUES_MAX {
        return Err(FhirError::InvalidParameter(format!("{name} may list at most {FILTER_VALUES_MAX} values")));
    }
    Ok(items
        .into_iter()
        .map(|item| item.strip_prefix(system).and_then(|r| r.strip_prefix('|')).unwrap_or(item))
        .collect())
}

fn push_unique<T: PartialEq>(into: &mut Vec<T>, items: impl IntoIterator<Item = T>) {
    for item in items {
        if !into.contains(&item) {
            into.push(item);
        }
    }
}

/// SNOMED CT codes, bare or as `http://snomed.info/sct|<code>`; a code of
/// another system is NRL's `INVALID_CODE_SYSTEM`.
fn snomed_values(name: &str, v: &str) -> Result<Vec<SnomedCode>, FhirError> {
    values(name, v, SnomedCode::SYSTEM)?
        .into_iter()
        .map(|c| {
            if c.contains('|') {
                return Err(FhirError::InvalidCodeSystem(format!(
                    "{name} must be of the system {}",
                    SnomedCode::SYSTEM
                )));
            }
            SnomedCode::parse(c).map_err(|e| FhirError::InvalidParameter(format!("{name}: {e}")))
        })
        .collect()
}

pub fn parse_search(pairs: Vec<(String, String)>, limits: SearchLimits) -> Result<SearchParams, FhirError> {
    let bad = FhirError::InvalidParameter;
    let mut p = SearchParams { count: limits.page_size_default, ..SearchParams::default() };
    for (k, v) in pairs {
        match k.as_str() {
            "subject:identifier" | "subject.identifier" => {
                if !v.contains('|') {
                    return Err(bad(format!(
                        "subject:identifier must be {NHS_NUMBER_SYSTEM}|<NHS Number> or <local system>|<value>"
                    )));
                }
                let id = crate::patient::parse_identifier_token("subject:identifier", &v)?;
                if id.system == NHS_NUMBER_SYSTEM {
                    let n = NhsNumber::parse(&id.value).map_err(FhirError::InvalidNhsNumber)?;
                    if p.subject.is_some_and(|s| s != n) || p.local_subject.is_some() {
                        return Err(bad("subject:identifier may be given once".into()));
                    }
                    p.subject = Some(n);
                } else {
                    if p.subject.is_some() || p.local_subject.as_ref().is_some_and(|l| *l != id) {
                        return Err(bad("subject:identifier may be given once".into()));
                    }
                    p.local_subject = Some(id);
                }
            }
            "type" => push_unique(&mut p.types, snomed_values("type", &v)?),
            "category" => push_unique(&mut p.categories, snomed_values("category", &v)?),
            "custodian:identifier" | "custodian.identifier" => {
                let codes = values("custodian:identifier", &v, ODS_SYSTEM)?
                    .into_iter()
                    .map(|c| OdsCode::parse(c).map_err(|e| bad(format!("custodian:identifier: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                push_unique(&mut p.custodians, codes);
            }
            "_count" => {
                let n: usize = v.parse().map_err(|_| bad("_count must be a positive whole number".into()))?;
                if n == 0 {
                    return Err(bad("_count must be at least 1".into()));
                }
                p.count = n.min(limits.page_size_max);
            }
            "_summary" => match v.as_str() {
                "count" => p.summary_count = true,
                _ => return Err(bad("_summary may only be count".into())),
            },
            "next" | "next-page-token" => {
                let token_chars = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
                if v.is_empty() || v.len() > CURSOR_LEN_MAX || !v.bytes().all(token_chars) {
                    return Err(bad(format!("{k} is not a paging token this server made")));
                }
                if p.cursor.as_ref().is_some_and(|c| c != &v) {
                    return Err(bad("one paging token at a time".into()));
                }
                p.cursor = Some(v);
            }
            other => return Err(bad(format!("unknown search parameter {}", printable(other)))),
        }
    }
    if p.subject.is_none() && p.local_subject.is_none() && p.cursor.is_none() {
        return Err(bad("subject:identifier is required".into()));
    }
    Ok(p)
}

/// The parameters of a JSON `_search` body (NRLF's): an object whose
/// members are parameter names and whose values are strings (or a number,
/// for `_count`).
pub fn parse_json_search(body: &[u8]) -> Result<Vec<(String, String)>, FhirError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| FhirError::NotWellFormed(format!("the search body is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(FhirError::NotWellFormed("a JSON search body must be an object of parameters".into()));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            _ => Err(FhirError::InvalidParameter(format!("search parameter {} must be a string", printable(&k)))),
        })
        .collect()
}

/// A parameter name safe to echo in a message: at most 64 visible ASCII characters.
pub fn printable(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(64).collect()
}

/// Splits an `application/x-www-form-urlencoded` string (a query or a form body).
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, FhirError> {
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let dec =
            |s: &str| percent_decode(s).ok_or_else(|| FhirError::InvalidParameter("malformed percent-encoding".into()));
        out.push((dec(k)?, dec(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SearchLimits = SearchLimits { page_size_default: 20, page_size_max: 100 };

    fn parse(q: &str) -> Result<SearchParams, FhirError> {
        parse_search(parse_query(q)?, LIMITS)
    }

    #[test]
    fn parameters() {
        let p =
            parse("subject%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9434765919&_count=500").unwrap();
        assert_eq!(p.subject.unwrap().as_str(), "9434765919");
        assert_eq!(p.count, 100, "clamped to the maximum");
        assert!(matches!(parse("type=736253002"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(
            parse("subject:identifier=https://fhir.nhs.uk/Id/nhs-number|9434765918"),
            Err(FhirError::InvalidNhsNumber(_))
        ));
        let local = parse("subject:identifier=https://pas.rr8.example.nhs.uk/mrn|RR8-1").unwrap();
        assert_eq!((local.subject, local.local_subject.unwrap().value.as_str()), (None, "RR8-1"));
        assert!(matches!(parse("subject:identifier=9434765919"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(
            parse(
                "subject:identifier=https://pas.example/mrn|1&subject:identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919"
            ),
            Err(FhirError::InvalidParameter(_))
        ));
        assert!(matches!(parse("next=abc&colour=red"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse("next=a%2Fb"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse("next-page-token=a%2Fb"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse("_count=0&next=abc"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse_query("a=%zz"), Err(FhirError::InvalidParameter(_))));
        assert!(parse("next=abc123").is_ok());
        assert_eq!(parse("next-page-token=abc-12_3").unwrap().cursor.as_deref(), Some("abc-12_3"));
    }

    #[test]
    fn nrl_parameters() {
        let s = "subject:identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919";
        let p = parse(&format!(
            "{s}&type=http://snomed.info/sct|736253002,887701000000100&category=734163000&custodian:identifier=https://fhir.nhs.uk/Id/ods-organization-code|A81001,RV3&_summary=count"
        ))
        .unwrap();
        assert_eq!(p.types.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["736253002", "887701000000100"]);
        assert_eq!(p.categories.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["734163000"]);
        assert_eq!(p.custodians.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["A81001", "RV3"]);
        assert!(p.summary_count);
        assert!(matches!(parse(&format!("{s}&_summary=data")), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse(&format!("{s}&type=736253002,notacode")), Err(FhirError::InvalidParameter(_))));
        let many = vec!["736253002"; FILTER_VALUES_MAX + 1].join(",");
        assert!(matches!(parse(&format!("{s}&type={many}")), Err(FhirError::InvalidParameter(_))));

        let json = br#"{"subject:identifier":"https://fhir.nhs.uk/Id/nhs-number|9434765919","type":"http://snomed.info/sct|736253002","_count":5}"#;
        let p = parse_search(parse_json_search(json).unwrap(), LIMITS).unwrap();
        assert_eq!((p.subject.unwrap().as_str(), p.types.len(), p.count), ("9434765919", 1, 5));
        // NRLF's scenarios: a type of another system, an extra key, no subject.
        assert!(matches!(
            parse(&format!("{s}&type=http://incorrect.info/sct|736253002")),
            Err(FhirError::InvalidCodeSystem(_))
        ));
        assert!(matches!(
            parse(&format!("{s}&type=http://snomed.info/sct|736253002,http://incorrect.info/sct|736253002")),
            Err(FhirError::InvalidCodeSystem(_))
        ));
        assert!(matches!(parse(&format!("{s}&category=urn:other|734163000")), Err(FhirError::InvalidCodeSystem(_))));
        let json_other = br#"{"subject:identifier":"https://fhir.nhs.uk/Id/nhs-number|9434765919","type":"http://incorrect.info/sct|736253002"}"#;
        assert!(matches!(
            parse_search(parse_json_search(json_other).unwrap(), LIMITS),
            Err(FhirError::InvalidCodeSystem(_))
        ));
        let extra =
            parse_json_search(br#"{"subject:identifier":"https://fhir.nhs.uk/Id/nhs-number|9434765919","extra":"x"}"#);
        assert!(matches!(parse_search(extra.unwrap(), LIMITS), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse_search(parse_json_search(b"{}").unwrap(), LIMITS), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse_json_search(b"[1,2]"), Err(FhirError::NotWellFormed(_))));
        assert!(matches!(parse_json_search(b"{not json"), Err(FhirError::NotWellFormed(_))));
        assert!(matches!(parse_json_search(br#"{"type":["a"]}"#), Err(FhirError::InvalidParameter(_))));
    }
}
