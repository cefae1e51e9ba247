//! `xdp_guard`, on the uplink: drops packets to the WireGuard port whose source is in a source
//! blocklist (named lists: `manual`, `auto`, `tor`, `geo:CN`, …), before the stack sees them.
//!
//! Pipeline: Ethernet (+ at most one 802.1Q/802.1ad tag) → IPv4 / IPv6 (up to
//! `MAX_IPV6_EXT_HEADERS` extension headers) → UDP destination port → `GUARD_PORTS[port]` →
//! source blocklist lookup. Every packet ends in exactly one `XDP_*` counter:
//!
//! | case | verdict | counter |
//! |---|---|---|
//! | not IP, not UDP, or UDP to an unguarded port | pass | `XDP_PASS_UNGUARDED` |
//! | UDP to a guarded port, source in no list (or list 0) | pass | `XDP_PASS_CLEAN` |
//! | UDP to a guarded port, source in list `n` | **drop** | `XDP_DROP_BLOCKLIST`, `DROPS_BASE + SourceBlocklist`, `LIST_HITS[n]` |
//! | non-first fragment of a UDP datagram | pass | `XDP_PASS_FRAGMENT` |
//! | truncated / inconsistent headers | pass | `XDP_PASS_MALFORMED` |
//!
//! **Why only the guarded port.** The uplink also carries the return traffic of the VPN's own
//! users: a user browsing a site in a blocked country gets replies *from* that country, NATed
//! back to the server's address. Dropping every packet from a blocked source would break that
//! traffic. Only what reaches the WireGuard socket (handshakes and tunnel packets, i.e. who may
//! talk to the server at all) is guarded; destination policy for users is the tunnel device's
//! job (`tc_ingress`/`tc_egress`).
//!
//! **Fragments.** A non-first fragment carries no UDP header, so its port is unknown; it passes.
//! That is safe: the first fragment (which has the port) is checked and dropped for a blocked
//! source, so the datagram never reassembles and never reaches WireGuard.
//!
//! **Malformed packets pass**: the stack drops them anyway, and a guard that drops what it cannot
//! parse would be a denial of service waiting for an unusual but valid header. Packets nested
//! deeper than the guard parses (QinQ with two tags, more than 4 IPv6 extension headers) are
//! not inspected either: QinQ counts as non-IP (unguarded), deep IPv6 chains as malformed.
//!
//! Bytes are counted as the frame length (`data_end - data`).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use capybara_common::{
    counters::{
        Counter, XDP_DROP_BLOCKLIST, XDP_PASS_CLEAN, XDP_PASS_FRAGMENT, XDP_PASS_MALFORMED,
        XDP_PASS_UNGUARDED,
    },
    drop::DropReason,
};

use crate::{
    counters::{count, count_drop, count_list_hit},
    lookup::{SOURCE, config},
    maps::GUARD_PORTS,
    parse::{self, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, Malformed, Packet, Src},
};

/// The guard's decision, before counting.
enum Verdict {
    Unguarded,
    Clean,
    Fragment,
    Blocked(u32),
}

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let bytes = pkt.len() as u64;
    match try_xdp_guard(&pkt) {
        Ok(Verdict::Unguarded) => {
            count(XDP_PASS_UNGUARDED, Counter::one(bytes));
            xdp_action::XDP_PASS
        }
        Ok(Verdict::Clean) => {
            count(XDP_PASS_CLEAN, Counter::one(bytes));
            xdp_action::XDP_PASS
        }
        Ok(Verdict::Fragment) => {
            count(XDP_PASS_FRAGMENT, Counter::one(bytes));
            xdp_action::XDP_PASS
        }
        Ok(Verdict::Blocked(list)) => {
            count_drop(
                XDP_DROP_BLOCKLIST,
                DropReason::SourceBlocklist,
                Counter::one(bytes),
                None,
            );
            count_list_hit(list, Counter::one(bytes));
            xdp_action::XDP_DROP
        }
        Err(Malformed) => {
            count(XDP_PASS_MALFORMED, Counter::one(bytes));
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_xdp_guard(pkt: &Packet) -> Result<Verdict, Malformed> {
    let (ethertype, l3_off) = parse::ethernet(pkt)?;
    let ip = match ethertype {
        ETH_P_IP => parse::ipv4(pkt, l3_off)?,
        ETH_P_IPV6 => parse::ipv6(pkt, l3_off)?,
        _ => return Ok(Verdict::Unguarded),
    };
    if ip.protocol != IPPROTO_UDP {
        return Ok(Verdict::Unguarded);
    }
    if ip.later_fragment {
        return Ok(Verdict::Fragment);
    }
    let port = parse::udp_dst_port(pkt, ip.l4_off)?;
    match GUARD_PORTS.get(port as u32) {
        Some(g) if *g != 0 => {}
        _ => return Ok(Verdict::Unguarded),
    }
    let cfg = config();
    let list = match ip.src {
        Src::V4(addr) => SOURCE.v4(&cfg, addr),
        Src::V6(addr) => SOURCE.v6(&cfg, &addr),
    };
    if list == 0 {
        Ok(Verdict::Clean)
    } else {
        Ok(Verdict::Blocked(list))
    }
}
