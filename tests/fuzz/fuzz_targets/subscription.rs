#![no_main]
//! Any `POST /Subscription` body: the Subscription parser never panics, and
//! what it accepts renders (as the server stores and answers it) to a
//! Subscription that parses back to the same filters, endpoint and channel.

use hie_domain::{OdsCode, Subscription, SubscriptionId, SubscriptionStatus, Timestamp};
use hie_fhir::json_depth_exceeds;
use hie_fhir::subscription::{parse_subscription, subscription_resource};
use libfuzzer_sys::fuzz_target;

/// The API refuses deeper bodies before parsing; the fuzzer does the same.
const JSON_DEPTH_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    if json_depth_exceeds(data, JSON_DEPTH_MAX) {
        return;
    }
    let Ok(sent) = parse_subscription(data) else { return };
    assert!(sent.endpoint.starts_with("https://"));
    assert!(!sent.endpoint_host.is_empty());
    let stored = Subscription {
        id: SubscriptionId::parse("fuzz").expect("an id"),
        owner: OdsCode::parse("RX9").expect("an ODS code"),
        reason: sent.reason.clone(),
        filter: sent.filter.clone(),
        criteria: sent.criteria.clone(),
        endpoint: sent.endpoint.clone(),
        content: sent.content,
        heartbeat_secs: sent.heartbeat_secs,
        timeout_secs: sent.timeout_secs,
        max_count: sent.max_count,
        status: SubscriptionStatus::Requested,
        created: Timestamp(0),
        events: 0,
        acked: 0,
        error: None,
    };
    let mut rendered = subscription_resource(&stored);
    // A read answers with the server's members; a client sends it back without them.
    if let Some(o) = rendered.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    let again = parse_subscription(&serde_json::to_vec(&rendered).expect("JSON")).expect("a rendered subscription parses");
    assert_eq!(again.filter, sent.filter);
    assert_eq!(again.endpoint, sent.endpoint);
    assert_eq!(again.content, sent.content);
    assert_eq!((again.heartbeat_secs, again.timeout_secs, again.max_count), (sent.heartbeat_secs, sent.timeout_secs, sent.max_count));
});
