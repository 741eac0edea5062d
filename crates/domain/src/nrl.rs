//! NHS England's National Record Locator pointer types and their
//! categories (NRLF's RecordType and RecordCategory value sets), with
//! their SNOMED CT displays: the registry a new cluster starts from, so that
//! systems publishing to NRL publish here unchanged.

use crate::ids::SnomedCode;
use crate::model::PointerType;

pub const CARE_PLAN: (&str, &str) = ("734163000", "Care plan");
pub const OBSERVATIONS: (&str, &str) = ("1102421000000108", "Observations");
pub const CLINICAL_NOTE: (&str, &str) = ("823651000000106", "Clinical note");
pub const DIAGNOSTIC_STUDIES_REPORT: (&str, &str) = ("721981007", "Diagnostic studies report");
pub const DIAGNOSTIC_PROCEDURE: (&str, &str) = ("103693007", "Diagnostic procedure");

/// (type code, type display, (category code, category display)).
pub const TYPES: &[(&str, &str, (&str, &str))] = &[
    ("736253002", "Mental health crisis plan", CARE_PLAN),
    ("887701000000100", "Emergency health care plan", CARE_PLAN),
    ("861421000000109", "End of life care coordination summary", CARE_PLAN),
    ("1382601000000107", "ReSPECT form", CARE_PLAN),
    ("325691000000100", "Contingency plan", CARE_PLAN),
    ("736373009", "End of life care plan", CARE_PLAN),
    ("736366004", "Advance care plan", CARE_PLAN),
    ("735324008", "Treatment escalation plan", CARE_PLAN),
    ("2181441000000107", "Personalised Care and Support Plan", CARE_PLAN),
    ("16521000000101", "Lloyd George record folder", CARE_PLAN),
    ("1363501000000100", "Royal College of Physicians NEWS2 (National Early Warning Score 2) chart", OBSERVATIONS),
    ("824321000000109", "Summary record", CLINICAL_NOTE),
    ("MAULR", "MRA Upper Limb Arteries", DIAGNOSTIC_STUDIES_REPORT),
    ("MAXIB", "MRI Axilla Both", DIAGNOSTIC_PROCEDURE),
];

/// NRL's pointer types as registry entries (those whose code is a SNOMED
/// CT identifier: NRLF's two imaging types are NICIP codes, which hie's
/// registry, keyed by SNOMED CT, does not hold).
pub fn pointer_types() -> Vec<PointerType> {
    TYPES
        .iter()
        .filter_map(|(code, display, (category, category_display))| {
            Some(PointerType {
                code: SnomedCode::parse(code).ok()?,
                display: (*display).into(),
                category: SnomedCode::parse(category).ok()?,
                category_display: (*category_display).into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_snomed_type_is_registered_under_its_category() {
        let types = super::pointer_types();
        assert_eq!(types.len(), 12, "fourteen NRL types, two of them NICIP codes");
        let eol = types.iter().find(|t| t.code.as_str() == "736373009").unwrap();
        assert_eq!((eol.display.as_str(), eol.category.as_str()), ("End of life care plan", "734163000"));
    }
}
