//! `capybara group create|delete|add|remove|list|policy`: groups of users, their policy and
//! their shared pool. Names and limits are validated here with the agent's own parsers (exit 2
//! naming the field) before a connection is made.
//!
//! `group add|remove` take `GROUP USER…`, and also the design document's `USER GROUP`
//! (`group add alice engineering`). Only two arguments can be read both ways; then what exists
//! decides (`members_args`): the first names an existing group → `GROUP USER`; else the second
//! does → `USER GROUP`; both or neither → `GROUP USER` (so the agent's error names the group).

use clap::Subcommand;

use super::{
    Cli, CliError, connect, input,
    limits::{LimitArgs, limits_line},
    output::{names_line, out, outln, print_json},
    table::Table,
};
use crate::service::policy::{
    GroupView,
    model::{ByteSize, Cap, GroupName, parse_field},
};

/// `capybara group …`.
#[derive(Debug, Subcommand)]
pub(super) enum GroupCmd {
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
    /// Add users to a group: `GROUP USER…`, or `USER GROUP`.
    ///
    /// With two arguments, what exists decides: if the first names an existing group it is
    /// GROUP USER; else if the second does it is USER GROUP (one user, as in `group add alice
    /// engineering`); if both or neither do, GROUP USER.
    Add {
        /// The group (or the user, see above).
        name: String,
        /// The users (or the group, see above).
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove users from a group: `GROUP USER…`, or `USER GROUP`.
    ///
    /// With two arguments, what exists decides: if the first names an existing group it is
    /// GROUP USER; else if the second does it is USER GROUP (one user, as in `group remove
    /// alice engineering`); if both or neither do, GROUP USER.
    Remove {
        /// The group (or the user, see above).
        name: String,
        /// The users (or the group, see above).
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

/// The group and the users of `group add|remove FIRST SECOND` (see the module docs): `GROUP
/// USER` unless only `second` names one of `groups`.
fn members_args<'a>(
    first: &'a str,
    second: &'a str,
    groups: &[GroupView],
) -> (&'a str, Vec<String>) {
    let exists = |n: &str| groups.iter().any(|g| g.name.as_str() == n);
    if !exists(first) && exists(second) {
        (second, vec![first.to_owned()])
    } else {
        (first, vec![second.to_owned()])
    }
}

/// Runs `capybara group …`.
pub(super) async fn run(cli: &Cli, cmd: &GroupCmd) -> Result<(), CliError> {
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
            input::users(users)?;
            let add = matches!(cmd, GroupCmd::Add { .. });
            let c = connect(cli).await?;
            let (group, users) = match users.as_slice() {
                [second] => members_args(name, second, &c.list_groups().await?),
                _ => (name.as_str(), users.clone()),
            };
            c.group_members(group, &users, add).await?
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
                print_json(&gs)?;
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
            out!("{t}")?;
            return Ok(());
        }
    };
    if cli.json {
        print_json(&g)?;
    } else {
        outln!(
            "group {}: members {}; policy {}; shared pool {}",
            g.name,
            names_line(&g.members),
            limits_line(&g.limits),
            g.shared_limit.map_or_else(|| "-".into(), |s| s.to_string())
        )?;
    }
    Ok(())
}
