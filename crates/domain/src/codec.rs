//! The one binary encoding of replicated data (CBOR), used on disk and on the wire.

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {message}")]
pub struct DecodeError {
    pub what: &'static str,
    pub message: String,
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut out).expect("encoding into a Vec cannot fail");
    out
}

pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    ciborium::into_writer(value, out).expect("encoding into a Vec cannot fail");
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    ciborium::from_reader(bytes).map_err(|e| DecodeError { what: std::any::type_name::<T>(), message: e.to_string() })
}
