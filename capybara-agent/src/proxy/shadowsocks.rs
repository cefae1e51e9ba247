//! The Shadowsocks endpoint: a multi-user Shadowsocks TCP server whose users are Capybara's
//! users ([`serve`]).
//!
//! ## Framing and ciphers
//! The AEAD framing, the address header and the replay checks are shadowsocks-rust's library
//! (the `shadowsocks` crate, `ProxyServerStream`): SIP004 (`aes-128-gcm`, `aes-256-gcm`,
//! `chacha20-ietf-poly1305`) and SIP022, the 2022 edition (`2022-blake3-aes-128-gcm`,
//! `2022-blake3-aes-256-gcm`, `2022-blake3-chacha20-poly1305`). One endpoint serves one cipher
//! ([`Cipher`]); every user's key ([`super::Credentials::shadowsocks`]) is of that cipher.
//!
//! ## Finding the user
//! Shadowsocks carries no user name. The endpoint reads the client's first bytes, the salt and
//! the first sealed block after it (SIP004: the sealed 2-byte length; SIP022: the sealed
//! fixed-length header), and tries each user's key on that block ([`find_key`]): per key, one
//! subkey derivation (HKDF-SHA1 / BLAKE3 over key and salt) and one AEAD open of 2 or 11
//! bytes, whose tag check fails for every key but the user's. The cost is linear in the users
//! who have a key: **up to N keys per connection** (N/2 on average for a known user, N for a
//! stranger). Measured by the bench `shadowsocks_key_lookup_us_{1,100,1000}` (release,
//! `aes-256-gcm`, a stranger: every key tried, median of 200; three runs on 2026-12-07 while
//! other builds shared the 2 cores): **0.95–1.26 µs at 1 user, 91–127 µs at 100, 0.93–1.11 ms
//! at 1000**, about 0.9 µs a key, on one core, per connection before the first byte is relayed.
//! At 1000 users a flood of strangers' connections thus costs ~1 ms of CPU each; the XDP
//! guard and the connection limits stand in front of that. The found key then drives the
//! crate's own stream (the bytes already read are replayed to it), which reads the target
//! address.
//!
//! SIP022's multi-user identity header (EIH) is not used: it needs a second, server-wide key
//! in every client's configuration, and a key trial finds the user without it, for clients that
//! send their user key alone (the form `capybara user config` prints). An EIH-bearing client is
//! refused as an unknown credential.
//!
//! ## Replay and probing
//! The library checks each salt against a ping-pong bloom filter after the first block opens;
//! the endpoint sets the policy to **reject** a repeated salt for both editions (SIP022
//! requires it, and for SIP004 it turns a replayed first packet, a known active probe, into a
//! refusal), plus SIP022's timestamp window (30 s). A connection whose first bytes no key opens,
//! that is truncated or malformed, or whose salt is replayed is reported
//! ([`super::ProxyEvent::AuthFailed`]) and then **drained**: the endpoint reads and discards
//! what the client sends until the client closes or [`Config::drain_timeout`] passes, and only
//! then closes, as shadowsocks-rust's server and Outline do, so a prober learns nothing from
//! when or how the connection ends (no reset after N bytes). A held user's connection is closed
//! at once (its key was right: there is nothing to hide from its owner).
//!
//! ## Bounds
//! Every read before the connection is a user's is bounded by [`Config::handshake_timeout`]
//! (a client that sends nothing, or too little, is dropped then); probes are drained for at
//! most [`Config::drain_timeout`] through a 16 KiB buffer; the accept loop logs and backs off
//! on accept errors (e.g. out of descriptors) and never ends on one client.
//!
//! ## Order of a connection
//! first block → key trial → address header → [`super::Credentials::admitted`] →
//! [`super::relay::proxy`], which both endpoints share: registered (`Opened` reported), the
//! upstream socket bound to the identity before `connect`, the accepted socket bound
//! ([`super::SocketRole::Client`]), relayed until either side closes or the connection is cut
//! (a cut one is aborted) → `Closed` with the bytes moved (plaintext: `rx_bytes` from the user,
//! `tx_bytes` to the user).
//!
//! The UDP relay on the same port, for the same users and cipher, is [`udp`].

use std::{
    fmt,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use shadowsocks::{
    config::{ReplayAttackPolicy, ServerType},
    context::{Context as SsContext, SharedContext},
    crypto::{CipherKind, v1, v2::tcp::TcpCipher},
    relay::{socks5::Address, tcprelay::ProxyServerStream},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use super::{AuthFailure, Hub, ProxyEvent, ShadowsocksKey, Target, relay};
use crate::service::domain::Protocol;

/// A cipher the endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// `aes-128-gcm` (SIP004).
    Aes128Gcm,
    /// `aes-256-gcm` (SIP004).
    Aes256Gcm,
    /// `chacha20-ietf-poly1305` (SIP004).
    Chacha20IetfPoly1305,
    /// `2022-blake3-aes-128-gcm` (SIP022).
    Blake3Aes128Gcm,
    /// `2022-blake3-aes-256-gcm` (SIP022).
    Blake3Aes256Gcm,
    /// `2022-blake3-chacha20-poly1305` (SIP022).
    Blake3Chacha20Poly1305,
}

impl Cipher {
    /// The default: the 2022 edition (replay protection, no key derivation from a password).
    pub const DEFAULT: Cipher = Cipher::Blake3Aes256Gcm;

    /// Every cipher served, SIP004 first.
    pub const ALL: [Cipher; 6] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20IetfPoly1305,
        Cipher::Blake3Aes128Gcm,
        Cipher::Blake3Aes256Gcm,
        Cipher::Blake3Chacha20Poly1305,
    ];

    /// Its name in client configurations (`method`) and `ss://` URIs.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes-128-gcm",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::Chacha20IetfPoly1305 => "chacha20-ietf-poly1305",
            Cipher::Blake3Aes128Gcm => "2022-blake3-aes-128-gcm",
            Cipher::Blake3Aes256Gcm => "2022-blake3-aes-256-gcm",
            Cipher::Blake3Chacha20Poly1305 => "2022-blake3-chacha20-poly1305",
        }
    }

    /// Whether it is of the 2022 edition (SIP022), whose key is a random PSK rather than a
    /// password.
    pub fn is_2022(self) -> bool {
        self.kind().is_aead_2022()
    }

    /// The key length in bytes ([`ShadowsocksKey::key`]).
    pub fn key_len(self) -> usize {
        self.kind().key_len()
    }

    /// The key of a client configuration's `password`: for SIP004 derived from the password
    /// with `EVP_BytesToKey` (MD5), as every client does; for SIP022 the base64 of a key of
    /// [`Cipher::key_len`] bytes.
    pub fn key_from_password(self, password: &str) -> Result<Vec<u8>, KeyError> {
        let mut key = vec![0u8; self.key_len()];
        if self.is_2022() {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(password.trim())
                .map_err(|_| KeyError::NotBase64)?;
            if decoded.len() != key.len() {
                return Err(KeyError::Length {
                    cipher: self,
                    got: decoded.len(),
                });
            }
            key.copy_from_slice(&decoded);
        } else {
            if password.is_empty() {
                return Err(KeyError::Empty);
            }
            v1::openssl_bytes_to_key(password.as_bytes(), &mut key);
        }
        Ok(key)
    }

    /// The password a client is given for `secret` (a stored credential's 32 random bytes):
    /// SIP022, the base64 of the key (the secret's first [`Cipher::key_len`] bytes); SIP004,
    /// the base64 of the whole secret, from which the client derives the key.
    pub fn password(self, secret: &[u8; 32]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        if self.is_2022() {
            b64.encode(&secret[..self.key_len()])
        } else {
            b64.encode(secret)
        }
    }

    /// The key the endpoint opens the streams of the user whose secret is `secret` with: the
    /// key of [`Cipher::password`], as the client derives it.
    pub fn key(self, secret: &[u8; 32]) -> Vec<u8> {
        self.key_from_password(&self.password(secret))
            .expect("a password this cipher made is its own")
    }

    fn kind(self) -> CipherKind {
        match self {
            Cipher::Aes128Gcm => CipherKind::AES_128_GCM,
            Cipher::Aes256Gcm => CipherKind::AES_256_GCM,
            Cipher::Chacha20IetfPoly1305 => CipherKind::CHACHA20_POLY1305,
            Cipher::Blake3Aes128Gcm => CipherKind::AEAD2022_BLAKE3_AES_128_GCM,
            Cipher::Blake3Aes256Gcm => CipherKind::AEAD2022_BLAKE3_AES_256_GCM,
            Cipher::Blake3Chacha20Poly1305 => CipherKind::AEAD2022_BLAKE3_CHACHA20_POLY1305,
        }
    }

    /// The sealed block after the salt that a key is tried on: SIP004's sealed length (2 bytes),
    /// SIP022's sealed fixed-length header (type, timestamp, length: 11 bytes); tag included.
    fn first_block_len(self) -> usize {
        let plain = if self.is_2022() { 1 + 8 + 2 } else { 2 };
        plain + self.kind().tag_len()
    }

    /// Salt and first block: what the endpoint reads before it tries keys.
    pub fn first_chunk_len(self) -> usize {
        self.kind().salt_len() + self.first_block_len()
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Cipher {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| KeyError::UnknownCipher(s.to_owned()))
    }
}

/// A bad cipher name or key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a served cipher.
    #[error(
        "cipher: unknown Shadowsocks cipher {0:?} (one of aes-128-gcm, aes-256-gcm, \
         chacha20-ietf-poly1305, 2022-blake3-aes-128-gcm, 2022-blake3-aes-256-gcm, \
         2022-blake3-chacha20-poly1305)"
    )]
    UnknownCipher(String),
    /// A SIP004 password must not be empty.
    #[error("password: empty")]
    Empty,
    /// A SIP022 key is base64.
    #[error("password: a 2022-edition key is base64")]
    NotBase64,
    /// A SIP022 key of the wrong length.
    #[error("password: {cipher} needs a key of {} bytes, got {got}", cipher.key_len())]
    Length {
        /// The cipher.
        cipher: Cipher,
        /// The decoded length.
        got: usize,
    },
}

/// How an endpoint serves.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The cipher every user's key is of.
    pub cipher: Cipher,
    /// How long a client may take to send its first chunk and its address header.
    pub handshake_timeout: Duration,
    /// How long a refused (probing) client is read from before the endpoint closes.
    pub drain_timeout: Duration,
}

impl Config {
    /// `cipher` with the default timeouts: 15 s for the handshake (a real client sends its
    /// header with its first write, at once), 60 s of draining (shadowsocks-rust keeps a
    /// refused client until it closes; Outline until its own timeout).
    pub fn new(cipher: Cipher) -> Self {
        Config {
            cipher,
            handshake_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(60),
        }
    }
}

/// The drain buffer of a refused client.
const DRAIN_BUFFER: usize = 16 * 1024;
/// How long the accept loop pauses after an accept error (out of descriptors, …).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The index in `keys` of the first key of `cipher`'s length that opens the first block of
/// `first` (salt and first block, [`Cipher::first_chunk_len`] bytes), or `None` when no key
/// does (or `first` is short). Tries up to `keys.len()` keys.
pub fn find_key(cipher: Cipher, first: &[u8], keys: &[ShadowsocksKey]) -> Option<usize> {
    if first.len() < cipher.first_chunk_len() {
        return None;
    }
    let kind = cipher.kind();
    let (salt, rest) = first.split_at(kind.salt_len());
    let block = &rest[..cipher.first_block_len()];
    let mut buf = [0u8; 64];
    keys.iter().position(|k| {
        if k.key.len() != kind.key_len() {
            return false;
        }
        let b = &mut buf[..block.len()];
        b.copy_from_slice(block);
        if cipher.is_2022() {
            TcpCipher::new(kind, &k.key, salt).decrypt_packet(b)
        } else {
            v1::Cipher::new(kind, &k.key, salt).decrypt_packet(b)
        }
    })
}

/// Serves Shadowsocks (TCP) on `listener` for the users of `hub.credentials` with keys of
/// `config.cipher`, until the returned future is dropped (which also ends the connections it
/// serves). Each connection runs in its own task; see the module docs for its order, timeouts
/// and what is reported to `hub.events`.
pub async fn serve(listener: TcpListener, hub: Hub, config: Config) {
    let mut context = SsContext::new(ServerType::Server);
    context.set_replay_attack_policy(ReplayAttackPolicy::Reject);
    let context: SharedContext = Arc::new(context);
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, source)) => {
                let (hub, context) = (hub.clone(), Arc::clone(&context));
                conns.spawn(connection(stream, source, hub, config, context));
            }
            Err(e) => {
                tracing::warn!(error = %e, "shadowsocks: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One client's connection, from its first byte to its close.
async fn connection(
    mut stream: TcpStream,
    source: SocketAddr,
    hub: Hub,
    config: Config,
    context: SharedContext,
) {
    let refused = |reason: AuthFailure| {
        hub.events.report(ProxyEvent::AuthFailed {
            protocol: Protocol::Shadowsocks,
            source,
            reason,
            at: SystemTime::now(),
        });
    };
    let _ = stream.set_nodelay(true);
    let mut first = vec![0u8; config.cipher.first_chunk_len()];
    match tokio::time::timeout(config.handshake_timeout, stream.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        // Truncated, silent or reset: nobody's connection.
        _ => {
            refused(AuthFailure::Malformed);
            drain(&mut stream, config.drain_timeout).await;
            return;
        }
    }
    let keys = hub.credentials.shadowsocks();
    let Some(found) = find_key(config.cipher, &first, &keys) else {
        refused(AuthFailure::UnknownCredential);
        drain(&mut stream, config.drain_timeout).await;
        return;
    };
    let ShadowsocksKey { identity, key } = &keys[found];
    let mut ss = ProxyServerStream::from_stream(
        context,
        Replayed::new(first, stream),
        config.cipher.kind(),
        key,
    );
    let address = match tokio::time::timeout(config.handshake_timeout, ss.handshake()).await {
        Ok(Ok(a)) => a,
        // A malformed or truncated header, a replayed salt, a stale SIP022 timestamp.
        Ok(Err(e)) => {
            tracing::debug!(%source, error = %e, "shadowsocks: bad header");
            refused(AuthFailure::Malformed);
            drain(&mut ss.into_inner().inner, config.drain_timeout).await;
            return;
        }
        Err(_) => {
            refused(AuthFailure::Malformed);
            drain(&mut ss.into_inner().inner, config.drain_timeout).await;
            return;
        }
    };
    if !hub.credentials.admitted(identity.id) {
        refused(AuthFailure::Held);
        return;
    }
    let target = target_of(address);
    let accepted = relay::Accepted {
        identity: identity.clone(),
        source,
        target,
        carried: relay::Carried::Stream,
        client: StableWrites::new(ss),
    };
    relay::proxy(&hub, accepted, client_socket, (&[], &[]), None).await;
}

/// A Shadowsocks address header's target.
fn target_of(address: Address) -> Target {
    match address {
        Address::SocketAddress(a) => Target::Addr(a),
        Address::DomainNameAddress(d, p) => Target::Domain(d, p),
    }
}

/// The client's socket under the decrypting stream.
fn client_socket(c: &StableWrites<ProxyServerStream<Replayed<TcpStream>>>) -> BorrowedFd<'_> {
    c.inner.get_ref().inner.as_fd()
}

/// Passes a write that returned `Pending` again with no more bytes than the first time.
///
/// The library's writer seals a chunk of what the first `poll_write` offered, returns
/// `Pending` while it is sent, and then reports the length of whatever the *next* call offers
/// as written. `tokio::io::copy_bidirectional` tops its buffer up while a write is pending and
/// offers more on the retry: without this, the bytes between the two lengths were reported
/// written and never sent (a large download stalled with its tail lost; caught by
/// `a_slow_client_gets_every_byte`).
struct StableWrites<S> {
    inner: S,
    pending: Option<usize>,
}

impl<S> StableWrites<S> {
    fn new(inner: S) -> Self {
        StableWrites {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StableWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StableWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let len = self.pending.map_or(buf.len(), |n| n.min(buf.len()));
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..len]);
        self.pending = if r.is_pending() { Some(len) } else { None };
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads and discards what `stream` sends until it closes, fails or `timeout` passes.
async fn drain(stream: &mut TcpStream, timeout: Duration) {
    let mut buf = vec![0u8; DRAIN_BUFFER];
    let _ = tokio::time::timeout(timeout, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A stream whose first reads return bytes already read from it (the first chunk, read for the
/// key trial), then its own.
struct Replayed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replayed<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Replayed { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub mod udp;

#[cfg(test)]
mod tests;
