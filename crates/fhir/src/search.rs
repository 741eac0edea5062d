//! Search parameters: parsed and checked; unknown ones are refused, never ignored.

use hie_domain::{NhsNumber, OdsCode, SnomedCode};

use crate::{FhirError, NHS_NUMBER_SYSTEM, ODS_SYSTEM};

#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    pub page_size_default: usize,
    pub page_size_max: usize,
}

/// A checked search. `subject` is `None` only when a continuation token
/// (`next`) stands in for the parameters it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchParams {
    pub subject: Option<NhsNumber>,
    pub type_code: Option<SnomedCode>,
    pub custodian: Option<OdsCode>,
    pub count: usize,
    pub cursor: Option<String>,
}

/// Longest continuation token accepted.
pub const CURSOR_LEN_MAX: usize = 64;

pub fn parse_search(pairs: Vec<(String, String)>, limits: SearchLimits) -> Result<SearchParams, FhirError> {
    let bad = FhirError::InvalidParameter;
    let mut p =
        SearchParams { subject: None, type_code: None, custodian: None, count: limits.page_size_default, cursor: None };
    for (k, v) in pairs {
        match k.as_str() {
            "subject:identifier" | "subject.identifier" => {
                let value = v
                    .strip_prefix(NHS_NUMBER_SYSTEM)
                    .and_then(|rest| rest.strip_prefix('|'))
                    .ok_or_else(|| bad(format!("subject:identifier must be {NHS_NUMBER_SYSTEM}|<NHS Number>")))?;
                p.subject = Some(NhsNumber::parse(value).map_err(FhirError::InvalidNhsNumber)?);
            }
            "type" => {
                let code = v.strip_prefix(SnomedCode::SYSTEM).and_then(|r| r.strip_prefix('|')).unwrap_or(&v);
                p.type_code = Some(SnomedCode::parse(code).map_err(|e| bad(format!("type: {e}")))?);
            }
            "custodian:identifier" | "custodian.identifier" => {
                let code = v.strip_prefix(ODS_SYSTEM).and_then(|r| r.strip_prefix('|')).unwrap_or(&v);
                p.custodian = Some(OdsCode::parse(code).map_err(|e| bad(format!("custodian:identifier: {e}")))?);
            }
            "_count" => {
                let n: usize = v.parse().map_err(|_| bad("_count must be a positive whole number".into()))?;
                if n == 0 {
                    return Err(bad("_count must be at least 1".into()));
                }
                p.count = n.min(limits.page_size_max);
            }
            "next" => {
                if v.is_empty() || v.len() > CURSOR_LEN_MAX || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(bad("next is not a token this server made".into()));
                }
                p.cursor = Some(v);
            }
            other => return Err(bad(format!("unknown search parameter {}", printable(other)))),
        }
    }
    if p.subject.is_none() && p.cursor.is_none() {
        return Err(bad("subject:identifier is required".into()));
    }
    Ok(p)
}

/// A parameter name safe to echo in a message: at most 64 visible ASCII characters.
fn printable(s: &str) -> String {
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
        assert!(matches!(parse("next=abc&colour=red"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse("next=a%2Fb"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse("_count=0&next=abc"), Err(FhirError::InvalidParameter(_))));
        assert!(matches!(parse_query("a=%zz"), Err(FhirError::InvalidParameter(_))));
        assert!(parse("next=abc123").is_ok());
    }
}
