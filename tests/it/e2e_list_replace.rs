//! Replacing a 100k-prefix source list while traffic flows never lets a blocked packet through.
//!
//! Two different lists of 100 000 random IPv4 prefixes (lengths as in real threat lists: mostly
//! /20–/32, some /16–/19) both block the test's blocked source — one with its /24, the other
//! with its /32, so each replacement also changes *how* the address is blocked (DIR entry vs.
//! long-prefix hash). While a blocked source and a clean source each stream UDP to guarded ports
//! on the server's XDP-guarded veth, the list is replaced with the other one again and again.
//! Not one blocked datagram may arrive; every datagram of the clean source must, and it must keep
//! arriving during the replacements.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use capybara_agent::{blocklist::Direction, net::Cidr};
use capybara_common::counters::XDP_DROP_BLOCKLIST;
use capybara_tests::{
    netns::{BpffsDir, NetNs, VethPair},
    traffic::{UdpSink, UdpStream},
};
use rand::Rng;

use crate::e2e_support::{WAIT, attach_xdp, list, list_id, open_dataplane};

const BLOCKED_PORT: u16 = 51820;
const CLEAN_PORT: u16 = 51830;
const PREFIXES: usize = 100_000;
const REPLACEMENTS: usize = 8;

/// `count` random prefixes that cover none of `avoid` (whole /16s kept clear), plus `extra`.
fn random_list(count: usize, avoid: &[Ipv4Addr], extra: Cidr) -> Vec<Cidr> {
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(count + 1);
    out.push(extra);
    while out.len() < count + 1 {
        let len: u8 = if rng.random_range(0..100) < 5 {
            rng.random_range(16..=19)
        } else {
            rng.random_range(20..=32)
        };
        let addr: u32 = rng.random();
        let mask = u32::MAX << (32 - u32::from(len));
        let net = addr & mask;
        // Keep every test address's /16 clear, whatever the prefix length.
        if avoid.iter().any(|a| {
            (u32::from(*a) & 0xffff_0000) == (net & 0xffff_0000) || (u32::from(*a) & mask) == net
        }) {
            continue;
        }
        out.push(Cidr::v4(Ipv4Addr::from(net), len).unwrap());
    }
    out
}

#[test]
fn replacing_a_100k_list_under_traffic_never_lets_a_blocked_packet_through() {
    let pins = BpffsDir::new();
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let veth = VethPair::new(&a, &b, 71);
    let blocked = Ipv4Addr::new(10, 72, 5, 9);
    b.add_addr(&veth.b.ifname, &format!("{blocked}/24"));
    a.add_route("10.72.5.0/24", &veth.a.ifname, None);

    let avoid = [veth.a.v4, veth.b.v4, blocked];
    let list_a = random_list(
        PREFIXES,
        &avoid,
        Cidr::v4(Ipv4Addr::new(10, 72, 5, 0), 24).unwrap(),
    );
    let list_b = random_list(PREFIXES, &avoid, Cidr::v4(blocked, 32).unwrap());
    assert_ne!(list_a, list_b);

    let mut dp = open_dataplane(&pins);
    attach_xdp(&mut dp, &a, &veth.a.ifname);
    dp.set_guard_ports(&[BLOCKED_PORT, CLEAN_PORT], &[])
        .expect("set guard ports");
    let threats = list("threats");
    dp.list_replace(Direction::Source, &threats, &list_a)
        .expect("load the first list");
    let id = list_id(&dp, Direction::Source, &threats);
    assert_eq!(
        dp.lookup_v4(Direction::Source, blocked).expect("lookup"),
        id,
        "the dataplane does not resolve the blocked source to the list"
    );

    let bad_sink = UdpSink::start(&a, SocketAddr::new(IpAddr::V4(veth.a.v4), BLOCKED_PORT));
    let good_sink = UdpSink::start(&a, SocketAddr::new(IpAddr::V4(veth.a.v4), CLEAN_PORT));
    let drops_before = dp.counters().unwrap().get(XDP_DROP_BLOCKLIST);
    let hits_before = dp.list_hits(id).unwrap();

    let interval = Duration::from_micros(200);
    let max = Duration::from_secs(25);
    let bad = UdpStream::start(
        &b,
        Some(IpAddr::V4(blocked)),
        bad_sink.addr(),
        200,
        interval,
        max,
    );
    let good = UdpStream::start(
        &b,
        Some(IpAddr::V4(veth.b.v4)),
        good_sink.addr(),
        200,
        interval,
        max,
    );
    assert!(
        good_sink.wait_for(100, WAIT) >= 100,
        "the clean source does not get through before the replacements"
    );

    let mut slowest = Duration::ZERO;
    for i in 0..REPLACEMENTS {
        let next = if i % 2 == 0 { &list_b } else { &list_a };
        let good_before = good_sink.packets();
        let t = Instant::now();
        dp.list_replace(Direction::Source, &threats, next)
            .unwrap_or_else(|e| panic!("replacement {i}: {e}"));
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            bad_sink.packets(),
            0,
            "a blocked datagram arrived during replacement {i}"
        );
        // The clean stream kept flowing across the replacement.
        let flowing = good_sink.wait_for(good_before + 20, WAIT);
        assert!(
            flowing >= good_before + 20,
            "the clean source stopped arriving around replacement {i}"
        );
        assert_eq!(
            dp.list_id(Direction::Source, &threats),
            Some(id),
            "the list id changed"
        );
    }

    let bad_sent = bad.stop();
    let good_sent = good.stop();
    let good_got = good_sink.wait_for(good_sent, WAIT);
    assert_eq!(
        bad_sink.settle(Duration::from_millis(300), WAIT),
        0,
        "blocked datagrams arrived"
    );
    assert_eq!(
        good_got, good_sent,
        "clean datagrams were lost ({good_got} of {good_sent})"
    );
    let drops = dp.counters().unwrap().get(XDP_DROP_BLOCKLIST);
    let hits = dp.list_hits(id).unwrap();
    assert_eq!(
        drops.packets - drops_before.packets,
        bad_sent,
        "xdp_drop_blocklist"
    );
    assert_eq!(
        hits.packets - hits_before.packets,
        bad_sent,
        "hits of the list"
    );
    assert!(
        bad_sent > 1000,
        "the blocked stream sent only {bad_sent} datagrams"
    );
    eprintln!(
        "{REPLACEMENTS} replacements of {PREFIXES} prefixes (slowest {slowest:?}) under \
         {bad_sent} blocked and {good_sent} clean datagrams"
    );
}
