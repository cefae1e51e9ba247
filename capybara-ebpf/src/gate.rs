//! The admission gate: is a known peer held, and is this packet of a held peer one for the
//! verification endpoint? (Layouts: `capybara_common::peer::PeerInfo`, `capybara_common::gate`.)
//!
//! - [`held`]: reads the policy in the peer's `PEER_HOT` line (looked up once per packet by the pipeline). Held with the stored reason when `gate != 0`; held as
//!   `GateExpired` when admitted with a deadline and `bpf_ktime_get_boot_ns() >= deadline_ns`
//!   (the kernel decides expiry alone: no userspace round trip). The clock is read only for
//!   peers with a deadline. [`deadline_reason`] then turns a passed deadline of an MFA
//!   admission (`PEER_F_DEADLINE_MFA`) into `GateMfaPending`: the device must verify again.
//!   It is asked only for a packet that is dropped (after [`to_endpoint`]), so the flag is not
//!   kept live across the endpoint's parser (the programs' stack is at its 512-byte limit
//!   there: reading it in [`held`] made `tc_ingress` overflow it).
//! - [`to_endpoint`]: the exception for held peers. Parses the transport header (IPv4 options,
//!   up to `MAX_IPV6_EXT_HEADERS` IPv6 extension headers) and looks up the server end
//!   (ingress: destination, egress: source) with its port in `GATE_ALLOW`. Only TCP and UDP with
//!   a readable header match; non-first fragments (no ports), other protocols and anything that
//!   does not parse do not, so they are dropped with the peer's reason.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use capybara_common::{
    drop::DropReason,
    gate::GateAllowKey,
    peer::{GATE_ADMITTED, PEER_F_DEADLINE_MFA, PeerInfo},
};

use crate::{
    maps::GATE_ALLOW,
    parse::{self, Addrs, IPPROTO_TCP, IPPROTO_UDP, Malformed, Packet},
};

/// Why a peer is held, and its admission deadline (0 if none) for the event.
pub struct Held {
    pub reason: DropReason,
    pub deadline_ns: u64,
}

/// CLOCK_BOOTTIME in nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and only reads the clock.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The hold reason stored in `PeerInfo::gate`: a `Gate*` reason, anything else fails closed
/// as `GateKicked`.
#[inline(always)]
fn gate_reason(gate: u32) -> DropReason {
    match DropReason::from_u32(gate) {
        Some(
            r @ (DropReason::GateMfaPending
            | DropReason::GateExpired
            | DropReason::GateKicked
            | DropReason::GateOverQuota
            | DropReason::GateOutsideWindow
            | DropReason::GateDeviceLimit),
        ) => r,
        _ => DropReason::GateKicked,
    }
}

/// `Some` when the peer whose table entry is `info` is held at `now_ns` (see the module docs).
#[inline(always)]
pub fn held(info: *const PeerInfo, now_ns: u64) -> Option<Held> {
    // SAFETY: `info` is the policy half of the peer's `PEER_HOT` line the pipeline looked up,
    // valid for this program run. The agent stores single fields atomically and publishes an
    // admission's deadline before its gate (`capybara_common::peer::PeerHot`): the gate is
    // read first, then the deadline, as volatile loads so the compiler keeps that order.
    let (gate, deadline_ns) = unsafe {
        let gate = core::ptr::read_volatile(&raw const (*info).gate);
        (
            gate,
            core::ptr::read_volatile(&raw const (*info).deadline_ns),
        )
    };
    if gate != GATE_ADMITTED {
        return Some(Held {
            reason: gate_reason(gate),
            deadline_ns,
        });
    }
    if deadline_ns != 0 && now_ns >= deadline_ns {
        return Some(Held {
            reason: DropReason::GateExpired,
            deadline_ns,
        });
    }
    None
}

/// The reason a held packet is dropped with: `held`'s, except that a passed deadline of an MFA
/// admission (the peer's `PEER_F_DEADLINE_MFA`) holds as `GateMfaPending`, not `GateExpired`.
#[inline(always)]
pub fn deadline_reason(info: *const PeerInfo, held: &Held) -> DropReason {
    if !matches!(held.reason, DropReason::GateExpired) || held.deadline_ns == 0 {
        return held.reason;
    }
    // SAFETY: `info` is the peer's policy (see `held`), valid for this program run.
    let flags = unsafe { (*info).flags };
    if flags & PEER_F_DEADLINE_MFA != 0 {
        DropReason::GateMfaPending
    } else {
        DropReason::GateExpired
    }
}

/// True when the packet goes between the peer and a verification endpoint (`GATE_ALLOW`):
/// ingress to it (`server_is_dst`), egress from it.
#[inline(always)]
pub fn to_endpoint(pkt: &Packet, l2: usize, addrs: &Addrs, server_is_dst: bool) -> bool {
    try_to_endpoint(pkt, l2, addrs, server_is_dst).unwrap_or(false)
}

#[inline(always)]
fn try_to_endpoint(
    pkt: &Packet,
    l2: usize,
    addrs: &Addrs,
    server_is_dst: bool,
) -> Result<bool, Malformed> {
    let upper = match addrs {
        Addrs::V4 { .. } => parse::ipv4(pkt, l2)?,
        Addrs::V6 { .. } => parse::ipv6(pkt, l2)?,
    };
    if upper.later_fragment || (upper.protocol != IPPROTO_TCP && upper.protocol != IPPROTO_UDP) {
        return Ok(false);
    }
    // Source and destination ports: the first 4 bytes of both TCP and UDP headers.
    let ports: [u8; 4] = pkt.read(upper.l4_off)?;
    let port = if server_is_dst {
        u16::from_be_bytes([ports[2], ports[3]])
    } else {
        u16::from_be_bytes([ports[0], ports[1]])
    };
    let key = match *addrs {
        Addrs::V4 { src, dst } => {
            GateAllowKey::v4(if server_is_dst { dst } else { src }, upper.protocol, port)
        }
        Addrs::V6 { src, dst } => {
            GateAllowKey::v6(if server_is_dst { dst } else { src }, upper.protocol, port)
        }
    };
    Ok(GATE_ALLOW.get_ptr(key).is_some())
}
