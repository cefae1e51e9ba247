//! The UDP relay on loopback against packets sealed by shadowsocks-rust's client side, with test
//! doubles of the agent's ports (the real `ss-local` is `tests/it/e2e_proxies.rs`).

use capybara_common::peer::PeerId;
use shadowsocks::relay::udprelay::crypto_io::{decrypt_server_payload, encrypt_client_payload};

use super::*;
use crate::{
    proxy::{
        registry::Registry,
        testing::{ChannelEvents, RecordingKernel, StaticUsers},
    },
    service::domain::UserName,
};

const USERS: [(PeerId, &str); 3] = [(11, "alice"), (12, "bob"), (13, "carol")];

fn key(cipher: Cipher, id: PeerId) -> Vec<u8> {
    if cipher.is_2022() {
        vec![id as u8; cipher.key_len()]
    } else {
        cipher
            .key_from_password(&format!("password of user {id}"))
            .unwrap()
    }
}

/// A relay with alice, bob and carol (carol held), and its test doubles.
struct Rig {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<ProxyEvent>,
    kernel: Arc<RecordingKernel>,
    registry: Arc<Registry>,
    stop: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn rig(cipher: Cipher, idle_timeout: Duration) -> Rig {
    let keys: Vec<ShadowsocksKey> = USERS
        .iter()
        .map(|&(id, name)| ShadowsocksKey {
            identity: Identity {
                id,
                user: UserName::parse("user", name).unwrap(),
                protocol: Protocol::Shadowsocks,
            },
            key: key(cipher, id),
        })
        .collect();
    let users = StaticUsers::shadowsocks(keys);
    users.held.lock().unwrap().insert(13);
    let kernel = Arc::new(RecordingKernel::default());
    let registry = Arc::new(Registry::default());
    let (sink, events) = ChannelEvents::new();
    let hub = Hub {
        credentials: Arc::new(users),
        kernel: kernel.clone(),
        events: Arc::new(sink),
        registry: registry.clone(),
    };
    let socket = reuseport_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = Config {
        cipher,
        idle_timeout,
    };
    tokio::spawn(serve(socket, hub, config, stop.clone()));
    Rig {
        addr,
        events,
        kernel,
        registry,
        stop,
    }
}

impl Rig {
    async fn event(&mut self) -> ProxyEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event within 5 s")
            .expect("the relay runs")
    }
}

/// A Shadowsocks UDP client of user `id` (shadowsocks-rust's client sealing).
struct Client {
    socket: UdpSocket,
    cipher: Cipher,
    key: Vec<u8>,
    context: SsContext,
    session: u64,
    packet: u64,
}

impl Client {
    async fn new(cipher: Cipher, id: PeerId) -> Client {
        Client {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            cipher,
            key: key(cipher, id),
            context: SsContext::new(ServerType::Local),
            session: rand::random(),
            packet: 0,
        }
    }

    fn seal(&mut self, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
        self.packet += 1;
        let mut control = UdpSocketControlData::default();
        control.client_session_id = self.session;
        control.packet_id = self.packet;
        let mut sealed = BytesMut::new();
        encrypt_client_payload(
            &self.context,
            self.cipher.kind(),
            &self.key,
            &Address::SocketAddress(to),
            &control,
            &[],
            payload,
            &mut sealed,
        );
        sealed.to_vec()
    }

    /// The next reply within `wait`, opened: where it came from and its payload.
    async fn reply(&self, wait: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(wait, self.socket.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        let (len, from, _) =
            decrypt_server_payload(&self.context, self.cipher.kind(), &self.key, &mut buf[..n])
                .expect("a reply the client opens");
        let from = match from {
            Address::SocketAddress(a) => a,
            other => panic!("{other:?}"),
        };
        Some((from, buf[..len].to_vec()))
    }
}

#[tokio::test]
async fn datagrams_are_relayed_through_sockets_bound_to_their_user_and_a_cut_ends_them() {
    for cipher in [Cipher::Chacha20IetfPoly1305, Cipher::Blake3Aes256Gcm] {
        let mut rig = rig(cipher, Duration::from_secs(60)).await;
        let up = crate::proxy::testing::upper_udp_server().await;
        let mut bob = Client::new(cipher, 12).await;
        let client_addr = bob.socket.local_addr().unwrap();
        for (payload, want) in [(&b"hello"[..], &b"HELLO"[..]), (b"again", b"AGAIN")] {
            let packet = bob.seal(up, payload);
            bob.socket.send_to(&packet, rig.addr).await.unwrap();
            let (from, got) = bob.reply(Duration::from_secs(5)).await.expect("a reply");
            assert_eq!((from, &got[..]), (up, want), "{cipher}");
        }
        match rig.event().await {
            ProxyEvent::Opened {
                identity,
                source,
                target,
                ..
            } => {
                assert_eq!(
                    (identity.id, source, target),
                    (12, client_addr, Target::Addr(up))
                );
            }
            other => panic!("{other:?}"),
        }
        // The association's own client socket (connected to the client) and its upstream
        // socket, both bound to bob before they carried his datagrams.
        let binds = rig.kernel.binds_with_peers();
        assert_eq!(
            binds,
            [
                (12, SocketRole::Client, Some(client_addr)),
                (12, SocketRole::Upstream, None)
            ],
            "{cipher}"
        );
        assert_eq!(
            rig.registry.cut(12, crate::proxy::registry::CutCause::Kick),
            1
        );
        match rig.event().await {
            ProxyEvent::Closed {
                rx_bytes,
                tx_bytes,
                reason,
                ..
            } => assert_eq!((rx_bytes, tx_bytes, reason), (10, 10, CloseReason::Cut)),
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.kernel.unbinds(), 2, "both sockets unbound");
        // A later packet starts a new association.
        let packet = bob.seal(up, b"back");
        bob.socket.send_to(&packet, rig.addr).await.unwrap();
        let (_, got) = bob.reply(Duration::from_secs(5)).await.expect("a reply");
        assert_eq!(got, b"BACK");
        assert!(matches!(rig.event().await, ProxyEvent::Opened { .. }));
    }
}

#[tokio::test]
async fn strangers_garbage_and_held_users_get_nothing_and_are_reported() {
    let cipher = Cipher::Chacha20IetfPoly1305;
    let mut rig = rig(cipher, Duration::from_secs(60)).await;
    let up = crate::proxy::testing::upper_udp_server().await;
    let mut stranger = Client::new(cipher, 99).await;
    let packet = stranger.seal(up, b"hi");
    stranger.socket.send_to(&packet, rig.addr).await.unwrap();
    stranger.socket.send_to(b"short", rig.addr).await.unwrap();
    let mut carol = Client::new(cipher, 13).await;
    let packet = carol.seal(up, b"hi");
    carol.socket.send_to(&packet, rig.addr).await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..3 {
        match rig.event().await {
            ProxyEvent::AuthFailed {
                reason, protocol, ..
            } => {
                assert_eq!(protocol, Protocol::Shadowsocks);
                reasons.push(reason);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        reasons,
        [
            AuthFailure::UnknownCredential,
            AuthFailure::Malformed,
            AuthFailure::Held
        ]
    );
    assert!(stranger.reply(Duration::from_millis(200)).await.is_none());
    assert!(carol.reply(Duration::from_millis(200)).await.is_none());
    assert!(rig.kernel.binds().is_empty(), "nothing was bound");
}

#[tokio::test]
async fn a_replayed_2022_packet_is_dropped_and_an_idle_association_ends() {
    let cipher = Cipher::Blake3Aes256Gcm;
    let mut rig = rig(cipher, Duration::from_millis(300)).await;
    let up = crate::proxy::testing::upper_udp_server().await;
    let mut alice = Client::new(cipher, 11).await;
    let packet = alice.seal(up, b"once");
    alice.socket.send_to(&packet, rig.addr).await.unwrap();
    assert!(alice.reply(Duration::from_secs(5)).await.is_some());
    alice.socket.send_to(&packet, rig.addr).await.unwrap();
    assert!(
        alice.reply(Duration::from_millis(150)).await.is_none(),
        "the replay is not relayed"
    );
    assert!(matches!(rig.event().await, ProxyEvent::Opened { .. }));
    match rig.event().await {
        ProxyEvent::Closed {
            rx_bytes, reason, ..
        } => assert_eq!((rx_bytes, reason), (4, CloseReason::Closed)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_packet_window_accepts_each_id_once_within_64_and_restarts_with_a_new_session() {
    let mut w = PacketWindow::default();
    assert!(w.accept(1, 10));
    assert!(!w.accept(1, 10), "seen");
    assert!(w.accept(1, 12));
    assert!(w.accept(1, 11), "late, within the window");
    assert!(!w.accept(1, 11));
    assert!(w.accept(1, 100));
    assert!(!w.accept(1, 36), "64 below the highest: too old");
    assert!(w.accept(1, 37), "63 below: within");
    assert!(!w.accept(1, 12), "too old");
    assert!(w.accept(2, 1), "a new session");
    assert!(!w.accept(2, 1));
    assert!(w.accept(2, 1000));
    assert!(!w.accept(2, 999 - 63), "the window moved past it");
}
