use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::service::domain::{DeviceName, PublicKey};

fn peer(id: u32, user: &str, device: &str, key: u8) -> Peer {
    Peer {
        id,
        user: UserName::parse("user", user).unwrap(),
        device: DeviceName::parse("device", device).unwrap(),
        public_key: PublicKey([key; 32]),
        ipv4: Ipv4Addr::new(10, 0, 0, id as u8),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
        created_at: 0,
        key_kept: false,
    }
}

fn dev(p: Peer, rx: (u64, u64), tx: (u64, u64)) -> DeviceReading {
    DeviceReading {
        line: Line::Peer(p),
        online: true,
        rx: Traffic {
            packets: rx.0,
            bytes: rx.1,
        },
        tx: Traffic {
            packets: tx.0,
            bytes: tx.1,
        },
        drops: Vec::new(),
    }
}

fn reading(at: Instant, devices: Vec<DeviceReading>) -> Reading {
    Reading {
        at,
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        devices,
        drops: Vec::new(),
    }
}

fn rates(t: &Tick, id: u32) -> LiveTraffic {
    t.devices
        .iter()
        .find(|d| d.line.id() == id)
        .unwrap()
        .traffic
}

#[test]
fn the_first_reading_gives_no_tick() {
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    let alice = peer(1, "alice", "laptop", 1);
    // Large counters at the first reading are history, not a one-second spike.
    assert_eq!(
        m.push(reading(
            t0,
            vec![dev(alice.clone(), (10, 9_000_000), (5, 1_000))]
        )),
        None
    );
    let t = m
        .push(reading(
            t0 + Duration::from_secs(1),
            vec![dev(alice, (10, 9_000_000), (5, 1_000))],
        ))
        .expect("a tick from the second reading");
    let r = rates(&t, 1);
    assert_eq!((r.rx, r.tx), (Rate::default(), Rate::default()));
    assert_eq!(r.rx_total.bytes, 9_000_000);
    assert_eq!(t.interval, Duration::from_secs(1));
}

#[test]
fn rates_are_counter_deltas_over_the_measured_interval() {
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    let a = peer(1, "alice", "laptop", 1);
    m.push(reading(
        t0,
        vec![dev(a.clone(), (100, 100_000), (50, 5_000))],
    ));
    let t = m
        .push(reading(
            t0 + Duration::from_secs(1),
            vec![dev(a.clone(), (1_100, 1_600_000), (60, 7_000))],
        ))
        .unwrap();
    let r = rates(&t, 1);
    assert_eq!(
        r.rx,
        Rate {
            bytes: 1_500_000,
            packets: 1_000
        }
    );
    assert_eq!(
        r.tx,
        Rate {
            bytes: 2_000,
            packets: 10
        }
    );
    // A late tick: the same delta over 1.25 s is a lower rate, not the same one.
    let t = m
        .push(reading(
            t0 + Duration::from_millis(2_250),
            vec![dev(a, (2_100, 3_100_000), (60, 7_000))],
        ))
        .unwrap();
    assert_eq!(t.interval, Duration::from_millis(1_250));
    assert_eq!(
        rates(&t, 1).rx,
        Rate {
            bytes: 1_200_000,
            packets: 800
        }
    );
    assert_eq!(rates(&t, 1).tx, Rate::default());
}

#[test]
fn counters_going_backwards_count_from_zero() {
    // The device was removed and re-added between two readings (same id, same key): the
    // dataplane zeroed its counters, so the new values are all it moved since.
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    let a = peer(3, "alice", "laptop", 1);
    m.push(reading(
        t0,
        vec![dev(a.clone(), (900, 900_000), (900, 900_000))],
    ));
    let t = m
        .push(reading(
            t0 + Duration::from_secs(1),
            vec![dev(a, (4, 4_000), (0, 0))],
        ))
        .unwrap();
    let r = rates(&t, 3);
    assert_eq!(
        r.rx,
        Rate {
            bytes: 4_000,
            packets: 4
        }
    );
    assert_eq!(r.tx, Rate::default(), "never a wrapped-around huge rate");
}

#[test]
fn an_id_reused_by_another_device_or_a_new_device_counts_from_zero() {
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    m.push(reading(
        t0,
        vec![dev(peer(5, "alice", "laptop", 1), (10, 10_000), (0, 0))],
    ));
    // Id 5 now belongs to bob's phone (another key) with more bytes than alice's had: a
    // delta against alice's counters would be wrong.
    let t = m
        .push(reading(
            t0 + Duration::from_secs(2),
            vec![
                dev(peer(5, "bob", "phone", 2), (30, 30_000), (0, 0)),
                dev(peer(6, "carol", "pc", 3), (2, 2_000), (0, 0)),
            ],
        ))
        .unwrap();
    assert_eq!(rates(&t, 5).rx.bytes, 15_000);
    assert_eq!(rates(&t, 6).rx.bytes, 1_000);
}

#[test]
fn drops_have_rates_and_totals_globally_and_per_device() {
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    let mut d = dev(peer(1, "alice", "laptop", 1), (0, 0), (0, 0));
    d.drops = vec![(DropReason::QuotaExhausted, 10)];
    let mut r0 = reading(t0, vec![d.clone()]);
    r0.drops = vec![
        (DropReason::QuotaExhausted, 10),
        (DropReason::UnknownPeer, 7),
    ];
    m.push(r0);
    d.drops = vec![(DropReason::QuotaExhausted, 40)];
    let mut r1 = reading(t0 + Duration::from_secs(1), vec![d]);
    r1.drops = vec![
        (DropReason::QuotaExhausted, 40),
        (DropReason::UnknownPeer, 7),
        (DropReason::FlowLimit, 3),
    ];
    let t = m.push(r1).unwrap();
    assert_eq!(
        t.drops,
        vec![
            (DropReason::QuotaExhausted, 30, 40),
            (DropReason::UnknownPeer, 0, 7),
            (DropReason::FlowLimit, 3, 3),
        ]
    );
    assert_eq!(
        t.devices[0].drops,
        vec![(DropReason::QuotaExhausted, 30, 40)]
    );
}

/// A tick of `n` users with one device each (user `uNNNN`), user k moving k bytes a second
/// each way; every third device offline.
fn big_tick(n: u32) -> Tick {
    let devices = (0..n)
        .map(|k| DeviceTick {
            line: Line::Peer(peer(k, &format!("u{k:05}"), "d", 1)),
            online: k % 3 != 0,
            traffic: LiveTraffic {
                rx: Rate {
                    bytes: u64::from(k),
                    packets: 1,
                },
                tx: Rate {
                    bytes: u64::from(k),
                    packets: 1,
                },
                rx_total: Traffic {
                    packets: 10,
                    bytes: 1_000,
                },
                tx_total: Traffic::default(),
            },
            drops: Vec::new(),
        })
        .collect();
    Tick {
        at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        interval: Duration::from_millis(1_002),
        devices,
        drops: vec![(DropReason::UnknownPeer, 2, 9)],
    }
}

#[test]
fn a_view_lists_the_busiest_and_sums_the_rest() {
    let t = big_tick(1_000);
    let v = t.view(None, 5);
    assert_eq!((v.users, v.devices, v.sessions), (1_000, 1_000, 666));
    assert_eq!((v.at_ms, v.interval_ms), (1_700_000_000_123, 1_002));
    let names: Vec<&str> = v.top_users.iter().map(|u| u.user.as_str()).collect();
    assert_eq!(names, ["u00999", "u00998", "u00997", "u00996", "u00995"]);
    assert_eq!(v.top_devices.len(), 5);
    assert_eq!(v.top_devices[0].line.user().as_str(), "u00999");
    // Totals are the sum of everything; listed + others = totals.
    let all: u64 = (0..1_000).sum();
    assert_eq!(v.total.rx.bytes, all);
    assert_eq!(v.total.rx_total.bytes, 1_000_000);
    let listed: u64 = v.top_users.iter().map(|u| u.traffic.rx.bytes).sum();
    assert_eq!(v.other_users.count, 995);
    assert_eq!(listed + v.other_users.traffic.rx.bytes, all);
    assert_eq!(v.other_devices.count, 995);
    assert_eq!(
        v.drops,
        vec![DropRate {
            reason: "unknown-peer".into(),
            per_second: 2,
            packets: 9
        }]
    );
    // Equal rates sort by name; `top` is clamped to 1..=MAX_TOP.
    let idle = Tick {
        devices: t
            .devices
            .iter()
            .map(|d| DeviceTick {
                traffic: LiveTraffic::default(),
                ..d.clone()
            })
            .collect(),
        ..t.clone()
    };
    let v = idle.view(None, 0);
    assert_eq!(v.top_users.len(), 1);
    assert_eq!(v.top_users[0].user, "u00000");
    assert_eq!(idle.view(None, 5_000).top_users.len(), 1_000);
}

#[test]
fn a_view_of_one_user_has_its_devices_and_its_drops_only() {
    let mut t = big_tick(3);
    let mut second = t.devices[1].clone();
    second.line = Line::Peer(peer(9, "u00001", "e", 9));
    second.drops = vec![(DropReason::GateKicked, 1, 4)];
    t.devices.insert(2, second);
    let u = UserName::parse("user", "u00001").unwrap();
    let v = t.view(Some(&u), 20);
    assert_eq!((v.users, v.devices, v.sessions), (1, 2, 2));
    assert_eq!(v.top_users.len(), 1);
    assert_eq!(v.top_users[0].devices, 2);
    assert_eq!(v.top_users[0].traffic.rx.bytes, 2);
    assert_eq!(v.total.rx.bytes, 2);
    assert_eq!(
        v.drops,
        vec![DropRate {
            reason: "gate-kicked".into(),
            per_second: 1,
            packets: 4
        }],
        "another user's and unattributed drops are not this user's"
    );
    let nobody = UserName::parse("user", "zed").unwrap();
    assert_eq!(t.view(Some(&nobody), 20).devices, 0);
}

#[test]
fn a_proxy_identity_is_a_row_of_its_user_named_by_its_protocol() {
    use crate::service::domain::Protocol;
    let alice = UserName::parse("user", "alice").unwrap();
    let proxy = |id, protocol| {
        Line::Proxy(ProxyAccess {
            id,
            user: alice.clone(),
            protocol,
            created_at: 0,
        })
    };
    let line_reading = |line: Line, bytes: u64| DeviceReading {
        line,
        ..dev(peer(1, "alice", "laptop", 1), (1, bytes), (1, bytes))
    };
    let mut m = RateMeter::default();
    let t0 = Instant::now();
    let laptop = Line::Peer(peer(1, "alice", "laptop", 1));
    assert!(
        m.push(reading(
            t0,
            vec![
                line_reading(laptop.clone(), 1_000),
                line_reading(proxy(7, Protocol::Shadowsocks), 5_000),
            ]
        ))
        .is_none()
    );
    // A second later: the identity moved 3 000 bytes each way; id 8 was another identity's
    // before (a reused id counts from zero).
    let t = m
        .push(reading(
            t0 + Duration::from_secs(1),
            vec![
                line_reading(laptop, 1_000),
                line_reading(proxy(7, Protocol::Shadowsocks), 8_000),
                line_reading(proxy(8, Protocol::Vless), 100),
            ],
        ))
        .unwrap();
    assert_eq!(rates(&t, 7).rx.bytes, 3_000);
    assert_eq!(rates(&t, 8).rx.bytes, 100);
    let v = t.view(Some(&alice), 20);
    assert_eq!((v.users, v.devices), (1, 3));
    assert_eq!(
        v.top_users[0].traffic.rx.bytes, 3_100,
        "the user's sum has its proxies"
    );
    let names: Vec<&str> = v.top_devices.iter().map(|d| d.line.name()).collect();
    assert_eq!(names, ["shadowsocks", "vless", "laptop"]);
    // In JSON a device row keeps its `peer`; a proxy row has `proxy` instead.
    let json = serde_json::to_value(&v.top_devices).unwrap();
    assert_eq!(json[0]["proxy"]["protocol"], "shadowsocks", "{json:#}");
    assert!(json[0].get("peer").is_none(), "{json:#}");
    assert_eq!(json[2]["peer"]["device"], "laptop", "{json:#}");
    let back: Vec<DeviceRow> = serde_json::from_value(json).unwrap();
    assert_eq!(back, v.top_devices);
}
