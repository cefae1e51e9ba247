//! WireGuard keys: x25519 private/public keys and preshared keys, their base64 form (what `wg`
//! and wg-quick configs use), generation, and the server key file.
//!
//! The server key file holds the key in base64 and a newline (what `wg genkey` prints), mode
//! 0600. It is written atomically and durably by [`crate::fsutil::write_secret`] and read by
//! [`crate::fsutil::load_or_create_secret`]: a missing file is generated; an empty or garbled
//! one, or one open to group or others, is refused with an error naming the file (never
//! replaced: a new key changes the server's public key and so every client config). The rule for
//! every secret file is in [`crate::paths`].

use std::{fmt, path::Path, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use boringtun::x25519;

use crate::fsutil::{self, SecretFileError, SecretKind};

/// Length of every WireGuard key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a key could not be parsed, generated or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not the base64 of exactly 32 bytes.
    #[error("{field}: not a WireGuard key (base64 of 32 bytes, 44 characters)")]
    Malformed {
        /// Which field held the text (e.g. `public_key`).
        field: &'static str,
    },
    /// The key file could not be read or written, is open to group or others, or does not hold
    /// a key.
    #[error(transparent)]
    File(#[from] SecretFileError),
}

fn decode32(field: &'static str, s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| KeyError::Malformed { field })?;
    bytes.try_into().map_err(|_| KeyError::Malformed { field })
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// The key's 32 bytes.
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }

            /// The key from its 32 bytes.
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                $name(bytes)
            }

            /// Standard base64 (44 characters), as `wg` prints it.
            pub fn to_base64(&self) -> String {
                STANDARD.encode(self.0)
            }

            /// Lower-case hex, as the UAPI protocol writes keys.
            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }

            /// Parses the base64 form; the error names `field`.
            pub fn parse_field(field: &'static str, s: &str) -> Result<Self, KeyError> {
                decode32(field, s).map($name)
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                Self::parse_field($field, s)
            }
        }
    };
}

key_type!(
    /// A peer's (or the server's) x25519 public key.
    PublicKey,
    "public_key"
);
key_type!(
    /// An x25519 private key. Its `Debug` and `Display` never show the key.
    PrivateKey,
    "private_key"
);
key_type!(
    /// A symmetric preshared key (the optional post-quantum layer of WireGuard). Never shown by
    /// `Debug`.
    PresharedKey,
    "preshared_key"
);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(hidden)")
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(hidden)")
    }
}

/// 32 bytes from the operating system's CSPRNG.
fn random32() -> [u8; KEY_LEN] {
    rand::random()
}

impl PrivateKey {
    /// A new random private key, clamped as x25519 requires (what `wg genkey` prints).
    pub fn generate() -> Self {
        PrivateKey(x25519::StaticSecret::from(random32()).to_bytes())
    }

    /// The matching public key (`wg pubkey`).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.secret()).to_bytes())
    }

    /// The key as boringtun takes it.
    pub(crate) fn secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }

    /// Loads the key stored at `path`, or generates one and stores it there (see the module
    /// docs: a missing file is generated, an empty, garbled or too open one is refused).
    pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
        Ok(fsutil::load_or_create_secret(
            path,
            SERVER_KEY,
            |text| decode32("private_key", text).ok().map(PrivateKey),
            || {
                let key = PrivateKey::generate();
                (key, format!("{}\n", key.to_base64()))
            },
        )?)
    }
}

/// The server key file, as its errors describe it.
const SERVER_KEY: SecretKind = SecretKind {
    holds: "a WireGuard private key (base64 of 32 bytes, as `wg genkey` prints it)",
    if_removed: "a new key changes the server's public key: every client config must be \
                 issued again",
};

impl PresharedKey {
    /// A new random preshared key (`wg genpsk`).
    pub fn generate() -> Self {
        PresharedKey(random32())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::{
        fsutil::test_support::{crash_at_first_write, mode_of},
        paths,
    };

    #[test]
    fn base64_round_trips_and_bad_input_names_the_field() {
        let k = PrivateKey::generate();
        let p = k.public_key();
        assert_eq!(p.to_base64().len(), 44);
        assert_eq!(p.to_base64().parse::<PublicKey>().unwrap(), p);
        assert_eq!(
            PrivateKey::parse_field("private_key", &k.to_base64())
                .unwrap()
                .public_key(),
            p
        );
        let err = "abc".parse::<PublicKey>().unwrap_err();
        assert!(err.to_string().starts_with("public_key:"), "{err}");
        // 33 bytes of base64 is not a key either.
        let long = STANDARD.encode([1u8; 33]);
        assert!(matches!(
            PresharedKey::parse_field("preshared_key", &long),
            Err(KeyError::Malformed {
                field: "preshared_key"
            })
        ));
        assert_eq!(format!("{k:?}"), "PrivateKey(hidden)");
    }

    #[test]
    fn known_vector_matches_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let k: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            k.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        assert_eq!(k.public_key().to_hex().len(), 64);
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let k = PrivateKey::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(PrivateKey::load_or_generate(&path).unwrap(), k);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            PrivateKey::load_or_generate(&path),
            Err(KeyError::File(SecretFileError::InsecureMode {
                mode: 0o644,
                ..
            }))
        ));
    }

    /// Mode bits of `path`.

    #[test]
    fn a_crash_while_writing_the_key_leaves_no_empty_key_file() {
        let Some(dir) = crash_at_first_write(
            "tunnel::keys::tests::a_crash_while_writing_the_key_leaves_no_empty_key_file",
            paths::key_file,
            |p| {
                let _ = PrivateKey::load_or_generate(p);
            },
        ) else {
            return;
        };
        let path = paths::key_file(dir.path());
        // The next start makes the key and leaves nothing else behind.
        let k = PrivateKey::load_or_generate(&path).unwrap();
        assert_eq!(PrivateKey::load_or_generate(&path).unwrap(), k);
        assert_eq!(mode_of(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [paths::KEY_FILE_NAME]);
    }

    #[test]
    fn an_empty_short_or_garbled_key_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = paths::key_file(dir.path());
        for (contents, says) in [
            ("", "is empty"),
            ("\n", "is empty"),
            ("yAnz5TF+lXXJte14tji3zl", "does not hold"),
            (&*STANDARD.encode([1u8; 16]), "does not hold"),
            ("not base64 at all\n", "does not hold"),
        ] {
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = PrivateKey::load_or_generate(&path).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&*path.to_string_lossy()),
                "{contents:?}: {msg}"
            );
            assert!(msg.contains(says), "{contents:?}: {msg}");
            // Refused, not replaced by a new key.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), contents);
        }
    }

    #[test]
    fn a_key_file_others_may_access_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = paths::key_file(dir.path());
        let k = PrivateKey::load_or_generate(&path).unwrap();
        for mode in [0o644, 0o640, 0o620, 0o604, 0o602, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let msg = PrivateKey::load_or_generate(&path).unwrap_err().to_string();
            assert!(
                msg.contains(&*path.to_string_lossy())
                    && msg.contains(&format!("{mode:04o}"))
                    && msg.contains(&format!("chmod 600 {}", path.display())),
                "{mode:o}: {msg}"
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(PrivateKey::load_or_generate(&path).unwrap(), k, "{mode:o}");
        }
    }
}
