//! Templates: **quota templates** (a named policy layer applied to users) and **configuration
//! templates** (a named snapshot of the server's settings), their records, the built-ins and the
//! YAML form of a configuration template.
//!
//! ## Quota templates
//! `capybara quota template create guest --bandwidth 5Mbps --limit 2GB --period daily`, then
//! `quota template apply guest alice bob`: the template becomes the users' *template layer*
//! (see [`super::resolve`]: user > groups > template > default), `policy explain` shows
//! `template:guest` for the fields it decides. A user has at most one quota template.
//! - Stored as `policy/qtemplate/<name>`; a user's template is part of its own record
//!   (`policy/user/<user>`), so applying is one batch with the audit record, like `quota set`.
//! - Changing a template (`create --replace`) re-applies the kernel state of its users.
//! - **Deleting a template that users still have is refused** (`FAILED_PRECONDITION` naming
//!   them): detach them first (`quota template detach USER…`). Silently detaching would widen
//!   or narrow people's limits as a side effect of a cleanup.
//!
//! ## Configuration templates
//! A configuration template holds the server-wide settings of SPEC feature 13:
//!
//! | field | applied by `template apply` | enforced today |
//! |---|---|---|
//! | `limits` | replaces the server default whole (`quota set --default`; a template without limits clears it), re-applied to the kernel for every user | yes |
//! | `dns` | the DNS servers written into client configs made from then on (absent = the agent's `--dns`) | yes |
//! | `blocklists` | destination lists that must exist: apply is refused (`NOT_FOUND`, field `blocklists`) if one is missing; lists not named stay enforced (the kernel has no per-list switch) | yes, as "must exist" |
//! | `log_level` | replaces the agent's log filter (`RUST_LOG`) now and at every start while the template is the last applied (`crate::logging`) | yes |
//! | `ports.listen_port` | stored only: the WireGuard UDP port is bound at start (`--listen-port`), not changed at runtime | no |
//! | `security.mfa_required`, `security.key_rotation` | stored only: MFA and key rotation are later issues | no |
//!
//! `template show` lists every stored-but-not-enforced field of the template as a note, so the
//! output never pretends. `template save current NAME` snapshots the current settings (the
//! default limits, the DNS in use, the destination lists that exist, the running listen port and
//! the stored fields of the last applied template); `template show current` shows that snapshot.
//! Applying writes the default limits, the settings record and the audit record in one batch,
//! then updates the kernel for every user; a kernel failure undoes all of it.
//!
//! Built-ins: a template saved or imported under a built-in's name is used instead of it until
//! deleted (the design's `template save current remote-worker`); a built-in itself cannot be
//! deleted or changed. None names blocklists, so they apply on any agent:
//!
//! | name | limits | DNS | security | log |
//! |---|---|---|---|---|
//! | `strict` | 20 Mbit/s, 50 GB monthly, 2 devices, 200 flows | 9.9.9.9, 149.112.112.112 (Quad9, malware filtering) | MFA required, keys rotated every 90 days | info |
//! | `open` | everything unlimited | agent's | none | warn |
//! | `corporate` | 100 Mbit/s, 500 GB monthly + 5 % grace, 3 devices | agent's | MFA required, 180 days | info |
//! | `remote-worker` | 50 Mbit/s, 200 GB monthly, 2 devices | agent's | MFA required, 90 days | info |
//! | `guest` | 5 Mbit/s, 2 GB daily, 1 device, 100 flows, 8 h a day | 1.1.1.1, 1.0.0.1 | keys rotated every 30 days | info |
//!
//! ## YAML
//! ```yaml
//! name: guest
//! description: Visitors
//! blocklists: [ads]
//! ports: { listen_port: 51820 }
//! dns: [1.1.1.1]
//! limits: { bandwidth: 5mbit, limit: 2GB, period: daily, connections: 1 }
//! security: { mfa_required: false, key_rotation: 30d }
//! log_level: info
//! ```
//! A YAML error names its line, column and field (as policy files do); unknown fields are
//! refused. Export → import → export is identical (keys in a fixed order, values in their text
//! form).

use std::{collections::BTreeSet, fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    blocklist::ListName,
    service::{
        domain::{UserName, ValidationError},
        policy::model::{Limits, LimitsText, PolicyValueError},
    },
};

/// The name `template save current` and `template show current` use for the live settings;
/// no template may have it.
pub const CURRENT: &str = "current";

crate::service::policy::model::name_type!(
    /// A template's name: the same rules as a user name (`[a-z0-9._-]`, at most 32).
    TemplateName,
    "template"
);

/// A quota template as stored (`policy/qtemplate/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaTemplate {
    /// Its name.
    pub name: TemplateName,
    /// The layer it gives its users.
    pub limits: Limits,
}

/// A quota template with the users that have it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaTemplateView {
    /// Its name.
    pub name: TemplateName,
    /// Its layer.
    pub limits: Limits,
    /// The users it is applied to, by name.
    pub users: Vec<UserName>,
}

/// The agent's log level as a template holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Verbose.
    Debug,
    /// Everything.
    Trace,
}

impl FromStr for LogLevel {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<LogLevel, PolicyValueError> {
        Ok(match input.trim().to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(PolicyValueError::LogLevel {
                    input: input.to_owned(),
                });
            }
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        })
    }
}

/// A maximum age (key rotation): whole days, hours or minutes (`90d`, `12h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaxAge(pub Duration);

impl FromStr for MaxAge {
    type Err = PolicyValueError;
    fn from_str(input: &str) -> Result<MaxAge, PolicyValueError> {
        crate::service::domain::parse_duration("key_rotation", input.trim())
            .map(MaxAge)
            .map_err(|_| PolicyValueError::MaxAge {
                input: input.to_owned(),
            })
    }
}

impl fmt::Display for MaxAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        for (div, unit) in [(86_400, "d"), (3600, "h"), (60, "m")] {
            if s >= div && s.is_multiple_of(div) {
                return write!(f, "{}{unit}", s / div);
            }
        }
        write!(f, "{s}s")
    }
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
text_serde!(LogLevel);
text_serde!(MaxAge);

/// Ports a template holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    /// The WireGuard UDP listen port (stored only: bound at start by `--listen-port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
}

/// The security policy a template holds (stored only: MFA and key rotation come later).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Every user must pass MFA before the gate admits a session.
    #[serde(default)]
    pub mfa_required: bool,
    /// Client keys older than this should be rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<MaxAge>,
}

/// A configuration template (stored as `policy/ctemplate/<name>`; also its YAML form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigTemplate {
    /// Its name.
    pub name: TemplateName,
    /// What it is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Destination blocklists that must exist when it is applied.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub blocklists: BTreeSet<ListName>,
    /// Ports.
    #[serde(default, skip_serializing_if = "is_default")]
    pub ports: Ports,
    /// DNS servers for client configs; `None` = the agent's `--dns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<IpAddr>>,
    /// The server default limits.
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Security policy.
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: Security,
    /// The agent's log level (replaces `RUST_LOG` while applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The server settings a configuration template set (`policy/settings`); the default limits
/// live in their own record (`policy/default`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSettings {
    /// The template last applied.
    #[serde(default)]
    pub template: Option<TemplateName>,
    /// Destination lists required by it.
    #[serde(default)]
    pub blocklists: BTreeSet<ListName>,
    /// Its ports (stored only).
    #[serde(default)]
    pub ports: Ports,
    /// DNS for client configs; `None` = the agent's `--dns`.
    #[serde(default)]
    pub dns: Option<Vec<IpAddr>>,
    /// Its security policy (stored only).
    #[serde(default)]
    pub security: Security,
    /// Its log level (the agent's log filter).
    #[serde(default)]
    pub log_level: Option<LogLevel>,
}

impl ServerSettings {
    /// The settings `t` sets.
    pub fn from_template(t: &ConfigTemplate) -> ServerSettings {
        ServerSettings {
            template: Some(t.name.clone()),
            blocklists: t.blocklists.clone(),
            ports: t.ports.clone(),
            dns: t.dns.clone(),
            security: t.security.clone(),
            log_level: t.log_level,
        }
    }
}

impl ConfigTemplate {
    /// Parses a template from YAML; an error names the line, the column and the field.
    pub fn from_yaml(text: &str) -> Result<ConfigTemplate, ValidationError> {
        crate::service::domain::from_yaml(text)
    }

    /// The YAML text (fields in a fixed order, so export → import → export is identical).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("templates serialise")
    }

    /// What the template holds that the agent does not enforce (or not fully), one line each;
    /// `running_port` is the WireGuard port the agent listens on, if known.
    pub fn notes(&self, running_port: Option<u16>) -> Vec<String> {
        let mut n = Vec::new();
        if !self.blocklists.is_empty() {
            n.push(
                "blocklists: applying requires these destination lists to exist; lists not named stay enforced"
                    .to_owned(),
            );
        }
        if let Some(p) = self.ports.listen_port {
            let now = running_port.map_or_else(String::new, |r| format!(" (now {r})"));
            n.push(format!(
                "ports.listen_port {p}: stored only; the WireGuard port is bound at start by --listen-port{now}, not changed at runtime"
            ));
        }
        if self.security.mfa_required {
            n.push("security.mfa_required: stored only; MFA is not enforced yet".to_owned());
        }
        if let Some(k) = self.security.key_rotation {
            n.push(format!(
                "security.key_rotation {k}: stored only; key rotation is not enforced yet"
            ));
        }
        n
    }
}

/// Whether `name` is a built-in template.
pub fn is_builtin(name: &str) -> bool {
    builtins().iter().any(|t| t.name.as_str() == name)
}

/// Refuses `name` for a template that is written (saved, imported, deleted): `current` stands
/// for the live settings. (A built-in's name may be saved over; see the module docs.)
pub fn check_writable(field: &'static str, name: &TemplateName) -> Result<(), ValidationError> {
    if name.as_str() == CURRENT {
        return Err(ValidationError::Name {
            field,
            value: name.to_string(),
            reason: "\"current\" stands for the live settings and cannot be a template's name",
        });
    }
    Ok(())
}

fn limits(f: impl FnOnce(&mut LimitsText)) -> Limits {
    let mut t = LimitsText::default();
    f(&mut t);
    t.parse().expect("built-in limits are valid").set
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn ips(v: &[&str]) -> Option<Vec<IpAddr>> {
    Some(
        v.iter()
            .map(|a| a.parse().expect("built-in address"))
            .collect(),
    )
}

fn name(n: &str) -> TemplateName {
    TemplateName(n.to_owned())
}

/// The built-in templates (always present, unchanged; a template saved under one's name is used
/// instead of it), by name.
pub fn builtins() -> Vec<ConfigTemplate> {
    let days = |d: u64| Some(MaxAge(Duration::from_secs(d * 86_400)));
    vec![
        ConfigTemplate {
            name: name("corporate"),
            description: "Staff on managed devices: 100 Mbit/s, 500 GB a month, 3 devices, MFA"
                .into(),
            blocklists: BTreeSet::new(),
            ports: Ports::default(),
            dns: None,
            limits: limits(|t| {
                t.bandwidth = s("100Mbps");
                t.limit = s("500GB");
                t.period = s("monthly");
                t.grace = s("5%");
                t.connections = s("3");
            }),
            security: Security {
                mfa_required: true,
                key_rotation: days(180),
            },
            log_level: Some(LogLevel::Info),
        },
        ConfigTemplate {
            name: name("guest"),
            description: "Visitors: 5 Mbit/s, 2 GB a day, 1 device, 8 hours a day".into(),
            blocklists: BTreeSet::new(),
            ports: Ports::default(),
            dns: ips(&["1.1.1.1", "1.0.0.1"]),
            limits: limits(|t| {
                t.bandwidth = s("5Mbps");
                t.limit = s("2GB");
                t.period = s("daily");
                t.connections = s("1");
                t.flows = s("100");
                t.time = s("8h");
            }),
            security: Security {
                mfa_required: false,
                key_rotation: days(30),
            },
            log_level: Some(LogLevel::Info),
        },
        ConfigTemplate {
            name: name("open"),
            description: "No limits at all".into(),
            blocklists: BTreeSet::new(),
            ports: Ports::default(),
            dns: None,
            limits: limits(|t| {
                t.bandwidth = s("unlimited");
                t.limit = s("unlimited");
                t.connections = s("unlimited");
                t.flows = s("unlimited");
                t.time = s("unlimited");
                t.window = s("unlimited");
            }),
            security: Security::default(),
            log_level: Some(LogLevel::Warn),
        },
        ConfigTemplate {
            name: name("remote-worker"),
            description: "Working from home: 50 Mbit/s, 200 GB a month, 2 devices, MFA".into(),
            blocklists: BTreeSet::new(),
            ports: Ports::default(),
            dns: None,
            limits: limits(|t| {
                t.bandwidth = s("50Mbps");
                t.limit = s("200GB");
                t.period = s("monthly");
                t.connections = s("2");
            }),
            security: Security {
                mfa_required: true,
                key_rotation: days(90),
            },
            log_level: Some(LogLevel::Info),
        },
        ConfigTemplate {
            name: name("strict"),
            description: "Locked down: 20 Mbit/s, 50 GB a month, 2 devices, filtering DNS, MFA"
                .into(),
            blocklists: BTreeSet::new(),
            ports: Ports::default(),
            dns: ips(&["9.9.9.9", "149.112.112.112"]),
            limits: limits(|t| {
                t.bandwidth = s("20Mbps");
                t.limit = s("50GB");
                t.period = s("monthly");
                t.connections = s("2");
                t.flows = s("200");
            }),
            security: Security {
                mfa_required: true,
                key_rotation: days(90),
            },
            log_level: Some(LogLevel::Info),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_named_and_round_trip() {
        let b = builtins();
        let names: Vec<&str> = b.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["corporate", "guest", "open", "remote-worker", "strict"]
        );
        for t in &b {
            let y = t.to_yaml();
            let again = ConfigTemplate::from_yaml(&y).unwrap();
            assert_eq!(&again, t, "{y}");
            assert_eq!(again.to_yaml(), y);
        }
        let guest = b.iter().find(|t| t.name.as_str() == "guest").unwrap();
        assert_eq!(guest.limits.bandwidth.unwrap().to_string(), "5mbit");
        assert_eq!(guest.limits.limit.unwrap().to_string(), "2GB");
        assert_eq!(guest.limits.connections.unwrap().to_string(), "1");
        let strict = b.iter().find(|t| t.name.as_str() == "strict").unwrap();
        assert!(strict.security.mfa_required);
        assert_eq!(strict.security.key_rotation.unwrap().to_string(), "90d");
        assert!(
            strict
                .notes(Some(51820))
                .iter()
                .any(|n| n.contains("mfa_required") && n.contains("not enforced"))
        );
    }

    #[test]
    fn current_is_read_only_and_builtin_names_may_be_saved_over() {
        let e =
            check_writable("name", &TemplateName::parse("name", "current").unwrap()).unwrap_err();
        assert_eq!(e.field(), "name");
        assert!(e.to_string().contains("current"), "{e}");
        for n in [
            "strict",
            "open",
            "corporate",
            "remote-worker",
            "guest",
            "mine",
        ] {
            check_writable("name", &TemplateName::parse("name", n).unwrap()).unwrap();
        }
    }

    #[test]
    fn yaml_errors_name_the_line_and_field() {
        let good = "name: mine\ndns: [10.0.0.53]\nlimits:\n  bandwidth: 10Mbps\nsecurity:\n  mfa_required: true\n  key_rotation: 90d\nlog_level: debug\nports:\n  listen_port: 51821\nblocklists: [ads]\n";
        let t = ConfigTemplate::from_yaml(good).unwrap();
        assert_eq!(t.ports.listen_port, Some(51821));
        assert_eq!(ConfigTemplate::from_yaml(&t.to_yaml()).unwrap(), t);
        for (bad, want) in [
            (good.replace("10Mbps", "10Mbsp"), "10Mbsp"),
            (good.replace("90d", "ninety"), "ninety"),
            (good.replace("debug", "loud"), "loud"),
            (good.replace("10.0.0.53", "10.0.0.999"), "line 2"),
            (good.replace("51821", "70000"), "line 10"),
            (good.replace("mfa_required", "mfa"), "mfa"),
            (good.replace("name: mine", "name: Bad Name"), "line 1"),
            (good.replace("[ads]", "[Bad List]"), "Bad List"),
        ] {
            let e = ConfigTemplate::from_yaml(&bad).unwrap_err();
            assert_eq!(e.field(), "file");
            let m = e.to_string();
            assert!(m.contains(want) && m.contains("line "), "{want}: {m}");
        }
    }
}
