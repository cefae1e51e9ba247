//! Proxied sockets: the binding of a socket to a proxy identity's line, and the verdict counters
//! of the socket programs (`capybara-ebpf`'s `sock_skb`; the design is in its module docs and in
//! `capybara-agent`'s `proxy` module).
//!
//! The agent binds a socket of a Shadowsocks or VLESS connection to the identity's dense id (the
//! same id space as WireGuard devices, so `PEER_HOT[id]` is its line) by writing a
//! [`SockBinding`] into the socket's storage in [`crate::maps::SOCK_BIND`]
//! (`BPF_MAP_TYPE_SK_STORAGE`, keyed by the socket's fd from userspace, by `skb->sk` in the
//! kernel). The storage dies with the socket: nothing to clean up, no id to reuse.
//!
//! The socket programs count their verdicts in [`crate::maps::SOCK_COUNTERS`] (a per-CPU array
//! of [`crate::counters::Counter`] indexed by the `SOCK_*` constants below), apart from the
//! tunnel's `COUNTERS` so that its pinned layout does not change; drops are also counted by
//! reason in `COUNTERS[DROPS_BASE + reason]` and the identity's `PEER_DROPS`, as the tunnel's.

use crate::pod;

/// [`SockBinding::role`]: the user's connection to the endpoint (gate and download shaping
/// only; its bytes are the protocol's framing of what the upstream socket carries).
pub const SOCK_ROLE_CLIENT: u32 = 1;
/// [`SockBinding::role`]: the endpoint's connection to the destination (every check: gate,
/// destination lists, flow limit, quota, accounting, upload shaping).
pub const SOCK_ROLE_UPSTREAM: u32 = 2;

/// The value of a socket's storage in [`crate::maps::SOCK_BIND`]. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockBinding {
    /// The identity's dense id (`crate::peer::PeerId`).
    pub peer: u32,
    /// [`SOCK_ROLE_CLIENT`] or [`SOCK_ROLE_UPSTREAM`]; any other value is treated as not bound
    /// (passed, counted as [`SOCK_PASS_UNBOUND`]).
    pub role: u32,
}
const _: () = assert!(core::mem::size_of::<SockBinding>() == 8);

pod!(SockBinding);

/// Offset that tells the socket programs' counter slots from the tunnel's in the kernel's
/// `count` (a slot `>= SOCK_SLOT_BASE` is `SOCK_COUNTERS[slot - SOCK_SLOT_BASE]`). Not stored
/// anywhere: the maps are indexed by the constants below minus this base.
pub const SOCK_SLOT_BASE: u32 = 1 << 16;

/// A packet of a socket with no binding (not a proxied connection's, or another agent's): passed
/// untouched. Counted in packets only (`bytes` 0), as a count of how often the cheap path ran.
pub const SOCK_PASS_UNBOUND: u32 = SOCK_SLOT_BASE;
// From a bound socket (cgroup egress).
/// Passed (counted to the identity when the socket is upstream).
pub const SOCK_OUT_PASS: u32 = SOCK_SLOT_BASE + 1;
/// Passed with `skb->priority` set to the identity's HTB class.
pub const SOCK_OUT_SHAPED: u32 = SOCK_SLOT_BASE + 2;
/// Dropped: the identity is held at the gate (`DROPS_BASE + reason`).
pub const SOCK_OUT_DROP_GATE: u32 = SOCK_SLOT_BASE + 3;
/// Dropped: the destination is in a destination blocklist (upstream sockets).
pub const SOCK_OUT_DROP_BLOCKLIST: u32 = SOCK_SLOT_BASE + 4;
/// Dropped: a new flow over the identity's flow limit (upstream sockets: their SYN).
pub const SOCK_OUT_DROP_FLOWS: u32 = SOCK_SLOT_BASE + 5;
/// Dropped: the identity's quota bucket is exhausted (upstream sockets).
pub const SOCK_OUT_DROP_QUOTA: u32 = SOCK_SLOT_BASE + 6;
/// Dropped: a flow-limited identity's packet whose 5-tuple cannot be read.
pub const SOCK_OUT_DROP_UNPARSEABLE: u32 = SOCK_SLOT_BASE + 7;
/// Passed: not IPv4/IPv6, or headers not in the linear part (counted, never charged).
pub const SOCK_OUT_MALFORMED: u32 = SOCK_SLOT_BASE + 8;
/// Passed: bound to an id beyond the peer table (the agent never writes one).
pub const SOCK_OUT_UNKNOWN_PEER: u32 = SOCK_SLOT_BASE + 9;
// To a bound socket (cgroup ingress).
/// Passed (counted to the identity when the socket is upstream).
pub const SOCK_IN_PASS: u32 = SOCK_SLOT_BASE + 17;
/// Not used by ingress (nothing is shaped on the way in); kept for the symmetric layout.
pub const SOCK_IN_SHAPED: u32 = SOCK_SLOT_BASE + 18;
/// Dropped: the identity is held at the gate.
pub const SOCK_IN_DROP_GATE: u32 = SOCK_SLOT_BASE + 19;
/// Dropped: the source is in a destination blocklist (upstream sockets).
pub const SOCK_IN_DROP_BLOCKLIST: u32 = SOCK_SLOT_BASE + 20;
/// Dropped: a new flow over the identity's flow limit (upstream sockets).
pub const SOCK_IN_DROP_FLOWS: u32 = SOCK_SLOT_BASE + 21;
/// Dropped: the identity's quota bucket is exhausted (upstream sockets).
pub const SOCK_IN_DROP_QUOTA: u32 = SOCK_SLOT_BASE + 22;
/// Dropped: a flow-limited identity's packet whose 5-tuple cannot be read.
pub const SOCK_IN_DROP_UNPARSEABLE: u32 = SOCK_SLOT_BASE + 23;
/// Passed: not IPv4/IPv6, or headers not in the linear part.
pub const SOCK_IN_MALFORMED: u32 = SOCK_SLOT_BASE + 24;
/// Passed: bound to an id beyond the peer table.
pub const SOCK_IN_UNKNOWN_PEER: u32 = SOCK_SLOT_BASE + 25;

/// Size of [`crate::maps::SOCK_COUNTERS`].
pub const SOCK_COUNTER_SLOTS: u32 = 32;

/// Names of the socket programs' verdict counters (index = constant − [`SOCK_SLOT_BASE`]), for
/// the CLI and metrics.
pub const SOCK_COUNTER_NAMES: [(u32, &str); 19] = [
    (SOCK_PASS_UNBOUND - SOCK_SLOT_BASE, "sock_pass_unbound"),
    (SOCK_OUT_PASS - SOCK_SLOT_BASE, "sock_out_pass"),
    (SOCK_OUT_SHAPED - SOCK_SLOT_BASE, "sock_out_shaped"),
    (SOCK_OUT_DROP_GATE - SOCK_SLOT_BASE, "sock_out_drop_gate"),
    (
        SOCK_OUT_DROP_BLOCKLIST - SOCK_SLOT_BASE,
        "sock_out_drop_blocklist",
    ),
    (SOCK_OUT_DROP_FLOWS - SOCK_SLOT_BASE, "sock_out_drop_flows"),
    (SOCK_OUT_DROP_QUOTA - SOCK_SLOT_BASE, "sock_out_drop_quota"),
    (
        SOCK_OUT_DROP_UNPARSEABLE - SOCK_SLOT_BASE,
        "sock_out_drop_unparseable",
    ),
    (SOCK_OUT_MALFORMED - SOCK_SLOT_BASE, "sock_out_malformed"),
    (
        SOCK_OUT_UNKNOWN_PEER - SOCK_SLOT_BASE,
        "sock_out_unknown_peer",
    ),
    (SOCK_IN_PASS - SOCK_SLOT_BASE, "sock_in_pass"),
    (SOCK_IN_SHAPED - SOCK_SLOT_BASE, "sock_in_shaped"),
    (SOCK_IN_DROP_GATE - SOCK_SLOT_BASE, "sock_in_drop_gate"),
    (
        SOCK_IN_DROP_BLOCKLIST - SOCK_SLOT_BASE,
        "sock_in_drop_blocklist",
    ),
    (SOCK_IN_DROP_FLOWS - SOCK_SLOT_BASE, "sock_in_drop_flows"),
    (SOCK_IN_DROP_QUOTA - SOCK_SLOT_BASE, "sock_in_drop_quota"),
    (
        SOCK_IN_DROP_UNPARSEABLE - SOCK_SLOT_BASE,
        "sock_in_drop_unparseable",
    ),
    (SOCK_IN_MALFORMED - SOCK_SLOT_BASE, "sock_in_malformed"),
    (
        SOCK_IN_UNKNOWN_PEER - SOCK_SLOT_BASE,
        "sock_in_unknown_peer",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_fit_and_names_are_unique() {
        for (i, (slot, name)) in SOCK_COUNTER_NAMES.iter().enumerate() {
            assert!(*slot < SOCK_COUNTER_SLOTS, "{name}");
            for (other, other_name) in &SOCK_COUNTER_NAMES[i + 1..] {
                assert_ne!(slot, other);
                assert_ne!(name, other_name);
            }
        }
    }
}
