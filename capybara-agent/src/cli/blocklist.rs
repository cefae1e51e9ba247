//! `capybara blocklist list|show|add|remove|delete`: named lists of CIDRs, each enforced on
//! sources reaching the WireGuard port or on destinations of tunnel traffic (`--direction`).
//!
//! The API answers lists with their entry counts and pages a list's entries (`GetBlocklist`),
//! so no answer grows with a list; where the CLI prints entries (`show`, and the JSON of
//! `list`, `add`, `remove`, unchanged) it fetches them page by page.

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
    /// Every entry of a list, one per line in address order.
    Show {
        /// The list.
        name: String,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Add CIDRs to a list (creating it).
    Add {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required_unless_present = "file")]
        cidrs: Vec<String>,
        /// Also the CIDRs of this file, one per line (blank lines and `#` comments skipped;
        /// `-` reads standard input): any size, sent in chunks and applied as one change.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Remove CIDRs from a list.
    Remove {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required_unless_present = "file")]
        cidrs: Vec<String>,
        /// Also the CIDRs of this file, one per line (blank lines and `#` comments skipped;
        /// `-` reads standard input): any size, sent in chunks and applied as one change.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
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
    /// Sources reaching the WireGuard port or the Shadowsocks and VLESS endpoints (XDP guard).
    Source,
    /// Destinations of tunnel and proxied traffic.
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
            let c = connect(cli).await?;
            let lists = c.blocklists().await?;
            if cli.json {
                let mut whole = Vec::with_capacity(lists.len());
                for l in &lists {
                    whole.push(c.blocklist(l.direction, &l.name).await?);
                }
                print_json(&whole)?;
                return Ok(());
            }
            let mut t = Table::new(&["DIRECTION", "NAME", "ENTRIES", "HIT PKTS", "HIT BYTES"]);
            for l in &lists {
                t.row(vec![
                    l.direction.to_string(),
                    l.name.clone(),
                    l.entries.to_string(),
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
            file,
            direction,
        }
        | BlocklistCmd::Remove {
            name,
            cidrs,
            file,
            direction,
        } => {
            let add = matches!(cmd, BlocklistCmd::Add { .. });
            crate::api::lists::list_name("name", name)?;
            let mut all = cidrs.clone();
            if !all.is_empty() {
                crate::api::lists::cidrs("cidrs", &all)?;
            }
            if let Some(f) = file {
                all.extend(file_entries(f)?);
            }
            if all.is_empty() {
                crate::api::lists::cidrs("cidrs", &all)?;
            }
            let c = connect(cli).await?;
            let l = c
                .change_entries((*direction).into(), name, all, add)
                .await?;
            if cli.json {
                print_json(&c.blocklist(l.direction, &l.name).await?)?;
            } else {
                outln!("{} {}: {} entries", l.direction, l.name, l.entries)?;
            }
            Ok(())
        }
        BlocklistCmd::Show { name, direction } => {
            crate::api::lists::list_name("name", name)?;
            let l = connect(cli)
                .await?
                .blocklist((*direction).into(), name)
                .await?;
            if cli.json {
                print_json(&l)?;
                return Ok(());
            }
            let mut text = String::with_capacity(l.cidrs.len() * 20);
            for c in &l.cidrs {
                text.push_str(&c.to_string());
                text.push('\n');
            }
            out!("{text}")?;
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

/// The entries of `--file` (`-` = standard input): one per line, blank lines and `#` comments
/// skipped; an invalid entry is refused naming `file` and its index among the file's entries
/// (the error quotes the entry).
fn file_entries(path: &std::path::Path) -> Result<Vec<String>, CliError> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|source| CliError::File {
        path: path.to_owned(),
        source,
    })?;
    let out: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if !out.is_empty() {
        crate::api::lists::cidrs("file", &out)?;
    }
    Ok(out)
}
