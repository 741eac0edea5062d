//! Rendering pointers as FHIR JSON text by splicing: the server-owned
//! members (`resourceType`, `id`, `meta`, `status`, `date`) are written
//! first, then the producer's own members exactly as stored. Nothing is
//! parsed or built as a `serde_json::Value` tree, so a search's cost is
//! copying its pointers' bytes.

use hie_domain::RecordPointer;

use crate::instant;

/// Appends `s` as a JSON string.
fn push_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; writing into a String
    // cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a string serialises"));
}

/// Appends the pointer as a DocumentReference.
pub(crate) fn document_reference(out: &mut String, p: &RecordPointer) {
    out.push_str(r#"{"resourceType":"DocumentReference","id":"#);
    push_str(out, p.id.as_str());
    out.push_str(r#","meta":{"versionId":""#);
    out.push_str(&p.version.to_string());
    out.push_str(r#"","lastUpdated":""#);
    out.push_str(&instant(p.updated));
    out.push('"');
    if !p.body.meta.is_empty() {
        out.push(',');
        out.push_str(&p.body.meta);
    }
    out.push_str(r#"},"status":""#);
    out.push_str(p.status.as_str());
    out.push_str(r#"","date":"#);
    match &p.date {
        Some(d) => push_str(out, d),
        None => {
            out.push('"');
            out.push_str(&instant(p.created));
            out.push('"');
        }
    }
    if !p.body.members.is_empty() {
        out.push(',');
        out.push_str(&p.body.members);
    }
    out.push('}');
}

/// A Bundle's `link` array: `self`, then `next` if there is one.
fn links(out: &mut String, self_url: &str, next: Option<&str>) {
    out.push_str(r#","link":[{"relation":"self","url":"#);
    push_str(out, self_url);
    out.push('}');
    if let Some(next) = next {
        out.push_str(r#",{"relation":"next","url":"#);
        push_str(out, next);
        out.push('}');
    }
    out.push(']');
}

/// A searchset Bundle of pointers.
pub(crate) fn searchset(
    base: &str,
    total: u64,
    pointers: &[RecordPointer],
    self_url: &str,
    next: Option<&str>,
    notice: Option<&str>,
) -> String {
    let bytes: usize = pointers.iter().map(|p| 320 + p.body.len()).sum();
    let mut out = String::with_capacity(160 + bytes);
    out.push_str(r#"{"resourceType":"Bundle","type":"searchset","total":"#);
    out.push_str(&total.to_string());
    links(&mut out, self_url, next);
    out.push_str(r#","entry":["#);
    for (i, p) in pointers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"fullUrl":"#);
        push_str(&mut out, &format!("{base}/DocumentReference/{}", p.id.as_str()));
        out.push_str(r#","resource":"#);
        document_reference(&mut out, p);
        out.push_str(r#","search":{"mode":"match"}}"#);
    }
    if let Some(notice) = notice {
        if !pointers.is_empty() {
            out.push(',');
        }
        out.push_str(r#"{"resource":"#);
        out.push_str(&crate::warning_outcome(notice).to_string());
        out.push_str(r#","search":{"mode":"outcome"}}"#);
    }
    out.push_str("]}");
    out
}

/// A history Bundle of one pointer's versions, newest first.
pub(crate) fn history(base: &str, versions: &[RecordPointer], self_url: &str) -> String {
    let bytes: usize = versions.iter().map(|p| 400 + p.body.len()).sum();
    let mut out = String::with_capacity(160 + bytes);
    out.push_str(r#"{"resourceType":"Bundle","type":"history","total":"#);
    out.push_str(&versions.len().to_string());
    links(&mut out, self_url, None);
    out.push_str(r#","entry":["#);
    for (i, p) in versions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let url = format!("DocumentReference/{}", p.id.as_str());
        out.push_str(r#"{"fullUrl":"#);
        push_str(&mut out, &format!("{base}/{url}/_history/{}", p.version));
        out.push_str(r#","resource":"#);
        document_reference(&mut out, p);
        let (method, status) = if p.version == 1 { ("POST", "201") } else { ("PUT", "200") };
        out.push_str(r#","request":{"method":""#);
        out.push_str(method);
        out.push_str(r#"","url":"#);
        push_str(&mut out, if p.version == 1 { "DocumentReference" } else { &url });
        out.push_str(r#"},"response":{"status":""#);
        out.push_str(status);
        out.push_str(r#"","lastModified":""#);
        out.push_str(&instant(p.updated));
        out.push_str(r#""}}"#);
    }
    out.push_str("]}");
    out
}
