#![no_main]
//! Any body: the DocumentReference parser never panics, and what it accepts
//! renders to FHIR JSON that parses back to the same pointer, kept as sent.

use hie_fhir::{document_reference, json_depth_exceeds, parse_document_reference};
use libfuzzer_sys::fuzz_target;

/// The API refuses deeper bodies before parsing; the fuzzer does the same.
const JSON_DEPTH_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    if json_depth_exceeds(data, JSON_DEPTH_MAX) {
        return;
    }
    if let Ok(parsed) = parse_document_reference(data) {
        let rendered = document_reference(&parsed.pointer).into_bytes();
        let again = parse_document_reference(&rendered).expect("a rendered pointer parses");
        assert_eq!(again.pointer.subject, parsed.pointer.subject);
        assert_eq!(again.pointer.body, parsed.pointer.body);
        assert_eq!(again.pointer.replaces, parsed.pointer.replaces);
        assert_eq!(again.pointer.type_code, parsed.pointer.type_code);
    }
});
