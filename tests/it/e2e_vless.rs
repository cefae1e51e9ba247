//! The VLESS endpoint (`capybara_agent::proxy::vless::serve`, in process) with Debian's real
//! `v2ray` client (VLESS outbound over TLS, trusting only the endpoint's generated
//! certificate, a SOCKS inbound on loopback; the JSON is in `capybara_tests::v2ray`), and
//! `curl` through it fetching a file from a local HTTP server. The endpoint's `Hub` is made of
//! the agent's test doubles (`capybara_agent::proxy::testing`): three users' UUIDs, a kernel
//! that records which sockets were bound to whom (the real binding is `dataplane`'s), and the
//! events collected.
//!
//! Everything stays on loopback with ports the kernel handed out; each test starts its own
//! endpoint and v2ray processes (≈ 0.1 s each), stopped when the test ends, even on panic.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use capybara_agent::{
    proxy::{
        AuthFailure, CloseReason, Hub, Identity, ProxyEvent, SocketRole, Target,
        registry::Registry,
        testing::{CollectedEvents, RecordingKernel, StaticUsers},
        tls::EndpointCert,
        vless,
    },
    service::domain::{Protocol, UserName},
};
use capybara_tests::v2ray::{self, V2ray};
use tokio_util::sync::CancellationToken as Cancel;

const SNI: &str = "vless.capybara.test";
const ALICE: [u8; 16] = *b"alice-vless-uuid";
const BOB: [u8; 16] = *b"bob---vless-uuid";
const CAROL: [u8; 16] = *b"carol-vless-uuid";

/// The endpoint on loopback with three users, in its own runtime.
struct Endpoint {
    addr: SocketAddr,
    cert: EndpointCert,
    binds: Arc<RecordingKernel>,
    events: Arc<CollectedEvents>,
    stop: Cancel,
    rt: tokio::runtime::Runtime,
}

impl Endpoint {
    fn start() -> Endpoint {
        let identity = |id, name| Identity {
            id,
            user: UserName::parse("user", name).unwrap(),
            protocol: Protocol::Vless,
        };
        let users = StaticUsers::vless([
            (ALICE, identity(11, "alice")),
            (BOB, identity(12, "bob")),
            (CAROL, identity(13, "carol")),
        ]);
        let binds = Arc::new(RecordingKernel::default());
        let events = Arc::new(CollectedEvents::default());
        let hub = Hub {
            credentials: Arc::new(users),
            kernel: binds.clone(),
            events: events.clone(),
            registry: Arc::new(Registry::default()),
        };
        let cert = EndpointCert::generate(&[SNI.to_owned()]).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stop = Cancel::new();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(vless::serve(
            listener,
            cert.server_config().unwrap(),
            hub,
            stop.clone(),
        ));
        Endpoint {
            addr,
            cert,
            binds,
            events,
            stop,
            rt,
        }
    }

    /// A v2ray client of this endpoint as `uuid`, trusting `pem`; its SOCKS port.
    fn client(&self, uuid: &[u8; 16], pem: &str) -> (V2ray, u16) {
        let port = v2ray::free_port();
        let v = V2ray::start(&v2ray::client_config(port, self.addr, uuid, SNI, pem), port);
        (v, port)
    }

    /// The events, once `pred` holds for them (≤ 5 s).
    fn events_when(&self, what: &str, pred: impl Fn(&[ProxyEvent]) -> bool) -> Vec<ProxyEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let e = self.events.events();
            if pred(&e) {
                return e;
            }
            assert!(Instant::now() < deadline, "no {what} in 5 s: {e:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A one-file HTTP/1.0 server on loopback serving `body` for any path; its address.
fn http_server(body: Arc<Vec<u8>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: \
                     application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
    addr
}

/// `curl` through the SOCKS port (`socks5h`: the name goes to v2ray, so to the endpoint, as a
/// domain); the body, or `None` when curl fails.
fn curl(socks_port: u16, url: &str) -> Option<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--proxy"])
        .arg(format!("socks5h://127.0.0.1:{socks_port}"))
        .arg(url)
        .output()
        .expect("run curl");
    out.status.success().then_some(out.stdout)
}

/// Random bytes (xorshift), so a misplaced chunk cannot compare equal.
fn random_body(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn auth_failures(events: &[ProxyEvent]) -> Vec<AuthFailure> {
    events
        .iter()
        .filter_map(|e| match e {
            ProxyEvent::AuthFailed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn v2ray_fetches_a_file_byte_for_byte_through_the_endpoint() {
    let ep = Endpoint::start();
    let body = Arc::new(random_body(8 << 20));
    let http = http_server(Arc::clone(&body));
    let (client, socks) = ep.client(&ALICE, ep.cert.chain_pem());

    // By address (VLESS address type IPv4) and by name (type domain, resolved by the agent).
    let by_ip = curl(socks, &format!("http://{http}/file.bin"));
    let by_name = curl(socks, &format!("http://localhost:{}/file.bin", http.port()));
    let log = client.log();
    assert!(
        by_ip.as_deref() == Some(&body[..]),
        "by IP: v2ray log: {log}"
    );
    assert!(
        by_name.as_deref() == Some(&body[..]),
        "by name: v2ray log: {log}"
    );

    let events = ep.events_when("two closed connections", |e| {
        e.iter()
            .filter(|e| matches!(e, ProxyEvent::Closed { .. }))
            .count()
            == 2
    });
    assert!(auth_failures(&events).is_empty(), "{events:?}");
    let opened: Vec<(SocketAddr, Target)> = events
        .iter()
        .filter_map(|e| match e {
            ProxyEvent::Opened {
                identity,
                source,
                target,
                ..
            } => {
                assert_eq!((identity.id, identity.user.as_str()), (11, "alice"));
                assert_eq!(identity.protocol, Protocol::Vless);
                Some((*source, target.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        opened.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        [
            Target::Addr(http),
            Target::Domain("localhost".into(), http.port())
        ]
    );
    for e in &events {
        if let ProxyEvent::Closed {
            rx_bytes,
            tx_bytes,
            reason,
            identity,
            ..
        } = e
        {
            assert_eq!(identity.id, 11);
            assert_eq!(*reason, CloseReason::Closed);
            // The response is the body and its head; the request a GET of < 200 bytes.
            assert!(
                *tx_bytes > body.len() as u64 && *tx_bytes < body.len() as u64 + 200,
                "{e:?}"
            );
            assert!(*rx_bytes > 0 && *rx_bytes < 200, "{e:?}");
        }
    }
    // Each connection: the upstream socket, then the accepted client socket (whose peer is
    // v2ray's source address of that connection), both alice's.
    let binds = ep.binds.binds_with_peers();
    assert_eq!(
        binds,
        [
            (11, SocketRole::Upstream, None),
            (11, SocketRole::Client, Some(opened[0].0)),
            (11, SocketRole::Upstream, None),
            (11, SocketRole::Client, Some(opened[1].0)),
        ]
    );
    drop(client);
}

#[test]
fn a_wrong_uuid_and_an_untrusted_certificate_are_refused_and_reported() {
    let ep = Endpoint::start();
    let http = http_server(Arc::new(b"secret".to_vec()));
    let url = format!("http://{http}/");

    let (_stranger, socks) = ep.client(b"nobody-at-all-00", ep.cert.chain_pem());
    assert_eq!(curl(socks, &url), None, "an unknown UUID was served");
    ep.events_when("an unknown credential", |e| {
        auth_failures(e) == [AuthFailure::UnknownCredential]
    });

    // The right UUID, but the client trusts another certificate: its TLS handshake fails and
    // it never sends the header.
    let other = EndpointCert::generate(&[SNI.to_owned()]).unwrap();
    let (_wary, socks) = ep.client(&BOB, other.chain_pem());
    assert_eq!(
        curl(socks, &url),
        None,
        "a client not trusting the cert got through"
    );
    let events = ep.events_when("a failed handshake", |e| auth_failures(e).len() == 2);
    assert_eq!(
        auth_failures(&events),
        [AuthFailure::UnknownCredential, AuthFailure::Malformed]
    );
    assert!(
        events.iter().all(|e| matches!(
            e,
            ProxyEvent::AuthFailed {
                protocol: Protocol::Vless,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(ep.binds.binds().is_empty(), "a refused socket was bound");

    // The same endpoint serves carol, who trusts it.
    let (_carol, socks) = ep.client(&CAROL, ep.cert.chain_pem());
    assert_eq!(curl(socks, &url).as_deref(), Some(&b"secret"[..]));
}

#[test]
fn garbage_and_truncated_headers_over_tls_leave_the_endpoint_serving() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::{self, pki_types::ServerName};

    let ep = Endpoint::start();
    let http = http_server(Arc::new(b"still here".to_vec()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ep.cert.leaf_der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    let mut header = vec![0];
    header.extend_from_slice(&ALICE);
    header.extend_from_slice(&[0, 1]);
    header.extend_from_slice(&http.port().to_be_bytes());
    header.push(1);
    header.extend_from_slice(&[127, 0, 0, 1]);
    let mut sends: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01garbage that is no VLESS at all".to_vec(),
        vec![0xff; 4096],
        vec![0; 600],
    ];
    // Every truncation of a valid header, each closed after it.
    sends.extend((1..header.len()).map(|n| header[..n].to_vec()));
    let n = sends.len();
    ep.rt.block_on(async {
        for bytes in &sends {
            let tcp = tokio::net::TcpStream::connect(ep.addr).await.unwrap();
            let mut tls = connector
                .connect(ServerName::try_from(SNI).unwrap(), tcp)
                .await
                .unwrap();
            let _ = tls.write_all(bytes).await;
            let _ = tls.shutdown().await;
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "answered {rest:?} to {bytes:?}");
        }
        // Raw bytes that are not TLS.
        let mut raw = tokio::net::TcpStream::connect(ep.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest).await;
    });
    let events = ep.events_when("every refusal", |e| auth_failures(e).len() == n + 1);
    assert!(
        auth_failures(&events)
            .iter()
            .all(|r| *r == AuthFailure::Malformed),
        "{events:?}"
    );
    assert!(ep.binds.binds().is_empty());

    let (_client, socks) = ep.client(&ALICE, ep.cert.chain_pem());
    assert_eq!(
        curl(socks, &format!("http://{http}/")).as_deref(),
        Some(&b"still here"[..])
    );
}
