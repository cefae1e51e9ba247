//! Peers: dense ids, the peer's hot line (policy and counters) and its other per-peer state.
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

/// A peer's policy: the first half of its [`PeerHot`] line in [`crate::maps::PEER_HOT`]. The
/// agent writes it field by field through its mapping of the array, the kernel only reads it
/// (the rules: [`PeerHot`]).
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

/// One element of [`crate::maps::PEER_HOT`], indexed by [`PeerId`]: everything a passing packet
/// reads or changes about its peer — the policy ([`PeerInfo`]: flags, gate and deadline, quota
/// bucket, flow limit, the rates' classes) and the traffic counters — in one 64-byte cache line.
/// The array is `BPF_F_MMAPABLE`, so its values start on a page and every line is 64-byte
/// aligned; the agent maps it and reads and writes the fields in place, without a syscall.
///
/// ## Concurrency rules
/// Every field is an aligned `u32` or `u64`: a load or store of one is single-copy atomic on
/// both sides (the kernel's plain loads and `BPF_ATOMIC` adds, the agent's `AtomicU32` /
/// `AtomicU64` accesses through its mapping), so no field is ever seen half-written.
///
/// | fields | written by | how |
/// |---|---|---|
/// | `info.*` (policy) | the agent only | one atomic store per changed field (release order), in the order below |
/// | `counters.*` | the kernel (and the agent, which zeroes them before it activates a re-used id) | kernel: `BPF_ATOMIC` fetch-add, shared by all CPUs; agent: atomic loads to read |
///
/// Fields change one at a time, so a packet racing an update may see some fields old and some
/// new. Fields that are independent (quota bucket, flow limit, each direction's class) need
/// nothing more. The one multi-field decision is admission (`gate`, `deadline_ns`, and the
/// `PEER_F_DEADLINE_MFA` flag that names the reason once the deadline passed); it is
/// published so that a packet never sees a torn admission:
/// - a change that **admits** (new `gate == GATE_ADMITTED`) stores `flags` and `deadline_ns`
///   first and `gate` last: until the gate store the peer is held (deadline unread) or
///   admitted under its old deadline — never admitted with the old state's deadline (say none)
///   after being held;
/// - a change that **holds** stores `gate`, then `flags`, and leaves `deadline_ns` as it was
///   (a held peer's deadline is never read): the peer is held from the gate store on. Clearing
///   the deadline after the gate let a packet that had read the gate just before the hold
///   (admitted, under a deadline that had passed) read the new deadline 0 and pass as admitted
///   for good: `prog_test_run::gate_and_deadline_written_field_by_field_are_never_seen_torn`
///   caught 262 such packets in a CI run.
///
/// The kernel reads `gate` before `deadline_ns` (volatile loads, in that order; x86-64 does not
/// reorder loads with older loads). A weakly ordered CPU (arm64) may still read the deadline
/// ahead of the gate; the window is the agent's store buffer draining, nanoseconds.
///
/// Counters are shared atomic adds, not per-CPU slots: a per-CPU slot is another line per peer
/// and CPU (a pointer, then the value), and a peer's packets come from the one WireGuard worker
/// that decrypted them, so the line is rarely contended (measured in the pipeline benchmark's
/// docs, `tests/src/bench/pipeline.rs`). A reader sees each counter exactly; `packets` and
/// `bytes` of one direction may differ by the packet being counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerHot {
    /// The policy (agent-written).
    pub info: PeerInfo,
    /// Traffic counters (kernel-written).
    pub counters: PeerCounters,
}
const _: () = assert!(core::mem::size_of::<PeerHot>() == 64);
const _: () = assert!(core::mem::offset_of!(PeerHot, counters) == 32);

/// Byte offsets in a [`PeerHot`] line of the fields the agent stores one by one.
pub mod hot {
    use super::{PeerCounters, PeerHot, PeerInfo};
    use core::mem::offset_of;

    /// `info.flags` (`u32`).
    pub const FLAGS: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, flags);
    /// `info.gate` (`u32`).
    pub const GATE: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, gate);
    /// `info.deadline_ns` (`u64`).
    pub const DEADLINE_NS: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, deadline_ns);
    /// `info.quota_bucket` (`u32`).
    pub const QUOTA_BUCKET: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, quota_bucket);
    /// `info.flow_limit` (`u32`).
    pub const FLOW_LIMIT: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, flow_limit);
    /// `info.shape_tx` (`u32`).
    pub const SHAPE_TX: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, shape_tx);
    /// `info.shape_rx` (`u32`).
    pub const SHAPE_RX: usize = offset_of!(PeerHot, info) + offset_of!(PeerInfo, shape_rx);
    /// `counters` (four `u64`: rx packets, rx bytes, tx packets, tx bytes).
    pub const COUNTERS: usize = offset_of!(PeerHot, counters);
    const _: () = assert!(core::mem::size_of::<PeerCounters>() == 32);
}

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

/// Per-peer traffic counters, the second half of the peer's [`PeerHot`] line: the only per-peer
/// counters a passing packet touches (the drops by reason live in [`PeerDrops`], per CPU).
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

/// A peer's counters and its drops summed over CPUs ([`PeerCounters`] + [`PeerDrops`]): what the
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
    /// Adds traffic counters.
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

pod!(
    PeerInfo,
    PeerHot,
    PeerStats,
    PeerCounters,
    PeerDrops,
    PeerEventState
);
