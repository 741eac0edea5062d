//! Rendering pointers as FHIR JSON straight from typed structs: no
//! intermediate `serde_json::Value` tree (a map and a string allocation per
//! field), which was the largest cost of a search with results.
//! Fields are in the conventional FHIR order, `resourceType` first.

use hie_domain::{Coding, OdsCode, RecordPointer, SnomedCode};
use serde::Serialize;

use crate::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, instant};

#[derive(Serialize)]
struct CodingOut<'a> {
    system: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
}

impl<'a> CodingOut<'a> {
    fn of(c: &'a Coding) -> Self {
        CodingOut { system: &c.system, code: &c.code, display: c.display.as_deref() }
    }

    fn snomed(code: &'a SnomedCode, display: &'a Option<String>) -> Self {
        CodingOut { system: SnomedCode::SYSTEM, code: code.as_str(), display: display.as_deref() }
    }
}

#[derive(Serialize)]
struct Concept<'a> {
    coding: [CodingOut<'a>; 1],
}

#[derive(Serialize)]
struct Ident<'a> {
    system: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct ByIdentifier<'a> {
    identifier: Ident<'a>,
}

impl<'a> ByIdentifier<'a> {
    fn ods(ods: &'a OdsCode) -> Self {
        ByIdentifier { identifier: Ident { system: ODS_SYSTEM, value: ods.as_str() } }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    version_id: String,
    last_updated: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Attachment<'a> {
    content_type: &'a str,
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    creation: Option<&'a str>,
}

#[derive(Serialize)]
struct ContentOut<'a> {
    attachment: Attachment<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<CodingOut<'a>>,
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
struct RelatesTo {
    code: &'static str,
    target: Reference,
}

#[derive(Serialize)]
struct Period<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContextOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    practice_setting: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period: Option<Period<'a>>,
}

/// A pointer as a FHIR R4 DocumentReference.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DocumentReference<'a> {
    resource_type: &'static str,
    id: &'a str,
    meta: Meta,
    #[serde(skip_serializing_if = "Option::is_none")]
    master_identifier: Option<Ident<'a>>,
    status: &'static str,
    #[serde(rename = "type")]
    type_: Concept<'a>,
    category: [Concept<'a>; 1],
    subject: ByIdentifier<'a>,
    date: String,
    author: [ByIdentifier<'a>; 1],
    custodian: ByIdentifier<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relates_to: Option<[RelatesTo; 1]>,
    content: Vec<ContentOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<ContextOut<'a>>,
}

impl<'a> DocumentReference<'a> {
    pub(crate) fn of(p: &'a RecordPointer) -> Self {
        let context = p.context.as_ref().and_then(|c| {
            let period = (c.period_start.is_some() || c.period_end.is_some())
                .then_some(Period { start: c.period_start.as_deref(), end: c.period_end.as_deref() });
            let practice_setting = c.practice_setting.as_ref().map(|ps| Concept { coding: [CodingOut::of(ps)] });
            (period.is_some() || practice_setting.is_some()).then_some(ContextOut { practice_setting, period })
        });
        DocumentReference {
            resource_type: "DocumentReference",
            id: p.id.as_str(),
            meta: Meta { version_id: p.version.to_string(), last_updated: instant(p.updated) },
            master_identifier: p.master_identifier.as_ref().map(|m| Ident { system: &m.system, value: &m.value }),
            status: p.status.as_str(),
            type_: Concept { coding: [CodingOut::snomed(&p.type_code, &p.type_display)] },
            category: [Concept { coding: [CodingOut::snomed(&p.category, &p.category_display)] }],
            subject: ByIdentifier { identifier: Ident { system: NHS_NUMBER_SYSTEM, value: p.subject.as_str() } },
            date: instant(p.created),
            author: [ByIdentifier::ods(&p.author)],
            custodian: ByIdentifier::ods(&p.custodian),
            relates_to: p.replaces.as_ref().map(|r| {
                [RelatesTo {
                    code: "replaces",
                    target: Reference { reference: format!("DocumentReference/{}", r.as_str()) },
                }]
            }),
            content: p
                .content
                .iter()
                .map(|c| ContentOut {
                    attachment: Attachment {
                        content_type: &c.content_type,
                        url: &c.url,
                        creation: c.creation.as_deref(),
                    },
                    format: c.format.as_ref().map(CodingOut::of),
                })
                .collect(),
            context,
        }
    }
}

#[derive(Serialize)]
struct Link<'a> {
    relation: &'static str,
    url: &'a str,
}

#[derive(Serialize)]
struct SearchMode {
    mode: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a> {
    full_url: String,
    resource: DocumentReference<'a>,
    search: SearchMode,
}

/// A searchset Bundle of pointers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Searchset<'a> {
    resource_type: &'static str,
    #[serde(rename = "type")]
    type_: &'static str,
    total: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<[Link<'a>; 1]>,
    entry: Vec<Entry<'a>>,
}

impl<'a> Searchset<'a> {
    pub(crate) fn of(base: &str, total: u64, pointers: &'a [RecordPointer], next: Option<&'a str>) -> Self {
        Searchset {
            resource_type: "Bundle",
            type_: "searchset",
            total,
            link: next.map(|url| [Link { relation: "next", url }]),
            entry: pointers
                .iter()
                .map(|p| Entry {
                    full_url: format!("{base}/DocumentReference/{}", p.id.as_str()),
                    resource: DocumentReference::of(p),
                    search: SearchMode { mode: "match" },
                })
                .collect(),
        }
    }
}
