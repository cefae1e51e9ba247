//! `xdp_guard`, on the uplink: drops packets to the agent's own ports — the WireGuard port (UDP)
//! and the Shadowsocks relay (UDP), the Shadowsocks and VLESS endpoints (TCP) — whose source is in a source blocklist (named
//! lists: `manual`, `auto`, `tor`, `geo:CN`, …), before the stack sees them.
//!
//! Pipeline: Ethernet (+ at most one 802.1Q/802.1ad tag) → IPv4 / IPv6 (up to
//! `MAX_IPV6_EXT_HEADERS` = 4 extension headers, none starting past `MAX_HEADER_OFFSET` = 1 024
//! bytes) → UDP or TCP destination port → `GUARD_PORTS[port]` (`GUARD_UDP` / `GUARD_TCP` bits:
//! which transports of the port are guarded) → source blocklist lookup. Every packet ends in
//! exactly one `XDP_*` counter:
//!
//! | case | verdict | counter |
//! |---|---|---|
//! | not IP, not UDP or TCP, or to a port not guarded for its transport | pass | `XDP_PASS_UNGUARDED` |
//! | UDP/TCP to a guarded port, source in no list (or list 0) | pass | `XDP_PASS_CLEAN` |
//! | UDP/TCP to a guarded port, source in list `n` | **drop** | `XDP_DROP_BLOCKLIST`, `DROPS_BASE + SourceBlocklist`, `LIST_HITS[n]` |
//! | IPv6 deeper than the guard parses, source in list `n` | **drop** | `XDP_DROP_UNPARSEABLE`, `DROPS_BASE + Unparseable`, `LIST_HITS[n]` |
//! | IPv6 deeper than the guard parses, source in no list | pass | `XDP_PASS_UNPARSEABLE` |
//! | non-first fragment of a UDP datagram | pass | `XDP_PASS_FRAGMENT` |
//! | truncated / inconsistent headers | pass | `XDP_PASS_MALFORMED` |
//!
//! **Why only the guarded ports.** The uplink also carries the return traffic of the VPN's own
//! users: a user browsing a site in a blocked country gets replies *from* that country, NATed
//! back to the server's address. Dropping every packet from a blocked source would break that
//! traffic. Only what reaches the WireGuard socket (handshakes and tunnel packets) and the proxy
//! endpoints' listening ports (every segment of a client's connection, its SYN first), i.e. who
//! may talk to the server at all, is guarded; the proxied connections' own upstream sockets use
//! ephemeral ports, which are never guarded, so their replies pass. Destination policy for
//! users is the tunnel device's job (`tc_ingress`/`tc_egress`) and, for proxied traffic, the
//! socket programs' (`sock_skb`).
//!
//! **Fragments.** A non-first fragment carries no UDP header, so its port is unknown; it passes.
//! That is safe: the first fragment (which has the port) is checked and dropped for a blocked
//! source, so the datagram never reassembles and never reaches WireGuard.
//!
//! **Truncated and inconsistent packets pass** (`parse::Malformed`): the stack drops
//! them anyway (no socket receives a datagram whose headers are cut short), and a guard that
//! dropped them would only add a second place to get it wrong.
//!
//! **Deeper than the guard parses: dropped when the source is listed.** The stack walks any
//! number of IPv6 extension headers of any length; the guard follows at most 4, none starting
//! past byte 1 024 of the frame (`parse::Upper::deep`), and reads no UDP header starting past
//! it. Behind a longer chain (5 headers, or about 970 bytes of them on an untagged frame, e.g.
//! one big hop-by-hop header) the UDP port is unknown. Such packets used to pass as malformed,
//! so any blocked or geo-blocked source reached the WireGuard socket by prefixing its handshake
//! with a few padding-only extension headers. Now the source, which the fixed IPv6 header always
//! gives, is looked up anyway: a packet passes only if it would pass *whatever its port*. A
//! source in no list passes (as it would to the guarded port or to any other); a listed source
//! is dropped under its own reason, `Unparseable` (with its list's hit counter), because it
//! cannot be told apart from a handshake. The choice is between two harms: dropping every such
//! packet would cut everyone's traffic with long header chains (NATed return traffic included);
//! passing them all is the bypass. This rule costs only the return traffic of *listed* sources
//! whose packets carry more than 4 extension headers or reach past byte 1 024 — on the
//! internet, where even one extension header is often dropped on the path (RFC 7872, RFC 9098),
//! practically none — and it applies whether or not a port is guarded (the agent always guards
//! its listen port). A chain the guard does follow to a header that is neither UDP nor TCP
//! (ICMP past byte 1 024, say) is unguarded as before. 4 headers and byte 1 024 stay the bounds: raising them
//! costs verifier work and closes nothing, since an attacker chooses the chain's length.
//!
//! **QinQ** (two VLAN tags) counts as non-IP (unguarded): the stack delivers it to a socket only
//! through stacked VLAN devices on the uplink, which Capybara does not set up.
//!
//! Bytes are counted as the frame length (`data_end - data`).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use capybara_common::{
    counters::{
        Counter, XDP_DROP_BLOCKLIST, XDP_DROP_UNPARSEABLE, XDP_PASS_CLEAN, XDP_PASS_FRAGMENT,
        XDP_PASS_MALFORMED, XDP_PASS_UNGUARDED, XDP_PASS_UNPARSEABLE,
    },
    drop::DropReason,
    maps::{GUARD_TCP, GUARD_UDP},
};

use crate::{
    counters::{count, count_drop, count_list_hit},
    lookup::{SOURCE, config},
    maps::GUARD_PORTS,
    parse::{
        self, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_HEADER_OFFSET, Malformed, Packet,
        Src,
    },
};

/// The guard's decision, before counting.
enum Verdict {
    Unguarded,
    Clean,
    Fragment,
    Blocked(u32),
    /// Deeper than the guard parses (port unknown), source in no list.
    DeepClean,
    /// Deeper than the guard parses (port unknown), source in list `n`.
    DeepBlocked(u32),
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
        Ok(Verdict::DeepClean) => {
            count(XDP_PASS_UNPARSEABLE, Counter::one(bytes));
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
        Ok(Verdict::DeepBlocked(list)) => {
            count_drop(
                XDP_DROP_UNPARSEABLE,
                DropReason::Unparseable,
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
    // Too deep to know the port (module docs): the chain goes on past the parser's bounds, or
    // the UDP header starts past `MAX_HEADER_OFFSET`.
    let transport = match ip.protocol {
        IPPROTO_UDP => GUARD_UDP,
        IPPROTO_TCP => GUARD_TCP,
        _ => 0,
    };
    let deep = ip.deep || (transport != 0 && ip.l4_off > MAX_HEADER_OFFSET);
    if !deep {
        if transport == 0 {
            return Ok(Verdict::Unguarded);
        }
        if ip.later_fragment {
            return Ok(Verdict::Fragment);
        }
        let port = parse::dst_port(pkt, ip.l4_off)?;
        match GUARD_PORTS.get(port as u32) {
            Some(g) if *g & transport != 0 => {}
            _ => return Ok(Verdict::Unguarded),
        }
    }
    let cfg = config();
    let list = match ip.src {
        Src::V4(addr) => SOURCE.v4(&cfg, addr),
        Src::V6(addr) => SOURCE.v6(&cfg, &addr),
    };
    Ok(match (list, deep) {
        (0, false) => Verdict::Clean,
        (0, true) => Verdict::DeepClean,
        (n, false) => Verdict::Blocked(n),
        (n, true) => Verdict::DeepBlocked(n),
    })
}
