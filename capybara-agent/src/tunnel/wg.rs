//! [`WgTunnel`]: the WireGuard interface — TUN device, UDP socket, peers, data path threads,
//! timers, events, UAPI. The module docs (`tunnel/mod.rs`) give the design and its numbers.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::{AsFd, AsRawFd as _},
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use boringtun::{
    noise::{
        Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
        rate_limiter::RateLimiter,
    },
    x25519,
};
use ipnet::IpNet;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg},
};

use super::{
    allowed_ips::AllowedIps,
    device::{TunnelDevice, TunnelDeviceConfig, TunnelError},
    keys::{PresharedKey, PrivateKey, PublicKey},
    liveness::{DEFAULT_DISCONNECT_AFTER, Liveness, SourceLimiter},
    uapi::{self, UapiError, UapiSocket},
};

/// Datagrams / TUN packets handled per wake-up and per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;
/// Bytes per packet slot: the largest datagram (MTU + 32 bytes of WireGuard header/tag) fits.
const SLOT: usize = 2048;
/// Room for the virtio-net header in front of packets written to an offloading TUN.
const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Capacity of a TUN write buffer with offloads: GRO may coalesce up to 64 KiB into it.
const GRO_CAP: usize = VNET + 65_536;
/// Period of the timer thread (boringtun's `update_timers`, keepalives, disconnect checks).
const TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second accepted before cookies are demanded (each is verified twice,
/// by the dispatcher and by the peer's `Tunn`, against the one shared limiter).
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// One auth-failure event per source per this interval.
const AUTH_EVENT_INTERVAL: Duration = Duration::from_secs(10);
/// Sources remembered by the auth-failure rate limit.
const AUTH_EVENT_SOURCES: usize = 4096;
/// Events buffered per subscriber before the slowest loses the oldest.
const EVENT_CAPACITY: usize = 4096;

/// How to start a [`WgTunnel`].
#[derive(Clone, Debug)]
pub struct WgConfig {
    /// The TUN device.
    pub device: TunnelDeviceConfig,
    /// UDP listen port (IPv6 and IPv4 on one dual-stack socket); 0 picks a free one.
    pub listen_port: u16,
    /// The server's private key.
    pub private_key: PrivateKey,
    /// Directory of the UAPI socket (`paths::WG_UAPI_DIR`); `None`: no socket.
    pub uapi_dir: Option<PathBuf>,
    /// Time without a handshake or authenticated packet after which a connected peer is
    /// reported disconnected.
    pub disconnect_after: Duration,
}

impl WgConfig {
    /// A configuration with the defaults: UAPI in `paths::WG_UAPI_DIR`, disconnect after 180 s.
    pub fn new(device: TunnelDeviceConfig, listen_port: u16, private_key: PrivateKey) -> Self {
        WgConfig {
            device,
            listen_port,
            private_key,
            uapi_dir: Some(PathBuf::from(crate::paths::WG_UAPI_DIR)),
            disconnect_after: DEFAULT_DISCONNECT_AFTER,
        }
    }
}

/// A peer as the API gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's public key (its identity).
    pub public_key: PublicKey,
    /// Optional preshared key.
    pub preshared_key: Option<PresharedKey>,
    /// Inner addresses/networks routed to this peer and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive from the server, seconds.
    pub persistent_keepalive: Option<u16>,
}

/// A peer's live state (`peers()`, `wg show`).
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Its preshared key (reported by UAPI, as the kernel does).
    pub preshared_key: Option<PresharedKey>,
    /// Where its last authenticated packet came from.
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer (authenticated WireGuard datagrams, as the kernel counts).
    pub rx_bytes: u64,
    /// Bytes sent to the peer (WireGuard datagrams).
    pub tx_bytes: u64,
    /// Persistent keepalive interval.
    pub persistent_keepalive: Option<u16>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Whether the peer is connected (see `liveness`).
    pub connected: bool,
}

/// Why a peer was reported disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// No handshake and no traffic for the configured time.
    Timeout,
    /// Kicked through [`WgTunnel::kick`].
    Kicked,
    /// Removed through [`WgTunnel::remove_peer`].
    Removed,
}

/// Why a handshake attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// A well-formed initiation (right server key) from a key that is no peer.
    UnknownKey,
    /// A handshake whose MAC does not match our public key (wrong server key or garbage).
    BadMac,
    /// An initiation whose static key could not be decrypted.
    Undecryptable,
    /// A peer's handshake that its session refused (replayed timestamp, wrong preshared key…).
    Rejected,
}

/// What the tunnel reports. Subscribe with [`WgTunnel::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEvent {
    /// A peer completed a handshake after being disconnected.
    Connected {
        /// The peer.
        public_key: PublicKey,
        /// Where it connected from.
        endpoint: SocketAddr,
        /// When.
        at: SystemTime,
    },
    /// A connected peer went away.
    Disconnected {
        /// The peer.
        public_key: PublicKey,
        /// Why.
        reason: DisconnectReason,
        /// When it was noticed.
        at: SystemTime,
    },
    /// A connected peer's packets now come from another address (roaming, NAT rebinding).
    EndpointChanged {
        /// The peer.
        public_key: PublicKey,
        /// The previous endpoint.
        from: SocketAddr,
        /// The new endpoint.
        to: SocketAddr,
    },
    /// A handshake failed (at most one event per source per 10 s).
    AuthFailed {
        /// Where the attempt came from.
        source: SocketAddr,
        /// The key it claimed, when it could be read.
        public_key: Option<PublicKey>,
        /// Why it failed.
        reason: AuthFailure,
    },
}

/// Counters of packets the data path dropped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// TUN packets whose destination is no peer's allowed IP.
    pub no_route: u64,
    /// TUN packets to a peer without an endpoint yet.
    pub no_endpoint: u64,
    /// Decrypted packets whose source is not in the sending peer's allowed IPs.
    pub bad_source: u64,
    /// Datagrams that failed to parse, authenticate or decrypt, or named no session.
    pub invalid: u64,
}

/// Errors of the tunnel. Peer operations leave the tunnel unchanged when they fail.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The TUN device could not be created.
    #[error(transparent)]
    Device(#[from] TunnelError),
    /// The UDP socket could not be bound.
    #[error("cannot bind the WireGuard UDP port {port}")]
    Bind {
        /// The listen port.
        port: u16,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The UAPI socket could not be created.
    #[error(transparent)]
    Uapi(#[from] UapiError),
    /// A data path thread could not be started.
    #[error("cannot start the tunnel threads")]
    Spawn(#[source] std::io::Error),
    /// `add_peer` with a key that is already a peer.
    #[error("public_key: peer {public_key} already exists")]
    PeerExists {
        /// The key.
        public_key: PublicKey,
    },
    /// An operation on a key that is no peer.
    #[error("public_key: no peer {public_key}")]
    NoSuchPeer {
        /// The key.
        public_key: PublicKey,
    },
    /// The peer's key is the server's own.
    #[error("public_key: {public_key} is the server's own key")]
    OwnKey {
        /// The key.
        public_key: PublicKey,
    },
    /// An allowed IP already belongs to another peer.
    #[error("allowed_ips: {net} already belongs to peer {owner}")]
    AllowedIpTaken {
        /// The prefix.
        net: IpNet,
        /// The peer that has it.
        owner: PublicKey,
    },
}

/// One peer: identity and counters outside the lock, the session state inside it.
struct Peer {
    /// The peer's identity.
    public_key: PublicKey,
    /// 24-bit index given to boringtun: its session indices are `index << 8 | n`, so the data
    /// path finds the peer of a data packet by `receiver_index >> 8`. Kept across kicks.
    index: u32,
    /// WireGuard bytes received from the peer (authenticated datagrams).
    rx_bytes: AtomicU64,
    /// WireGuard bytes sent to the peer.
    tx_bytes: AtomicU64,
    /// The peer has had a `Tunn` (a handshake or a packet to encrypt): only such peers can
    /// have timers, a session, a keepalive or a connection to lose, so the timer thread skips
    /// the others without taking their lock (at 100 000 peers the 4 ticks a second were ≈ 5 %
    /// of a core otherwise). Never cleared.
    awake: AtomicBool,
    /// Everything a packet of this peer reads or changes.
    state: Mutex<PeerState>,
}

/// A peer's session state, under its lock.
struct PeerState {
    /// boringtun's state machine: handshake, sessions, timers. `None` until the peer's first
    /// handshake (or a packet the server must encrypt for it), and again after a kick or a new
    /// preshared key: created by [`Inner::tunn`] when first needed (see the module docs for
    /// what a `Tunn` costs up front).
    tunn: Option<Box<Tunn>>,
    /// What the API configured.
    config: PeerConfig,
    /// Source of the last authenticated packet (roaming); `None` until the first handshake
    /// and after a kick.
    endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last completed handshake (UAPI, status).
    last_handshake: Option<SystemTime>,
    /// Connect/disconnect tracking.
    liveness: Liveness,
    /// We answered an initiation and wait for the initiator's first packet on the session.
    confirm_pending: bool,
    /// Last time anything was sent to the peer (persistent keepalive).
    last_tx: Instant,
}

/// An immutable snapshot of the peers, read by the data path without locks; control
/// operations build a new one and bump [`Inner::generation`].
#[derive(Default, Clone)]
struct Table {
    /// Peers by public key (handshake initiations, the API).
    by_key: HashMap<PublicKey, Arc<Peer>>,
    /// Peers by [`Peer::index`] (data packets, handshake responses, cookies).
    by_index: HashMap<u32, Arc<Peer>>,
    /// Cryptokey routing: allowed IPs → peer.
    routes: AllowedIps<Arc<Peer>>,
}

/// What the threads share.
pub(super) struct Inner {
    /// The server's key (UAPI `private_key`).
    private_key: PrivateKey,
    /// Its public key.
    public_key: PublicKey,
    /// The same two as boringtun takes them.
    secret: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    /// The bound UDP port.
    listen_port: u16,
    /// The TUN device (read by `wg-tun`, written by `wg-udp`).
    device: TunnelDevice,
    /// The UDP socket (read by `wg-udp`, written by every thread).
    socket: UdpSocket,
    /// The socket is AF_INET6 (dual-stack): IPv4 endpoints are sent to as v4-mapped addresses.
    socket_v6: bool,
    /// Handshake MAC checks and cookies under load, shared by every peer's `Tunn`.
    rate_limiter: Arc<RateLimiter>,
    /// The current peer snapshot.
    table: RwLock<Arc<Table>>,
    /// Bumped after each new snapshot; the data path threads compare it per batch.
    generation: AtomicU64,
    /// Serialises control operations (add/update/remove/kick) and owns the index allocator.
    control: Mutex<u32>,
    /// Event bus; each subscriber has its own queue of [`EVENT_CAPACITY`].
    events: tokio::sync::broadcast::Sender<TunnelEvent>,
    /// Silence after which a connected peer is reported gone.
    disconnect_after: Duration,
    /// One auth-failure event per source per [`AUTH_EVENT_INTERVAL`].
    auth_limiter: Mutex<SourceLimiter>,
    /// Drop counters, see [`DropCounters`].
    drops_no_route: AtomicU64,
    drops_no_endpoint: AtomicU64,
    drops_bad_source: AtomicU64,
    drops_invalid: AtomicU64,
}

/// The agent's WireGuard interface. Dropping it stops the threads, closes the device (which
/// removes it) and removes the UAPI socket.
pub struct WgTunnel {
    /// What the threads share.
    inner: Arc<Inner>,
    /// Write end of the stop pipe: one byte stops every thread.
    wake: std::io::PipeWriter,
    /// `wg-udp`, `wg-tun`, `wg-timers` and (with a UAPI directory) `wg-uapi`.
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WgTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgTunnel")
            .field("name", &self.inner.device.name())
            .field("listen_port", &self.inner.listen_port)
            .field("public_key", &self.inner.public_key)
            .finish_non_exhaustive()
    }
}

fn bind_udp(port: u16) -> Result<(UdpSocket, bool), WgError> {
    let bind_err = |source| WgError::Bind { port, source };
    // Dual-stack first (Linux's default bindv6only=0 lets one [::] socket take IPv4 too); IPv4
    // alone where IPv6 is disabled.
    let (socket, v6) = match UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(s) => (s, true),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => (
            UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).map_err(bind_err)?,
            false,
        ),
        Err(e) => return Err(bind_err(e)),
    };
    // Big buffers absorb bursts between wake-ups; FORCE needs CAP_NET_ADMIN, else the capped
    // plain option is used.
    use nix::sys::socket::{setsockopt, sockopt};
    for (force, plain) in [(true, false), (false, true)] {
        let _ = force.then(|| setsockopt(&socket, sockopt::RcvBufForce, &(4 << 20)));
        let _ = force.then(|| setsockopt(&socket, sockopt::SndBufForce, &(4 << 20)));
        let _ = plain.then(|| setsockopt(&socket, sockopt::RcvBuf, &(4 << 20)));
        let _ = plain.then(|| setsockopt(&socket, sockopt::SndBuf, &(4 << 20)));
    }
    Ok((socket, v6))
}

/// An endpoint as the data path stores it: IPv4-mapped IPv6 addresses become IPv4.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

impl Inner {
    pub(super) fn private_key(&self) -> &PrivateKey {
        &self.private_key
    }

    pub(super) fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// The address to give the socket for `addr`.
    fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match (self.socket_v6, addr) {
            (true, SocketAddr::V4(a)) => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            _ => addr,
        }
    }

    fn send_to(&self, peer: Option<&Peer>, data: &[u8], to: SocketAddr) {
        match self.socket.send_to(data, self.wire_addr(to)) {
            Ok(n) => {
                if let Some(p) = peer {
                    p.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(error = %e, %to, "WireGuard send failed"),
        }
    }

    fn snapshot(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, table: Table) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn emit(&self, event: TunnelEvent) {
        // Rate-limited at the source (auth failures) or rare (connects): worth a log line each.
        tracing::info!(?event, "tunnel event");
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    fn auth_failed(&self, source: SocketAddr, public_key: Option<PublicKey>, reason: AuthFailure) {
        self.drops_invalid.fetch_add(1, Ordering::Relaxed);
        let allowed = self
            .auth_limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(source.ip(), Instant::now());
        if allowed {
            self.emit(TunnelEvent::AuthFailed {
                source,
                public_key,
                reason,
            });
        }
    }

    fn new_tunn(&self, cfg: &PeerConfig, index: u32) -> Box<Tunn> {
        Box::new(Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(*cfg.public_key.as_bytes()),
            cfg.preshared_key.map(|k| *k.as_bytes()),
            // Persistent keepalive is ours (timer thread), so it can change without a new session.
            None,
            index,
            Some(self.rate_limiter.clone()),
        ))
    }

    /// The peer's `Tunn`, created now if it has none yet.
    fn tunn<'a>(&self, peer: &Peer, st: &'a mut PeerState) -> &'a mut Tunn {
        st.tunn.get_or_insert_with(|| {
            peer.awake.store(true, Ordering::Relaxed);
            self.new_tunn(&st.config, peer.index)
        })
    }

    pub(super) fn peers(&self) -> Vec<PeerStatus> {
        let table = self.snapshot();
        let mut out: Vec<PeerStatus> = table.by_key.values().map(|p| status(p)).collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    /// Records a packet authenticated from `src` for `peer`: endpoint roaming, liveness (a
    /// peer reported gone that sends on its still-live session is connected again).
    fn seen(&self, peer: &Peer, st: &mut PeerState, src: SocketAddr, now: Instant) {
        let old = st.endpoint.replace(src);
        if st.liveness.on_traffic(now) {
            self.emit(TunnelEvent::Connected {
                public_key: peer.public_key,
                endpoint: src,
                at: SystemTime::now(),
            });
        } else if let Some(from) = old
            && from != src
        {
            self.emit(TunnelEvent::EndpointChanged {
                public_key: peer.public_key,
                from,
                to: src,
            });
        }
    }

    /// An authenticated data packet or keepalive: completes a handshake we answered, else
    /// [`Inner::seen`].
    fn authenticated(&self, peer: &Peer, st: &mut PeerState, src: SocketAddr, now: Instant) {
        if std::mem::take(&mut st.confirm_pending) {
            self.handshake_done(peer, st, src, now);
        } else {
            self.seen(peer, st, src, now);
        }
    }

    /// A handshake completed with `peer` from `src`: Connected unless it is a rekey.
    fn handshake_done(&self, peer: &Peer, st: &mut PeerState, src: SocketAddr, now: Instant) {
        let at = SystemTime::now();
        st.last_handshake = Some(at);
        if st.liveness.is_connected() {
            self.seen(peer, st, src, now);
        } else {
            st.endpoint = Some(src);
            st.liveness.on_handshake(now);
            self.emit(TunnelEvent::Connected {
                public_key: peer.public_key,
                endpoint: src,
                at,
            });
        }
    }

    /// Sends what boringtun queued for the peer (packets that waited for the handshake).
    fn flush_queue(&self, peer: &Peer, st: &mut PeerState, to: SocketAddr, buf: &mut [u8]) {
        let Some(tunn) = st.tunn.as_mut() else { return };
        while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], buf) {
            self.send_to(Some(peer), p, to);
        }
    }
}

fn status(p: &Peer) -> PeerStatus {
    let st = p.state.lock().unwrap_or_else(|e| e.into_inner());
    PeerStatus {
        public_key: p.public_key,
        preshared_key: st.config.preshared_key,
        endpoint: st.endpoint,
        last_handshake: st.last_handshake,
        rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
        tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
        persistent_keepalive: st.config.persistent_keepalive,
        allowed_ips: st.config.allowed_ips.clone(),
        connected: st.liveness.is_connected(),
    }
}

/// Checks that every allowed IP of `cfg` is free (or already `cfg`'s own).
fn check_routes(table: &Table, cfg: &PeerConfig) -> Result<(), WgError> {
    for net in &cfg.allowed_ips {
        if let Some(owner) = table.routes.get_exact(net.trunc())
            && owner.public_key != cfg.public_key
        {
            return Err(WgError::AllowedIpTaken {
                net: *net,
                owner: owner.public_key,
            });
        }
    }
    Ok(())
}

impl WgTunnel {
    /// Creates the TUN device, binds the UDP socket, starts the data path and timer threads and
    /// the UAPI socket.
    pub fn start(config: WgConfig) -> Result<WgTunnel, WgError> {
        let device = TunnelDevice::create(&config.device)?;
        let (socket, socket_v6) = bind_udp(config.listen_port)?;
        let listen_port = socket
            .local_addr()
            .map_err(|source| WgError::Bind {
                port: config.listen_port,
                source,
            })?
            .port();
        let uapi = match &config.uapi_dir {
            Some(dir) => Some(UapiSocket::bind(dir, device.name())?),
            None => None,
        };
        let secret = config.private_key.secret();
        let static_public = x25519::PublicKey::from(&secret);
        let inner = Arc::new(Inner {
            public_key: config.private_key.public_key(),
            private_key: config.private_key,
            rate_limiter: Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT)),
            secret,
            static_public,
            listen_port,
            device,
            socket,
            socket_v6,
            table: RwLock::new(Arc::new(Table::default())),
            generation: AtomicU64::new(0),
            control: Mutex::new(rand::random::<u32>() & 0x00ff_ffff),
            events: tokio::sync::broadcast::channel(EVENT_CAPACITY).0,
            disconnect_after: config.disconnect_after,
            auth_limiter: Mutex::new(SourceLimiter::new(AUTH_EVENT_INTERVAL, AUTH_EVENT_SOURCES)),
            drops_no_route: AtomicU64::new(0),
            drops_no_endpoint: AtomicU64::new(0),
            drops_bad_source: AtomicU64::new(0),
            drops_invalid: AtomicU64::new(0),
        });
        let (stop_rx, wake) = std::io::pipe().map_err(WgError::Spawn)?;
        let mut tunnel = WgTunnel {
            inner: inner.clone(),
            wake,
            threads: Vec::new(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(WgError::Spawn)
        };
        let stop = || stop_rx.try_clone().map_err(WgError::Spawn);
        {
            let (inner, stop) = (inner.clone(), stop()?);
            tunnel
                .threads
                .push(spawn("wg-udp", Box::new(move || udp_loop(&inner, &stop)))?);
        }
        {
            let (inner, stop) = (inner.clone(), stop()?);
            tunnel
                .threads
                .push(spawn("wg-tun", Box::new(move || tun_loop(&inner, &stop)))?);
        }
        {
            let (inner, stop) = (inner.clone(), stop()?);
            tunnel.threads.push(spawn(
                "wg-timers",
                Box::new(move || timer_loop(&inner, &stop)),
            )?);
        }
        if let Some(sock) = uapi {
            let (weak, stop) = (Arc::downgrade(&inner), stop()?);
            tunnel.threads.push(spawn(
                "wg-uapi",
                Box::new(move || uapi::serve(sock, weak, stop)),
            )?);
        }
        tracing::info!(
            name = tunnel.name(),
            port = listen_port,
            public_key = %tunnel.public_key(),
            offload = inner.device.offload,
            "WireGuard tunnel up"
        );
        Ok(tunnel)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.inner.device.name()
    }

    /// The UDP port the tunnel listens on.
    pub fn listen_port(&self) -> u16 {
        self.inner.listen_port
    }

    /// The server's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// A receiver of the tunnel's events (from now on).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TunnelEvent> {
        self.inner.events.subscribe()
    }

    /// Adds a peer. Other peers' sessions are untouched.
    pub fn add_peer(&self, cfg: PeerConfig) -> Result<(), WgError> {
        self.add_peers(vec![cfg])
    }

    /// Adds peers, all or none: the snapshot is copied and published once for the whole batch
    /// (adding them one by one copies it once per peer, quadratic in the peer count; see the
    /// module docs). Fails, changing nothing, if a key is the server's own or already a peer
    /// (also within the batch), or an allowed IP is taken. Other peers' sessions are untouched.
    pub fn add_peers(&self, cfgs: Vec<PeerConfig>) -> Result<(), WgError> {
        let mut next = self.inner.control.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = cfgs.iter().find(|c| c.public_key == self.inner.public_key) {
            return Err(WgError::OwnKey {
                public_key: cfg.public_key,
            });
        }
        let mut table = Table::clone(&self.inner.snapshot());
        table.by_key.reserve(cfgs.len());
        table.by_index.reserve(cfgs.len());
        let mut index = *next;
        let now = Instant::now();
        for cfg in cfgs {
            if table.by_key.contains_key(&cfg.public_key) {
                return Err(WgError::PeerExists {
                    public_key: cfg.public_key,
                });
            }
            check_routes(&table, &cfg)?;
            let i = loop {
                let i = index;
                index = (index + 1) & 0x00ff_ffff;
                if !table.by_index.contains_key(&i) {
                    break i;
                }
            };
            let peer = Arc::new(Peer {
                public_key: cfg.public_key,
                index: i,
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
                awake: AtomicBool::new(false),
                state: Mutex::new(PeerState {
                    tunn: None,
                    config: cfg.clone(),
                    endpoint: None,
                    last_handshake: None,
                    liveness: Liveness::default(),
                    last_tx: now,
                    confirm_pending: false,
                }),
            });
            for net in &cfg.allowed_ips {
                table.routes.insert(net.trunc(), peer.clone());
            }
            table.by_index.insert(i, peer.clone());
            table.by_key.insert(cfg.public_key, peer);
        }
        *next = index;
        self.inner.publish(table);
        Ok(())
    }

    /// Changes a peer's allowed IPs, keepalive or preshared key. Its session survives unless
    /// the preshared key changes (a new key needs a new handshake).
    pub fn update_peer(&self, cfg: PeerConfig) -> Result<(), WgError> {
        let _guard = self.inner.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = Table::clone(&self.inner.snapshot());
        let peer = table
            .by_key
            .get(&cfg.public_key)
            .cloned()
            .ok_or(WgError::NoSuchPeer {
                public_key: cfg.public_key,
            })?;
        check_routes(&table, &cfg)?;
        let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
        for net in &st.config.allowed_ips {
            table.routes.remove(net.trunc());
        }
        for net in &cfg.allowed_ips {
            table.routes.insert(net.trunc(), peer.clone());
        }
        if st.config.preshared_key != cfg.preshared_key {
            st.tunn = None;
        }
        st.config = cfg;
        drop(st);
        self.inner.publish(table);
        Ok(())
    }

    /// Removes a peer (reported Disconnected/Removed if it was connected). Other peers'
    /// sessions are untouched.
    pub fn remove_peer(&self, public_key: &PublicKey) -> Result<(), WgError> {
        let _guard = self.inner.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = Table::clone(&self.inner.snapshot());
        let peer = table.by_key.remove(public_key).ok_or(WgError::NoSuchPeer {
            public_key: *public_key,
        })?;
        table.by_index.remove(&peer.index);
        let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
        for net in &st.config.allowed_ips {
            table.routes.remove(net.trunc());
        }
        let was_connected = st.liveness.end();
        drop(st);
        self.inner.publish(table);
        if was_connected {
            self.inner.emit(TunnelEvent::Disconnected {
                public_key: *public_key,
                reason: DisconnectReason::Removed,
                at: SystemTime::now(),
            });
        }
        Ok(())
    }

    /// Ends the peer's session now: its keys are forgotten, so its packets are dropped until it
    /// completes a new handshake (which the admission gate then holds, if the caller set it).
    /// Its endpoint is forgotten too, so the server never initiates that handshake itself: the
    /// client must. The peer stays configured.
    pub fn kick(&self, public_key: &PublicKey) -> Result<(), WgError> {
        let _guard = self.inner.control.lock().unwrap_or_else(|p| p.into_inner());
        let table = self.inner.snapshot();
        let peer = table.by_key.get(public_key).ok_or(WgError::NoSuchPeer {
            public_key: *public_key,
        })?;
        let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tunn = None;
        st.endpoint = None;
        st.confirm_pending = false;
        let was_connected = st.liveness.end();
        drop(st);
        if was_connected {
            self.inner.emit(TunnelEvent::Disconnected {
                public_key: *public_key,
                reason: DisconnectReason::Kicked,
                at: SystemTime::now(),
            });
        }
        Ok(())
    }

    /// Every peer's live state, sorted by key.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.inner.peers()
    }

    /// One peer's live state.
    pub fn peer(&self, public_key: &PublicKey) -> Option<PeerStatus> {
        self.inner
            .snapshot()
            .by_key
            .get(public_key)
            .map(|p| status(p))
    }

    /// Whether `public_key` is a peer.
    pub fn has_peer(&self, public_key: &PublicKey) -> bool {
        self.inner.snapshot().by_key.contains_key(public_key)
    }

    /// Packets the data path dropped, by reason.
    pub fn drops(&self) -> DropCounters {
        let i = &self.inner;
        DropCounters {
            no_route: i.drops_no_route.load(Ordering::Relaxed),
            no_endpoint: i.drops_no_endpoint.load(Ordering::Relaxed),
            bad_source: i.drops_bad_source.load(Ordering::Relaxed),
            invalid: i.drops_invalid.load(Ordering::Relaxed),
        }
    }
}

impl Drop for WgTunnel {
    fn drop(&mut self) {
        // The threads poll the pipe's read end: one byte wakes them all (nobody reads it).
        let _ = self.wake.write_all(&[1]);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a tunnel thread panicked");
            }
        }
    }
}

/// Waits until `fd` is readable; false when `stop` is.
fn wait_readable(fd: impl AsFd, stop: &std::io::PipeReader, timeout: PollTimeout) -> bool {
    let mut fds = [
        PollFd::new(fd.as_fd(), PollFlags::POLLIN),
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(_) => !fds[1].any().unwrap_or(false),
        Err(Errno::EINTR) => true,
        Err(e) => {
            tracing::error!(error = %e, "poll failed in the tunnel");
            std::thread::sleep(Duration::from_millis(10));
            true
        }
    }
}

/// A thread's view of the peer table, refreshed when the generation moved.
struct View {
    table: Arc<Table>,
    generation: u64,
}

impl View {
    fn new(inner: &Inner) -> View {
        View {
            generation: inner.generation.load(Ordering::Acquire),
            table: inner.snapshot(),
        }
    }

    fn refresh(&mut self, inner: &Inner) {
        let g = inner.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.generation = g;
            self.table = inner.snapshot();
        }
    }
}

/// UDP → decrypt → TUN. One `recvmmsg` takes up to [`BATCH`] datagrams; their plaintexts are
/// written to the TUN together (coalesced by GRO when the device offloads).
fn udp_loop(inner: &Inner, stop: &std::io::PipeReader) {
    let mut view = View::new(inner);
    let mut rx = vec![0u8; BATCH * SLOT];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let cap = if inner.device.offload {
        GRO_CAP
    } else {
        VNET + SLOT
    };
    let mut out: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(cap)).collect();
    let mut gro = tun_rs::GROTable::default();
    let mut scratch = vec![0u8; SLOT];
    let mut lens = [0usize; BATCH];
    let mut srcs = [None::<SocketAddr>; BATCH];
    let fd = inner.socket.as_raw_fd();
    loop {
        if !wait_readable(&inner.socket, stop, PollTimeout::NONE) {
            return;
        }
        loop {
            let n = {
                let mut chunks = rx.chunks_exact_mut(SLOT);
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
                match recvmmsg(
                    fd,
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(msgs) => {
                        let mut n = 0;
                        for m in msgs {
                            lens[n] = m.bytes;
                            srcs[n] = m.address.and_then(|a| sockaddr(&a));
                            n += 1;
                        }
                        n
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "recvmmsg on the WireGuard socket failed");
                        0
                    }
                }
            };
            if n == 0 {
                break;
            }
            view.refresh(inner);
            let now = Instant::now();
            let mut n_out = 0;
            for i in 0..n {
                let Some(src) = srcs[i] else { continue };
                let data = &rx[i * SLOT..i * SLOT + lens[i]];
                let buf = &mut out[n_out];
                buf.clear();
                buf.resize(VNET + SLOT, 0);
                if let Some(len) = on_datagram(
                    inner,
                    &view.table,
                    data,
                    src,
                    now,
                    &mut buf[VNET..],
                    &mut scratch,
                ) {
                    buf.truncate(VNET + len);
                    n_out += 1;
                }
            }
            if n_out > 0
                && let Err(e) = inner
                    .device
                    .device
                    .send_multiple(&mut gro, &mut out[..n_out], VNET)
            {
                tracing::debug!(error = %e, "TUN write failed");
            }
            if n < BATCH {
                break;
            }
        }
    }
}

fn sockaddr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v6) = a.as_sockaddr_in6() {
        return Some(normalize(SocketAddr::V6(SocketAddrV6::from(*v6))));
    }
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::V4(std::net::SocketAddrV4::from(*v4)))
}

/// Handles one datagram; returns the length of a plaintext packet written to `dst` for the TUN.
fn on_datagram(
    inner: &Inner,
    table: &Table,
    data: &[u8],
    src: SocketAddr,
    now: Instant,
    dst: &mut [u8],
    scratch: &mut [u8],
) -> Option<usize> {
    if data.len() < 4 || data[1..4] != [0, 0, 0] {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let peer = match (data[0], data.len()) {
        (4, 32..) => table.by_index.get(&(word(4) >> 8)),
        (1, 148) => return on_initiation(inner, table, data, src, now, scratch),
        (2, 92) => table.by_index.get(&(word(8) >> 8)),
        (3, 64) => table.by_index.get(&(word(4) >> 8)),
        _ => None,
    };
    let Some(peer) = peer else {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
    // No `Tunn` yet: no session, no handshake in flight and no cookie asked for, so a fresh one
    // would refuse this packet too.
    let Some(tunn) = st.tunn.as_mut() else {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let (src_ip, len) = match tunn.decapsulate(Some(src.ip()), data, dst) {
        TunnResult::WriteToTunnelV4(p, ip) => (IpAddr::V4(ip), p.len()),
        TunnResult::WriteToTunnelV6(p, ip) => (IpAddr::V6(ip), p.len()),
        TunnResult::Done => {
            // A keepalive or a cookie.
            if data[0] == 4 {
                peer.rx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                inner.authenticated(peer, &mut st, src, now);
            }
            return None;
        }
        TunnResult::WriteToNetwork(reply) => {
            // Our handshake was answered (we initiated): boringtun replies with a keepalive.
            let len = reply.len();
            scratch[..len].copy_from_slice(reply);
            peer.rx_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            inner.send_to(Some(peer), &scratch[..len], src);
            if data[0] == 2 {
                inner.handshake_done(peer, &mut st, src, now);
            }
            inner.flush_queue(peer, &mut st, src, scratch);
            return None;
        }
        TunnResult::Err(_) => {
            inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    peer.rx_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    inner.authenticated(peer, &mut st, src, now);
    drop(st);
    // Cryptokey routing, inbound half: the source must be one of this peer's allowed IPs.
    match table.routes.lookup(src_ip) {
        Some(owner) if Arc::ptr_eq(owner, peer) => Some(len),
        _ => {
            inner.drops_bad_source.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A handshake initiation: verify the MAC (and demand a cookie under load), find the peer by
/// the static key it carries, let its `Tunn` answer.
fn on_initiation(
    inner: &Inner,
    table: &Table,
    data: &[u8],
    src: SocketAddr,
    now: Instant,
    buf: &mut [u8],
) -> Option<usize> {
    let key = match inner.rate_limiter.verify_packet(Some(src.ip()), data, buf) {
        Ok(Packet::HandshakeInit(init)) => {
            match parse_handshake_anon(&inner.secret, &inner.static_public, &init) {
                Ok(half) => PublicKey::from_bytes(half.peer_static_public),
                Err(_) => {
                    inner.auth_failed(src, None, AuthFailure::Undecryptable);
                    return None;
                }
            }
        }
        Ok(_) => return None,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            let len = cookie.len();
            let cookie = buf[..len].to_vec();
            inner.send_to(None, &cookie, src);
            return None;
        }
        Err(TunnResult::Err(WireGuardError::UnderLoad)) => return None,
        Err(_) => {
            inner.auth_failed(src, None, AuthFailure::BadMac);
            return None;
        }
    };
    let Some(peer) = table.by_key.get(&key) else {
        inner.auth_failed(src, Some(key), AuthFailure::UnknownKey);
        return None;
    };
    let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
    match inner
        .tunn(peer, &mut st)
        .decapsulate(Some(src.ip()), data, buf)
    {
        TunnResult::WriteToNetwork(resp) => {
            let response = resp[0] == 2;
            let len = resp.len();
            peer.rx_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let resp = buf[..len].to_vec();
            inner.send_to(Some(peer), &resp, src);
            if response {
                // Complete once the initiator uses the session (its first authenticated
                // packet), as the kernel counts it: a client with the wrong preshared key
                // never gets that far.
                st.confirm_pending = true;
                if st.liveness.is_connected() {
                    inner.seen(peer, &mut st, src, now);
                } else {
                    st.endpoint = Some(src);
                }
            }
            inner.flush_queue(peer, &mut st, src, buf);
        }
        TunnResult::Err(_) => {
            drop(st);
            inner.auth_failed(src, Some(key), AuthFailure::Rejected);
        }
        _ => {}
    }
    None
}

/// TUN → encrypt → UDP. Up to [`BATCH`] packets per round (with offloads, one read may return a
/// TCP super-segment already split into many); their ciphertexts go out in one `sendmmsg`.
fn tun_loop(inner: &Inner, stop: &std::io::PipeReader) {
    let dev = &inner.device.device;
    let mut view = View::new(inner);
    let mut orig = vec![0u8; GRO_CAP];
    let mut pkts: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; SLOT])
        .collect();
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut tx = vec![0u8; BATCH * SLOT];
    let mut tx_lens = [0usize; BATCH];
    let mut tx_addrs: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut tx_peers: [Option<Arc<Peer>>; BATCH] = std::array::from_fn(|_| None);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut handshake = vec![0u8; SLOT];
    // Without offloads each read is one packet; with them a read may be a super-segment split
    // into up to 64 packets (64 KiB at an MSS of 1 KiB), so another read needs that much room.
    let room = if inner.device.offload { 64 } else { 1 };
    loop {
        if !wait_readable(dev, stop, PollTimeout::NONE) {
            return;
        }
        loop {
            let mut n = 0;
            let mut drained = false;
            while n < BATCH && (n == 0 || pkts.len() - n >= room) {
                match dev.recv_multiple(&mut orig, &mut pkts[n..], &mut sizes[n..], 0) {
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TUN read failed");
                        break;
                    }
                }
            }
            if n > 0 {
                view.refresh(inner);
                encrypt_batch(
                    inner,
                    &view.table,
                    &pkts[..n],
                    &sizes[..n],
                    &mut tx,
                    &mut tx_lens,
                    &mut tx_addrs,
                    &mut tx_peers,
                    &mut headers,
                    &mut handshake,
                );
            }
            if drained || n == 0 {
                break;
            }
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the per-thread buffers are passed in so nothing is allocated per batch"
)]
fn encrypt_batch(
    inner: &Inner,
    table: &Table,
    pkts: &[Vec<u8>],
    sizes: &[usize],
    tx: &mut [u8],
    tx_lens: &mut [usize; BATCH],
    tx_addrs: &mut [Option<SockaddrStorage>; BATCH],
    tx_peers: &mut [Option<Arc<Peer>>; BATCH],
    headers: &mut MultiHeaders<SockaddrStorage>,
    handshake: &mut [u8],
) {
    let now = Instant::now();
    let mut start = 0;
    while start < pkts.len() {
        let end = (start + BATCH).min(pkts.len());
        let mut m = 0;
        let mut current: Option<(&Arc<Peer>, std::sync::MutexGuard<'_, PeerState>)> = None;
        for i in start..end {
            let pkt = &pkts[i][..sizes[i]];
            let Some(dst) = Tunn::dst_address(pkt) else {
                inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(peer) = table.routes.lookup(dst) else {
                inner.drops_no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // Keep the lock while consecutive packets go to the same peer.
            if !current.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
                drop(current.take());
                current = Some((peer, peer.state.lock().unwrap_or_else(|p| p.into_inner())));
            }
            let Some((_, st)) = current.as_mut() else {
                continue;
            };
            let Some(endpoint) = st.endpoint else {
                inner.drops_no_endpoint.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let slot = &mut tx[m * SLOT..(m + 1) * SLOT];
            match inner.tunn(peer, st).encapsulate(pkt, slot) {
                TunnResult::WriteToNetwork(c) => {
                    let len = c.len();
                    if c[0] == 1 {
                        // No session: boringtun queued the packet and asks for a handshake.
                        handshake[..len].copy_from_slice(c);
                        inner.send_to(Some(peer), &handshake[..len], endpoint);
                    } else {
                        tx_lens[m] = len;
                        tx_addrs[m] = Some(SockaddrStorage::from(inner.wire_addr(endpoint)));
                        tx_peers[m] = Some(peer.clone());
                        m += 1;
                    }
                    st.last_tx = now;
                }
                TunnResult::Err(_) => {
                    inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        drop(current);
        send_batch(inner, tx, &tx_lens[..m], &tx_addrs[..m], headers);
        for (peer, len) in tx_peers[..m].iter_mut().zip(&tx_lens[..m]) {
            if let Some(p) = peer.take() {
                p.tx_bytes.fetch_add(*len as u64, Ordering::Relaxed);
            }
        }
        start = end;
    }
}

/// Sends `lens.len()` datagrams from the slots of `tx` with as few `sendmmsg` calls as the
/// socket allows.
fn send_batch(
    inner: &Inner,
    tx: &[u8],
    lens: &[usize],
    addrs: &[Option<SockaddrStorage>],
    headers: &mut MultiHeaders<SockaddrStorage>,
) {
    let fd = inner.socket.as_raw_fd();
    let mut done = 0;
    while done < lens.len() {
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let k = done + i;
            if k < lens.len() {
                [IoSlice::new(&tx[k * SLOT..k * SLOT + lens[k]])]
            } else {
                [IoSlice::new(&[])]
            }
        });
        let count = lens.len() - done;
        let no_cmsgs: [nix::sys::socket::ControlMessage<'_>; 0] = [];
        match sendmmsg(
            fd,
            headers,
            iovs[..count].iter(),
            &addrs[done..],
            no_cmsgs,
            MsgFlags::empty(),
        ) {
            Ok(r) => {
                let sent = r.count();
                if sent == 0 {
                    break;
                }
                done += sent;
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                // One bad destination (e.g. unreachable) must not stall the rest: skip it.
                tracing::debug!(error = %e, "sendmmsg failed");
                done += 1;
            }
        }
    }
}

/// boringtun's timers, our persistent keepalive, the disconnect timeout and the handshake rate
/// limiter's reset, every [`TICK`].
fn timer_loop(inner: &Inner, stop: &std::io::PipeReader) {
    let mut buf = vec![0u8; SLOT];
    let mut view = View::new(inner);
    loop {
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        let tick = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::NONE);
        if matches!(poll(&mut fds, tick), Ok(n) if n > 0) {
            return;
        }
        inner.rate_limiter.reset_count();
        view.refresh(inner);
        let now = Instant::now();
        for peer in view.table.by_key.values() {
            if !peer.awake.load(Ordering::Relaxed) {
                continue;
            }
            let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
            let endpoint = st.endpoint;
            // Without a `Tunn` there is no session or handshake whose timers could fire.
            if let Some(tunn) = st.tunn.as_mut()
                && let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut buf)
                && let Some(to) = endpoint
            {
                inner.send_to(Some(peer), p, to);
                st.last_tx = now;
            }
            if let (Some(k), Some(to)) = (st.config.persistent_keepalive, endpoint)
                && k > 0
                && now.saturating_duration_since(st.last_tx) >= Duration::from_secs(k.into())
            {
                if let TunnResult::WriteToNetwork(p) =
                    inner.tunn(peer, &mut st).encapsulate(&[], &mut buf)
                {
                    inner.send_to(Some(peer), p, to);
                }
                st.last_tx = now;
            }
            if st.liveness.poll(now, inner.disconnect_after) {
                drop(st);
                inner.emit(TunnelEvent::Disconnected {
                    public_key: peer.public_key,
                    reason: DisconnectReason::Timeout,
                    at: SystemTime::now(),
                });
            }
        }
    }
}
