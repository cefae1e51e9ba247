//! The declarative policy file (`cargo xtask policy apply|export|diff`, `capybara policy …`):
//! the desired state of users (and their devices), their own limits and quota template, groups
//! with members, policies and shared pools, quota templates, and the server default.
//!
//! ```yaml
//! default:
//!   bandwidth: 100mbit
//! users:
//!   alice:
//!     devices: [laptop, phone]
//!     limits: { limit: 100GB, period: monthly, grace: 5% }
//!     template: guest
//! groups:
//!   staff:
//!     members: [alice]
//!     limits: { bandwidth: 10mbit, connections: 3, window: Mon-Fri 08:00-18:00, tz: Europe/Berlin }
//!     shared_limit: 2TB
//! templates:
//!   guest: { bandwidth: 5mbit, limit: 2GB, period: daily }
//! ```
//!
//! ## Applying
//! - Parsed and validated in full first: a YAML or type error names its line and column and the
//!   field path (a bad value inside a mapping, e.g. `bandwidth: 10Mbsp`, is located at the
//!   mapping's first line, with its path `groups.staff.limits` and the value quoted); a group member that is neither in the file nor an existing user names the group;
//!   a user whose `template` is not in the file's `templates` names the user.
//!   Nothing is changed by a file with an error.
//! - The diff against the current state is computed; an empty diff changes nothing (no store
//!   write, no audit record): applying the same file twice changes nothing the second time.
//! - Missing users and devices are created (their keys are generated and not shown: get a
//!   config with `capybara user config NAME --device D --rotate`); users and devices are never
//!   removed by a file. Everything else is replaced: limits and templates of users not set in
//!   the file are cleared, groups and quota templates not in the file are deleted, the default
//!   is the file's. (Configuration templates are not part of the file: `template export`.)
//! - The policy records (users' limits, groups, default) and one audit record are written in one
//!   store batch, then the kernel is updated for every affected user; if the kernel refuses, the
//!   batch is undone, and users created by this apply are removed again: all or nothing; an
//!   agent killed mid-apply completes it when it starts again (a journal, see the module above).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::service::{
    domain::{DeviceName, UserName, ValidationError},
    policy::{
        Change, GroupRecord, UserPolicy,
        model::{ByteSize, GroupName, Limits},
    },
    templates::model::TemplateName,
};

/// A user in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    /// Its devices (created if missing; the first is the user's first device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceName>,
    /// Its own limits.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Its quota template (one of the file's `templates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateName>,
}

/// A group in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDoc {
    /// Its members.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub members: BTreeSet<UserName>,
    /// Its policy.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// One budget per period for all members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_limit: Option<ByteSize>,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// The server default.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub default: Limits,
    /// Users.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<UserName, UserDoc>,
    /// Groups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<GroupName, GroupDoc>,
    /// Quota templates: name → the layer it gives its users.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub templates: BTreeMap<TemplateName, Limits>,
}

impl PolicyDoc {
    /// Parses YAML; an error names the line, the column and the field path.
    pub fn from_yaml(text: &str) -> Result<PolicyDoc, ValidationError> {
        crate::service::domain::from_yaml(text)
    }

    /// The YAML text (keys sorted, so export → apply → export is identical).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("policy documents serialise")
    }
}

/// What applying a document does.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Human-readable lines: `+ …` added, `~ …` changed, `- …` removed.
    pub diff: Vec<String>,
    /// Users to create, with their devices.
    pub new_users: Vec<(UserName, Vec<DeviceName>)>,
    /// Devices to add to existing users.
    pub new_devices: Vec<(UserName, DeviceName)>,
    /// Policy records to write.
    pub changes: Vec<Change>,
    /// Users whose effective policy may change.
    pub affected: BTreeSet<UserName>,
}

fn limits_text(l: &Limits) -> String {
    l.summary().unwrap_or_else(|| "(none)".into())
}

/// The current state as the planner sees it.
pub(super) struct Current<'a> {
    /// Users with their devices.
    pub users: BTreeMap<UserName, Vec<DeviceName>>,
    /// Users' own limits.
    pub limits: &'a BTreeMap<UserName, UserPolicy>,
    /// Groups.
    pub groups: &'a BTreeMap<GroupName, GroupRecord>,
    /// Default.
    pub default: &'a Limits,
    /// Quota templates.
    pub templates: &'a BTreeMap<TemplateName, Limits>,
}

/// Validates `doc` against `cur` and computes what applying it changes.
pub(super) fn plan(doc: &PolicyDoc, cur: &Current<'_>) -> Result<Plan, ValidationError> {
    let mut p = Plan::default();
    // Users and devices (created, never removed).
    for (u, d) in &doc.users {
        match cur.users.get(u) {
            None => {
                let devices = if d.devices.is_empty() {
                    vec![DeviceName::default_device()]
                } else {
                    d.devices.clone()
                };
                p.diff.push(format!(
                    "+ user {u} (devices {})",
                    devices
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ));
                p.new_users.push((u.clone(), devices));
            }
            Some(have) => {
                for dev in &d.devices {
                    if !have.contains(dev) {
                        p.diff.push(format!("+ device {u}/{dev}"));
                        p.new_devices.push((u.clone(), dev.clone()));
                    }
                }
            }
        }
    }
    let known = |u: &UserName| cur.users.contains_key(u) || doc.users.contains_key(u);
    // Every template a user refers to is in the file.
    for (u, d) in &doc.users {
        if let Some(t) = &d.template
            && !doc.templates.contains_key(t)
        {
            return Err(ValidationError::Name {
                field: "users.template",
                value: format!("{u}: {t}"),
                reason: "not one of the file's templates",
            });
        }
    }
    // Quota templates: the file's, the others deleted. Users that have a changed template are
    // affected.
    let mut changed_templates: BTreeSet<&TemplateName> = BTreeSet::new();
    for (t, want) in doc.templates.iter() {
        match cur.templates.get(t) {
            Some(have) if have == want => {}
            Some(have) => {
                p.diff.push(format!(
                    "~ template {t}: {} -> {}",
                    limits_text(have),
                    limits_text(want)
                ));
                p.changes
                    .push(Change::QuotaTemplate(t.clone(), Some(want.clone())));
                changed_templates.insert(t);
            }
            None => {
                p.diff
                    .push(format!("+ template {t}: {}", limits_text(want)));
                p.changes
                    .push(Change::QuotaTemplate(t.clone(), Some(want.clone())));
            }
        }
    }
    for t in cur.templates.keys() {
        if !doc.templates.contains_key(t) {
            p.diff.push(format!("- template {t}"));
            p.changes.push(Change::QuotaTemplate(t.clone(), None));
            changed_templates.insert(t);
        }
    }
    for (u, have) in cur.limits {
        if have
            .template
            .as_ref()
            .is_some_and(|t| changed_templates.contains(t))
        {
            p.affected.insert(u.clone());
        }
    }
    // Users' own limits and templates: the file's, cleared for users not in it.
    let mut names: BTreeSet<&UserName> = doc.users.keys().collect();
    names.extend(cur.limits.keys());
    for u in names {
        let want = doc
            .users
            .get(u)
            .map(|d| UserPolicy {
                limits: d.limits.clone(),
                template: d.template.clone(),
            })
            .unwrap_or_default();
        let have = cur.limits.get(u).cloned().unwrap_or_default();
        if want != have {
            if want.limits != have.limits {
                p.diff.push(format!(
                    "~ user {u} limits: {} -> {}",
                    limits_text(&have.limits),
                    limits_text(&want.limits)
                ));
            }
            if want.template != have.template {
                let name = |t: &Option<TemplateName>| {
                    t.as_ref()
                        .map_or_else(|| "(none)".to_owned(), ToString::to_string)
                };
                p.diff.push(format!(
                    "~ user {u} template: {} -> {}",
                    name(&have.template),
                    name(&want.template)
                ));
            }
            p.changes
                .push(Change::User(u.clone(), (!want.is_empty()).then_some(want)));
            p.affected.insert(u.clone());
        }
    }
    // Groups.
    for (g, d) in &doc.groups {
        if let Some(m) = d.members.iter().find(|m| !known(m)) {
            return Err(ValidationError::Name {
                field: "groups.members",
                value: format!("{g}: {m}"),
                reason: "not a user of the agent or of the file",
            });
        }
        let want = GroupRecord {
            name: g.clone(),
            members: d.members.clone(),
            limits: d.limits.clone(),
            shared_limit: d.shared_limit,
        };
        match cur.groups.get(g) {
            Some(have) if *have == want => {}
            Some(have) => {
                if have.members != want.members {
                    p.diff.push(format!(
                        "~ group {g} members: {} -> {}",
                        join(&have.members),
                        join(&want.members)
                    ));
                }
                if have.limits != want.limits {
                    p.diff.push(format!(
                        "~ group {g} limits: {} -> {}",
                        limits_text(&have.limits),
                        limits_text(&want.limits)
                    ));
                }
                if have.shared_limit != want.shared_limit {
                    p.diff.push(format!(
                        "~ group {g} shared_limit: {} -> {}",
                        opt(have.shared_limit),
                        opt(want.shared_limit)
                    ));
                }
                p.affected.extend(have.members.iter().cloned());
                p.affected.extend(want.members.iter().cloned());
                p.changes.push(Change::Group(g.clone(), Some(want)));
            }
            None => {
                p.diff.push(format!(
                    "+ group {g} members: {} limits: {} shared_limit: {}",
                    join(&want.members),
                    limits_text(&want.limits),
                    opt(want.shared_limit)
                ));
                p.affected.extend(want.members.iter().cloned());
                p.changes.push(Change::Group(g.clone(), Some(want)));
            }
        }
    }
    for (g, have) in cur.groups {
        if !doc.groups.contains_key(g) {
            p.diff.push(format!("- group {g}"));
            p.affected.extend(have.members.iter().cloned());
            p.changes.push(Change::Group(g.clone(), None));
        }
    }
    if doc.default != *cur.default {
        p.diff.push(format!(
            "~ default: {} -> {}",
            limits_text(cur.default),
            limits_text(&doc.default)
        ));
        p.changes.push(Change::Default(doc.default.clone()));
        p.affected.extend(cur.users.keys().cloned());
        p.affected.extend(doc.users.keys().cloned());
    }
    for (u, _) in &p.new_users {
        p.affected.insert(u.clone());
    }
    Ok(p)
}

fn join(s: &BTreeSet<UserName>) -> String {
    if s.is_empty() {
        "(none)".into()
    } else {
        s.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn opt(s: Option<ByteSize>) -> String {
    s.map_or_else(|| "(none)".into(), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
default:
  bandwidth: 100mbit
users:
  alice:
    devices: [laptop, phone]
    limits:
      limit: 100GB
      grace: 5%
groups:
  staff:
    members: [alice]
    limits:
      bandwidth: 10mbit
      connections: 3
      window: Mon-Fri 08:00-18:00
      tz: Europe/Berlin
    shared_limit: 2TB
";

    #[test]
    fn a_document_round_trips() {
        let d = PolicyDoc::from_yaml(FILE).unwrap();
        assert_eq!(d.users.len(), 1);
        let again = PolicyDoc::from_yaml(&d.to_yaml()).unwrap();
        assert_eq!(again, d);
        assert_eq!(again.to_yaml(), d.to_yaml());
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let bad = FILE.replace("bandwidth: 10mbit", "bandwidth: 10Mbsp");
        let e = PolicyDoc::from_yaml(&bad).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("line 13"), "{m}");
        assert!(m.contains("10Mbsp"), "{m}");
        assert_eq!(e.field(), "file");
        let bad = FILE.replace("window: Mon-Fri 08:00-18:00", "window: Mon-Fri 25:00-18:00");
        // A bad value is located at the first line of the mapping it is in (serde_yaml's
        // location for a value's own error), with the path and the value quoted.
        let m = PolicyDoc::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            m.contains("line 13") && m.contains("groups.staff.limits") && m.contains("25:00"),
            "{m}"
        );
        // A type error: a list where a map is expected.
        let m = PolicyDoc::from_yaml("users: [alice]\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("line 1"), "{m}");
        // An unknown field.
        let m = PolicyDoc::from_yaml("groups:\n  staff:\n    memebers: [a]\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("memebers") && m.contains("line 3"), "{m}");
    }

    #[test]
    fn a_member_nobody_knows_is_refused() {
        let d = PolicyDoc::from_yaml("groups:\n  staff:\n    members: [ghost]\n").unwrap();
        let (limits, groups, default) = (BTreeMap::new(), BTreeMap::new(), Limits::default());
        let templates = BTreeMap::new();
        let cur = Current {
            users: BTreeMap::new(),
            limits: &limits,
            groups: &groups,
            default: &default,
            templates: &templates,
        };
        let e = plan(&d, &cur).unwrap_err();
        assert_eq!(e.field(), "groups.members");
        assert!(e.to_string().contains("ghost"), "{e}");
    }

    #[test]
    fn templates_round_trip_and_a_user_naming_a_missing_one_is_refused() {
        let with = format!(
            "{FILE}templates:\n  guest:\n    bandwidth: 5mbit\n    limit: 2GB\n    period: daily\n"
        )
        .replace(
            "      grace: 5%\n",
            "      grace: 5%\n    template: guest\n",
        );
        let d = PolicyDoc::from_yaml(&with).unwrap();
        assert_eq!(d.templates.len(), 1);
        assert_eq!(
            d.users
                .values()
                .next()
                .unwrap()
                .template
                .as_ref()
                .unwrap()
                .as_str(),
            "guest"
        );
        let again = PolicyDoc::from_yaml(&d.to_yaml()).unwrap();
        assert_eq!(again, d);
        assert_eq!(again.to_yaml(), d.to_yaml());
        let (limits, groups, default) = (BTreeMap::new(), BTreeMap::new(), Limits::default());
        let templates = BTreeMap::new();
        let cur = Current {
            users: BTreeMap::new(),
            limits: &limits,
            groups: &groups,
            default: &default,
            templates: &templates,
        };
        let p = plan(&d, &cur).unwrap();
        assert!(
            p.diff.iter().any(|l| l.starts_with("+ template guest")),
            "{:?}",
            p.diff
        );
        let bad = with.replace("    template: guest", "    template: ghost");
        let e = plan(&PolicyDoc::from_yaml(&bad).unwrap(), &cur).unwrap_err();
        assert_eq!(e.field(), "users.template");
        let m = e.to_string();
        assert!(m.contains("alice") && m.contains("ghost"), "{m}");
    }
}
