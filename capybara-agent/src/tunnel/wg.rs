//! [`WgTunnel`]: the WireGuard interface's public API — start (TUN device, UDP socket, the
//! threads, the UAPI socket), peers added, updated, removed and kicked by publishing new peer
//! tables, status, events and drop counters; with [`WgConfig`] and [`WgError`]. The peer table
//! is in `peers`, what the threads share in `shared`, the threads in `threads`; the module docs
//! (`tunnel/mod.rs`) give the design and its numbers.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use boringtun::{noise::rate_limiter::RateLimiter, x25519};
use ipnet::IpNet;

use super::{
    auth_table::AuthTable,
    device::{TunnelDevice, TunnelDeviceConfig, TunnelError},
    events::{DisconnectReason, TunnelEvent},
    keys::{PrivateKey, PublicKey},
    liveness::{DEFAULT_DISCONNECT_AFTER, Liveness},
    peers::{Peer, PeerConfig, PeerState, PeerStatus, Table, status},
    shared::Inner,
    sockets::{bind_udp, udp_offload},
    threads::{rx::udp_loop, timers::timer_loop, tx::tun_loop},
    uapi::{self, UapiError, UapiSocket},
};

/// Handshake messages per second accepted before cookies are demanded (each is verified twice,
/// by the dispatcher and by the peer's `Tunn`, against the one shared limiter).
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// Events buffered per subscriber before the slowest loses the oldest.
const EVENT_CAPACITY: usize = 4096;

/// How to start a [`WgTunnel`].
#[derive(Clone, Debug)]
pub struct WgConfig {
    /// The TUN device.
    pub device: TunnelDeviceConfig,
    /// UDP listen port (IPv6 and IPv4 on one dual-stack socket); 0 picks a free one.
    pub listen_port: u16,
    /// The one address to listen on instead of every address (`None`, the default): a
    /// failover group's service address (`crate::cluster::failover`), bound before the node
    /// holds it (`IP_FREEBIND`) so that replies leave from it and a client's endpoint stays it.
    pub listen_address: Option<std::net::IpAddr>,
    /// The server's private key.
    pub private_key: PrivateKey,
    /// Directory of the UAPI socket (`paths::WG_UAPI_DIR`); `None`: no socket.
    pub uapi_dir: Option<PathBuf>,
    /// Time without a handshake or authenticated packet after which a connected peer is
    /// reported disconnected.
    pub disconnect_after: Duration,
    /// Workers per direction, 1–[`MAX_WORKERS`]: each has a UDP socket on the listen port
    /// (`SO_REUSEPORT`), a TUN queue, a `wg-udp-<i>` and a `wg-tun-<i>` thread.
    pub workers: usize,
}

/// Most workers a tunnel takes (the kernel's limit of queues on a TUN device is 256).
pub const MAX_WORKERS: usize = 256;

/// The default number of workers: the CPUs this process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

impl WgConfig {
    /// A configuration with the defaults: UAPI in `paths::WG_UAPI_DIR`, disconnect after 180 s,
    /// one worker per CPU ([`default_workers`]).
    pub fn new(device: TunnelDeviceConfig, listen_port: u16, private_key: PrivateKey) -> Self {
        WgConfig {
            device,
            listen_port,
            listen_address: None,
            private_key,
            uapi_dir: Some(PathBuf::from(crate::paths::WG_UAPI_DIR)),
            disconnect_after: DEFAULT_DISCONNECT_AFTER,
            workers: default_workers(),
        }
    }
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

/// Handshakes since the tunnel started: completed (a responder's once the initiator's first
/// packet on the new session arrived; rekeys of connected peers included) and failed, by
/// [`AuthFailure`](crate::tunnel::AuthFailure). Relaxed atomics, counted on the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCounters {
    /// Completed handshakes.
    pub completed: u64,
    /// Initiations from a key that is no peer.
    pub unknown_key: u64,
    /// Handshakes whose MAC does not match our public key.
    pub bad_mac: u64,
    /// Initiations whose static key could not be decrypted.
    pub undecryptable: u64,
    /// Handshakes a peer's session refused.
    pub rejected: u64,
}

/// What UDP segmentation offload carried on the WireGuard sockets since the tunnel started
/// (`UDP_SEGMENT` sends, `UDP_GRO` receives), and whether each is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpOffloadCounters {
    /// Sends use `UDP_SEGMENT` (the kernel has it and no send was refused with `EIO`).
    pub gso: bool,
    /// The sockets have `UDP_GRO` set.
    pub gro: bool,
    /// Messages sent with more than one datagram in them.
    pub gso_sends: u64,
    /// The datagrams in those messages.
    pub gso_datagrams: u64,
    /// Receives that returned a coalesced run (more than one datagram).
    pub gro_receives: u64,
    /// The datagrams in those runs.
    pub gro_datagrams: u64,
}

/// What one worker carried since the tunnel started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// WireGuard datagrams its socket received (each segment of a GRO run counted).
    pub rx_datagrams: u64,
    /// Data datagrams it encrypted and sent (handshakes and keepalives not counted).
    pub tx_datagrams: u64,
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
    /// The number of workers is 0 or above [`MAX_WORKERS`].
    #[error("workers: {workers} is invalid: 1–{MAX_WORKERS}")]
    Workers {
        /// The number given.
        workers: usize,
    },
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

/// The agent's WireGuard interface. Dropping it stops the threads, closes the device (which
/// removes it) and removes the UAPI socket.
pub struct WgTunnel {
    /// What the threads share.
    inner: Arc<Inner>,
    /// Write end of the stop pipe: one byte stops every thread.
    wake: std::io::PipeWriter,
    /// `wg-udp-<i>` and `wg-tun-<i>` per worker, `wg-timers` and (with a UAPI directory)
    /// `wg-uapi`.
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
        if !(1..=MAX_WORKERS).contains(&config.workers) {
            return Err(WgError::Workers {
                workers: config.workers,
            });
        }
        let device = TunnelDevice::create(&config.device, config.workers)?;
        let (sockets, socket_v6) =
            bind_udp(config.listen_port, config.listen_address, config.workers)?;
        let udp = udp_offload(&sockets);
        let listen_port = sockets[0]
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
            workers: (0..sockets.len()).map(|_| Default::default()).collect(),
            sockets,
            udp,
            socket_v6,
            table: RwLock::new(Arc::new(Table::default())),
            generation: AtomicU64::new(0),
            control: Mutex::new(rand::random::<u32>() & 0x00ff_ffff),
            events: tokio::sync::broadcast::channel(EVENT_CAPACITY).0,
            disconnect_after: config.disconnect_after,
            auth_table: Mutex::new(AuthTable::new(std::time::Instant::now())),
            drops_no_route: AtomicU64::new(0),
            drops_no_endpoint: AtomicU64::new(0),
            drops_bad_source: AtomicU64::new(0),
            admitting: std::sync::atomic::AtomicBool::new(true),
            drops_invalid: AtomicU64::new(0),
            handshakes_completed: AtomicU64::new(0),
            handshakes_failed: Default::default(),
            failure_hook: Default::default(),
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
        for w in 0..config.workers {
            let (inner_rx, stop_rx) = (inner.clone(), stop()?);
            tunnel.threads.push(spawn(
                &format!("wg-udp-{w}"),
                Box::new(move || udp_loop(&inner_rx, w, &stop_rx)),
            )?);
            let (inner_tx, stop_tx) = (inner.clone(), stop()?);
            tunnel.threads.push(spawn(
                &format!("wg-tun-{w}"),
                Box::new(move || tun_loop(&inner_tx, w, &stop_tx)),
            )?);
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
            workers = config.workers,
            udp_gso = inner.udp.gso.load(Ordering::Relaxed),
            udp_gro = inner.udp.gro,
            "WireGuard tunnel up"
        );
        Ok(tunnel)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.inner.device.name()
    }

    /// The names of the tunnel's threads that have ended (panicked or returned) while the
    /// tunnel runs: empty when the data path, the timers and the UAPI socket are all served.
    pub fn dead_threads(&self) -> Vec<String> {
        self.threads
            .iter()
            .filter(|t| t.is_finished())
            .map(|t| t.thread().name().unwrap_or("?").to_owned())
            .collect()
    }

    /// Workers per direction (UDP sockets, TUN queues, `wg-udp-<i>`/`wg-tun-<i>` threads).
    pub fn workers(&self) -> usize {
        self.inner.sockets.len()
    }

    /// What each worker carried since the tunnel started, by worker.
    pub fn worker_counters(&self) -> Vec<WorkerCounters> {
        self.inner
            .workers
            .iter()
            .map(|w| WorkerCounters {
                rx_datagrams: w.rx_datagrams.load(Ordering::Relaxed),
                tx_datagrams: w.tx_datagrams.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// What UDP segmentation offload carried since the tunnel started, and whether it is on.
    pub fn udp_offload(&self) -> UdpOffloadCounters {
        let u = &self.inner.udp;
        UdpOffloadCounters {
            gso: u.gso.load(Ordering::Relaxed),
            gro: u.gro,
            gso_sends: u.gso_sends.load(Ordering::Relaxed),
            gso_datagrams: u.gso_datagrams.load(Ordering::Relaxed),
            gro_receives: u.gro_receives.load(Ordering::Relaxed),
            gro_datagrams: u.gro_datagrams.load(Ordering::Relaxed),
        }
    }

    /// The UDP port the tunnel listens on.
    pub fn listen_port(&self) -> u16 {
        self.inner.listen_port
    }

    /// The server's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// Admits new sessions (`true`, the default) or only rekeys of live ones (`false`: a
    /// cluster node without its lease, `crate::cluster::failover`): a handshake initiation from
    /// a peer that has no live session is dropped unanswered.
    pub fn set_admitting(&self, admitting: bool) {
        self.inner.admitting.store(admitting, Ordering::Relaxed);
    }

    /// Sets the hook called with every failed handshake's source and reason on the thread
    /// that saw it (`wg-udp`; see [`super::reputation`]); false if one was set already.
    pub fn set_failure_hook(&self, hook: super::reputation::FailureHook) -> bool {
        self.inner.failure_hook.set(hook)
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

    /// Handshakes completed and failed since the tunnel started.
    pub fn handshakes(&self) -> HandshakeCounters {
        let i = &self.inner;
        let failed =
            |r: crate::tunnel::AuthFailure| i.handshakes_failed[r as usize].load(Ordering::Relaxed);
        use crate::tunnel::AuthFailure as F;
        HandshakeCounters {
            completed: i.handshakes_completed.load(Ordering::Relaxed),
            unknown_key: failed(F::UnknownKey),
            bad_mac: failed(F::BadMac),
            undecryptable: failed(F::Undecryptable),
            rejected: failed(F::Rejected),
        }
    }

    /// Peers connected now (a completed handshake, not yet reported gone). Reads each peer's
    /// state under its lock: for a scrape or a status call, not for the data path.
    pub fn connected_peers(&self) -> usize {
        self.inner
            .snapshot()
            .by_key
            .values()
            .filter(|p| {
                p.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .liveness
                    .is_connected()
            })
            .count()
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
