//! The admission gate end to end: a held peer reaches only the server's verification TCP port,
//! admitting it restores its traffic, an admission deadline runs out in the kernel without the
//! agent, and the agent's event stream receives the typed gate events.
//!
//! The TC programs are attached to the server's TUN device of a [`TunWire`] (namespace A); the
//! peer (namespace B) is one peer whose allowed IPs are B's addresses. The verification endpoint
//! is TCP port [`VERIFY_PORT`] on A's IPv4 and IPv6 addresses; an echo server listens there and
//! on [`OTHER_PORT`].

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant, SystemTime},
};

use capybara_agent::dataplane::{DataplaneError, Event, EventStream, Gate, L4Proto, PeerDirection};
use capybara_common::drop::DropReason;
use capybara_tests::{
    netns::NetNs,
    traffic::{TcpEchoServer, UdpSink, send_udp},
};

use crate::e2e_support::{TunPeer, WAIT, tun_peer};

const PEER: u32 = 9;
const VERIFY_PORT: u16 = 8443;
const OTHER_PORT: u16 = 8080;
/// How long a connect that should fail is given (a dropped SYN never gets an answer).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Connects from `ns` to `addr` and exchanges one message: true if the echo came back.
fn tcp_echo(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
            return false;
        };
        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    })
}

type Setup = TunPeer;

fn setup(net: u8) -> Setup {
    let mut s = tun_peer(net, PEER);
    s.dp.set_verification_endpoint(
        &[IpAddr::V4(s.wire.a.v4), IpAddr::V6(s.wire.a.v6)],
        &[(L4Proto::Tcp, VERIFY_PORT)],
    )
    .expect("set the verification endpoint");
    s
}

impl Setup {
    fn server(&self, v6: bool, port: u16) -> SocketAddr {
        let ip = if v6 {
            IpAddr::V6(self.wire.a.v6)
        } else {
            IpAddr::V4(self.wire.a.v4)
        };
        SocketAddr::new(ip, port)
    }

    /// UDP datagrams that arrive from the peer to a server port other than the endpoint's, and
    /// from the server to the peer.
    fn udp_both_ways(&self, n: u64) -> (u64, u64) {
        let quiet = Duration::from_millis(300);
        let to_server = UdpSink::start(&self.a, SocketAddr::new(IpAddr::V4(self.wire.a.v4), 0));
        send_udp(
            &self.b,
            Some(IpAddr::V4(self.wire.b.v4)),
            to_server.addr(),
            n,
            100,
        );
        let to_peer = UdpSink::start(&self.b, SocketAddr::new(IpAddr::V4(self.wire.b.v4), 0));
        send_udp(
            &self.a,
            Some(IpAddr::V4(self.wire.a.v4)),
            to_peer.addr(),
            n,
            100,
        );
        (to_server.settle(quiet, WAIT), to_peer.settle(quiet, WAIT))
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.dp.peer_stats(PEER).expect("peer stats").drops[r as usize]
    }
}

/// The next gate-drop event of the peer with reason `reason` (others of the peer are skipped;
/// events of another peer fail the test).
fn next_gate_event(
    rt: &tokio::runtime::Runtime,
    events: &mut EventStream,
    reason: DropReason,
) -> Event {
    rt.block_on(async {
        let end = tokio::time::Instant::now() + WAIT;
        loop {
            let e = tokio::time::timeout_at(end, events.next())
                .await
                .unwrap_or_else(|_| panic!("no {} event within {WAIT:?}", reason.name()))
                .expect("read an event");
            match e {
                Event::GateDrop {
                    peer, reason: r, ..
                } if peer == PEER && r == reason => {
                    return e;
                }
                Event::GateDrop { peer, .. } if peer == PEER => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
}

#[test]
fn held_peer_reaches_only_the_verification_port_and_deadlines_expire_in_the_kernel() {
    let mut s = setup(46);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = {
        let _ctx = rt.enter();
        s.dp.event_stream().expect("event stream")
    };
    let _servers = [
        TcpEchoServer::start(&s.a, s.server(false, VERIFY_PORT)),
        TcpEchoServer::start(&s.a, s.server(true, VERIFY_PORT)),
        TcpEchoServer::start(&s.a, s.server(false, OTHER_PORT)),
        TcpEchoServer::start(&s.a, s.server(true, OTHER_PORT)),
    ];

    // Admitted (the default): everything flows.
    assert!(
        tcp_echo(&s.b, s.server(false, OTHER_PORT)),
        "admitted peer, other port"
    );
    assert_eq!(s.udp_both_ways(20), (20, 20), "admitted peer, UDP");

    // Held: only the verification port, both families.
    let mfa = DropReason::GateMfaPending;
    s.dp.set_gate(PEER, Gate::Held(mfa)).expect("hold");
    assert_eq!(s.dp.gate(PEER).unwrap(), Gate::Held(mfa));
    // Bad input is refused with a typed error and writes nothing.
    let e =
        s.dp.set_gate(PEER, Gate::Held(DropReason::DestinationBlocklist))
            .unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::NotAGateReason {
                reason: DropReason::DestinationBlocklist
            }
        ),
        "{e}"
    );
    assert_eq!(
        s.dp.gate(PEER).unwrap(),
        Gate::Held(mfa),
        "the map was touched"
    );
    let endpoint = s.dp.verification_endpoint().unwrap();
    assert_eq!(endpoint.len(), 2, "{endpoint:?}");
    let e =
        s.dp.set_verification_endpoint(&[IpAddr::V4(s.wire.a.v4)], &[(L4Proto::Udp, 0)])
            .unwrap_err();
    assert!(
        matches!(e, DataplaneError::EndpointPort { port: 0, .. }),
        "{e}"
    );
    assert_eq!(s.dp.verification_endpoint().unwrap(), endpoint);
    assert!(
        tcp_echo(&s.b, s.server(false, VERIFY_PORT)),
        "held peer, v4 verification port"
    );
    assert!(
        tcp_echo(&s.b, s.server(true, VERIFY_PORT)),
        "held peer, v6 verification port"
    );
    let t = Instant::now();
    assert!(
        !tcp_echo(&s.b, s.server(false, OTHER_PORT)),
        "held peer reached another v4 port"
    );
    assert!(t.elapsed() < CONNECT_TIMEOUT + Duration::from_millis(500));
    assert!(
        !tcp_echo(&s.b, s.server(true, OTHER_PORT)),
        "held peer reached another v6 port"
    );
    assert_eq!(
        s.udp_both_ways(20),
        (0, 0),
        "held peer, UDP must not pass either way"
    );
    assert!(
        s.drops(mfa) >= 40 + 2,
        "drops counted under the reason: {}",
        s.drops(mfa)
    );
    let Event::GateDrop { direction, .. } = next_gate_event(&rt, &mut events, mfa) else {
        unreachable!()
    };
    assert!(matches!(
        direction,
        PeerDirection::FromPeer | PeerDirection::ToPeer
    ));

    // Admitted again: traffic is back.
    s.dp.set_gate(PEER, Gate::Admitted { until: None })
        .expect("admit");
    assert!(
        tcp_echo(&s.b, s.server(false, OTHER_PORT)),
        "re-admitted peer, other port"
    );
    assert_eq!(s.udp_both_ways(20), (20, 20), "re-admitted peer, UDP");

    // Admitted for 2 s: traffic flows, then stops by itself (no agent call in between).
    let until = SystemTime::now() + Duration::from_secs(2);
    s.dp.set_gate(PEER, Gate::Admitted { until: Some(until) })
        .expect("admit until");
    match s.dp.gate(PEER).unwrap() {
        Gate::Admitted { until: Some(t) } => {
            let skew = t.duration_since(until).unwrap_or_else(|e| e.duration());
            assert!(
                skew < Duration::from_millis(5),
                "deadline read back {skew:?} off"
            );
        }
        g => panic!("gate reads back as {g:?}"),
    }
    assert!(
        tcp_echo(&s.b, s.server(false, OTHER_PORT)),
        "admitted until +2 s, other port"
    );
    assert_eq!(s.udp_both_ways(10), (10, 10), "admitted until +2 s, UDP");
    let wait =
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(200);
    std::thread::sleep(wait);
    let expired = DropReason::GateExpired;
    let before = s.drops(expired);
    assert!(
        !tcp_echo(&s.b, s.server(false, OTHER_PORT)),
        "expired peer reached another port"
    );
    assert_eq!(s.udp_both_ways(10), (0, 0), "expired peer, UDP");
    assert!(
        tcp_echo(&s.b, s.server(false, VERIFY_PORT)),
        "expired peer, verification port"
    );
    assert!(s.drops(expired) > before, "drops counted as gate-expired");
    match next_gate_event(&rt, &mut events, expired) {
        Event::GateDrop {
            deadline: Some(d),
            at,
            ..
        } => {
            let skew = d.duration_since(until).unwrap_or_else(|e| e.duration());
            assert!(
                skew < Duration::from_millis(5),
                "event deadline {skew:?} off"
            );
            // Both times went through a clock conversion: allow their few microseconds.
            assert!(
                at + Duration::from_millis(5) >= d,
                "dropped before the deadline"
            );
        }
        e => panic!("expiry event without a deadline: {e:?}"),
    }
}
