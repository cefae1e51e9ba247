//! Keys and secrets: WireGuard key pairs, API token secrets and their hashes, and the sealing of
//! kept client keys.
//!
//! - **Token secrets** are 32 random bytes. The bearer string is `capy_<id>_<secret>` (secret in
//!   unpadded base64url): the id finds the record with one store read, the SHA-256 of the
//!   secret bytes is compared with the stored hash in constant time. The secret itself is never
//!   stored or logged. SHA-256 without a salt or stretching is enough here: the secret is 256
//!   random bits, not a password, so there is nothing to guess from the hash.
//! - **Client keys** (only with `--keep-client-keys`) are sealed with ChaCha20-Poly1305 under a
//!   32-byte key kept in its own file (mode 0600, `paths::client_keys_key_file`), with a random
//!   96-bit nonce per seal and the peer's store key as associated data, so a sealed key copied to
//!   another device's record does not open.
//! - The **server key** is one x25519 private key in a file of mode 0600, created on first start.
//! - Both key files (the server key's, see [`crate::tunnel::PrivateKey::load_or_generate`], and
//!   the sealing key's, [`load_or_create_key`]) are written atomically and durably by
//!   [`crate::fsutil::write_secret`]. At start a missing file is made; an empty or garbled one,
//!   or one open to group or others, is refused with an error naming the file, never replaced
//!   (a new sealing key could not open the kept client keys). The rule for every secret file is
//!   in [`crate::paths`].

use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::{
    ChaCha20Poly1305, Nonce,
    aead::{Aead as _, KeyInit as _, Payload},
};
use sha2::{Digest as _, Sha256};

use super::domain::{PublicKey, TokenId, decode_key, encode_key};
use crate::fsutil::{self, SecretFileError, SecretKind};

/// Errors of key files and sealing.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A key file could not be read or written, is open to group or others, or does not hold
    /// one base64 32-byte key.
    #[error(transparent)]
    KeyFile(#[from] SecretFileError),
    /// A sealed client key did not open (wrong key file, or the record was tampered with).
    #[error("sealed client key of {what} does not open")]
    Unseal {
        /// Which record.
        what: String,
    },
}

/// A new x25519 key pair (clamped, as `wg genkey` makes them): the private key's bytes and the
/// public key. The key arithmetic is the tunnel's ([`crate::tunnel::PrivateKey`]), one
/// implementation for both.
pub fn generate_keypair() -> ([u8; 32], PublicKey) {
    let private = *crate::tunnel::PrivateKey::generate().as_bytes();
    (private, public_of(&private))
}

/// The public key of `private`.
pub fn public_of(private: &[u8; 32]) -> PublicKey {
    PublicKey(
        *crate::tunnel::PrivateKey::from_bytes(*private)
            .public_key()
            .as_bytes(),
    )
}

const TOKEN_PREFIX: &str = "capy_";

/// A freshly made token secret: the bearer string (shown once) and the hash to store.
pub struct NewSecret {
    /// `capy_<id>_<secret>`.
    pub bearer: String,
    /// SHA-256 of the secret bytes, hex.
    pub hash: String,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret").finish_non_exhaustive()
    }
}

fn hash_hex(secret: &[u8]) -> String {
    Sha256::digest(secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random secret for token `id`.
pub fn new_token_secret(id: &TokenId) -> NewSecret {
    let secret: [u8; 32] = rand::random();
    NewSecret {
        bearer: format!(
            "{TOKEN_PREFIX}{id}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        ),
        hash: hash_hex(&secret),
    }
}

/// Splits a bearer string into the token id and the hash of its secret; `None` if it is not
/// of our shape.
pub fn parse_bearer(bearer: &str) -> Option<(TokenId, String)> {
    let rest = bearer.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id = TokenId::parse("token", id).ok()?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret)
        .ok()?;
    (secret.len() == 32).then(|| (id, hash_hex(&secret)))
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Reads the base64 32-byte key in `path`, or creates the file (mode 0600, written atomically)
/// with `make()`'s key if it does not exist. An empty, garbled or too open file is refused.
pub fn load_or_create_key(
    path: &Path,
    make: impl FnOnce() -> [u8; 32],
) -> Result<[u8; 32], SecretError> {
    Ok(fsutil::load_or_create_secret(
        path,
        SEALING_KEY,
        decode_key,
        || {
            let key = make();
            (key, format!("{}\n", encode_key(&key)))
        },
    )?)
}

/// The client-key sealing key file, as its errors describe it.
const SEALING_KEY: SecretKind = SecretKind {
    holds: "a 32-byte key in base64",
    if_removed: "a new key cannot open the client keys kept so far; they are lost",
};

/// Seals and opens kept client private keys.
#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer with the 32-byte `key`.
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(key.into()),
        }
    }

    /// `private` sealed for the record `aad`: base64 of nonce ‖ ciphertext.
    pub fn seal(&self, private: &[u8; 32], aad: &str) -> String {
        self.seal_bytes(private, aad)
    }

    /// `secret` (any length: a webhook's signing secret) sealed for the record `aad`, as
    /// [`Sealer::seal`] does.
    pub fn seal_bytes(&self, secret: &[u8], aad: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: aad.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any short message");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Opens what [`Sealer::seal_bytes`] made for the record `aad`.
    pub fn open_bytes(&self, sealed: &str, aad: &str) -> Result<Vec<u8>, SecretError> {
        let fail = || SecretError::Unseal {
            what: aad.to_owned(),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| fail())?;
        if raw.len() < 12 {
            return Err(fail());
        }
        let (nonce, ct) = raw.split_at(12);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| fail())
    }

    /// Opens what [`Sealer::seal`] made for the record `aad`.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<[u8; 32], SecretError> {
        self.open_bytes(sealed, aad)?
            .try_into()
            .map_err(|_| SecretError::Unseal {
                what: aad.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::test_support::{crash_at_first_write, mode_of};

    #[test]
    fn public_key_matches_a_known_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public = public_of(&private);
        assert_eq!(
            public.0[..4],
            [0x85, 0x20, 0xf0, 0x09],
            "RFC 7748 public key"
        );
        let (p, k) = generate_keypair();
        assert_eq!(public_of(&p), k);
    }

    #[test]
    fn bearer_round_trips_and_only_the_hash_matches() {
        let id = TokenId::random();
        let s = new_token_secret(&id);
        let (got_id, hash) = parse_bearer(&s.bearer).unwrap();
        assert_eq!(got_id, id);
        assert!(hashes_equal(&hash, &s.hash));
        assert!(!s.bearer.contains(&s.hash));
        // Another secret under the same id has another hash.
        let other = new_token_secret(&id);
        assert!(!hashes_equal(
            &parse_bearer(&other.bearer).unwrap().1,
            &s.hash
        ));
        for bad in [
            "",
            "capy_",
            "Bearer x",
            "capy_zz_abc",
            &s.bearer[..s.bearer.len() - 2],
        ] {
            assert!(parse_bearer(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sealed_keys_open_only_for_their_record() {
        let sealer = Sealer::new(&[9; 32]);
        let (private, _) = generate_keypair();
        let sealed = sealer.seal(&private, "alice/laptop");
        assert_eq!(sealer.open(&sealed, "alice/laptop").unwrap(), private);
        assert!(sealer.open(&sealed, "bob/laptop").is_err());
        assert!(Sealer::new(&[8; 32]).open(&sealed, "alice/laptop").is_err());
        assert!(!sealed.contains(&encode_key(&private)));
    }

    #[test]
    fn key_files_are_created_0600_and_reread() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let a = load_or_create_key(&path, || [5; 32]).unwrap();
        let b = load_or_create_key(&path, || [6; 32]).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            load_or_create_key(&path, || [5; 32]),
            Err(SecretError::KeyFile(SecretFileError::Garbled { .. }))
        ));
    }

    #[test]
    fn a_crash_while_writing_the_sealing_key_leaves_no_empty_file() {
        let Some(dir) = crash_at_first_write(
            "service::secrets::tests::a_crash_while_writing_the_sealing_key_leaves_no_empty_file",
            crate::paths::client_keys_key_file,
            |p| {
                let _ = load_or_create_key(p, rand::random);
            },
        ) else {
            return;
        };
        let path = crate::paths::client_keys_key_file(dir.path());
        let k = load_or_create_key(&path, || [7; 32]).unwrap();
        assert_eq!(k, [7; 32]);
        assert_eq!(load_or_create_key(&path, || [8; 32]).unwrap(), k);
        assert_eq!(mode_of(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [crate::paths::CLIENT_KEYS_KEY_FILE_NAME]);
    }

    #[test]
    fn an_empty_or_short_sealing_key_file_is_refused_naming_the_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for (contents, says) in [
            ("", "is empty"),
            ("  \n", "is empty"),
            (&encode_key(&[3; 32])[..20], "does not hold"),
            ("garbage", "does not hold"),
        ] {
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let msg = load_or_create_key(&path, || [5; 32])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&*path.to_string_lossy()),
                "{contents:?}: {msg}"
            );
            assert!(msg.contains(says), "{contents:?}: {msg}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), contents);
        }
    }

    #[test]
    fn a_sealing_key_file_others_may_access_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        load_or_create_key(&path, || [5; 32]).unwrap();
        for mode in [0o644, 0o640, 0o620, 0o604, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let msg = load_or_create_key(&path, || [6; 32])
                .map(|_| "accepted".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                msg.contains(&*path.to_string_lossy())
                    && msg.contains(&format!("{mode:04o}"))
                    && msg.contains(&format!("chmod 600 {}", path.display())),
                "{mode:o}: {msg}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_or_create_key(&path, || [6; 32]).unwrap(), [5; 32]);
    }
}
