//! The endpoint against shadowsocks-rust's own client stream and hand-sealed bad headers, over
//! loopback, with test doubles of the agent's ports (credentials, kernel, events).

use std::{sync::Arc, time::Instant};

use capybara_common::peer::PeerId;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use shadowsocks::{ServerConfig, relay::tcprelay::ProxyClientStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

use super::*;
use crate::{
    proxy::{
        CloseReason, Identity, SocketRole,
        registry::Registry,
        testing::{ChannelEvents, RecordingKernel, StaticUsers},
    },
    service::domain::UserName,
};

fn identity(id: PeerId, name: &str) -> Identity {
    Identity {
        id,
        user: UserName::parse("user", name).unwrap(),
        protocol: Protocol::Shadowsocks,
    }
}

/// A password of `cipher` for user number `n` (SIP022: a base64 key).
fn password(cipher: Cipher, n: u8) -> String {
    if cipher.is_2022() {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(vec![n; cipher.key_len()])
    } else {
        format!("password of user {n}")
    }
}

/// A running endpoint with users alice (id 11), bob (12), carol (13).
struct Endpoint {
    addr: SocketAddr,
    cipher: Cipher,
    events: mpsc::UnboundedReceiver<ProxyEvent>,
    binds: Arc<RecordingKernel>,
    users: Arc<StaticUsers>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const NAMES: [(PeerId, &str); 3] = [(11, "alice"), (12, "bob"), (13, "carol")];

async fn endpoint(cipher: Cipher) -> Endpoint {
    let keys: Vec<ShadowsocksKey> = NAMES
        .iter()
        .map(|&(id, name)| ShadowsocksKey {
            identity: identity(id, name),
            key: cipher
                .key_from_password(&password(cipher, id as u8))
                .unwrap(),
        })
        .collect();
    let users = Arc::new(StaticUsers::shadowsocks(keys));
    let binds = Arc::new(RecordingKernel::default());
    let (sink, events) = ChannelEvents::new();
    let hub = Hub {
        credentials: users.clone(),
        kernel: binds.clone(),
        events: Arc::new(sink),
        registry: Arc::new(Registry::default()),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        cipher,
        handshake_timeout: Duration::from_millis(800),
        drain_timeout: Duration::from_millis(1500),
    };
    let task = tokio::spawn(serve(listener, hub, config));
    Endpoint {
        addr,
        cipher,
        events,
        binds,
        users,
        task,
    }
}

impl Endpoint {
    async fn event(&mut self) -> ProxyEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event within 5 s")
            .expect("events open")
    }

    async fn auth_failure(&mut self) -> (SocketAddr, AuthFailure) {
        match self.event().await {
            ProxyEvent::AuthFailed {
                protocol,
                source,
                reason,
                ..
            } => {
                assert_eq!(protocol, Protocol::Shadowsocks);
                (source, reason)
            }
            other => panic!("expected AuthFailed, got {other:?}"),
        }
    }

    /// A shadowsocks-rust client of user `n` to `target`.
    async fn client(&self, n: u8, target: Address) -> ProxyClientStream<TcpStream> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let cfg =
            ServerConfig::new(self.addr, password(self.cipher, n), self.cipher.kind()).unwrap();
        let context = Arc::new(SsContext::new(ServerType::Local));
        ProxyClientStream::from_stream(context, stream, &cfg, target)
    }
}

/// An upstream that answers each read with the bytes read, reversed.
async fn reverser() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    buf[..n].reverse();
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn every_cipher_relays_for_the_user_whose_key_opens_it() {
    let up = reverser().await;
    for cipher in Cipher::ALL {
        let mut ep = endpoint(cipher).await;
        let mut c = ep.client(12, Address::SocketAddress(up)).await;
        let source = c.get_ref().local_addr().unwrap();
        c.write_all(b"capybara").await.unwrap();
        let mut got = [0u8; 8];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"arabypac", "{cipher}");
        match ep.event().await {
            ProxyEvent::Opened {
                identity: who,
                source: s,
                target,
                ..
            } => {
                assert_eq!(who, identity(12, "bob"), "{cipher}");
                assert_eq!(s, source, "{cipher}");
                assert_eq!(target, Target::Addr(up), "{cipher}");
            }
            other => panic!("{cipher}: expected Opened, got {other:?}"),
        }
        c.shutdown().await.unwrap();
        drop(c);
        match ep.event().await {
            ProxyEvent::Closed {
                identity: who,
                rx_bytes,
                tx_bytes,
                reason,
                ..
            } => {
                assert_eq!(who.id, 12, "{cipher}");
                assert_eq!((rx_bytes, tx_bytes), (8, 8), "{cipher}");
                assert_eq!(reason, CloseReason::Closed, "{cipher}");
            }
            other => panic!("{cipher}: expected Closed, got {other:?}"),
        }
        assert_eq!(
            *ep.binds.binds(),
            [(12, SocketRole::Upstream), (12, SocketRole::Client)],
            "{cipher}"
        );
    }
}

#[tokio::test]
async fn a_domain_target_is_resolved_by_the_endpoint() {
    let up = reverser().await;
    let mut ep = endpoint(Cipher::Chacha20IetfPoly1305).await;
    let target = Address::DomainNameAddress("localhost".into(), up.port());
    let mut c = ep.client(13, target).await;
    c.write_all(b"ab").await.unwrap();
    let mut got = [0u8; 2];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ba");
    match ep.event().await {
        ProxyEvent::Opened { target, .. } => {
            assert_eq!(target, Target::Domain("localhost".into(), up.port()))
        }
        other => panic!("expected Opened, got {other:?}"),
    }
}

/// Salt and SIP004 chunks sealed with `key` by hand: the sealed length and the payload of each
/// of `chunks`, so a test can send a well-sealed but malformed header.
fn seal_v1(cipher: Cipher, key: &[u8], salt: &[u8], chunks: &[&[u8]]) -> Vec<u8> {
    let kind = cipher.kind();
    let tag = kind.tag_len();
    let mut c = v1::Cipher::new(kind, key, salt);
    let mut out = salt.to_vec();
    for chunk in chunks {
        let mut len = (chunk.len() as u16).to_be_bytes().to_vec();
        len.resize(2 + tag, 0);
        c.encrypt_packet(&mut len);
        out.extend_from_slice(&len);
        let mut body = chunk.to_vec();
        body.resize(chunk.len() + tag, 0);
        c.encrypt_packet(&mut body);
        out.extend_from_slice(&body);
    }
    out
}

/// Sends `bytes` on a fresh connection and leaves it open.
async fn send_raw(ep: &Endpoint, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(ep.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Whether the endpoint keeps `s` open for `wait` (reading nothing), then closes it.
async fn drained_then_closed(s: &mut TcpStream, wait: Duration) {
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(wait, s.read(&mut buf)).await.is_err(),
        "a refused client is kept (drained), not closed at once"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed after the drain timeout");
    assert!(matches!(closed, Ok(0)) || closed.is_err(), "{closed:?}");
}

#[tokio::test]
async fn a_wrong_key_is_an_unknown_credential_and_the_prober_is_drained() {
    let up = reverser().await;
    let cipher = Cipher::Aes256Gcm;
    let mut ep = endpoint(cipher).await;
    let key = cipher.key_from_password("not anybody's").unwrap();
    let mut header = vec![1u8];
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&up.port().to_be_bytes());
    let mut s = send_raw(&ep, &seal_v1(cipher, &key, &[7u8; 32], &[&header])).await;
    let source = s.local_addr().unwrap();
    assert_eq!(
        ep.auth_failure().await,
        (source, AuthFailure::UnknownCredential)
    );
    // It keeps reading until its drain timeout (1.5 s here) even as the prober sends more.
    s.write_all(&[0u8; 100_000]).await.unwrap();
    drained_then_closed(&mut s, Duration::from_millis(700)).await;
    assert!(ep.binds.binds().is_empty());
}

#[tokio::test]
async fn malformed_truncated_replayed_and_garbage_headers_are_refused_and_serving_goes_on() {
    let up = reverser().await;
    let cipher = Cipher::Aes128Gcm;
    let mut ep = endpoint(cipher).await;
    let key = cipher
        .key_from_password(&password(cipher, 11))
        .expect("alice's key");
    let mut salt = 0u8;
    let mut seal = |chunks: &[&[u8]]| {
        salt += 1;
        seal_v1(cipher, &key, &[salt; 16], chunks)
    };
    let port = up.port().to_be_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // An address type that does not exist.
        (
            "address type 9",
            seal(&[&[9, 1, 2, 3, 4, port[0], port[1]]]),
        ),
        // A domain whose length says 200 bytes, followed by 3: the rest never comes.
        ("truncated domain", seal(&[&[3, 200, b'a', b'b', b'c']])),
        // An IPv6 address cut short, then nothing.
        ("truncated IPv6", seal(&[&[4, 0x20, 0x01, 0x0d]])),
        // Salt and half the sealed length, then nothing.
        (
            "truncated first chunk",
            seal(&[&[1, 127, 0, 0, 1]])[..16 + 9].to_vec(),
        ),
        // Nothing at all.
        ("silent", Vec::new()),
        // An empty chunk (length 0): the header never comes.
        ("empty chunk", seal(&[&[]])),
    ];
    for (what, bytes) in cases {
        let mut s = send_raw(&ep, &bytes).await;
        let (source, reason) = ep.auth_failure().await;
        assert_eq!(source, s.local_addr().unwrap(), "{what}");
        assert_eq!(reason, AuthFailure::Malformed, "{what}");
        let _ = s.shutdown().await;
    }

    // Garbage of every length around the first chunk's, from a seeded generator: no key opens it.
    let mut rng = StdRng::seed_from_u64(24);
    for _ in 0..40 {
        let len = rng.random_range(cipher.first_chunk_len()..4096);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        let mut s = send_raw(&ep, &bytes).await;
        assert_eq!(ep.auth_failure().await.1, AuthFailure::UnknownCredential);
        let _ = s.shutdown().await;
    }

    // A recorded first packet sent again (an active probe's replay): the salt is refused.
    let mut header = vec![1u8, 127, 0, 0, 1];
    header.extend_from_slice(&port);
    let recorded = seal(&[&header, b"hi"]);
    let mut first = send_raw(&ep, &recorded).await;
    let mut got = [0u8; 2];
    assert!(matches!(ep.event().await, ProxyEvent::Opened { .. }));
    let mut replay = send_raw(&ep, &recorded).await;
    assert_eq!(ep.auth_failure().await.1, AuthFailure::Malformed);
    let _ = replay.shutdown().await;
    let _ = first.shutdown().await;

    // The endpoint still serves a real client.
    let mut c = ep.client(13, Address::SocketAddress(up)).await;
    c.write_all(b"ok").await.unwrap();
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ko");
}

#[tokio::test]
async fn a_held_user_is_refused_before_connecting_anywhere() {
    let up = reverser().await;
    let mut ep = endpoint(Cipher::Blake3Aes256Gcm).await;
    ep.users.held.lock().unwrap().insert(11);
    let mut c = ep.client(11, Address::SocketAddress(up)).await;
    let _ = c.write_all(b"x").await;
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    assert_eq!(ep.auth_failure().await.1, AuthFailure::Held);
    assert!(ep.binds.binds().is_empty());
}

#[test]
fn the_key_trial_finds_the_user_among_many_and_no_one_for_a_stranger() {
    for cipher in Cipher::ALL {
        let keys: Vec<ShadowsocksKey> = (0..1000u32)
            .map(|i| ShadowsocksKey {
                identity: identity(PeerId::from(i), "u"),
                key: {
                    let mut k = vec![0u8; cipher.key_len()];
                    k[..4].copy_from_slice(&i.to_be_bytes());
                    k
                },
            })
            .collect();
        let salt = vec![3u8; cipher.kind().salt_len()];
        // A first chunk sealed by user 777's key (the library's own client writes it).
        let mut block = vec![0u8; cipher.first_block_len()];
        if cipher.is_2022() {
            TcpCipher::new(cipher.kind(), &keys[777].key, &salt).encrypt_packet(&mut block);
        } else {
            v1::Cipher::new(cipher.kind(), &keys[777].key, &salt).encrypt_packet(&mut block);
        }
        let first = [salt.clone(), block].concat();
        assert_eq!(find_key(cipher, &first, &keys), Some(777), "{cipher}");
        assert_eq!(find_key(cipher, &first, &keys[..777]), None, "{cipher}");
        assert_eq!(find_key(cipher, &first[..first.len() - 1], &keys), None);
        // A key of another length is skipped, not tried.
        let odd = [ShadowsocksKey {
            identity: identity(1, "odd"),
            key: vec![0u8; 7],
        }];
        assert_eq!(find_key(cipher, &first, &odd), None);
        // The cost, in this (debug) build: a stranger tries every key.
        for n in [1, 100, 1000] {
            let t = Instant::now();
            assert_eq!(
                find_key(cipher, &[vec![9u8; first.len()]].concat(), &keys[..n]),
                None
            );
            eprintln!(
                "{cipher}: {n} keys tried in {:?} (debug build)",
                t.elapsed()
            );
        }
    }
}

#[test]
fn cipher_names_and_keys_are_checked() {
    assert_eq!("aes-256-gcm".parse::<Cipher>().unwrap(), Cipher::Aes256Gcm);
    for c in Cipher::ALL {
        assert_eq!(c.name().parse::<Cipher>().unwrap(), c);
    }
    let e = "rc4-md5".parse::<Cipher>().unwrap_err();
    assert!(e.to_string().starts_with("cipher: unknown"), "{e}");
    // EVP_BytesToKey("password") for a 32-byte key, as shadowsocks-libev derives it.
    let key = Cipher::Aes256Gcm.key_from_password("password").unwrap();
    assert_eq!(key[..8], [0x5f, 0x4d, 0xcc, 0x3b, 0x5a, 0xa7, 0x65, 0xd6]);
    assert_eq!(
        Cipher::Aes128Gcm.key_from_password("").unwrap_err(),
        KeyError::Empty
    );
    assert_eq!(
        Cipher::Blake3Aes256Gcm
            .key_from_password("AAAA")
            .unwrap_err(),
        KeyError::Length {
            cipher: Cipher::Blake3Aes256Gcm,
            got: 3
        }
    );
    assert_eq!(
        Cipher::Blake3Aes128Gcm
            .key_from_password("not base64!")
            .unwrap_err(),
        KeyError::NotBase64
    );
    let e = Cipher::Blake3Aes256Gcm
        .key_from_password("AAAA")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "password: 2022-blake3-aes-256-gcm needs a key of 32 bytes, got 3"
    );
}

#[tokio::test]
async fn a_slow_client_gets_every_byte() {
    // An upstream that sends 2 MiB of counting bytes at once.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&sent).await.unwrap();
        let mut rest = [0u8; 16];
        while s.read(&mut rest).await.is_ok_and(|n| n > 0) {}
    });
    // The endpoint behind a 2 KiB pipe to the client: its writes go pending all the time,
    // each with less than the relay's buffer holds.
    let ep = endpoint(Cipher::Chacha20IetfPoly1305).await;
    let (client_end, server_end) = tokio::io::duplex(2048);
    let cipher = ep.cipher;
    let key = cipher.key_from_password(&password(cipher, 12)).unwrap();
    let server = tokio::spawn(async move {
        let context = Arc::new(SsContext::new(ServerType::Server));
        let ss = ProxyServerStream::from_stream(context, server_end, cipher.kind(), &key);
        let mut ss = ss;
        ss.handshake().await.unwrap();
        let mut upstream = TcpStream::connect(up).await.unwrap();
        let cut = tokio_util::sync::CancellationToken::new();
        relay::relay(StableWrites::new(ss), &mut upstream, &cut).await
    });
    let cfg = ServerConfig::new(ep.addr, password(cipher, 12), cipher.kind()).unwrap();
    let context = Arc::new(SsContext::new(ServerType::Local));
    let mut c =
        ProxyClientStream::from_stream(context, client_end, &cfg, Address::SocketAddress(up));
    c.write_all(b"go").await.unwrap();
    let mut got = vec![0u8; data.len()];
    let mut at = 0;
    while at < got.len() {
        // A slow reader: small reads, a pause now and then.
        let end = (at + 777).min(got.len());
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut got[at..end]))
            .await
            .expect("bytes keep coming")
            .unwrap();
        assert!(n > 0, "closed at {at}");
        at += n;
        if at % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(got == data, "the download arrived altered");
    drop(c);
    let (moved, _) = server.await.unwrap();
    assert_eq!(moved.tx_bytes, data.len() as u64);
}
