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
    ServiceConfig {
        server_v4: "10.99.0.1/24".parse().unwrap(),
        server_v6: "fd99::1/64".parse().unwrap(),
        server_public_key: PublicKey([1; 32]),
        endpoint: "vpn.example.com:51820".into(),
        dns: vec![],
        keep_client_keys: None,
        geo_db: None,
        keep_unknown_peers: false,
    }
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
    let (tx, rx) = mpsc::channel();
    let svc = f.svc.clone();
    let th = std::thread::spawn(move || run_recorder(svc.history.clone(), rx, DEFAULT_RETENTION));
    tx.send(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.1:1"),
        at: SystemTime::now(),
    })
    .unwrap();
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
