//! The usage report: a period's rollups summed per user and per group, with the users' quota
//! standing (`capybara report generate`, the `Reports.GenerateReport` RPC).
//!
//! - **Period** ([`ReportQuery`]): `day`, `week` or `month` are the last 24 hours, 7 days or 30
//!   days up to now, by whole UTC hours (the current hour so far included: the report asks the
//!   writer to checkpoint first, so it is exact to the kernel's counters at the call);
//!   `from`/`to` are UTC dates (`YYYY-MM-DD`, both included; `to` defaults to today; at most
//!   [`MAX_DAYS`] days, the daily rollups' retention, so one call's work is bounded; hours
//!   still to come are not listed). Without either: `day`. Times are UTC.
//! - **Users**: every user there is (within `group` if given) and every user with usage in the
//!   period (a removed user keeps its name in the rollups), busiest first. A user's peak rate is
//!   the highest of its devices' 10-second peaks, not their sum at one moment.
//! - **Groups**: each group's members' sums (a user in two groups counts in both); with `group`
//!   that group alone.
//! - **Quota standing**: the policy's state now (used / limit of the user's current quota
//!   period, which need not be the report's period); `over_quota` lists the users at or over
//!   their budget.
//! - **Series** (usage over time): per hour for a period of at most two days, per day beyond.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::{HOUR_MS, Meta, Usage, UsageRecord, hour_of};
use crate::{
    service::{ServiceError, domain::ValidationError, policy::model::GroupName},
    store::{Cf, keys},
};

/// The longest report, in days (a `from`/`to` range): the daily rollups' retention.
pub const MAX_DAYS: u64 = super::DAILY_RETENTION_DAYS;

/// How many users `top_users` names.
pub const TOP_USERS: usize = 10;

/// A rolling period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// The last 24 hours.
    Day,
    /// The last 7 days.
    Week,
    /// The last 30 days.
    Month,
}

impl Period {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    fn days(self) -> u64 {
        match self {
            Period::Day => 1,
            Period::Week => 7,
            Period::Month => 30,
        }
    }
}

/// What a report document is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Plain text for people.
    Text,
    /// The report as JSON.
    Json,
    /// One row per user, group and the total.
    Csv,
    /// One self-contained html file with charts.
    Html,
}

impl Format {
    /// Parses `text`, `json`, `csv` or `html` (empty: text), given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Format, ValidationError> {
        match s {
            "" | "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "html" => Ok(Format::Html),
            _ => Err(ValidationError::Value {
                field,
                reason: format!("unknown format {s:?} (expected text, json, csv or html)"),
            }),
        }
    }

    /// The media type of its documents.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; charset=utf-8",
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

/// Which report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportQuery {
    /// A rolling period (none with `from`).
    pub period: Option<Period>,
    /// The first UTC day (days since 1970-01-01).
    pub from: Option<u64>,
    /// The last UTC day, included.
    pub to: Option<u64>,
    /// Only this group's members.
    pub group: Option<GroupName>,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day since 1970-01-01.
pub fn civil_date(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses a UTC date `YYYY-MM-DD` (1970 to 9999) given in `field` into days since 1970-01-01.
pub fn parse_date(field: &'static str, s: &str) -> Result<u64, ValidationError> {
    let bad = || ValidationError::Value {
        field,
        reason: format!("{s:?} is not a date YYYY-MM-DD (UTC, e.g. 2026-12-01)"),
    };
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, ValidationError> {
        let part = &s[r];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if y < 1970 || d == 0 || d > month_days {
        return Err(bad());
    }
    Ok(days_from_civil(i64::from(y), m, d) as u64)
}

impl ReportQuery {
    /// A query from the API's fields (strings; empty = not given): each checked, the error
    /// naming it.
    pub fn parse(
        period: &str,
        from: &str,
        to: &str,
        group: &str,
    ) -> Result<ReportQuery, ValidationError> {
        let period = match period {
            "" => None,
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            other => {
                return Err(ValidationError::Value {
                    field: "period",
                    reason: format!("unknown period {other:?} (expected day, week or month)"),
                });
            }
        };
        let from = (!from.is_empty())
            .then(|| parse_date("from", from))
            .transpose()?;
        let to = (!to.is_empty()).then(|| parse_date("to", to)).transpose()?;
        if period.is_some() && (from.is_some() || to.is_some()) {
            return Err(ValidationError::Value {
                field: "period",
                reason: "give either a period or from/to, not both".into(),
            });
        }
        if to.is_some() && from.is_none() {
            return Err(ValidationError::Missing { field: "from" });
        }
        if let (Some(f), Some(t)) = (from, to)
            && t < f
        {
            return Err(ValidationError::Value {
                field: "to",
                reason: format!("{} is before from {}", civil_date(t), civil_date(f)),
            });
        }
        if let Some(f) = from {
            let t = to.unwrap_or(f);
            if t - f >= MAX_DAYS {
                return Err(ValidationError::Value {
                    field: "from",
                    reason: format!(
                        "a report covers at most {MAX_DAYS} days (the daily rollups' retention); {} to {} is {} days",
                        civil_date(f),
                        civil_date(t),
                        t - f + 1
                    ),
                });
            }
        }
        let group = (!group.is_empty())
            .then(|| GroupName::parse("group", group))
            .transpose()?;
        Ok(ReportQuery {
            period,
            from,
            to,
            group,
        })
    }

    /// The hours covered, first and last included, at `now` (Unix ms), the last no later than
    /// the current hour (a range wholly in the future covers nothing: `last < first`); and the
    /// period's name.
    pub fn hours(&self, now: u64) -> (u64, u64, String) {
        let current = hour_of(now);
        match (self.period, self.from) {
            (_, Some(from)) => {
                let to = self.to.unwrap_or(current / 24);
                let first = from * 24;
                let last = (to * 24 + 23).min(current).max(first.saturating_sub(1));
                (first, last, "range".into())
            }
            (p, None) => {
                let p = p.unwrap_or(Period::Day);
                (
                    (current + 1).saturating_sub(24 * p.days()),
                    current,
                    p.as_str().into(),
                )
            }
        }
    }
}

/// Sums over a period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Bytes from the devices.
    pub rx_bytes: u64,
    /// Packets from the devices.
    pub rx_packets: u64,
    /// Bytes to the devices.
    pub tx_bytes: u64,
    /// Packets to the devices.
    pub tx_packets: u64,
    /// Sessions started.
    pub sessions: u64,
    /// Time online, seconds (devices summed).
    pub online_seconds: u64,
    /// Highest rate from a device over one sample interval, bytes per second.
    pub peak_rx_bytes_per_second: u64,
    /// Highest rate to a device over one sample interval, bytes per second.
    pub peak_tx_bytes_per_second: u64,
    /// Dropped packets by reason, non-zero only.
    pub drops: BTreeMap<String, u64>,
}

impl From<&UsageRecord> for UsageTotals {
    fn from(r: &UsageRecord) -> UsageTotals {
        UsageTotals {
            rx_bytes: r.rx_bytes,
            rx_packets: r.rx_packets,
            tx_bytes: r.tx_bytes,
            tx_packets: r.tx_packets,
            sessions: r.sessions,
            online_seconds: r.online_ms / 1000,
            peak_rx_bytes_per_second: r.peak_rx,
            peak_tx_bytes_per_second: r.peak_tx,
            drops: r.drops_by_name(),
        }
    }
}

impl UsageTotals {
    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.rx_bytes.saturating_add(self.tx_bytes)
    }
}

/// A user's standing against its data quota now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaStanding {
    /// Used in the current quota period.
    pub used_bytes: u64,
    /// The budget per period (0: none).
    pub limit_bytes: u64,
    /// `used / limit` in percent (0 without a budget).
    pub percent: f64,
    /// At or over the budget.
    pub over: bool,
    /// The quota period (`daily`, `monthly`, `none`, …).
    pub period: String,
}

/// One user's line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserUsage {
    /// The user.
    pub user: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Its usage in the period.
    pub usage: UsageTotals,
    /// Its quota standing (none for a user that no longer exists).
    pub quota: Option<QuotaStanding>,
}

/// One group's line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupUsage {
    /// The group.
    pub group: String,
    /// Its members now.
    pub members: u64,
    /// Its members' usage summed.
    pub usage: UsageTotals,
}

/// One bucket of the usage over time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsagePoint {
    /// Its start, Unix seconds.
    pub start: u64,
    /// Bytes from the devices.
    pub rx_bytes: u64,
    /// Bytes to the devices.
    pub tx_bytes: u64,
}

/// A usage report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `day`, `week`, `month` or `range`.
    pub period: String,
    /// Its start, Unix seconds (UTC hour).
    pub from: u64,
    /// Its end, Unix seconds, excluded.
    pub to: u64,
    /// When it was made, Unix seconds.
    pub generated_at: u64,
    /// The group it is limited to.
    pub group: Option<String>,
    /// `hour` or `day`: the series' buckets.
    pub resolution: String,
    /// Every user in it, summed.
    pub totals: UsageTotals,
    /// Users, busiest first (then by name).
    pub users: Vec<UserUsage>,
    /// Groups by name.
    pub groups: Vec<GroupUsage>,
    /// The [`TOP_USERS`] busiest users with any traffic.
    pub top_users: Vec<String>,
    /// Users at or over their data quota.
    pub over_quota: Vec<String>,
    /// Usage over time, oldest first, one point per bucket (empty buckets included).
    pub series: Vec<UsagePoint>,
}

/// Splits `<prefix><n>/<user>/<device>` into its number and user.
fn key_parts<'a>(key: &'a str, prefix: &str) -> Option<(u64, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('/')?;
    let (user, _device) = rest.split_once('/')?;
    Some((n.parse().ok()?, user))
}

/// Adds `rec` to `acc` (peaks as the higher).
fn add_to(acc: &mut HashMap<String, UsageRecord>, user: &str, rec: &UsageRecord) {
    match acc.get_mut(user) {
        Some(a) => a.add(rec),
        None => {
            acc.insert(user.to_owned(), *rec);
        }
    }
}

/// The summed usage of a period: per user, and per bucket of the series.
#[derive(Debug, Default)]
pub struct Sums {
    /// Per user.
    pub users: HashMap<String, UsageRecord>,
    /// Per bucket start (Unix seconds): bytes each way.
    pub series: BTreeMap<u64, (u64, u64)>,
}

impl Usage {
    /// Reads and sums the rollups of hours `first..=last` (whole completed days from the daily
    /// records, unless `hourly` series are wanted), for users `keep` accepts.
    pub fn sums(
        &self,
        first: u64,
        last: u64,
        hourly: bool,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Sums, ServiceError> {
        let store = self.store();
        let meta: Meta = store
            .get_raw(Cf::Usage, keys::USAGE_META)?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut sums = Sums::default();
        if first > last {
            return Ok(sums);
        }
        let bucket = |hour: u64| {
            if hourly {
                hour * 3600
            } else {
                hour / 24 * 86_400
            }
        };
        for day in first / 24..=last / 24 {
            let (d0, d1) = (day * 24, day * 24 + 23);
            let whole = d0 >= first && d1 <= last && meta.completed.is_some_and(|c| c >= d1);
            if whole && !hourly {
                let prefix = keys::usage_day_prefix(day);
                store.walk_raw(Cf::Usage, &prefix, |k, v| {
                    if !k.starts_with(prefix.as_str()) {
                        return false;
                    }
                    if let (Some((_, user)), Some(rec)) =
                        (key_parts(k, keys::USAGE_DAYS), UsageRecord::decode(v))
                        && keep(user)
                    {
                        add_to(&mut sums.users, user, &rec);
                        let b = sums.series.entry(day * 86_400).or_default();
                        b.0 += rec.rx_bytes;
                        b.1 += rec.tx_bytes;
                    }
                    true
                })?;
                continue;
            }
            let (h0, h1) = (d0.max(first), d1.min(last));
            let end = keys::usage_hour_prefix(h1 + 1);
            store.walk_raw(Cf::Usage, &keys::usage_hour_prefix(h0), |k, v| {
                if k >= end.as_str() || !k.starts_with(keys::USAGE_HOURS) {
                    return false;
                }
                if let (Some((hour, user)), Some(rec)) =
                    (key_parts(k, keys::USAGE_HOURS), UsageRecord::decode(v))
                    && keep(user)
                {
                    add_to(&mut sums.users, user, &rec);
                    let b = sums.series.entry(bucket(hour)).or_default();
                    b.0 += rec.rx_bytes;
                    b.1 += rec.tx_bytes;
                }
                true
            })?;
        }
        Ok(sums)
    }

    /// The report `q` asks for at `now` (Unix ms): asks the writer to checkpoint first (see
    /// the module docs), then reads. An unknown group is `NotFound`.
    pub fn report(&self, q: &ReportQuery, now: u64) -> Result<Report, ServiceError> {
        let group = q
            .group
            .as_ref()
            .map(|g| self.policy().get_group(g))
            .transpose()?;
        self.flush();
        let (first, last, period) = q.hours(now);
        let hourly = (last + 1).saturating_sub(first) <= 48;
        let members: Option<BTreeSet<String>> = group
            .as_ref()
            .map(|g| g.members.iter().map(|m| m.to_string()).collect());
        let keep = |u: &str| members.as_ref().is_none_or(|m| m.contains(u));
        let sums = self.sums(first, last, hourly, &keep)?;

        let groups_all = self.policy().list_groups();
        let mut groups_of: HashMap<String, Vec<String>> = HashMap::new();
        for g in &groups_all {
            for m in &g.members {
                groups_of
                    .entry(m.to_string())
                    .or_default()
                    .push(g.name.to_string());
            }
        }
        let mut quota: HashMap<String, QuotaStanding> = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self
                .policy()
                .show_quota_page(after.as_deref(), 1000, false)?;
            for st in page {
                if !keep(&st.user) {
                    continue;
                }
                let percent = if st.limit_bytes == 0 {
                    0.0
                } else {
                    st.used_bytes as f64 * 100.0 / st.limit_bytes as f64
                };
                quota.insert(
                    st.user.clone(),
                    QuotaStanding {
                        used_bytes: st.used_bytes,
                        limit_bytes: st.limit_bytes,
                        percent,
                        over: st.exceeding,
                        period: st.period,
                    },
                );
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let mut names: BTreeSet<String> = sums.users.keys().cloned().collect();
        names.extend(quota.keys().cloned());
        let empty = UsageRecord::default();
        let mut total = UsageRecord::default();
        let mut users: Vec<UserUsage> = names
            .into_iter()
            .map(|u| {
                let rec = sums.users.get(&u).unwrap_or(&empty);
                total.add(rec);
                UserUsage {
                    groups: groups_of.get(&u).cloned().unwrap_or_default(),
                    usage: rec.into(),
                    quota: quota.remove(&u),
                    user: u,
                }
            })
            .collect();
        users.sort_by(|a, b| {
            b.usage
                .bytes()
                .cmp(&a.usage.bytes())
                .then_with(|| a.user.cmp(&b.user))
        });
        let top_users = users
            .iter()
            .filter(|u| u.usage.bytes() > 0)
            .take(TOP_USERS)
            .map(|u| u.user.clone())
            .collect();
        let over_quota = users
            .iter()
            .filter(|u| u.quota.as_ref().is_some_and(|q| q.over))
            .map(|u| u.user.clone())
            .collect();
        let groups = groups_all
            .iter()
            .filter(|g| group.as_ref().is_none_or(|only| only.name == g.name))
            .map(|g| {
                let mut sum = UsageRecord::default();
                for m in &g.members {
                    if let Some(r) = sums.users.get(m.as_str()) {
                        sum.add(r);
                    }
                }
                GroupUsage {
                    group: g.name.to_string(),
                    members: g.members.len() as u64,
                    usage: (&sum).into(),
                }
            })
            .collect();
        let step = if hourly { 3600 } else { 86_400 };
        let mut series = Vec::new();
        let (s0, s1) = if hourly {
            (first * 3600, last * 3600)
        } else {
            (first / 24 * 86_400, last / 24 * 86_400)
        };
        let mut t = s0;
        while t <= s1 {
            let (rx, tx) = sums.series.get(&t).copied().unwrap_or_default();
            series.push(UsagePoint {
                start: t,
                rx_bytes: rx,
                tx_bytes: tx,
            });
            t += step;
        }
        Ok(Report {
            period,
            from: first * 3600,
            to: (last + 1) * 3600,
            generated_at: now / 1000,
            group: q.group.as_ref().map(|g| g.to_string()),
            resolution: if hourly { "hour" } else { "day" }.into(),
            totals: (&total).into(),
            users,
            groups,
            top_users,
            over_quota,
            series,
        })
    }
}

/// The hour of Unix ms `now`'s start, in ms (for tests and the bench).
pub fn hour_start_ms(now: u64) -> u64 {
    now / HOUR_MS * HOUR_MS
}
