#![no_main]
//! The caller identity in a client certificate (`hie_pki::caller_from_cert`).
//! By the first byte, either
//! - any DER: never panics, and a caller it names has at least one role;
//! - SAN URIs, one a line: a certificate made with them (and a DNS name,
//!   which is not an identity) names the caller the rule gives: exactly one
//!   `urn:hie:ods:` URI with a valid ODS code, at least one
//!   `urn:hie:role:` URI, every one a known role; other URIs ignored.

mod common;

use std::collections::BTreeSet;

use hie_domain::{Caller, OdsCode, Role};
use hie_pki::{CertId, ODS_URI_PREFIX, ROLE_URI_PREFIX, caller_from_cert};
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};

#[global_allocator]
static ALLOC: common::PeakAlloc = common::PeakAlloc;

thread_local! {
    static KEY: KeyPair = KeyPair::generate().expect("a key pair");
}

/// The rule, stated on the whole list of URIs.
fn expected(uris: &[&str]) -> Option<Caller> {
    let ods: Vec<&str> = uris.iter().filter_map(|u| u.strip_prefix(ODS_URI_PREFIX)).collect();
    let roles: Vec<&str> = uris.iter().filter_map(|u| u.strip_prefix(ROLE_URI_PREFIX)).collect();
    let [ods] = ods[..] else { return None };
    let ods = OdsCode::parse(ods).ok()?;
    let roles: Option<BTreeSet<Role>> = roles.iter().map(|r| Role::parse(r)).collect();
    let roles = roles.filter(|r| !r.is_empty())?;
    Some(Caller { ods, roles })
}

fn any_der(der: &[u8]) {
    let _ = CertId::of(der);
    if let Ok(caller) = caller_from_cert(der) {
        assert!(!caller.roles.is_empty());
    }
}

fn made_with(uris: &[u8]) {
    let Ok(uris) = std::str::from_utf8(uris) else { return };
    let uris: Vec<&str> = uris.split('\n').collect();
    let Ok(mut params) = CertificateParams::new(vec!["node-1.hie.test".to_owned()]) else { return };
    for u in &uris {
        // rcgen takes only what an IA5String can hold.
        let Ok(u) = (*u).try_into() else { return };
        params.subject_alt_names.push(SanType::URI(u));
    }
    let cert = KEY.with(|key| params.self_signed(key)).expect("a certificate with these names");
    let got = caller_from_cert(cert.der()).ok();
    assert_eq!(got, expected(&uris), "SAN URIs {uris:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    common::bounded("certificate SAN", data.len(), || if mode & 1 == 0 { any_der(rest) } else { made_with(rest) });
});
