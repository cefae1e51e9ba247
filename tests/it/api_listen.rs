//! The agent binary and a plain TCP API on a network address (issue 19, item 3): refused at
//! start unless `--insecure` is given, before anything is opened. No root needed: every run
//! here ends before the dataplane (the refusal comes first; with `--insecure` the agent stops at
//! its bpffs directory, a plain temporary directory), and its data dir and pins are temporary.
//! The rule itself (loopback, TLS) is unit-tested in `capybara_agent::daemon`.

use std::{
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use capybara_tests::agent_proc::agent_crate_binary;

/// A documentation address (RFC 5737): not loopback, never this host's.
const NETWORK_ADDR: &str = "192.0.2.1:7443";

/// Runs `capybara-agent` with `extra` after flags that keep it inside `dir` (data dir, bpffs
/// dir, UAPI dir, a tunnel name of its own, no control socket); returns its exit status and its
/// output. Panics if it is still running after 60 s (it is killed first).
fn run_agent(dir: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let bin = agent_crate_binary("capybara-agent");
    let log = dir.join("agent.log");
    let out = std::fs::File::create(&log).expect("agent log");
    std::fs::create_dir_all(dir.join("bpffs")).unwrap();
    let mut child = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--bpffs")
        .arg(dir.join("bpffs"))
        .arg("--wg-uapi-dir")
        .arg(dir)
        .args(["--tunnel", "capyt-listen", "--no-api-socket"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("agent log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the agent") {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "capybara-agent still running after 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn plain_api_listener_on_a_network_address_is_refused_before_anything_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out) = run_agent(dir.path(), &["--api-listen", NETWORK_ADDR]);
    assert!(!status.success(), "the agent started:\n{out}");
    for needle in ["--api-listen", NETWORK_ADDR, "--api-tls-cert", "--insecure"] {
        assert!(
            out.contains(needle),
            "the error does not name {needle}:\n{out}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "the store was opened before the refusal:\n{out}"
    );
    assert!(
        !out.contains("dataplane"),
        "the dataplane was reached before the refusal:\n{out}"
    );
}

#[test]
fn insecure_allows_a_plain_network_listener_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (status, out) = run_agent(dir.path(), &["--api-listen", NETWORK_ADDR, "--insecure"]);
    // It goes on past the check and stops at the bpffs directory (not a bpf filesystem).
    assert!(!status.success(), "the agent started:\n{out}");
    assert!(out.contains("WARN"), "no warning:\n{out}");
    assert!(
        out.to_lowercase().contains("without tls") && out.contains(NETWORK_ADDR),
        "the warning does not say what is exposed:\n{out}"
    );
    assert!(
        out.contains("bpf filesystem"),
        "the agent did not go on to the dataplane:\n{out}"
    );
}
