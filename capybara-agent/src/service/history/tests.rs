use std::sync::Arc;

use capybara_common::peer::PeerStats;

use super::*;
use crate::{
    service::{
        NewUser, Service, ServiceConfig,
        domain::{DeviceName, Peer},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};

struct Fixture {
    dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    tunnel: Arc<MemoryTunnel>,
    svc: Arc<Service>,
}

fn config() -> ServiceConfig {
    ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "vpn.example.com:51820")
}

fn open(dir: &std::path::Path, plane: Arc<MemoryPlane>, tunnel: Arc<MemoryTunnel>) -> Service {
    Service::open(Arc::new(Store::open(dir).unwrap()), plane, tunnel, config()).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let svc = Arc::new(open(dir.path(), plane.clone(), tunnel.clone()));
    Fixture {
        dir,
        plane,
        tunnel,
        svc,
    }
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn add(f: &Fixture, name: &str) -> Peer {
    f.svc
        .users
        .add_user(
            &root(),
            NewUser {
                name: UserName::parse("name", name).unwrap(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )
        .unwrap()
        .1
        .peer
}

fn set_counters(f: &Fixture, id: u32, rx: (u64, u64), tx: (u64, u64)) {
    f.plane.with(|s| {
        s.stats.insert(
            id,
            PeerStats {
                rx_packets: rx.0,
                rx_bytes: rx.1,
                tx_packets: tx.0,
                tx_bytes: tx.1,
                ..PeerStats::default()
            },
        );
    });
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_session_records_endpoint_changes_and_the_kernel_bytes_of_its_lifetime() {
    let f = fixture();
    let alice = add(&f, "alice");
    let mut rec = Recorder::start(f.svc.history.clone(), t(999)).unwrap();
    // Counters before the session are not its bytes.
    set_counters(&f, alice.id, (10, 1_000), (5, 500));
    let now = SystemTime::now();
    rec.on_event(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.7:40000"),
        at: now,
    })
    .unwrap();
    // Open: stored already (survives SIGKILL), no end, no reason.
    let open = f.svc.history.open_sessions().unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].session.user, "alice");
    rec.on_event(SessionEvent::EndpointChanged {
        key: alice.public_key,
        to: ep("198.51.100.9:5000"),
        at: now + Duration::from_secs(5),
    })
    .unwrap();
    set_counters(&f, alice.id, (110, 151_000), (55, 20_500));
    rec.on_event(SessionEvent::Disconnected {
        key: alice.public_key,
        reason: EndReason::Kicked,
        at: now + Duration::from_secs(10),
    })
    .unwrap();
    assert_eq!(rec.open_count(), 0);
    let page = f.svc.history.history(&HistoryQuery::default()).unwrap();
    assert_eq!(page.sessions.len(), 1);
    let s = &page.sessions[0];
    assert_eq!(s.reason, Some(EndReason::Kicked));
    assert_eq!(s.end, Some(s.start + 10));
    assert_eq!(
        s.traffic,
        Counters {
            rx: Traffic {
                packets: 100,
                bytes: 150_000
            },
            tx: Traffic {
                packets: 50,
                bytes: 20_000
            },
        }
    );
    let eps: Vec<String> = s.endpoints.iter().map(|e| e.endpoint.to_string()).collect();
    assert_eq!(eps, ["192.0.2.7:40000", "198.51.100.9:5000"]);
    assert!(f.svc.history.open_sessions().unwrap().is_empty());
}

#[test]
fn unknown_keys_open_no_session_and_auth_failures_are_recorded() {
    let f = fixture();
    let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
    rec.on_event(SessionEvent::Connected {
        key: PublicKey([9; 32]),
        endpoint: ep("192.0.2.1:1"),
        at: SystemTime::now(),
    })
    .unwrap();
    assert_eq!(rec.open_count(), 0);
    let at = SystemTime::now();
    for (src, reason) in [
        ("192.0.2.1:1000", "unknown-key"),
        ("203.0.113.5:9", "bad-mac"),
    ] {
        rec.on_event(SessionEvent::AuthFailed {
            source: ep(src),
            key: Some(PublicKey([9; 32])),
            reason,
            at,
        })
        .unwrap();
    }
    let all = f
        .svc
        .history
        .history(&HistoryQuery {
            include_auth: true,
            ..HistoryQuery::default()
        })
        .unwrap();
    assert_eq!(all.sessions.len(), 0);
    assert_eq!(all.auth_attempts.len(), 2, "same instant, distinct keys");
    let from = f
        .svc
        .history
        .history(&HistoryQuery {
            ip: Some("203.0.113.0/24".parse().unwrap()),
            include_auth: true,
            ..HistoryQuery::default()
        })
        .unwrap();
    assert_eq!(from.auth_attempts.len(), 1);
    assert_eq!(from.auth_attempts[0].reason, "bad-mac");
}

fn session(rec: &mut Recorder, key: PublicKey, endpoint: &str, at: SystemTime, reason: EndReason) {
    rec.on_event(SessionEvent::Connected {
        key,
        endpoint: ep(endpoint),
        at,
    })
    .unwrap();
    rec.on_event(SessionEvent::Disconnected {
        key,
        reason,
        at: at + Duration::from_secs(60),
    })
    .unwrap();
}

#[test]
fn show_by_user_and_search_by_cidr_newest_first() {
    let f = fixture();
    let alice = add(&f, "alice");
    let bob = add(&f, "bob");
    let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
    let now = SystemTime::now();
    session(
        &mut rec,
        alice.public_key,
        "192.0.2.1:1",
        now,
        EndReason::Idle,
    );
    session(
        &mut rec,
        bob.public_key,
        "198.51.100.1:1",
        now + Duration::from_secs(1),
        EndReason::Kicked,
    );
    session(
        &mut rec,
        alice.public_key,
        "203.0.113.1:1",
        now + Duration::from_secs(2),
        EndReason::Removed,
    );
    let q = |user: Option<&str>, ip: Option<&str>, limit: Option<usize>| {
        f.svc
            .history
            .history(&HistoryQuery {
                user: user.map(|u| UserName::parse("user", u).unwrap()),
                ip: ip.map(|i| i.parse().unwrap()),
                limit,
                include_auth: false,
                ..HistoryQuery::default()
            })
            .unwrap()
            .sessions
            .into_iter()
            .map(|s| format!("{}:{}", s.user, s.reason.unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        q(None, None, None),
        ["alice:removed", "bob:kicked", "alice:idle"]
    );
    assert_eq!(
        q(Some("alice"), None, None),
        ["alice:removed", "alice:idle"]
    );
    assert_eq!(q(None, None, Some(1)), ["alice:removed"]);
    assert_eq!(q(None, Some("198.51.100.0/24"), None), ["bob:kicked"]);
    // The tunnel address matches too.
    assert_eq!(
        q(None, Some(&format!("{}/32", bob.ipv4)), None),
        ["bob:kicked"]
    );
    assert!(q(None, Some("172.16.0.0/12"), None).is_empty());
}

#[test]
fn sessions_left_open_by_a_killed_agent_close_as_agent_stopped_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let alice;
    {
        let f = Fixture {
            svc: Arc::new(open(dir.path(), plane.clone(), tunnel.clone())),
            dir: tempfile::tempdir().unwrap(),
            plane: plane.clone(),
            tunnel: tunnel.clone(),
        };
        alice = add(&f, "alice");
        set_counters(&f, alice.id, (1, 100), (1, 100));
        let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
        rec.on_event(SessionEvent::Connected {
            key: alice.public_key,
            endpoint: ep("192.0.2.1:1"),
            at: SystemTime::now(),
        })
        .unwrap();
        set_counters(&f, alice.id, (11, 1100), (3, 300));
        // "SIGKILL": the recorder is dropped without closing.
        drop(rec);
    }
    let svc = Arc::new(open(dir.path(), plane, tunnel));
    assert_eq!(svc.history.open_sessions().unwrap().len(), 1);
    let at = SystemTime::now() + Duration::from_secs(30);
    let _rec = Recorder::start(svc.history.clone(), at).unwrap();
    let s = &svc
        .history
        .history(&HistoryQuery::default())
        .unwrap()
        .sessions[0];
    assert_eq!(s.reason, Some(EndReason::AgentStopped));
    assert_eq!(s.end, Some(secs(at)));
    assert_eq!((s.traffic.rx.bytes, s.traffic.tx.bytes), (1000, 200));
    assert!(svc.history.open_sessions().unwrap().is_empty());
}

#[test]
fn clean_shutdown_closes_open_sessions() {
    let f = fixture();
    let alice = add(&f, "alice");
    let (tx, rx) = recorder_channel(AUTH_QUEUE);
    let svc = f.svc.clone();
    let th = std::thread::spawn(move || run_recorder(svc.history.clone(), rx, DEFAULT_RETENTION));
    assert!(tx.send(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.1:1"),
        at: SystemTime::now(),
    }));
    drop(tx);
    th.join().unwrap();
    let s = &f
        .svc
        .history
        .history(&HistoryQuery::default())
        .unwrap()
        .sessions[0];
    assert_eq!(s.reason, Some(EndReason::AgentStopped));
}

#[test]
fn clear_removes_only_closed_old_records_audits_and_refuses_zero() {
    let f = fixture();
    let alice = add(&f, "alice");
    let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
    let day = 86_400;
    let now = SystemTime::now();
    // Ended 100 days ago, 10 days ago; one still open from 200 days ago.
    session(
        &mut rec,
        alice.public_key,
        "192.0.2.1:1",
        now - Duration::from_secs(100 * day),
        EndReason::Idle,
    );
    session(
        &mut rec,
        alice.public_key,
        "192.0.2.1:1",
        now - Duration::from_secs(10 * day),
        EndReason::Idle,
    );
    rec.on_event(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.1:1"),
        at: now - Duration::from_secs(200 * day),
    })
    .unwrap();
    for age in [120, 5] {
        rec.on_event(SessionEvent::AuthFailed {
            source: ep("203.0.113.1:1"),
            key: None,
            reason: "bad-mac",
            at: now - Duration::from_secs(age * day),
        })
        .unwrap();
    }
    let all = HistoryQuery {
        include_auth: true,
        ..HistoryQuery::default()
    };
    let before = f.svc.history.history(&all).unwrap();
    let audit_before = f.svc.core.audit_records(None, 1000).unwrap().len();
    // Bad input: nothing changes.
    let e = f
        .svc
        .history
        .clear_history(&root(), Duration::ZERO)
        .unwrap_err();
    assert!(
        matches!(&e, ServiceError::Invalid(v) if v.field() == "older_than"),
        "{e}"
    );
    assert_eq!(f.svc.history.history(&all).unwrap(), before);
    assert_eq!(
        f.svc.core.audit_records(None, 1000).unwrap().len(),
        audit_before
    );

    let p = f
        .svc
        .history
        .clear_history(&root(), Duration::from_secs(90 * day))
        .unwrap();
    assert_eq!(
        p,
        Pruned {
            sessions: 1,
            auth_attempts: 1
        }
    );
    let after = f.svc.history.history(&all).unwrap();
    assert_eq!(
        after.sessions.len(),
        2,
        "the open one and the recent one stay"
    );
    assert!(after.sessions.iter().any(|s| s.end.is_none()));
    assert_eq!(after.auth_attempts.len(), 1);
    let audit = f.svc.core.audit_records(None, 1).unwrap();
    assert_eq!(audit[0].action, "history.clear");
    // Retention pruning: the same rule.
    let p = f
        .svc
        .history
        .prune_history(Duration::from_secs(day))
        .unwrap();
    assert_eq!(
        p,
        Pruned {
            sessions: 1,
            auth_attempts: 1
        }
    );
    let _ = (&f.dir, &f.tunnel);
}

fn stored_session(start_ns: u64, peer: u32, end: Option<u64>) -> StoredSession {
    StoredSession {
        session: Session {
            id: SessionId { start_ns, peer },
            user: "alice".into(),
            device: "laptop".into(),
            peer_id: peer,
            protocol: Protocol::Wireguard,
            public_key: Some(PublicKey([3; 32])),
            ipv4: Some("10.99.0.2".parse().unwrap()),
            ipv6: Some("fd99::2".parse().unwrap()),
            start: start_ns / 1_000_000_000,
            end,
            endpoints: vec![EndpointSeen {
                at: start_ns / 1_000_000_000,
                endpoint: ep("192.0.2.1:1"),
            }],
            traffic: Counters::default(),
            reason: end.map(|_| EndReason::Idle),
        },
        base: Counters::default(),
    }
}

fn auth_at(secs: u64) -> AuthAttempt {
    AuthAttempt {
        protocol: Default::default(),
        at: secs,
        source: ep("203.0.113.7:9"),
        public_key: None,
        reason: "bad-mac".into(),
        count: 5,
        prefix: Some("203.0.113.0/24".parse().unwrap()),
        first_seen: secs.saturating_sub(10),
    }
}

/// Writes `n` old closed sessions, `n` old auth records, and a few new ones and an old open
/// session.
fn fill(f: &Fixture, n: u64, old: u64, new: u64) {
    let mut b = Batch::default();
    for i in 0..n {
        let ns = old * 1_000_000_000 + i;
        let s = stored_session(ns, 7, Some(old + 1));
        b.put(Cf::Sessions, &s.session.id.key(), &s).unwrap();
        b.put(Cf::Sessions, &keys::auth_attempt(ns, 0), &auth_at(old))
            .unwrap();
    }
    let open = stored_session(old * 1_000_000_000 + n, 8, None);
    b.put(Cf::Sessions, &open.session.id.key(), &open).unwrap();
    for i in 0..3 {
        let ns = new * 1_000_000_000 + i;
        let s = stored_session(ns, 9, Some(new + 1));
        b.put(Cf::Sessions, &s.session.id.key(), &s).unwrap();
        b.put(Cf::Sessions, &keys::auth_attempt(ns, 0), &auth_at(new))
            .unwrap();
    }
    f.svc.core.store.commit(b).unwrap();
}

#[test]
fn pruning_streams_in_batches_deleting_every_old_record_and_keeping_the_rest() {
    let f = fixture();
    let now = crate::service::core::now();
    let day = 86_400;
    let n = 2 * PRUNE_BATCH as u64 + 345;
    fill(&f, n, now - 100 * day, now - day);
    let p = f
        .svc
        .history
        .prune_history(Duration::from_secs(90 * day))
        .unwrap();
    assert_eq!(
        p,
        Pruned {
            sessions: n,
            auth_attempts: n
        }
    );
    let mut left = (0, 0);
    f.svc
        .core
        .store
        .walk::<serde_json::Value>(Cf::Sessions, "", Walk::Forward, None, |k, _| {
            if k.starts_with(keys::SESSIONS_PREFIX) {
                left.0 += 1;
            } else {
                left.1 += 1;
            }
            true
        })
        .unwrap();
    assert_eq!(left, (3 + 1, 3), "the new ones and the open one stay");
    // Nothing more to prune.
    assert_eq!(
        f.svc
            .history
            .prune_history(Duration::from_secs(90 * day))
            .unwrap(),
        Pruned::default()
    );
}

#[test]
fn pages_cover_every_record_exactly_once_and_their_size_is_capped() {
    let f = fixture();
    let now = crate::service::core::now();
    let n = 2 * MAX_PAGE_SIZE as u64 + 17;
    fill(&f, n, now - 3600, now - 60);
    let total = n + 1 + 3;
    let walk = |limit: Option<usize>, auth_only: bool| {
        let mut sessions = Vec::new();
        let mut auth = 0usize;
        let mut pages = 0;
        let mut token = None;
        loop {
            let (page, next) = f
                .svc
                .history
                .history_page(&HistoryQuery {
                    limit,
                    include_auth: true,
                    auth_only,
                    page_token: token.take(),
                    ..HistoryQuery::default()
                })
                .unwrap();
            let size = page_size(limit);
            assert!(page.sessions.len() <= size && page.auth_attempts.len() <= size);
            sessions.extend(page.sessions.into_iter().map(|s| (s.start, s.id)));
            auth += page.auth_attempts.len();
            pages += 1;
            match next {
                Some(c) => {
                    // The token survives its text form.
                    token = Some(HistoryCursor::from_token(&c.to_token()).unwrap());
                }
                None => break,
            }
        }
        (sessions, auth, pages)
    };
    let (sessions, auth, pages) = walk(Some(5000), false);
    assert_eq!(pages, 3, "5000 is capped at {MAX_PAGE_SIZE}");
    assert_eq!(auth as u64, n + 3);
    assert_eq!(sessions.len() as u64, total);
    let mut ids: Vec<&SessionId> = sessions.iter().map(|(_, id)| id).collect();
    assert!(sessions.windows(2).all(|w| w[0].1 > w[1].1), "newest first");
    ids.dedup();
    assert_eq!(ids.len() as u64, total, "no session twice");
    let (s, auth, pages) = walk(None, false);
    assert_eq!((s.len() as u64, auth as u64), (total, n + 3));
    assert_eq!(pages as u64, (n + 3).div_ceil(DEFAULT_PAGE_SIZE as u64));
    let (s, auth, _) = walk(Some(1000), true);
    assert!(s.is_empty(), "auth_only: no sessions");
    assert_eq!(auth as u64, n + 3);
    // A filter that matches nothing still ends.
    let (page, next) = f
        .svc
        .history
        .history_page(&HistoryQuery {
            ip: Some("198.18.0.0/15".parse().unwrap()),
            include_auth: true,
            ..HistoryQuery::default()
        })
        .unwrap();
    assert!(page.sessions.is_empty() && page.auth_attempts.is_empty() && next.is_none());
}

#[test]
fn bad_page_tokens_are_refused() {
    for bad in [
        "",
        "h1;",
        "h2;;",
        "h1;auth/1;",
        "h1;session/1;session/2",
        "h1;;;",
    ] {
        assert_eq!(HistoryCursor::from_token(bad), None, "{bad:?}");
    }
    assert_eq!(
        HistoryCursor::from_token("h1;;-"),
        Some(HistoryCursor {
            sessions: Pos::Start,
            auth: Pos::Done
        })
    );
}

#[test]
fn a_full_auth_queue_drops_and_counts_but_never_a_session_event() {
    let (tx, rx) = recorder_channel(4);
    let at = SystemTime::now();
    for i in 0..10u8 {
        assert!(tx.send(SessionEvent::AuthFailed {
            source: ep(&format!("192.0.2.{i}:1")),
            key: None,
            reason: "bad-mac",
            at,
        }));
    }
    for _ in 0..100 {
        assert!(tx.send(SessionEvent::Disconnected {
            key: PublicKey([1; 32]),
            reason: EndReason::Idle,
            at,
        }));
    }
    assert_eq!(tx.auth_dropped(), 6);
    assert_eq!(rx.auth.try_iter().count(), 4);
    assert_eq!(rx.sessions.try_iter().count(), 100);
    drop(rx);
    assert!(!tx.send(SessionEvent::AuthFailed {
        source: ep("192.0.2.1:1"),
        key: None,
        reason: "bad-mac",
        at,
    }));
}

#[test]
fn counted_failures_are_recorded_with_their_prefix_and_found_by_it() {
    let f = fixture();
    let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
    let last = SystemTime::now();
    let first = last - Duration::from_secs(9);
    let evs = [
        SessionEvent::AuthFailures {
            prefix: "198.51.100.0/24".parse().unwrap(),
            sample: ep("198.51.100.77:4000"),
            key: None,
            reason: "bad-mac",
            count: 1234,
            first,
            last,
        },
        SessionEvent::AuthFailures {
            prefix: "0.0.0.0/0".parse().unwrap(),
            sample: ep("192.0.2.9:1"),
            key: None,
            reason: "bad-mac",
            count: 99_000,
            first,
            last,
        },
    ];
    rec.on_auth(&evs).unwrap();
    let q = |ip: &str| {
        f.svc
            .history
            .history(&HistoryQuery {
                ip: Some(ip.parse().unwrap()),
                include_auth: true,
                ..HistoryQuery::default()
            })
            .unwrap()
            .auth_attempts
    };
    let hits = q("198.51.100.5");
    assert_eq!(hits.len(), 1, "the /24 holds the address: {hits:?}");
    let a = &hits[0];
    assert_eq!(
        (a.count, a.prefix.unwrap().to_string(), a.first_seen + 9),
        (1234, "198.51.100.0/24".into(), a.at)
    );
    assert_eq!(a.source, ep("198.51.100.77:4000"));
    assert_eq!(q("198.51.0.0/16").len(), 1, "a wider search holds the /24");
    // The catch-all is found by its sample only, not by every search.
    assert_eq!(q("203.0.113.0/24").len(), 0);
    assert_eq!(q("192.0.2.9").len(), 1);
    // A single failure: count 1, its /24.
    rec.on_event(SessionEvent::AuthFailed {
        source: ep("[2001:db8:5:6:7::1]:9"),
        key: None,
        reason: "bad-mac",
        at: last,
    })
    .unwrap();
    let v6 = q("2001:db8:5:6::/64");
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].prefix.unwrap().to_string(), "2001:db8:5:6::/64");
    assert_eq!(v6[0].count, 1);
}

/// Every notification published on the bus so far (non-blocking).
fn notified(
    rx: &mut tokio::sync::broadcast::Receiver<crate::service::ServiceEvent>,
) -> Vec<crate::service::notify::Notification> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let crate::service::ServiceEvent::Notified(n) = ev {
            out.push(*n);
        }
    }
    out
}

#[test]
fn connect_and_disconnect_notify_after_the_record_with_the_devices_fields() {
    use crate::service::notify::NotifyKind;
    let f = fixture();
    let alice = add(&f, "alice");
    let mut bus = f.svc.events().subscribe();
    let mut rec = Recorder::start(f.svc.history.clone(), t(1)).unwrap();
    set_counters(&f, alice.id, (1, 100), (1, 100));
    let start = SystemTime::now();
    rec.on_event(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.7:40000"),
        at: start,
    })
    .unwrap();
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    let c = &n[0];
    let id = f.svc.history.open_sessions().unwrap()[0].session.id;
    assert_eq!(c.kind, NotifyKind::UserConnect);
    assert_eq!(c.at, start);
    assert_eq!(c.user.as_deref(), Some("alice"));
    assert_eq!(c.ip, Some("192.0.2.7".parse().unwrap()));
    assert_eq!(c.vpn_ip, Some(IpAddr::V4(alice.ipv4)));
    assert_eq!(c.protocol.as_deref(), Some("wireguard"));
    assert_eq!(c.data["device"], "default");
    assert_eq!(c.data["session"], id.to_string());
    assert_eq!(c.data["endpoint"], "192.0.2.7:40000");

    // Roaming moves the disconnect's `ip` to the new endpoint.
    rec.on_event(SessionEvent::EndpointChanged {
        key: alice.public_key,
        to: ep("198.51.100.9:5000"),
        at: start + Duration::from_secs(5),
    })
    .unwrap();
    assert!(
        notified(&mut bus).is_empty(),
        "an endpoint change is no event"
    );
    set_counters(&f, alice.id, (11, 5_100), (3, 900));
    rec.on_event(SessionEvent::Disconnected {
        key: alice.public_key,
        reason: EndReason::Idle,
        at: start + Duration::from_secs(90),
    })
    .unwrap();
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    let d = &n[0];
    assert_eq!(d.kind, NotifyKind::UserDisconnect);
    assert_eq!(d.ip, Some("198.51.100.9".parse().unwrap()));
    assert_eq!(d.data["reason"], "idle");
    assert_eq!(d.data["session"], id.to_string());
    assert_eq!(d.data["bytes_in"], 5_000);
    assert_eq!(d.data["bytes_out"], 800);
    assert_eq!(d.data["duration_s"], 90);
    // The record was written before the event went out.
    assert_eq!(
        f.svc
            .history
            .history(&HistoryQuery::default())
            .unwrap()
            .sessions[0]
            .reason,
        Some(EndReason::Idle)
    );
    // Keys of no device open nothing and notify nothing.
    rec.on_event(SessionEvent::Connected {
        key: PublicKey([9; 32]),
        endpoint: ep("192.0.2.1:1"),
        at: SystemTime::now(),
    })
    .unwrap();
    assert!(notified(&mut bus).is_empty());
}

#[test]
fn sessions_closed_as_stale_at_start_report_their_disconnect() {
    use crate::service::notify::NotifyKind;
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let alice;
    {
        let svc = Arc::new(open(dir.path(), plane.clone(), tunnel.clone()));
        alice = svc
            .users
            .add_user(
                &root(),
                NewUser {
                    name: UserName::parse("name", "alice").unwrap(),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
            )
            .unwrap()
            .1
            .peer;
        let mut rec = Recorder::start(svc.history.clone(), t(1)).unwrap();
        rec.on_event(SessionEvent::Connected {
            key: alice.public_key,
            endpoint: ep("192.0.2.1:1"),
            at: SystemTime::now(),
        })
        .unwrap();
        // "SIGKILL": dropped without closing.
        drop(rec);
    }
    let svc = Arc::new(open(dir.path(), plane, tunnel));
    let mut bus = svc.events().subscribe();
    let at = SystemTime::now() + Duration::from_secs(30);
    let _rec = Recorder::start(svc.history.clone(), at).unwrap();
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].kind, NotifyKind::UserDisconnect);
    assert_eq!(n[0].user.as_deref(), Some("alice"));
    assert_eq!(n[0].data["reason"], "agent-stopped");
    assert_eq!(n[0].at, at);
    assert_eq!(n[0].vpn_ip, Some(IpAddr::V4(alice.ipv4)));
}

#[test]
fn a_proxy_session_spans_its_connections_and_ends_idle_after_the_last_or_at_once_when_kicked_or_removed()
 {
    let f = fixture();
    let mut rec = Recorder::start(f.svc.history.clone(), t(999)).unwrap();
    let id = 4000; // a proxy identity's id: no device has it
    set_counters(&f, id, (1, 100), (1, 100));
    let opened = |source: &str, at| SessionEvent::ProxyOpened {
        id,
        user: "alice".into(),
        protocol: Protocol::Shadowsocks,
        source: ep(source),
        // What the endpoint's sink reads as it reports, before the connection carries a byte.
        base: f.svc.history.counters(id).unwrap(),
        at,
    };
    let closed = |at| SessionEvent::ProxyClosed { id, at };
    let now = SystemTime::now();
    // Two connections from one client, a third from another address: one session.
    rec.on_event(opened("192.0.2.7:40000", now)).unwrap();
    rec.on_event(opened("192.0.2.7:40001", now)).unwrap();
    rec.on_event(opened("198.51.100.9:5000", now)).unwrap();
    assert_eq!(rec.open_count(), 1);
    let open = f.svc.history.open_sessions().unwrap();
    assert_eq!(open.len(), 1);
    let s = &open[0].session;
    assert_eq!(
        (s.device.as_str(), s.protocol),
        ("shadowsocks", Protocol::Shadowsocks)
    );
    assert_eq!((s.public_key, s.ipv4, s.ipv6), (None, None, None));
    let seen: Vec<_> = s.endpoints.iter().map(|e| e.endpoint).collect();
    assert_eq!(seen, [ep("192.0.2.7:40000"), ep("198.51.100.9:5000")]);
    assert_eq!(f.svc.history.live.of_proxy(id), Some(s.id));

    set_counters(&f, id, (11, 10_100), (21, 40_100));
    let last = now + Duration::from_secs(30);
    for at in [
        now + Duration::from_secs(10),
        now + Duration::from_secs(20),
        last,
    ] {
        rec.on_event(closed(at)).unwrap();
    }
    // Idle, not yet ended: a new connection within the idle time continues the session.
    rec.expire_proxy_sessions(last + PROXY_SESSION_IDLE - Duration::from_secs(1))
        .unwrap();
    assert_eq!(rec.open_count(), 1);
    rec.expire_proxy_sessions(last + PROXY_SESSION_IDLE)
        .unwrap();
    assert_eq!(rec.open_count(), 0);
    assert_eq!(f.svc.history.live.of_proxy(id), None);
    let page = f.svc.history.history(&HistoryQuery::default()).unwrap();
    let s = &page.sessions[0];
    assert_eq!(s.reason, Some(EndReason::Idle));
    assert_eq!(s.end, Some(secs(last)), "it ended with its last connection");
    assert_eq!(
        (s.traffic.rx.bytes, s.traffic.tx.bytes),
        (10_000, 40_000),
        "the identity's kernel counters over the session"
    );

    // A kick ends the session at once, as kicked (reported before its connections' ends,
    // which then find no session).
    rec.on_event(opened("192.0.2.7:40002", last + Duration::from_secs(100)))
        .unwrap();
    let kicked = last + Duration::from_secs(101);
    rec.on_event(SessionEvent::ProxyEnded {
        id,
        reason: EndReason::Kicked,
        at: kicked,
    })
    .unwrap();
    rec.on_event(closed(kicked)).unwrap();
    assert_eq!(rec.open_count(), 0);
    let page = f.svc.history.history(&HistoryQuery::default()).unwrap();
    assert_eq!(page.sessions[0].reason, Some(EndReason::Kicked));
    assert_eq!(page.sessions[0].end, Some(secs(kicked)));

    // An idle session (no connection open) kicked ends as kicked too, not later as idle.
    rec.on_event(opened("192.0.2.7:40003", last + Duration::from_secs(200)))
        .unwrap();
    rec.on_event(closed(last + Duration::from_secs(201)))
        .unwrap();
    rec.on_event(SessionEvent::ProxyEnded {
        id,
        reason: EndReason::Kicked,
        at: last + Duration::from_secs(230),
    })
    .unwrap();
    assert_eq!(rec.open_count(), 0);
    let page = f.svc.history.history(&HistoryQuery::default()).unwrap();
    assert_eq!(page.sessions[0].reason, Some(EndReason::Kicked));

    // A removal ends the open session as removed; an end with no session is nothing.
    rec.on_event(opened("192.0.2.7:40004", last + Duration::from_secs(300)))
        .unwrap();
    rec.on_event(SessionEvent::ProxyEnded {
        id,
        reason: EndReason::Removed,
        at: last + Duration::from_secs(301),
    })
    .unwrap();
    rec.on_event(SessionEvent::ProxyEnded {
        id,
        reason: EndReason::Kicked,
        at: last + Duration::from_secs(302),
    })
    .unwrap();
    let page = f.svc.history.history(&HistoryQuery::default()).unwrap();
    assert_eq!(page.sessions[0].reason, Some(EndReason::Removed));
    assert_eq!(page.sessions.len(), 4);

    // A refused connection is an auth attempt of its protocol.
    rec.on_event(SessionEvent::ProxyAuthFailed {
        protocol: Protocol::Vless,
        source: ep("203.0.113.5:999"),
        reason: "unknown-credential",
        at: now,
    })
    .unwrap();
    let q = HistoryQuery {
        auth_only: true,
        ..HistoryQuery::default()
    };
    let auth = f.svc.history.history(&q).unwrap().auth_attempts;
    assert_eq!(auth.len(), 1);
    assert_eq!(
        (auth[0].protocol, auth[0].reason.as_str(), auth[0].count),
        (Protocol::Vless, "unknown-credential", 1)
    );
}
