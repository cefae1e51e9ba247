//! The runtime configuration map: one entry, written by the agent, read once per packet.

use crate::pod;

/// Peers have IPv4 allowed-IP ranges (not only /32 host routes): consult the IPv4 LPM trie.
pub const CONFIG_F_PEER_V4_RANGES: u32 = 1 << 0;
/// Peers have IPv6 allowed-IP ranges (not only /128 host routes): consult the IPv6 LPM trie.
pub const CONFIG_F_PEER_V6_RANGES: u32 = 1 << 1;
/// Drop tunnel-device packets of no known peer instead of passing them (always counted).
pub const CONFIG_F_DROP_UNKNOWN_PEER: u32 = 1 << 2;

/// The active generation of the source lists has IPv4 entries. When clear, the XDP guard
/// skips the IPv4 lookup: the DIR-24 table costs a cache and TLB miss (≈ 260 ns on this machine
/// kind) that a server without lists should not pay on every packet.
pub const CONFIG_F_SRC_V4_LISTS: u32 = 1 << 3;
/// The active generation of the source lists has IPv6 entries.
pub const CONFIG_F_SRC_V6_LISTS: u32 = 1 << 4;
/// The active generation of the destination lists has IPv4 entries.
pub const CONFIG_F_DST_V4_LISTS: u32 = 1 << 5;
/// The active generation of the destination lists has IPv6 entries.
pub const CONFIG_F_DST_V6_LISTS: u32 = 1 << 6;

/// The single entry of [`crate::maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Active generation (0 or 1) of the source blocklists (XDP guard).
    pub src_generation: u32,
    /// Active generation (0 or 1) of the destination blocklists (tunnel device).
    pub dst_generation: u32,
    /// `CONFIG_F_*` bits. The `*_LISTS` bits describe the active generations and change in the
    /// same write as the generation they describe.
    pub flags: u32,
    /// Layout version of the pinned maps ([`crate::LAYOUT_VERSION`]); written by the agent.
    /// Stays at byte offset 12 in every layout, so an agent can read it from pins of another
    /// layout.
    pub layout_version: u32,
    /// Minimum interval between two rate-limited events of one kind for one peer (gate drops),
    /// in nanoseconds; 0 = [`DEFAULT_EVENT_INTERVAL_NS`].
    pub event_interval_ns: u64,
    /// Idle timeout of UDP, ICMP and other flows in seconds; 0 =
    /// [`crate::flow::DEFAULT_FLOW_TIMEOUT_UDP_S`].
    pub flow_timeout_udp_s: u32,
    /// Idle timeout of established TCP flows in seconds; 0 =
    /// [`crate::flow::DEFAULT_FLOW_TIMEOUT_TCP_S`].
    pub flow_timeout_tcp_s: u32,
    /// Idle timeout of TCP flows with an unanswered SYN in seconds; 0 =
    /// [`crate::flow::DEFAULT_FLOW_TIMEOUT_TCP_CLOSE_S`].
    pub flow_timeout_tcp_close_s: u32,
    /// The IFB device traffic from shaped peers is redirected to (its HTB qdisc shapes it and
    /// hands it back to the tunnel device's ingress); 0 = no shaping device yet.
    pub shape_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 40);
const _: () = assert!(core::mem::offset_of!(Config, layout_version) == 12);

/// Byte offset of `Config::layout_version` (fixed across layouts).
pub const CONFIG_LAYOUT_VERSION_OFFSET: usize = 12;

/// Event interval when `Config::event_interval_ns` is 0: one second.
pub const DEFAULT_EVENT_INTERVAL_NS: u64 = 1_000_000_000;

pod!(Config);
