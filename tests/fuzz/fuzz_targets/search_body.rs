#![no_main]
//! Any JSON `_search` body (NRLF's way of searching): reading it and
//! checking its parameters never panic, and an accepted search has a page
//! size within the limit and one patient (by NHS Number or local
//! identifier) or a paging token.

use hie_fhir::{SearchLimits, json_depth_exceeds, parse_json_search, parse_search};
use libfuzzer_sys::fuzz_target;

const LIMITS: SearchLimits = SearchLimits { page_size_default: 20, page_size_max: 100 };
/// The API refuses deeper bodies before parsing; the fuzzer does the same.
const JSON_DEPTH_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    if json_depth_exceeds(data, JSON_DEPTH_MAX) {
        return;
    }
    if let Ok(pairs) = parse_json_search(data)
        && let Ok(p) = parse_search(pairs, LIMITS)
    {
        assert!(p.count >= 1 && p.count <= LIMITS.page_size_max);
        // A patient by NHS Number or by a local identifier, never both, or
        // a paging token.
        assert!(p.subject.is_some() || p.local_subject.is_some() || p.cursor.is_some());
        assert!(p.subject.is_none() || p.local_subject.is_none());
    }
});
