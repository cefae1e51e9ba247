//! Bandwidth shaping end to end: iperf3 TCP through the tunnel device of a [`TunWire`] between
//! two namespaces, the TC programs attached by the agent's dataplane, the peer given rates with
//! `Dataplane::set_rates`.
//!
//! A shaped peer's goodput lies within 0.85–1.02 × its rate for 5 and 50 Mbit/s, in each
//! direction, with the kernel's default congestion control and with cubic; a second, unlimited
//! peer on the same device keeps its speed meanwhile; a rate change takes effect at once; clearing
//! the rates restores full speed. (The exact accuracy figures are `cargo xtask bench`'s
//! `throttle_accuracy_*`.)

mod e2e_support;

use std::net::IpAddr;

use capybara_agent::{dataplane::PeerRates, net::Cidr, units::Rate};
use capybara_common::counters::{TC_IN_SHAPED, TC_OUT_SHAPED};
use capybara_tests::iperf::{self, IperfResult, IperfTcp};
use e2e_support::{TunPeer, tun_peer};

const PEER: u32 = 4;
const OTHER_PEER: u32 = 5;

/// Sends for 4 s (after 1 s of slow start) in `to_peer`'s direction.
fn send(s: &TunPeer, to_peer: bool, dst: IpAddr, congestion: Option<&str>) -> IperfResult {
    let spec = IperfTcp {
        seconds: 4,
        congestion,
        ..IperfTcp::default()
    };
    let (from, to, dst) = if to_peer {
        (&s.a, &s.b, dst)
    } else {
        (&s.b, &s.a, IpAddr::V4(s.wire.a.v4))
    };
    iperf::tcp(from, to, dst, &spec)
}

fn assert_within(r: &IperfResult, rate: Rate, what: &str) {
    let ratio = r.received_bps / rate.bits_per_sec() as f64;
    eprintln!(
        "{what}: {:.2} Mbit/s = {ratio:.3} × {rate}, {} retransmits",
        r.received_bps / 1e6,
        r.retransmits
    );
    assert!(
        (0.85..=1.02).contains(&ratio),
        "{what}: goodput {:.2} Mbit/s is {ratio:.3} × the configured {rate}, outside 0.85–1.02",
        r.received_bps / 1e6
    );
}

fn rates(to_peer: Option<Rate>, from_peer: Option<Rate>) -> PeerRates {
    PeerRates { to_peer, from_peer }
}

/// The peer namespace gets a second address, allowed IP of a second (unlimited) peer.
fn add_other_peer(s: &mut TunPeer) -> IpAddr {
    let net = s.wire.b.v4.octets();
    let addr = IpAddr::from([net[0], net[1], net[2], 3]);
    s.b.add_addr(&s.wire.b.ifname, &format!("{addr}/24"));
    s.dp.add_peer(OTHER_PEER, &[Cidr::host(addr)])
        .expect("add the unlimited peer");
    addr
}

#[test]
fn shaped_peer_gets_its_rate_each_direction_and_cc_while_others_keep_their_speed() {
    let mut s = tun_peer(61, PEER);
    let other = add_other_peer(&mut s);
    let peer_addr = IpAddr::V4(s.wire.b.v4);

    let before = send(&s, true, other, None);
    eprintln!(
        "unlimited peer alone: {:.0} Mbit/s",
        before.received_bps / 1e6
    );

    for mbit in [5, 50] {
        let rate = Rate::mbit(mbit).unwrap();
        s.dp.set_rates(PEER, rates(Some(rate), Some(rate)))
            .expect("set rates");
        assert_eq!(s.dp.rates(PEER).unwrap(), rates(Some(rate), Some(rate)));
        for cc in [None, Some("cubic")] {
            let name = cc.unwrap_or("default cc");
            let to = send(&s, true, peer_addr, cc);
            assert_within(&to, rate, &format!("to the peer, {name}"));
            let from = send(&s, false, peer_addr, cc);
            assert_within(&from, rate, &format!("from the peer, {name}"));
        }
    }
    let counters = s.dp.counters().expect("counters");
    assert!(
        counters.get(TC_OUT_SHAPED).packets > 0 && counters.get(TC_IN_SHAPED).packets > 0,
        "shaped packets are counted in both directions: {counters:?}"
    );

    // The unlimited peer while the shaped one sends at its rate.
    let shaped = std::thread::scope(|sc| {
        let h = sc.spawn(|| send(&s, true, peer_addr, None));
        let other_during = send(&s, true, other, None);
        (h.join().unwrap(), other_during)
    });
    eprintln!(
        "unlimited peer beside the shaped one: {:.0} Mbit/s (alone {:.0})",
        shaped.1.received_bps / 1e6,
        before.received_bps / 1e6
    );
    assert!(
        shaped.1.received_bps >= 0.7 * before.received_bps,
        "the unlimited peer slowed from {:.0} to {:.0} Mbit/s beside a shaped peer",
        before.received_bps / 1e6,
        shaped.1.received_bps / 1e6
    );

    // Clearing the rates restores the peer's speed.
    s.dp.set_rates(PEER, PeerRates::default())
        .expect("clear rates");
    let free = send(&s, true, peer_addr, None);
    assert!(
        free.received_bps > 200e6,
        "unshaped again, the peer gets only {:.0} Mbit/s",
        free.received_bps / 1e6
    );
}
