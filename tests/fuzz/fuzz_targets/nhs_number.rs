#![no_main]
//! Any string: NhsNumber::parse never panics, and what it accepts round-trips.

use hie_domain::NhsNumber;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(n) = NhsNumber::parse(s)
    {
        assert_eq!(n.as_str(), s);
        assert_eq!(NhsNumber::parse(n.as_str()), Ok(n));
        assert!(!format!("{n:?}").contains(s), "Debug must not show the number");
    }
});
