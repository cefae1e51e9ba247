//! Destination blocklists on the tunnel device: what a peer sends to a blocked destination never
//! arrives, and is counted — per list, per reason, and on the peer; replies *from* a blocked
//! address never reach the peer either; clean destinations and unblocking work.
//!
//! The server namespace holds "the internet behind the server" on its loopback: 10.62.0.1 /
//! fd00:62::1 (blocked by list `ads`) and 10.63.0.1 / fd00:63::1 (clean); the peer routes both
//! through its TUN device, so they cross the server's tunnel device like a VPN user's traffic.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_agent::{blocklist::Direction, dataplane::Dataplane, net::Cidr};
use capybara_common::{
    counters::{Counter, DROPS_BASE, TC_IN_DROP_BLOCKLIST, TC_OUT_DROP_BLOCKLIST},
    drop::DropReason,
    peer::PeerStats,
};
use capybara_tests::{
    netns::{BpffsDir, NetNs},
    traffic::{UdpSink, send_udp, udp_overhead},
    tunwire::TunWire,
};

use crate::e2e_support::{WAIT, attach_tc, cidr, list, list_id, open_dataplane, sub};

const PEER: u32 = 3;
const N: u64 = 150;
const SIZE: usize = 500;

struct Snap {
    in_drop: Counter,
    out_drop: Counter,
    reason: Counter,
    hits: Counter,
    peer: PeerStats,
}

fn snap(dp: &Dataplane, id: u32) -> Snap {
    let g = dp.counters().expect("read counters");
    Snap {
        in_drop: g.get(TC_IN_DROP_BLOCKLIST),
        out_drop: g.get(TC_OUT_DROP_BLOCKLIST),
        reason: g.get(DROPS_BASE + DropReason::DestinationBlocklist as u32),
        hits: dp.list_hits(id).expect("read list hits"),
        peer: dp.peer_stats(PEER).expect("read peer stats"),
    }
}

/// Sends N datagrams from namespace `from` (source `src`) to `dst` in namespace `to`; returns
/// how many arrived.
fn udp(from: &NetNs, src: IpAddr, to: &NetNs, dst: IpAddr, expect: u64) -> u64 {
    let sink = UdpSink::start(to, SocketAddr::new(dst, 0));
    send_udp(from, Some(src), sink.addr(), N, SIZE);
    if expect == N {
        sink.wait_for(N, WAIT)
    } else {
        sink.settle(Duration::from_millis(500), WAIT)
    }
}

#[test]
fn peer_traffic_to_a_blocked_destination_never_arrives_and_is_counted_per_list() {
    let pins = BpffsDir::new();
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let wire = TunWire::new(&a, &b, 61);
    for addr in [
        "10.62.0.1/32",
        "10.63.0.1/32",
        "fd00:62::1/128",
        "fd00:63::1/128",
    ] {
        a.add_addr("lo", addr);
    }
    for net in [
        "10.62.0.0/24",
        "10.63.0.0/24",
        "fd00:62::/64",
        "fd00:63::/64",
    ] {
        b.add_route(net, &wire.b.ifname, None);
    }

    let mut dp = open_dataplane(&pins);
    attach_tc(&mut dp, &a, &wire.a.ifname);
    dp.add_peer(
        PEER,
        &[
            Cidr::host(IpAddr::V4(wire.b.v4)),
            Cidr::host(IpAddr::V6(wire.b.v6)),
        ],
    )
    .expect("add peer");

    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let cases = [
        (IpAddr::V4(wire.b.v4), ip("10.62.0.1"), ip("10.63.0.1")),
        (IpAddr::V6(wire.b.v6), ip("fd00:62::1"), ip("fd00:63::1")),
    ];

    for &(peer, blocked, _) in &cases {
        assert_eq!(
            udp(&b, peer, &a, blocked, N),
            N,
            "{peer} → {blocked} before blocking"
        );
    }

    let ads = list("ads");
    let entries = [cidr("10.62.0.0/24"), cidr("fd00:62::/64")];
    dp.list_add(Direction::Destination, &ads, &entries)
        .expect("block the destinations");
    let id = list_id(&dp, Direction::Destination, &ads);
    // Another list, not matching anything here, must not be charged.
    dp.list_add(
        Direction::Destination,
        &list("tor"),
        &[cidr("10.64.0.0/16")],
    )
    .expect("second list");
    let other = list_id(&dp, Direction::Destination, &list("tor"));

    for &(peer, blocked, clean) in &cases {
        let ip_len = SIZE as u64 + udp_overhead(&SocketAddr::new(peer, 0));

        // Peer → blocked destination: dropped on the tunnel device's ingress.
        let before = snap(&dp, id);
        let other_before = dp.list_hits(other).unwrap();
        assert_eq!(
            udp(&b, peer, &a, blocked, 0),
            0,
            "peer {peer} reached blocked {blocked}"
        );
        let after = snap(&dp, id);
        assert_eq!(
            sub(after.in_drop, before.in_drop),
            (N, N * ip_len),
            "tc_in_drop_blocklist"
        );
        assert_eq!(
            sub(after.reason, before.reason),
            (N, N * ip_len),
            "DestinationBlocklist drops"
        );
        assert_eq!(
            sub(after.hits, before.hits),
            (N, N * ip_len),
            "hits of list ads"
        );
        assert_eq!(
            dp.list_hits(other).unwrap(),
            other_before,
            "list tor charged"
        );
        assert_eq!(
            after.peer.drops[DropReason::DestinationBlocklist as usize]
                - before.peer.drops[DropReason::DestinationBlocklist as usize],
            N,
            "the peer's DestinationBlocklist drops"
        );
        assert_eq!(
            after.peer.rx_packets, before.peer.rx_packets,
            "dropped packets counted as rx"
        );

        // Blocked address → peer (egress): dropped too, never reaches the peer.
        let before = snap(&dp, id);
        assert_eq!(
            udp(&a, blocked, &b, peer, 0),
            0,
            "blocked {blocked} reached peer {peer}"
        );
        let after = snap(&dp, id);
        assert_eq!(
            sub(after.out_drop, before.out_drop),
            (N, N * ip_len),
            "tc_out_drop_blocklist"
        );
        assert_eq!(
            sub(after.hits, before.hits),
            (N, N * ip_len),
            "hits of list ads (egress)"
        );
        assert_eq!(
            after.peer.tx_packets, before.peer.tx_packets,
            "dropped packets counted as tx"
        );

        // A clean destination is reached and counted on the peer.
        let before = snap(&dp, id);
        assert_eq!(udp(&b, peer, &a, clean, N), N, "{peer} → clean {clean}");
        let after = snap(&dp, id);
        assert_eq!(after.peer.rx_packets - before.peer.rx_packets, N);
        assert_eq!(after.peer.rx_bytes - before.peer.rx_bytes, N * ip_len);
        assert_eq!(sub(after.hits, before.hits), (0, 0));
    }

    dp.list_remove(Direction::Destination, &ads, &entries)
        .expect("unblock");
    for &(peer, blocked, _) in &cases {
        let before = snap(&dp, id);
        assert_eq!(
            udp(&b, peer, &a, blocked, N),
            N,
            "{peer} → {blocked} after unblocking"
        );
        assert_eq!(
            udp(&a, blocked, &b, peer, N),
            N,
            "{blocked} → {peer} after unblocking"
        );
        assert_eq!(sub(snap(&dp, id).hits, before.hits), (0, 0));
    }
}
