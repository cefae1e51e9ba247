//! Data quotas end to end: real UDP through the tunnel device of a [`TunWire`] between two
//! namespaces, the TC programs attached by the agent's dataplane, the peer charged to one bucket.
//!
//! With a 10 MB budget, 20 MB of UDP from the peer delivers at most 10 MB plus one packet per
//! CPU (counted at the receiving socket, as IP bytes); the bucket's usage stops there; the 80,
//! 90 and 100 % warnings each arrive exactly once on the agent's event stream; a reset (new
//! epoch, zero usage) lets traffic through again.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_agent::dataplane::{Event, QuotaThreshold};
use capybara_common::drop::DropReason;
use capybara_tests::traffic::{UdpSink, send_udp, udp_overhead};

use crate::e2e_support::{WAIT, quota_events, tun_peer};

const PEER: u32 = 3;
const BUCKET: u32 = 11;
const LIMIT: u64 = 10_000_000;

#[test]
fn quota_drops_past_the_budget_warns_once_per_threshold_and_reset_restores() {
    let mut s = tun_peer(47, PEER);
    let (dp, a, b, wire) = (&mut s.dp, &s.a, &s.b, &s.wire);
    dp.set_quota_limit(BUCKET, LIMIT).expect("create bucket");
    dp.assign_quota(PEER, Some(BUCKET)).expect("assign bucket");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = {
        let _ctx = rt.enter();
        dp.event_stream().expect("event stream")
    };

    // 20 MB of UDP from the peer to the server: 20 000 datagrams of 1000 payload bytes.
    let sink = UdpSink::start(a, SocketAddr::new(IpAddr::V4(wire.a.v4), 0));
    let (n, size) = (20_000u64, 1000usize);
    let ip_len = size as u64 + udp_overhead(&sink.addr());
    let used_before = dp.quota_usage(BUCKET).unwrap().used_bytes;
    send_udp(b, Some(IpAddr::V4(wire.b.v4)), sink.addr(), n, size);
    let got = sink.settle(Duration::from_millis(500), WAIT);
    let delivered = got * ip_len;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let usage = dp.quota_usage(BUCKET).unwrap();
    let ctx = format!(
        "{got} datagrams ({delivered} IP bytes) delivered, bucket {usage:?}, {cpus} CPUs, \
         {used_before} bytes charged before the burst"
    );
    eprintln!("{ctx}");
    assert!(usage.exhausted(), "the budget was not spent: {ctx}");
    assert!(
        usage.used_bytes <= LIMIT + cpus * ip_len,
        "charged past the limit by more than one packet per CPU: {ctx}"
    );
    assert!(
        delivered <= LIMIT + cpus * ip_len,
        "delivered more than the budget plus one packet per CPU: {ctx}"
    );
    assert!(
        delivered <= usage.used_bytes,
        "delivered more than charged: {ctx}"
    );
    let drops = dp.peer_stats(PEER).unwrap().drops[DropReason::QuotaExhausted as usize];
    assert!(
        drops > 0 && drops <= n - got,
        "{drops} quota drops for {} datagrams not delivered: {ctx}",
        n - got
    );

    // Each threshold exactly once, in order, with the bucket's figures.
    let quota_events = rt.block_on(quota_events(&mut events, None));
    let summary: Vec<(QuotaThreshold, u32, u64, u32, u32)> = quota_events
        .iter()
        .map(|e| match *e {
            Event::Quota {
                bucket,
                threshold,
                limit,
                epoch,
                peer,
                ..
            } => (threshold, bucket, limit, epoch, peer),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (QuotaThreshold::Percent80, BUCKET, LIMIT, 0, PEER),
            (QuotaThreshold::Percent90, BUCKET, LIMIT, 0, PEER),
            (QuotaThreshold::Exhausted, BUCKET, LIMIT, 0, PEER),
        ],
        "{quota_events:?}"
    );
    for e in &quota_events {
        if let Event::Quota {
            threshold, used, ..
        } = *e
        {
            let at = LIMIT / 100 * u64::from(threshold.percent());
            assert!(
                used >= at && used < at + cpus * ip_len,
                "{e:?} reported far from its threshold"
            );
        }
    }

    // Still exhausted: nothing passes.
    let blocked = UdpSink::start(a, SocketAddr::new(IpAddr::V4(wire.a.v4), 0));
    send_udp(b, Some(IpAddr::V4(wire.b.v4)), blocked.addr(), 50, size);
    assert_eq!(
        blocked.settle(Duration::from_millis(300), WAIT),
        0,
        "traffic passed an exhausted bucket"
    );

    // A reset restores traffic, both families.
    let r = dp.reset_quota(BUCKET, None).expect("reset");
    assert_eq!((r.used_bytes, r.epoch), (0, 1));
    for (server, client) in [
        (IpAddr::V4(wire.a.v4), IpAddr::V4(wire.b.v4)),
        (IpAddr::V6(wire.a.v6), IpAddr::V6(wire.b.v6)),
    ] {
        let sink = UdpSink::start(a, SocketAddr::new(server, 0));
        send_udp(b, Some(client), sink.addr(), 100, size);
        assert_eq!(
            sink.wait_for(100, WAIT),
            100,
            "after the reset via {server}"
        );
    }
    assert!(dp.quota_usage(BUCKET).unwrap().used_bytes >= 200 * ip_len);
}

/// Top-ups while traffic is charged lose no charged byte: the bucket's usage equals the peer's
/// counted bytes after a thousand top-ups raced a UDP stream (a top-up that rewrote the bucket
/// would forgive the bytes charged between its read and its write).
#[test]
fn top_ups_racing_traffic_forgive_no_byte() {
    use capybara_tests::traffic::UdpStream;

    let mut s = tun_peer(48, PEER);
    let (dp, a, b, wire) = (&mut s.dp, &s.a, &s.b, &s.wire);
    dp.set_quota_limit(BUCKET, 1 << 40).expect("create bucket");
    dp.assign_quota(PEER, Some(BUCKET)).expect("assign bucket");
    let before = dp.peer_stats(PEER).unwrap();
    let used_before = dp.quota_usage(BUCKET).unwrap().used_bytes;

    let sink = UdpSink::start(a, SocketAddr::new(IpAddr::V4(wire.a.v4), 0));
    let stream = UdpStream::start(
        b,
        Some(IpAddr::V4(wire.b.v4)),
        sink.addr(),
        1000,
        Duration::from_micros(50),
        Duration::from_secs(10),
    );
    // Spread over the stream (about a second), one every millisecond.
    for _ in 0..1000 {
        dp.top_up_quota(BUCKET, 1).expect("top up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = stream.stop();
    sink.settle(Duration::from_millis(300), WAIT);

    let after = dp.peer_stats(PEER).unwrap();
    let charged = (after.rx_bytes + after.tx_bytes) - (before.rx_bytes + before.tx_bytes);
    let usage = dp.quota_usage(BUCKET).unwrap();
    eprintln!("{sent} datagrams sent, {charged} bytes counted, bucket {usage:?}");
    assert!(charged > 0, "no traffic was charged");
    assert_eq!(
        usage.used_bytes - used_before,
        charged,
        "the bucket's usage differs from the bytes the peer's counters saw"
    );
    assert_eq!(usage.limit_bytes, (1 << 40) + 1000, "a top-up was lost");
}
