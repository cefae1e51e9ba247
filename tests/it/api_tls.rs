//! TLS on the API's TCP listener: a test CA and a server certificate for 127.0.0.1 (made here
//! with `openssl`); a client that trusts the CA calls with its token; a plaintext client and a
//! client trusting another CA get no answer; the CLI talks TLS with --ca-cert.

use std::{path::Path, process::Command};

use capybara_agent::{
    api::{
        TlsIdentity,
        client::{Client, ClientError, Endpoint},
    },
    service::domain::Scope,
};
use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::TestApi;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` and a server certificate for 127.0.0.1 it signed, in `dir`: returns
/// (CA PEM, server certificate PEM, server key PEM).
fn ca_and_server(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key) = (format!("{name}-ca.pem"), format!("{name}-ca.key"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-days",
        "1",
        "-subj",
        "/CN=capybara-test-ca",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    a.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(&a, dir);
    let (csr, key, cert, ext) = (
        format!("{name}.csr"),
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-subj", "/CN=capybara-test", "-keyout", &key, "-out", &csr]);
    openssl(&a, dir);
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
        dir,
    );
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    (read(&ca), read(&cert), read(&key))
}

#[test]
fn tls_listener_serves_clients_that_trust_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_server(dir.path(), "agent");
    let (other, _, _) = ca_and_server(dir.path(), "other");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start_tls(TlsIdentity::from_pem(&cert, &key)));
    let token = api.token(Scope::Read);
    let https = format!("https://{}", api.tcp);

    rt.block_on(async {
        let c = Client::connect(&Endpoint::Tcp {
            url: https.clone(),
            token: Some(token.clone()),
            ca_cert: Some(ca.clone()),
        })
        .await
        .expect("TLS connect");
        c.list_users().await.expect("a call over TLS");
        assert!(c.health("").await.unwrap());

        // Trusting another CA: the handshake fails, no answer.
        let wrong = Client::connect(&Endpoint::Tcp {
            url: https.clone(),
            token: Some(token.clone()),
            ca_cert: Some(other.clone()),
        })
        .await;
        match wrong {
            Err(ClientError::Connect { .. }) => {}
            Ok(c) => assert!(
                c.list_users().await.is_err(),
                "a client that does not trust the certificate got an answer"
            ),
            Err(e) => panic!("unexpected error {e}"),
        }
        // Plaintext to a TLS listener: no answer.
        let plain = Client::connect(&Endpoint::Tcp {
            url: format!("http://{}", api.tcp),
            token: Some(token.clone()),
            ca_cert: None,
        })
        .await;
        if let Ok(c) = plain {
            assert!(c.list_users().await.is_err(), "plaintext got an answer");
        }
        // https without a CA is refused by the client itself.
        assert!(matches!(
            Client::connect(&Endpoint::Tcp {
                url: https.clone(),
                token: None,
                ca_cert: None,
            })
            .await,
            Err(ClientError::NoCa)
        ));
    });

    // The CLI over TLS.
    let bin = agent_crate_binary("capybara");
    let cert_path = dir.path().join("agent-ca.pem");
    let o = Command::new(&bin)
        .args(["--endpoint", &https, "--token", &token, "--ca-cert"])
        .arg(&cert_path)
        .args(["--json", "user", "list"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    drop(api);
}
