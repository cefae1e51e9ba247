//! `capybara quota …`, `capybara group …`, `capybara policy explain`: limits, quotas and groups.
//! Values are validated here with the agent's own parsers (exit 2 naming the field) before a
//! connection is made.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{Cli, CliError, connect, print_json, table::Table, time};
use crate::service::{
    domain::UserName,
    policy::{
        QuotaStatus,
        model::{ByteSize, Cap, GroupName, Limits, LimitsText, parse_field},
    },
    policy_file::doc::PolicyDoc,
};

/// The limit options shared by `quota set` and `group policy`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Rate each way per device, e.g. 10Mbps (or unlimited).
    #[arg(long)]
    bandwidth: Option<String>,
    /// Data budget per period, e.g. 100GB (or unlimited).
    #[arg(long)]
    limit: Option<String>,
    /// daily, weekly, monthly or none.
    #[arg(long)]
    period: Option<String>,
    /// Extra share over the budget before traffic stops, e.g. 5%.
    #[arg(long)]
    grace: Option<String>,
    /// Devices online at once (or unlimited).
    #[arg(long)]
    connections: Option<String>,
    /// Concurrent flows per device (or unlimited).
    #[arg(long)]
    flows: Option<String>,
    /// Online time per day, e.g. 8h (or unlimited).
    #[arg(long)]
    time: Option<String>,
    /// Allowed hours, e.g. "Mon-Fri 08:00-18:00" (or unlimited).
    #[arg(long)]
    window: Option<String>,
    /// Time zone of the window, time and period, e.g. Europe/Berlin.
    #[arg(long)]
    tz: Option<String>,
    /// Unset a field (inherit it again); repeatable.
    #[arg(long, value_name = "FIELD")]
    clear: Vec<String>,
}

impl LimitArgs {
    pub(super) fn text(&self) -> LimitsText {
        LimitsText {
            bandwidth: self.bandwidth.clone(),
            limit: self.limit.clone(),
            period: self.period.clone(),
            grace: self.grace.clone(),
            connections: self.connections.clone(),
            flows: self.flows.clone(),
            time: self.time.clone(),
            window: self.window.clone(),
            tz: self.tz.clone(),
            clear: self.clear.clone(),
        }
    }
}

/// `capybara quota …`.
#[derive(Debug, Subcommand)]
pub enum QuotaCmd {
    /// Set a user's own limits (or, with --default, the server default).
    Set {
        /// The user (omit with --default).
        #[arg(required_unless_present = "default")]
        user: Option<String>,
        /// Change the server default instead of a user.
        #[arg(long, conflicts_with = "user")]
        default: bool,
        #[command(flatten)]
        limits: Box<LimitArgs>,
    },
    /// Quota usage of one user or everyone.
    Show {
        /// Only this user.
        user: Option<String>,
    },
    /// Quota usage of everyone; --exceeding for those at or over budget.
    Report {
        /// Only users at or over their budget.
        #[arg(long)]
        exceeding: bool,
    },
    /// Quota templates: a named layer applied to users (user > groups > template > default).
    #[command(subcommand)]
    Template(super::templates::QuotaTemplateCmd),
    /// Start a new period now for a user's bucket or a group's pool.
    Reset {
        /// The user.
        #[arg(required_unless_present = "group")]
        user: Option<String>,
        /// The group whose pool to reset.
        #[arg(long, conflicts_with = "user")]
        group: Option<String>,
    },
}

/// `capybara group …`.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group.
    Create {
        /// The group.
        name: String,
    },
    /// Delete a group (its members lose its policy).
    Delete {
        /// The group.
        name: String,
    },
    /// Add users to a group.
    Add {
        /// The group.
        name: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove users from a group.
    Remove {
        /// The group.
        name: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Every group with its members and policy.
    List,
    /// Change a group's policy.
    Policy {
        /// The group.
        name: String,
        #[command(flatten)]
        limits: Box<LimitArgs>,
        /// One budget per period for all members, e.g. 2TB (none removes it).
        #[arg(long)]
        shared_limit: Option<String>,
    },
}

/// `capybara policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Every effective field of a user and the layer it came from.
    Explain {
        /// The user.
        user: String,
    },
    /// Apply a policy file (users, limits, groups, quota templates, default): prints the diff,
    /// then applies it all or nothing.
    Apply {
        /// The YAML file.
        file: PathBuf,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// What applying a policy file would change.
    Diff {
        /// The YAML file.
        file: PathBuf,
    },
    /// The current state as a policy file.
    Export {
        /// Write to this file instead of standard output.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// A policy layer on one table cell (`-` when empty).
pub(super) fn limits_line(l: &Limits) -> String {
    l.summary().unwrap_or_else(|| "-".into())
}

fn print_limits(cli: &Cli, who: &str, l: &Limits) {
    if cli.json {
        print_json(l);
        return;
    }
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let v = serde_json::to_value(l).unwrap_or_default();
    for (k, v) in v.as_object().into_iter().flatten() {
        t.row(vec![k.clone(), v.as_str().unwrap_or_default().to_owned()]);
    }
    println!("{who}:");
    print!("{t}");
}

fn print_quotas(cli: &Cli, q: &[QuotaStatus]) {
    if cli.json {
        print_json(&q);
        return;
    }
    let mut t = Table::new(&[
        "USER", "PLAN", "USED", "BUDGET", "CUTOFF", "USED %", "PERIOD", "SINCE", "OVER",
    ]);
    for s in q {
        let pct = if s.limit_bytes > 0 {
            format!("{:.1}", s.used_bytes as f64 * 100.0 / s.limit_bytes as f64)
        } else {
            "-".into()
        };
        let size = |b: u64| {
            if b == 0 {
                "-".to_owned()
            } else {
                ByteSize(b).to_string()
            }
        };
        t.row(vec![
            s.user.clone(),
            s.plan.clone(),
            s.used_bytes.to_string(),
            size(s.limit_bytes),
            size(s.cutoff_bytes),
            pct,
            s.period.clone(),
            s.period_start
                .map_or_else(|| "-".into(), |p| time(p.max(0) as u64)),
            if s.exceeding { "yes" } else { "no" }.into(),
        ]);
    }
    print!("{t}");
}

/// Runs `capybara quota …`.
pub async fn quota(cli: &Cli, cmd: &QuotaCmd) -> Result<(), CliError> {
    match cmd {
        QuotaCmd::Set {
            user,
            default: _,
            limits,
        } => {
            let text = limits.text();
            text.parse()?;
            let name = match user {
                Some(u) => UserName::parse("user", u)?.to_string(),
                None => String::new(),
            };
            let l = connect(cli).await?.set_limits(&name, &text).await?;
            let who = if name.is_empty() { "default" } else { &name };
            print_limits(cli, who, &l);
            Ok(())
        }
        QuotaCmd::Show { user } => {
            let name = match user {
                Some(u) => UserName::parse("user", u)?.to_string(),
                None => String::new(),
            };
            let c = connect(cli).await?;
            let q = c.show_quota(&name, false).await?;
            if let Some(u) = user
                && !cli.json
            {
                print_limits(cli, &format!("limits set on {u}"), &c.get_limits(u).await?);
                println!();
            }
            print_quotas(cli, &q);
            Ok(())
        }
        QuotaCmd::Report { exceeding } => {
            let q = connect(cli).await?.show_quota("", *exceeding).await?;
            print_quotas(cli, &q);
            Ok(())
        }
        QuotaCmd::Template(cmd) => super::templates::quota_template(cli, cmd).await,
        QuotaCmd::Reset { user, group } => {
            let (u, g) = match (user, group) {
                (Some(u), _) => (UserName::parse("user", u)?.to_string(), String::new()),
                (None, Some(g)) => (String::new(), GroupName::parse("group", g)?.to_string()),
                (None, None) => unreachable!("clap requires one"),
            };
            let q = connect(cli).await?.reset_quota(&u, &g).await?;
            print_quotas(cli, &q);
            Ok(())
        }
    }
}

/// Runs `capybara group …`.
pub async fn group(cli: &Cli, cmd: &GroupCmd) -> Result<(), CliError> {
    let check_users = |users: &[String]| -> Result<(), CliError> {
        for u in users {
            UserName::parse("users", u)?;
        }
        Ok(())
    };
    let g = match cmd {
        GroupCmd::Create { name } => {
            GroupName::parse("name", name)?;
            connect(cli).await?.create_group(name).await?
        }
        GroupCmd::Delete { name } => {
            GroupName::parse("name", name)?;
            connect(cli).await?.delete_group(name).await?
        }
        GroupCmd::Add { name, users } | GroupCmd::Remove { name, users } => {
            GroupName::parse("name", name)?;
            check_users(users)?;
            let add = matches!(cmd, GroupCmd::Add { .. });
            connect(cli).await?.group_members(name, users, add).await?
        }
        GroupCmd::Policy {
            name,
            limits,
            shared_limit,
        } => {
            GroupName::parse("name", name)?;
            let text = limits.text();
            text.parse()?;
            if let Some(s) = shared_limit {
                parse_field::<Cap<ByteSize>>("shared-limit", s)?;
            }
            connect(cli)
                .await?
                .set_group_policy(name, &text, shared_limit.clone())
                .await?
        }
        GroupCmd::List => {
            let gs = connect(cli).await?.list_groups().await?;
            if cli.json {
                print_json(&gs);
                return Ok(());
            }
            let mut t = Table::new(&["GROUP", "MEMBERS", "POLICY", "SHARED POOL"]);
            for g in &gs {
                t.row(vec![
                    g.name.to_string(),
                    g.members
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    limits_line(&g.limits),
                    g.shared_limit.map_or_else(|| "-".into(), |s| s.to_string()),
                ]);
            }
            print!("{t}");
            return Ok(());
        }
    };
    if cli.json {
        print_json(&g);
    } else {
        println!(
            "group {}: members {}; policy {}; shared pool {}",
            g.name,
            if g.members.is_empty() {
                "-".to_owned()
            } else {
                g.members
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            limits_line(&g.limits),
            g.shared_limit.map_or_else(|| "-".into(), |s| s.to_string())
        );
    }
    Ok(())
}

/// Runs `capybara policy …`.
pub async fn policy(cli: &Cli, cmd: &PolicyCmd) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Explain { user } => {
            UserName::parse("user", user)?;
            let rows = connect(cli).await?.explain_policy(user).await?;
            if cli.json {
                print_json(&rows);
                return Ok(());
            }
            let mut t = Table::new(&["FIELD", "VALUE", "FROM"]);
            for r in rows {
                t.row(vec![r.field, r.value, r.source]);
            }
            print!("{t}");
            Ok(())
        }
        PolicyCmd::Apply { file, dry_run } => apply(cli, file, *dry_run).await,
        PolicyCmd::Diff { file } => apply(cli, file, true).await,
        PolicyCmd::Export { file } => {
            let yaml = connect(cli).await?.export_policy_document().await?;
            match file {
                Some(path) => std::fs::write(path, yaml).map_err(|source| CliError::File {
                    path: path.clone(),
                    source,
                }),
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
    }
}

async fn apply(cli: &Cli, file: &PathBuf, dry_run: bool) -> Result<(), CliError> {
    let yaml = std::fs::read_to_string(file).map_err(|source| CliError::File {
        path: file.clone(),
        source,
    })?;
    // Validated here first, so a bad file is exit 2 with its line before any connection.
    PolicyDoc::from_yaml(&yaml)?;
    let (changes, applied) = connect(cli)
        .await?
        .apply_policy_document(&yaml, dry_run)
        .await?;
    if cli.json {
        print_json(&serde_json::json!({ "changes": changes, "applied": applied }));
        return Ok(());
    }
    for c in &changes {
        println!("{c}");
    }
    match (changes.is_empty(), applied) {
        (true, _) => println!("no changes"),
        (false, true) => println!("applied {} change(s)", changes.len()),
        (false, false) => println!("dry run: nothing changed"),
    }
    Ok(())
}
