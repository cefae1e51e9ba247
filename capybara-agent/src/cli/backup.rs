//! `capybara backup …`: backups of the agent's store.
//!
//! - `backup create --output F`: a consistent snapshot of the agent's store (admin), written
//!   with mode 0600 (it holds the store's secrets: kept client keys, token hashes). The agent
//!   streams it in 1 MiB chunks; they go to a temporary file beside `F` (`.F.tmp`, 0600 from
//!   its creation), which is fsynced and renamed over `F` only once the stream ended well: an
//!   interrupted backup leaves `F` as it was.
//! - `backup create [--keep N]` (no `--output`): the agent writes `backup-<UTC time>.capy`
//!   into its backup directory (`--backup-dir`, default `<data dir>/backups`, mode 0700, files
//!   0600) and keeps the newest N there (`service::backup`: only files of that name pattern are
//!   ever deleted). What a scheduled backup does.
//! - `backup restore --input F [--data-dir D]`: replaces the store of a **stopped** agent with
//!   the backup, offline (see `store::backup`); its next start programs what was restored. The
//!   file is read as it is parsed (never whole in memory) and nothing is written unless all of
//!   it parsed and checked.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{create_private, outln, print_json},
};
use crate::paths;

/// Streams the agent's backup into a temporary file beside `output`, then renames it over
/// `output` (see the module docs).
async fn create(cli: &Cli, output: &Path) -> Result<BTreeMap<String, u64>, CliError> {
    let tmp = paths::temp_file(output);
    let result = async {
        let mut file = create_private(&tmp).map_err(CliError::file(&tmp))?;
        let records = {
            let mut w = std::io::BufWriter::new(&mut file);
            let records = connect(cli).await?.create_backup(&mut w).await?;
            w.flush().map_err(CliError::file(&tmp))?;
            records
        };
        file.sync_all().map_err(CliError::file(&tmp))?;
        std::fs::rename(&tmp, output).map_err(CliError::file(output))?;
        Ok(records)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `capybara backup …`.
#[derive(Debug, Subcommand)]
pub(super) enum BackupCmd {
    /// Write a consistent snapshot of the agent's store to a file (without --output: into the
    /// agent's backup directory, rotated with --keep).
    Create {
        /// The backup file (written here, by this command). Without it the agent writes
        /// backup-<UTC time>.capy into its backup directory (--backup-dir of the agent).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Keep the newest N backups in the agent's backup directory (this one included);
        /// older backup-*.capy files there are deleted, nothing else is.
        #[arg(long, value_name = "N", conflicts_with = "output",
              value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
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
        BackupCmd::Create { output: None, keep } => {
            let file = connect(cli).await?.create_backup_file(*keep).await?;
            if cli.json {
                print_json(&file)?;
            } else {
                let total: u64 = file.records.values().sum();
                outln!("backup written to {} ({total} records)", file.path)?;
                for d in &file.deleted {
                    outln!("deleted older backup {d}")?;
                }
            }
            Ok(())
        }
        BackupCmd::Create {
            output: Some(output),
            keep: _,
        } => {
            let records = create(cli, output).await?;
            if cli.json {
                print_json(&records)?;
            } else {
                let total: u64 = records.values().sum();
                outln!("backup written to {} ({total} records)", output.display())?;
            }
            Ok(())
        }
        BackupCmd::Restore { input, data_dir } => {
            let file = std::fs::File::open(input).map_err(CliError::file(input))?;
            let records = crate::store::backup::restore_from(data_dir, file)?;
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
