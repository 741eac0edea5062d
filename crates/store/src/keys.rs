//! Key layouts. Patient data is keyed by NHS Number first, so the key space
//! can later be split into ranges served by separate Raft groups.

use hie_domain::{Identifier, NhsNumber, OdsCode, PointerId, SnomedCode, SubscriptionId};

pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn log_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

pub fn patient(subject: &NhsNumber) -> Vec<u8> {
    subject.as_bytes().to_vec()
}

/// `<nhs number><pointer id>`: a patient's current pointers, in id order.
pub fn index(subject: &NhsNumber, id: &PointerId) -> Vec<u8> {
    let mut k = Vec::with_capacity(NhsNumber::LEN + id.as_str().len());
    k.extend_from_slice(subject.as_bytes());
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// The value of an index entry: `<custodian>\0<type code>`, so that a
/// search filters on both without reading the pointer.
pub fn index_value(custodian: &OdsCode, type_code: &SnomedCode) -> Vec<u8> {
    [custodian.as_str().as_bytes(), b"\0", type_code.as_str().as_bytes()].concat()
}

/// The custodian and type an index entry's value names; `None` for a value
/// that is not one (the caller then reads the pointer).
pub fn parse_index_value(value: &[u8]) -> Option<(&str, &str)> {
    let at = value.iter().position(|&b| b == 0)?;
    let custodian = std::str::from_utf8(&value[..at]).ok()?;
    let type_code = std::str::from_utf8(&value[at + 1..]).ok()?;
    (!custodian.is_empty() && !type_code.is_empty()).then_some((custodian, type_code))
}

pub fn pointer(id: &PointerId) -> Vec<u8> {
    id.as_str().as_bytes().to_vec()
}

/// `<custodian>\0<masterIdentifier key>`.
pub fn idempotency(custodian: &OdsCode, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(custodian.as_str().len() + 1 + key.len());
    k.extend_from_slice(custodian.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

pub fn pointer_type(code: &SnomedCode) -> Vec<u8> {
    [b"t/".as_slice(), code.as_str().as_bytes()].concat()
}

pub fn producer(ods: &OdsCode) -> Vec<u8> {
    [b"p/".as_slice(), ods.as_str().as_bytes()].concat()
}

pub fn consumer(ods: &OdsCode) -> Vec<u8> {
    [b"c/".as_slice(), ods.as_str().as_bytes()].concat()
}

/// `a/<system>`: the organisation that assigns a local identifier system.
pub fn authority(system: &str) -> Vec<u8> {
    [AUTHORITY_PREFIX, system.as_bytes()].concat()
}

/// `<system>\0<value>`: a local identifier in the cross-reference table.
pub fn local_id(id: &Identifier) -> Vec<u8> {
    [id.system.as_bytes(), b"\0", id.value.as_bytes()].concat()
}

pub const AUTHORITY_PREFIX: &[u8] = b"a/";
pub const TYPE_PREFIX: &[u8] = b"t/";
pub const PRODUCER_PREFIX: &[u8] = b"p/";
pub const CONSUMER_PREFIX: &[u8] = b"c/";
/// `n/<node id, big-endian>`: a node's anchored audit chain head, in the
/// registry table.
pub fn audit_anchor(node: u64) -> Vec<u8> {
    [AUDIT_ANCHOR_PREFIX, &node.to_be_bytes()].concat()
}

pub const AUDIT_ANCHOR_PREFIX: &[u8] = b"n/";
/// The cluster's paging-token key, in the registry table.
pub const PAGING_KEY: &[u8] = b"k/paging";

/// `<pointer id>\0`: every past version of a pointer.
pub fn history_prefix(id: &PointerId) -> Vec<u8> {
    [id.as_str().as_bytes(), b"\0"].concat()
}

/// `<pointer id>\0<version, big-endian>`: versions in order under their pointer.
pub fn history(id: &PointerId, version: u64) -> Vec<u8> {
    [id.as_str().as_bytes(), b"\0", &version.to_be_bytes()].concat()
}

pub const VOTE: &[u8] = b"vote";
pub const COMMITTED: &[u8] = b"committed";
pub const LAST_PURGED: &[u8] = b"last_purged";
pub const APPLIED: &[u8] = b"applied";
pub const MEMBERSHIP: &[u8] = b"membership";
/// Present while a snapshot is being installed (its meta): the state tables
/// are then partly old and partly new, and opening the store installs the
/// snapshot again from its file.
pub const INSTALLING: &[u8] = b"installing";

pub const SUBSCRIPTION_PREFIX: &[u8] = b"s/";

/// `s/<id>`: a subscription.
pub fn subscription(id: &SubscriptionId) -> Vec<u8> {
    [SUBSCRIPTION_PREFIX, id.as_str().as_bytes()].concat()
}

/// `k/<key>\0`: the subscriptions filed under a key.
pub fn subscription_key_prefix(key: &str) -> Vec<u8> {
    [b"k/".as_slice(), key.as_bytes(), b"\0"].concat()
}

/// `e/<id>\0`: a subscription's events.
pub fn subscription_events_prefix(id: &SubscriptionId) -> Vec<u8> {
    [b"e/".as_slice(), id.as_str().as_bytes(), b"\0"].concat()
}

/// `e/<id>\0<number, big-endian>`: events in order under their subscription.
pub fn subscription_event(id: &SubscriptionId, number: u64) -> Vec<u8> {
    [subscription_events_prefix(id).as_slice(), &number.to_be_bytes()].concat()
}
