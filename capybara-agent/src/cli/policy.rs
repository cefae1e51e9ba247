//! `capybara policy explain|apply|diff|export`: a user's effective policy field by field with
//! the layer each value came from, and the declarative policy file (users, limits, groups,
//! quota templates, default; format: `service::policy_file::doc`). A file is validated here first,
//! so a bad one is exit 2 naming its line before any connection; the agent prints the diff
//! and applies it all or nothing.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    input::read_text,
    output::{out, outln, print_json},
    table::Table,
};
use crate::service::{domain::UserName, policy_file::doc::PolicyDoc};

/// `capybara policy …`.
#[derive(Debug, Subcommand)]
pub(super) enum PolicyCmd {
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

/// Runs `capybara policy …`.
pub(super) async fn run(cli: &Cli, cmd: &PolicyCmd) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Explain { user } => {
            UserName::parse("user", user)?;
            let rows = connect(cli).await?.explain_policy(user).await?;
            if cli.json {
                print_json(&rows)?;
                return Ok(());
            }
            let mut t = Table::new(&["FIELD", "VALUE", "FROM"]);
            for r in rows {
                t.row(vec![r.field, r.value, r.source]);
            }
            out!("{t}")?;
            Ok(())
        }
        PolicyCmd::Apply { file, dry_run } => apply(cli, file, *dry_run).await,
        PolicyCmd::Diff { file } => apply(cli, file, true).await,
        PolicyCmd::Export { file } => {
            let yaml = connect(cli).await?.export_policy_document().await?;
            match file {
                Some(path) => std::fs::write(path, yaml).map_err(CliError::file(path)),
                None => {
                    out!("{yaml}")?;
                    Ok(())
                }
            }
        }
    }
}

/// `policy apply` (and, with `dry_run`, `policy diff`).
async fn apply(cli: &Cli, file: &Path, dry_run: bool) -> Result<(), CliError> {
    let yaml = read_text(file)?;
    // Validated here first, so a bad file is exit 2 with its line before any connection.
    PolicyDoc::from_yaml(&yaml)?;
    let (changes, applied) = connect(cli)
        .await?
        .apply_policy_document(&yaml, dry_run)
        .await?;
    if cli.json {
        print_json(&serde_json::json!({ "changes": changes, "applied": applied }))?;
        return Ok(());
    }
    for c in &changes {
        outln!("{c}")?;
    }
    match (changes.is_empty(), applied) {
        (true, _) => outln!("no changes")?,
        (false, true) => outln!("applied {} change(s)", changes.len())?,
        (false, false) => outln!("dry run: nothing changed")?,
    }
    Ok(())
}
