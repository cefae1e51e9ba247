//! The agent's WireGuard tunnel against a stock client: `wireguard-go` configured with
//! `wg setconf` in its own namespace, joined by a veth pair to the namespace where the agent's
//! [`WgTunnel`] runs. Traffic both ways (ping, UDP, TCP; IPv4 and IPv6), the Connected event
//! within 1 s, `wg show` on the server's interface, removing one peer while another keeps its
//! session, kick, unknown keys.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use capybara_agent::tunnel::{
    AuthFailure, DEFAULT_OFFLOAD, DisconnectReason, PeerConfig, PresharedKey, PrivateKey,
    TunnelEvent,
};
use capybara_tests::{
    netns::{NetNs, VethPair},
    traffic::{UdpSink, send_udp, tcp_transfer},
    wg::{
        Implementation, WgClient as Client, WgLab as Setup, WgProcess, inner_v4 as v4, peer_config,
        ping, ping_until, start_tunnel, tunnel_config, unix_now, wg_dump,
    },
};
use tokio::sync::broadcast::{Receiver, error::TryRecvError};

use crate::e2e_support::send_paced;

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(5);
/// TCP bytes client → server and back, per address family.
const UP: u64 = 3_000_000;
const DOWN: u64 = 2_000_000;

fn setup(net: u8, clients: usize, add_peers: bool) -> Setup {
    Setup::new(net, clients, add_peers, DEFAULT_OFFLOAD)
}

/// The first event matching `pred` within `timeout`, and when it was received.
fn wait_event(
    rx: &mut Receiver<TunnelEvent>,
    timeout: Duration,
    pred: impl Fn(&TunnelEvent) -> bool,
) -> Option<(TunnelEvent, Instant)> {
    let end = Instant::now() + timeout;
    loop {
        match rx.try_recv() {
            Ok(e) if pred(&e) => return Some((e, Instant::now())),
            Ok(_) => {}
            Err(TryRecvError::Empty) => {
                if Instant::now() >= end {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("event stream: {e}"),
        }
    }
}

fn is_connected(key: capybara_agent::tunnel::PublicKey) -> impl Fn(&TunnelEvent) -> bool {
    move |e| matches!(e, TunnelEvent::Connected { public_key, .. } if *public_key == key)
}

fn udp_both_ways(s: &Setup, c: &Client, server: IpAddr, client: IpAddr) {
    let (n, size) = (300u64, 1000usize);
    let sink = UdpSink::start(&s.server, SocketAddr::new(server, 0));
    send_paced(&c.ns, client, sink.addr(), n, size);
    assert_eq!(
        sink.wait_for(n, WAIT),
        n,
        "UDP {client} → {server} lost datagrams"
    );
    assert_eq!(sink.bytes(), n * size as u64);
    let back = UdpSink::start(&c.ns, SocketAddr::new(client, 0));
    send_paced(&s.server, server, back.addr(), n, size);
    let got = back.wait_for(n, WAIT);
    assert_eq!(
        got,
        n,
        "UDP {server} → {client} lost datagrams; server device: {}; client UDP: {}; drops {:?}",
        s.server
            .exec(&["ip", "-s", "link", "show", s.tunnel.name()]),
        c.ns.exec(&[
            "nstat",
            "-az",
            "UdpRcvbufErrors",
            "Udp6RcvbufErrors",
            "UdpInErrors"
        ]),
        s.tunnel.drops()
    );
}

/// Ping, UDP (exact datagram counts) and TCP (exact byte counts) both ways, IPv4 and IPv6.
fn traffic_both_ways(s: &Setup, c: &Client) {
    assert!(ping(&c.ns, s.v6), "IPv6 ping client → server");
    assert!(ping(&s.server, c.v4), "IPv4 ping server → client");
    assert!(ping(&s.server, c.v6), "IPv6 ping server → client");

    udp_both_ways(s, c, s.v4, c.v4);
    udp_both_ways(s, c, s.v6, c.v6);

    let (up, down) = (UP, DOWN);
    for server in [s.v4, s.v6] {
        let r = tcp_transfer(
            &s.server,
            SocketAddr::new(server, 0),
            &c.ns,
            up,
            down,
            Duration::from_secs(20),
        );
        assert_eq!(
            (r.server_received, r.client_received),
            (up, down),
            "TCP via {server}"
        );
    }
}

#[test]
fn traffic_flows_both_ways_and_wg_show_reports_the_peer() {
    let s = setup(61, 1, true);
    let c = &s.clients[0];
    let mut events = s.tunnel.subscribe();

    // The first ping starts the handshake.
    let t0 = Instant::now();
    assert!(
        ping_until(&c.ns, s.v4, WAIT),
        "no IPv4 ping through the tunnel"
    );
    let (ev, at) =
        wait_event(&mut events, WAIT, is_connected(c.wg.public_key())).expect("no Connected event");
    assert!(
        at - t0 < Duration::from_secs(1),
        "Connected {:?} after the client started its handshake",
        at - t0
    );
    let TunnelEvent::Connected { endpoint, at, .. } = ev else {
        unreachable!()
    };
    assert_eq!(endpoint.ip(), c.outer, "endpoint of the Connected event");
    let age = SystemTime::now().duration_since(at).unwrap();
    assert!(age < Duration::from_secs(2), "event time {age:?} ago");

    traffic_both_ways(&s, c);

    // `wg show` on the server's interface.
    let dump = wg_dump(s.tunnel.name());
    assert_eq!(dump.public_key, s.tunnel.public_key().to_base64());
    assert_eq!(dump.listen_port, s.tunnel.listen_port());
    assert_eq!(dump.peers.len(), 1);
    let p = dump.peer(&c.wg.public_key());
    let client_port = c.wg.dump().listen_port;
    assert_eq!(
        p.endpoint,
        Some(SocketAddr::new(c.outer, client_port)),
        "endpoint in wg show"
    );
    let now = unix_now();
    assert!(
        p.latest_handshake <= now && now - p.latest_handshake <= 5,
        "latest handshake {} is not within 5 s of now {now}",
        p.latest_handshake
    );
    assert!(
        p.rx_bytes > 2 * UP && p.tx_bytes > 2 * DOWN,
        "transfer below what TCP moved: {p:?}"
    );
    assert_eq!(
        p.allowed_ips,
        format!("{}/32,{}/128", c.v4, c.v6),
        "allowed ips in wg show"
    );
    // The API's view agrees with wg show.
    let st = s.tunnel.peer(&c.wg.public_key()).unwrap();
    assert!(st.connected);
    assert_eq!(st.endpoint, p.endpoint);
    assert!(st.rx_bytes >= p.rx_bytes && st.tx_bytes >= p.tx_bytes);
    let d = s.tunnel.drops();
    assert_eq!(d.bad_source, 0, "{d:?}");
}

#[test]
fn a_spoofed_inner_source_is_dropped() {
    let s = setup(64, 1, true);
    let c = &s.clients[0];
    assert!(ping_until(&c.ns, s.v4, WAIT));
    // Another address inside the client's tunnel subnet but not in its allowed IPs.
    let spoofed = v4(s.net, 99);
    c.ns.add_addr(&c.wg.ifname, &format!("{spoofed}/32"));
    let sink = UdpSink::start(&s.server, SocketAddr::new(s.v4, 0));
    send_udp(&c.ns, Some(spoofed), sink.addr(), 20, 100);
    send_udp(&c.ns, Some(c.v4), sink.addr(), 5, 100);
    assert_eq!(sink.wait_for(5, WAIT), 5);
    assert_eq!(
        sink.settle(Duration::from_millis(300), WAIT),
        5,
        "spoofed packets arrived"
    );
    assert_eq!(s.tunnel.drops().bad_source, 20);
}

#[test]
fn removing_one_peer_leaves_the_other_session_working() {
    let s = setup(66, 2, true);
    let (c1, c2) = (&s.clients[0], &s.clients[1]);
    let mut events = s.tunnel.subscribe();
    assert!(ping_until(&c1.ns, s.v4, WAIT));
    assert!(ping_until(&c2.ns, s.v4, WAIT));
    wait_event(&mut events, WAIT, is_connected(c2.wg.public_key())).expect("c2 connected");
    let hs2 = s.tunnel.peer(&c2.wg.public_key()).unwrap().last_handshake;
    assert!(hs2.is_some());

    // Adding a peer and changing another leave the sessions alone.
    let hs1 = s.tunnel.peer(&c1.wg.public_key()).unwrap().last_handshake;
    let stranger = PrivateKey::generate().public_key();
    s.tunnel
        .add_peer(PeerConfig {
            public_key: stranger,
            preshared_key: None,
            allowed_ips: vec![format!("{}/32", v4(s.net, 200)).parse().unwrap()],
            persistent_keepalive: None,
        })
        .expect("add a third peer");
    let mut changed = peer_config(&c2.wg, s.net, 3);
    changed
        .allowed_ips
        .push(format!("{}/32", v4(s.net, 201)).parse().unwrap());
    changed.persistent_keepalive = Some(1);
    s.tunnel.update_peer(changed.clone()).expect("update c2");
    assert!(
        ping(&c1.ns, s.v4) && ping(&c2.ns, s.v6),
        "traffic after add/update"
    );
    let st2 = s.tunnel.peer(&c2.wg.public_key()).unwrap();
    assert_eq!(st2.last_handshake, hs2, "updating c2 restarted its session");
    assert_eq!(
        (st2.allowed_ips.clone(), st2.persistent_keepalive),
        (changed.allowed_ips.clone(), Some(1))
    );
    assert_eq!(
        s.tunnel.peer(&c1.wg.public_key()).unwrap().last_handshake,
        hs1,
        "adding a peer restarted c1's session"
    );
    // The server now keeps c2's path alive: keepalives arrive every second.
    let rx = c2.wg.dump().peer(&s.tunnel.public_key()).rx_bytes;
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        c2.wg.dump().peer(&s.tunnel.public_key()).rx_bytes >= rx + 2 * 32,
        "no persistent keepalives from the server"
    );

    s.tunnel
        .remove_peer(&c1.wg.public_key())
        .expect("remove c1");
    let (ev, _) = wait_event(&mut events, WAIT, |e| {
        matches!(e, TunnelEvent::Disconnected { .. })
    })
    .expect("Disconnected for the removed peer");
    assert_eq!(
        ev,
        TunnelEvent::Disconnected {
            public_key: c1.wg.public_key(),
            reason: DisconnectReason::Removed,
            at: match ev {
                TunnelEvent::Disconnected { at, .. } => at,
                _ => unreachable!(),
            },
        }
    );
    assert!(
        !ping(&c1.ns, s.v4),
        "the removed peer still reaches the server"
    );
    for _ in 0..5 {
        assert!(ping(&c2.ns, s.v4), "the other peer lost its tunnel");
        assert!(
            ping(&s.server, c2.v6),
            "the other peer lost its tunnel (IPv6)"
        );
    }
    let after = s.tunnel.peer(&c2.wg.public_key()).unwrap();
    assert_eq!(
        after.last_handshake, hs2,
        "the other peer had to handshake again"
    );
    assert!(after.connected);
    assert!(s.tunnel.peer(&c1.wg.public_key()).is_none());
    assert!(
        wait_event(
            &mut events,
            Duration::from_millis(200),
            is_connected(c2.wg.public_key())
        )
        .is_none(),
        "the other peer reconnected"
    );
    // Errors name the field and change nothing.
    let err = s.tunnel.remove_peer(&c1.wg.public_key()).unwrap_err();
    assert!(err.to_string().starts_with("public_key:"), "{err}");
    let mut dup = peer_config(&c1.wg, s.net, 2);
    dup.allowed_ips = vec![format!("{}/32", c2.v4).parse().unwrap()];
    let err = s.tunnel.add_peer(dup).unwrap_err();
    assert!(err.to_string().starts_with("allowed_ips:"), "{err}");
    let err = s
        .tunnel
        .add_peer(peer_config(&c2.wg, s.net, 3))
        .unwrap_err();
    assert!(
        matches!(err, capybara_agent::tunnel::WgError::PeerExists { .. }),
        "{err}"
    );
    assert!(s.tunnel.peer(&c1.wg.public_key()).is_none());
    assert!(ping(&c2.ns, s.v4));
}

#[test]
fn kick_forces_a_new_handshake() {
    let s = setup(68, 1, true);
    let c = &s.clients[0];
    let key = c.wg.public_key();
    let mut events = s.tunnel.subscribe();
    assert!(ping_until(&c.ns, s.v4, WAIT));
    wait_event(&mut events, WAIT, is_connected(key)).expect("connected");
    let before = s.tunnel.peer(&key).unwrap().last_handshake.unwrap();
    let client_before = c.wg.dump().peer(&s.tunnel.public_key()).latest_handshake;
    // wg show has second resolution: make the new handshake land in a later second.
    std::thread::sleep(Duration::from_millis(1100));

    s.tunnel.kick(&key).expect("kick");
    let (ev, _) = wait_event(&mut events, WAIT, |e| {
        matches!(e, TunnelEvent::Disconnected { .. })
    })
    .expect("Disconnected after the kick");
    assert!(
        matches!(ev, TunnelEvent::Disconnected { reason: DisconnectReason::Kicked, public_key, .. } if public_key == key),
        "{ev:?}"
    );
    assert!(
        !ping(&c.ns, s.v4),
        "the kicked session still carries traffic"
    );
    assert!(
        !ping(&s.server, c.v4),
        "the server reached the kicked client"
    );
    let st = s.tunnel.peer(&key).unwrap();
    assert!(!st.connected && st.endpoint.is_none(), "{st:?}");

    // The client notices the silence and handshakes again (wireguard-go: after 15 s).
    assert!(
        ping_until(&c.ns, s.v4, Duration::from_secs(40)),
        "no traffic after the kick within 40 s"
    );
    wait_event(&mut events, WAIT, is_connected(key)).expect("Connected again after the kick");
    let after = s.tunnel.peer(&key).unwrap().last_handshake.unwrap();
    assert!(after > before, "no new handshake: {before:?} → {after:?}");
    let client_after = c.wg.dump().peer(&s.tunnel.public_key()).latest_handshake;
    assert!(
        client_after > client_before,
        "the client did not handshake again"
    );
}

#[test]
fn an_unknown_key_is_reported_with_its_source_once_per_interval() {
    let s = setup(70, 1, false);
    let c = &s.clients[0];
    let mut events = s.tunnel.subscribe();
    assert!(!ping(&c.ns, s.v4), "a client that is no peer got through");
    let (ev, _) = wait_event(&mut events, WAIT, |e| {
        matches!(e, TunnelEvent::AuthFailed { .. })
    })
    .expect("no AuthFailed event");
    let TunnelEvent::AuthFailed {
        source,
        public_key,
        reason,
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(reason, AuthFailure::UnknownKey);
    assert_eq!(source.ip(), c.outer);
    assert_eq!(public_key, Some(c.wg.public_key()));
    // wireguard-go retries every 5 s; the second attempt is within the 10 s interval.
    let _ = ping_until(&c.ns, s.v4, Duration::from_secs(6));
    assert!(
        wait_event(&mut events, Duration::from_millis(100), |e| {
            matches!(e, TunnelEvent::AuthFailed { .. })
        })
        .is_none(),
        "a second AuthFailed event from the same source within 10 s"
    );
    assert!(s.tunnel.drops().invalid >= 2, "{:?}", s.tunnel.drops());
}

#[test]
fn an_offloading_device_carries_the_same_traffic() {
    // TUN offloads (IFF_VNET_HDR: GSO split on read, GRO on write), on by default.
    let s = Setup::new(72, 1, true, true);
    let c = &s.clients[0];
    assert!(
        ping_until(&c.ns, s.v4, WAIT),
        "no IPv4 ping through the tunnel"
    );
    traffic_both_ways(&s, c);
}

#[test]
fn an_offload_free_device_carries_the_same_traffic() {
    // `offload: false`, no longer the default, still works.
    let s = Setup::new(98, 1, true, false);
    let c = &s.clients[0];
    assert!(
        ping_until(&c.ns, s.v4, WAIT),
        "no IPv4 ping through the tunnel"
    );
    traffic_both_ways(&s, c);
}

#[test]
fn an_ipv6_endpoint_connects_and_silence_disconnects_after_the_configured_time() {
    let net = 78;
    let server = NetNs::new("s");
    let mut config = tunnel_config(net, PrivateKey::generate(), DEFAULT_OFFLOAD);
    config.disconnect_after = Duration::from_secs(2);
    let tunnel = start_tunnel(&server, config);
    let mut events = tunnel.subscribe();
    let ns = NetNs::new("c");
    let veth = VethPair::new(&server, &ns, net + 1);
    let wg = WgProcess::start(&ns, Implementation::WireguardGo, "c");
    tunnel.add_peer(peer_config(&wg, net, 2)).expect("add peer");
    let endpoint = SocketAddr::new(IpAddr::V6(veth.a.v6), tunnel.listen_port());
    wg.set_peer(
        None,
        &tunnel.public_key(),
        Some(endpoint),
        &[&format!("10.{net}.1.0/24")],
        None,
    );
    wg.up(&ns, &[&format!("{}/24", v4(net, 2))]);

    assert!(
        ping_until(&ns, v4(net, 1), WAIT),
        "no ping over an IPv6 endpoint"
    );
    let (ev, connected_at) =
        wait_event(&mut events, WAIT, is_connected(wg.public_key())).expect("Connected");
    let TunnelEvent::Connected { endpoint, .. } = ev else {
        unreachable!()
    };
    let client_port = wg.dump().listen_port;
    assert_eq!(
        endpoint,
        SocketAddr::new(IpAddr::V6(veth.b.v6), client_port)
    );
    assert_eq!(
        wg_dump(tunnel.name()).peer(&wg.public_key()).endpoint,
        Some(endpoint),
        "wg show endpoint"
    );

    // No more traffic: Disconnected/Timeout about 2 s after the last packet (the client's
    // passive keepalive comes 10 s after, too late to keep it).
    let (ev, at) = wait_event(&mut events, Duration::from_secs(6), |e| {
        matches!(e, TunnelEvent::Disconnected { .. })
    })
    .expect("no Disconnected after 2 s of silence");
    assert!(
        matches!(
            ev,
            TunnelEvent::Disconnected {
                reason: DisconnectReason::Timeout,
                ..
            }
        ),
        "{ev:?}"
    );
    let silence = at - connected_at;
    assert!(
        silence >= Duration::from_millis(1500) && silence < Duration::from_secs(4),
        "disconnected {silence:?} after connecting"
    );
    assert!(!tunnel.peer(&wg.public_key()).unwrap().connected);
    // Traffic again on the still-live session: the peer is back, without a handshake.
    let handshake = tunnel.peer(&wg.public_key()).unwrap().last_handshake;
    assert!(ping(&ns, v4(net, 1)));
    wait_event(&mut events, WAIT, is_connected(wg.public_key()))
        .expect("Connected again when traffic resumes");
    let st = tunnel.peer(&wg.public_key()).unwrap();
    assert!(st.connected);
    assert_eq!(st.last_handshake, handshake);
    drop(wg);
}

#[test]
fn a_roaming_client_is_reported_as_an_endpoint_change() {
    let s = setup(80, 1, true);
    let c = &s.clients[0];
    let key = c.wg.public_key();
    let mut events = s.tunnel.subscribe();
    assert!(ping_until(&c.ns, s.v4, WAIT));
    wait_event(&mut events, WAIT, is_connected(key)).expect("connected");
    let from = s.tunnel.peer(&key).unwrap().endpoint.unwrap();
    // The client's NAT mapping changes: it sends from another port.
    let port = if from.port() == 41000 { 41001 } else { 41000 };
    capybara_tests::netns::host(&["wg", "set", &c.wg.ifname, "listen-port", &port.to_string()]);
    assert!(ping(&c.ns, s.v4), "no ping after the port change");
    let (ev, _) = wait_event(&mut events, WAIT, |e| {
        matches!(e, TunnelEvent::EndpointChanged { .. })
    })
    .expect("no EndpointChanged");
    let to = SocketAddr::new(c.outer, port);
    assert_eq!(
        ev,
        TunnelEvent::EndpointChanged {
            public_key: key,
            from,
            to
        }
    );
    assert_eq!(s.tunnel.peer(&key).unwrap().endpoint, Some(to));
    assert!(
        ping(&s.server, c.v4),
        "the server answers at the new endpoint"
    );
}

#[test]
fn preshared_keys_are_used_and_a_wrong_one_never_connects() {
    let s = setup(82, 2, false);
    let (good, bad) = (&s.clients[0], &s.clients[1]);
    let mut events = s.tunnel.subscribe();
    let psk = PresharedKey::generate();
    for (c, host, client_psk) in [(good, 2, psk), (bad, 3, PresharedKey::generate())] {
        let mut cfg = peer_config(&c.wg, s.net, host);
        cfg.preshared_key = Some(psk);
        s.tunnel.add_peer(cfg).expect("add peer");
        c.wg.set_preshared_key(&s.tunnel.public_key(), &client_psk);
    }
    assert!(
        ping_until(&good.ns, s.v4, WAIT),
        "the right preshared key does not connect"
    );
    wait_event(&mut events, WAIT, is_connected(good.wg.public_key())).expect("Connected");

    // The wrong key: the server answers the initiation, the client cannot use the answer.
    assert!(
        !ping(&bad.ns, s.v4) && !ping(&bad.ns, s.v4),
        "a wrong preshared key got through"
    );
    assert!(
        wait_event(
            &mut events,
            Duration::from_millis(100),
            is_connected(bad.wg.public_key())
        )
        .is_none(),
        "a client with the wrong preshared key was reported connected"
    );
    let st = s.tunnel.peer(&bad.wg.public_key()).unwrap();
    assert!(!st.connected && st.last_handshake.is_none(), "{st:?}");
    assert!(
        st.rx_bytes > 0,
        "the initiation never reached the server: {st:?}"
    );
    let dump = wg_dump(s.tunnel.name());
    assert_eq!(dump.peer(&bad.wg.public_key()).latest_handshake, 0);
    assert!(dump.peer(&good.wg.public_key()).latest_handshake > 0);
}

#[test]
fn peers_added_in_one_batch_connect_and_a_bad_batch_changes_nothing() {
    let s = setup(84, 2, false);
    // The two clients among a thousand other peers, added at once (as the agent does at start):
    // none has a session yet, each gets one at its first handshake.
    // A peer with a new key and one allowed IP.
    let fresh = |ip: String| PeerConfig {
        public_key: PrivateKey::generate().public_key(),
        preshared_key: None,
        allowed_ips: vec![ip.parse().unwrap()],
        persistent_keepalive: None,
    };
    let mut batch: Vec<PeerConfig> = (0..1000u32)
        .map(|i| fresh(format!("10.200.{}.{}/32", i / 250, i % 250 + 1)))
        .collect();
    batch.insert(500, peer_config(&s.clients[0].wg, s.net, 2));
    batch.push(peer_config(&s.clients[1].wg, s.net, 3));
    s.tunnel.add_peers(batch).expect("add the batch");
    assert_eq!(s.tunnel.peers().len(), 1002);
    for c in &s.clients {
        assert!(
            ping_until(&c.ns, s.v4, WAIT),
            "no ping through the tunnel from {}",
            c.v4
        );
        assert!(s.tunnel.peer(&c.wg.public_key()).unwrap().connected);
    }
    traffic_both_ways(&s, &s.clients[1]);

    // Refused batches change nothing: a key that is already a peer, the same new key twice, an
    // allowed IP that another peer has.
    let unused = || fresh("10.201.0.1/32".into());
    let twice = unused();
    let taken = fresh(format!("{}/32", s.clients[0].v4));
    for (what, bad) in [
        (
            "an existing key",
            vec![unused(), peer_config(&s.clients[1].wg, s.net, 9)],
        ),
        ("a key twice", vec![twice.clone(), twice]),
        ("a taken allowed IP", vec![unused(), taken]),
    ] {
        assert!(s.tunnel.add_peers(bad).is_err(), "{what} was accepted");
        assert_eq!(s.tunnel.peers().len(), 1002, "{what} changed the peers");
    }
    // The sessions still work.
    for c in &s.clients {
        assert!(
            ping(&c.ns, s.v4),
            "no ping from {} after the refusals",
            c.v4
        );
    }
}
