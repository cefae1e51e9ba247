//! Per-peer concurrent flow limits: the flow table `CAPY_FLOWS` and the per-peer counts
//! `CAPY_FLOW_CNT`.
//!
//! ## Flows
//! A flow is one peer's 5-tuple: TCP and UDP by ports, ICMP/ICMPv6 echo by identifier, any
//! other protocol (and ICMP that is not echo) by `(protocol, addresses)`. IPv4 and IPv6. The key
//! is canonical — the **peer side** and the **other side**, not source and destination — so a
//! packet from the peer (TC ingress, peer = source) and its reply (TC egress, peer =
//! destination) find the same entry. Non-first fragments carry no ports and are not tracked
//! (they pass with the flow their first fragment opened).
//!
//! ## The kernel step (after the gate and the destination blocklists, before the quota)
//! Only for a known peer whose `PeerInfo::flow_limit != 0` (0 = unlimited: no tracking at all).
//! A packet whose flow key cannot be read — IPv6 headers deeper than the kernel parser follows
//! (more than 4 extension headers, or one starting past byte 1 024), or a transport header cut
//! short of the ports — is **dropped** (`DropReason::Unparseable`, counted in
//! `counters::TC_IN_DROP_UNPARSEABLE` / `TC_OUT_DROP_UNPARSEABLE`): untracked, it would open
//! flows around the limit. (Non-first fragments are not tracked either, but pass: their first
//! fragment was the flow's packet.) Every other packet:
//! 1. The flow's entry exists:
//!    - a TCP FIN or RST: the entry is deleted at once and, **if this delete succeeded**, the
//!      peer's count is decremented (the slot is free for the next connection immediately);
//!    - an entry idle past its timeout (below) is treated as a new flow re-using its own slot:
//!      it is re-initialised in place, the count (which already holds it) does not change;
//!    - otherwise `last_ns` is refreshed, and an unanswered TCP SYN becomes established when
//!      the other side answers.
//! 2. No entry: a TCP packet without SYN (the tail of a flow a FIN/RST just ended, or a
//!    connection older than the limit) passes untracked, so it cannot take a slot. Anything else
//!    is a new flow: the count is **reserved** with an atomic `fetch_add(1)`; if the old value
//!    was already at the limit it is given back and the packet dropped
//!    (`DropReason::FlowLimit`); else the entry is inserted with `BPF_NOEXIST`. If another CPU
//!    inserted the same flow first (`EEXIST`) the reservation is given back and the packet
//!    passes; if the table is full (`E2BIG`) the reservation is given back and the packet is
//!    **dropped** as `FlowLimit` (and counted in `counters::FLOWS_TABLE_FULL`): a full table
//!    refuses new flows, it never passes them silently. The reservation makes the limit exact
//!    under concurrency (never more than `limit` flows per peer).
//!
//! ## Expiry and who decrements
//! Idle timeouts (`Config::flow_timeout_*_s`, 0 = default): UDP, ICMP and other protocols
//! [`DEFAULT_FLOW_TIMEOUT_UDP_S`] (60 s); established TCP [`DEFAULT_FLOW_TIMEOUT_TCP_S`] (2 h);
//! a TCP flow whose SYN is unanswered [`DEFAULT_FLOW_TIMEOUT_TCP_CLOSE_S`] (10 s; a FIN/RST
//! deletes at once, so this short timeout is what is left of "closing": a half-open connection
//! must not hold a slot for 2 h). The agent's sweeper (`dataplane::flows::expire_flows`)
//! deletes expired entries (the daemon sweeps every 5 s, so an idle flow holds its slot at most
//! its timeout plus 5 s; a stale entry the kernel meets again is re-used at once). **The rule: the side whose `delete` of an entry succeeds
//! decrements the count, exactly once** — the kernel on FIN/RST, the agent for expiry; the
//! kernel never deletes on expiry (it re-uses the entry), the agent never deletes live flows.
//! The count changes only on a successful insert (+1, reserved just before) and a successful
//! delete (−1), so at rest `count == number of entries of the peer` (proved by the
//! prog-test-run no-drift test). The table is a plain hash, **not LRU**: an LRU map would
//! evict entries silently and leak their counts.
//!
//! Races: the sweeper re-reads an entry just before deleting it; a packet refreshing it in
//! between is lost only in the worst case (the flow's next packet is a new flow again), the
//! count stays exact. Clearing a peer's limit deletes its entries the same way (the agent
//! decrements per successful delete), since the kernel stops looking for its FINs. A flow left by
//! a removed peer expires normally.
//!
//! ## Sizing
//! `CAPY_FLOWS`: hash, not preallocated, [`MAX_FLOWS`] entries of a 44-byte key and a 16-byte
//! value (≈ 140 B each with the kernel's element header and bucket: ≈ 36 MiB at the maximum,
//! nothing while empty). `CAPY_FLOW_CNT`: `BPF_F_MMAPABLE` array of `u64`, one per peer
//! (1 MiB); the agent decrements through the mapping with `AtomicU64`, the kernel with BPF
//! atomic instructions on the same memory.
//!
//! ## One table for all peers: the per-peer cap
//! The table is shared, first come first served: no slot is reserved for any peer. A peer's
//! flow limit is therefore capped at input (the policy value `flows`, 1..=
//! [`MAX_FLOWS_PER_PEER`] = `MAX_FLOWS / 4` = 65 536), so one peer — a busy NAT gateway, a port
//! scanner, a flood of spoofed 5-tuples from inside the tunnel — can hold at most a quarter of
//! the table and never fill it alone. 65 536 concurrent flows is far above what one device
//! needs (the built-in `strict` template gives 200).
//! The limits of many peers together may still exceed [`MAX_FLOWS`] (they are ceilings, not
//! reservations: 100 peers at 10 000 each): when the table is full, a new flow of any limited
//! peer, under its limit or not, is dropped as `FlowLimit` and counted in
//! `counters::FLOWS_TABLE_FULL` (above), established flows keep passing, and slots come back
//! as flows end (FIN/RST) or expire. Peers without a limit are not tracked and take no slot.

use crate::{config::Config, pod};

/// Capacity of `CAPY_FLOWS` (all peers together).
pub const MAX_FLOWS: u32 = 262_144;

/// The largest flow limit one peer may be given (policy `flows`): a quarter of [`MAX_FLOWS`],
/// 65 536, so no single peer can fill the table the others share (module docs: "One table
/// for all peers").
pub const MAX_FLOWS_PER_PEER: u32 = MAX_FLOWS / 4;

/// IP protocol numbers the flow key distinguishes.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// `FlowState::state`: UDP/ICMP/other, or TCP after the other side answered (established).
pub const FLOW_S_OPEN: u32 = 0;
/// `FlowState::state`: a TCP flow whose SYN has not been answered (short timeout).
pub const FLOW_S_TCP_SYN: u32 = 1;

/// `FlowState::flags`: the flow's first packet came from the peer (TC ingress).
pub const FLOW_F_FROM_PEER: u32 = 1 << 0;

/// Idle timeout of UDP, ICMP and other flows when `Config::flow_timeout_udp_s` is 0.
pub const DEFAULT_FLOW_TIMEOUT_UDP_S: u32 = 60;
/// Idle timeout of established TCP flows when `Config::flow_timeout_tcp_s` is 0.
pub const DEFAULT_FLOW_TIMEOUT_TCP_S: u32 = 7200;
/// Idle timeout of TCP flows with an unanswered SYN when `Config::flow_timeout_tcp_close_s` is 0.
pub const DEFAULT_FLOW_TIMEOUT_TCP_CLOSE_S: u32 = 10;

/// Key of `CAPY_FLOWS`: one flow of one peer, canonical (peer side / other side). 44 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The peer.
    pub peer: u32,
    /// IP protocol (after IPv6 extension headers).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// The peer side's port (host order); the ICMP echo identifier; 0 for other protocols.
    pub peer_port: u16,
    /// The other side's port (host order); 0 for ICMP and other protocols.
    pub other_port: u16,
    /// The peer side's address, network order; IPv4 in the first 4 octets, the rest zero.
    pub peer_addr: [u8; 16],
    /// The other side's address, as `peer_addr`.
    pub other_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);

/// Value of `CAPY_FLOWS`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Last packet, CLOCK_BOOTTIME ns (`bpf_ktime_get_boot_ns`).
    pub last_ns: u64,
    /// `FLOW_S_*`.
    pub state: u32,
    /// `FLOW_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 16);

pod!(FlowKey, FlowState);

const fn or_default(v: u32, d: u32) -> u64 {
    (if v == 0 { d } else { v }) as u64
}

/// The idle timeout, in ns, of a flow of `proto` in `state` under `cfg`.
pub const fn flow_timeout_ns(cfg: &Config, proto: u8, state: u32) -> u64 {
    let s = if proto != PROTO_TCP {
        or_default(cfg.flow_timeout_udp_s, DEFAULT_FLOW_TIMEOUT_UDP_S)
    } else if state == FLOW_S_OPEN {
        or_default(cfg.flow_timeout_tcp_s, DEFAULT_FLOW_TIMEOUT_TCP_S)
    } else {
        or_default(
            cfg.flow_timeout_tcp_close_s,
            DEFAULT_FLOW_TIMEOUT_TCP_CLOSE_S,
        )
    };
    s * 1_000_000_000
}

/// Whether a flow last seen at `last_ns` is idle past its timeout at `now_ns` (both
/// CLOCK_BOOTTIME). A `last_ns` after `now_ns` (written by another CPU meanwhile) is fresh.
pub const fn flow_expired(cfg: &Config, proto: u8, st: &FlowState, now_ns: u64) -> bool {
    now_ns.saturating_sub(st.last_ns) > flow_timeout_ns(cfg, proto, st.state)
}
