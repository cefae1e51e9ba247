//! [`serve`] on loopback with a rustls client speaking VLESS by hand (the real v2ray client is
//! `tests/it/e2e_vless.rs`).

use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;

use tokio_rustls::{
    TlsConnector,
    client::TlsStream as ClientTls,
    rustls::{ClientConfig, RootCertStore, pki_types::ServerName},
};

use super::*;
use crate::{
    proxy::{
        CloseReason, Identity, SocketRole,
        registry::Registry,
        testing::{CollectedEvents, RecordingKernel, StaticUsers},
        tls::EndpointCert,
    },
    service::domain::UserName,
};

const ALICE: [u8; 16] = [0xa1; 16];
const BOB: [u8; 16] = [0xb0; 16];

struct Rig {
    addr: SocketAddr,
    client: TlsConnector,
    users: Arc<StaticUsers>,
    binds: Arc<RecordingKernel>,
    events: Arc<CollectedEvents>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

async fn rig() -> Rig {
    let identity = |id, name| Identity {
        id,
        user: UserName::parse("user", name).unwrap(),
        protocol: Protocol::Vless,
    };
    let users = StaticUsers::vless([(ALICE, identity(5, "alice")), (BOB, identity(6, "bob"))]);
    users.held.lock().unwrap().insert(6);
    let users = Arc::new(users);
    let binds = Arc::new(RecordingKernel::default());
    let events = Arc::new(CollectedEvents::default());
    let registry = Arc::new(Registry::default());
    let hub = Hub {
        credentials: users.clone(),
        kernel: binds.clone(),
        events: events.clone(),
        registry: registry.clone(),
    };
    let cert = EndpointCert::generate(&["vless.test".into()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        cert.server_config().unwrap(),
        hub,
        shutdown.clone(),
    ));
    let mut roots = RootCertStore::empty();
    roots.add(cert.leaf_der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Rig {
        addr,
        client: TlsConnector::from(Arc::new(config)),
        users,
        binds,
        events,
        registry,
        shutdown,
    }
}

impl Rig {
    async fn connect(&self) -> ClientTls<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        self.client
            .connect(ServerName::try_from("vless.test").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Waits until `n` events are in.
    async fn events(&self, n: usize) -> Vec<ProxyEvent> {
        for _ in 0..500 {
            let e = self.events.events();
            if e.len() >= n {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} events: {:?}", self.events.events());
    }
}

fn request(uuid: [u8; 16], target: SocketAddr) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&uuid);
    v.extend_from_slice(&[0, 1]);
    v.extend_from_slice(&target.port().to_be_bytes());
    match target {
        SocketAddr::V4(a) => {
            v.push(1);
            v.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            v.push(3);
            v.extend_from_slice(&a.ip().octets());
        }
    }
    v
}

/// An upstream that answers each connection's bytes upper-cased, then closes when it does.
async fn upper_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            buf[..n].make_ascii_uppercase();
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn auth_failures(events: &[ProxyEvent]) -> Vec<AuthFailure> {
    events
        .iter()
        .filter_map(|e| match e {
            ProxyEvent::AuthFailed {
                reason, protocol, ..
            } => {
                assert_eq!(*protocol, Protocol::Vless);
                Some(*reason)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_users_connection_is_relayed_bound_and_reported_with_its_payload() {
    let rig = rig().await;
    let up = upper_server().await;
    let mut c = rig.connect().await;
    // The header and the first payload in one write, as v2ray sends them.
    let mut first = request(ALICE, up);
    first.extend_from_slice(b"hello ");
    c.write_all(&first).await.unwrap();
    c.write_all(b"world").await.unwrap();
    let mut got = [0u8; 2 + 11];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..2], &[0, 0], "response header");
    assert_eq!(&got[2..], b"HELLO WORLD");
    assert_eq!(rig.registry.open_count(5), 1);
    assert_eq!(
        *rig.binds.binds(),
        [(5, SocketRole::Upstream), (5, SocketRole::Client)]
    );
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    let events = rig.events(2).await;
    match &events[..] {
        [
            ProxyEvent::Opened {
                identity, target, ..
            },
            ProxyEvent::Closed {
                rx_bytes,
                tx_bytes,
                reason,
                ..
            },
        ] => {
            assert_eq!(identity.user.as_str(), "alice");
            assert_eq!(*target, Target::Addr(up));
            assert_eq!((*rx_bytes, *tx_bytes), (11, 11));
            assert_eq!(*reason, CloseReason::Closed);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.registry.open_count(5), 0);
}

#[tokio::test]
async fn unknown_held_garbage_and_unserved_are_refused_and_the_endpoint_keeps_serving() {
    let rig = rig().await;
    let up = upper_server().await;
    let refused = |bytes: Vec<u8>| {
        let rig = &rig;
        async move {
            let mut c = rig.connect().await;
            c.write_all(&bytes).await.unwrap();
            // The client's end (a truncated header is refused when it ends, not at the
            // timeout); the endpoint may have closed already.
            let _ = c.shutdown().await;
            let mut rest = Vec::new();
            // Closed without a response header.
            let _ = c.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "{rest:?}");
        }
    };
    refused(request([0x77; 16], up)).await; // unknown UUID
    refused(request(BOB, up)).await; // held
    refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await; // garbage
    refused(request(ALICE, up)[..10].to_vec()).await; // truncated, then closed
    let mut mux = vec![0];
    mux.extend_from_slice(&ALICE);
    mux.extend_from_slice(&[0, 3]);
    refused(mux).await; // mux.cool: not served
    let mut flow = vec![0];
    flow.extend_from_slice(&ALICE);
    flow.extend_from_slice(&[
        6, 0x0a, 4, b'x', b't', b'l', b's', 1, 0, 80, 1, 127, 0, 0, 1,
    ]);
    refused(flow).await; // an XTLS flow: not served
    // Not TLS at all.
    let mut raw = TcpStream::connect(rig.addr).await.unwrap();
    raw.write_all(&[0u8; 600]).await.unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest).await;
    let events = rig.events(7).await;
    assert_eq!(
        auth_failures(&events),
        [
            AuthFailure::UnknownCredential,
            AuthFailure::Held,
            AuthFailure::Malformed,
            AuthFailure::Malformed,
            AuthFailure::Malformed,
            AuthFailure::Malformed,
            AuthFailure::Malformed,
        ]
    );
    assert!(rig.binds.binds().is_empty(), "nothing was bound");
    // Still serving; bob once released is served.
    rig.users.held.lock().unwrap().clear();
    let mut c = rig.connect().await;
    let mut first = request(BOB, up);
    first.extend_from_slice(b"ok");
    c.write_all(&first).await.unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"\0\0OK");
}

/// `payload` framed as VLESS's UDP stream carries it: a 2-byte big-endian length first.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn udp_datagrams_are_relayed_framed_both_ways_through_a_bound_socket() {
    let rig = rig().await;
    let up = crate::proxy::testing::upper_udp_server().await;
    let mut c = rig.connect().await;
    // The header, one datagram and the first half of a second in one write (as a stream may
    // cut them anywhere), then the rest of it.
    let mut first = request(ALICE, up);
    first[18] = 2;
    first.extend_from_slice(&framed(b"one"));
    let second = framed(&[b'x'; 3000]);
    first.extend_from_slice(&second[..1000]);
    c.write_all(&first).await.unwrap();
    c.write_all(&second[1000..]).await.unwrap();
    let mut got = vec![0u8; 2 + (2 + 3) + (2 + 3000)];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..2], &[0, 0], "response header");
    assert_eq!(&got[2..7], &framed(b"ONE")[..]);
    assert_eq!(&got[7..], &framed(&[b'X'; 3000])[..]);
    // Each datagram is one, an empty one too (echoed as an empty one).
    c.write_all(&framed(b"")).await.unwrap();
    c.write_all(&framed(b"ok")).await.unwrap();
    let mut got = [0u8; 2 + 2 + 2];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [0, 0, 0, 2, b'O', b'K']);
    assert_eq!(
        *rig.binds.binds(),
        [(5, SocketRole::Upstream), (5, SocketRole::Client)]
    );
    c.shutdown().await.unwrap();
    let events = rig.events(2).await;
    match &events[..] {
        [
            ProxyEvent::Opened { target, .. },
            ProxyEvent::Closed {
                rx_bytes,
                tx_bytes,
                reason,
                ..
            },
        ] => {
            assert_eq!(*target, Target::Addr(up));
            // Payload only.
            assert_eq!((*rx_bytes, *tx_bytes), (3005, 3005));
            assert_eq!(*reason, CloseReason::Closed);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn kick_and_shutdown_cut_open_connections_and_an_unreachable_target_is_reported() {
    let rig = rig().await;
    let up = upper_server().await;
    let mut a = rig.connect().await;
    let mut first = request(ALICE, up);
    first.extend_from_slice(b"a");
    a.write_all(&first).await.unwrap();
    let mut got = [0u8; 3];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(
        rig.registry.cut(5, crate::proxy::registry::CutCause::Kick),
        1
    );
    let mut rest = Vec::new();
    let _ = a.read_to_end(&mut rest).await;
    let events = rig.events(2).await;
    assert!(matches!(
        events[1],
        ProxyEvent::Closed {
            reason: CloseReason::Cut,
            rx_bytes: 1,
            tx_bytes: 1,
            ..
        }
    ));

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let mut u = rig.connect().await;
    u.write_all(&request(ALICE, nowhere)).await.unwrap();
    let mut rest = Vec::new();
    let _ = u.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    let events = rig.events(4).await;
    assert!(matches!(
        events[3],
        ProxyEvent::Closed {
            reason: CloseReason::Unreachable,
            ..
        }
    ));

    let mut b = rig.connect().await;
    b.write_all(&request(ALICE, up)).await.unwrap();
    let mut got = [0u8; 2];
    b.read_exact(&mut got).await.unwrap();
    rig.shutdown.cancel();
    let mut rest = Vec::new();
    let _ = b.read_to_end(&mut rest).await;
    let events = rig.events(6).await;
    assert!(matches!(
        events[5],
        ProxyEvent::Closed {
            reason: CloseReason::Cut,
            ..
        }
    ));
    // The listener is closed.
    for _ in 0..100 {
        if TcpStream::connect(rig.addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still accepting after shutdown");
}
