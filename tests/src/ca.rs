//! A throw-away certificate authority for tests, made with the `openssl` command line in a
//! test's temp dir: the SMTP sink's server certificate (`smtp_sink`), etcd's member and client
//! certificates (`cluster`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A throw-away CA (one day) and the server certificate it issued for `127.0.0.1`.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate (PEM): what the client trusts.
    pub ca_pem: PathBuf,
    /// The server's certificate (PEM, for `127.0.0.1` and `localhost`).
    pub cert_pem: PathBuf,
    /// The server's key (PEM).
    pub key_pem: PathBuf,
    /// Where the CA's files are.
    dir: PathBuf,
}

/// A new P-256 key with the request (`openssl req …`), unencrypted.
const NEW_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// A new CA (valid one day) and a server certificate for `127.0.0.1` signed by it, in
    /// `dir`.
    pub fn generate(dir: &Path) -> TestCa {
        let mut ca = vec!["req", "-x509"];
        ca.extend(NEW_EC_KEY);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=capybara test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(dir, &ca);
        let mut made = TestCa {
            ca_pem: dir.join("ca.pem"),
            cert_pem: PathBuf::new(),
            key_pem: PathBuf::new(),
            dir: dir.to_owned(),
        };
        (made.cert_pem, made.key_pem) =
            made.issue("leaf", "IP:127.0.0.1,DNS:localhost", "serverAuth");
        made
    }

    /// A certificate signed by the CA, named `name` (its files `<name>.pem`, `<name>.key`),
    /// for `sans` (`IP:10.1.0.1,DNS:x`; none for a client) and `usage` (`serverAuth`,
    /// `clientAuth` or both, comma-separated). Returns the certificate's and the key's paths.
    pub fn issue(&self, name: &str, sans: &str, usage: &str) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        let mut ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage={usage}\n"
        );
        if !sans.is_empty() {
            ext.push_str(&format!("subjectAltName={sans}\n"));
        }
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subject = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend(NEW_EC_KEY);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        (dir.join(pem), dir.join(key))
    }
}
