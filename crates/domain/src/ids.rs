//! Identifiers, each a newtype built only by a constructor that checks it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused. Messages never repeat the refused value,
/// so they are safe to log (an invalid NHS Number may still be someone's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("an NHS Number must be exactly 10 digits")]
    NhsNumberFormat,
    #[error("NHS Number check digit does not match (Modulus 11)")]
    NhsNumberCheckDigit,
    #[error("an NHS Number cannot be one digit repeated")]
    NhsNumberRepeated,
    #[error("an ODS code must be {min} to {max} characters of A-Z and 0-9", min = OdsCode::LEN_MIN, max = OdsCode::LEN_MAX)]
    OdsCode,
    #[error("a pointer id must be `<ODS code>-<local id>`, at most {max} characters of A-Z a-z 0-9 . -", max = PointerId::LEN_MAX)]
    PointerId,
    #[error("a SNOMED CT code must be {min} to {max} digits", min = SnomedCode::LEN_MIN, max = SnomedCode::LEN_MAX)]
    SnomedCode,
}

/// A valid NHS Number: ten digits, the last a Modulus 11 check digit.
///
/// `Debug` never shows the digits; use [`NhsNumber::as_str`] where the number
/// itself must leave the process (a FHIR response, a storage key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NhsNumber([u8; 10]);

impl NhsNumber {
    /// The FHIR identifier system of NHS Numbers.
    pub const SYSTEM: &'static str = "https://fhir.nhs.uk/Id/nhs-number";
}

impl NhsNumber {
    pub const LEN: usize = 10;

    /// Parses and checks a number. Spaces are not accepted: callers that
    /// accept the printed form `943 476 5919` strip them first.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let bytes = s.as_bytes();
        if bytes.len() != Self::LEN || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(IdError::NhsNumberFormat);
        }
        let mut digits = [0u8; 10];
        digits.copy_from_slice(bytes);
        if digits.iter().all(|&d| d == digits[0]) {
            return Err(IdError::NhsNumberRepeated);
        }
        let check = Self::check_digit(&digits[..9]).ok_or(IdError::NhsNumberCheckDigit)?;
        if check != digits[9] - b'0' {
            return Err(IdError::NhsNumberCheckDigit);
        }
        Ok(NhsNumber(digits))
    }

    /// The Modulus 11 check digit of nine digits (ASCII), or `None` when the
    /// remainder makes the number invalid (a check value of 10).
    pub fn check_digit(nine: &[u8]) -> Option<u8> {
        debug_assert_eq!(nine.len(), 9);
        let sum: u32 = nine.iter().zip((2..=10).rev()).map(|(d, w)| u32::from(d - b'0') * w).sum();
        match 11 - (sum % 11) {
            11 => Some(0),
            10 => None,
            c => Some(c as u8),
        }
    }

    /// Builds a valid number from a nine-digit stem, if that stem has one.
    pub fn from_stem(stem: u32) -> Option<Self> {
        if stem >= 1_000_000_000 {
            return None;
        }
        let text = format!("{stem:09}");
        let check = Self::check_digit(text.as_bytes())?;
        Self::parse(&format!("{text}{check}")).ok()
    }

    pub fn as_str(&self) -> &str {
        // The constructor only admits ASCII digits.
        std::str::from_utf8(&self.0).expect("ascii digits")
    }

    pub fn as_bytes(&self) -> &[u8; 10] {
        &self.0
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

impl TryFrom<String> for NhsNumber {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<NhsNumber> for String {
    fn from(n: NhsNumber) -> String {
        n.as_str().to_owned()
    }
}

/// An Organisation Data Service code (for example `A81001`, `RR8`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OdsCode(String);

impl OdsCode {
    pub const LEN_MIN: usize = 3;
    pub const LEN_MAX: usize = 10;

    /// Parses a code; lower-case letters are taken as upper-case.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if !(Self::LEN_MIN..=Self::LEN_MAX).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(IdError::OdsCode);
        }
        Ok(OdsCode(s.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OdsCode({})", self.0)
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for OdsCode {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<OdsCode> for String {
    fn from(c: OdsCode) -> String {
        c.0
    }
}

/// A pointer id: `<ODS code of the custodian>-<uuid or the producer's local id>`,
/// within FHIR's id rules (`[A-Za-z0-9.-]{1,64}`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PointerId(String);

impl PointerId {
    pub const LEN_MAX: usize = 64;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > Self::LEN_MAX || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
            return Err(IdError::PointerId);
        }
        let (ods, local) = s.split_once('-').ok_or(IdError::PointerId)?;
        OdsCode::parse(ods).map_err(|_| IdError::PointerId)?;
        if local.is_empty() {
            return Err(IdError::PointerId);
        }
        // Normalise the ODS part to upper case so ownership checks compare equal.
        Ok(PointerId(format!("{}-{}", ods.to_ascii_uppercase(), local)))
    }

    /// A new server-assigned id for a custodian. The uuid is chosen by the
    /// node that accepted the request, never while applying.
    pub fn new(custodian: &OdsCode, uuid: uuid::Uuid) -> Self {
        PointerId(format!("{}-{}", custodian.as_str(), uuid.hyphenated()))
    }

    /// The custodian named in the id.
    pub fn custodian(&self) -> OdsCode {
        let (ods, _) = self.0.split_once('-').expect("checked by the constructor");
        OdsCode(ods.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PointerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointerId({})", self.0)
    }
}

impl fmt::Display for PointerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PointerId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<PointerId> for String {
    fn from(p: PointerId) -> String {
        p.0
    }
}

/// A SNOMED CT concept id (digits only).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnomedCode(String);

impl SnomedCode {
    pub const SYSTEM: &'static str = "http://snomed.info/sct";
    pub const LEN_MIN: usize = 6;
    pub const LEN_MAX: usize = 18;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if !(Self::LEN_MIN..=Self::LEN_MAX).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::SnomedCode);
        }
        Ok(SnomedCode(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SnomedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnomedCode({})", self.0)
    }
}

impl fmt::Display for SnomedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SnomedCode {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<SnomedCode> for String {
    fn from(c: SnomedCode) -> String {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_numbers() {
        assert!(NhsNumber::parse("9434765919").is_ok());
        assert!(NhsNumber::parse("9000000009").is_ok());
        assert_eq!(NhsNumber::parse("9434765918"), Err(IdError::NhsNumberCheckDigit));
        assert_eq!(NhsNumber::parse("943476591"), Err(IdError::NhsNumberFormat));
        assert_eq!(NhsNumber::parse("94347659190"), Err(IdError::NhsNumberFormat));
        assert_eq!(NhsNumber::parse("943476591a"), Err(IdError::NhsNumberFormat));
        assert_eq!(NhsNumber::parse("943 476 5919"), Err(IdError::NhsNumberFormat));
        // 0000000000 and 1111111111 pass Modulus 11 but are one repeated digit.
        assert_eq!(NhsNumber::parse("0000000000"), Err(IdError::NhsNumberRepeated));
        assert_eq!(NhsNumber::parse("1111111111"), Err(IdError::NhsNumberRepeated));
    }

    #[test]
    fn debug_does_not_show_digits() {
        let n = NhsNumber::parse("9434765919").unwrap();
        assert!(!format!("{n:?}").contains("9434765919"));
        assert!(!format!("{:?}", Some(n)).contains("943"));
    }

    #[test]
    fn ods_and_pointer_ids() {
        assert_eq!(OdsCode::parse("a81001").unwrap().as_str(), "A81001");
        assert!(OdsCode::parse("A8").is_err());
        assert!(OdsCode::parse("A81-01").is_err());
        let id = PointerId::parse("a81001-abc.1").unwrap();
        assert_eq!(id.as_str(), "A81001-abc.1");
        assert_eq!(id.custodian().as_str(), "A81001");
        assert!(PointerId::parse("A81001-").is_err());
        assert!(PointerId::parse("A81001").is_err());
        assert!(PointerId::parse("A81001-a/b").is_err());
        assert!(PointerId::parse(&format!("A81001-{}", "x".repeat(60))).is_err());
        let fresh = PointerId::new(&OdsCode::parse("RR8").unwrap(), uuid::Uuid::nil());
        assert_eq!(PointerId::parse(fresh.as_str()).unwrap(), fresh);
    }

    fn valid_number() -> impl Strategy<Value = NhsNumber> {
        (0u32..1_000_000_000).prop_filter_map("stem without a check digit", NhsNumber::from_stem)
    }

    proptest! {
        #[test]
        fn every_valid_number_round_trips(n in valid_number()) {
            let text = n.as_str().to_owned();
            prop_assert_eq!(NhsNumber::parse(&text).unwrap(), n);
            let json = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<NhsNumber>(&json).unwrap(), n);
            let cbor = crate::codec::encode(&n);
            prop_assert_eq!(crate::codec::decode::<NhsNumber>(&cbor).unwrap(), n);
        }

        #[test]
        fn every_single_digit_change_is_rejected(n in valid_number(), pos in 0usize..10, delta in 1u8..10) {
            let mut bytes = *n.as_bytes();
            bytes[pos] = b'0' + (bytes[pos] - b'0' + delta) % 10;
            let changed = std::str::from_utf8(&bytes).unwrap();
            prop_assert!(NhsNumber::parse(changed).is_err(), "single-digit change accepted");
        }
    }
}
