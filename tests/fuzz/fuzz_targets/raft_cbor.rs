#![no_main]
//! CBOR as the store reads it back from disk (Raft entries, the vote, the
//! applied log id and membership, snapshot meta, pointers, patient entries,
//! the registry, the tables' small values), the first byte choosing the
//! type. Never panics; no length prefix makes it hold more heap than the
//! input allows; what decodes is `decode(encode(x)) == x`, and encoding is
//! deterministic (`encode(decode(encode(x))) == encode(x)`).

mod common;

use std::fmt::Debug;

use hie_domain::raft::{Entry, LogId, SnapshotMeta, StoredMembership, Vote};
use hie_domain::{
    Command, ConsumerEntry, NhsNumber, OdsCode, Outcome, PagingKey, PatientEntry, PointerId, PointerType,
    ProducerEntry, RecordPointer, codec,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[global_allocator]
static ALLOC: common::PeakAlloc = common::PeakAlloc;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) {
    let Ok(x) = codec::decode::<T>(bytes) else { return };
    let encoded = codec::encode(&x);
    let again: T = codec::decode(&encoded).expect("an encoded value decodes");
    assert_eq!(again, x);
    assert_eq!(codec::encode(&again), encoded, "encoding is deterministic");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    common::bounded("raft cbor", data.len(), || match which % 16 {
        0 => round_trip::<Entry>(bytes),
        1 => round_trip::<Command>(bytes),
        2 => round_trip::<Outcome>(bytes),
        3 => round_trip::<Vote>(bytes),
        4 => round_trip::<Option<LogId>>(bytes),
        5 => round_trip::<StoredMembership>(bytes),
        6 => round_trip::<SnapshotMeta>(bytes),
        7 => round_trip::<RecordPointer>(bytes),
        8 => round_trip::<PatientEntry>(bytes),
        9 => round_trip::<PointerType>(bytes),
        10 => round_trip::<ProducerEntry>(bytes),
        11 => round_trip::<ConsumerEntry>(bytes),
        12 => round_trip::<PagingKey>(bytes),
        13 => round_trip::<NhsNumber>(bytes),
        14 => round_trip::<OdsCode>(bytes),
        _ => round_trip::<PointerId>(bytes),
    });
});
