//! The Shadowsocks endpoint against a real client: Debian's `ss-local` (shadowsocks-libev
//! 3.3.5) on loopback, configured with one user's password, fetches a file from a local server
//! through the endpoint (`capybara_agent::proxy::shadowsocks::serve` in this process, with a
//! hub of three users whose kernel records binds and whose events are collected), byte for
//! byte, for every cipher both speak (`aes-128-gcm`, `aes-256-gcm`, `chacha20-ietf-poly1305`;
//! ss-local 3.3.5 has no 2022-edition cipher, whose framing the agent's unit tests cover with
//! shadowsocks-rust's client). A wrong password is refused and reported. Loopback only: no
//! namespaces needed (the real kernel binding is tested where the dataplane wires it).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use capybara_agent::{
    proxy::{
        AuthFailure, CloseReason, Hub, Identity, ProxyEvent, ShadowsocksKey, SocketRole, Target,
        registry::Registry,
        shadowsocks::{Cipher, Config, serve},
    },
    service::domain::{Protocol, UserName},
};
use capybara_tests::shadowsocks::{
    ChannelEvents, FileServer, LIBEV_CIPHERS, RecordingKernel, StaticUsers, fetch, socks5_connect,
    ss_local, tcp_source_of,
};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use tokio::{net::TcpListener, sync::mpsc};

/// The users: (id, name, password).
const USERS: [(u32, &str, &str); 3] = [
    (41, "alice", "alice's Shadowsocks password"),
    (42, "bob", "bob's Shadowsocks password"),
    (43, "carol", "carol's Shadowsocks password"),
];
/// The file fetched: 8 MiB of seeded random bytes.
const FILE_LEN: usize = 8 << 20;

fn identity(id: u32, name: &str) -> Identity {
    Identity {
        id,
        user: UserName::parse("user", name).unwrap(),
        protocol: Protocol::Shadowsocks,
    }
}

struct Endpoint {
    addr: SocketAddr,
    kernel: Arc<RecordingKernel>,
    events: mpsc::UnboundedReceiver<ProxyEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    async fn start(cipher: Cipher) -> Endpoint {
        let keys = USERS
            .iter()
            .map(|&(id, name, password)| ShadowsocksKey {
                identity: identity(id, name),
                key: cipher.key_from_password(password).unwrap(),
            })
            .collect();
        let kernel = Arc::new(RecordingKernel::default());
        let (sink, events) = ChannelEvents::new();
        let hub = Hub {
            credentials: Arc::new(StaticUsers::shadowsocks(keys)),
            kernel: kernel.clone(),
            events: Arc::new(sink),
            registry: Arc::new(Registry::default()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            handshake_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(2),
            ..Config::new(cipher)
        };
        let task = tokio::spawn(serve(listener, hub, config));
        Endpoint {
            addr,
            kernel,
            events,
            task,
        }
    }

    async fn event(&mut self) -> ProxyEvent {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("an event within 10 s")
            .expect("events open")
    }
}

fn file() -> Arc<Vec<u8>> {
    let mut f = vec![0u8; FILE_LEN];
    StdRng::seed_from_u64(24).fill_bytes(&mut f);
    Arc::new(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ss_local_fetches_a_file_byte_for_byte_with_every_cipher() {
    let file = file();
    let server = FileServer::start(Arc::clone(&file)).await.unwrap();
    for name in LIBEV_CIPHERS {
        let cipher: Cipher = name.parse().unwrap();
        let mut ep = Endpoint::start(cipher).await;
        let (id, user, password) = USERS[1];
        let local = ss_local(ep.addr, name, password).unwrap();

        // A first fetch, closed, then the one checked: an endpoint serves one connection after
        // another, not only its first.
        let mut s = socks5_connect(local.addr, server.addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), fetch(&mut s))
            .await
            .expect("fetched within 20 s")
            .unwrap();
        assert!(got == *file, "{name}: the file arrived altered");
        drop(s);
        assert!(matches!(ep.event().await, ProxyEvent::Opened { .. }));
        assert!(matches!(ep.event().await, ProxyEvent::Closed { .. }));
        let before = ep.kernel.binds().len();

        let mut s = socks5_connect(local.addr, server.addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), fetch(&mut s))
            .await
            .expect("fetched within 20 s")
            .unwrap();
        assert!(got == *file, "{name}: the file arrived altered");
        // ss-local's connection to the endpoint, still open (the file server waits for us).
        let source = tcp_source_of(local.pid(), ep.addr).unwrap();

        match ep.event().await {
            ProxyEvent::Opened {
                identity: who,
                source: s,
                target,
                ..
            } => {
                assert_eq!(who, identity(id, user), "{name}");
                assert_eq!(s, source, "{name}");
                assert_eq!(target, Target::Addr(server.addr), "{name}");
            }
            other => panic!("{name}: expected Opened, got {other:?}"),
        }
        drop(s);
        match ep.event().await {
            ProxyEvent::Closed {
                identity: who,
                rx_bytes,
                tx_bytes,
                reason,
                ..
            } => {
                assert_eq!(who, identity(id, user), "{name}");
                assert_eq!(reason, CloseReason::Closed, "{name}");
                // What the client asked, what the server answered (length and file).
                let asked = capybara_tests::shadowsocks::FILE_REQUEST.len() as u64;
                assert_eq!(rx_bytes, asked, "{name}");
                assert_eq!(tx_bytes, 8 + FILE_LEN as u64, "{name}");
            }
            other => panic!("{name}: expected Closed, got {other:?}"),
        }
        assert_eq!(
            ep.kernel.binds()[before..],
            [(id, SocketRole::Upstream), (id, SocketRole::Client)],
            "{name}: both sockets bound to bob, upstream before connect"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_reported() {
    let server = FileServer::start(file()).await.unwrap();
    let mut ep = Endpoint::start(Cipher::Chacha20IetfPoly1305).await;
    let local = ss_local(ep.addr, "chacha20-ietf-poly1305", "nobody's password").unwrap();
    // ss-local answers the SOCKS5 request itself and sends the request on, sealed with the
    // wrong key: the endpoint refuses it and keeps draining the connection (2 s here).
    let mut s = socks5_connect(local.addr, server.addr).await.unwrap();
    let fetching =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_secs(5), fetch(&mut s)).await },
        );
    match ep.event().await {
        ProxyEvent::AuthFailed {
            protocol,
            source,
            reason,
            ..
        } => {
            assert_eq!(protocol, Protocol::Shadowsocks);
            assert_eq!(reason, AuthFailure::UnknownCredential);
            assert_eq!(source, tcp_source_of(local.pid(), ep.addr).unwrap());
        }
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    assert!(
        !matches!(fetching.await.unwrap(), Ok(Ok(_))),
        "a wrong password fetched the file"
    );
    assert!(ep.kernel.binds().is_empty(), "nothing bound");
    // The right password still works on the same endpoint.
    let good = ss_local(ep.addr, "chacha20-ietf-poly1305", USERS[0].2).unwrap();
    let mut s = socks5_connect(good.addr, server.addr).await.unwrap();
    let got = fetch(&mut s).await.unwrap();
    assert_eq!(got.len(), FILE_LEN);
}
