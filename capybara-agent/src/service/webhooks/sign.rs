//! Standard Webhooks signing (<https://www.standardwebhooks.com/>): `whsec_` secrets and the
//! `webhook-signature` header.
//!
//! - A secret is `whsec_` and the standard base64 of 24 to 64 random bytes (the spec's range);
//!   one made by the agent has 32 bytes. The key HMAC uses is the decoded bytes.
//! - The signature of one attempt is `v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`
//!   with `id` the event's stable id (`webhook-id`) and `timestamp` the attempt's Unix seconds
//!   (`webhook-timestamp`: a fresh one per attempt, so a receiver's 5-minute tolerance accepts
//!   a retry hours later). During a key rotation the header holds one signature per live secret,
//!   space-separated (the spec's form); a receiver that knows either verifies.
//! - A secret never reaches a log: [`Secret`]'s `Debug` shows its fingerprint only
//!   ([`Secret::fingerprint`]: the first 12 hex digits of the SHA-256 of the key), which is all
//!   `webhook show` prints.

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

use crate::service::domain::ValidationError;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The fewest key bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 24;
/// The most key bytes a secret may have.
pub const MAX_SECRET_BYTES: usize = 64;
/// Key bytes of a secret the agent makes.
pub const NEW_SECRET_BYTES: usize = 32;

/// A webhook's signing secret (the decoded key bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

impl Secret {
    /// A new random secret of [`NEW_SECRET_BYTES`] bytes.
    pub fn generate() -> Secret {
        let key: [u8; NEW_SECRET_BYTES] = rand::random();
        Secret(key.to_vec())
    }

    /// The key bytes (for sealing at rest).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A secret from stored key bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// Parses `whsec_<base64>` given in `field`: empty, another prefix, bad base64 or a key
    /// outside 24–64 bytes is an error naming `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Secret, ValidationError> {
        let bad = |reason: String| ValidationError::Value { field, reason };
        if s.is_empty() {
            return Err(bad("empty secret".into()));
        }
        let b64 = s.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            bad(format!(
                "a webhook secret starts with {SECRET_PREFIX} (then base64 of {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} random bytes)"
            ))
        })?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad(format!("not base64 after {SECRET_PREFIX}")))?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(bad(format!(
                "the key has {} bytes; a webhook secret has {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}",
                key.len()
            )));
        }
        Ok(Secret(key))
    }

    /// The `whsec_…` form (shown once, by `webhook add` and `rotate-secret`).
    pub fn reveal(&self) -> String {
        format!(
            "{SECRET_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(&self.0)
        )
    }

    /// A fingerprint that identifies the secret without revealing it: `sha256:` and the first
    /// 12 hex digits of the SHA-256 of the key.
    pub fn fingerprint(&self) -> String {
        let d = Sha256::digest(&self.0);
        format!(
            "sha256:{}",
            d[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }

    /// The signature `v1,<base64>` of `body` sent as event `id` at `timestamp`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// The `webhook-signature` header value: one signature per secret, space-separated.
pub fn signature_header(secrets: &[&Secret], id: &str, timestamp: u64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference libraries' test vector (the same in the spec
    /// repository's Python, JavaScript and Go tests).
    #[test]
    fn signs_the_published_test_vector() {
        let secret = Secret::parse("secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_parse_round_trip_and_bad_ones_name_the_field() {
        let s = Secret::generate();
        assert_eq!(s.bytes().len(), NEW_SECRET_BYTES);
        assert_eq!(Secret::parse("secret", &s.reveal()).unwrap(), s);
        for (bad, why) in [
            ("", "empty"),
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with whsec_"),
            ("whsec_!!!", "not base64"),
            ("whsec_AAAA", "has 3 bytes"),
        ] {
            let e = Secret::parse("secret", bad).unwrap_err().to_string();
            assert!(e.starts_with("secret: ") && e.contains(why), "{bad:?}: {e}");
        }
        let long = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 65])
        );
        assert!(Secret::parse("secret", &long).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::generate();
        let shown = format!("{s:?}");
        let b64 = s.reveal();
        assert!(!shown.contains(&b64[SECRET_PREFIX.len()..]), "{shown}");
        assert!(shown.contains(&s.fingerprint()));
    }

    #[test]
    fn a_rotation_sends_one_signature_per_secret() {
        let (a, b) = (Secret::generate(), Secret::generate());
        let h = signature_header(&[&a, &b], "msg_1", 10, b"{}");
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(
            parts,
            [a.sign("msg_1", 10, b"{}"), b.sign("msg_1", 10, b"{}")]
        );
    }
}
