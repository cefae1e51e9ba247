//! Running external commands, and the paths xtask works with.
//!
//! Every command is built with [`cmd`] (which puts `<cache>/tools/bin` first on the child's
//! `PATH`, so bpf-linker and boringtun-cli are found) and started through [`run`], [`status`] or
//! [`output`], which echo it as `$ program args…` on stderr first (`run` of `cargo xtask run`
//! echoes the agent itself before it spawns it).
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

/// Default persistent cache (tools, LLVM prefix) outside the clone; `CAPYBARA_CACHE` overrides.
const DEFAULT_CACHE: &str = "/var/cache/capybara";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // `cargo run` sets the variable at run time too. Prefer that: the compile-time path goes
        // stale when a shared target dir's xtask binary was built from another checkout.
        let xtask = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        xtask.parent().unwrap_or(&xtask).to_path_buf()
    })
}

/// The persistent cache directory: `$CAPYBARA_CACHE`, else `/var/cache/capybara`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CAPYBARA_CACHE")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from)
}

/// Where setup installs bpf-linker and boringtun-cli (`cargo install --root`).
pub fn tools_root() -> PathBuf {
    cache_dir().join("tools")
}

/// `PATH` for every child: `<cache>/tools/bin` first, then the caller's `PATH`.
fn child_path() -> &'static OsStr {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let mut dirs = vec![tools_root().join("bin")];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).unwrap_or_else(|_| std::env::var_os("PATH").unwrap_or_default())
    })
}

/// A command for `program`, run from the workspace root, with the tools on `PATH`.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(workspace_root())
        .env("PATH", child_path());
    command
}

/// The target directory cargo uses for this workspace (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> Result<PathBuf> {
    let metadata = cargo_metadata()?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata: no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// `cargo metadata --no-deps` of the workspace, as JSON.
pub fn cargo_metadata() -> Result<serde_json::Value> {
    let out = output(cmd("cargo").args(["metadata", "--format-version", "1", "--no-deps"]))?;
    serde_json::from_slice(&out.stdout).context("parse the output of `cargo metadata`")
}

/// Echo `command`, run it with inherited stdio and fail unless it exits successfully.
pub fn run(command: &mut Command) -> Result<()> {
    let status = status(command)?;
    check(command, status)
}

/// Echo `command`, run it with inherited stdio and return its exit status.
pub fn status(command: &mut Command) -> Result<ExitStatus> {
    echo(command);
    command
        .status()
        .with_context(|| format!("cannot start `{}`", display(command)))
}

/// Echo `command`, run it capturing stdout (stderr passes through) and fail unless it succeeds.
pub fn output(command: &mut Command) -> Result<Output> {
    let out = output_unchecked(command)?;
    check(command, out.status)?;
    Ok(out)
}

/// Echo `command` and run it capturing stdout; the exit status is the caller's to judge.
pub fn output_unchecked(command: &mut Command) -> Result<Output> {
    echo(command);
    command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{}`", display(command)))
}

/// Fail with the command line if `status` is not success.
pub fn check(command: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed ({status})", display(command));
    }
    Ok(())
}

/// Print `$ command` on stderr, the way a shell transcript would show it.
pub fn echo(command: &Command) {
    say(format_args!("$ {}", display(command)));
}

/// A line on stderr that never panics (unlike `eprintln!`), so cleanup code can report even
/// when stderr is a closed pipe.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The command as a shell would read it: `cd DIR && ENV=v program args…` (the working
/// directory only when it is not the workspace root; `PATH` is not shown).
pub fn display(command: &Command) -> String {
    let mut words = Vec::new();
    if let Some(dir) = command.get_current_dir()
        && dir != workspace_root()
    {
        let shown = dir.strip_prefix(workspace_root()).unwrap_or(dir);
        words.push(format!("cd {} &&", quote(shown.as_os_str())));
    }
    for (key, value) in command.get_envs() {
        if key == "PATH" {
            continue;
        }
        match value {
            Some(value) => words.push(format!("{}={}", key.to_string_lossy(), quote(value))),
            None => words.push(format!("env -u {}", key.to_string_lossy())),
        }
    }
    words.push(quote(command.get_program()));
    words.extend(command.get_args().map(quote));
    words.join(" ")
}

/// Single-quote a word if a shell would otherwise split or expand it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether the effective user is root (setup, run and the privileged tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
