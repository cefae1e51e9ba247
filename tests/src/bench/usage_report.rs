//! `report_month_10k_users_ms`: a month's usage report over 10 000 users (issue 21, target
//! < 2000 ms).
//!
//! ## Method
//! A real store in a temporary directory and the control service over the in-memory dataplane
//! and tunnel (what the report reads is the store and the policy, not the kernel). 10 000
//! users with one device each are added through the service. Then the agent's own usage writer
//! (`service::usage::UsageWriter`) is fed one sample per hour for the 30 days before the current
//! hour, every device online with growing counters (a few MB each hour, some drops): the worst
//! case, every device has a record every hour, so the store holds 7.2 M hourly records and
//! 300 000 daily ones, written the way the agent writes them (one synced batch per completed
//! hour with the day's records and the cursors).
//!
//! - `report_month_10k_users_ms`: `Usage::report` of `--period month` (the last 30 days by
//!   whole hours, so whole days from the daily records and the two partial days from the
//!   hourly ones) and its JSON rendering, through the service as the API calls it; the median
//!   of 3 runs.
//! - `report_month_10k_users_hourly_ms` (**baseline, same run**): summing the same month from
//!   the hourly records alone, what the report would cost without daily rollups.
//! - `report_month_10k_users_write_s`: writing the month (setup, for scale).
//!
//! `cargo xtask bench --filter report` runs this module alone.
//!
//! ## Figures
//! One run (release, AMD EPYC, 2 cores shared with other builds at load ≈ 7.5, Linux 6.18,
//! 2026-12-07): `report_month_10k_users_ms` **947 ms** (runs 947, 931, 1 036; 6.1 MB of JSON)
//! against **15 189 ms** summing the same month from the hourly records alone: the daily
//! rollups are what meets the target. Writing the month: 297 s, a store of about 5 GB.

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use anyhow::Result;
use capybara_agent::{
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, DeviceName, UserName},
        testing::{MemoryPlane, MemoryTunnel},
        usage::{
            Counters, DeviceSample, HOUR_MS, UsageWriter, hour_of,
            render::render,
            report::{Format, ReportQuery},
            unix_ms,
        },
    },
    store::Store,
};

use super::{Figure, Selection, median};
use crate::progress;

/// The report of a month over 10 000 users, ms.
pub const REPORT_MONTH_10K_USERS_MS: &str = "report_month_10k_users_ms";
/// The same month summed from the hourly records alone, ms (baseline).
pub const REPORT_MONTH_10K_USERS_HOURLY_MS: &str = "report_month_10k_users_hourly_ms";
/// Writing the month's rollups, seconds.
pub const REPORT_MONTH_10K_USERS_WRITE_S: &str = "report_month_10k_users_write_s";

/// This module's name for `--filter`.
pub const GROUP: &str = "report";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    REPORT_MONTH_10K_USERS_MS,
    REPORT_MONTH_10K_USERS_HOURLY_MS,
    REPORT_MONTH_10K_USERS_WRITE_S,
];

/// Users (one device each).
const USERS: usize = 10_000;
/// Hours of rollups: 30 days.
const HOURS: u64 = 30 * 24;
/// Report runs (the median is reported).
const RUNS: usize = 3;

/// Runs the module (see the module docs) if the selection wants any of its figures.
pub fn run(sel: &Selection) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| sel.wants_in(GROUP, n)) {
        return Ok(Vec::new());
    }
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path())?);
    let svc = Service::open(
        store.clone(),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig::for_tests("10.60.0.1/16", "fd60::1/64", "vpn.example.com:51820"),
    )?;
    progress!("report: adding {USERS} users");
    let root = Actor::Local { uid: 0 };
    let mut devices = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let (_, cfg) = svc.users.add_user(
            &root,
            NewUser {
                name: UserName::parse("name", &format!("user{i:05}"))?,
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )?;
        devices.push(DeviceSample {
            id: cfg.peer.id,
            key: cfg.peer.public_key,
            user: cfg.peer.user.to_string(),
            device: cfg.peer.device.to_string(),
            counters: Counters::default(),
            online: true,
        });
    }
    let now = unix_ms(SystemTime::now());
    let start = (hour_of(now) - HOURS) * HOUR_MS;
    progress!(
        "report: writing {HOURS} hours of rollups for {USERS} devices ({} hourly records)",
        HOURS * USERS as u64
    );
    let t = Instant::now();
    let mut w = UsageWriter::open(store.clone(), start)?;
    for h in 0..=HOURS {
        for (i, d) in devices.iter_mut().enumerate() {
            let c = &mut d.counters;
            let k = (i as u64 % 97 + 1) * (h % 13 + 1);
            c.rx_bytes += k * 10_007;
            c.rx_packets += k * 9;
            c.tx_bytes += k * 40_031;
            c.tx_packets += k * 31;
            c.drops[(i + h as usize) % 4] += k % 3;
        }
        w.sample(start + h * HOUR_MS, &devices)?;
        if h % 120 == 0 {
            progress!("report: hour {h} of {HOURS}");
        }
    }
    let write_s = t.elapsed().as_secs_f64();
    progress!("report: wrote the month in {write_s:.1} s");

    let q = ReportQuery::parse("month", "", "", "")?;
    let mut runs = Vec::new();
    let mut size = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let r = svc.usage.report(&q, now)?;
        let doc = render(&r, Format::Json);
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            r.users.len() == USERS,
            "{} users in the report",
            r.users.len()
        );
        anyhow::ensure!(r.totals.rx_bytes > 0, "no usage in the report");
        size = doc.len();
    }
    let report_ms = median(&runs);
    let (first, last, _) = q.hours(now);
    let t = Instant::now();
    let sums = svc.usage.sums(first, last, true, &|_| true)?;
    let hourly_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        sums.users.len() == USERS,
        "hourly sums: {} users",
        sums.users.len()
    );
    progress!(
        "report: month over {USERS} users {report_ms:.0} ms (runs {runs:.0?}, {size} bytes of \
         JSON); from the hourly records alone {hourly_ms:.0} ms"
    );
    Ok([
        (REPORT_MONTH_10K_USERS_MS, report_ms, "ms"),
        (REPORT_MONTH_10K_USERS_HOURLY_MS, hourly_ms, "ms"),
        (REPORT_MONTH_10K_USERS_WRITE_S, write_s, "s"),
    ]
    .into_iter()
    .filter(|(n, _, _)| sel.wants_in(GROUP, n))
    .map(|(name, value, unit)| Figure { name, value, unit })
    .collect())
}
