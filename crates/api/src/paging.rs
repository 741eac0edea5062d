//! Paging tokens that any node can continue and nobody can read: a
//! search's position (its parameters and the last pointer id of the page
//! before) sealed with ChaCha20-Poly1305 under the cluster's paging key,
//! which the replicated state holds (set once, by the first node that needs
//! it). No node keeps anything per token, so a `next` link made by one node
//! works on every other, and a token names neither the patient nor a
//! pointer to whoever sees the URL. A token is bound to the organisation
//! that searched and expires after `cursor_ttl`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// What a token stands for: a search (as its checked parameters, in
/// text) and where its next page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cursor {
    #[serde(rename = "s")]
    pub(crate) subject: String,
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) types: Vec<String>,
    #[serde(rename = "c", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) categories: Vec<String>,
    #[serde(rename = "k", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) custodians: Vec<String>,
    #[serde(rename = "n")]
    pub(crate) count: usize,
    /// The last pointer id of the page before.
    #[serde(rename = "a")]
    pub(crate) after: String,
    /// Only the organisation that searched may continue.
    #[serde(rename = "o")]
    pub(crate) owner: String,
    /// When the first page was served (milliseconds since the epoch).
    #[serde(rename = "i")]
    pub(crate) issued_ms: i64,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("the paging token was not made by this cluster, or was changed")]
    Invalid,
    #[error("the paging token has expired; search again")]
    Expired,
    #[error("the paging token belongs to another organisation")]
    NotYours,
}

/// 32 random bytes for a new paging key.
pub(crate) fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    SystemRandom::new().fill(&mut key).expect("the system's random numbers");
    key
}

/// The cluster's paging key.
pub(crate) struct PagingKey(LessSafeKey);

impl PagingKey {
    pub(crate) fn new(bytes: &[u8; 32]) -> PagingKey {
        PagingKey(LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key")))
    }

    /// A sealed token: base64url of nonce, ciphertext and tag.
    pub(crate) fn seal(&self, cursor: &Cursor) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).expect("the system's random numbers");
        let mut data = serde_json::to_vec(cursor).expect("a cursor serialises");
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .expect("sealing cannot fail for this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The cursor a token stands for, if it is this cluster's, unexpired
    /// and `owner`'s. (Its length is checked by the search parser.)
    pub(crate) fn open(&self, token: &str, owner: &str, now_ms: i64, ttl: Duration) -> Result<Cursor, TokenError> {
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| TokenError::Invalid)?;
        if raw.len() < NONCE_LEN {
            return Err(TokenError::Invalid);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| TokenError::Invalid)?;
        let mut sealed = sealed.to_vec();
        let plain = self.0.open_in_place(nonce, Aad::empty(), &mut sealed).map_err(|_| TokenError::Invalid)?;
        let cursor: Cursor = serde_json::from_slice(plain).map_err(|_| TokenError::Invalid)?;
        if cursor.owner != owner {
            return Err(TokenError::NotYours);
        }
        let age = now_ms.saturating_sub(cursor.issued_ms);
        if age < 0 || age as u128 > ttl.as_millis() {
            return Err(TokenError::Expired);
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor {
            subject: "9000000009".into(),
            types: vec!["736253002".into()],
            categories: vec![],
            custodians: vec!["A81001".into()],
            count: 20,
            after: "A81001-p1".into(),
            owner: "Y05868".into(),
            issued_ms: 1_000,
        }
    }

    #[test]
    fn a_token_opens_under_the_same_key_only_unchanged_unexpired_and_for_its_owner() {
        let key = PagingKey::new(&[7; 32]);
        let token = key.seal(&cursor());
        assert!(
            !token.contains("9000000009") && !token.contains("A81001") && !token.contains("736253002"),
            "reveals nothing"
        );
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe");
        let ttl = Duration::from_secs(60);
        assert_eq!(key.open(&token, "Y05868", 2_000, ttl), Ok(cursor()));
        assert_eq!(PagingKey::new(&[8; 32]).open(&token, "Y05868", 2_000, ttl), Err(TokenError::Invalid));
        assert_eq!(key.open(&token, "RV3", 2_000, ttl), Err(TokenError::NotYours));
        assert_eq!(key.open(&token, "Y05868", 1_000 + 61_000, ttl), Err(TokenError::Expired));
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(key.open(&URL_SAFE_NO_PAD.encode(bytes), "Y05868", 2_000, ttl), Err(TokenError::Invalid));
        assert_eq!(key.open("not a token!", "Y05868", 2_000, ttl), Err(TokenError::Invalid));
        assert_eq!(key.open("", "Y05868", 2_000, ttl), Err(TokenError::Invalid));
        assert_ne!(key.seal(&cursor()), token, "a new nonce every time");
    }
}
