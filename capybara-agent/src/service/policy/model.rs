//! The validated values of a policy, parsed once at the edge (CLI, API, policy files) and
//! stored in their text form (so records and exports read like the CLI input).
//!
//! | type | text | meaning |
//! |---|---|---|
//! | [`ByteSize`] | `100GB`, `1.5TB`, `500MiB`, `1024` | bytes; SI units (`k`,`M`,`G`,`T` = 10³…10¹²) and binary (`KiB`…`TiB`); the `B` is optional, case-insensitive |
//! | [`Percent`] | `5%`, `5` | 0–100 % |
//! | [`Period`] | `daily`, `weekly`, `monthly`, `none` | when the quota starts over (weeks start on Monday) |
//! | [`TimeWindow`] | `Mon-Fri 08:00-18:00`, `Sat,Sun 10:00-14:00`, `daily 22:00-06:00` | allowed hours; an end before the start runs past midnight into the next day |
//! | [`OnlineTime`] | `8h`, `90m`, `1h30m` | online time per day, at most 24 h |
//! | [`Zone`] | `Europe/Berlin`, `UTC` | an IANA time zone |
//! | [`Count`] | `3` | devices online at once, 1 to 1 000 000 |
//! | [`FlowCount`] | `200` | concurrent flows per device, 1 to 65 536 (a quarter of the flow table all peers share) |
//! | [`Cap`] | a value or `unlimited` | a limit, or explicitly none (beats a lower layer's limit) |

use std::{fmt, str::FromStr, time::Duration};

use capybara_common::flow::MAX_FLOWS_PER_PEER;
use chrono::{Datelike, NaiveDateTime, Timelike, Weekday};
use serde::{Deserialize, Serialize};

pub use crate::service::domain::PolicyValueError;
use crate::{
    service::domain::{UserName, ValidationError},
    units::Rate,
};

/// Parses `s` as a `T`, naming `field` on error.
pub fn parse_field<T>(field: &'static str, s: &str) -> Result<T, ValidationError>
where
    T: FromStr<Err = PolicyValueError>,
{
    s.trim()
        .parse()
        .map_err(|source| ValidationError::Policy { field, source })
}

macro_rules! text_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<ByteSize, PolicyValueError> {
        let bad = || PolicyValueError::ByteSize {
            input: input.to_owned(),
        };
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let scale: u64 = match unit.as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() || frac.len() > 9 {
            return Err(bad());
        }
        let int: u64 = int.parse().map_err(|_| bad())?;
        let frac_scaled = if frac.is_empty() {
            0
        } else {
            let digits: u64 = frac.parse().map_err(|_| bad())?;
            digits.saturating_mul(scale) / 10u64.pow(frac.len() as u32)
        };
        let bytes = int
            .checked_mul(scale)
            .and_then(|b| b.checked_add(frac_scaled))
            .ok_or_else(bad)?;
        if bytes == 0 {
            return Err(bad());
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, unit) in [
            (1_000_000_000_000, "TB"),
            (1_000_000_000, "GB"),
            (1_000_000, "MB"),
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1_000, "kB"),
            (1 << 10, "KiB"),
        ] {
            if self.0 >= div && self.0.is_multiple_of(div) {
                return write!(f, "{}{unit}", self.0 / div);
            }
        }
        write!(f, "{}B", self.0)
    }
}
text_serde!(ByteSize);

/// A percentage, 0–100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent(pub u32);

impl FromStr for Percent {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<Percent, PolicyValueError> {
        let s = input.trim();
        let s = s.strip_suffix('%').unwrap_or(s);
        match s.parse::<u32>() {
            Ok(p) if p <= 100 => Ok(Percent(p)),
            _ => Err(PolicyValueError::Percent {
                input: input.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}
text_serde!(Percent);

/// When a quota starts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Period {
    /// At midnight.
    Daily,
    /// At Monday midnight.
    Weekly,
    /// At midnight of the first day of the month.
    #[default]
    Monthly,
    /// Never: the budget lasts until reset by hand.
    None,
}

impl FromStr for Period {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<Period, PolicyValueError> {
        Ok(match input.trim().to_ascii_lowercase().as_str() {
            "daily" => Period::Daily,
            "weekly" => Period::Weekly,
            "monthly" => Period::Monthly,
            "none" => Period::None,
            _ => {
                return Err(PolicyValueError::Period {
                    input: input.to_owned(),
                });
            }
        })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::None => "none",
        })
    }
}
text_serde!(Period);

/// An IANA time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Zone(pub chrono_tz::Tz);

impl Default for Zone {
    fn default() -> Zone {
        Zone(chrono_tz::UTC)
    }
}

impl FromStr for Zone {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<Zone, PolicyValueError> {
        input
            .trim()
            .parse::<chrono_tz::Tz>()
            .map(Zone)
            .map_err(|_| PolicyValueError::Zone {
                input: input.to_owned(),
            })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}
text_serde!(Zone);

/// Online time allowed per day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OnlineTime(pub Duration);

impl FromStr for OnlineTime {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<OnlineTime, PolicyValueError> {
        let bad = || PolicyValueError::OnlineTime {
            input: input.to_owned(),
        };
        let mut rest = input.trim();
        let mut secs = 0u64;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let at = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if at == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..at].parse().map_err(|_| bad())?;
            let unit = rest[at..].chars().next().ok_or_else(bad)?;
            let mult = match unit {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            secs = n
                .checked_mul(mult)
                .and_then(|s| secs.checked_add(s))
                .ok_or_else(bad)?;
            rest = &rest[at + 1..];
        }
        if secs == 0 || secs > 86_400 {
            return Err(bad());
        }
        Ok(OnlineTime(Duration::from_secs(secs)))
    }
}

impl fmt::Display for OnlineTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if sec > 0 || s == 0 {
            write!(f, "{sec}s")?;
        }
        Ok(())
    }
}
text_serde!(OnlineTime);

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Mon),
    ("tue", Weekday::Tue),
    ("wed", Weekday::Wed),
    ("thu", Weekday::Thu),
    ("fri", Weekday::Fri),
    ("sat", Weekday::Sat),
    ("sun", Weekday::Sun),
];

/// Allowed hours: on `days` (bit 0 = Monday … bit 6 = Sunday), from `start` to `end` minutes
/// after midnight, local time. `end <= start` runs past midnight: the window that starts on an
/// allowed day ends the next morning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimeWindow {
    /// Allowed start days, bit 0 = Monday.
    pub days: u8,
    /// Minutes after midnight the window opens.
    pub start: u16,
    /// Minutes after midnight it closes.
    pub end: u16,
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    // 24:00 is allowed as an end of day.
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

fn day_index(s: &str) -> Option<u8> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let s = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .zip(FULL)
        .position(|((short, _), full)| s == *short || s == full)
        .map(|i| i as u8)
}

impl FromStr for TimeWindow {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<TimeWindow, PolicyValueError> {
        let bad = |reason| PolicyValueError::Window {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        let (days_s, hours) = match s.rsplit_once(' ') {
            Some((d, h)) => (d.trim(), h),
            None => ("daily", s),
        };
        let mut days = 0u8;
        for part in days_s.split(',') {
            let part = part.trim();
            match part.to_ascii_lowercase().as_str() {
                "daily" | "every day" | "*" => days |= 0x7f,
                "weekdays" => days |= 0x1f,
                "weekends" => days |= 0x60,
                _ => {
                    let (a, b) = part.split_once('-').unwrap_or((part, part));
                    let a = day_index(a).ok_or_else(|| bad("unknown day"))?;
                    let b = day_index(b).ok_or_else(|| bad("unknown day"))?;
                    let mut d = a;
                    loop {
                        days |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
            }
        }
        let (a, b) = hours.split_once('-').ok_or_else(|| bad("no HH:MM-HH:MM"))?;
        let start = parse_hhmm(a).ok_or_else(|| bad("hours must be 00:00 to 24:00"))?;
        let end = parse_hhmm(b).ok_or_else(|| bad("hours must be 00:00 to 24:00"))?;
        if start == 24 * 60 {
            return Err(bad("a window cannot open at 24:00"));
        }
        if start == end {
            return Err(bad("an empty window (start = end)"));
        }
        Ok(TimeWindow { days, start, end })
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        if self.days == 0x7f {
            f.write_str("daily")?;
        } else {
            // Runs of consecutive days, Monday first.
            let mut parts = Vec::new();
            let mut i = 0;
            while i < 7 {
                if self.days & (1 << i) != 0 {
                    let start = i;
                    while i + 1 < 7 && self.days & (1 << (i + 1)) != 0 {
                        i += 1;
                    }
                    parts.push(if start == i {
                        names[start].to_owned()
                    } else {
                        format!("{}-{}", names[start], names[i])
                    });
                }
                i += 1;
            }
            f.write_str(&parts.join(","))?;
        }
        write!(
            f,
            " {:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}
text_serde!(TimeWindow);

impl TimeWindow {
    /// Minutes the window is open per week (for "most permissive" comparisons).
    pub fn weekly_minutes(&self) -> u32 {
        let len = if self.end > self.start {
            u32::from(self.end - self.start)
        } else {
            u32::from(24 * 60 - self.start + self.end)
        };
        self.days.count_ones() * len
    }

    fn day_allowed(&self, wd: Weekday) -> bool {
        self.days & (1 << wd.num_days_from_monday()) != 0
    }

    /// Whether local time `t` is inside the window.
    pub fn contains(&self, t: NaiveDateTime) -> bool {
        let m = (t.hour() * 60 + t.minute()) as u16;
        if self.end > self.start {
            self.day_allowed(t.weekday()) && m >= self.start && m < self.end
        } else {
            // Past midnight: today's evening part, or yesterday's window running into today.
            (self.day_allowed(t.weekday()) && m >= self.start)
                || (self.day_allowed(t.weekday().pred()) && m < self.end)
        }
    }
}

/// A limit, or explicitly none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cap<T> {
    /// No limit (beats a lower layer's limit).
    Unlimited,
    /// This limit.
    Limit(T),
}

impl<T: Copy> Cap<T> {
    /// The limit, if any.
    pub fn limit(self) -> Option<T> {
        match self {
            Cap::Unlimited => None,
            Cap::Limit(t) => Some(t),
        }
    }
}

impl<T: FromStr<Err = PolicyValueError>> FromStr for Cap<T> {
    type Err = PolicyValueError;
    fn from_str(s: &str) -> Result<Cap<T>, PolicyValueError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unlimited" | "none" => Ok(Cap::Unlimited),
            _ => s.parse().map(Cap::Limit),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Cap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cap::Unlimited => f.write_str("unlimited"),
            Cap::Limit(t) => t.fmt(f),
        }
    }
}

impl<T: fmt::Display> Serialize for Cap<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, T: FromStr<Err = PolicyValueError>> Deserialize<'de> for Cap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cap<T>, D::Error> {
        /// Counts come as YAML/JSON numbers, the rest as strings.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A rate for policies: [`Rate`] with the policy parse error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bandwidth(pub Rate);

impl FromStr for Bandwidth {
    type Err = PolicyValueError;
    fn from_str(s: &str) -> Result<Bandwidth, PolicyValueError> {
        Ok(Bandwidth(s.parse()?))
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
text_serde!(Bandwidth);

/// A count of devices (`connections`): 1..=`MAX_COUNT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Count(pub u32);

/// The largest count of devices accepted.
pub const MAX_COUNT: u32 = 1_000_000;

/// A whole number in `1..=max`.
fn count_in(input: &str, max: u32) -> Result<u32, PolicyValueError> {
    match input.trim().parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(PolicyValueError::Count {
            input: input.to_owned(),
            max,
        }),
    }
}

impl FromStr for Count {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<Count, PolicyValueError> {
        count_in(input, MAX_COUNT).map(Count)
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
text_serde!(Count);

/// Concurrent flows per device (`flows`): 1..=[`MAX_FLOWS_PER_PEER`] (65 536, a quarter of the
/// flow table all peers share, so one peer cannot fill it: `capybara_common::flow`, "One table
/// for all peers").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowCount(pub u32);

impl FromStr for FlowCount {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<FlowCount, PolicyValueError> {
        count_in(input, MAX_FLOWS_PER_PEER).map(FlowCount)
    }
}

impl fmt::Display for FlowCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
text_serde!(FlowCount);

/// One layer of a policy (a user's overrides, a group's, a template's, the server default):
/// every field optional — unset means "no opinion, ask the next layer".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Rate each way, per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Cap<Bandwidth>>,
    /// Data budget per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Cap<ByteSize>>,
    /// When the budget starts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// Extra bytes over the budget before traffic stops, as a share of the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<Percent>,
    /// Devices online at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Cap<Count>>,
    /// Concurrent flows per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Cap<FlowCount>>,
    /// Online time per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Cap<OnlineTime>>,
    /// Allowed hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Cap<TimeWindow>>,
    /// The zone of `window`, `time` and `period`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<Zone>,
}

/// The fields of [`Limits`], by name (for `--clear` and `explain`).
pub const FIELDS: [&str; 9] = [
    "bandwidth",
    "limit",
    "period",
    "grace",
    "connections",
    "flows",
    "time",
    "window",
    "tz",
];

/// Raw text of a [`Limits`] change, as the CLI and the API carry it: `None` = not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsText {
    /// `--bandwidth`.
    pub bandwidth: Option<String>,
    /// `--limit`.
    pub limit: Option<String>,
    /// `--period`.
    pub period: Option<String>,
    /// `--grace`.
    pub grace: Option<String>,
    /// `--connections`.
    pub connections: Option<String>,
    /// `--flows`.
    pub flows: Option<String>,
    /// `--time`.
    pub time: Option<String>,
    /// `--window`.
    pub window: Option<String>,
    /// `--tz`.
    pub tz: Option<String>,
    /// Fields to unset (inherit again).
    pub clear: Vec<String>,
}

/// A validated change to a layer: the fields to set and those to unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsPatch {
    /// Fields to set (the `None`s are left as they are).
    pub set: Limits,
    /// Fields to unset, by name (members of [`FIELDS`]).
    pub clear: Vec<&'static str>,
}

impl LimitsText {
    /// Validates every field; the first bad one is named in the error.
    pub fn parse(&self) -> Result<LimitsPatch, ValidationError> {
        fn opt<T: FromStr<Err = PolicyValueError>>(
            field: &'static str,
            v: &Option<String>,
        ) -> Result<Option<T>, ValidationError> {
            v.as_deref().map(|s| parse_field(field, s)).transpose()
        }
        let set = Limits {
            bandwidth: opt("bandwidth", &self.bandwidth)?,
            limit: opt("limit", &self.limit)?,
            period: opt("period", &self.period)?,
            grace: opt("grace", &self.grace)?,
            connections: opt("connections", &self.connections)?,
            flows: opt("flows", &self.flows)?,
            time: opt("time", &self.time)?,
            window: opt("window", &self.window)?,
            tz: opt("tz", &self.tz)?,
        };
        let mut clear = Vec::new();
        for c in &self.clear {
            let f = FIELDS
                .iter()
                .find(|f| **f == c.trim())
                .ok_or_else(|| ValidationError::Name {
                    field: "clear",
                    value: c.clone(),
                    reason: "not a policy field (bandwidth, limit, period, grace, connections, flows, time, window, tz)",
                })?;
            clear.push(*f);
        }
        Ok(LimitsPatch { set, clear })
    }
}

impl Limits {
    /// Applies `patch`: given fields replace, cleared fields are unset.
    pub fn patched(&self, patch: &LimitsPatch) -> Limits {
        let mut l = self.clone();
        for f in &patch.clear {
            match *f {
                "bandwidth" => l.bandwidth = None,
                "limit" => l.limit = None,
                "period" => l.period = None,
                "grace" => l.grace = None,
                "connections" => l.connections = None,
                "flows" => l.flows = None,
                "time" => l.time = None,
                "window" => l.window = None,
                _ => l.tz = None,
            }
        }
        let s = &patch.set;
        macro_rules! take {
            ($($f:ident),*) => { $( if s.$f.is_some() { l.$f = s.$f; } )* };
        }
        take!(
            bandwidth,
            limit,
            period,
            grace,
            connections,
            flows,
            time,
            window,
            tz
        );
        l
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The set fields on one line, `field=value` separated by spaces, as written in policy
    /// files; `None` when no field is set.
    pub fn summary(&self) -> Option<String> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let parts: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

/// A name type with the rules of a user name (`[a-z0-9._-]`, at most 32): groups and templates.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses `s`, given in `field`.
            pub fn parse(field: &'static str, s: &str) -> Result<$name, ValidationError> {
                UserName::parse(field, s).map(|u| $name(u.as_str().to_owned()))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<$name, ValidationError> {
                $name::parse($field, &s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}
pub(in crate::service) use name_type;

name_type!(
    /// A group's name: the same rules as a user name.
    GroupName,
    "group"
);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn sizes_parse_with_si_and_binary_units() {
        for (s, b) in [
            ("100GB", 100_000_000_000),
            ("1.5TB", 1_500_000_000_000),
            ("500MiB", 500 << 20),
            ("2tb", 2_000_000_000_000),
            ("1024", 1024),
            ("10 kB", 10_000),
        ] {
            assert_eq!(s.parse::<ByteSize>().map(|b| b.0), Ok(b), "{s}");
        }
        for s in ["", "GB", "10XB", "-1GB", "0", "1.2.3GB", "99999999999TB"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s:?}");
        }
        assert_eq!(ByteSize(100_000_000_000).to_string(), "100GB");
        assert_eq!(ByteSize(500 << 20).to_string(), "500MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
    }

    #[test]
    fn windows_parse_display_and_contain() {
        let w: TimeWindow = "Mon-Fri 08:00-18:00".parse().unwrap();
        assert_eq!(w.days, 0x1f);
        assert_eq!((w.start, w.end), (480, 1080));
        assert_eq!(w.to_string(), "Mon-Fri 08:00-18:00");
        assert_eq!(w.weekly_minutes(), 5 * 600);
        // 2026-11-27 is a Friday.
        let fri = |h, m| {
            NaiveDate::from_ymd_opt(2026, 11, 27)
                .unwrap()
                .and_hms_opt(h, m, 0)
                .unwrap()
        };
        assert!(w.contains(fri(8, 0)));
        assert!(w.contains(fri(17, 59)));
        assert!(!w.contains(fri(18, 0)));
        assert!(!w.contains(fri(7, 59)));
        let sat = fri(12, 0) + chrono::Duration::days(1);
        assert!(!w.contains(sat));
        // Past midnight: Friday night's window reaches into Saturday morning.
        let night: TimeWindow = "Fri 22:00-06:00".parse().unwrap();
        assert!(night.contains(fri(23, 0)));
        assert!(night.contains(fri(5, 0) + chrono::Duration::days(1)));
        assert!(!night.contains(fri(5, 0)), "Thursday night is not allowed");
        let w2: TimeWindow = "sat,sun 10:00-14:00".parse().unwrap();
        assert_eq!(w2.to_string(), "Sat-Sun 10:00-14:00");
        assert_eq!(
            "08:00-18:00".parse::<TimeWindow>().unwrap().to_string(),
            "daily 08:00-18:00"
        );
        assert_eq!(
            "Fri-Mon 08:00-09:00".parse::<TimeWindow>().unwrap().days,
            0x71
        );
    }

    #[test]
    fn bad_windows_are_refused_with_a_reason() {
        for s in [
            "Mon-Fri 25:00-18:00",
            "Mon-Fri 08:60-18:00",
            "Mon-Fri 8-18",
            "Mox-Fri 08:00-18:00",
            "Mon-Fri 08:00-08:00",
            "Mon-Fri",
            "",
        ] {
            let e = s.parse::<TimeWindow>().unwrap_err();
            assert!(matches!(e, PolicyValueError::Window { .. }), "{s:?}: {e}");
        }
    }

    #[test]
    fn fields_are_named_in_errors_and_clear_is_checked() {
        let t = LimitsText {
            bandwidth: Some("10Mbsp".into()),
            ..LimitsText::default()
        };
        let e = t.parse().unwrap_err();
        assert_eq!(e.field(), "bandwidth");
        assert!(e.to_string().starts_with("bandwidth: "), "{e}");
        let t = LimitsText {
            window: Some("Mon-Fri 25:00-18:00".into()),
            ..LimitsText::default()
        };
        assert_eq!(t.parse().unwrap_err().field(), "window");
        let t = LimitsText {
            tz: Some("Mars/Olympus".into()),
            ..LimitsText::default()
        };
        assert_eq!(t.parse().unwrap_err().field(), "tz");
        let t = LimitsText {
            clear: vec!["speed".into()],
            ..LimitsText::default()
        };
        assert_eq!(t.parse().unwrap_err().field(), "clear");
        let p = LimitsText {
            bandwidth: Some("10Mbps".into()),
            connections: Some("unlimited".into()),
            time: Some("1h30m".into()),
            clear: vec!["flows".into()],
            ..LimitsText::default()
        }
        .parse()
        .unwrap();
        let base = Limits {
            flows: Some(Cap::Limit(FlowCount(5))),
            ..Limits::default()
        };
        let l = base.patched(&p);
        assert_eq!(l.flows, None);
        assert_eq!(l.connections, Some(Cap::Unlimited));
        assert_eq!(l.time.unwrap().to_string(), "1h30m");
        assert_eq!(l.bandwidth.unwrap().to_string(), "10mbit");
    }

    #[test]
    fn limits_round_trip_through_json_as_text() {
        let l = LimitsText {
            bandwidth: Some("10Mbps".into()),
            limit: Some("100GB".into()),
            period: Some("weekly".into()),
            grace: Some("5%".into()),
            connections: Some("3".into()),
            flows: Some("unlimited".into()),
            time: Some("8h".into()),
            window: Some("Mon-Fri 08:00-18:00".into()),
            tz: Some("Europe/Berlin".into()),
            clear: vec![],
        }
        .parse()
        .unwrap()
        .set;
        let j = serde_json::to_string(&l).unwrap();
        assert!(j.contains("\"window\":\"Mon-Fri 08:00-18:00\""), "{j}");
        assert_eq!(serde_json::from_str::<Limits>(&j).unwrap(), l);
        // Counts may come as numbers.
        let n: Limits = serde_json::from_str(r#"{"connections": 3}"#).unwrap();
        assert_eq!(n.connections, Some(Cap::Limit(Count(3))));
        assert!(serde_json::from_str::<Limits>(r#"{"speed": 3}"#).is_err());
    }

    /// Issue 19 item 7: one peer's flow limit could be up to 1 000 000, so one peer could fill
    /// the 262 144-entry flow table all peers share. The limit is capped at a quarter of it
    /// (65 536), from every input: CLI/API text, policy files and templates (serde).
    #[test]
    fn flows_are_capped_at_a_quarter_of_the_shared_flow_table() {
        let flows = |v: &str| {
            LimitsText {
                flows: Some(v.into()),
                ..LimitsText::default()
            }
            .parse()
        };
        let max = flows("65536").unwrap().set.flows.unwrap();
        assert_eq!(max.to_string(), "65536");
        for over in ["65537", "262144", "1000000"] {
            let e = flows(over).unwrap_err();
            assert_eq!(e.field(), "flows", "{e}");
            assert!(e.to_string().contains("65536"), "{e}");
        }
        assert!(serde_json::from_str::<Limits>(r#"{"flows": 65536}"#).is_ok());
        let e = serde_json::from_str::<Limits>(r#"{"flows": 65537}"#).unwrap_err();
        assert!(e.to_string().contains("65536"), "{e}");
        // Devices keep their own bound.
        let c = LimitsText {
            connections: Some("1000000".into()),
            ..LimitsText::default()
        };
        assert!(c.parse().is_ok());
    }
}
