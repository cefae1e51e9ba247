//! The alerts on the in-memory ports: each source's notification and its bounds.

use std::sync::Arc;

use super::*;
use crate::service::notify::OutboxEvent;
use crate::service::testing::open_service;
use crate::service::{
    NewUser, Service, ServiceConfig, ServiceEvent,
    domain::{Actor, DeviceName},
    policy::{
        LimitsTarget,
        model::{ByteSize, Cap, GroupName, LimitsText},
    },
    testing::{MemoryPlane, MemoryTunnel},
};
use crate::store::Store;

type Bus = tokio::sync::broadcast::Receiver<ServiceEvent>;

fn open(dir: &std::path::Path) -> Service {
    open_service(
        dir,
        Arc::new(MemoryPlane::default()),
        ServiceConfig::for_tests("10.97.0.1/24", "fd97::1/64", "e:1"),
    )
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn u(n: &str) -> UserName {
    UserName::parse("user", n).unwrap()
}

fn add(svc: &Service, name: &str) -> Peer {
    svc.users
        .add_user(
            &root(),
            NewUser {
                name: u(name),
                device: DeviceName::parse("device", "laptop").unwrap(),
                expires_at: None,
            },
        )
        .unwrap()
        .1
        .peer
}

fn notified(rx: &mut Bus) -> Vec<Notification> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let ServiceEvent::Notified(n) = ev {
            out.push(*n);
        }
    }
    out
}

fn limit(svc: &Service, target: LimitsTarget, quota: &str) {
    let t = LimitsText {
        limit: Some(quota.into()),
        ..LimitsText::default()
    };
    svc.policy
        .set_limits(&root(), &target, &t.parse().unwrap())
        .unwrap();
}

#[test]
fn quota_thresholds_name_the_user_or_the_pool_and_carry_the_kernels_figures() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let svc = Service::open(
        Arc::new(Store::open(dir.path()).unwrap()),
        plane.clone(),
        tunnel.clone(),
        ServiceConfig::for_tests("10.97.0.1/24", "fd97::1/64", "e:1"),
    )
    .unwrap();
    let alice = add(&svc, "alice");
    let bob = add(&svc, "bob");
    limit(&svc, LimitsTarget::User(u("alice")), "1MB");
    let g = GroupName::parse("group", "eng").unwrap();
    svc.policy.create_group(&root(), &g).unwrap();
    svc.policy
        .change_members(&root(), &g, &[u("bob")], true)
        .unwrap();
    svc.policy
        .set_group_policy(
            &root(),
            &g,
            &LimitsText::default().parse().unwrap(),
            Some(Cap::Limit(ByteSize(2_000_000))),
        )
        .unwrap();
    let assigned = plane.state().policy.assigned;
    let (a_bucket, b_bucket) = (assigned[&alice.id], assigned[&bob.id]);
    tunnel.with_peer(&alice.public_key, |p| {
        p.status.endpoint = Some("192.0.2.44:51000".parse().unwrap())
    });
    let mut bus = svc.events().subscribe();
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_800_000_000_123_456_789);
    for (percent, used) in [(80, 800_100), (100, 1_000_050)] {
        svc.alerts
            .on_input(AlertInput::Quota(QuotaReached {
                bucket: a_bucket,
                percent,
                used,
                limit: 1_000_000,
                epoch: 3,
                peer: alice.id,
                at,
            }))
            .unwrap();
    }
    let n = notified(&mut bus);
    assert_eq!(
        n.iter().map(|n| n.kind).collect::<Vec<_>>(),
        [NotifyKind::QuotaWarning, NotifyKind::QuotaExceeded]
    );
    let w = &n[0];
    assert_eq!(w.user.as_deref(), Some("alice"));
    assert_eq!(w.at, at);
    assert_eq!(w.ip, Some("192.0.2.44".parse().unwrap()));
    assert_eq!(w.vpn_ip, Some(IpAddr::V4(alice.ipv4)));
    assert_eq!(w.protocol.as_deref(), Some("wireguard"));
    assert_eq!(w.data["percent"], 80);
    assert_eq!(w.data["used"], 800_100);
    assert_eq!(w.data["limit"], 1_000_000);
    assert_eq!(w.data["period"], "monthly");
    assert_eq!(w.data["device"], "laptop");
    assert_eq!(w.data["kernel_time_ns"], 1_800_000_000_123_456_789u64);
    assert!(w.data.get("group").is_none(), "{}", w.data);
    assert_eq!(n[1].data["percent"], 100);

    // A pool: the user whose packet reached it, and the group.
    svc.alerts
        .on_quota(&QuotaReached {
            bucket: b_bucket,
            percent: 90,
            used: 1_800_000,
            limit: 2_000_000,
            epoch: 1,
            peer: bob.id,
            at,
        })
        .unwrap();
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].kind, NotifyKind::QuotaWarning);
    assert_eq!(n[0].user.as_deref(), Some("bob"));
    assert_eq!(n[0].data["group"], "eng");
    assert_eq!(n[0].ip, None, "bob has sent nothing yet");
}

fn auth(alerts: &Alerts, prefix: &str, count: u64, at: SystemTime) {
    let p: Cidr = prefix.parse().unwrap();
    alerts
        .on_input(AlertInput::AuthFailures {
            prefix: p,
            sample: SocketAddr::new(p.addr(), 4444),
            reason: "unknown-key",
            count,
            at,
        })
        .unwrap();
}

#[test]
fn failed_handshakes_over_the_threshold_in_the_window_are_reported_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let mut bus = svc.events().subscribe();
    let t0 = SystemTime::now();
    let s = |secs: u64| t0 + Duration::from_secs(secs);
    // 19 in a minute: under the default threshold of 20.
    auth(&svc.alerts, "198.51.100.0/24", 1, s(0));
    auth(&svc.alerts, "198.51.100.0/24", 18, s(10));
    assert!(notified(&mut bus).is_empty());
    // Spread over more than the window: the first ones no longer count.
    auth(&svc.alerts, "198.51.100.0/24", 1, s(61));
    assert!(notified(&mut bus).is_empty());
    // The 20th within 60 s.
    auth(&svc.alerts, "198.51.100.0/24", 1, s(62));
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].kind, NotifyKind::SuspiciousActivity);
    assert_eq!(n[0].ip, Some("198.51.100.0".parse().unwrap()));
    assert_eq!(n[0].data["kind"], "auth-failures");
    assert_eq!(n[0].data["prefix"], "198.51.100.0/24");
    assert_eq!(n[0].data["count"], 20);
    assert_eq!(n[0].data["window_s"], 60);
    assert_eq!(n[0].data["reason"], "unknown-key");
    // The flood goes on: nothing more within the window, once more after it.
    for i in 0..70 {
        auth(&svc.alerts, "198.51.100.0/24", 1000, s(63 + i));
    }
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].at, s(122));
    // Another prefix counts on its own.
    auth(&svc.alerts, "2001:db8:1:2::/64", 25, s(200));
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].data["prefix"], "2001:db8:1:2::/64");
}

#[test]
fn a_flood_from_many_prefixes_yields_a_bounded_number_of_events_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let mut bus = svc.events().subscribe();
    let t0 = SystemTime::now();
    for i in 0..200u32 {
        let prefix = format!("10.{}.{}.0/24", i / 256, i % 256);
        auth(
            &svc.alerts,
            &prefix,
            100,
            t0 + Duration::from_millis(u64::from(i)),
        );
    }
    let n = notified(&mut bus);
    assert_eq!(n.len(), MAX_SUSPICIOUS_PER_WINDOW);
    assert!(n.iter().all(|n| n.data["suppressed"] == 0));
    // A window later the next one says how many were held back.
    auth(
        &svc.alerts,
        "10.9.9.0/24",
        100,
        t0 + Duration::from_secs(61),
    );
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].data["suppressed"], 190);
}

#[test]
fn flow_limit_storms_of_a_device_are_reported_with_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let alice = add(&svc, "alice");
    svc.alerts
        .configure(AlertConfig {
            flow_threshold: 5,
            flow_window: Duration::from_secs(10),
            ..AlertConfig::default()
        })
        .unwrap();
    let mut bus = svc.events().subscribe();
    let t0 = SystemTime::now();
    let refuse = |secs: u64| {
        svc.alerts
            .on_input(AlertInput::FlowLimit {
                peer: alice.id,
                limit: 64,
                at: t0 + Duration::from_secs(secs),
            })
            .unwrap();
    };
    for s in 0..4 {
        refuse(s);
    }
    assert!(notified(&mut bus).is_empty());
    refuse(4);
    refuse(5);
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].user.as_deref(), Some("alice"));
    assert_eq!(n[0].vpn_ip, Some(IpAddr::V4(alice.ipv4)));
    assert_eq!(n[0].data["kind"], "flow-limit-storm");
    assert_eq!(n[0].data["source"], "alice/laptop");
    assert_eq!(n[0].data["count"], 5);
    assert_eq!(n[0].data["limit"], 64);
    assert_eq!(n[0].data["window_s"], 10);
}

#[test]
fn bad_thresholds_name_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    let e = svc
        .alerts
        .configure(AlertConfig {
            auth_threshold: 0,
            ..AlertConfig::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("suspicious_auth_threshold"), "{e}");
    let e = svc
        .alerts
        .configure(AlertConfig {
            flow_window: Duration::from_millis(10),
            ..AlertConfig::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("suspicious_flow_window"), "{e}");
    assert_eq!(svc.alerts.config(), AlertConfig::default());
}

#[test]
fn an_expiry_is_reported_once_even_across_downtime_and_again_after_a_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let deadline = now + Duration::from_secs(30);
    {
        let svc = open(dir.path());
        add(&svc, "alice");
        add(&svc, "bob");
        svc.users
            .expire_user(&root(), &u("alice"), deadline)
            .unwrap();
        let mut bus = svc.events().subscribe();
        // Before the deadline: nothing, and the timer is set for it.
        assert_eq!(
            svc.alerts.check_expiries(now).unwrap(),
            Some(unix_floor(deadline))
        );
        assert!(notified(&mut bus).is_empty());
        // The agent is down at the deadline (dropped without a check after it).
    }
    let svc = open(dir.path());
    let mut bus = svc.events().subscribe();
    let later = deadline + Duration::from_secs(100);
    assert_eq!(svc.alerts.check_expiries(later).unwrap(), None);
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].kind, NotifyKind::AccountExpired);
    assert_eq!(n[0].user.as_deref(), Some("alice"));
    assert_eq!(n[0].at, unix_floor(deadline));
    assert_eq!(n[0].data["devices"], 1);
    assert!(
        n[0].data["late_s"].as_u64().unwrap() >= 100,
        "{}",
        n[0].data
    );
    // Exactly once: not again, not after another restart.
    svc.alerts.check_expiries(later).unwrap();
    drop(svc);
    let svc = open(dir.path());
    let mut bus = svc.events().subscribe();
    svc.alerts.check_expiries(later).unwrap();
    assert!(notified(&mut bus).is_empty());
    // In the outbox once, written with its marker (one batch).
    let expired: Vec<_> = svc
        .store()
        .scan::<OutboxEvent>(Cf::Outbox, "")
        .unwrap()
        .into_iter()
        .filter(|(_, e)| e.event.kind == NotifyKind::AccountExpired)
        .collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].1.event.user.as_deref(), Some("alice"));
    assert_eq!(
        svc.store()
            .get::<u64>(Cf::Meta, &format!("{EXPIRED_MARKERS}alice"))
            .unwrap(),
        Some(unix_secs(deadline))
    );

    // Renewed to a new deadline, which passes too: reported again.
    let renewed = SystemTime::now() + Duration::from_secs(3600);
    svc.users
        .renew_user(&root(), &u("alice"), Some(renewed))
        .unwrap();
    assert_eq!(
        svc.alerts.check_expiries(SystemTime::now()).unwrap(),
        Some(unix_floor(renewed))
    );
    svc.alerts
        .check_expiries(renewed + Duration::from_secs(1))
        .unwrap();
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].at, unix_floor(renewed));
    // Cleared: the marker goes.
    svc.users.renew_user(&root(), &u("alice"), None).unwrap();
    svc.alerts.check_expiries(SystemTime::now()).unwrap();
    assert!(
        svc.store()
            .scan::<u64>(Cf::Meta, EXPIRED_MARKERS)
            .unwrap()
            .is_empty()
    );
}

fn unix_floor(t: SystemTime) -> SystemTime {
    crate::service::domain::from_unix_secs(unix_secs(t))
}

#[test]
fn the_alerts_thread_reports_an_expiry_at_its_moment_without_any_input() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(open(dir.path()));
    add(&svc, "alice");
    let mut bus = svc.events().subscribe();
    let (tx, rx) = alert_channel();
    let alerts = svc.alerts.clone();
    let th = std::thread::spawn(move || run_alerts(alerts, rx));
    // Whole seconds: the deadline is 1-2 s ahead.
    let deadline = unix_floor(SystemTime::now()) + Duration::from_secs(2);
    svc.users
        .expire_user(&root(), &u("alice"), deadline)
        .unwrap();
    assert!(tx.send(AlertInput::Recheck));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let n = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(ServiceEvent::Notified(n)) = bus.recv().await {
                    return *n;
                }
            }
        })
        .await
        .expect("account-expired within 10 s")
    });
    let seen = SystemTime::now();
    assert_eq!(n.kind, NotifyKind::AccountExpired);
    assert!(seen >= deadline);
    // At its moment: the thread slept until the deadline, it did not wait for a poll.
    assert!(
        seen.duration_since(deadline).unwrap() < Duration::from_secs(5),
        "reported {:?} after the deadline",
        seen.duration_since(deadline)
    );
    drop(tx);
    th.join().unwrap();
}

#[test]
fn rechecks_are_coalesced_and_a_full_queue_drops_and_counts() {
    let (tx, rx) = alert_channel();
    for _ in 0..1000 {
        assert!(tx.send(AlertInput::Recheck));
    }
    assert_eq!(
        rx.rx.try_iter().count(),
        1,
        "one queued look at the expiries"
    );
    rx.recheck.store(false, Ordering::Release);
    let flow = AlertInput::FlowLimit {
        peer: 1,
        limit: 2,
        at: SystemTime::now(),
    };
    for _ in 0..ALERT_QUEUE + 5 {
        assert!(tx.send(flow.clone()));
    }
    assert_eq!(tx.dropped(), 5);
    // A recheck that finds the queue full is dropped but does not block the next one.
    assert!(tx.send(AlertInput::Recheck));
    assert_eq!(tx.dropped(), 6);
    let _ = rx.rx.recv().unwrap();
    assert!(tx.send(AlertInput::Recheck));
    assert_eq!(rx.rx.try_iter().last(), Some(AlertInput::Recheck));
    drop(rx);
    assert!(!tx.send(flow), "the thread is gone");
}

#[test]
fn a_prefix_whose_last_source_is_auto_blocked_is_left_to_the_blocks_own_event() {
    use crate::service::reputation::table::Crossing;
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path());
    svc.reputation.set_enabled(true);
    let mut bus = svc.events().subscribe();
    let src: IpAddr = "198.51.100.0".parse().unwrap();
    let mut parts = crate::service::reputation::Tallies::default();
    parts[0] = crate::service::reputation::Tally {
        count: 20,
        score: 200,
    };
    let crossing = Crossing {
        ip: src,
        score: 200,
        parts,
        first_seen: Duration::ZERO,
    };
    assert_eq!(
        svc.reputation
            .block(&[crossing], SystemTime::now())
            .unwrap(),
        vec![src]
    );
    let n = notified(&mut bus);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].data["kind"], "auto-block");
    // The tunnel's report of the same 20 failures (its sample is the blocked source): no
    // second event.
    auth(&svc.alerts, "198.51.100.0/24", 20, SystemTime::now());
    assert!(notified(&mut bus).is_empty());
    // Another prefix still counts.
    auth(&svc.alerts, "203.0.113.0/24", 20, SystemTime::now());
    assert_eq!(notified(&mut bus).len(), 1);
}
