//! Global verdict counters: a per-CPU array of [`Counter`] indexed by the named constants below.
//!
//! Every verdict any program returns increments exactly one of these, so a drop can always be
//! seen. Drops are additionally counted by reason at `DROPS_BASE + reason`.

use crate::{drop::DROP_REASON_SLOTS, pod};

/// Packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (IP packet length on the tunnel device; frame length on the uplink).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
pod!(Counter);

impl Counter {
    /// One packet of `bytes`.
    pub const fn one(bytes: u64) -> Counter {
        Counter { packets: 1, bytes }
    }

    /// Adds `other` (used when summing per-CPU values).
    pub fn add(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

// XDP guard (uplink).
/// Passed: not UDP to a guarded port (other protocols, other ports, ARP, …).
pub const XDP_PASS_UNGUARDED: u32 = 0;
/// Passed: UDP to a guarded port whose source is in no list.
pub const XDP_PASS_CLEAN: u32 = 1;
/// Dropped: source in a source blocklist.
pub const XDP_DROP_BLOCKLIST: u32 = 2;
/// Passed: too short or inconsistent to parse (the stack drops it; we never read past the end).
pub const XDP_PASS_MALFORMED: u32 = 3;
/// Passed: a non-first IP fragment (no UDP header to inspect).
pub const XDP_PASS_FRAGMENT: u32 = 4;
/// Passed: IPv6 whose headers go deeper than the guard follows (its UDP port, if any, is
/// unknown), from a source in no list: it would pass whatever its port.
pub const XDP_PASS_UNPARSEABLE: u32 = 5;
/// Dropped: IPv6 whose headers go deeper than the guard follows, from a source in a source
/// blocklist: it cannot be told apart from UDP to the guarded port (`DROPS_BASE + Unparseable`
/// and the list's hit counter).
pub const XDP_DROP_UNPARSEABLE: u32 = 6;

// Tunnel device, ingress (from peers).
/// Passed and counted to a known peer.
pub const TC_IN_PASS: u32 = 8;
/// Source matches no peer's allowed IPs (passed unless `CONFIG_F_DROP_UNKNOWN_PEER`).
pub const TC_IN_UNKNOWN_PEER: u32 = 9;
/// Dropped: destination in a destination blocklist.
pub const TC_IN_DROP_BLOCKLIST: u32 = 10;
/// Not IPv4/IPv6 or truncated (passed, counted).
pub const TC_IN_MALFORMED: u32 = 11;
/// Dropped: unknown peer and `CONFIG_F_DROP_UNKNOWN_PEER`.
pub const TC_IN_DROP_UNKNOWN: u32 = 12;
/// Dropped: the peer is held at the admission gate (reason in `DROPS_BASE + reason`).
pub const TC_IN_DROP_GATE: u32 = 13;
/// Dropped: the peer's quota bucket is exhausted (`DROPS_BASE + QuotaExhausted`).
pub const TC_IN_DROP_QUOTA: u32 = 14;
/// Dropped: a new flow over the peer's flow limit, or the flow table is full
/// (`DROPS_BASE + FlowLimit`).
pub const TC_IN_DROP_FLOWS: u32 = 15;

// Tunnel device, egress (to peers).
/// Passed and counted to a known peer.
pub const TC_OUT_PASS: u32 = 16;
/// Destination matches no peer's allowed IPs (passed unless `CONFIG_F_DROP_UNKNOWN_PEER`).
pub const TC_OUT_UNKNOWN_PEER: u32 = 17;
/// Dropped: source (the other end) in a destination blocklist.
pub const TC_OUT_DROP_BLOCKLIST: u32 = 18;
/// Not IPv4/IPv6 or truncated (passed, counted).
pub const TC_OUT_MALFORMED: u32 = 19;
/// Dropped: unknown peer and `CONFIG_F_DROP_UNKNOWN_PEER`.
pub const TC_OUT_DROP_UNKNOWN: u32 = 20;
/// Dropped: the peer is held at the admission gate (reason in `DROPS_BASE + reason`).
pub const TC_OUT_DROP_GATE: u32 = 21;
/// Dropped: the peer's quota bucket is exhausted (`DROPS_BASE + QuotaExhausted`).
pub const TC_OUT_DROP_QUOTA: u32 = 22;
/// Dropped: a new flow over the peer's flow limit, or the flow table is full.
pub const TC_OUT_DROP_FLOWS: u32 = 23;

// Events (not verdicts: `packets` counts events, `bytes` stays 0).
/// Records written into the events ring buffer.
pub const EVENTS_EMITTED: u32 = 24;
/// Records lost because the ring buffer was full (the packet's verdict is unaffected).
pub const EVENTS_LOST: u32 = 25;
/// New flows refused because `CAPY_FLOWS` was full (also counted as `FlowLimit` drops; not a
/// verdict: `packets` counts refusals, `bytes` stays 0).
pub const FLOWS_TABLE_FULL: u32 = 26;

// Tunnel device, shaped peers (instead of `TC_*_PASS`).
/// Passed, counted to a known peer, and redirected through the peer's HTB class on the shaping
/// device.
pub const TC_IN_SHAPED: u32 = 27;
/// Passed, counted to a known peer, and queued in the peer's HTB class on the tunnel device.
pub const TC_OUT_SHAPED: u32 = 28;

// Tunnel device, flow-limited peers.
/// Dropped: a packet of a flow-limited peer whose 5-tuple cannot be read (headers deeper than
/// the parser follows, or a transport header cut short): `DROPS_BASE + Unparseable`.
pub const TC_IN_DROP_UNPARSEABLE: u32 = 29;
/// Dropped: the same, towards a flow-limited peer.
pub const TC_OUT_DROP_UNPARSEABLE: u32 = 30;

/// Drops by reason: index `DROPS_BASE + DropReason as u32`.
pub const DROPS_BASE: u32 = 32;

/// Size of the counters array.
pub const COUNTER_SLOTS: u32 = DROPS_BASE + DROP_REASON_SLOTS as u32;

/// Names of the verdict counters, for the CLI and metrics (drops by reason use `DropReason::name`).
pub const COUNTER_NAMES: [(u32, &str); 30] = [
    (XDP_PASS_UNGUARDED, "xdp_pass_unguarded"),
    (XDP_PASS_CLEAN, "xdp_pass_clean"),
    (XDP_DROP_BLOCKLIST, "xdp_drop_blocklist"),
    (XDP_PASS_MALFORMED, "xdp_pass_malformed"),
    (XDP_PASS_FRAGMENT, "xdp_pass_fragment"),
    (XDP_PASS_UNPARSEABLE, "xdp_pass_unparseable"),
    (XDP_DROP_UNPARSEABLE, "xdp_drop_unparseable"),
    (TC_IN_PASS, "tc_in_pass"),
    (TC_IN_UNKNOWN_PEER, "tc_in_unknown_peer"),
    (TC_IN_DROP_BLOCKLIST, "tc_in_drop_blocklist"),
    (TC_IN_MALFORMED, "tc_in_malformed"),
    (TC_IN_DROP_UNKNOWN, "tc_in_drop_unknown"),
    (TC_IN_DROP_GATE, "tc_in_drop_gate"),
    (TC_IN_DROP_QUOTA, "tc_in_drop_quota"),
    (TC_IN_DROP_FLOWS, "tc_in_drop_flows"),
    (TC_OUT_PASS, "tc_out_pass"),
    (TC_OUT_UNKNOWN_PEER, "tc_out_unknown_peer"),
    (TC_OUT_DROP_BLOCKLIST, "tc_out_drop_blocklist"),
    (TC_OUT_MALFORMED, "tc_out_malformed"),
    (TC_OUT_DROP_UNKNOWN, "tc_out_drop_unknown"),
    (TC_OUT_DROP_GATE, "tc_out_drop_gate"),
    (TC_OUT_DROP_QUOTA, "tc_out_drop_quota"),
    (TC_OUT_DROP_FLOWS, "tc_out_drop_flows"),
    (EVENTS_EMITTED, "events_emitted"),
    (EVENTS_LOST, "events_lost"),
    (FLOWS_TABLE_FULL, "flows_table_full"),
    (TC_IN_SHAPED, "tc_in_shaped"),
    (TC_OUT_SHAPED, "tc_out_shaped"),
    (TC_IN_DROP_UNPARSEABLE, "tc_in_drop_unparseable"),
    (TC_OUT_DROP_UNPARSEABLE, "tc_out_drop_unparseable"),
];
