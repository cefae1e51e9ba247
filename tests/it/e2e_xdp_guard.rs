//! The XDP guard on the server's uplink (a veth end): UDP to the guarded port from a blocked
//! source never arrives and is counted (drop counter, drop reason, list hits: exactly N packets
//! and N frames' bytes); removing the block restores delivery; other sources, unguarded ports and
//! TCP are never affected.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use capybara_agent::{blocklist::Direction, dataplane::Dataplane};
use capybara_common::{
    counters::{Counter, DROPS_BASE, XDP_DROP_BLOCKLIST, XDP_PASS_CLEAN},
    drop::DropReason,
};
use capybara_tests::{
    netns::{BpffsDir, NetNs, VethPair},
    traffic::{UdpSink, send_udp, tcp_transfer_from, udp_overhead},
};

use crate::e2e_support::{WAIT, attach_xdp, cidr, list, list_id, open_dataplane, sub};

const GUARDED: u16 = 51820;
const UNGUARDED: u16 = 51821;
const ETH_HLEN: u64 = 14;
const N: u64 = 200;
const SIZE: usize = 300;

/// What the dataplane counted between two reads.
struct Drops {
    drop_blocklist: Counter,
    reason: Counter,
    pass_clean: Counter,
    list_hits: Counter,
}

fn read(dp: &Dataplane, list_id: u32) -> Drops {
    let g = dp.counters().expect("read counters");
    Drops {
        drop_blocklist: g.get(XDP_DROP_BLOCKLIST),
        reason: g.get(DROPS_BASE + DropReason::SourceBlocklist as u32),
        pass_clean: g.get(XDP_PASS_CLEAN),
        list_hits: dp.list_hits(list_id).expect("read list hits"),
    }
}

/// Sends N datagrams from `src` to `dst:port` and returns how many arrived (waiting for all of
/// them, or until the link has been quiet for a while when fewer are expected).
fn udp(b: &NetNs, a: &NetNs, src: IpAddr, dst: IpAddr, port: u16, expect: u64) -> u64 {
    let sink = UdpSink::start(a, SocketAddr::new(dst, port));
    send_udp(b, Some(src), sink.addr(), N, SIZE);
    if expect == N {
        sink.wait_for(N, WAIT)
    } else {
        sink.settle(Duration::from_millis(500), WAIT)
    }
}

#[test]
fn blocked_source_never_reaches_the_guarded_port_and_unblocking_restores_it() {
    let pins = BpffsDir::new();
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let veth = VethPair::new(&a, &b, 51);
    // Two more sources on the client side: one to block (v4 and v6), the clean ones are the
    // veth's own addresses.
    let blocked4 = Ipv4Addr::new(10, 51, 0, 99);
    let blocked6: Ipv6Addr = "fd00:33::99".parse().unwrap();
    b.add_addr(&veth.b.ifname, &format!("{blocked4}/24"));
    b.add_addr(&veth.b.ifname, &format!("{blocked6}/64"));

    let mut dp = open_dataplane(&pins);
    attach_xdp(&mut dp, &a, &veth.a.ifname);
    dp.set_guard_ports(&[GUARDED], &[])
        .expect("set guard ports");

    let cases = [
        (
            IpAddr::V4(blocked4),
            IpAddr::V4(veth.b.v4),
            IpAddr::V4(veth.a.v4),
        ),
        (
            IpAddr::V6(blocked6),
            IpAddr::V6(veth.b.v6),
            IpAddr::V6(veth.a.v6),
        ),
    ];

    // Before any list: everything arrives, and the guard sees it as clean.
    for &(bad, _, dst) in &cases {
        assert_eq!(
            udp(&b, &a, bad, dst, GUARDED, N),
            N,
            "{bad} → {dst} before blocking"
        );
    }

    let manual = list("manual");
    dp.list_add(
        Direction::Source,
        &manual,
        &[cidr("10.51.0.96/28"), cidr("fd00:33::90/124")],
    )
    .expect("block the sources");
    let id = list_id(&dp, Direction::Source, &manual);

    for &(bad, good, dst) in &cases {
        let frame = SIZE as u64 + udp_overhead(&SocketAddr::new(dst, 0)) + ETH_HLEN;
        let before = read(&dp, id);
        assert_eq!(
            udp(&b, &a, bad, dst, GUARDED, 0),
            0,
            "a blocked source ({bad}) reached the guarded port"
        );
        let after = read(&dp, id);
        assert_eq!(
            sub(after.drop_blocklist, before.drop_blocklist),
            (N, N * frame),
            "xdp_drop_blocklist for {bad}"
        );
        assert_eq!(
            sub(after.reason, before.reason),
            (N, N * frame),
            "drops by reason SourceBlocklist for {bad}"
        );
        assert_eq!(
            sub(after.list_hits, before.list_hits),
            (N, N * frame),
            "hits of list manual for {bad}"
        );

        // A clean source to the guarded port still gets through, counted as clean.
        let before = read(&dp, id);
        assert_eq!(
            udp(&b, &a, good, dst, GUARDED, N),
            N,
            "clean {good} → {dst}"
        );
        let after = read(&dp, id);
        assert_eq!(sub(after.pass_clean, before.pass_clean), (N, N * frame));
        assert_eq!(sub(after.list_hits, before.list_hits), (0, 0));

        // The blocked source to an unguarded port is not the guard's business.
        let before = read(&dp, id);
        assert_eq!(
            udp(&b, &a, bad, dst, UNGUARDED, N),
            N,
            "{bad} → unguarded port"
        );
        assert_eq!(sub(read(&dp, id).list_hits, before.list_hits), (0, 0));

        // TCP (not UDP) from the blocked source, even to the guarded port number, flows.
        let r = tcp_transfer_from(
            &a,
            SocketAddr::new(dst, GUARDED),
            &b,
            Some(bad),
            1_000_000,
            200_000,
            Duration::from_secs(10),
        );
        assert_eq!((r.server_received, r.client_received), (1_000_000, 200_000));
        assert_eq!(sub(read(&dp, id).list_hits, before.list_hits), (0, 0));
    }

    dp.list_remove(
        Direction::Source,
        &manual,
        &[cidr("10.51.0.96/28"), cidr("fd00:33::90/124")],
    )
    .expect("unblock");
    for &(bad, _, dst) in &cases {
        let before = read(&dp, id);
        assert_eq!(
            udp(&b, &a, bad, dst, GUARDED, N),
            N,
            "{bad} → {dst} after unblocking"
        );
        assert_eq!(sub(read(&dp, id).list_hits, before.list_hits), (0, 0));
    }
}
