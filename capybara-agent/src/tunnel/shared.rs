//! [`Inner`]: what the tunnel's threads share (the server's keys, the TUN device's queues, the UDP
//! sockets and their offloads, the current peer table and its generation, the event bus, the
//! drop counters), and the steps
//! every thread takes on a peer: send a datagram, make its `Tunn` when first needed, record a
//! handshake or an authenticated packet (roaming, liveness), emit an event. The `wg-uapi` thread
//! sees it through [`uapi::Interface`].

use std::{
    net::{SocketAddr, SocketAddrV6, UdpSocket},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use boringtun::{
    noise::{Tunn, TunnResult, rate_limiter::RateLimiter},
    x25519,
};

use super::{
    auth_table::AuthTable,
    device::TunnelDevice,
    events::{AuthFailure, TunnelEvent},
    keys::{PrivateKey, PublicKey},
    peers::{Peer, PeerConfig, PeerState, PeerStatus, Table, status},
    uapi,
};

/// What the threads share.
pub(super) struct Inner {
    /// The server's key (UAPI `private_key`).
    pub(super) private_key: PrivateKey,
    /// Its public key.
    pub(super) public_key: PublicKey,
    /// The same two as boringtun takes them.
    pub(super) secret: x25519::StaticSecret,
    pub(super) static_public: x25519::PublicKey,
    /// The bound UDP port.
    pub(super) listen_port: u16,
    /// The TUN device, one queue per worker (read by `wg-tun-<i>`, written by `wg-udp-<i>`).
    pub(super) device: TunnelDevice,
    /// The UDP sockets, one per worker, all bound to the listen port (`SO_REUSEPORT` when more
    /// than one: the kernel gives each flow, so each peer endpoint, to one socket by the hash
    /// of its 4-tuple). Socket `i` is read by `wg-udp-<i>` and written by `wg-tun-<i>`; any of
    /// them can send to any peer (same local port), the other threads send on the first.
    pub(super) sockets: Vec<UdpSocket>,
    /// `UDP_SEGMENT`/`UDP_GRO` on those sockets and what they carried.
    pub(super) udp: UdpOffload,
    /// What each worker carried, one cache line each.
    pub(super) workers: Vec<WorkerStats>,
    /// The socket is AF_INET6 (dual-stack): IPv4 endpoints are sent to as v4-mapped addresses.
    pub(super) socket_v6: bool,
    /// Handshake MAC checks and cookies under load, shared by every peer's `Tunn`.
    pub(super) rate_limiter: Arc<RateLimiter>,
    /// The current peer snapshot.
    pub(super) table: RwLock<Arc<Table>>,
    /// Bumped after each new snapshot; the data path threads compare it per batch.
    pub(super) generation: AtomicU64,
    /// Serialises control operations (add/update/remove/kick) and owns the index allocator.
    pub(super) control: Mutex<u32>,
    /// Event bus; each subscriber has its own queue of `wg::EVENT_CAPACITY`.
    pub(super) events: tokio::sync::broadcast::Sender<TunnelEvent>,
    /// Silence after which a connected peer is reported gone.
    pub(super) disconnect_after: Duration,
    /// Failed handshakes counted per prefix (`wg-udp` records, `wg-timers` flushes).
    pub(super) auth_table: Mutex<AuthTable>,
    /// Drop counters, see [`DropCounters`](crate::tunnel::DropCounters).
    pub(super) drops_no_route: AtomicU64,
    pub(super) drops_no_endpoint: AtomicU64,
    pub(super) drops_bad_source: AtomicU64,
    /// Whether handshakes of peers without a live session are answered (false: a cluster node
    /// that lost its lease admits no new sessions; `WgTunnel::set_admitting`).
    pub(super) admitting: std::sync::atomic::AtomicBool,
    pub(super) drops_invalid: AtomicU64,
    /// Handshakes completed (rekeys included), see [`HandshakeCounters`](crate::tunnel::wg::HandshakeCounters).
    pub(super) handshakes_completed: AtomicU64,
    /// Handshakes failed, by [`AuthFailure`] (in the order of its variants).
    pub(super) handshakes_failed: [AtomicU64; 4],
    /// Called per failed handshake (the reputation engine), once set.
    pub(super) failure_hook: super::reputation::HookSlot,
}

/// UDP segmentation offloads on the WireGuard sockets (`UDP_SEGMENT` on sends, `UDP_GRO` on
/// receives) and counters of what they carried (added once per batch, not per datagram).
#[derive(Debug, Default)]
pub(super) struct UdpOffload {
    /// Sends use `UDP_SEGMENT`: the kernel has it and no GSO send failed with `EIO` (a device
    /// without checksum offload on the route; then cleared for good, as wireguard-go does).
    pub(super) gso: AtomicBool,
    /// `UDP_GRO` is set on every socket: a receive may return a coalesced run of datagrams.
    pub(super) gro: bool,
    /// Messages sent with more than one datagram in them, and those datagrams.
    pub(super) gso_sends: AtomicU64,
    pub(super) gso_datagrams: AtomicU64,
    /// Coalesced receives (more than one datagram), and those datagrams.
    pub(super) gro_receives: AtomicU64,
    pub(super) gro_datagrams: AtomicU64,
}

/// Datagrams a worker received (`wg-udp-<i>`, segments of a GRO run counted one by one) and
/// sent (`wg-tun-<i>`'s data packets), added once per batch; a cache line of its own, so
/// workers never write the same line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct WorkerStats {
    pub(super) rx_datagrams: AtomicU64,
    pub(super) tx_datagrams: AtomicU64,
}

impl Inner {
    /// The address to give the socket for `addr`.
    pub(super) fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match (self.socket_v6, addr) {
            (true, SocketAddr::V4(a)) => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            _ => addr,
        }
    }

    pub(super) fn send_to(&self, peer: Option<&Peer>, data: &[u8], to: SocketAddr) {
        match self.sockets[0].send_to(data, self.wire_addr(to)) {
            Ok(n) => {
                if let Some(p) = peer {
                    p.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(error = %e, %to, "WireGuard send failed"),
        }
    }

    pub(super) fn snapshot(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn publish(&self, table: Table) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(super) fn emit(&self, event: TunnelEvent) {
        // Connects, disconnects and roaming are rare: worth a log line each. Failed handshakes
        // are not (anyone can send them): the auth table logs a summary instead.
        if matches!(
            event,
            TunnelEvent::AuthFailed { .. } | TunnelEvent::AuthFailures(_)
        ) {
            tracing::debug!(?event, "tunnel event");
        } else {
            tracing::info!(?event, "tunnel event");
        }
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    pub(super) fn auth_failed(
        &self,
        source: SocketAddr,
        public_key: Option<PublicKey>,
        reason: AuthFailure,
    ) {
        self.drops_invalid.fetch_add(1, Ordering::Relaxed);
        self.handshakes_failed[reason as usize].fetch_add(1, Ordering::Relaxed);
        self.failure_hook.call(source.ip(), reason);
        let first = self
            .auth_table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(
                source,
                public_key,
                reason,
                Instant::now(),
                SystemTime::now(),
            );
        if first.is_some() {
            self.emit(TunnelEvent::AuthFailed {
                source,
                public_key,
                reason,
            });
        }
    }

    /// Every `auth_table::INTERVAL` (called by `wg-timers`): the counted failures as events.
    pub(super) fn flush_auth(&self, now: Instant) {
        let reports = {
            let mut t = self.auth_table.lock().unwrap_or_else(|p| p.into_inner());
            if !t.due(now) {
                return;
            }
            t.flush(now)
        };
        for r in reports {
            self.emit(TunnelEvent::AuthFailures(r));
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
    pub(super) fn tunn<'a>(&self, peer: &Peer, st: &'a mut PeerState) -> &'a mut Tunn {
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
    pub(super) fn seen(&self, peer: &Peer, st: &mut PeerState, src: SocketAddr, now: Instant) {
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
    pub(super) fn authenticated(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        src: SocketAddr,
        now: Instant,
    ) {
        if std::mem::take(&mut st.confirm_pending) {
            self.handshake_done(peer, st, src, now);
        } else {
            self.seen(peer, st, src, now);
        }
    }

    /// A handshake completed with `peer` from `src`: Connected unless it is a rekey.
    pub(super) fn handshake_done(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        src: SocketAddr,
        now: Instant,
    ) {
        let at = SystemTime::now();
        st.last_handshake = Some(at);
        self.handshakes_completed.fetch_add(1, Ordering::Relaxed);
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
    pub(super) fn flush_queue(
        &self,
        peer: &Peer,
        st: &mut PeerState,
        to: SocketAddr,
        buf: &mut [u8],
    ) {
        let Some(tunn) = st.tunn.as_mut() else { return };
        while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], buf) {
            self.send_to(Some(peer), p, to);
        }
    }
}

impl uapi::Interface for Inner {
    fn private_key(&self) -> &PrivateKey {
        &self.private_key
    }

    fn listen_port(&self) -> u16 {
        self.listen_port
    }

    fn peers(&self) -> Vec<PeerStatus> {
        // The inherent method, which `WgTunnel::peers` calls too.
        Inner::peers(self)
    }
}
