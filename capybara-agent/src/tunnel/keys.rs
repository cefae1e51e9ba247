//! WireGuard keys: x25519 private/public keys and preshared keys, their base64 form (what `wg`
//! and wg-quick configs use), generation, and the server key file (mode 0600, see `paths`).

use std::{
    fmt,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use boringtun::x25519;

use crate::paths;

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
    /// Reading or writing a key file failed.
    #[error("key file {}", path.display())]
    File {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file has a mode that lets others than its owner read it.
    #[error("key file {} has mode {mode:o}; it must be 0600", path.display())]
    InsecureMode {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
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

    /// Loads the key stored at `path`, or generates one and stores it there with mode
    /// [`paths::KEY_FILE_MODE`] (created exclusively, never world-readable even for a moment).
    /// An existing file must have that mode.
    pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
        let file_err = |source| KeyError::File {
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(file_err)?
                    .permissions()
                    .mode()
                    & 0o777;
                if mode & !paths::KEY_FILE_MODE != 0 {
                    return Err(KeyError::InsecureMode {
                        path: path.to_owned(),
                        mode,
                    });
                }
                PrivateKey::parse_field("private_key", &text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(paths::KEY_FILE_MODE)
                    .open(path)
                    .map_err(file_err)?;
                f.write_all(format!("{}\n", key.to_base64()).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(file_err)?;
                Ok(key)
            }
            Err(e) => Err(file_err(e)),
        }
    }
}

impl PresharedKey {
    /// A new random preshared key (`wg genpsk`).
    pub fn generate() -> Self {
        PresharedKey(random32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(KeyError::InsecureMode { mode: 0o644, .. })
        ));
    }
}
