//! The effective policy of a user, computed in one place from its layers, each field with the
//! layer it came from.
//!
//! ## Layers, highest first
//! 1. **user**: the user's own overrides (`capybara quota set alice …`);
//! 2. **group**: the policies of the groups the user is in;
//! 3. **template**: the quota template applied to the user (`quota template apply NAME USER`);
//! 4. **default**: the server default (`capybara quota set --default …`);
//! 5. **builtin**: nothing configured anywhere — unlimited, monthly period, no grace, UTC.
//!
//! The first layer that sets a field decides it; `unlimited` is a setting too (a user override
//! `--bandwidth unlimited` beats a group's 10 Mbit/s).
//!
//! ## Several groups: the most permissive wins
//! A user in several groups gets, for each *limit* field (`bandwidth`, `limit`, `connections`,
//! `flows`, `time`, `window`), the most permissive value among the groups that set it:
//! `unlimited` beats any value, otherwise the larger rate, budget, count or daily time, and the
//! window open the most minutes per week. Ties go to the group first by name. The *settings*
//! (`period`, `grace`, `tz`) are taken from the first group by name that sets them. Why most
//! permissive: group membership grants (a user added to `remote-worker` on top of `staff` should
//! get remote-worker's larger allowance, not lose access); an admin who wants a tighter limit
//! for one person sets it on the user, which always wins. `capybara policy explain USER` shows
//! the group each field came from.
//!
//! ## Quota buckets
//! - a `limit` set on the **user** gives the user a bucket of its own (all its devices share it);
//! - otherwise, if one of the user's groups has a **shared pool** (`group policy NAME
//!   --shared-limit 2TB`), the user draws from that pool (the largest pool if several, ties by
//!   name), together with every other member;
//! - otherwise a `limit` from a group, template or default gives the user its own bucket of that
//!   size. `grace` raises the kernel's cut-off above the budget by that share.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::model::{
    Bandwidth, ByteSize, Cap, Count, FlowCount, GroupName, Limits, OnlineTime, Percent, Period,
    TimeWindow, Zone,
};

/// Where an effective field came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// The user's own overrides.
    User,
    /// A group's policy.
    Group(GroupName),
    /// The quota template applied to the user.
    Template(String),
    /// The server default.
    Default,
    /// Nothing configured.
    Builtin,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::User => f.write_str("user"),
            Layer::Group(g) => write!(f, "group:{g}"),
            Layer::Template(t) => write!(f, "template:{t}"),
            Layer::Default => f.write_str("default"),
            Layer::Builtin => f.write_str("builtin"),
        }
    }
}

/// A value and the layer it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub source: Layer,
}

/// A group as resolution sees it.
#[derive(Clone, Debug)]
pub struct GroupLayer<'a> {
    /// The group.
    pub name: &'a GroupName,
    /// Its policy.
    pub limits: &'a Limits,
    /// Its shared pool, if any.
    pub shared_limit: Option<ByteSize>,
}

/// Every layer of one user.
#[derive(Clone, Debug)]
pub struct Layers<'a> {
    /// The user's overrides.
    pub user: Option<&'a Limits>,
    /// The user's groups (any order; resolution sorts by name).
    pub groups: Vec<GroupLayer<'a>>,
    /// The template applied to the user.
    pub template: Option<(&'a str, &'a Limits)>,
    /// The server default.
    pub default: &'a Limits,
}

/// Where a user's bytes are charged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPlan {
    /// Not limited.
    None,
    /// A bucket of the user's own.
    Personal {
        /// The budget per period.
        limit: ByteSize,
    },
    /// The shared pool of a group.
    Pool {
        /// The group.
        group: GroupName,
        /// The pool's budget per period.
        limit: ByteSize,
    },
}

/// A user's effective policy: every field with its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effective {
    /// Rate each way per device.
    pub bandwidth: Sourced<Option<Bandwidth>>,
    /// Personal budget per period (see `quota` for what applies).
    pub limit: Sourced<Option<ByteSize>>,
    /// Period of the budget.
    pub period: Sourced<Period>,
    /// Grace over the budget.
    pub grace: Sourced<Percent>,
    /// Devices online at once.
    pub connections: Sourced<Option<u32>>,
    /// Flows per device.
    pub flows: Sourced<Option<u32>>,
    /// Online time per day.
    pub time: Sourced<Option<OnlineTime>>,
    /// Allowed hours.
    pub window: Sourced<Option<TimeWindow>>,
    /// Time zone of window, time and period.
    pub tz: Sourced<Zone>,
    /// Which bucket is charged.
    pub quota: Sourced<QuotaPlan>,
}

impl Effective {
    /// True if the policy tick decides this user's gates again every second: a window, a
    /// daily online time or a device limit.
    pub fn is_timed(&self) -> bool {
        self.window.value.is_some() || self.time.value.is_some() || self.connections.value.is_some()
    }
}

/// How permissive a limit is, for comparing groups' values (larger = more permissive).
trait Permissive {
    fn key(&self) -> u64;
}
impl Permissive for Bandwidth {
    fn key(&self) -> u64 {
        self.0.bits_per_sec()
    }
}
impl Permissive for ByteSize {
    fn key(&self) -> u64 {
        self.0
    }
}
impl Permissive for Count {
    fn key(&self) -> u64 {
        u64::from(self.0)
    }
}
impl Permissive for FlowCount {
    fn key(&self) -> u64 {
        u64::from(self.0)
    }
}
impl Permissive for OnlineTime {
    fn key(&self) -> u64 {
        self.0.as_secs()
    }
}
impl Permissive for TimeWindow {
    fn key(&self) -> u64 {
        u64::from(self.weekly_minutes())
    }
}

fn cap_key<T: Permissive>(c: &Cap<T>) -> u64 {
    match c {
        Cap::Unlimited => u64::MAX,
        Cap::Limit(t) => t.key(),
    }
}

/// A limit field: user, else the most permissive group, else template, else default.
fn cap_field<T: Permissive + Copy>(
    layers: &Layers<'_>,
    groups: &[GroupLayer<'_>],
    get: impl Fn(&Limits) -> Option<Cap<T>>,
) -> Sourced<Option<T>> {
    let out = |c: Cap<T>, source| Sourced {
        value: c.limit(),
        source,
    };
    if let Some(c) = layers.user.and_then(&get) {
        return out(c, Layer::User);
    }
    // Groups are sorted by name; strictly greater keeps the first of equals.
    let mut best: Option<(Cap<T>, &GroupName)> = None;
    for g in groups {
        if let Some(c) = get(g.limits)
            && best.is_none_or(|(b, _)| cap_key(&c) > cap_key(&b))
        {
            best = Some((c, g.name));
        }
    }
    if let Some((c, g)) = best {
        return out(c, Layer::Group(g.clone()));
    }
    if let Some((name, t)) = layers.template
        && let Some(c) = get(t)
    {
        return out(c, Layer::Template(name.to_owned()));
    }
    if let Some(c) = get(layers.default) {
        return out(c, Layer::Default);
    }
    Sourced {
        value: None,
        source: Layer::Builtin,
    }
}

/// A setting: user, else the first group by name, else template, else default, else builtin.
fn setting<T: Copy>(
    layers: &Layers<'_>,
    groups: &[GroupLayer<'_>],
    get: impl Fn(&Limits) -> Option<T>,
    builtin: T,
) -> Sourced<T> {
    let found = layers
        .user
        .and_then(&get)
        .map(|v| (v, Layer::User))
        .or_else(|| {
            groups
                .iter()
                .find_map(|g| get(g.limits).map(|v| (v, Layer::Group(g.name.clone()))))
        })
        .or_else(|| {
            layers
                .template
                .and_then(|(n, t)| get(t).map(|v| (v, Layer::Template(n.to_owned()))))
        })
        .or_else(|| get(layers.default).map(|v| (v, Layer::Default)));
    match found {
        Some((value, source)) => Sourced { value, source },
        None => Sourced {
            value: builtin,
            source: Layer::Builtin,
        },
    }
}

/// The effective policy of a user with these layers.
pub fn resolve(layers: &Layers<'_>) -> Effective {
    let mut groups = layers.groups.clone();
    groups.sort_by(|a, b| a.name.cmp(b.name));
    let limit = cap_field(layers, &groups, |l| l.limit);
    let user_sets_limit = layers.user.is_some_and(|u| u.limit.is_some());
    let mut pool: Option<(&GroupName, ByteSize)> = None;
    for g in &groups {
        if let Some(s) = g.shared_limit
            && pool.is_none_or(|(_, p)| s > p)
        {
            pool = Some((g.name, s));
        }
    }
    let quota = match (user_sets_limit, pool, limit.value) {
        (false, Some((g, l)), _) => Sourced {
            value: QuotaPlan::Pool {
                group: g.clone(),
                limit: l,
            },
            source: Layer::Group(g.clone()),
        },
        (_, _, Some(l)) => Sourced {
            value: QuotaPlan::Personal { limit: l },
            source: limit.source.clone(),
        },
        (_, _, None) => Sourced {
            value: QuotaPlan::None,
            source: limit.source.clone(),
        },
    };
    Effective {
        bandwidth: cap_field(layers, &groups, |l| l.bandwidth),
        limit,
        period: setting(layers, &groups, |l| l.period, Period::Monthly),
        grace: setting(layers, &groups, |l| l.grace, Percent(0)),
        connections: cap_field(layers, &groups, |l| l.connections).map(|c| c.0),
        flows: cap_field(layers, &groups, |l| l.flows).map(|c| c.0),
        time: cap_field(layers, &groups, |l| l.time),
        window: cap_field(layers, &groups, |l| l.window),
        tz: setting(layers, &groups, |l| l.tz, Zone::default()),
        quota,
    }
}

impl<T> Sourced<Option<T>> {
    fn map<U>(self, f: impl Fn(T) -> U) -> Sourced<Option<U>> {
        Sourced {
            value: self.value.map(f),
            source: self.source,
        }
    }
}

/// One row of `policy explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRow {
    /// The field.
    pub field: String,
    /// Its effective value as text (`unlimited` when none).
    pub value: String,
    /// The layer it came from (`user`, `group:NAME`, `template:NAME`, `default`, `builtin`).
    pub source: String,
}

fn text<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "unlimited".to_owned(), ToString::to_string)
}

impl Effective {
    /// The rows of `policy explain`, one per field.
    pub fn explain(&self) -> Vec<ExplainRow> {
        let row = |field: &str, value: String, source: &Layer| ExplainRow {
            field: field.to_owned(),
            value,
            source: source.to_string(),
        };
        let quota = match &self.quota.value {
            QuotaPlan::None => "none".to_owned(),
            QuotaPlan::Personal { limit } => format!("own bucket of {limit}"),
            QuotaPlan::Pool { group, limit } => format!("pool of group {group} ({limit})"),
        };
        vec![
            row(
                "bandwidth",
                text(&self.bandwidth.value),
                &self.bandwidth.source,
            ),
            row("limit", text(&self.limit.value), &self.limit.source),
            row("period", self.period.value.to_string(), &self.period.source),
            row("grace", self.grace.value.to_string(), &self.grace.source),
            row(
                "connections",
                text(&self.connections.value),
                &self.connections.source,
            ),
            row("flows", text(&self.flows.value), &self.flows.source),
            row("time", text(&self.time.value), &self.time.source),
            row(
                "window",
                self.window
                    .value
                    .map_or_else(|| "always".to_owned(), |w| w.to_string()),
                &self.window.source,
            ),
            row("tz", self.tz.value.to_string(), &self.tz.source),
            row("quota", quota, &self.quota.source),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::policy::model::LimitsText;

    fn limits(f: impl FnOnce(&mut LimitsText)) -> Limits {
        let mut t = LimitsText::default();
        f(&mut t);
        t.parse().unwrap().set
    }

    fn g(s: &str) -> GroupName {
        GroupName::parse("group", s).unwrap()
    }

    #[test]
    fn user_beats_group_beats_template_beats_default() {
        let default = limits(|t| {
            t.bandwidth = Some("1Mbps".into());
            t.flows = Some("10".into());
            t.time = Some("2h".into());
            t.tz = Some("Europe/Berlin".into());
        });
        let template = limits(|t| {
            t.flows = Some("20".into());
            t.time = Some("3h".into());
        });
        let group = limits(|t| {
            t.bandwidth = Some("10Mbps".into());
            t.time = Some("4h".into());
        });
        let user = limits(|t| t.bandwidth = Some("unlimited".into()));
        let staff = g("staff");
        let e = resolve(&Layers {
            user: Some(&user),
            groups: vec![GroupLayer {
                name: &staff,
                limits: &group,
                shared_limit: None,
            }],
            template: Some(("guest", &template)),
            default: &default,
        });
        assert_eq!(e.bandwidth.value, None, "the user's unlimited wins");
        assert_eq!(e.bandwidth.source, Layer::User);
        assert_eq!(e.time.value.unwrap().to_string(), "4h");
        assert_eq!(e.time.source, Layer::Group(staff.clone()));
        assert_eq!(e.flows.value, Some(20));
        assert_eq!(e.flows.source, Layer::Template("guest".into()));
        assert_eq!(e.tz.source, Layer::Default);
        assert_eq!(e.connections.source, Layer::Builtin);
        assert_eq!(e.quota.value, QuotaPlan::None);
        let rows = e.explain();
        let bw = rows.iter().find(|r| r.field == "bandwidth").unwrap();
        assert_eq!(
            (bw.value.as_str(), bw.source.as_str()),
            ("unlimited", "user")
        );
        let t = rows.iter().find(|r| r.field == "time").unwrap();
        assert_eq!((t.value.as_str(), t.source.as_str()), ("4h", "group:staff"));
    }

    #[test]
    fn among_groups_the_most_permissive_wins_ties_by_name() {
        let a = limits(|t| {
            t.bandwidth = Some("10Mbps".into());
            t.connections = Some("3".into());
            t.window = Some("Mon-Fri 08:00-18:00".into());
            t.period = Some("weekly".into());
        });
        let b = limits(|t| {
            t.bandwidth = Some("50Mbps".into());
            t.connections = Some("3".into());
            t.window = Some("daily 09:00-12:00".into());
            t.period = Some("daily".into());
        });
        let c = limits(|t| t.flows = Some("unlimited".into()));
        let d = limits(|t| t.flows = Some("100".into()));
        let (ga, gb, gc, gd) = (g("alpha"), g("beta"), g("gamma"), g("delta"));
        let default = Limits::default();
        let e = resolve(&Layers {
            user: None,
            groups: vec![
                GroupLayer {
                    name: &gd,
                    limits: &d,
                    shared_limit: None,
                },
                GroupLayer {
                    name: &gb,
                    limits: &b,
                    shared_limit: None,
                },
                GroupLayer {
                    name: &ga,
                    limits: &a,
                    shared_limit: None,
                },
                GroupLayer {
                    name: &gc,
                    limits: &c,
                    shared_limit: None,
                },
            ],
            template: None,
            default: &default,
        });
        assert_eq!(e.bandwidth.source, Layer::Group(gb.clone()));
        assert_eq!(
            e.connections.source,
            Layer::Group(ga.clone()),
            "tie: by name"
        );
        // 5 × 10 h beats 7 × 3 h.
        assert_eq!(e.window.source, Layer::Group(ga.clone()));
        assert_eq!(e.flows.value, None);
        assert_eq!(e.flows.source, Layer::Group(gc));
        assert_eq!(
            e.period.value,
            Period::Weekly,
            "settings: first group by name"
        );
    }

    #[test]
    fn quota_personal_limit_beats_pool_beats_group_limit() {
        let grp = limits(|t| t.limit = Some("10GB".into()));
        let eng = g("eng");
        let default = Limits::default();
        let layers = |user| Layers {
            user,
            groups: vec![GroupLayer {
                name: &eng,
                limits: &grp,
                shared_limit: Some(ByteSize(2_000_000_000_000)),
            }],
            template: None,
            default: &default,
        };
        let e = resolve(&layers(None));
        assert_eq!(
            e.quota.value,
            QuotaPlan::Pool {
                group: eng.clone(),
                limit: ByteSize(2_000_000_000_000)
            }
        );
        let own = limits(|t| t.limit = Some("1GB".into()));
        let e = resolve(&layers(Some(&own)));
        assert_eq!(
            e.quota.value,
            QuotaPlan::Personal {
                limit: ByteSize(1_000_000_000)
            }
        );
        assert_eq!(e.quota.source, Layer::User);
        let off = limits(|t| t.limit = Some("unlimited".into()));
        assert_eq!(resolve(&layers(Some(&off))).quota.value, QuotaPlan::None);
    }
}
