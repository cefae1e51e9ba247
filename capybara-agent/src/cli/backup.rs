//! `capybara backup …`: backups of the agent's store.
//!
//! - `backup create --output F`: a consistent snapshot of the agent's store (admin), written
//!   with mode 0600 (it holds the store's secrets: kept client keys, token hashes).
//! - `backup restore --input F [--data-dir D]`: replaces the store of a **stopped** agent with
//!   the backup, offline (see `store::backup`); its next start programs what was restored.

use std::path::PathBuf;

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{outln, print_json, write_private},
};
use crate::paths;

/// `capybara backup …`.
#[derive(Debug, Subcommand)]
pub(super) enum BackupCmd {
    /// Write a consistent snapshot of the agent's store to a file.
    Create {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Replace a stopped agent's store with a backup (offline).
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        input: PathBuf,
        /// The stopped agent's data directory.
        #[arg(long, default_value = paths::DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// Runs `capybara backup …`.
pub(super) async fn run(cli: &Cli, cmd: &BackupCmd) -> Result<(), CliError> {
    match cmd {
        BackupCmd::Create { output } => {
            let (data, records) = connect(cli).await?.create_backup().await?;
            write_private(output, &data)?;
            if cli.json {
                print_json(&records)?;
            } else {
                let total: u64 = records.values().sum();
                outln!("backup written to {} ({total} records)", output.display())?;
            }
            Ok(())
        }
        BackupCmd::Restore { input, data_dir } => {
            let bytes = std::fs::read(input).map_err(CliError::file(input))?;
            let records = crate::store::backup::restore(data_dir, &bytes)?;
            if cli.json {
                print_json(&records)?;
            } else {
                let total: u64 = records.values().sum();
                outln!(
                    "restored {total} records into {}; start the agent to apply them",
                    data_dir.display()
                )?;
            }
            Ok(())
        }
    }
}
