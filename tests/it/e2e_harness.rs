//! Self-tests of the end-to-end harness: the guards create and remove what they say, and the
//! TUN wire and veth pair carry real traffic both ways, counted exactly.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use capybara_tests::{
    netns::{BpffsDir, NetNs, VethPair},
    traffic::{IfCounters, UDP4_OVERHEAD, UDP6_OVERHEAD, UdpSink, send_udp, tcp_transfer},
    tunwire::TunWire,
};

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn netns_and_pin_dir_are_removed_on_drop_even_on_panic() {
    let (ns_path, pin_path) = {
        let ns = NetNs::new("h");
        let pins = BpffsDir::new();
        assert!(ns.path().exists());
        assert!(pins.path().is_dir());
        let pid = ns.spawn(&["sleep", "60"]);
        assert!(ns.is_running(pid));
        (ns.path(), pins.path().to_owned())
    };
    assert!(!ns_path.exists(), "{} left behind", ns_path.display());
    assert!(!pin_path.exists(), "{} left behind", pin_path.display());

    let paths = std::panic::catch_unwind(|| {
        let ns = NetNs::new("p");
        let pins = BpffsDir::new();
        let paths = (ns.path(), pins.path().to_owned());
        std::fs::write(
            "/tmp/ct-harness-paths",
            format!("{}\n{}", paths.0.display(), paths.1.display()),
        )
        .unwrap();
        panic!("deliberate panic inside the guards' scope");
    });
    assert!(paths.is_err());
    let written = std::fs::read_to_string("/tmp/ct-harness-paths").unwrap();
    let _ = std::fs::remove_file("/tmp/ct-harness-paths");
    for p in written.lines() {
        assert!(!Path::new(p).exists(), "{p} left behind after a panic");
    }
}

#[test]
fn run_enters_the_namespace() {
    let ns = NetNs::new("r");
    // Only `lo` exists in a fresh namespace.
    // /proc/thread-self/net shows the calling thread's namespace (/proc/self/net the main
    // thread's); its `dev` file has two header lines and one line per interface.
    let links = ns.run(|| {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap()
            .lines()
            .count()
            - 2
    });
    assert_eq!(links, 1, "a thread in a fresh namespace should see only lo");
    let out = ns.exec(&["ip", "-o", "link"]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn veth_pair_carries_udp_and_tcp_both_ways() {
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let veth = VethPair::new(&a, &b, 31);
    for (dst, src) in [
        (IpAddr::V4(veth.a.v4), IpAddr::V4(veth.b.v4)),
        (IpAddr::V6(veth.a.v6), IpAddr::V6(veth.b.v6)),
    ] {
        let sink = UdpSink::start(&a, SocketAddr::new(dst, 0));
        send_udp(&b, Some(src), sink.addr(), 200, 700);
        assert_eq!(sink.wait_for(200, WAIT), 200, "UDP b→a to {dst}");
        assert_eq!(sink.bytes(), 200 * 700);
        let back = UdpSink::start(&b, SocketAddr::new(src, 0));
        send_udp(&a, Some(dst), back.addr(), 50, 100);
        assert_eq!(back.wait_for(50, WAIT), 50, "UDP a→b to {src}");
    }
    let r = tcp_transfer(
        &a,
        SocketAddr::new(IpAddr::V4(veth.a.v4), 0),
        &b,
        3_000_000,
        1_000_001,
        WAIT,
    );
    assert_eq!(r.server_received, 3_000_000);
    assert_eq!(r.client_received, 1_000_001);
}

#[test]
fn tunwire_forwards_udp_both_ways_with_exact_interface_counters() {
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let wire = TunWire::new(&a, &b, 32);
    let ping = b.try_exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        &wire.a.v4.to_string(),
    ]);
    assert!(
        ping.status.success(),
        "ping over the TUN wire failed: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    for (dst, src, overhead) in [
        (IpAddr::V4(wire.a.v4), IpAddr::V4(wire.b.v4), UDP4_OVERHEAD),
        (IpAddr::V6(wire.a.v6), IpAddr::V6(wire.b.v6), UDP6_OVERHEAD),
    ] {
        let (n, s) = (300u64, 1000usize);
        let before = IfCounters::settled(&a, &wire.a.ifname, Duration::from_millis(200), WAIT);
        let fwd_before = wire.forwarded_b_to_a();
        let sink = UdpSink::start(&a, SocketAddr::new(dst, 0));
        send_udp(&b, Some(src), sink.addr(), n, s);
        assert_eq!(sink.wait_for(n, WAIT), n, "UDP b→a to {dst}");
        let d = IfCounters::read(&a, &wire.a.ifname).since(&before);
        assert_eq!(d.rx_packets, n, "{d:?}");
        assert_eq!(d.rx_bytes, n * (s as u64 + overhead), "{d:?}");
        assert_eq!(wire.forwarded_b_to_a() - fwd_before, n);

        let back = UdpSink::start(&b, SocketAddr::new(src, 0));
        let before = IfCounters::read(&a, &wire.a.ifname);
        send_udp(&a, Some(dst), back.addr(), n, s);
        assert_eq!(back.wait_for(n, WAIT), n, "UDP a→b to {src}");
        let d = IfCounters::read(&a, &wire.a.ifname).since(&before);
        // The kernel's own MLD reports may add a packet or two on egress; never fewer.
        assert!(d.tx_packets >= n, "{d:?}");
        assert!(d.tx_bytes >= n * (s as u64 + overhead), "{d:?}");
        assert_eq!(d.tx_dropped, 0, "{d:?}");
    }

    let r = tcp_transfer(
        &a,
        SocketAddr::new(IpAddr::V4(wire.a.v4), 0),
        &b,
        2_000_000,
        500_000,
        Duration::from_secs(15),
    );
    assert_eq!(r.server_received, 2_000_000);
    assert_eq!(r.client_received, 500_000);
}
