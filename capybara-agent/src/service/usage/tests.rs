use std::sync::Arc;

use super::{
    render::render,
    report::{Format, Report, ReportQuery, parse_date},
    *,
};
use crate::service::{
    NewUser, Service, ServiceConfig,
    domain::{Actor, DeviceName, UserName},
    policy::{
        LimitsTarget,
        model::{GroupName, LimitsText},
    },
    testing::{MemoryPlane, open_service},
};

const H: u64 = HOUR_MS;
/// 2026-12-01T00:00:00Z in ms.
const T0: u64 = 1_796_083_200_000;

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn dev(id: u32, k: u8, user: &str, rx: u64, tx: u64, online: bool) -> DeviceSample {
    DeviceSample {
        id,
        key: key(k),
        user: user.into(),
        device: "laptop".into(),
        counters: Counters {
            rx_bytes: rx,
            rx_packets: rx / 100,
            tx_bytes: tx,
            tx_packets: tx / 100,
            ..Counters::default()
        },
        online,
    }
}

/// Applies writes to a map, as the store would.
fn apply(store: &mut BTreeMap<String, Vec<u8>>, w: Option<Write>) {
    for op in w.into_iter().flat_map(|w| w.ops) {
        match op {
            Op::Put(k, v) => {
                store.insert(k, v);
            }
            Op::Delete(k) => {
                store.remove(&k);
            }
        }
    }
}

fn rec(store: &BTreeMap<String, Vec<u8>>, key: &str) -> UsageRecord {
    UsageRecord::decode(store.get(key).unwrap_or_else(|| panic!("no {key}"))).unwrap()
}

#[test]
fn a_record_is_176_bytes_and_round_trips() {
    let mut r = UsageRecord {
        rx_bytes: 1,
        rx_packets: 2,
        tx_bytes: u64::MAX,
        tx_packets: 4,
        online_ms: 5,
        sessions: 6,
        peak_rx: 7,
        peak_tx: 8,
        drops: [0; DROP_REASON_COUNT],
    };
    r.drops[3] = 9;
    let b = r.encode();
    assert_eq!(b.len(), RECORD_BYTES);
    assert_eq!(RECORD_BYTES, 176);
    assert_eq!(UsageRecord::decode(&b), Some(r));
    // An older, shorter layout reads its missing drop reasons as 0.
    let short = UsageRecord::decode(&b[..64 + 8]).unwrap();
    assert_eq!(short.tx_bytes, u64::MAX);
    assert_eq!(short.drops[0], 0);
    assert_eq!(UsageRecord::decode(&b[..63]), None);
    assert_eq!(UsageRecord::decode(&b[..56]), None);
}

#[test]
fn an_hour_boundary_closes_the_hour_with_every_byte_and_opens_the_next() {
    let mut r = Rollup::new(T0 + 10 * H - 20_000);
    let mut st = BTreeMap::new();
    // First sample: the baseline (the writer's first start: no checkpoint yet).
    apply(
        &mut st,
        r.sample(
            T0 + 10 * H - 20_000,
            &[dev(1, 1, "alice", 1_000, 500, true)],
        ),
    );
    apply(
        &mut st,
        r.sample(
            T0 + 10 * H - 10_000,
            &[dev(1, 1, "alice", 11_000, 2_500, true)],
        ),
    );
    // The sample at 10:00:00 ends an interval of 09:59:50–10:00:00: it belongs to 09.
    let w = r.sample(T0 + 10 * H, &[dev(1, 1, "alice", 31_000, 2_500, true)]);
    assert!(
        w.as_ref().is_some_and(|w| w.sync),
        "a completed hour is synced"
    );
    apply(&mut st, w);
    let hour9 = rec(&st, &keys::usage_hour(hour_of(T0) + 9, "alice", "laptop"));
    assert_eq!(hour9.rx_bytes, 30_000);
    assert_eq!(hour9.tx_bytes, 2_000);
    assert_eq!(hour9.online_ms, 20_000);
    assert_eq!(hour9.peak_rx, 2_000, "20 000 bytes in 10 s");
    assert_eq!(hour9.peak_tx, 200);
    let day = rec(&st, &keys::usage_day(hour_of(T0) / 24, "alice", "laptop"));
    assert_eq!(day.rx_bytes, 30_000);
    assert_eq!(r.hour(), hour_of(T0) + 10);
    // The next interval is the new hour's.
    apply(
        &mut st,
        r.sample(
            T0 + 10 * H + 10_000,
            &[dev(1, 1, "alice", 31_100, 2_500, false)],
        ),
    );
    assert_eq!(
        r.current()[&("alice".into(), "laptop".into())].rx_bytes,
        100
    );
    assert_eq!(
        r.current()[&("alice".into(), "laptop".into())].online_ms,
        0,
        "offline at the sample"
    );
    // Completing the next hour adds it to the same day.
    apply(
        &mut st,
        r.sample(T0 + 11 * H, &[dev(1, 1, "alice", 31_400, 2_500, false)]),
    );
    let day = rec(&st, &keys::usage_day(hour_of(T0) / 24, "alice", "laptop"));
    assert_eq!(day.rx_bytes, 30_400);
    assert_eq!(day.peak_rx, 2_000, "the day's peak is its hours' highest");
}

#[test]
fn a_counter_reset_or_a_reused_id_counts_from_zero() {
    let mut r = Rollup::new(T0);
    r.sample(T0, &[dev(1, 1, "alice", 5_000, 0, false)]);
    r.sample(T0 + 10_000, &[dev(1, 1, "alice", 6_000, 0, false)]);
    // Removed and re-added (same key): the kernel zeroed the counters, then 300 bytes.
    r.sample(T0 + 20_000, &[dev(1, 1, "alice", 300, 0, false)]);
    assert_eq!(
        r.current()[&("alice".into(), "laptop".into())].rx_bytes,
        1_300
    );
    // Peer id 1 now belongs to bob's new device: its 700 bytes are bob's, alice's stay.
    r.sample(T0 + 30_000, &[dev(1, 2, "bob", 700, 0, false)]);
    assert_eq!(
        r.current()[&("alice".into(), "laptop".into())].rx_bytes,
        1_300
    );
    assert_eq!(r.current()[&("bob".into(), "laptop".into())].rx_bytes, 700);
    // Removed: what it used this hour stays and is written with the hour.
    let mut st = BTreeMap::new();
    apply(&mut st, r.sample(T0 + H, &[]));
    assert_eq!(
        rec(&st, &keys::usage_hour(hour_of(T0), "bob", "laptop")).rx_bytes,
        700
    );
    assert!(
        !st.contains_key(&keys::usage_cursor(1)),
        "a removed device's cursor goes"
    );
}

#[test]
fn a_killed_writer_loses_no_byte_and_a_new_device_counts_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let at = T0 + 5 * H;
    let mut w = UsageWriter::open(store.clone(), at).unwrap();
    w.sample(at, &[dev(1, 1, "alice", 1_000, 10, true)])
        .unwrap();
    w.sample(at + 10_000, &[dev(1, 1, "alice", 4_000, 20, true)])
        .unwrap();
    w.checkpoint(false).unwrap();
    // More traffic, sampled but never checkpointed: then the agent is killed.
    w.sample(at + 20_000, &[dev(1, 1, "alice", 9_000, 30, true)])
        .unwrap();
    drop(w);
    // The next start, an hour later; the pinned counters moved on before the kill, and a
    // device added after the last checkpoint has counted 50 bytes.
    let later = at + H + 30_000;
    let mut w = UsageWriter::open(store.clone(), later).unwrap();
    assert_eq!(w.rollup().hour(), hour_of(at));
    let completed = w
        .sample(
            later,
            &[
                dev(1, 1, "alice", 9_500, 40, true),
                dev(2, 2, "bob", 50, 0, true),
            ],
        )
        .unwrap();
    assert!(
        completed,
        "the checkpoint's hour is completed at the restart"
    );
    let get =
        |k: String| UsageRecord::decode(&store.get_raw(Cf::Usage, &k).unwrap().unwrap()).unwrap();
    let alice = get(keys::usage_hour(hour_of(at), "alice", "laptop"));
    assert_eq!(
        alice.rx_bytes, 8_500,
        "every byte since the first sample, none twice"
    );
    assert_eq!(alice.tx_bytes, 30);
    assert_eq!(
        alice.online_ms, 10_000,
        "the unsaved 10 s of online time are lost"
    );
    assert_eq!(
        get(keys::usage_hour(hour_of(at), "bob", "laptop")).rx_bytes,
        50
    );
    assert_eq!(
        get(keys::usage_day(hour_of(at) / 24, "alice", "laptop")).rx_bytes,
        8_500
    );
    // And again: a clean restart continues without counting anything twice.
    w.sample(
        later + 10_000,
        &[
            dev(1, 1, "alice", 9_600, 40, true),
            dev(2, 2, "bob", 50, 0, true),
        ],
    )
    .unwrap();
    w.checkpoint(true).unwrap();
    drop(w);
    let mut w = UsageWriter::open(store.clone(), later + 20_000).unwrap();
    w.sample(later + 20_000, &[dev(1, 1, "alice", 9_600, 40, true)])
        .unwrap();
    w.checkpoint(true).unwrap();
    assert_eq!(
        get(keys::usage_hour(hour_of(later), "alice", "laptop")).rx_bytes,
        100
    );
}

#[test]
fn pruning_keeps_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let w = UsageWriter::open(store.clone(), T0).unwrap();
    let mut b = Batch::default();
    let now_h = hour_of(T0);
    for h in [now_h - 94 * 24, now_h - 93 * 24, now_h] {
        b.put_raw(
            Cf::Usage,
            &keys::usage_hour(h, "a", "d"),
            UsageRecord::default().encode(),
        );
    }
    for d in [now_h / 24 - 401, now_h / 24 - 400, now_h / 24] {
        b.put_raw(
            Cf::Usage,
            &keys::usage_day(d, "a", "d"),
            UsageRecord::default().encode(),
        );
    }
    store.commit(b).unwrap();
    assert_eq!(
        w.prune(T0, HOURLY_RETENTION_DAYS, DAILY_RETENTION_DAYS)
            .unwrap(),
        2
    );
    assert!(
        store
            .get_raw(Cf::Usage, &keys::usage_hour(now_h - 93 * 24, "a", "d"))
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .get_raw(Cf::Usage, &keys::usage_hour(now_h - 94 * 24, "a", "d"))
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get_raw(Cf::Usage, &keys::usage_day(now_h / 24 - 400, "a", "d"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn bad_report_input_names_the_field() {
    let err = |p: &str, f: &str, t: &str, g: &str| {
        ReportQuery::parse(p, f, t, g).unwrap_err().to_string()
    };
    assert!(err("year", "", "", "").starts_with("period:"));
    assert!(err("", "2026-13-01", "", "").starts_with("from:"));
    assert!(
        err("", "2026-02-29", "", "").starts_with("from:"),
        "not a leap year"
    );
    assert!(err("", "2026-12-05", "2026-12-01", "").starts_with("to:"));
    assert!(err("", "", "2026-12-01", "").starts_with("from:"));
    assert!(err("week", "2026-12-01", "", "").starts_with("period:"));
    assert!(
        err("", "1970-01-01", "9999-12-31", "").starts_with("from:"),
        "at most 400 days"
    );
    assert!(ReportQuery::parse("", "2025-11-01", "2026-12-04", "").is_ok());
    assert!(err("", "", "", "Bad Group").starts_with("group:"));
    assert!(
        Format::parse("format", "pdf")
            .unwrap_err()
            .to_string()
            .starts_with("format:")
    );
    assert_eq!(parse_date("from", "2026-12-01").unwrap(), T0 / 86_400_000);
    assert_eq!(parse_date("from", "2024-02-29").unwrap(), 19_782);
    assert_eq!(report::civil_date(19_782), "2024-02-29");
}

#[test]
fn periods_cover_whole_utc_hours_up_to_now() {
    let now = T0 + 5 * H + 123;
    let q = ReportQuery::parse("day", "", "", "").unwrap();
    assert_eq!(
        q.hours(now),
        (hour_of(T0) + 5 - 23, hour_of(T0) + 5, "day".into())
    );
    let q = ReportQuery::parse("", "2026-11-30", "2026-12-01", "").unwrap();
    assert_eq!(
        q.hours(now),
        (hour_of(T0) - 24, hour_of(T0) + 5, "range".into()),
        "hours still to come are not covered"
    );
    let q = ReportQuery::parse("", "2026-12-10", "", "").unwrap();
    let (first, last, _) = q.hours(now);
    assert!(last < first, "a range in the future covers nothing");
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn add_user(svc: &Service, name: &str) -> u32 {
    svc.users
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
        .id
}

#[test]
fn a_report_sums_users_groups_top_users_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open_service(
        dir.path(),
        plane.clone(),
        ServiceConfig::for_tests("10.97.0.1/24", "fd97::1/64", "vpn.example.com:51820"),
    );
    let alice = add_user(&svc, "alice");
    let _bob = add_user(&svc, "bob");
    let _carol = add_user(&svc, "carol");
    let staff = GroupName::parse("group", "staff").unwrap();
    svc.policy.create_group(&root(), &staff).unwrap();
    svc.policy
        .change_members(
            &root(),
            &staff,
            &[
                UserName::parse("u", "alice").unwrap(),
                UserName::parse("u", "bob").unwrap(),
            ],
            true,
        )
        .unwrap();
    let t = LimitsText {
        limit: Some("1MB".into()),
        period: Some("monthly".into()),
        ..LimitsText::default()
    };
    svc.policy
        .set_limits(
            &root(),
            &LimitsTarget::User(UserName::parse("u", "alice").unwrap()),
            &t.parse().unwrap(),
        )
        .unwrap();
    let bucket = plane.state().policy.assigned[&alice];
    plane.with(|s| s.policy.buckets.get_mut(&bucket).unwrap().used_bytes = 3_000_000);

    // Three days of rollups, written by the writer: alice 1 kB/h, bob 2 kB/h from devices;
    // dave (removed since) 5 kB once.
    let mut w = UsageWriter::open(svc.store().clone(), T0).unwrap();
    let devs = |h: u64| {
        vec![
            dev(1, 1, "alice", 1_000 * h, 10 * h, true),
            dev(2, 2, "bob", 2_000 * h, 0, true),
            dev(3, 3, "dave", if h >= 30 { 5_000 } else { 0 }, 0, false),
        ]
    };
    for h in 0..=72 {
        w.sample(T0 + h * H, &devs(h)).unwrap();
    }
    // Days 2026-12-01 .. 2026-12-02 (48 hours: hourly series).
    let q = ReportQuery::parse("", "2026-12-01", "2026-12-02", "").unwrap();
    let r = svc.usage.report(&q, T0 + 72 * H + 5).unwrap();
    assert_eq!(r.resolution, "hour");
    assert_eq!(r.series.len(), 48);
    let user = |n: &str| r.users.iter().find(|u| u.user == n).unwrap().clone();
    assert_eq!(user("alice").usage.rx_bytes, 48_000);
    assert_eq!(user("alice").usage.tx_bytes, 480);
    assert_eq!(user("alice").usage.online_seconds, 48 * 3600);
    assert_eq!(user("bob").usage.rx_bytes, 96_000);
    assert_eq!(
        user("dave").usage.rx_bytes,
        5_000,
        "a removed user keeps its usage"
    );
    assert_eq!(user("carol").usage.rx_bytes, 0, "every user is listed");
    assert_eq!(r.top_users, ["bob", "alice", "dave"]);
    assert_eq!(r.users[0].user, "bob", "busiest first");
    assert_eq!(r.over_quota, ["alice"]);
    let q_alice = user("alice").quota.unwrap();
    assert_eq!(
        (q_alice.used_bytes, q_alice.limit_bytes),
        (3_000_000, 1_000_000)
    );
    assert!((q_alice.percent - 300.0).abs() < 1e-9);
    assert_eq!(r.groups.len(), 1);
    assert_eq!(r.groups[0].usage.rx_bytes, 144_000);
    assert_eq!(r.groups[0].members, 2);
    assert_eq!(r.totals.rx_bytes, 149_000);
    assert_eq!(r.series.iter().map(|p| p.rx_bytes).sum::<u64>(), 149_000);
    assert_eq!(r.series[0].rx_bytes, 3_000);

    // A month (daily series, whole days from the daily records) limited to the group.
    let q = ReportQuery::parse("", "2026-11-15", "2026-12-03", "staff").unwrap();
    let r = svc.usage.report(&q, T0 + 72 * H + 5).unwrap();
    assert_eq!(r.resolution, "day");
    assert_eq!(
        r.users.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(),
        ["bob", "alice"]
    );
    assert_eq!(r.totals.rx_bytes, 3 * 24 * 3_000);
    let days: Vec<u64> = r
        .series
        .iter()
        .map(|p| p.rx_bytes)
        .filter(|b| *b > 0)
        .collect();
    assert_eq!(days, [72_000, 72_000, 72_000]);

    // An unknown group is not found; nothing is read.
    let q = ReportQuery::parse("week", "", "", "nobody").unwrap();
    assert!(matches!(
        svc.usage.report(&q, T0),
        Err(ServiceError::NotFound { .. })
    ));

    // Every format says the same.
    let q = ReportQuery::parse("", "2026-12-01", "2026-12-02", "").unwrap();
    let r = svc.usage.report(&q, T0 + 72 * H + 5).unwrap();
    let csv = render(&r, Format::Csv);
    assert!(csv.starts_with("scope,name,groups,rx_bytes,tx_bytes,"));
    assert!(csv.contains("\r\nuser,alice,staff,48000,480,"), "{csv}");
    assert!(csv.contains("\r\ntotal,,,149000,"), "{csv}");
    let json: Report = serde_json::from_str(&render(&r, Format::Json)).unwrap();
    assert_eq!(json, r);
    let text = render(&r, Format::Text);
    assert!(text.contains("over quota: alice"), "{text}");
    let html = render(&r, Format::Html);
    assert!(
        html.contains("<title>Usage report: 2026-12-01 00:00 UTC to 2026-12-03 00:00 UTC</title>")
    );
    assert_eq!(html.matches("<svg ").count(), 3);
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href=\"http"));
}
