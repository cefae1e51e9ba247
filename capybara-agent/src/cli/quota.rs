//! `capybara quota set|show|report|reset` (`reset USER`, `reset --group G`, `reset --all`; a user's own limits, the server default, quota
//! usage) and `capybara quota template …` (quota templates: a named layer of limits applied to
//! users, between their groups and the default). Values are validated here with the agent's own
//! parsers (exit 2 naming the field) before a connection is made.
//!
//! As the design writes them: `quota set alice --bandwidth 10Mbps --enforce` (`--enforce` is
//! accepted and changes nothing: limits are always enforced, in the kernel) and `quota template
//! create corporate` with no limits (an empty template, filled later with `--replace`).

use clap::Subcommand;

use super::{
    Cli, CliError, connect, input,
    limits::{LimitArgs, limits_line, limits_table},
    output::{names_line, out, outln, print_json, time},
    table::Table,
};
use crate::service::{
    domain::{UserName, ValidationError},
    policy::{
        QuotaStatus,
        model::{ByteSize, GroupName, Limits},
    },
    templates::model::{QuotaTemplateView, TemplateName},
};

/// `capybara quota …`.
#[derive(Debug, Subcommand)]
pub(super) enum QuotaCmd {
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
        /// Changes nothing: limits are always enforced, in the kernel (accepted so the design's
        /// `quota set alice --bandwidth 10Mbps --enforce` works as written).
        #[arg(long)]
        enforce: bool,
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
    Template(QuotaTemplateCmd),
    /// Start a new period now for a user's bucket, a group's pool, or (--all) every bucket
    /// and pool.
    Reset {
        /// The user.
        #[arg(required_unless_present_any = ["group", "all"])]
        user: Option<String>,
        /// The group whose pool to reset.
        #[arg(long, conflicts_with = "user")]
        group: Option<String>,
        /// Every user's bucket and every group's pool (a monthly reset; each audited).
        #[arg(long, conflicts_with_all = ["user", "group"])]
        all: bool,
    },
}

/// `capybara quota template …`.
#[derive(Debug, Subcommand)]
pub(super) enum QuotaTemplateCmd {
    /// Create a quota template (the same limit options as `quota set`; none: an empty one).
    ///
    /// Without limit options the template is empty (`quota template create corporate`): it
    /// sets nothing until `quota template create corporate --replace --bandwidth …` gives it its
    /// limits (--replace sets the template's limits to exactly the ones given; its users are
    /// updated).
    Create {
        /// The template.
        name: String,
        #[command(flatten)]
        limits: Box<LimitArgs>,
        /// Replace the limits of an existing template with exactly these (its users are
        /// updated; creates it if there is none).
        #[arg(long)]
        replace: bool,
    },
    /// Every quota template with its users.
    List,
    /// One quota template.
    Show {
        /// The template.
        name: String,
    },
    /// Delete a quota template (refused while users have it: detach them first).
    Delete {
        /// The template.
        name: String,
    },
    /// Make the template the users' template layer (a user has at most one).
    Apply {
        /// The template.
        name: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Detach the users' template (they fall back to their groups and the default).
    Detach {
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
}

fn print_limits(cli: &Cli, who: &str, l: &Limits) -> Result<(), CliError> {
    if cli.json {
        print_json(l)?;
        return Ok(());
    }
    outln!("{who}:")?;
    out!("{}", limits_table(l))?;
    Ok(())
}

fn print_quotas(cli: &Cli, q: &[QuotaStatus]) -> Result<(), CliError> {
    if cli.json {
        print_json(&q)?;
        return Ok(());
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
    out!("{t}")?;
    Ok(())
}

/// Runs `capybara quota …`.
pub(super) async fn run(cli: &Cli, cmd: &QuotaCmd) -> Result<(), CliError> {
    match cmd {
        QuotaCmd::Set {
            user,
            default: _,
            limits,
            enforce: _,
        } => {
            let text = limits.text();
            text.parse()?;
            let name = match user {
                Some(u) => UserName::parse("user", u)?.to_string(),
                None => String::new(),
            };
            let l = connect(cli).await?.set_limits(&name, &text).await?;
            let who = if name.is_empty() { "default" } else { &name };
            print_limits(cli, who, &l)?;
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
                print_limits(cli, &format!("limits set on {u}"), &c.get_limits(u).await?)?;
                outln!()?;
            }
            print_quotas(cli, &q)?;
            Ok(())
        }
        QuotaCmd::Report { exceeding } => {
            let q = connect(cli).await?.show_quota("", *exceeding).await?;
            print_quotas(cli, &q)?;
            Ok(())
        }
        QuotaCmd::Template(cmd) => template(cli, cmd).await,
        QuotaCmd::Reset {
            user: None,
            group: None,
            all: true,
        } => {
            let reset = connect(cli).await?.reset_all_quotas().await?;
            if cli.json {
                print_json(&reset)?;
            } else {
                outln!(
                    "reset {} quota bucket(s): {}",
                    reset.len(),
                    names_line(&reset)
                )?;
            }
            Ok(())
        }
        QuotaCmd::Reset { user, group, .. } => {
            let (u, g) = match (user, group) {
                (Some(u), _) => (UserName::parse("user", u)?.to_string(), String::new()),
                (None, Some(g)) => (String::new(), GroupName::parse("group", g)?.to_string()),
                (None, None) => unreachable!("clap requires one"),
            };
            let q = connect(cli).await?.reset_quota(&u, &g).await?;
            print_quotas(cli, &q)?;
            Ok(())
        }
    }
}

fn print_quota_template(cli: &Cli, t: &QuotaTemplateView) -> Result<(), CliError> {
    if cli.json {
        print_json(t)?;
    } else {
        outln!(
            "quota template {}: {}; users {}",
            t.name,
            limits_line(&t.limits),
            names_line(&t.users)
        )?;
    }
    Ok(())
}

/// Runs `capybara quota template …`.
async fn template(cli: &Cli, cmd: &QuotaTemplateCmd) -> Result<(), CliError> {
    match cmd {
        QuotaTemplateCmd::Create {
            name,
            limits,
            replace,
        } => {
            TemplateName::parse("name", name)?;
            let text = limits.text();
            let patch = text.parse()?;
            if !patch.clear.is_empty() {
                return Err(ValidationError::Name {
                    field: "clear",
                    value: patch.clear.join(","),
                    reason: "a template is created whole: leave the field out instead",
                }
                .into());
            }
            let t = connect(cli)
                .await?
                .create_quota_template(name, &text, *replace)
                .await?;
            print_quota_template(cli, &t)?;
        }
        QuotaTemplateCmd::List => {
            let ts = connect(cli).await?.list_quota_templates().await?;
            if cli.json {
                print_json(&ts)?;
                return Ok(());
            }
            let mut t = Table::new(&["TEMPLATE", "LIMITS", "USERS"]);
            for q in &ts {
                t.row(vec![
                    q.name.to_string(),
                    limits_line(&q.limits),
                    names_line(&q.users),
                ]);
            }
            out!("{t}")?;
        }
        QuotaTemplateCmd::Show { name } => {
            TemplateName::parse("name", name)?;
            let t = connect(cli).await?.get_quota_template(name).await?;
            if cli.json {
                print_json(&t)?;
                return Ok(());
            }
            outln!(
                "quota template {} (users {}):",
                t.name,
                names_line(&t.users)
            )?;
            out!("{}", limits_table(&t.limits))?;
        }
        QuotaTemplateCmd::Delete { name } => {
            TemplateName::parse("name", name)?;
            let t = connect(cli).await?.delete_quota_template(name).await?;
            if cli.json {
                print_json(&t)?;
            } else {
                outln!("deleted quota template {}", t.name)?;
            }
        }
        QuotaTemplateCmd::Apply { name, users } => {
            TemplateName::parse("name", name)?;
            input::users(users)?;
            let done = connect(cli)
                .await?
                .apply_quota_template(name, users)
                .await?;
            if cli.json {
                print_json(&serde_json::json!({ "template": name, "users": done }))?;
            } else {
                outln!("applied quota template {name} to {}", done.join(","))?;
            }
        }
        QuotaTemplateCmd::Detach { users } => {
            input::users(users)?;
            let done = connect(cli).await?.apply_quota_template("", users).await?;
            if cli.json {
                print_json(&serde_json::json!({ "template": null, "users": done }))?;
            } else {
                outln!("detached the quota template of {}", done.join(","))?;
            }
        }
    }
    Ok(())
}
