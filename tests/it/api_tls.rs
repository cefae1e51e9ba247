//! TLS on the API's TCP listener: a test CA and a server certificate for 127.0.0.1
//! (`capybara_tests::ca`); a client that trusts the CA calls with its token; a plaintext client and a
//! client trusting another CA get no answer; the CLI talks TLS with --ca-cert.

use std::{path::Path, process::Command};

use capybara_agent::{
    api::{
        TlsIdentity,
        client::{Client, ClientError, Endpoint},
    },
    service::domain::Scope,
};
use capybara_tests::{agent_proc::agent_crate_binary, ca::TestCa};

use crate::api_support::TestApi;

/// A CA named `name` and a server certificate for 127.0.0.1 it signed (`ca::TestCa`), in a
/// directory of `dir`: returns (CA PEM, server certificate PEM, server key PEM).
fn ca_and_server(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = dir.join(name);
    std::fs::create_dir(&dir).unwrap();
    let ca = TestCa::generate(&dir);
    let read = |f: &Path| std::fs::read(f).unwrap();
    (read(&ca.ca_pem), read(&ca.cert_pem), read(&ca.key_pem))
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
    // The CA file `ca_and_server` made for "agent".
    let cert_path = dir.path().join("agent").join("ca.pem");
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
