//! The exposition of a real service (in-memory dataplane and tunnel): bounded per-user series
//! that sum to the total, every drop reason, the timers, and the two text formats.

use std::{collections::BTreeMap, sync::Arc};

use capybara_common::{drop::DropReason, peer::PeerStats};

use super::*;
use crate::service::{
    ServiceConfig,
    domain::{Actor, DeviceName, UserName},
    testing::{MemoryPlane, MemoryTunnel},
    users::NewUser,
};

struct Fixture {
    _dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    svc: Arc<Service>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let store = crate::store::Store::open(dir.path()).unwrap();
    let svc = Service::open(
        Arc::new(store),
        plane.clone(),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "vpn.example.com:51820"),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        plane,
        svc: Arc::new(svc),
    }
}

/// `name{labels} value` lines of `metric`, as (labels, value).
fn samples(text: &str, metric: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            (name == metric).then(|| {
                (
                    labels.trim_end_matches('}').to_owned(),
                    value.parse().unwrap(),
                )
            })
        })
        .collect()
}

/// Issue 20: with 7 users and `top_users` 3 the exposition has 3 users and `_other` per
/// direction, the 3 with the most bytes, and the 4 series sum to every user's total; drops
/// come for every reason.
#[test]
fn user_series_are_top_n_and_other_summing_to_the_total() {
    let f = fixture();
    let root = Actor::Local { uid: 0 };
    let mut total = (0u64, 0u64, 0u64, 0u64);
    let mut expect_top = Vec::new();
    for (i, (name, devices)) in [
        ("ann", 1),
        ("bob", 2),
        ("cyd", 1),
        ("dan", 1),
        ("eve", 3),
        ("fay", 1),
        ("other", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let user = UserName::parse("name", name).unwrap();
        f.svc
            .users
            .add_user(
                &root,
                NewUser {
                    name: user.clone(),
                    device: DeviceName::parse("device", "d0").unwrap(),
                    expires_at: None,
                },
            )
            .unwrap();
        for d in 1..devices {
            f.svc
                .devices
                .add_device(
                    &root,
                    &user,
                    &DeviceName::parse("device", &format!("d{d}")).unwrap(),
                )
                .unwrap();
        }
        let mut user_bytes = 0;
        for (j, p) in f.svc.directory.user_peers(&user).iter().enumerate() {
            let k = (i * 10 + j + 1) as u64;
            let s = PeerStats {
                rx_bytes: k * 1_000_003 % 7_777_777,
                rx_packets: k * 11,
                tx_bytes: k * 2_000_029 % 5_555_555,
                tx_packets: k * 13,
                drops: [0; 16],
            };
            user_bytes += s.rx_bytes + s.tx_bytes;
            total.0 += s.rx_bytes;
            total.1 += s.rx_packets;
            total.2 += s.tx_bytes;
            total.3 += s.tx_packets;
            f.plane.with(|st| st.stats.insert(p.id, s));
        }
        expect_top.push((user_bytes, name));
    }
    expect_top.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let expect_top: Vec<&str> = expect_top.iter().take(3).map(|(_, n)| *n).collect();

    let m = Metrics::install(&f.svc, MetricsConfig { top_users: 3 });
    // The session recorder's dropped auth reports (what `capybara health` shows).
    f.svc
        .health
        .count_auth_drops(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(7)));
    let text = m.encode_prometheus().unwrap();
    assert_eq!(
        samples(&text, "capybara_auth_reports_dropped_total"),
        [(String::new(), 7.0)],
        "{text}"
    );
    let by_user = |metric: &str, dir: &str| -> BTreeMap<String, u64> {
        samples(&text, metric)
            .into_iter()
            .filter(|(l, _)| l.contains(&format!("direction=\"{dir}\"")))
            .map(|(l, v)| {
                let user = l.split('"').nth(1).unwrap().to_owned();
                (user, v as u64)
            })
            .collect()
    };
    for (metric, dir, want) in [
        ("capybara_user_bytes_total", "rx", total.0),
        ("capybara_user_packets_total", "rx", total.1),
        ("capybara_user_bytes_total", "tx", total.2),
        ("capybara_user_packets_total", "tx", total.3),
    ] {
        let series = by_user(metric, dir);
        let mut names: Vec<&str> = series.keys().map(String::as_str).collect();
        names.sort();
        let mut want_names: Vec<&str> = expect_top.iter().copied().chain(["_other"]).collect();
        want_names.sort();
        assert_eq!(names, want_names, "{metric} {dir}:\n{text}");
        assert_eq!(series.values().sum::<u64>(), want, "{metric} {dir}");
    }
    assert_eq!(
        samples(&text, "capybara_users_other"),
        [(String::new(), 4.0)]
    );
    let drops = samples(&text, "capybara_drops_total");
    assert_eq!(drops.len(), DropReason::ALL.len(), "{drops:?}");
    for r in DropReason::ALL {
        assert!(
            drops
                .iter()
                .any(|(l, _)| l == &format!("reason=\"{}\"", r.name())),
            "{r:?}"
        );
    }
    // Seven users without a quota.
    assert!(
        samples(&text, "capybara_quota_users")
            .contains(&("standing=\"unlimited\"".to_owned(), 7.0)),
        "{text}"
    );
    // The adds were written and synced through the store's timer… after install only:
    // write one more record.
    f.svc
        .users
        .add_user(
            &root,
            NewUser {
                name: UserName::parse("name", "zed").unwrap(),
                device: DeviceName::parse("device", "d0").unwrap(),
                expires_at: None,
            },
        )
        .unwrap();
    f.svc.settle().unwrap();
    f.svc
        .telemetry
        .observe_call("/capybara.v1.Users/AddUser", "OK", 0.003);
    let text = m.encode_prometheus().unwrap();
    for (metric, labels) in [
        ("capybara_store_duration_seconds_count", "op=\"write\""),
        ("capybara_store_duration_seconds_count", "op=\"sync\""),
        (
            "capybara_api_request_duration_seconds_count",
            "route=\"/capybara.v1.Users/AddUser\",code=\"OK\"",
        ),
    ] {
        let n = samples(&text, metric)
            .into_iter()
            .find(|(l, _)| l == labels)
            .map(|(_, v)| v);
        assert!(
            n.is_some_and(|n| n >= 1.0),
            "{metric}{{{labels}}}: {n:?}\n{text}"
        );
    }
}

#[test]
fn prometheus_text_names_counters_with_total_and_has_no_eof() {
    let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{x=\"1\"} 5\n\
              # HELP b Gauge.\n# TYPE b gauge\nb 1\n\
              # HELP c_seconds Latency.\n# TYPE c_seconds histogram\nc_seconds_sum 1.0\n\
              c_seconds_count 1\nc_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
    assert_eq!(
        to_prometheus_text(om),
        "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 5\n\
         # HELP b Gauge.\n# TYPE b gauge\nb 1\n\
         # HELP c_seconds Latency.\n# TYPE c_seconds histogram\nc_seconds_sum 1.0\n\
         c_seconds_count 1\nc_seconds_bucket{le=\"+Inf\"} 1\n"
    );
    assert!(wants_openmetrics(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    )));
    assert!(!wants_openmetrics(Some("text/plain")));
    assert!(!wants_openmetrics(None));
}

#[test]
fn metrics_listener_only_on_loopback_unless_insecure() {
    for a in ["127.0.0.1:9464", "[::1]:9464", "[::ffff:127.0.0.1]:1"] {
        assert_eq!(check_listener(a.parse().unwrap(), false), Ok(false), "{a}");
    }
    for a in ["0.0.0.0:9464", "[::]:9464", "192.0.2.1:9464"] {
        let addr: SocketAddr = a.parse().unwrap();
        assert_eq!(check_listener(addr, false), Err(addr));
        assert_eq!(check_listener(addr, true), Ok(true));
    }
}
