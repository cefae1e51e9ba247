//! The peer table: a peer as the API configures it ([`PeerConfig`]) and reports it
//! ([`PeerStatus`]), the data path's [`Peer`] (counters outside its lock, the session state
//! inside), and the immutable [`Table`] snapshot the threads read without locks.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use boringtun::noise::Tunn;
use ipnet::IpNet;

use super::{
    allowed_ips::AllowedIps,
    keys::{PresharedKey, PublicKey},
    liveness::Liveness,
};

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

/// One peer: identity and counters outside the lock, the session state inside it.
pub(super) struct Peer {
    /// The peer's identity.
    pub(super) public_key: PublicKey,
    /// 24-bit index given to boringtun: its session indices are `index << 8 | n`, so the data
    /// path finds the peer of a data packet by `receiver_index >> 8`. Kept across kicks.
    pub(super) index: u32,
    /// WireGuard bytes received from the peer (authenticated datagrams).
    pub(super) rx_bytes: AtomicU64,
    /// WireGuard bytes sent to the peer.
    pub(super) tx_bytes: AtomicU64,
    /// The peer has had a `Tunn` (a handshake or a packet to encrypt): only such peers can
    /// have timers, a session, a keepalive or a connection to lose, so the timer thread skips
    /// the others without taking their lock (at 100 000 peers the 4 ticks a second were ≈ 5 %
    /// of a core otherwise). Never cleared.
    pub(super) awake: AtomicBool,
    /// Everything a packet of this peer reads or changes.
    pub(super) state: Mutex<PeerState>,
}

/// A peer's session state, under its lock.
pub(super) struct PeerState {
    /// boringtun's state machine: handshake, sessions, timers. `None` until the peer's first
    /// handshake (or a packet the server must encrypt for it), and again after a kick or a new
    /// preshared key: created by [`Inner::tunn`](crate::tunnel::shared::Inner::tunn) when first
    /// needed (see the tunnel's module docs for what a `Tunn` costs up front).
    pub(super) tunn: Option<Box<Tunn>>,
    /// What the API configured.
    pub(super) config: PeerConfig,
    /// Source of the last authenticated packet (roaming); `None` until the first handshake
    /// and after a kick.
    pub(super) endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last completed handshake (UAPI, status).
    pub(super) last_handshake: Option<SystemTime>,
    /// Connect/disconnect tracking.
    pub(super) liveness: Liveness,
    /// We answered an initiation and wait for the initiator's first packet on the session.
    pub(super) confirm_pending: bool,
    /// Last time anything was sent to the peer (persistent keepalive).
    pub(super) last_tx: Instant,
}

/// An immutable snapshot of the peers, read by the data path without locks; control
/// operations build a new one and bump
/// [`Inner::generation`](crate::tunnel::shared::Inner::generation).
#[derive(Default, Clone)]
pub(super) struct Table {
    /// Peers by public key (handshake initiations, the API).
    pub(super) by_key: HashMap<PublicKey, Arc<Peer>>,
    /// Peers by [`Peer::index`] (data packets, handshake responses, cookies).
    pub(super) by_index: HashMap<u32, Arc<Peer>>,
    /// Cryptokey routing: allowed IPs → peer.
    pub(super) routes: AllowedIps<Arc<Peer>>,
}

/// A peer's live state, read under its lock.
pub(super) fn status(p: &Peer) -> PeerStatus {
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
