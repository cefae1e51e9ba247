//! The engine on the in-memory ports: blocking at the threshold (one list change, one event),
//! the TTL on an injected clock, expiries across a restart, the allow list, hand-added entries,
//! batching, the switch, and the explanation.

use std::{net::Ipv4Addr, sync::Arc};

use super::*;
use crate::service::{
    Service, ServiceConfig,
    domain::Actor,
    lists::EntriesOp,
    notify::OutboxEvent,
    testing::{MemoryPlane, open_service},
};

fn open(dir: &std::path::Path, plane: &Arc<MemoryPlane>) -> Service {
    open_service(
        dir,
        plane.clone(),
        ServiceConfig::for_tests("10.96.0.1/24", "fd96::1/64", "e:1"),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn auto_cidrs(svc: &Service) -> Vec<Cidr> {
    svc.core
        .plane
        .list_cidrs(Direction::Source, &auto_list())
        .unwrap_or_default()
}

fn auto_has(svc: &Service, a: IpAddr) -> bool {
    auto_cidrs(svc).contains(&Cidr::host(a))
}

/// The auto-block events in the outbox.
fn auto_block_events(svc: &Service) -> Vec<OutboxEvent> {
    svc.core
        .store
        .scan::<OutboxEvent>(Cf::Outbox, "")
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| {
            e.event.kind == NotifyKind::SuspiciousActivity && e.event.data["kind"] == "auto-block"
        })
        .collect()
}

fn audits(svc: &Service, action: &str) -> usize {
    svc.core
        .audit_records(None, 1000)
        .unwrap()
        .iter()
        .filter(|r| r.action == action)
        .count()
}

fn crossing(a: IpAddr) -> Crossing {
    let mut parts = Tallies::default();
    parts[0] = Tally {
        count: 20,
        score: 200,
    };
    Crossing {
        ip: a,
        score: 200,
        parts,
        first_seen: Duration::ZERO,
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_twentieth_bad_handshake_blocks_the_source_with_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    rep.set_enabled(true);
    let _thread = start(rep).unwrap();
    let (bad, other) = (ip("198.51.100.7"), ip("198.51.100.8"));
    for _ in 0..19 {
        rep.on_event(bad, Part::BadMac);
    }
    for _ in 0..19 {
        rep.on_event(other, Part::UnknownKey);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(auto_cidrs(&svc).is_empty(), "19 are not enough");
    rep.on_event(bad, Part::Replay);
    wait_for("the block", || rep.stats().blocks == 1);
    assert!(auto_has(&svc, bad));
    assert!(!auto_has(&svc, other), "other sources are unaffected");
    // More failures after the block (in flight before the guard saw it) make no second one.
    for _ in 0..40 {
        rep.on_event(bad, Part::BadMac);
    }
    std::thread::sleep(Duration::from_millis(400));
    let events = auto_block_events(&svc);
    assert_eq!(events.len(), 1, "{events:?}");
    let d = &events[0].event.data;
    assert_eq!(events[0].event.ip, Some(bad));
    assert_eq!(d["score"], 20.0);
    assert_eq!(d["threshold"], 20.0);
    assert_eq!(d["ttl_s"], 3600);
    assert_eq!(d["parts"]["bad-mac"]["count"], 19);
    assert_eq!(d["parts"]["replay"]["count"], 1);
    assert_eq!(audits(&svc, "reputation.block"), 1);
    let stored: Option<Block> = svc
        .core
        .store
        .get(Cf::Blocklists, &keys::reputation_block("198.51.100.7"))
        .unwrap();
    let stored = stored.expect("the block's expiry is stored");
    assert_eq!(
        stored.until.duration_since(stored.since).unwrap(),
        DEFAULT_TTL
    );
    let s = rep.stats();
    assert_eq!((s.blocked, s.blocks, s.unblocks), (1, 1, 0));
    let v = rep.explain(bad).unwrap();
    assert_eq!(v.blocked.as_ref().map(|b| b.until), Some(stored.until));
    assert!(!v.in_auto_by_hand);
}

#[test]
fn the_ttl_expiring_unblocks_on_an_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    rep.set_enabled(true);
    rep.configure(20, Duration::from_secs(90)).unwrap();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let a = ip("203.0.113.9");
    assert_eq!(rep.block(&[crossing(a)], t0).unwrap(), vec![a]);
    assert!(auto_has(&svc, a));
    assert_eq!(rep.next_expiry(), Some(t0 + Duration::from_secs(90)));
    assert_eq!(rep.expire(t0 + Duration::from_secs(89)).unwrap(), 0);
    assert!(auto_has(&svc, a));
    assert_eq!(rep.expire(t0 + Duration::from_secs(90)).unwrap(), 1);
    assert!(!auto_has(&svc, a));
    assert_eq!(rep.next_expiry(), None);
    assert!(
        svc.core
            .store
            .scan::<Block>(Cf::Blocklists, keys::REPUTATION_BLOCKS_PREFIX)
            .unwrap()
            .is_empty()
    );
    assert_eq!(audits(&svc, "reputation.unblock"), 1);
    assert_eq!(rep.stats().unblocks, 1);
}

#[test]
fn expiries_survive_a_restart_and_those_passed_while_down_are_pruned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let (old, young, by_hand) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
    {
        let svc = open(dir.path(), &plane);
        let rep = &svc.reputation;
        rep.set_enabled(true);
        rep.configure(20, Duration::from_secs(3600)).unwrap();
        svc.lists
            .change_entries(
                &Actor::Agent,
                Direction::Source,
                &auto_list(),
                EntriesOp::Add,
                &[Cidr::host(by_hand)],
            )
            .unwrap();
        let now = SystemTime::now();
        rep.block(&[crossing(old)], now - Duration::from_secs(7200))
            .unwrap();
        rep.block(&[crossing(young)], now).unwrap();
        assert!(auto_has(&svc, old) && auto_has(&svc, young));
    }
    // The same kernel (pinned maps) and store: a restart.
    let svc = open(dir.path(), &plane);
    assert!(!auto_has(&svc, old), "expired while down: pruned at start");
    assert!(auto_has(&svc, young), "still blocked after the restart");
    assert!(auto_has(&svc, by_hand), "an entry added by hand stays");
    let v = svc.reputation.explain(young).unwrap();
    assert!(v.blocked.is_some());
    assert!(svc.reputation.explain(by_hand).unwrap().in_auto_by_hand);
    // Every expiry passed: only the hand-added entry is left.
    svc.reputation
        .expire(SystemTime::now() + Duration::from_secs(7200))
        .unwrap();
    assert_eq!(auto_cidrs(&svc), vec![Cidr::host(by_hand)]);
}

#[test]
fn allow_wins_and_a_source_blocked_by_hand_gets_no_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    rep.set_enabled(true);
    let (friend, by_hand, foe) = (ip("10.1.2.3"), ip("10.9.9.9"), ip("10.7.7.7"));
    let add = |list: &str, c: &str| {
        svc.lists
            .change_entries(
                &Actor::Agent,
                Direction::Source,
                &ListName::parse(list).unwrap(),
                EntriesOp::Add,
                &[c.parse().unwrap()],
            )
            .unwrap();
    };
    add("allow", "10.1.0.0/16");
    add("auto", "10.9.9.9/32");
    let now = SystemTime::now();
    let blocked = rep
        .block(&[crossing(friend), crossing(by_hand), crossing(foe)], now)
        .unwrap();
    assert_eq!(blocked, vec![foe]);
    assert!(
        !auto_has(&svc, friend),
        "a source in allow is never auto-blocked"
    );
    assert_eq!(rep.stats().allowed, 1);
    assert!(rep.explain(friend).unwrap().allowed);
    assert_eq!(auto_block_events(&svc).len(), 1);
    rep.expire(now + DEFAULT_TTL).unwrap();
    assert_eq!(auto_cidrs(&svc), vec![Cidr::host(by_hand)]);
}

#[test]
fn many_sources_crossing_at_once_are_one_list_change() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    rep.set_enabled(true);
    // 300 sources cross before the blocker runs (their crossings wait in its queue).
    let srcs: Vec<IpAddr> = (0..300u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)))
        .collect();
    for _ in 0..20 {
        for s in &srcs {
            rep.on_event(*s, Part::BadMac);
        }
    }
    let _thread = start(rep).unwrap();
    wait_for("300 blocks", || rep.stats().blocks == 300);
    assert_eq!(auto_cidrs(&svc).len(), 300);
    assert_eq!(audits(&svc, "reputation.block"), 1, "one list change");
    assert_eq!(auto_block_events(&svc).len(), 300, "one event per block");
}

#[test]
fn off_scores_nothing_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    assert!(!rep.enabled(), "off by default");
    let _thread = start(rep).unwrap();
    let a = ip("198.18.0.1");
    for _ in 0..100 {
        rep.on_event(a, Part::BadMac);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(auto_cidrs(&svc).is_empty());
    let v = rep.explain(a).unwrap();
    assert_eq!((v.enabled, v.score, v.first_seen), (false, 0.0, None));
}

#[test]
fn explain_names_every_part_and_the_decay() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), &plane);
    let rep = &svc.reputation;
    rep.set_enabled(true);
    let a = ip("::ffff:198.18.0.9");
    for _ in 0..3 {
        rep.on_event(a, Part::UnknownKey);
    }
    rep.on_event(a, Part::FlowLimit);
    let v = rep.explain(ip("198.18.0.9")).unwrap();
    assert_eq!(v.ip, ip("198.18.0.9"), "v4-mapped is the IPv4 source");
    assert_eq!(v.score, 3.5);
    assert_eq!(v.threshold, 20.0);
    assert_eq!(v.half_life, Duration::from_secs(600));
    let names: Vec<&str> = v.parts.iter().map(|p| p.part.as_str()).collect();
    assert_eq!(
        names,
        [
            "bad-mac",
            "unknown-key",
            "undecryptable",
            "replay",
            "flow-limit",
            "gate-drop",
            "proxy-auth"
        ]
    );
    assert_eq!((v.parts[1].count, v.parts[1].points), (3, 3.0));
    assert_eq!((v.parts[4].count, v.parts[4].weight), (1, 0.5));
    assert!(v.next_halving.unwrap() > SystemTime::now());
    assert!(v.blocked.is_none());
    assert_eq!(
        parse_ip("ip", "300.1.1.1").unwrap_err().to_string(),
        "ip: \"300.1.1.1\" is not an IPv4 or IPv6 address"
    );
    assert!(rep.configure(0, DEFAULT_TTL).is_err());
    assert!(rep.configure(20, Duration::ZERO).is_err());
}
