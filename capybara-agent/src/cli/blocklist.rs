//! `capybara blocklist list|add|remove|delete`: named lists of CIDRs, each enforced on sources
//! reaching the WireGuard port or on destinations of tunnel traffic (`--direction`).

use clap::{Subcommand, ValueEnum};

use super::{
    Cli, CliError, connect,
    output::{out, outln, print_json},
    table::Table,
};
use crate::blocklist::Direction;

/// `capybara blocklist …`.
#[derive(Debug, Subcommand)]
pub(super) enum BlocklistCmd {
    /// Every list with its size and hits.
    List,
    /// Add CIDRs to a list (creating it).
    Add {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Remove CIDRs from a list.
    Remove {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Delete a list.
    Delete {
        /// The list.
        name: String,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
}

/// `--direction`: the clap face of [`Direction`] (its values and their help).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Dir {
    /// Sources reaching the WireGuard port (XDP guard).
    Source,
    /// Destinations of tunnel traffic.
    Destination,
}

impl From<Dir> for Direction {
    fn from(d: Dir) -> Direction {
        match d {
            Dir::Source => Direction::Source,
            Dir::Destination => Direction::Destination,
        }
    }
}

/// Runs `capybara blocklist …`.
pub(super) async fn run(cli: &Cli, cmd: &BlocklistCmd) -> Result<(), CliError> {
    match cmd {
        BlocklistCmd::List => {
            let lists = connect(cli).await?.blocklists().await?;
            if cli.json {
                print_json(&lists)?;
                return Ok(());
            }
            let mut t = Table::new(&["DIRECTION", "NAME", "ENTRIES", "HIT PKTS", "HIT BYTES"]);
            for l in &lists {
                t.row(vec![
                    l.direction.to_string(),
                    l.name.clone(),
                    l.cidrs.len().to_string(),
                    l.hits.packets.to_string(),
                    l.hits.bytes.to_string(),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
        BlocklistCmd::Add {
            name,
            cidrs,
            direction,
        }
        | BlocklistCmd::Remove {
            name,
            cidrs,
            direction,
        } => {
            let add = matches!(cmd, BlocklistCmd::Add { .. });
            crate::api::lists::cidrs("cidrs", cidrs)?;
            crate::api::lists::list_name("name", name)?;
            let l = connect(cli)
                .await?
                .change_entries((*direction).into(), name, cidrs.clone(), add)
                .await?;
            if cli.json {
                print_json(&l)?;
            } else {
                outln!("{} {}: {} entries", l.direction, l.name, l.cidrs.len())?;
            }
            Ok(())
        }
        BlocklistCmd::Delete { name, direction } => {
            crate::api::lists::list_name("name", name)?;
            connect(cli)
                .await?
                .delete_blocklist((*direction).into(), name)
                .await?;
            if !cli.json {
                outln!("deleted {name}")?;
            }
            Ok(())
        }
    }
}
