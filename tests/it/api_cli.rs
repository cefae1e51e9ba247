//! The `capybara` binary against an in-process agent API (real gRPC server, real store, the
//! in-memory dataplane and tunnel): the user lifecycle with configs and QR codes, tokens over
//! TCP, tables and `--json`, exit code 2 with a one-line reason on bad input, error lines with
//! their hints, a closed pipe on standard output, no token over plain HTTP off the machine, and
//! files holding private keys written 0600.

use std::{
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

/// [`Cli::fails`], and the line is the CLI's `error: …` form.
fn fails(cli: &Cli, code: i32, args: &[&str], needle: &str) {
    let stderr = cli.fails(code, args, needle);
    assert!(stderr.starts_with("error: "), "{stderr}");
}

fn start(keep: bool) -> (tokio::runtime::Runtime, TestApi, PathBuf) {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(keep));
    (rt, api, bin)
}

#[test]
fn user_lifecycle_with_config_qr_and_png() {
    let (_rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    let png = api.dir.path().join("alice.png");
    let out = cli.ok(&[
        "user",
        "add",
        "alice",
        "--device",
        "laptop",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(out.starts_with("[Interface]\nPrivateKey = "), "{out}");
    assert!(out.contains("Endpoint = 192.0.2.1:51820"), "{out}");
    assert!(
        out.contains('█') || out.contains('▀'),
        "no QR code on the terminal"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let table = cli.ok(&["user", "list"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("USER "));
    assert!(lines.next().unwrap().starts_with("alice "));
    let users = cli.json(&["user", "list"]);
    assert_eq!(users[0]["user"]["name"], "alice");
    assert_eq!(users[0]["peers"][0]["device"], "laptop");

    let show = cli.ok(&["user", "show", "alice"]);
    assert!(show.contains("laptop"), "{show}");

    // Shown once: without kept keys the config is a failed precondition (exit 1)…
    fails(&cli, 1, &["user", "config", "alice"], "shown once");
    // … and --rotate makes a new key pair.
    let rotated = cli.json(&["user", "config", "alice", "--rotate"]);
    assert!(rotated["private_key"].as_str().unwrap().len() == 44);

    cli.ok(&["device", "add", "alice", "phone", "--no-qr"]);
    // Two devices and none named: the agent's INVALID_ARGUMENT, exit 2.
    fails(&cli, 2, &["user", "config", "alice", "--rotate"], "device:");

    assert!(cli.ok(&["kick", "alice"]).contains("2 device(s)"));
    let stats = cli.json(&["stats", "alice"]);
    assert_eq!(stats["peers"].as_array().unwrap().len(), 2);
    assert!(cli.ok(&["stats"]).starts_with("USER "));
    assert!(cli.ok(&["connections"]).contains("phone"));
    let audit = cli.json(&["history", "audit", "--user", "alice"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["connection.kick", "peer.add", "peer.rotate", "user.add"]
    );
    assert_eq!(audit[0]["actor"], "uid:0");

    cli.ok(&["device", "remove", "alice", "phone"]);
    cli.ok(&["user", "remove", "alice"]);
    fails(&cli, 1, &["user", "show", "alice"], "not found");
    let health = cli.ok(&["health"]);
    let rows: Vec<Vec<&str>> = health
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 6, "{health}");
    assert!(rows.iter().all(|r| r[1] == "serving"), "{health}");
    // Each component has a DETAIL; the in-process agent runs no session recorder.
    assert!(rows[1..].iter().all(|r| r.len() > 2), "{health}");
    assert_eq!(rows[4][0], "history", "{health}");
    assert_eq!(rows[4][2..].join(" "), "no session recorder", "{health}");
}

#[test]
fn tokens_over_tcp_with_scopes() {
    let (_rt, api, bin) = start(false);
    let local = Cli::socket(&bin, &api.socket);
    let admin = local.ok(&[
        "api",
        "token",
        "create",
        "--scope",
        "admin",
        "--expires",
        "30d",
    ]);
    let admin = admin.trim();
    assert!(admin.starts_with("capy_") && !admin.contains('\n'));
    let a = Cli::tcp(&bin, &api, admin);
    let list = a.json(&["api", "token", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["scope"], "admin");
    assert!(list[0]["expires_at"].as_u64().unwrap() > 0);
    assert!(
        !list.to_string().contains(&admin[20..]),
        "the secret is never listed"
    );

    let made = a.json(&[
        "api", "token", "create", "--scope", "read", "--name", "dash",
    ]);
    let read = made["secret"].as_str().unwrap();
    let read_id = made["token"]["id"].as_str().unwrap();
    let r = Cli::tcp(&bin, &api, read);
    r.ok(&["user", "list"]);
    fails(&r, 1, &["user", "add", "bob"], "needs scope write");
    fails(&r, 1, &["api", "token", "list"], "needs scope admin");
    fails(
        &Cli::tcp(&bin, &api, "capy_0000000000000000_nope"),
        1,
        &["user", "list"],
        "invalid token",
    );

    a.ok(&["api", "token", "revoke", read_id]);
    fails(&r, 1, &["user", "list"], "token revoked");
    let listed = a.ok(&["api", "token", "list"]);
    assert!(listed.contains("dash"), "{listed}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let (_rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    fails(&cli, 2, &["user", "add", "Bad Name"], "name: invalid name");
    fails(
        &cli,
        2,
        &["user", "add", "ok", "--device", "a/b"],
        "device: invalid name",
    );
    fails(
        &cli,
        2,
        &["user", "add", "ok", "--expires", "soon"],
        "expires: invalid duration",
    );
    fails(
        &cli,
        2,
        &["api", "token", "create", "--scope", "root"],
        "scope: unknown scope",
    );
    fails(
        &cli,
        2,
        &["api", "token", "revoke", "xyz"],
        "id: invalid token id",
    );
    fails(
        &cli,
        2,
        &["blocklist", "add", "manual", "10.0.0.1/8"],
        "did you mean 10.0.0.0/8",
    );
    fails(&cli, 2, &["kick", "-x"], "");
    // Usage errors too.
    fails(&cli, 2, &["user", "add"], "required");
    fails(&cli, 2, &["frobnicate"], "unrecognized subcommand");
    // Nothing was created by any of it.
    assert_eq!(cli.json(&["user", "list"]), serde_json::json!([]));
    assert_eq!(cli.json(&["history", "audit"]), serde_json::json!([]));
}

#[test]
fn blocklists_from_the_cli() {
    let (_rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["blocklist", "add", "manual", "192.0.2.0/24", "198.51.100.7"]);
    cli.ok(&[
        "blocklist",
        "add",
        "malware",
        "203.0.113.0/24",
        "--direction",
        "destination",
    ]);
    let lists = cli.json(&["blocklist", "list"]);
    assert_eq!(lists.as_array().unwrap().len(), 2);
    cli.ok(&["blocklist", "remove", "manual", "198.51.100.7"]);
    let table = cli.ok(&["blocklist", "list"]);
    assert!(
        table.contains("manual") && table.contains("malware"),
        "{table}"
    );
    fails(
        &cli,
        1,
        &[
            "blocklist",
            "delete",
            "manual",
            "--direction",
            "destination",
        ],
        "not found",
    );
    cli.ok(&["blocklist", "delete", "manual"]);
    assert_eq!(
        cli.json(&["blocklist", "list"]).as_array().unwrap().len(),
        1
    );
}

#[test]
fn a_far_expiry_is_refused_naming_the_field() {
    let (rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    // Year 10000 (once accepted, and then `user list` panicked formatting it): refused as tokens'
    // expiries are, naming the field; nothing is stored.
    let client = rt.block_on(api.unix_client());
    let (code, m) = refused(rt.block_on(client.add_user("far", "", 253_402_300_800)));
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(m, "expires_at: too far in the future");
    // The CLI's bound is the same 100 years: exit 2 naming the field.
    fails(
        &cli,
        2,
        &["user", "add", "far", "--expires", "36501d"],
        "expires:",
    );
    assert_eq!(cli.json(&["user", "list"]), serde_json::json!([]));
    assert_eq!(cli.json(&["history", "audit"]), serde_json::json!([]));
    // Just inside the bound is fine, and shown.
    cli.ok(&["user", "add", "near", "--expires", "36499d", "--no-qr"]);
    let table = cli.ok(&["user", "list"]);
    let row = table.lines().find(|l| l.starts_with("near ")).unwrap();
    assert_eq!(
        row.matches('Z').count(),
        2,
        "created and expires as RFC 3339: {row}"
    );
}

/// Runs `cli` with `args`, its standard output a pipe of one page whose reader takes the first
/// line and closes it (`capybara … | head -1`); the output is larger than the pipe, so the
/// CLI writes after the close. Returns the exit code, the first line and standard error.
fn into_closed_pipe(cli: &Cli, args: &[&str]) -> (Option<i32>, String, String) {
    let (mut reader, writer) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let mut child = Command::new(&cli.bin)
        .args(&cli.args)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capybara");
    let mut first = Vec::new();
    let mut b = [0u8];
    while reader.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        first.push(b[0]);
    }
    drop(reader);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    (
        status.code(),
        String::from_utf8_lossy(&first).into_owned(),
        stderr,
    )
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let (rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    let client = rt.block_on(api.unix_client());
    // Enough devices that `user show` prints several pages.
    for i in 0..60 {
        rt.block_on(client.add_peer("alice", &format!("d{i}")))
            .unwrap();
    }
    for args in [
        &["user", "show", "alice"][..],
        &["user", "list", "--json"],
        &["user", "config", "alice", "--device", "d7", "--rotate"],
    ] {
        let (code, first, stderr) = into_closed_pipe(&cli, args);
        assert!(!first.is_empty(), "{args:?}: no first line");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr, "", "{args:?}: quiet");
        // 128 + SIGPIPE, what a shell shows for a writer the pipe's close ended.
        assert_eq!(code, Some(141), "{args:?}: {stderr}");
    }
}

#[test]
fn errors_print_the_message_and_a_hint_and_the_code_only_when_verbose() {
    let (_rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    // FAILED_PRECONDITION: the agent's message (which says what to do), not the code's
    // description.
    let line = cli.fails(1, &["user", "config", "alice"], "shown once");
    assert_eq!(
        line,
        "error: the private key of alice/default was shown once and not kept; use --rotate for a \
         new key pair (or run the agent with --keep-client-keys)\n"
    );
    let line = cli.fails(1, &["--verbose", "user", "config", "alice"], "shown once");
    assert!(line.contains("FailedPrecondition"), "{line}");
    // INVALID_ARGUMENT keeps exit 2 and its one line.
    cli.ok(&["device", "add", "alice", "phone", "--no-qr"]);
    let line = cli.fails(2, &["user", "config", "alice", "--rotate"], "device:");
    assert_eq!(line, "error: device: alice has 2 devices; name one\n");
    // No agent on the socket: how to start one, or which flag names it.
    let gone = Cli::socket(&bin, &api.dir.path().join("nowhere.sock"));
    let line = gone.fails(1, &["user", "list"], "cannot connect to the agent");
    assert!(
        line.contains("cargo xtask run") && line.contains("--socket"),
        "{line}"
    );
    assert!(!line.contains("code:"), "{line}");
    // No token over TCP: which flag gives one.
    let anon = Cli {
        bin: bin.clone(),
        args: vec!["--endpoint".into(), api.url()],
    };
    let line = anon.fails(1, &["user", "list"], "missing bearer token");
    assert!(line.contains("--token"), "{line}");
    assert!(!line.contains("code:"), "{line}");
    let line = anon.fails(1, &["--verbose", "user", "list"], "missing bearer token");
    assert!(line.contains("Unauthenticated"), "{line}");
}

#[test]
fn a_token_is_never_sent_over_plain_http_off_the_machine() {
    let bin = agent_crate_binary("capybara");
    // TEST-NET-1: the refusal comes before any connection, so nothing is sent and it is quick.
    for url in ["http://192.0.2.1:7443", "http://[2001:db8::1]:7443"] {
        let cli = Cli {
            bin: bin.clone(),
            args: vec![
                "--endpoint".into(),
                url.into(),
                "--token".into(),
                "capy_0000000000000000_secret".into(),
            ],
        };
        let t = Instant::now();
        let line = cli.fails(2, &["user", "list"], "--endpoint");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            line.starts_with("error: ") && line.contains("https://"),
            "{line}"
        );
    }
}

#[test]
fn a_token_goes_over_plain_http_to_loopback() {
    let (_rt, api, bin) = start(false);
    let token = api.token(capybara_agent::service::domain::Scope::Read);
    let port = api.tcp.port();
    for url in [api.url(), format!("http://localhost:{port}")] {
        let cli = Cli {
            bin: bin.clone(),
            args: vec!["--endpoint".into(), url, "--token".into(), token.clone()],
        };
        assert_eq!(cli.json(&["user", "list"]), serde_json::json!([]));
    }
}

#[test]
fn files_holding_private_keys_are_written_0600() {
    let (_rt, api, bin) = start(false);
    let cli = Cli::socket(&bin, &api.socket);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let png = api.dir.path().join("alice.png");
    cli.ok(&[
        "user",
        "add",
        "alice",
        "--no-qr",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert_eq!(mode(&png), 0o600, "user add --png");
    let png2 = api.dir.path().join("alice2.png");
    cli.ok(&[
        "user",
        "config",
        "alice",
        "--rotate",
        "--no-qr",
        "--png",
        png2.to_str().unwrap(),
    ]);
    assert_eq!(mode(&png2), 0o600, "user config --png");
    let backup = api.dir.path().join("store.backup");
    cli.ok(&["backup", "create", "--output", backup.to_str().unwrap()]);
    assert_eq!(mode(&backup), 0o600, "backup create");
    // A file that was there with a wider mode is narrowed before anything is written to it.
    std::fs::set_permissions(&backup, std::fs::Permissions::from_mode(0o644)).unwrap();
    cli.ok(&["backup", "create", "--output", backup.to_str().unwrap()]);
    assert_eq!(mode(&backup), 0o600, "backup create over a 0644 file");
    cli.ok(&[
        "user",
        "config",
        "alice",
        "--rotate",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert_eq!(mode(&png), 0o600, "user config --png over an existing file");
}
