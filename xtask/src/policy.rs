//! `cargo xtask policy apply FILE [--dry-run] | diff FILE | export [--file F]`: the admins'
//! declarative path. The file is the desired state of users, their limits and quota template,
//! groups, quota templates and the server default (format:
//! `capybara-agent/src/service/policy/doc.rs`).
//!
//! xtask builds the `capybara` CLI and runs `capybara policy …`, which validates the file (a YAML
//! or value error names its line and field, exit 2, nothing sent) and calls the agent's
//! `ApplyPolicyDocument` / `ExportPolicyDocument` RPCs: over the control socket as root, or over
//! TCP with a token (`--endpoint URL --token T`, or `CAPYBARA_ENDPOINT` / `CAPYBARA_TOKEN`). The
//! agent prints the diff and applies it all or nothing; a second apply of the same file changes
//! nothing.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::exec::{self, cmd};

/// `cargo xtask policy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// The agent's TCP API, e.g. http://127.0.0.1:7443 (default: the control socket).
    #[arg(long, global = true, env = "CAPYBARA_ENDPOINT")]
    endpoint: Option<String>,
    /// Bearer token for --endpoint.
    #[arg(long, global = true, env = "CAPYBARA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The agent's control socket.
    #[arg(long, global = true, env = "CAPYBARA_SOCKET")]
    socket: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the diff, then apply the file atomically.
    Apply {
        /// The policy file (YAML).
        file: PathBuf,
        /// Only print the diff.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print what `apply` would change.
    Diff {
        /// The policy file (YAML).
        file: PathBuf,
    },
    /// Write the current state in the same format.
    Export {
        /// Write to this file (default: standard output).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Runs `cargo xtask policy …`.
pub fn run(args: &Args) -> Result<()> {
    exec::run(cmd("cargo").args([
        "build",
        "--quiet",
        "-p",
        "capybara-agent",
        "--bin",
        "capybara",
    ]))?;
    let cli = exec::target_dir()?.join("debug/capybara");
    let mut c = cmd(&cli);
    if let Some(e) = &args.endpoint {
        c.args(["--endpoint", e]);
    }
    if let Some(s) = &args.socket {
        c.arg("--socket").arg(s);
    }
    if let Some(t) = &args.token {
        // Through the environment, so the token is not echoed with the command line.
        c.env("CAPYBARA_TOKEN", t);
    }
    c.arg("policy");
    match &args.command {
        Command::Apply { file, dry_run } => {
            c.arg("apply").arg(file);
            if *dry_run {
                c.arg("--dry-run");
            }
        }
        Command::Diff { file } => {
            c.arg("diff").arg(file);
        }
        Command::Export { file } => {
            c.arg("export");
            if let Some(f) = file {
                c.arg("--file").arg(f);
            }
        }
    }
    let status = exec::status(&mut c)?;
    if !status.success() {
        bail!(
            "capybara policy failed ({status}){}",
            if status.code() == Some(2) {
                ": bad input, nothing was changed"
            } else {
                ""
            }
        );
    }
    Ok(())
}
