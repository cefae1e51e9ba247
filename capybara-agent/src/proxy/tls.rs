//! The VLESS endpoint's TLS certificate and its `rustls` server configuration.
//!
//! Where the certificate comes from ([`CertSource`]):
//! - **files** the operator gives (`--vless-cert`, `--vless-key`): a PEM chain, leaf first, and
//!   its private key (PKCS#8, SEC1 or PKCS#1 PEM). A CA-issued certificate for the public host
//!   name: clients verify it as any TLS client does.
//! - **generated**: a self-signed certificate (ECDSA P-256 with SHA-256, made by `rcgen`; the
//!   subject alternative names are the configured SNI / public host names, IP addresses as IP
//!   SANs) made once and kept in the data directory ([`paths::vless_cert_file`],
//!   [`paths::vless_key_file`], both written by [`fsutil::write_secret`], mode 0600), so it is
//!   the same across restarts and the client configurations that trust it keep working. Rule at
//!   start: both files present → used as they are (a changed SNI does not re-make it: remove
//!   both files to have a new one made, which invalidates every client config); both missing,
//!   or the key missing (a crash between the two writes: the certificate is written first) →
//!   made and written; the certificate missing beside a key → refused, naming the file; an
//!   unparseable file → refused, naming it.
//!
//! How a client trusts a generated certificate: the configuration the agent prints carries its
//! PEM or its fingerprint.
//! - Debian's v2ray (4.34) has no certificate pinning option (`pinnedPeerCertificateChainSha256`
//!   came in a later v2ray; its 4.34 binary has no such field, checked with `strings`): its
//!   client trusts the certificate as its only root, `"tlsSettings": {"serverName": SNI,
//!   "disableSystemRoot": true, "certificates": [{"usage": "verify", "certificate": [PEM
//!   lines]}]}` ([`EndpointCert::chain_pem`]). Go accepts a leaf found in its root pool as a
//!   chain of its own, and still checks the name.
//! - Newer v2ray and Xray pin it: `pinnedPeerCertificateChainSha256` ([`EndpointCert::pin_base64`],
//!   v2ray's `GenerateCertChainHash` of the chain the server sends: for a one-certificate chain
//!   the base64 SHA-256 of the leaf's DER, [`EndpointCert::fingerprint_sha256`]).
//!
//! The server configuration ([`EndpointCert::server_config`]) offers TLS 1.3 and 1.2 (ring's
//! suites, rustls's defaults) and the ALPN v2ray and Xray clients send by default, `h2` then
//! `http/1.1` (VLESS runs over whichever is chosen; a client offering neither is served
//! without ALPN, one offering only others is refused by rustls).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio_rustls::rustls::{
    self, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

use crate::{
    fsutil::{self, SecretFileError},
    paths,
};

/// The ALPN protocols the endpoint accepts, in its order of preference: what v2ray's and
/// Xray's TLS clients send when none is configured.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where the endpoint's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files given by the operator: a chain (leaf first) and its private key.
    Files {
        /// The certificate chain (`--vless-cert`).
        cert: PathBuf,
        /// The private key (`--vless-key`).
        key: PathBuf,
    },
    /// A self-signed certificate for `names`, made once and kept in `data_dir`.
    Generated {
        /// The agent's data directory.
        data_dir: PathBuf,
        /// The SNI / public host names (IP addresses become IP SANs); at least one.
        names: Vec<String>,
    },
}

/// Why the endpoint's certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read.
    #[error("VLESS certificate {}: cannot read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it must (no PEM certificate, no PEM private key).
    #[error("{} does not hold {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What it must hold, e.g. `a PEM certificate`.
        what: &'static str,
        /// What the PEM reader found wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The generated key file (a secret file) could not be read or written.
    #[error(transparent)]
    Secret(#[from] SecretFileError),
    /// The generated certificate is missing beside its key.
    #[error(
        "VLESS certificate {} is missing beside its key {}; restore it from a backup, or remove \
         the key to have a new certificate made (every client configuration must then be \
         handed out again)",
        cert.display(),
        key.display()
    )]
    CertMissing {
        /// The missing certificate file.
        cert: PathBuf,
        /// The key file that is there.
        key: PathBuf,
    },
    /// No name to make a certificate for.
    #[error("vless: a generated certificate needs at least one SNI / host name")]
    NoName,
    /// rcgen could not make the certificate (e.g. a name that is not a DNS name).
    #[error("vless: cannot make a certificate for {names:?}")]
    Generate {
        /// The names asked for.
        names: Vec<String>,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the certificate and key (e.g. a key that is not the certificate's).
    #[error("vless: the certificate and key are not usable by TLS")]
    Rustls(#[source] rustls::Error),
}

/// The endpoint's certificate chain and key.
pub struct EndpointCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    chain_pem: String,
}

impl std::fmt::Debug for EndpointCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointCert")
            .field("certificates", &self.chain.len())
            .field("fingerprint_sha256", &self.fingerprint_hex())
            .finish_non_exhaustive()
    }
}

impl EndpointCert {
    /// Loads the certificate from `source` (making and storing it for
    /// [`CertSource::Generated`] when needed; see the module docs for the rule).
    pub fn load(source: &CertSource) -> Result<EndpointCert, TlsError> {
        match source {
            CertSource::Files { cert, key } => {
                let cert_pem = read(cert)?;
                let key_pem = read(key)?;
                EndpointCert::from_pem(cert, &cert_pem, key, &key_pem)
            }
            CertSource::Generated { data_dir, names } => load_or_generate(data_dir, names),
        }
    }

    /// A new self-signed certificate for `names`, in memory only (tests, benchmarks).
    pub fn generate(names: &[String]) -> Result<EndpointCert, TlsError> {
        if names.is_empty() {
            return Err(TlsError::NoName);
        }
        let made = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|source| {
            TlsError::Generate {
                names: names.to_vec(),
                source,
            }
        })?;
        Ok(EndpointCert {
            chain: vec![made.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into()),
            chain_pem: made.cert.pem(),
        })
    }

    /// Parses a PEM chain and key (the paths only name them in errors).
    fn from_pem(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<EndpointCert, TlsError> {
        let pem_err = |path: &Path, what| {
            let path = path.to_owned();
            move |source| TlsError::Pem { path, what, source }
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(cert_path, "a PEM certificate chain"))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert_path.to_owned(),
                what: "a PEM certificate chain",
                source: rustls::pki_types::pem::Error::NoItemsFound,
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(pem_err(key_path, "a PEM private key"))?;
        let chain_pem = chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect::<String>();
        Ok(EndpointCert {
            chain,
            key,
            chain_pem,
        })
    }

    /// The SHA-256 of the leaf certificate's DER.
    pub fn fingerprint_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.chain[0]).into()
    }

    /// [`Self::fingerprint_sha256`] in lower-case hex (for people and logs).
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint_sha256()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The value of v2ray's and Xray's `pinnedPeerCertificateChainSha256` for the chain this
    /// endpoint sends: standard base64 of v2ray's `GenerateCertChainHash` (the leaf's SHA-256,
    /// then for each further certificate `SHA-256(hash ‖ SHA-256(cert))`). For a generated
    /// (one-certificate) chain, the base64 of [`Self::fingerprint_sha256`].
    pub fn pin_base64(&self) -> String {
        let mut hash: [u8; 32] = Sha256::digest(&self.chain[0]).into();
        for cert in &self.chain[1..] {
            let mut h = Sha256::new();
            h.update(hash);
            h.update(Sha256::digest(cert));
            hash = h.finalize().into();
        }
        base64::engine::general_purpose::STANDARD.encode(hash)
    }

    /// The chain as PEM (what a v2ray 4.34 client lists under `certificates` with
    /// `usage: "verify"`).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The leaf certificate's DER.
    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The TLS server configuration: TLS 1.3 and 1.2, ring's cipher suites, ALPN [`ALPN`].
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::Rustls)?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Reads a certificate or key file the operator gave.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The generated certificate in `data_dir`, made and written if it is not there.
fn load_or_generate(data_dir: &Path, names: &[String]) -> Result<EndpointCert, TlsError> {
    let cert_path = paths::vless_cert_file(data_dir);
    let key_path = paths::vless_key_file(data_dir);
    match fsutil::read_secret(&key_path)? {
        Some(key_pem) => match std::fs::read(&cert_path) {
            Ok(cert_pem) => EndpointCert::from_pem(&cert_path, &cert_pem, &key_path, &key_pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TlsError::CertMissing {
                cert: cert_path,
                key: key_path,
            }),
            Err(source) => Err(TlsError::Read {
                path: cert_path,
                source,
            }),
        },
        None => {
            let made = EndpointCert::generate(names)?;
            let key_pem = pem_block("PRIVATE KEY", made.key.secret_der());
            // The certificate first: a crash before the key is written leaves no key, and the
            // next start makes both again.
            fsutil::write_secret(&cert_path, made.chain_pem.as_bytes())?;
            fsutil::write_secret(&key_path, key_pem.as_bytes())?;
            tracing::info!(
                cert = %cert_path.display(),
                fingerprint_sha256 = %made.fingerprint_hex(),
                ?names,
                "vless: made a self-signed certificate"
            );
            Ok(made)
        }
    }
}

/// `der` as a PEM block labelled `label` (64-character lines).
fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::test_support::mode_of;

    fn names() -> Vec<String> {
        vec!["vless.example.test".into(), "127.0.0.1".into()]
    }

    #[test]
    fn a_generated_certificate_is_kept_and_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource::Generated {
            data_dir: dir.path().to_owned(),
            names: names(),
        };
        let first = EndpointCert::load(&source).unwrap();
        assert_eq!(mode_of(&paths::vless_key_file(dir.path())), 0o600);
        assert_eq!(mode_of(&paths::vless_cert_file(dir.path())), 0o600);
        let again = EndpointCert::load(&source).unwrap();
        assert_eq!(first.fingerprint_sha256(), again.fingerprint_sha256());
        assert_eq!(first.chain_pem(), again.chain_pem());
        assert_eq!(
            first.fingerprint_sha256(),
            <[u8; 32]>::from(Sha256::digest(first.leaf_der()))
        );
        // One certificate: the pin is the leaf's fingerprint in base64.
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(first.pin_base64())
                .unwrap(),
            first.fingerprint_sha256()
        );
        again.server_config().unwrap();
        // The stored files are what an operator could give as --vless-cert/--vless-key.
        let files = EndpointCert::load(&CertSource::Files {
            cert: paths::vless_cert_file(dir.path()),
            key: paths::vless_key_file(dir.path()),
        })
        .unwrap();
        assert_eq!(files.fingerprint_sha256(), first.fingerprint_sha256());
        let config = files.server_config().unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn a_missing_key_makes_a_new_pair_and_a_missing_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource::Generated {
            data_dir: dir.path().to_owned(),
            names: names(),
        };
        let first = EndpointCert::load(&source).unwrap();
        std::fs::remove_file(paths::vless_key_file(dir.path())).unwrap();
        let second = EndpointCert::load(&source).unwrap();
        assert_ne!(first.fingerprint_sha256(), second.fingerprint_sha256());
        std::fs::remove_file(paths::vless_cert_file(dir.path())).unwrap();
        let e = EndpointCert::load(&source).unwrap_err();
        assert!(matches!(e, TlsError::CertMissing { .. }), "{e}");
        assert!(e.to_string().contains("vless.crt"), "{e}");
        // Nothing was replaced.
        assert!(!paths::vless_cert_file(dir.path()).exists());
        assert!(paths::vless_key_file(dir.path()).exists());
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        let made = EndpointCert::generate(&names()).unwrap();
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, pem_block("PRIVATE KEY", made.key.secret_der())).unwrap();
        let files = CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let e = EndpointCert::load(&files).unwrap_err();
        assert!(e.to_string().contains("c.pem"), "{e}");
        std::fs::write(&cert, made.chain_pem()).unwrap();
        std::fs::write(&key, "garbage").unwrap();
        let e = EndpointCert::load(&files).unwrap_err();
        assert!(e.to_string().contains("k.pem"), "{e}");
        // A key that is not the certificate's.
        let other = EndpointCert::generate(&names()).unwrap();
        std::fs::write(&key, pem_block("PRIVATE KEY", other.key.secret_der())).unwrap();
        let loaded = EndpointCert::load(&files).unwrap();
        assert!(matches!(
            loaded.server_config().unwrap_err(),
            TlsError::Rustls(_)
        ));
        let e = EndpointCert::load(&CertSource::Files {
            cert: dir.path().join("absent.pem"),
            key,
        })
        .unwrap_err();
        assert!(e.to_string().contains("absent.pem"), "{e}");
        assert!(matches!(
            EndpointCert::generate(&[]).unwrap_err(),
            TlsError::NoName
        ));
    }

    #[test]
    fn the_chain_pin_follows_v2rays_chain_hash() {
        let a = EndpointCert::generate(&names()).unwrap();
        let b = EndpointCert::generate(&names()).unwrap();
        let chain = EndpointCert {
            chain: vec![a.chain[0].clone(), b.chain[0].clone()],
            key: a.key.clone_key(),
            chain_pem: String::new(),
        };
        let mut h = Sha256::new();
        h.update(a.fingerprint_sha256());
        h.update(b.fingerprint_sha256());
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(
            chain.pin_base64(),
            base64::engine::general_purpose::STANDARD.encode(want)
        );
    }
}
