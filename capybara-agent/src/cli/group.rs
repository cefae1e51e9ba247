//! `capybara group create|delete|add|remove|list|policy`: groups of users, their policy and
//! their shared pool. Names and limits are validated here with the agent's own parsers (exit 2
//! naming the field) before a connection is made.

use clap::Subcommand;

use super::{
    Cli, CliError, connect, input,
    limits::{LimitArgs, limits_line},
    output::{names_line, out, outln, print_json},
    table::Table,
};
use crate::service::policy::model::{ByteSize, Cap, GroupName, parse_field};

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
