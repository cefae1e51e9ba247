//! Concurrent flow limits end to end: real TCP through the tunnel device of a [`TunWire`]
//! between two namespaces this test creates, the TC programs attached by the agent's dataplane,
//! the peer limited to 3 concurrent flows.
//!
//! With three connections open through the peer, a fourth fails (its SYNs are dropped in the
//! kernel as `FlowLimit`, counted per peer); closing one (the client's FIN frees the slot at
//! once) lets the next connection succeed at once — its first SYN passes, no retransmission
//! wait — and then the limit holds again.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use capybara_common::drop::DropReason;
use capybara_tests::{netns::NetNs, traffic::TcpEchoServer};

use crate::e2e_support::{TunPeer, tun_peer};

const PEER: u32 = 5;
const PORT: u16 = 8080;
/// How long a connect that should fail is given (a dropped SYN never gets an answer).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Connects from `ns` to `addr` and exchanges one message; the open connection, or why not.
fn connect(ns: &NetNs, addr: SocketAddr) -> Result<TcpStream, String> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping")
            .and_then(|()| s.read_exact(&mut buf))
            .map_err(|e| format!("echo over {addr}: {e}"))?;
        if &buf != b"ping" {
            return Err(format!("echo over {addr}: got {buf:?}"));
        }
        Ok(s)
    })
}

#[test]
fn a_fourth_tcp_connection_fails_at_a_limit_of_three_and_closing_one_frees_its_slot_at_once() {
    let mut s = tun_peer(53, PEER);
    s.dp.set_flow_limit(PEER, 3).expect("set the flow limit");
    let server = SocketAddr::new(IpAddr::V4(s.wire.a.v4), PORT);
    let _srv = TcpEchoServer::start(&s.a, server);
    let drops = |s: &TunPeer| {
        s.dp.peer_stats(PEER).expect("peer stats").drops[DropReason::FlowLimit as usize]
    };

    let mut open: Vec<TcpStream> = (0..3)
        .map(|i| connect(&s.b, server).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert_eq!(s.dp.flow_count(PEER).unwrap(), 3);
    assert_eq!(drops(&s), 0);

    let e = connect(&s.b, server).expect_err("a fourth connection succeeded at a limit of 3");
    eprintln!("fourth connection refused: {e}");
    assert!(
        drops(&s) >= 1,
        "the refused SYN was not counted as FlowLimit"
    );
    assert_eq!(s.dp.flow_count(PEER).unwrap(), 3);

    // Close one: its FIN frees the slot in the kernel, the next connection's first SYN passes.
    drop(open.remove(0));
    let t = Instant::now();
    let next = connect(&s.b, server).unwrap_or_else(|e| panic!("after closing one: {e}"));
    let took = t.elapsed();
    eprintln!("connection after closing one took {took:?}");
    assert!(
        took < Duration::from_millis(500),
        "the freed slot was not available at once ({took:?}: a SYN retransmission)"
    );
    open.push(next);
    assert_eq!(s.dp.flow_count(PEER).unwrap(), 3);
    // And the limit holds again.
    connect(&s.b, server).expect_err("a fourth connection succeeded after the re-open");
    assert_eq!(s.dp.flow_count(PEER).unwrap(), 3);
    // The three open connections still work.
    for c in &mut open {
        let mut buf = [0u8; 4];
        c.write_all(b"pong").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }
}
