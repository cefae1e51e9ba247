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

/// Peer table entry flag: the id is in use.
pub const PEER_F_ACTIVE: u32 = 1 << 0;

/// One entry of [`crate::maps::PEERS`], indexed by [`PeerId`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// `PEER_F_*` bits.
    pub flags: u32,
    /// Reserved for policy (gate, quota bucket, rate class); zero.
    pub _reserved: [u32; 7],
}
const _: () = assert!(core::mem::size_of::<PeerInfo>() == 32);

/// Per-peer counters, one per CPU in [`crate::maps::PEER_STATS`]; the agent sums the CPUs.
/// Only packets that pass are counted in `rx_*`/`tx_*`; drops are counted by reason.
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
    /// Adds `other` (used when summing per-CPU values).
    pub fn add(&mut self, other: &PeerStats) {
        self.rx_packets = self.rx_packets.wrapping_add(other.rx_packets);
        self.rx_bytes = self.rx_bytes.wrapping_add(other.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(other.tx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(other.tx_bytes);
        let mut i = 0;
        while i < DROP_REASON_SLOTS {
            self.drops[i] = self.drops[i].wrapping_add(other.drops[i]);
            i += 1;
        }
    }
}

/// IPv4 LPM trie data: the address octets in network order.
pub type PeerV4LpmData = [u8; 4];
/// IPv6 LPM trie data: the address octets in network order.
pub type PeerV6LpmData = [u8; 16];

pod!(PeerInfo, PeerStats);
