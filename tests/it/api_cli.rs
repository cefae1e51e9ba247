//! The `capybara` binary against an in-process agent API (real gRPC server, real store, the
//! in-memory dataplane and tunnel): the user lifecycle with configs and QR codes, tokens over
//! TCP, tables and `--json`, and exit code 2 with a one-line reason on bad input.

use std::path::PathBuf;

use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, TestApi};

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
    let rows: Vec<&str> = health.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{health}");
    assert!(rows.iter().all(|r| r.ends_with(" serving")), "{health}");
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
