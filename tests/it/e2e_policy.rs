//! Policy end to end: the control service over the real dataplane (TC programs on the agent's
//! tunnel device) and the real WireGuard tunnel, with `wireguard-go` clients in namespaces that
//! use the configs the service generated.
//!
//! - a group's bandwidth throttles every member (iperf3 TCP to each member within 0.8–1.05 × the
//!   rate), and a user override beats it for that user only;
//! - with `--connections 3` the 4th device of a user is held at the gate (no ping) until one of
//!   the three disconnects, then it is admitted (ping);
//! - a window: a device outside it is held, inside it admitted again on the tick (the service's
//!   clock is the test's);
//! - a group's shared pool under real traffic from two members at once: once it is spent both
//!   members' traffic stops (kernel drops, counted per peer), the pool's exhaustion event comes
//!   once, and resetting the pool restores traffic for both. The bytes delivered stay within the
//!   pool plus one skb per CPU per peer (the kernel's own bound is one skb per CPU: an skb is
//!   dropped once the bucket was exhausted before it, and at most one per CPU is between its
//!   check and its charge). The tunnel's offloads (on by default) coalesce the datagrams, so an
//!   skb is a super-packet of up to 64 KiB (measured: 26 432 bytes over a 3 MB pool).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use capybara_agent::{
    dataplane::{Dataplane, Event, QuotaThreshold},
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, ClientConfig, DeviceName, PublicKey, UserName},
        policy::{
            LimitsTarget,
            model::{ByteSize, Cap, GroupName, LimitsText},
        },
    },
    store::Store,
    tunnel::{DEFAULT_OFFLOAD, TunnelEvent, WgTunnel},
    units::Rate,
};
use capybara_common::drop::DropReason;
use capybara_tests::{
    iperf::{self, IperfTcp},
    netns::{BpffsDir, NetNs},
    traffic::{UdpSink, send_udp, udp_overhead},
    wg::{ping, ping_until, start_tunnel, tunnel_config},
};

use crate::e2e_support::{GeneratedClient, WAIT, attach_tc, open_dataplane, quota_events};

/// One client namespace with a wireguard-go interface set up from an agent-generated config.
/// Fields drop in order: clients, the service, the tunnel's namespace, pins.
struct Lab {
    clients: Vec<GeneratedClient>,
    svc: Arc<Service>,
    _events: std::thread::JoinHandle<()>,
    dp: Arc<Mutex<Dataplane>>,
    tunnel_port: u16,
    server_v4: IpAddr,
    server: NetNs,
    _store: tempfile::TempDir,
    _pins: BpffsDir,
    net: u8,
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn u(s: &str) -> UserName {
    UserName::parse("user", s).unwrap()
}

fn text(f: impl FnOnce(&mut LimitsText)) -> capybara_agent::service::policy::model::LimitsPatch {
    let mut t = LimitsText::default();
    f(&mut t);
    t.parse().unwrap()
}

impl Lab {
    fn new(net: u8, disconnect_after: Duration) -> Lab {
        let pins = BpffsDir::new();
        let server = NetNs::new("s");
        let mut cfg = tunnel_config(
            net,
            capybara_agent::tunnel::PrivateKey::generate(),
            DEFAULT_OFFLOAD,
        );
        cfg.disconnect_after = disconnect_after;
        let tunnel = start_tunnel(&server, cfg);
        let mut dp = open_dataplane(&pins);
        attach_tc(&mut dp, &server, tunnel.name());
        let dp = Arc::new(Mutex::new(dp));
        let store = tempfile::tempdir().unwrap();
        let tunnel_port = tunnel.listen_port();
        let server_key = PublicKey(*tunnel.public_key().as_bytes());
        let events = tunnel.subscribe();
        let tunnel: Arc<WgTunnel> = Arc::new(tunnel);
        let svc = Arc::new(
            Service::open(
                Arc::new(Store::open(store.path()).unwrap()),
                dp.clone(),
                tunnel,
                ServiceConfig {
                    server_public_key: server_key,
                    ..ServiceConfig::for_tests(
                        &format!("10.{net}.1.1/24"),
                        &format!("fd01:{net:x}::1/64"),
                        "unused:1",
                    )
                },
            )
            .expect("open the service"),
        );
        // What the daemon does with the tunnel's events (daemon::forward_handshakes).
        let s = svc.clone();
        let events = std::thread::spawn(move || {
            let mut rx = events;
            loop {
                match rx.blocking_recv() {
                    Ok(TunnelEvent::Connected { public_key, .. }) => {
                        let _ = s.monitor.on_handshake(&PublicKey(*public_key.as_bytes()));
                    }
                    Ok(TunnelEvent::Disconnected { public_key, at, .. }) => {
                        let _ = s
                            .policy
                            .on_disconnect(&PublicKey(*public_key.as_bytes()), at);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Lab {
            clients: Vec::new(),
            svc,
            _events: events,
            dp,
            tunnel_port,
            server_v4: format!("10.{net}.1.1").parse().unwrap(),
            server,
            _store: store,
            _pins: pins,
            net,
        }
    }

    /// Brings up a wireguard-go client with `cfg` (the agent's generated config).
    fn client(&mut self, cfg: &ClientConfig) -> usize {
        let i = self.clients.len();
        let link = self.net + 1 + i as u8;
        let c = GeneratedClient::start(&self.server, self.tunnel_port, self.net, link, cfg);
        self.clients.push(c);
        i
    }

    /// Users alice and bob with one connected device each (their client indexes), both in the
    /// group `staff`.
    fn alice_and_bob_in_staff(&mut self) -> (usize, usize, GroupName) {
        let alice = self.user("alice", &["laptop"])[0];
        let bob = self.user("bob", &["laptop"])[0];
        for c in [alice, bob] {
            assert!(
                ping_until(&self.clients[c].ns, self.server_v4, WAIT),
                "no ping through the tunnel"
            );
        }
        let staff = GroupName::parse("group", "staff").unwrap();
        self.svc.policy.create_group(&root(), &staff).unwrap();
        self.svc
            .policy
            .change_members(&root(), &staff, &[u("alice"), u("bob")], true)
            .unwrap();
        (alice, bob, staff)
    }

    fn user(&mut self, name: &str, devices: &[&str]) -> Vec<usize> {
        let (_, cfg) = self
            .svc
            .users
            .add_user(
                &root(),
                NewUser {
                    name: u(name),
                    device: DeviceName::parse("device", devices[0]).unwrap(),
                    expires_at: None,
                },
            )
            .expect("add user");
        let mut out = vec![self.client(&cfg)];
        for d in &devices[1..] {
            let cfg = self
                .svc
                .devices
                .add_device(&root(), &u(name), &DeviceName::parse("device", d).unwrap())
                .expect("add device");
            out.push(self.client(&cfg));
        }
        out
    }

    /// Goodput from the server to client `i` (4 s after 1 s of slow start), bit/s.
    fn to_client(&self, i: usize) -> f64 {
        let c = &self.clients[i];
        iperf::tcp(
            &self.server,
            &c.ns,
            c.v4,
            &IperfTcp {
                seconds: 4,
                ..IperfTcp::default()
            },
        )
        .received_bps
    }
}

fn assert_rate(bps: f64, rate: Rate, what: &str) {
    let ratio = bps / rate.bits_per_sec() as f64;
    eprintln!("{what}: {:.2} Mbit/s = {ratio:.3} × {rate}", bps / 1e6);
    assert!((0.8..=1.05).contains(&ratio), "{what}: {ratio:.3} × {rate}");
}

#[test]
fn a_group_bandwidth_throttles_members_and_a_user_override_beats_it() {
    let mut lab = Lab::new(71, Duration::from_secs(180));
    let (alice, bob, staff) = lab.alice_and_bob_in_staff();
    lab.svc
        .policy
        .set_group_policy(
            &root(),
            &staff,
            &text(|t| t.bandwidth = Some("5Mbps".into())),
            None,
        )
        .unwrap();
    let five = Rate::mbit(5).unwrap();
    assert_rate(lab.to_client(alice), five, "alice in staff");
    assert_rate(lab.to_client(bob), five, "bob in staff");

    lab.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &text(|t| t.bandwidth = Some("20Mbps".into())),
        )
        .unwrap();
    assert_rate(
        lab.to_client(alice),
        Rate::mbit(20).unwrap(),
        "alice's override",
    );
    assert_rate(lab.to_client(bob), five, "bob still in staff");
    let id = lab.svc.devices.list_peers(Some(&u("bob"))).unwrap()[0].id;
    assert_eq!(
        lab.dp.lock().unwrap().rates(id).unwrap().to_peer,
        Some(five)
    );
}

#[test]
fn the_fourth_device_is_held_until_one_disconnects() {
    let mut lab = Lab::new(75, Duration::from_secs(3));
    lab.user("carol", &["d1"]);
    lab.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("carol")),
            &text(|t| t.connections = Some("3".into())),
        )
        .unwrap();
    for d in ["d2", "d3"] {
        let cfg = lab
            .svc
            .devices
            .add_device(
                &root(),
                &u("carol"),
                &DeviceName::parse("device", d).unwrap(),
            )
            .unwrap();
        lab.client(&cfg);
    }
    for c in 0..3 {
        assert!(
            ping_until(&lab.clients[c].ns, lab.server_v4, WAIT),
            "device {c} within the limit"
        );
    }
    let cfg = lab
        .svc
        .devices
        .add_device(
            &root(),
            &u("carol"),
            &DeviceName::parse("device", "d4").unwrap(),
        )
        .unwrap();
    let fourth = lab.client(&cfg);
    // Its handshake completes, then the gate holds it.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        assert!(
            !ping(&lab.clients[fourth].ns, lab.server_v4),
            "the 4th device passes the gate"
        );
    }
    let held = lab.svc.devices.list_peers(Some(&u("carol"))).unwrap()[3].id;
    assert_eq!(
        lab.dp.lock().unwrap().gate(held).unwrap(),
        capybara_agent::dataplane::Gate::Held(capybara_common::drop::DropReason::GateDeviceLimit)
    );
    // Device 2 goes away: after the tunnel's disconnect timeout the 4th is admitted.
    lab.clients[1].wg = None;
    assert!(
        ping_until(
            &lab.clients[fourth].ns,
            lab.server_v4,
            Duration::from_secs(15)
        ),
        "the 4th device is admitted after one disconnects"
    );
    assert!(ping_until(&lab.clients[0].ns, lab.server_v4, WAIT));
}

#[test]
fn a_window_holds_outside_and_admits_inside() {
    let mut lab = Lab::new(79, Duration::from_secs(180));
    let c = lab.user("dave", &["laptop"])[0];
    assert!(ping_until(&lab.clients[c].ns, lab.server_v4, WAIT));
    lab.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("dave")),
            &text(|t| {
                t.window = Some("Mon-Fri 08:00-18:00".into());
                t.tz = Some("UTC".into());
            }),
        )
        .unwrap();
    let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    // Saturday 2026-11-28 12:00 UTC: held.
    lab.svc.policy.tick(at(1_795_867_200)).unwrap();
    for _ in 0..3 {
        assert!(
            !ping(&lab.clients[c].ns, lab.server_v4),
            "held outside the window"
        );
    }
    // Monday 2026-11-30 08:00 UTC: admitted on the tick.
    lab.svc.policy.tick(at(1_796_025_600)).unwrap();
    assert!(
        ping_until(&lab.clients[c].ns, lab.server_v4, WAIT),
        "admitted inside the window"
    );
}

#[test]
fn a_shared_pool_runs_out_for_the_whole_group_at_once_and_a_reset_restores_it() {
    const LIMIT: u64 = 3_000_000;
    const SIZE: usize = 1000;
    let mut lab = Lab::new(85, Duration::from_secs(180));
    let (alice, bob, staff) = lab.alice_and_bob_in_staff();
    lab.svc
        .policy
        .set_group_policy(
            &root(),
            &staff,
            &text(|_| {}),
            Some(Cap::Limit(ByteSize(LIMIT))),
        )
        .unwrap();
    let quota = lab.svc.policy.show_quota(None, false).unwrap();
    let bucket = quota[0].bucket;
    assert!(
        bucket != 0
            && quota
                .iter()
                .all(|q| q.bucket == bucket && q.plan == "pool:staff"),
        "{quota:?}"
    );
    let peer_of = |user: &str| lab.svc.devices.list_peers(Some(&u(user))).unwrap()[0].id;
    let peers = [peer_of("alice"), peer_of("bob")];
    let exhausted_drops = |id| {
        lab.dp.lock().unwrap().peer_stats(id).unwrap().drops[DropReason::QuotaExhausted as usize]
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = {
        let _ctx = rt.enter();
        lab.dp.lock().unwrap().event_stream().expect("event stream")
    };

    // Both members at once, 3 × the pool between them in 1000-byte datagrams.
    let sink = UdpSink::start(&lab.server, SocketAddr::new(lab.server_v4, 0));
    let ip_len = SIZE as u64 + udp_overhead(&sink.addr());
    let n = 3 * LIMIT / ip_len / 2;
    let used_before = lab
        .dp
        .lock()
        .unwrap()
        .quota_usage(bucket)
        .unwrap()
        .used_bytes;
    std::thread::scope(|s| {
        for c in [alice, bob] {
            let (ns, from, to) = (&lab.clients[c].ns, lab.clients[c].v4, sink.addr());
            s.spawn(move || send_udp(ns, Some(from), to, n, SIZE));
        }
    });
    let got = sink.settle(Duration::from_millis(500), WAIT);
    let delivered = got * ip_len;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    // One super-packet (≤ 64 KiB: the tunnel's GRO) per CPU per peer.
    let bound = LIMIT + cpus * peers.len() as u64 * 65_536;
    let usage = lab.dp.lock().unwrap().quota_usage(bucket).unwrap();
    let drops = peers.map(exhausted_drops);
    let ctx = format!(
        "{got} datagrams ({delivered} IP bytes) delivered of 2 × {n}, bucket {usage:?}, {cpus} \
         CPUs, {used_before} bytes charged before, quota drops (alice, bob) {drops:?}, bound \
         {bound} ({} over the pool)",
        delivered.saturating_sub(LIMIT)
    );
    eprintln!("{ctx}");
    assert!(usage.exhausted(), "the pool was not spent: {ctx}");
    assert!(delivered <= bound, "delivered past the bound: {ctx}");
    assert!(usage.used_bytes <= bound, "charged past the bound: {ctx}");
    assert!(
        delivered + used_before <= usage.used_bytes,
        "delivered more than charged: {ctx}"
    );
    // Both were sending when the pool ran out, and both were cut off by the kernel.
    assert!(
        drops.iter().all(|d| *d > 0),
        "a member's traffic was not dropped: {ctx}"
    );

    // Spent: neither member gets anything through, and the kernel counts the drops for each.
    for (c, id) in [alice, bob].into_iter().zip(peers) {
        let before = exhausted_drops(id);
        let held = UdpSink::start(&lab.server, SocketAddr::new(lab.server_v4, 0));
        send_udp(
            &lab.clients[c].ns,
            Some(lab.clients[c].v4),
            held.addr(),
            50,
            SIZE,
        );
        assert_eq!(
            held.settle(Duration::from_millis(300), WAIT),
            0,
            "client {c} passed the spent pool"
        );
        assert_eq!(exhausted_drops(id) - before, 50, "client {c}'s drops");
    }

    // The pool's thresholds once each, the exhaustion among them.
    let seen: Vec<QuotaThreshold> = rt
        .block_on(quota_events(&mut events, Some(bucket)))
        .into_iter()
        .filter_map(|e| match e {
            Event::Quota { threshold, .. } => Some(threshold),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        [
            QuotaThreshold::Percent80,
            QuotaThreshold::Percent90,
            QuotaThreshold::Exhausted
        ],
        "{ctx}"
    );

    // A reset of the pool restores traffic for both.
    lab.svc.policy.reset_quota(&root(), Err(&staff)).unwrap();
    for c in [alice, bob] {
        let sink = UdpSink::start(&lab.server, SocketAddr::new(lab.server_v4, 0));
        send_udp(
            &lab.clients[c].ns,
            Some(lab.clients[c].v4),
            sink.addr(),
            50,
            SIZE,
        );
        assert_eq!(sink.wait_for(50, WAIT), 50, "client {c} after the reset");
    }
}
