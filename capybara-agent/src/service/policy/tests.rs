//! Service-level policy tests on the in-memory dataplane and tunnel (no root): layers to kernel
//! state, fan-out to group members, bad input changing nothing, restarts, periods, gates.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use capybara_common::drop::DropReason;

use super::{
    LimitsTarget,
    model::{ByteSize, Cap, GroupName, LimitsText},
};
use crate::{
    dataplane::{Gate, PeerRates},
    service::{
        NewUser, Service, ServiceConfig, ServiceError,
        domain::{Actor, DeviceName, PublicKey, UserName},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::{Cf, Store},
    units::Rate,
};

struct Fixture {
    dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    tunnel: Arc<MemoryTunnel>,
    svc: Service,
}

fn config() -> ServiceConfig {
    ServiceConfig::for_tests("10.98.0.1/24", "fd98::1/64", "vpn.example.com:51820")
}

fn open(dir: tempfile::TempDir, plane: Arc<MemoryPlane>, tunnel: Arc<MemoryTunnel>) -> Fixture {
    let svc = Service::open(
        Arc::new(Store::open(dir.path()).unwrap()),
        plane.clone(),
        tunnel.clone(),
        config(),
    )
    .unwrap();
    Fixture {
        dir,
        plane,
        tunnel,
        svc,
    }
}

fn fixture() -> Fixture {
    open(
        tempfile::tempdir().unwrap(),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
    )
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn u(n: &str) -> UserName {
    UserName::parse("user", n).unwrap()
}

fn g(n: &str) -> GroupName {
    GroupName::parse("group", n).unwrap()
}

fn add(f: &Fixture, name: &str, devices: &[&str]) -> Vec<u32> {
    let (_, cfg) = f
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
        .unwrap();
    let mut ids = vec![cfg.peer.id];
    for d in &devices[1..] {
        ids.push(
            f.svc
                .devices
                .add_device(&root(), &u(name), &DeviceName::parse("device", d).unwrap())
                .unwrap()
                .peer
                .id,
        );
    }
    ids
}

fn patch(f: impl FnOnce(&mut LimitsText)) -> super::model::LimitsPatch {
    let mut t = LimitsText::default();
    f(&mut t);
    t.parse().unwrap()
}

fn rate(mbit: u64) -> PeerRates {
    let r = Some(Rate::mbit(mbit).unwrap());
    PeerRates {
        to_peer: r,
        from_peer: r,
    }
}

fn audit_count(f: &Fixture) -> usize {
    f.svc
        .store()
        .scan::<serde_json::Value>(Cf::Audit, "")
        .unwrap()
        .len()
}

#[test]
fn group_policy_reaches_every_members_devices_and_a_user_override_beats_it() {
    let f = fixture();
    let alice = add(&f, "alice", &["laptop", "phone"]);
    let bob = add(&f, "bob", &["laptop"]);
    let carol = add(&f, "carol", &["laptop"]);
    f.svc.policy.create_group(&root(), &g("staff")).unwrap();
    f.svc
        .policy
        .change_members(&root(), &g("staff"), &[u("alice"), u("bob")], true)
        .unwrap();
    f.svc
        .policy
        .set_group_policy(
            &root(),
            &g("staff"),
            &patch(|t| {
                t.bandwidth = Some("10Mbps".into());
                t.flows = Some("200".into());
            }),
            None,
        )
        .unwrap();
    let s = f.plane.state().policy;
    for id in alice.iter().chain(&bob) {
        assert_eq!(s.rates.get(id), Some(&rate(10)), "peer {id}");
        assert_eq!(s.flows.get(id), Some(&200));
    }
    assert_eq!(s.rates.get(&carol[0]), None, "carol is not in the group");

    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.bandwidth = Some("50Mbps".into())),
        )
        .unwrap();
    let s = f.plane.state().policy;
    assert_eq!(s.rates.get(&alice[0]), Some(&rate(50)));
    assert_eq!(s.rates.get(&alice[1]), Some(&rate(50)));
    assert_eq!(s.rates.get(&bob[0]), Some(&rate(10)));
    let e = f.svc.policy.explain(&u("alice")).unwrap();
    let rows = e.explain();
    let row = |n: &str| rows.iter().find(|r| r.field == n).unwrap().clone();
    assert_eq!(row("bandwidth").source, "user");
    assert_eq!(row("flows").source, "group:staff");
    assert_eq!(row("flows").value, "200");

    // Removing bob from the group takes its limits away.
    f.svc
        .policy
        .change_members(&root(), &g("staff"), &[u("bob")], false)
        .unwrap();
    let s = f.plane.state().policy;
    assert_eq!(s.rates.get(&bob[0]), None);
    assert_eq!(s.flows.get(&bob[0]), None);
    // A new device of a member gets the policy at once.
    let tablet = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("d", "tablet").unwrap(),
        )
        .unwrap();
    assert_eq!(
        f.plane.state().policy.rates.get(&tablet.peer.id),
        Some(&rate(50))
    );
}

#[test]
fn bad_input_names_the_field_and_changes_nothing() {
    let f = fixture();
    add(&f, "alice", &["laptop"]);
    for (field, t) in [
        (
            "bandwidth",
            LimitsText {
                bandwidth: Some("10Mbsp".into()),
                ..LimitsText::default()
            },
        ),
        (
            "window",
            LimitsText {
                window: Some("Mon-Fri 25:00-18:00".into()),
                ..LimitsText::default()
            },
        ),
    ] {
        let e = t.parse().unwrap_err();
        assert_eq!(e.field(), field);
    }
    let before = audit_count(&f);
    let writes = f.plane.state().policy.writes;
    // A group that does not exist, a member that is not a user: nothing changes.
    let e = f
        .svc
        .policy
        .set_group_policy(&root(), &g("nope"), &patch(|_| {}), None)
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::NotFound { what: "group", .. }),
        "{e}"
    );
    f.svc.policy.create_group(&root(), &g("staff")).unwrap();
    let e = f
        .svc
        .policy
        .change_members(&root(), &g("staff"), &[u("alice"), u("ghost")], true)
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::NotFound { what: "user", .. }),
        "{e}"
    );
    assert!(
        f.svc
            .policy
            .get_group(&g("staff"))
            .unwrap()
            .members
            .is_empty()
    );
    assert_eq!(audit_count(&f), before + 1, "only the group creation");
    assert_eq!(f.plane.state().policy.writes, writes);
}

#[test]
fn a_shared_pool_is_one_bucket_for_all_members_and_an_own_limit_leaves_it() {
    let f = fixture();
    let a = add(&f, "alice", &["laptop"]);
    let b = add(&f, "bob", &["laptop", "phone"]);
    f.svc.policy.create_group(&root(), &g("eng")).unwrap();
    f.svc
        .policy
        .change_members(&root(), &g("eng"), &[u("alice"), u("bob")], true)
        .unwrap();
    f.svc
        .policy
        .set_group_policy(
            &root(),
            &g("eng"),
            &patch(|t| t.grace = Some("10%".into())),
            Some(Cap::Limit(ByteSize(1_000_000))),
        )
        .unwrap();
    let s = f.plane.state().policy;
    let pool = s.assigned[&a[0]];
    assert_eq!(s.assigned[&b[0]], pool);
    assert_eq!(s.assigned[&b[1]], pool);
    assert_eq!(
        s.buckets[&pool].limit_bytes, 1_100_000,
        "budget plus 10 % grace"
    );
    let q = f.svc.policy.show_quota(None, false).unwrap();
    assert!(
        q.iter().all(|q| q.plan == "pool:eng" && q.bucket == pool),
        "{q:?}"
    );

    // The pool runs out: every member is over (the kernel drops for the whole bucket).
    f.plane
        .with(|s| s.policy.buckets.get_mut(&pool).unwrap().used_bytes = 1_000_000);
    let over = f.svc.policy.show_quota(None, true).unwrap();
    assert_eq!(over.len(), 2);

    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.limit = Some("5GB".into())),
        )
        .unwrap();
    let s = f.plane.state().policy;
    let own = s.assigned[&a[0]];
    assert_ne!(own, pool);
    // The grace is a setting: alice's own budget takes the group's 10 %.
    assert_eq!(s.buckets[&own].limit_bytes, 5_500_000_000);
    assert_eq!(
        f.svc.policy.show_quota(None, true).unwrap().len(),
        1,
        "only bob now"
    );
    // A manual reset of the pool starts a new period.
    f.svc.policy.reset_quota(&root(), Err(&g("eng"))).unwrap();
    assert_eq!(f.plane.state().policy.buckets[&pool].used_bytes, 0);
    assert!(f.svc.policy.show_quota(None, true).unwrap().is_empty());
}

#[test]
fn quota_pages_of_only_the_exceeding_users_are_full_and_continue_after_the_last_one() {
    let f = fixture();
    // Users u0..u9; the odd ones share a pool that runs out.
    let ids: Vec<u32> = (0..10)
        .map(|i| add(&f, &format!("u{i}"), &["laptop"])[0])
        .collect();
    f.svc.policy.create_group(&root(), &g("odd")).unwrap();
    let odd: Vec<UserName> = (1..10).step_by(2).map(|i| u(&format!("u{i}"))).collect();
    f.svc
        .policy
        .change_members(&root(), &g("odd"), &odd, true)
        .unwrap();
    f.svc
        .policy
        .set_group_policy(
            &root(),
            &g("odd"),
            &patch(|_| {}),
            Some(Cap::Limit(ByteSize(1_000))),
        )
        .unwrap();
    let pool = f.plane.state().policy.assigned[&ids[1]];
    f.plane
        .with(|s| s.policy.buckets.get_mut(&pool).unwrap().used_bytes = 5_000);
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let (page, next) = f
            .svc
            .policy
            .show_quota_page(after.as_deref(), 2, true)
            .unwrap();
        pages += 1;
        assert!(page.len() == 2 || next.is_none(), "page {pages}: {page:?}");
        assert!(page.iter().all(|q| q.exceeding));
        seen.extend(page.into_iter().map(|q| q.user));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ["u1", "u3", "u5", "u7", "u9"]);
    assert_eq!(pages, 3);
    // Unfiltered: pages of every user, in name order.
    let (page, next) = f.svc.policy.show_quota_page(Some("u4"), 3, false).unwrap();
    let names: Vec<&str> = page.iter().map(|q| q.user.as_str()).collect();
    assert_eq!(
        (names, next.as_deref()),
        (vec!["u5", "u6", "u7"], Some("u7"))
    );
    let (page, next) = f.svc.policy.show_quota_page(Some("u7"), 3, false).unwrap();
    assert_eq!((page.len(), next), (2, None));
}

#[test]
fn policy_survives_a_restart_and_is_applied_again() {
    let f = fixture();
    let a = add(&f, "alice", &["laptop"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::Default,
            &patch(|t| {
                t.bandwidth = Some("20Mbps".into());
                t.limit = Some("1GB".into());
            }),
        )
        .unwrap();
    let bucket = f.plane.state().policy.assigned[&a[0]];
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    // A restarted agent finds no shaping classes (they live in qdiscs).
    plane.with(|s| s.policy.rates.clear());
    let f = open(dir, plane, tunnel);
    let s = f.plane.state().policy;
    assert_eq!(s.rates.get(&a[0]), Some(&rate(20)));
    assert_eq!(s.assigned[&a[0]], bucket, "the same bucket (usage kept)");
    let rows = f.svc.policy.explain(&u("alice")).unwrap().explain();
    assert_eq!(
        rows.iter().find(|r| r.field == "bandwidth").unwrap().source,
        "default"
    );
}

#[test]
fn periods_reset_buckets_once_at_the_boundary() {
    let f = fixture();
    let a = add(&f, "alice", &["laptop"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| {
                t.limit = Some("1GB".into());
                t.period = Some("daily".into());
            }),
        )
        .unwrap();
    let bucket = f.plane.state().policy.assigned[&a[0]];
    f.plane
        .with(|s| s.policy.buckets.get_mut(&bucket).unwrap().used_bytes = 500);
    let now = SystemTime::now();
    f.svc.policy.tick(now).unwrap();
    assert_eq!(
        f.plane.state().policy.buckets[&bucket].used_bytes,
        500,
        "same day"
    );
    let tomorrow = now + Duration::from_secs(86_400);
    f.svc.policy.tick(tomorrow).unwrap();
    let b = f.plane.state().policy.buckets[&bucket];
    assert_eq!((b.used_bytes, b.epoch), (0, 1));
    f.plane
        .with(|s| s.policy.buckets.get_mut(&bucket).unwrap().used_bytes = 7);
    f.svc
        .policy
        .tick(tomorrow + Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        f.plane.state().policy.buckets[&bucket].used_bytes,
        7,
        "once"
    );
}

#[test]
fn the_fourth_device_waits_until_one_disconnects() {
    let f = fixture();
    let ids = add(&f, "alice", &["d1", "d2", "d3", "d4"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.connections = Some("3".into())),
        )
        .unwrap();
    let keys: Vec<PublicKey> = f.tunnel.state().keys().copied().collect();
    let key_of = |id| {
        keys.iter()
            .find(|k| f.svc.directory.peer_by_key(k).unwrap().id == id)
            .copied()
            .unwrap()
    };
    let t0 = SystemTime::now();
    for (i, id) in ids.iter().enumerate() {
        f.svc
            .policy
            .on_connect(&key_of(*id), t0 + Duration::from_secs(i as u64))
            .unwrap();
    }
    let gate = |id| f.plane.state().gates[&id];
    for id in &ids[..3] {
        assert_eq!(gate(*id), Gate::Admitted { until: None });
    }
    assert_eq!(gate(ids[3]), Gate::Held(DropReason::GateDeviceLimit));
    f.svc
        .policy
        .on_disconnect(&key_of(ids[1]), t0 + Duration::from_secs(10))
        .unwrap();
    assert_eq!(gate(ids[3]), Gate::Admitted { until: None });
}

#[test]
fn a_window_holds_outside_and_admits_inside_on_the_tick() {
    let f = fixture();
    let ids = add(&f, "alice", &["laptop"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| {
                t.window = Some("Mon-Fri 08:00-18:00".into());
                t.tz = Some("Europe/Berlin".into());
            }),
        )
        .unwrap();
    let at = |s: &str| -> SystemTime { chrono::DateTime::parse_from_rfc3339(s).unwrap().into() };
    let gate = || f.plane.state().gates[&ids[0]];
    f.svc.policy.tick(at("2026-11-27T16:59:00Z")).unwrap();
    assert_eq!(gate(), Gate::Admitted { until: None });
    f.svc.policy.tick(at("2026-11-27T17:00:00Z")).unwrap();
    assert_eq!(gate(), Gate::Held(DropReason::GateOutsideWindow));
    f.svc.policy.tick(at("2026-11-30T07:00:00Z")).unwrap();
    assert_eq!(gate(), Gate::Admitted { until: None });
    // A kick is not undone by the tick.
    f.svc.monitor.kick(&root(), &u("alice")).unwrap();
    f.svc.policy.tick(at("2026-11-30T07:00:01Z")).unwrap();
    assert_eq!(gate(), Gate::Held(DropReason::GateKicked));
}

#[test]
fn every_change_is_audited() {
    let f = fixture();
    add(&f, "alice", &["laptop"]);
    let before = audit_count(&f);
    f.svc.policy.create_group(&root(), &g("staff")).unwrap();
    f.svc
        .policy
        .change_members(&root(), &g("staff"), &[u("alice")], true)
        .unwrap();
    f.svc
        .policy
        .set_group_policy(
            &root(),
            &g("staff"),
            &patch(|t| t.flows = Some("5".into())),
            None,
        )
        .unwrap();
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::Default,
            &patch(|t| t.flows = Some("9".into())),
        )
        .unwrap();
    f.svc.policy.delete_group(&root(), &g("staff")).unwrap();
    let recs = f.svc.core.audit_records(None, 10).unwrap();
    let actions: Vec<&str> = recs.iter().take(5).map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "group.delete",
            "policy.default.set",
            "group.policy",
            "group.add",
            "group.create"
        ]
    );
    assert_eq!(audit_count(&f), before + 5);
    // After the group is gone, the default applies.
    let id = f.svc.devices.list_peers(Some(&u("alice"))).unwrap()[0].id;
    assert_eq!(f.plane.state().policy.flows.get(&id), Some(&9));
}

#[test]
fn removing_a_user_removes_its_limits_and_memberships() {
    let f = fixture();
    add(&f, "alice", &["laptop"]);
    add(&f, "bob", &["laptop"]);
    f.svc.policy.create_group(&root(), &g("staff")).unwrap();
    f.svc
        .policy
        .change_members(&root(), &g("staff"), &[u("alice"), u("bob")], true)
        .unwrap();
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.flows = Some("3".into())),
        )
        .unwrap();
    f.svc.users.remove_user(&root(), &u("alice")).unwrap();
    let members = f.svc.policy.get_group(&g("staff")).unwrap().members;
    assert_eq!(members.into_iter().collect::<Vec<_>>(), vec![u("bob")]);
    // The same after a restart (the batch held it), and a new alice starts clean.
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    assert_eq!(
        f.svc.policy.get_group(&g("staff")).unwrap().members.len(),
        1
    );
    add(&f, "alice", &["laptop"]);
    assert!(
        f.svc
            .policy
            .get_limits(&LimitsTarget::User(u("alice")))
            .unwrap()
            .is_empty()
    );
    // The export of this state applies on an empty agent.
    let doc = f.svc.policy_files.export_document().unwrap();
    let e = fixture();
    e.svc
        .policy_files
        .apply_document(&root(), &doc, false)
        .unwrap();
    assert_eq!(e.svc.policy_files.export_document().unwrap(), doc);
}

#[test]
fn holds_of_other_owners_survive_a_restart_and_the_policy_decides_its_own() {
    let f = fixture();
    let alice = add(&f, "alice", &["laptop", "phone"]);
    let bob = add(&f, "bob", &["laptop"]);
    let carol = add(&f, "carol", &["d1", "d2"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("carol")),
            &patch(|t| t.connections = Some("1".into())),
        )
        .unwrap();
    let key_of = |id| {
        f.tunnel
            .state()
            .keys()
            .copied()
            .find(|k| f.svc.directory.peer_by_key(k).unwrap().id == id)
            .unwrap()
    };
    let t0 = SystemTime::now();
    for (i, id) in carol.iter().enumerate() {
        f.svc
            .policy
            .on_connect(&key_of(*id), t0 + Duration::from_secs(i as u64))
            .unwrap();
    }
    f.svc.monitor.kick(&root(), &u("alice")).unwrap();
    // Held by owners other than the policy: over quota (MFA is the policy's own since issue
    // 22: `service::mfa::tests`); and bob's account has expired (the
    // store's expiry, held by the policy as `expired`).
    f.plane.with(|s| {
        s.gates
            .insert(alice[1], Gate::Held(DropReason::GateOverQuota));
    });
    f.svc
        .users
        .expire_user(
            &root(),
            &u("bob"),
            SystemTime::now() - Duration::from_secs(5),
        )
        .unwrap();
    let expired = Gate::Held(DropReason::GateExpired);
    let gate = |f: &Fixture, id| f.plane.state().gates[&id];
    assert_eq!(gate(&f, carol[1]), Gate::Held(DropReason::GateDeviceLimit));

    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    assert_eq!(gate(&f, alice[0]), Gate::Held(DropReason::GateKicked));
    assert_eq!(gate(&f, alice[1]), Gate::Held(DropReason::GateOverQuota));
    assert_eq!(gate(&f, bob[0]), expired);
    // The policy's own hold is decided afresh: no device is online after the restart.
    assert_eq!(gate(&f, carol[0]), Gate::Admitted { until: None });
    assert_eq!(gate(&f, carol[1]), Gate::Admitted { until: None });
    // Neither the tick nor a policy change undoes them.
    f.svc.policy.tick(SystemTime::now()).unwrap();
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.connections = Some("5".into())),
        )
        .unwrap();
    assert_eq!(gate(&f, alice[0]), Gate::Held(DropReason::GateKicked));
    assert_eq!(gate(&f, alice[1]), Gate::Held(DropReason::GateOverQuota));
    // A handshake ends the kick of that device only; over-quota is not the policy's to lift.
    let key_of = |id| {
        f.tunnel
            .state()
            .keys()
            .copied()
            .find(|k| f.svc.directory.peer_by_key(k).unwrap().id == id)
            .unwrap()
    };
    f.svc
        .policy
        .on_connect(&key_of(alice[1]), SystemTime::now())
        .unwrap();
    assert_eq!(gate(&f, alice[0]), Gate::Held(DropReason::GateKicked));
    assert_eq!(gate(&f, alice[1]), Gate::Held(DropReason::GateOverQuota));
    f.svc
        .policy
        .on_connect(&key_of(alice[0]), SystemTime::now())
        .unwrap();
    assert_eq!(gate(&f, alice[0]), Gate::Admitted { until: None });
    assert_eq!(gate(&f, alice[1]), Gate::Held(DropReason::GateOverQuota));
}

#[test]
fn the_days_online_time_survives_a_restart() {
    let f = fixture();
    let id = add(&f, "alice", &["laptop"])[0];
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| {
                t.time = Some("8h".into());
                t.tz = Some("UTC".into());
            }),
        )
        .unwrap();
    let key = *f.tunnel.state().keys().next().unwrap();
    let at = |s: &str| -> SystemTime { chrono::DateTime::parse_from_rfc3339(s).unwrap().into() };
    let min = Duration::from_secs(60);
    // Online from 08:00 for 5 h, a tick a minute.
    let t0 = at("2026-11-28T08:00:00Z");
    f.svc.policy.on_connect(&key, t0).unwrap();
    for m in 0..=300 {
        f.svc.policy.tick(t0 + m * min).unwrap();
    }
    let gate = |f: &Fixture| f.plane.state().gates[&id];
    assert_eq!(gate(&f), Gate::Admitted { until: None });

    let restart = |f: Fixture| {
        let Fixture {
            dir,
            plane,
            tunnel,
            svc,
        } = f;
        drop(svc);
        open(dir, plane, tunnel)
    };
    // Down for 10 minutes (not online time), back online: 3 h are left, not 8.
    let f = restart(f);
    let t1 = at("2026-11-28T13:10:00Z");
    f.svc.policy.on_connect(&key, t1).unwrap();
    for m in 0..180 {
        f.svc.policy.tick(t1 + m * min).unwrap();
        assert_eq!(gate(&f), Gate::Admitted { until: None }, "minute {m}");
    }
    f.svc.policy.tick(t1 + 180 * min).unwrap();
    assert_eq!(gate(&f), Gate::Held(DropReason::GateOutsideWindow));

    // Out of time stays out of time after another restart; the next day starts afresh.
    let f = restart(f);
    f.svc.policy.on_connect(&key, t1 + 181 * min).unwrap();
    f.svc.policy.tick(t1 + 181 * min).unwrap();
    assert_eq!(gate(&f), Gate::Held(DropReason::GateOutsideWindow));
    f.svc.policy.tick(at("2026-11-29T00:00:30Z")).unwrap();
    assert_eq!(gate(&f), Gate::Admitted { until: None });

    // A removed user's time goes with it.
    f.svc.users.remove_user(&root(), &u("alice")).unwrap();
    let store = f.svc.store().clone();
    assert!(
        store
            .scan::<serde_json::Value>(Cf::Policy, crate::store::keys::POLICY_ONLINE)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn removed_devices_free_their_slot_and_leave_nothing_to_a_device_on_their_id() {
    let f = fixture();
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::Default,
            &patch(|t| t.connections = Some("1".into())),
        )
        .unwrap();
    let a = add(&f, "alice", &["d1", "d2"]);
    let key_of = |id| {
        f.tunnel
            .state()
            .keys()
            .copied()
            .find(|k| f.svc.directory.peer_by_key(k).unwrap().id == id)
            .unwrap()
    };
    let t0 = SystemTime::now();
    let at = |s| t0 + Duration::from_secs(s);
    f.svc.policy.on_connect(&key_of(a[0]), at(0)).unwrap();
    f.svc.policy.on_connect(&key_of(a[1]), at(1)).unwrap();
    let gate = |id| f.plane.state().gates[&id];
    assert_eq!(gate(a[1]), Gate::Held(DropReason::GateDeviceLimit));
    // The admitted device is removed: the waiting one takes its slot.
    f.svc
        .devices
        .remove_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("device", "d1").unwrap(),
        )
        .unwrap();
    assert_eq!(gate(a[1]), Gate::Admitted { until: None });
    // alice goes with her online device; bob's devices get both ids. Neither is online until
    // its own handshake, so the first to handshake is admitted.
    f.svc.users.remove_user(&root(), &u("alice")).unwrap();
    let b = add(&f, "bob", &["b1", "b2"]);
    assert_eq!(
        b.iter().copied().collect::<std::collections::BTreeSet<_>>(),
        a.iter().copied().collect(),
        "the ids are re-used"
    );
    let other = if b[0] == a[1] { b[1] } else { b[0] };
    f.svc.policy.on_connect(&key_of(other), at(5)).unwrap();
    assert_eq!(gate(other), Gate::Admitted { until: None });
    let stale = if other == b[0] { b[1] } else { b[0] };
    f.svc.policy.on_connect(&key_of(stale), at(6)).unwrap();
    assert_eq!(gate(stale), Gate::Held(DropReason::GateDeviceLimit));
}

// ---- templates ------------------------------------------------------------------------------

fn tn(n: &str) -> crate::service::templates::model::TemplateName {
    crate::service::templates::model::TemplateName::parse("name", n).unwrap()
}

/// Everything a failed call must leave as it was: policy records, templates, audit, kernel.
fn state_of(f: &Fixture) -> String {
    format!(
        "{:?}|{:?}|{:?}|{}|{:?}|{:?}",
        f.svc
            .store()
            .scan::<serde_json::Value>(Cf::Policy, "")
            .unwrap(),
        f.svc.templates.list_quota_templates(),
        f.svc.templates.list_config_templates().unwrap(),
        audit_count(f),
        f.plane.state().policy.writes,
        f.plane.state().policy.rates,
    )
}

#[test]
fn a_quota_template_is_the_template_layer_and_survives_a_restart() {
    let f = fixture();
    let a = add(&f, "alice", &["laptop"]);
    let b = add(&f, "bob", &["laptop"]);
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::Default,
            &patch(|t| {
                t.bandwidth = Some("100Mbps".into());
                t.flows = Some("1000".into());
            }),
        )
        .unwrap();
    let t = f
        .svc
        .templates
        .create_quota_template(
            &root(),
            &tn("guest"),
            &patch(|t| {
                t.bandwidth = Some("5Mbps".into());
                t.limit = Some("2GB".into());
                t.period = Some("daily".into());
            }),
            false,
        )
        .unwrap();
    assert!(t.users.is_empty());
    let audits = audit_count(&f);
    f.svc
        .templates
        .apply_quota_template(&root(), Some(&tn("guest")), &[u("alice")])
        .unwrap();
    assert_eq!(audit_count(&f), audits + 1, "one audit record");
    let s = f.plane.state().policy;
    assert_eq!(s.rates.get(&a[0]), Some(&rate(5)), "the template's rate");
    assert_eq!(
        s.rates.get(&b[0]),
        Some(&rate(100)),
        "bob keeps the default"
    );
    assert!(s.assigned.contains_key(&a[0]), "alice has a bucket");
    let rows = f.svc.policy.explain(&u("alice")).unwrap().explain();
    let row = |n: &str| rows.iter().find(|r| r.field == n).unwrap().clone();
    assert_eq!(row("bandwidth").source, "template:guest");
    assert_eq!(row("period").source, "template:guest");
    assert_eq!(row("flows").source, "default");
    // A user override still beats the template; the template stays attached.
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.bandwidth = Some("7Mbps".into())),
        )
        .unwrap();
    assert_eq!(f.plane.state().policy.rates.get(&a[0]), Some(&rate(7)));
    assert_eq!(
        f.svc
            .templates
            .get_quota_template(&tn("guest"))
            .unwrap()
            .users,
        [u("alice")]
    );
    // Replacing the template reaches its users.
    f.svc
        .templates
        .create_quota_template(
            &root(),
            &tn("guest"),
            &patch(|t| t.flows = Some("50".into())),
            true,
        )
        .unwrap();
    assert_eq!(f.plane.state().policy.flows.get(&a[0]), Some(&50));
    // Restart: records come back from the store.
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    let rows = f.svc.policy.explain(&u("alice")).unwrap().explain();
    assert_eq!(
        rows.iter().find(|r| r.field == "flows").unwrap().source,
        "template:guest"
    );
    // Delete is refused while applied, naming the user; detach, then delete.
    let e = f
        .svc
        .templates
        .delete_quota_template(&root(), &tn("guest"))
        .unwrap_err();
    assert!(
        matches!(&e, ServiceError::InUse { users, .. } if users == "alice"),
        "{e}"
    );
    f.svc
        .templates
        .apply_quota_template(&root(), None, &[u("alice")])
        .unwrap();
    assert_eq!(f.plane.state().policy.flows.get(&a[0]), Some(&1000));
    f.svc
        .templates
        .delete_quota_template(&root(), &tn("guest"))
        .unwrap();
    assert!(f.svc.templates.list_quota_templates().is_empty());
}

#[test]
fn bad_template_calls_change_nothing() {
    let f = fixture();
    add(&f, "alice", &["laptop"]);
    f.svc
        .templates
        .create_quota_template(
            &root(),
            &tn("guest"),
            &patch(|t| t.bandwidth = Some("5Mbps".into())),
            false,
        )
        .unwrap();
    let before = state_of(&f);
    let e = f
        .svc
        .templates
        .apply_quota_template(&root(), Some(&tn("ghost")), &[u("alice")])
        .unwrap_err();
    assert!(matches!(e, ServiceError::NotFound { .. }), "{e}");
    let e = f
        .svc
        .templates
        .apply_quota_template(&root(), Some(&tn("guest")), &[u("alice"), u("nobody")])
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::NotFound { what: "user", .. }),
        "{e}"
    );
    let e = f
        .svc
        .templates
        .create_quota_template(
            &root(),
            &tn("guest"),
            &patch(|t| t.bandwidth = Some("1Mbps".into())),
            false,
        )
        .unwrap_err();
    assert!(matches!(e, ServiceError::AlreadyExists { .. }), "{e}");
    let e = f
        .svc
        .templates
        .create_quota_template(&root(), &tn("guest"), &patch(|_| {}), false)
        .unwrap_err();
    assert!(matches!(e, ServiceError::AlreadyExists { .. }), "{e}");
    // `current` cannot be saved over; a built-in cannot be deleted (only a template saved
    // over it).
    let e = f
        .svc
        .templates
        .save_config_template(&root(), &tn("current"), true)
        .unwrap_err();
    assert!(
        matches!(&e, ServiceError::Invalid(v) if v.field() == "name"),
        "{e}"
    );
    for n in ["strict", "current"] {
        let e = f
            .svc
            .templates
            .delete_config_template(&root(), &tn(n))
            .unwrap_err();
        assert!(matches!(e, ServiceError::Invalid(_)), "{e}");
    }
    assert_eq!(state_of(&f), before, "nothing changed by the refusals");
    let mut strict = f
        .svc
        .templates
        .get_config_template(&tn("strict"))
        .unwrap()
        .template;
    // A template needing a destination list that does not exist is refused whole.
    strict.name = tn("needs-ads");
    strict.blocklists = [crate::blocklist::ListName::parse("ads").unwrap()].into();
    let after_import = {
        f.svc
            .templates
            .import_config_template(&root(), strict.clone(), false)
            .unwrap();
        state_of(&f)
    };
    let e = f
        .svc
        .templates
        .apply_config_template(&root(), &tn("needs-ads"))
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::NotFound { .. }) && e.to_string().contains("blocklists"),
        "{e}"
    );
    let e = f
        .svc
        .templates
        .import_config_template(&root(), strict, false)
        .unwrap_err();
    assert!(matches!(e, ServiceError::AlreadyExists { .. }), "{e}");
    assert_eq!(
        state_of(&f),
        after_import,
        "nothing changed by the refusals"
    );
    f.svc
        .templates
        .delete_config_template(&root(), &tn("needs-ads"))
        .unwrap();
    assert!(
        f.svc
            .templates
            .get_config_template(&tn("needs-ads"))
            .is_err()
    );
}

#[test]
fn a_config_template_sets_default_limits_dns_and_settings_atomically() {
    let f = fixture();
    let a = add(&f, "alice", &["laptop"]);
    f.svc.templates.set_listen_port(51820);
    let audits = audit_count(&f);
    let live = f
        .svc
        .templates
        .apply_config_template(&root(), &tn("guest"))
        .unwrap();
    assert_eq!(audit_count(&f), audits + 1, "one audit record");
    assert_eq!(live.template.limits.bandwidth.unwrap().to_string(), "5mbit");
    assert_eq!(f.plane.state().policy.rates.get(&a[0]), Some(&rate(5)));
    let rows = f.svc.policy.explain(&u("alice")).unwrap().explain();
    assert_eq!(
        rows.iter().find(|r| r.field == "bandwidth").unwrap().source,
        "default"
    );
    // New client configs carry the template's DNS.
    let cfg = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("d", "phone").unwrap(),
        )
        .unwrap();
    assert!(
        cfg.wg_quick.contains("DNS = 1.1.1.1, 1.0.0.1"),
        "{}",
        cfg.wg_quick
    );
    // Save the live settings, change them, apply the saved copy: back where we were.
    f.svc
        .templates
        .save_config_template(&root(), &tn("mine"), false)
        .unwrap();
    let saved = f.svc.templates.get_config_template(&tn("mine")).unwrap();
    assert!(!saved.builtin);
    assert_eq!(saved.template.ports.listen_port, Some(51820));
    assert!(
        saved.notes.iter().any(|n| n.contains("listen_port")),
        "{:?}",
        saved.notes
    );
    f.svc
        .templates
        .apply_config_template(&root(), &tn("strict"))
        .unwrap();
    assert_eq!(f.plane.state().policy.rates.get(&a[0]), Some(&rate(20)));
    let current = f.svc.templates.get_config_template(&tn("current")).unwrap();
    assert!(current.template.security.mfa_required);
    assert!(
        current
            .notes
            .iter()
            .any(|n| n.contains("mfa_required") && n.contains("not enforced")),
        "{:?}",
        current.notes
    );
    f.svc
        .templates
        .apply_config_template(&root(), &tn("mine"))
        .unwrap();
    assert_eq!(f.plane.state().policy.rates.get(&a[0]), Some(&rate(5)));
    // Export → import under a new name → export is identical but for the name.
    let y = saved.template.to_yaml();
    let mut t = crate::service::templates::model::ConfigTemplate::from_yaml(&y).unwrap();
    t.name = tn("copy");
    f.svc
        .templates
        .import_config_template(&root(), t, false)
        .unwrap();
    let again = f
        .svc
        .templates
        .get_config_template(&tn("copy"))
        .unwrap()
        .template;
    assert_eq!(again.to_yaml(), y.replace("name: mine", "name: copy"));
    // Settings survive a restart.
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    let cfg = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("d", "tablet").unwrap(),
        )
        .unwrap();
    assert!(cfg.wg_quick.contains("DNS = 1.1.1.1"), "{}", cfg.wg_quick);
}

/// The gate of device `id` in the in-memory kernel.
fn kernel_gate(f: &Fixture, id: u32) -> Gate {
    f.plane.state().gates[&id]
}

fn secs(t: SystemTime) -> SystemTime {
    crate::service::domain::from_unix_secs(crate::service::domain::unix_secs(t))
}

#[test]
fn the_account_expiry_is_the_devices_admission_deadline() {
    let f = fixture();
    let in_an_hour = secs(SystemTime::now() + Duration::from_secs(3600));
    let (_, cfg) = f
        .svc
        .users
        .add_user(
            &root(),
            NewUser {
                name: u("alice"),
                device: DeviceName::parse("device", "laptop").unwrap(),
                expires_at: Some(in_an_hour),
            },
        )
        .unwrap();
    let laptop = cfg.peer.id;
    let until = |t| Gate::Admitted { until: Some(t) };
    // Programmed with the deadline when added, and a second device too.
    assert_eq!(kernel_gate(&f, laptop), until(in_an_hour));
    let phone = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .unwrap()
        .peer
        .id;
    assert_eq!(kernel_gate(&f, phone), until(in_an_hour));
    // `expire`: moved; in the past: held at once, as expired.
    let tomorrow = secs(SystemTime::now() + Duration::from_secs(86_400));
    let audits = audit_count(&f);
    let d = f
        .svc
        .users
        .expire_user(&root(), &u("alice"), tomorrow)
        .unwrap();
    assert_eq!(
        d.user.expires_at,
        Some(crate::service::domain::unix_secs(tomorrow))
    );
    assert_eq!(kernel_gate(&f, laptop), until(tomorrow));
    assert_eq!(audit_count(&f), audits + 1);
    let past = secs(SystemTime::now() - Duration::from_secs(60));
    f.svc.users.expire_user(&root(), &u("alice"), past).unwrap();
    for id in [laptop, phone] {
        assert_eq!(kernel_gate(&f, id), Gate::Held(DropReason::GateExpired));
    }
    // A restart (reconcile) keeps the hold; `renew` lifts it and clears the deadline.
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    assert_eq!(kernel_gate(&f, laptop), Gate::Held(DropReason::GateExpired));
    f.svc.users.renew_user(&root(), &u("alice"), None).unwrap();
    for id in [laptop, phone] {
        assert_eq!(kernel_gate(&f, id), Gate::Admitted { until: None });
    }
    assert_eq!(
        f.svc.users.get_user(&u("alice")).unwrap().user.expires_at,
        None
    );
    // Renewed to a new expiry: the deadline again, and again after a restart.
    f.svc
        .users
        .renew_user(&root(), &u("alice"), Some(in_an_hour))
        .unwrap();
    assert_eq!(kernel_gate(&f, phone), until(in_an_hour));
    // The kernel lost the deadline (a stale pin, a tool): the start programs it again.
    f.plane.with(|s| {
        s.gates.insert(phone, Gate::Admitted { until: None });
    });
    let Fixture {
        dir,
        plane,
        tunnel,
        svc,
    } = f;
    drop(svc);
    let f = open(dir, plane, tunnel);
    assert_eq!(kernel_gate(&f, phone), until(in_an_hour));
    // A policy change re-applies the user's gates with the deadline kept.
    f.svc
        .policy
        .set_limits(
            &root(),
            &LimitsTarget::User(u("alice")),
            &patch(|t| t.connections = Some("1".into())),
        )
        .unwrap();
    assert_eq!(kernel_gate(&f, laptop), until(in_an_hour));
}

#[test]
fn bad_expiry_input_changes_nothing() {
    let f = fixture();
    add(&f, "alice", &["laptop"]);
    let audits = audit_count(&f);
    let gates = f.plane.state().gates;
    let far =
        SystemTime::now() + crate::service::domain::MAX_EXPIRY_AHEAD + Duration::from_secs(86_400);
    let e = f
        .svc
        .users
        .expire_user(&root(), &u("alice"), far)
        .unwrap_err();
    assert!(e.to_string().starts_with("at: "), "{e}");
    let e = f
        .svc
        .users
        .renew_user(
            &root(),
            &u("alice"),
            Some(SystemTime::now() - Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("at: "), "{e}");
    let e = f
        .svc
        .users
        .expire_user(&root(), &u("nobody"), SystemTime::now())
        .unwrap_err();
    assert!(matches!(e, ServiceError::NotFound { .. }), "{e}");
    assert_eq!(audit_count(&f), audits);
    assert_eq!(f.plane.state().gates, gates);
    assert_eq!(
        f.svc.users.get_user(&u("alice")).unwrap().user.expires_at,
        None
    );
}

#[test]
fn the_tick_holds_a_device_whose_expiry_passed_as_expired() {
    let f = fixture();
    let id = add(&f, "alice", &["laptop"])[0];
    let soon = secs(SystemTime::now() + Duration::from_secs(10));
    f.svc.users.expire_user(&root(), &u("alice"), soon).unwrap();
    assert_eq!(kernel_gate(&f, id), Gate::Admitted { until: Some(soon) });
    // Before the expiry the tick changes nothing; after it the hold names its reason.
    f.svc.policy.tick(SystemTime::now()).unwrap();
    assert_eq!(kernel_gate(&f, id), Gate::Admitted { until: Some(soon) });
    f.svc.policy.tick(soon + Duration::from_secs(1)).unwrap();
    assert_eq!(kernel_gate(&f, id), Gate::Held(DropReason::GateExpired));
}

#[test]
fn cleanup_removes_users_expired_longer_than_the_grace() {
    let f = fixture();
    let old = add(&f, "old", &["laptop", "phone"]);
    add(&f, "recent", &["laptop"]);
    add(&f, "active", &["laptop"]);
    let ago = |d: u64| SystemTime::now() - Duration::from_secs(d * 86_400);
    f.svc
        .users
        .expire_user(&root(), &u("old"), ago(10))
        .unwrap();
    f.svc
        .users
        .expire_user(&root(), &u("recent"), ago(2))
        .unwrap();
    let week = Duration::from_secs(7 * 86_400);
    // A dry run lists and changes nothing.
    let audits = audit_count(&f);
    let would = f.svc.users.cleanup_expired(&root(), week, true).unwrap();
    assert_eq!(
        would
            .iter()
            .map(|d| d.user.name.to_string())
            .collect::<Vec<_>>(),
        ["old"]
    );
    assert_eq!(audit_count(&f), audits);
    assert!(f.svc.users.get_user(&u("old")).is_ok());
    // The real run removes the user, its devices and its kernel peers, audited.
    let removed = f.svc.users.cleanup_expired(&root(), week, false).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].peers.len(), 2);
    assert!(matches!(
        f.svc.users.get_user(&u("old")),
        Err(ServiceError::NotFound { .. })
    ));
    for id in old {
        assert!(!f.plane.state().gates.contains_key(&id));
    }
    assert_eq!(audit_count(&f), audits + 1);
    // No grace: the recently expired one goes too; the active one stays.
    let removed = f
        .svc
        .users
        .cleanup_expired(&root(), Duration::ZERO, false)
        .unwrap();
    assert_eq!(removed[0].user.name.as_str(), "recent");
    assert!(f.svc.users.get_user(&u("active")).is_ok());
}
