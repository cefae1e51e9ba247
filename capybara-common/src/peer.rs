//! Peers: dense ids, the peer table entry and per-peer counters.
//!
//! A peer (one WireGuard public key, i.e. one device) gets a dense id `0..MAX_PEERS` from the
//! agent, so per-peer state lives in arrays indexed by id (one lookup, no hashing). Inner
//! addresses map to ids through exact-match hashes for host routes (/32, /128) and LPM tries for
//! ranges; the tries are consulted only when [`crate::config::CONFIG_F_PEER_V4_RANGES`] /
//! `..._V6_RANGES` say some peer has a range.
//!
//! Directions, as seen from the server: **rx** = from the peer (the tunnel device's TC ingress:
//! boringtun wrote a decrypted packet into the TUN), **tx** = to the peer (TC egress: the kernel
//! routed a packet into the TUN for boringtun to encrypt).
//!
//! Address encodings: IPv4 hash keys are the address as a host-order `u32`
//! (`u32::from(Ipv4Addr)`); IPv6 hash keys are the 16 octets. LPM trie data is always in network
//! byte order (octets), as the kernel's trie compares bits from the most significant one.

use crate::{drop::DROP_REASON_SLOTS, pod};

/// Dense peer id.
pub type PeerId = u32;

/// Peer table capacity (ids `0..MAX_PEERS`). The agent can lower it at load time.
pub const MAX_PEERS: u32 = 131_072;
/// Capacity of each address → peer map (a peer may have several allowed IPs).
pub const MAX_PEER_ADDRS: u32 = 262_144;
/// Largest IPv4 peer address pool (a /12): slots of [`crate::maps::PEER_POOL_V4`].
pub const MAX_PEER_POOL_V4: u32 = 1 << 20;

/// Peer table entry flag: the id is in use.
pub const PEER_F_ACTIVE: u32 = 1 << 0;
/// Peer table entry flag: the admission deadline (`PeerInfo::deadline_ns`) is the end of an MFA
/// admission (the MFA lifetime), not an account expiry: once it passes the kernel holds the peer
/// as `DropReason::GateMfaPending` instead of `GateExpired`, so the device must verify again.
/// Set by the agent only when the MFA lifetime ends before the account expiry.
pub const PEER_F_DEADLINE_MFA: u32 = 1 << 1;

/// `PeerInfo::gate` of an admitted peer.
pub const GATE_ADMITTED: u32 = 0;

/// One entry of [`crate::maps::PEERS`], indexed by [`PeerId`]. The agent writes it whole (one
/// map update per change), the kernel only reads it.
///
/// ## Admission gate
/// - `gate == GATE_ADMITTED` and `deadline_ns == 0`: admitted.
/// - `gate == GATE_ADMITTED` and `deadline_ns != 0`: admitted while `now < deadline_ns`, where
///   `now` is `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME: counts suspend, so a suspended server
///   does not stretch an admission). From `deadline_ns` on the peer is held as
///   `DropReason::GateExpired` by the kernel alone, or as `DropReason::GateMfaPending` when
///   [`PEER_F_DEADLINE_MFA`] is set (the deadline is the end of an MFA admission).
/// - `gate != GATE_ADMITTED`: held; `gate` is the `DropReason` discriminant of a `Gate*` reason.
///   A value that is not a gate reason (never written by the agent) holds the peer as
///   `GateKicked`: fail closed.
///
/// A packet racing an update may see each field old or new (array map updates are copies, not
/// atomic swaps): at worst the packets processed during the copy are judged by a mix of the two
/// states.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// `PEER_F_*` bits.
    pub flags: u32,
    /// [`GATE_ADMITTED`] or the `DropReason` discriminant the peer is held with.
    pub gate: u32,
    /// Admission deadline in CLOCK_BOOTTIME nanoseconds; 0 = none. Only read when admitted.
    pub deadline_ns: u64,
    /// The quota bucket the peer's traffic (both directions) is charged to
    /// ([`crate::quota`]); 0 = no quota.
    pub quota_bucket: u32,
    /// At most this many concurrent flows ([`crate::flow`]); 0 = unlimited (not tracked).
    pub flow_limit: u32,
    /// HTB class (`crate::shape::class_id`) that traffic *to* the peer is queued in on the
    /// tunnel device; 0 = not shaped.
    pub shape_tx: u32,
    /// HTB class on the shaping device (`crate::config::Config::shape_ifindex`) that traffic
    /// *from* the peer is redirected through; 0 = not shaped.
    pub shape_rx: u32,
}
const _: () = assert!(core::mem::size_of::<PeerInfo>() == 32);
const _: () = assert!(core::mem::offset_of!(PeerInfo, shape_tx) == 24);
const _: () = assert!(core::mem::offset_of!(PeerInfo, deadline_ns) == 8);
const _: () = assert!(core::mem::offset_of!(PeerInfo, quota_bucket) == 16);
const _: () = assert!(core::mem::offset_of!(PeerInfo, flow_limit) == 20);

/// Rate-limit slots of [`PeerEventState`]: one per event kind that is rate-limited per peer.
pub const PEER_EVENT_SLOTS: usize = 4;
/// Slot of gate-drop events in [`PeerEventState::last_ns`].
pub const PEER_EVENT_SLOT_GATE: usize = 0;
/// Slot of flow-limit events in [`PeerEventState::last_ns`].
pub const PEER_EVENT_SLOT_FLOW: usize = 1;

/// One entry of [`crate::maps::PEER_EVENTS`], indexed by [`PeerId`]: when the kernel last
/// emitted a rate-limited event of each kind for the peer (CLOCK_BOOTTIME ns, 0 = never).
/// Written by the kernel only, by compare-exchange: of CPUs racing within one interval only one
/// emits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEventState {
    /// Indexed by `PEER_EVENT_SLOT_*`.
    pub last_ns: [u64; PEER_EVENT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<PeerEventState>() == 32);

/// Per-peer traffic counters, one per CPU in [`crate::maps::PEER_STATS`]: the only per-peer
/// counters a passing packet touches, so they are kept to half a cache line (the drops by reason
/// live in [`PeerDrops`]; together they were 160 B, three lines, per peer and CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets received from the peer and passed.
    pub rx_packets: u64,
    /// Bytes (IP packet length) received from the peer and passed.
    pub rx_bytes: u64,
    /// Packets sent to the peer and passed.
    pub tx_packets: u64,
    /// Bytes (IP packet length) sent to the peer and passed.
    pub tx_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PeerCounters>() == 32);

/// Per-peer drops by reason (`DropReason as usize`), one per CPU in
/// [`crate::maps::PEER_DROPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerDrops {
    /// Dropped packets (either direction), indexed by `DropReason as usize`.
    pub drops: [u64; DROP_REASON_SLOTS],
}
const _: () = assert!(core::mem::size_of::<PeerDrops>() == 128);

/// A peer's counters and drops summed over CPUs ([`PeerCounters`] + [`PeerDrops`]): what the
/// agent reports. Only packets that pass are counted in `rx_*`/`tx_*`; drops are counted by
/// reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Packets received from the peer and passed.
    pub rx_packets: u64,
    /// Bytes (IP packet length) received from the peer and passed.
    pub rx_bytes: u64,
    /// Packets sent to the peer and passed.
    pub tx_packets: u64,
    /// Bytes (IP packet length) sent to the peer and passed.
    pub tx_bytes: u64,
    /// Dropped packets (either direction), indexed by `DropReason as usize`.
    pub drops: [u64; DROP_REASON_SLOTS],
}
const _: () = assert!(core::mem::size_of::<PeerStats>() == 160);

impl PeerStats {
    /// Adds one CPU's traffic counters.
    pub fn add_counters(&mut self, c: &PeerCounters) {
        self.rx_packets = self.rx_packets.wrapping_add(c.rx_packets);
        self.rx_bytes = self.rx_bytes.wrapping_add(c.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(c.tx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(c.tx_bytes);
    }

    /// Adds one CPU's drops.
    pub fn add_drops(&mut self, d: &PeerDrops) {
        let mut i = 0;
        while i < DROP_REASON_SLOTS {
            self.drops[i] = self.drops[i].wrapping_add(d.drops[i]);
            i += 1;
        }
    }
}

/// IPv4 LPM trie data: the address octets in network order.
pub type PeerV4LpmData = [u8; 4];
/// IPv6 LPM trie data: the address octets in network order.
pub type PeerV6LpmData = [u8; 16];

pod!(PeerInfo, PeerStats, PeerCounters, PeerDrops, PeerEventState);
