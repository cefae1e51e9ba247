//! The Shadowsocks UDP relay ([`serve`]): on the TCP endpoint's port, for the same users and
//! cipher, so a client's `"mode": "tcp_and_udp"` (SOCKS5 UDP ASSOCIATE through `ss-local`)
//! works with the configuration `capybara user config` prints.
//!
//! ## Packets
//! A Shadowsocks UDP packet is one sealed datagram: SIP004, a salt and one AEAD message holding
//! the target address and the payload; SIP022, a session id and packet id (AES-sealed
//! separately for the AES ciphers) and an AEAD message with a timestamp, padding, the address and
//! the payload. Sealing and opening are shadowsocks-rust's library (`crypto_io`).
//!
//! ## Associations, and who decides what
//! The client's address (IP and port) is an **association**, as in every Shadowsocks server:
//! - its first packet is opened by key trial (every user's key, a packet's AEAD each; up to N
//!   opens for a stranger, like the TCP endpoint's trial but over the whole packet), the user's
//!   gate is asked once ([`super::super::Credentials::admitted`]), and the association is
//!   registered as a connection of the user's identity ([`super::super::registry`]: listed by
//!   `connections`, cut by `kick`, a hold or the identity's removal), its target the first
//!   packet's;
//! - the association gets **a client socket of its own**: a UDP socket bound to the endpoint's
//!   address with `SO_REUSEPORT` and connected to the client, so the kernel delivers that
//!   client's later datagrams to it rather than to the shared listener (a connected socket
//!   scores above an unconnected one of the same reuseport group) and the replies leave by it.
//!   It is bound to the identity as [`super::super::SocketRole::Client`]: the gate holds a held
//!   user's datagrams both ways in the kernel, and the replies (the download) are shaped by the
//!   user's class on their way out, exactly as a TCP client socket is. Datagrams that reached
//!   the listener before the connected socket existed are handed to the association;
//! - its **upstream** sockets (one per address family, made on first use) are bound to the
//!   identity as [`super::super::SocketRole::Upstream`] before they send: the kernel counts,
//!   charges and checks (destination lists, geo rules, the flow limit: a flow per destination)
//!   every datagram, as it does a TCP upstream's segments. Unlike VLESS's UDP, one association
//!   may reach many destinations: every packet names its own, and the kernel checks each.
//!
//! What the relay decides itself: who a packet belongs to (the key), that a SIP022 packet is
//! fresh (its timestamp within 30 s, the library's check, and its packet id not seen before
//! in the client session: a 64-packet sliding window, [`PacketWindow`]), and an association's
//! end: after [`Config::idle_timeout`] without a datagram either way (the client cannot say
//! it is done), a cut, or the agent stopping. SIP004 UDP has no replay protection (the
//! protocol has none; shadowsocks-rust does not check either).
//!
//! A packet that no key opens, or that is malformed, is dropped and reported as an auth
//! failure of its source (the reputation scores it); nothing is sent back, so a prober learns
//! nothing. A held user's first packet is reported as `held` and dropped.
//!
//! Bounds: an association's queue of packets handed from the listener holds
//! [`HANDOFF_QUEUE`] packets (more are dropped, as a full socket buffer would); associations are
//! as many as clients (each a socket pair, ended by the idle timeout).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::BytesMut;
use shadowsocks::{
    config::ServerType,
    context::{Context as SsContext, SharedContext},
    relay::{
        socks5::Address,
        udprelay::{
            crypto_io::{decrypt_client_payload, encrypt_server_payload},
            options::UdpSocketControlData,
        },
    },
};
use tokio::{net::UdpSocket, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::Cipher;
use crate::{
    proxy::{
        AuthFailure, CloseReason, Hub, Identity, ProxyEvent, ShadowsocksKey, SocketRole, Target,
        relay::{self, Moved},
    },
    service::domain::Protocol,
};

/// How many packets the listener may hand to one association before it reads them.
pub const HANDOFF_QUEUE: usize = 64;
/// The largest datagram.
const MAX_PACKET: usize = 65_535;

/// How the relay serves.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The cipher every user's key is of.
    pub cipher: Cipher,
    /// How long an association lives without a datagram either way.
    pub idle_timeout: Duration,
}

impl Config {
    /// `cipher` with an idle timeout of 5 minutes (shadowsocks-rust's and shadowsocks-libev's
    /// default UDP timeout).
    pub fn new(cipher: Cipher) -> Self {
        Config {
            cipher,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// A UDP socket on `addr` with `SO_REUSEPORT`, as the relay's listener and its associations'
/// client sockets are (they share the address; see the module docs).
pub fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket,
        sockopt::ReusePort,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, ReusePort, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// A SIP022 client session's packet ids seen so far: the highest, and which of the 63 below
/// it. A packet id is fresh if above the highest, or within the window and not seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketWindow {
    session: u64,
    highest: u64,
    seen: u64,
    any: bool,
}

impl PacketWindow {
    /// Whether `packet` of client session `session` is fresh; records it if so. A new session
    /// id (the client restarted its session) starts a new window.
    pub fn accept(&mut self, session: u64, packet: u64) -> bool {
        if !self.any || session != self.session {
            *self = PacketWindow {
                session,
                highest: packet,
                seen: 1,
                any: true,
            };
            return true;
        }
        if packet > self.highest {
            let shift = packet - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = packet;
            return true;
        }
        let back = self.highest - packet;
        if back >= 64 || self.seen & (1 << back) != 0 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

/// An opened client packet: its target, its payload, and its SIP022 control data.
struct Opened {
    target: Address,
    payload: Vec<u8>,
    control: Option<UdpSocketControlData>,
}

/// Opens `packet` with `key`, or `None` if it is not that key's (or is malformed).
fn open(context: &SsContext, cipher: Cipher, key: &[u8], packet: &[u8]) -> Option<Opened> {
    let mut buf = packet.to_vec();
    let (n, target, control) =
        decrypt_client_payload(context, cipher.kind(), key, &mut buf, None).ok()?;
    buf.truncate(n);
    Some(Opened {
        target,
        payload: buf,
        control,
    })
}

/// The first user's key among `keys` that opens `packet`, and the packet opened.
fn find_user<'k>(
    context: &SsContext,
    cipher: Cipher,
    keys: &'k [ShadowsocksKey],
    packet: &[u8],
) -> Option<(&'k ShadowsocksKey, Opened)> {
    keys.iter()
        .filter(|k| k.key.len() == cipher.key_len())
        .find_map(|k| open(context, cipher, &k.key, packet).map(|o| (k, o)))
}

/// Serves the UDP relay on `socket` (from [`reuseport_socket`]) for the users of `hub` until
/// `stop` fires; then ends every association (reason [`CloseReason::Cut`]) and returns.
pub async fn serve(socket: UdpSocket, hub: Hub, config: Config, stop: CancellationToken) {
    let listen = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "shadowsocks udp: no local address");
            return;
        }
    };
    let context: SharedContext = Arc::new(SsContext::new(ServerType::Server));
    // By client address: the association's queue and its generation (a newer association of
    // the same address replaces an ended one before the ended one's task is reaped).
    let mut assocs: HashMap<SocketAddr, (mpsc::Sender<Vec<u8>>, u64)> = HashMap::new();
    let mut tasks: JoinSet<(SocketAddr, u64)> = JoinSet::new();
    let mut generation = 0u64;
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let (n, source) = tokio::select! {
            () = stop.cancelled() => break,
            Some(Ok((addr, g))) = tasks.join_next(), if !tasks.is_empty() => {
                if assocs.get(&addr).is_some_and(|(_, cur)| *cur == g) {
                    assocs.remove(&addr);
                }
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "shadowsocks udp: receive failed");
                    continue;
                }
            },
        };
        let packet = &buf[..n];
        if let Some((queue, _)) = assocs.get(&source) {
            match queue.try_send(packet.to_vec()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                // Ended: the packet may start a new association.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        let refused = |reason| {
            hub.events.report(ProxyEvent::AuthFailed {
                protocol: Protocol::Shadowsocks,
                source,
                reason,
                at: SystemTime::now(),
            });
        };
        let keys = hub.credentials.shadowsocks();
        let Some((key, first)) = find_user(&context, config.cipher, &keys, packet) else {
            // Too short to hold a salt and a tag is malformed; anything else no key opened.
            let least = config.cipher.kind().salt_len() + config.cipher.kind().tag_len();
            refused(if n < least {
                AuthFailure::Malformed
            } else {
                AuthFailure::UnknownCredential
            });
            continue;
        };
        if !hub.credentials.admitted(key.identity.id) {
            refused(AuthFailure::Held);
            continue;
        }
        generation += 1;
        let (queue, packets) = mpsc::channel(HANDOFF_QUEUE);
        assocs.insert(source, (queue, generation));
        let association = Association {
            hub: hub.clone(),
            context: Arc::clone(&context),
            config,
            identity: key.identity.clone(),
            key: key.key.clone(),
            listen,
            source,
        };
        let (g, stop) = (generation, stop.clone());
        tasks.spawn(async move {
            association.run(first, packets, stop).await;
            (source, g)
        });
    }
    drop(assocs);
    while tasks.join_next().await.is_some() {}
}

/// One client address's association.
struct Association {
    hub: Hub,
    context: SharedContext,
    config: Config,
    identity: Identity,
    key: Vec<u8>,
    listen: SocketAddr,
    source: SocketAddr,
}

/// What the association sends its client as a SIP022 server session.
struct ServerSession {
    id: u64,
    next_packet: u64,
}

impl Association {
    async fn run(
        self,
        first: Opened,
        mut handed: mpsc::Receiver<Vec<u8>>,
        stop: CancellationToken,
    ) {
        let Association {
            ref hub,
            ref identity,
            source,
            ..
        } = self;
        let target = super::target_of(first.target.clone());
        let conn = relay::Registered::open(hub, identity, source, &target);
        let mut moved = Moved::default();
        let reason = match self.client_socket() {
            Ok(client) => {
                let mut active = Relay {
                    assoc: &self,
                    client,
                    v4: None,
                    v6: None,
                    window: PacketWindow::default(),
                    session: ServerSession {
                        id: rand::random(),
                        next_packet: 0,
                    },
                    client_session: None,
                    moved: &mut moved,
                };
                let reason = active.run(first, &mut handed, conn.cut(), &stop).await;
                if reason == CloseReason::Cut {
                    let mut fds = vec![active.client.as_fd()];
                    fds.extend(active.v4.iter().chain(active.v6.iter()).map(|s| s.as_fd()));
                    relay::abort(&*hub.kernel, &fds);
                }
                reason
            }
            Err(e) => {
                tracing::warn!(%source, error = %e, "shadowsocks udp: no client socket for the association");
                CloseReason::Closed
            }
        };
        conn.close(moved, reason);
    }

    /// The association's client socket: on the endpoint's address, connected to the client,
    /// bound to the identity.
    fn client_socket(&self) -> io::Result<UdpSocket> {
        let socket = reuseport_socket(self.listen)?;
        nix::sys::socket::connect(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &nix::sys::socket::SockaddrStorage::from(self.source),
        )?;
        self.hub
            .kernel
            .bind(socket.as_fd(), self.identity.id, SocketRole::Client)?;
        Ok(socket)
    }
}

/// An association's sockets and state while it relays.
struct Relay<'a> {
    assoc: &'a Association,
    client: UdpSocket,
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    window: PacketWindow,
    session: ServerSession,
    /// The client's SIP022 session id, once it sent one.
    client_session: Option<u64>,
    moved: &'a mut Moved,
}

impl Relay<'_> {
    async fn run(
        &mut self,
        first: Opened,
        handed: &mut mpsc::Receiver<Vec<u8>>,
        cut: &CancellationToken,
        stop: &CancellationToken,
    ) -> CloseReason {
        self.upload(first).await;
        let mut from_client = vec![0u8; MAX_PACKET];
        let mut from_v4 = vec![0u8; MAX_PACKET];
        let mut from_v6 = vec![0u8; MAX_PACKET];
        let idle = self.assoc.config.idle_timeout;
        loop {
            enum Got {
                Client(usize),
                Handed(Vec<u8>),
                Upstream(usize, SocketAddr, bool),
            }
            let got = tokio::select! {
                () = cut.cancelled() => return CloseReason::Cut,
                () = stop.cancelled() => return CloseReason::Cut,
                () = tokio::time::sleep(idle) => return CloseReason::Closed,
                r = self.client.recv(&mut from_client) => r.map(Got::Client),
                Some(p) = handed.recv() => Ok(Got::Handed(p)),
                r = recv_from(self.v4.as_ref(), &mut from_v4) => r.map(|(n, a)| Got::Upstream(n, a, true)),
                r = recv_from(self.v6.as_ref(), &mut from_v6) => r.map(|(n, a)| Got::Upstream(n, a, false)),
            };
            match got {
                Ok(Got::Client(n)) => {
                    let packet = from_client[..n].to_vec();
                    self.client_packet(&packet).await;
                }
                Ok(Got::Handed(packet)) => self.client_packet(&packet).await,
                Ok(Got::Upstream(n, from, v4)) => {
                    let payload = if v4 { &from_v4[..n] } else { &from_v6[..n] };
                    let payload = payload.to_vec();
                    self.download(from, &payload).await;
                }
                // A lost datagram (ICMP unreachable, a kernel drop) ends nothing.
                Err(e) => tracing::trace!(error = %e, "shadowsocks udp: a datagram lost"),
            }
        }
    }

    /// A packet from the client: opened with the association's key (a packet no longer its
    /// key's, or a replayed SIP022 one, is dropped) and sent on.
    async fn client_packet(&mut self, packet: &[u8]) {
        let a = self.assoc;
        match open(&a.context, a.config.cipher, &a.key, packet) {
            Some(opened) => self.upload(opened).await,
            None => {
                tracing::debug!(source = %a.source, "shadowsocks udp: a packet the association's key does not open")
            }
        }
    }

    /// Sends an opened packet to its target from the upstream socket of its family.
    async fn upload(&mut self, opened: Opened) {
        if let Some(control) = &opened.control {
            if !self
                .window
                .accept(control.client_session_id, control.packet_id)
            {
                tracing::debug!(source = %self.assoc.source, "shadowsocks udp: a replayed packet");
                return;
            }
            self.client_session = Some(control.client_session_id);
        }
        let target = match &opened.target {
            Address::SocketAddress(a) => Some(*a),
            Address::DomainNameAddress(host, port) => {
                relay::resolve(&Target::Domain(host.clone(), *port))
                    .await
                    .ok()
                    .and_then(|a| a.into_iter().next())
            }
        };
        let Some(target) = target else {
            tracing::debug!(source = %self.assoc.source, target = %opened.target, "shadowsocks udp: unresolved target");
            return;
        };
        let a = self.assoc;
        let slot = if target.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if slot.is_none() {
            match relay::udp_upstream(target, a.identity.id, &*a.hub.kernel).await {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "shadowsocks udp: no upstream socket");
                    return;
                }
            }
        }
        let socket = slot.as_ref().expect("made above");
        if socket.send_to(&opened.payload, target).await.is_ok() {
            self.moved.rx_bytes += opened.payload.len() as u64;
        }
    }

    /// Seals a datagram from `from` for the client and sends it by the client socket.
    async fn download(&mut self, from: SocketAddr, payload: &[u8]) {
        let a = self.assoc;
        let mut control = UdpSocketControlData::default();
        if let Some(client) = self.client_session {
            control.client_session_id = client;
            control.server_session_id = self.session.id;
            control.packet_id = self.session.next_packet;
            self.session.next_packet += 1;
        }
        let mut sealed = BytesMut::with_capacity(payload.len() + 128);
        encrypt_server_payload(
            &a.context,
            a.config.cipher.kind(),
            &a.key,
            &Address::SocketAddress(from),
            &control,
            payload,
            &mut sealed,
        );
        if self.client.send(&sealed).await.is_ok() {
            self.moved.tx_bytes += payload.len() as u64;
        }
    }
}

/// Receives from `socket`, or waits forever when there is none yet.
async fn recv_from(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
