//! The agent's binaries as processes in end-to-end tests: building them next to the test's own
//! executable, and starting `capybara-agent` in a namespace until it logs that it is ready.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nix::sys::signal::Signal;

use crate::netns::NetNs;

/// Builds a binary of the agent crate (a no-op when it is up to date) and returns its path,
/// next to this test's executable in the same target directory and profile.
pub fn agent_crate_binary(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<this test> → target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "-p", "capybara-agent", "--bin", name])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} to build {name}: {e}"));
    assert!(status.success(), "building {name} failed: {status}");
    let bin = profile_dir.join(name);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// Starts `cmd` (a `capybara-agent` command line) with `RUST_LOG=info` (unless `cmd` sets its
/// own) and its output in `log`,
/// hands the process to `ns` (killed when the namespace guard drops), and waits until it logs
/// "capybara-agent ready". Panics with the log when it exits first or is not ready within
/// `ready_within`. Returns its pid.
pub fn start_agent(ns: &NetNs, cmd: Command, log: &Path, ready_within: Duration) -> u32 {
    spawn_agent(ns, cmd, log, ready_within).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`start_agent`] for the benchmarks: an error instead of a panic, with the log.
pub fn spawn_agent(
    ns: &NetNs,
    mut cmd: Command,
    log: &Path,
    ready_within: Duration,
) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log)?;
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
    let child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let pid = ns.adopt(child);
    let end = Instant::now() + ready_within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("capybara-agent ready") {
            return Ok(pid);
        }
        ensure!(
            ns.is_running(pid),
            "capybara-agent ({}) exited before it was ready:\n{text}",
            log.display()
        );
        ensure!(
            Instant::now() < end,
            "capybara-agent ({}) not ready after {ready_within:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the agent `pid` in `ns`: SIGTERM, then SIGKILL if it still runs after 15 s.
pub fn stop_agent(ns: &NetNs, pid: u32) {
    ns.kill(pid, Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(15);
    while ns.is_running(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if ns.is_running(pid) {
        ns.kill(pid, Signal::SIGKILL);
    }
}

/// `capybara-agent` next to the running benchmark binary (`cargo xtask bench` builds both).
pub fn bench_agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("the bench binary has no directory")?
        .join("capybara-agent");
    ensure!(
        bin.exists(),
        "{} missing: `cargo xtask bench` builds it",
        bin.display()
    );
    Ok(bin)
}

/// Builds the xtask binary into the tests' target dir (as [`agent_crate_binary`] does the
/// agent's) and returns its path. xtask is built in the dev profile whatever the tests' profile.
pub fn xtask_binary() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let target_dir = profile_dir.parent().expect("target dir");
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "xtask", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} to build xtask: {e}"));
    assert!(status.success(), "building xtask failed: {status}");
    let bin = target_dir.join("debug").join("xtask");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// Runs `cargo xtask install --prefix <prefix> --binaries-from <this build's binaries>` (the
/// agent's binaries of the tests' profile, built first); panics with its output if it fails.
/// Returns its output (stdout and stderr).
pub fn xtask_install(prefix: &Path) -> String {
    let agent = agent_crate_binary("capybara-agent");
    agent_crate_binary("capybara");
    let out = Command::new(xtask_binary())
        .args(["install", "--prefix"])
        .arg(prefix)
        .arg("--binaries-from")
        .arg(agent.parent().expect("binary dir"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("run xtask install");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "xtask install failed:\n{text}");
    text
}
