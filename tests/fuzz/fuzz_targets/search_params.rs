#![no_main]
//! Any query string: splitting, decoding and checking never panic, and an
//! accepted search has a page size within the limit and one patient (by NHS
//! Number or local identifier) or a paging token.

use hie_fhir::{SearchLimits, parse_query, parse_search};
use libfuzzer_sys::fuzz_target;

const LIMITS: SearchLimits = SearchLimits { page_size_default: 20, page_size_max: 100 };

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = std::str::from_utf8(data)
        && let Ok(pairs) = parse_query(q)
        && let Ok(p) = parse_search(pairs, LIMITS)
    {
        assert!(p.count >= 1 && p.count <= LIMITS.page_size_max);
        // A patient by NHS Number or by a local identifier, never both, or
        // a paging token.
        assert!(p.subject.is_some() || p.local_subject.is_some() || p.cursor.is_some());
        assert!(p.subject.is_none() || p.local_subject.is_none());
    }
});
