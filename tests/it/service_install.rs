//! `cargo xtask install --prefix DIR` (issue 20, running as a service), no root needed: the
//! real xtask binary installs this build's binaries into a temporary prefix; every file is
//! checked where it should be (the unit with `systemd-analyze verify`, the man pages rendered
//! by `man -l`, the completions loaded by bash), a second run changes nothing, and an edited
//! `agent.toml` is kept with the new default written beside it.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use capybara_tests::agent_proc::xtask_install;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn install_into_a_prefix_writes_every_file_and_a_second_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let first = xtask_install(p);

    for bin in ["bin/capybara-agent", "bin/capybara"] {
        let meta = std::fs::metadata(p.join(bin)).unwrap_or_else(|e| panic!("{bin}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{bin}");
    }
    let version = Command::new(p.join("bin/capybara-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("capybara-agent "));

    // The unit: starts the installed binary with the installed file, and systemd accepts it.
    let unit_path = p.join("etc/systemd/system/capybara-agent.service");
    let unit = read(&unit_path);
    let exec = format!(
        "ExecStart={}/bin/capybara-agent --config {}/etc/capybara/agent.toml\n",
        p.display(),
        p.display()
    );
    assert!(unit.contains(&exec), "{unit}");
    assert!(unit.contains("Type=notify\n"), "{unit}");
    assert!(
        unit.contains("\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN"),
        "{unit}"
    );
    // verify also runs `man` for each page `Documentation=` names: the installed ones.
    let verify = Command::new("/usr/bin/systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", p.join("share/man"))
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify:\n{stderr}");
    assert!(
        !stderr.contains("capybara-agent.service"),
        "systemd-analyze verify warned about the unit:\n{stderr}"
    );

    // The configuration: every key commented out, and accepted by the installed agent as is
    // (`--help` after the file is read would not check it: `--config` with a bad data dir…
    // instead the file is parsed by a run that stops at the refused plain API listener).
    let config = p.join("etc/capybara/agent.toml");
    let text = read(&config);
    assert!(text.contains("\n#listen_port = 51820\n"), "{text}");
    assert!(
        text.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "an installed key is set:\n{text}"
    );
    let refused = Command::new(p.join("bin/capybara-agent"))
        .arg("--config")
        .arg(&config)
        .args(["--api-listen", "192.0.2.1:7443", "--no-api-socket"])
        .arg("--data-dir")
        .arg(p.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--insecure") && !p.join("data").exists(),
        "the installed agent.toml was not accepted:\n{err}"
    );

    // A bad key stops the agent before anything opens, naming the file and the key (exit 2).
    let bad = p.join("bad.toml");
    std::fs::write(&bad, "listen_port = 51820\nlisten-prot = 1\n").unwrap();
    let refused = Command::new(p.join("bin/capybara-agent"))
        .arg("--config")
        .arg(&bad)
        .arg("--data-dir")
        .arg(p.join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("unknown key `listen-prot`"),
        "{err}"
    );
    assert!(!p.join("data").exists());

    // Man pages render; completions exist and bash loads its file.
    for page in [
        "share/man/man8/capybara-agent.8",
        "share/man/man1/capybara.1",
        "share/man/man1/capybara-user-add.1",
    ] {
        let path = p.join(page);
        assert!(path.is_file(), "{page} missing");
        if Path::new("/usr/bin/man").exists() {
            let out = Command::new("man")
                .arg("-l")
                .arg(&path)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("capybara"),
                "{page}:\n{text}"
            );
            if page.ends_with("capybara-agent.8") {
                assert!(
                    text.contains("--listen-port") || text.contains("‐‐listen‐port"),
                    "{text}"
                );
            }
        }
    }
    for file in [
        "share/bash-completion/completions/capybara",
        "share/bash-completion/completions/capybara-agent",
        "share/zsh/site-functions/_capybara",
        "share/zsh/site-functions/_capybara-agent",
        "share/fish/vendor_completions.d/capybara.fish",
        "share/fish/vendor_completions.d/capybara-agent.fish",
    ] {
        assert!(p.join(file).is_file(), "{file} missing");
    }
    let bash = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p capybara-agent",
            p.join("share/bash-completion/completions/capybara-agent")
                .display()
        ))
        .output()
        .unwrap();
    assert!(
        bash.status.success(),
        "bash cannot load the completion: {}",
        String::from_utf8_lossy(&bash.stderr)
    );

    // Idempotent: nothing changes on a second run.
    let second = xtask_install(p);
    assert!(
        second.contains(" 0 files installed or updated"),
        "first:\n{first}\nsecond:\n{second}"
    );

    // An edited configuration stays; the default goes beside it.
    std::fs::write(&config, "listen_port = 51001\n").unwrap();
    let third = xtask_install(p);
    assert_eq!(read(&config), "listen_port = 51001\n");
    assert_eq!(read(&p.join("etc/capybara/agent.toml.new")), text);
    assert!(third.contains("agent.toml.new"), "{third}");
}

/// `capybara diagnose` with no agent: the agent, programs and store checks fail, each with a
/// hint saying how to start it; the run exits 1; the plain output has one line per check.
#[test]
fn diagnose_without_an_agent_fails_with_hints() {
    let bin = capybara_tests::agent_proc::agent_crate_binary("capybara");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-agent.sock");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "tunnel = \"capyt-nodiag\"\nlisten_port = 51999\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let run = |json: bool| {
        let mut c = Command::new(&bin);
        c.arg("--socket").arg(&socket);
        if json {
            c.arg("--json");
        }
        c.args(["diagnose", "--config"]).arg(&config);
        c.output().expect("run capybara diagnose")
    };
    let out = run(true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["ok"], false);
    let checks = doc["checks"].as_array().unwrap();
    let get = |n: &str| {
        checks
            .iter()
            .find(|c| c["check"] == n)
            .unwrap_or_else(|| panic!("no {n}: {doc:#}"))
    };
    let agent = get("agent");
    assert_eq!(agent["status"], "fail");
    assert!(
        agent["finding"].as_str().unwrap().contains("no-agent.sock"),
        "{agent}"
    );
    assert!(
        agent["hint"]
            .as_str()
            .unwrap()
            .contains("systemctl start capybara-agent"),
        "{agent}"
    );
    for n in ["programs", "store", "tunnel", "listen-port"] {
        assert_eq!(get(n)["status"], "fail", "{n}: {doc:#}");
        assert!(
            get(n)["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{n}: {doc:#}"
        );
    }
    assert!(
        get("tunnel")["finding"]
            .as_str()
            .unwrap()
            .contains("capyt-nodiag")
    );
    assert!(
        get("listen-port")["finding"]
            .as_str()
            .unwrap()
            .contains("51999")
    );
    for n in [
        "kernel",
        "clock",
        "disk",
        "forwarding",
        "nat",
        "mtu",
        "bpf",
        "btf",
        "xdp-tc",
        "tun",
    ] {
        get(n);
    }
    assert!(
        checks
            .iter()
            .all(|c| c["status"] == "ok" || c["hint"].is_string()),
        "{doc:#}"
    );

    let out = run(false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("agent"))
        .unwrap_or_else(|| panic!("no FAIL line for the agent:\n{text}"));
    assert!(line.contains("systemctl start capybara-agent"), "{line}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
