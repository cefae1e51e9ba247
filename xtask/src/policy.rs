//! `cargo xtask policy apply FILE [--dry-run] | diff FILE | export [--file F]`: the admins'
//! declarative path. The file is the desired state of users, their limits and quota template,
//! groups, quota templates and the server default (format:
//! `capybara-agent/src/service/policy/doc.rs`).
//!
//! xtask builds the `capybara` CLI and runs `capybara policy ARGS…` with its arguments as they
//! are: the commands and their options are the CLI's alone (`cargo xtask policy --help` prints
//! the CLI's help), so xtask does not depend on the agent crate and never repeats its grammar.
//! The CLI validates the file (a YAML or value error names its line and field, exit 2, nothing
//! sent) and calls the agent's `ApplyPolicyDocument` / `ExportPolicyDocument` RPCs: over the
//! control socket as root (`--socket PATH` or `CAPYBARA_SOCKET` for another), or over TCP with a
//! token (`--endpoint URL --token T`, before or after the command, or `CAPYBARA_ENDPOINT` /
//! `CAPYBARA_TOKEN`). The agent prints the diff and applies it all or nothing; a second apply of
//! the same file changes nothing.
//!
//! What xtask adds: the build, the token moved off the command line into the CLI's environment
//! (`CAPYBARA_TOKEN`) so the echoed command never shows it, and a last line on failure that says
//! whether the input was refused (exit 2: nothing was changed).

use std::ffi::OsString;

use anyhow::{Context as _, Result, bail};

use crate::exec::{self, cmd};

/// `cargo xtask policy`.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// `apply FILE [--dry-run] | diff FILE | export [--file F]` with the CLI's options
    /// (`--endpoint URL`, `--token T`, `--socket PATH`, …), passed on to `capybara policy` (a
    /// token through its environment); `--help` prints the CLI's help.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
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
    let (forwarded, token) = take_token(&args.args);
    let mut c = cmd(&cli);
    c.arg("policy").args(forwarded);
    // Echoed before the token is added: it reaches the CLI through its environment and never
    // shows in the transcript. (A token already in `CAPYBARA_TOKEN` is inherited as it is.)
    exec::echo(&c);
    if let Some(t) = token {
        c.env("CAPYBARA_TOKEN", t);
    }
    let status = c
        .status()
        .with_context(|| format!("cannot start `{}`", cli.display()))?;
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

/// Splits a `--token T` or `--token=T` (before any `--`) off the arguments. A `--token` without
/// a value (last, or followed by an option) stays, for the CLI to refuse: `--token --dry-run`
/// must never lose the `--dry-run`.
fn take_token(args: &[OsString]) -> (Vec<OsString>, Option<OsString>) {
    let mut rest = Vec::with_capacity(args.len());
    let mut token = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            rest.push(arg.clone());
            rest.extend(it.cloned());
            break;
        }
        if arg == "--token"
            && let Some(value) = it.as_slice().first()
            && !value.to_string_lossy().starts_with('-')
        {
            token = Some(value.clone());
            it.next();
        } else if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--token=")) {
            token = Some(value.into());
        } else {
            rest.push(arg.clone());
        }
    }
    (rest, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn the_token_leaves_the_command_line_and_the_rest_stays_in_order() {
        let (rest, token) = take_token(&words(
            "--endpoint http://127.0.0.1:7443 apply p.yaml --token capy_x --dry-run",
        ));
        assert_eq!(
            rest,
            words("--endpoint http://127.0.0.1:7443 apply p.yaml --dry-run")
        );
        assert_eq!(token, Some("capy_x".into()));
        let (rest, token) = take_token(&words("export --token=capy_y --file out.yaml"));
        assert_eq!(rest, words("export --file out.yaml"));
        assert_eq!(token, Some("capy_y".into()));
    }

    #[test]
    fn a_token_after_the_separator_or_without_a_value_is_left_to_the_cli() {
        let args = words("apply -- --token");
        assert_eq!(take_token(&args), (args.clone(), None));
        let args = words("diff p.yaml --token");
        assert_eq!(take_token(&args), (args.clone(), None));
        let args = words("apply p.yaml --token --dry-run");
        assert_eq!(take_token(&args), (args.clone(), None));
    }
}
