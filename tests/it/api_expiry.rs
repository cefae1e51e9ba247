//! Account expiry through the API and the `capybara` CLI (in-process agent, in-memory dataplane):
//! `user expire --at DATE | --in D`, `user renew [--at | --in]`, `user cleanup-expired [--grace]
//! [--dry-run]`; each reaches the device's gate (the admission deadline, or held as expired),
//! is audited and publishes `config-changed`; bad input exits 2 naming the field and changes
//! nothing; a read token may not change an expiry.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use capybara_agent::{
    dataplane::Gate,
    service::{
        ServiceEvent,
        domain::{Scope, from_unix_secs, unix_secs},
    },
};
use capybara_common::drop::DropReason;
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

fn start() -> (tokio::runtime::Runtime, TestApi, PathBuf) {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    (rt, api, bin)
}

/// The kernel gate of `user`'s only device.
fn gate(api: &TestApi, cli: &Cli, user: &str) -> Gate {
    let u = cli.json(&["user", "show", user]);
    let id = u["peers"][0]["id"].as_u64().unwrap() as u32;
    api.plane.state().gates[&id]
}

fn expires_at(cli: &Cli, user: &str) -> Option<u64> {
    cli.json(&["user", "show", user])["user"]["expires_at"].as_u64()
}

#[test]
fn expire_renew_and_cleanup_reach_the_gate_and_are_audited() {
    let (rt, api, bin) = start();
    let cli = Cli::socket(&bin, &api.socket);
    let mut events = api.svc.core.events().subscribe();
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    assert_eq!(gate(&api, &cli, "alice"), Gate::Admitted { until: None });

    // --in: admitted until then.
    let before = unix_secs(SystemTime::now());
    let out = cli.ok(&["user", "expire", "alice", "--in", "30d"]);
    assert!(out.starts_with("alice: expires "), "{out}");
    let at = expires_at(&cli, "alice").expect("an expiry");
    assert!((before + 30 * 86_400..=before + 30 * 86_400 + 5).contains(&at));
    assert_eq!(
        gate(&api, &cli, "alice"),
        Gate::Admitted {
            until: Some(from_unix_secs(at))
        }
    );
    // --at a day: its midnight UTC; --at RFC 3339.
    cli.ok(&["user", "expire", "alice", "--at", "2099-03-01"]);
    assert_eq!(expires_at(&cli, "alice"), Some(4_076_006_400));
    cli.ok(&[
        "user",
        "expire",
        "alice",
        "--at",
        "2099-03-01T01:00:00+01:00",
    ]);
    assert_eq!(expires_at(&cli, "alice"), Some(4_076_006_400));
    // In the past: held at once, and `user show` says why.
    cli.ok(&["user", "expire", "alice", "--at", "2020-01-01"]);
    assert_eq!(
        gate(&api, &cli, "alice"),
        Gate::Held(DropReason::GateExpired)
    );
    let show = cli.ok(&["user", "show", "alice"]);
    assert!(
        show.contains("2020-01-01T00:00:00Z (expired: its devices are held at the gate"),
        "{show}"
    );
    let explain = cli.json(&["policy", "explain", "alice"]);
    let row = explain
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["field"] == "expires")
        .unwrap_or_else(|| panic!("expires in {explain}"))
        .clone();
    assert_eq!(
        row["value"],
        "2020-01-01T00:00:00Z (expired: its devices are held at the gate, reason expired)"
    );
    assert_eq!(row["source"], "user");
    // Renew: cleared (admitted, no deadline), or set to a new time with --in.
    let out = cli.ok(&["user", "renew", "alice"]);
    assert_eq!(out, "alice: expires -\n");
    assert_eq!(gate(&api, &cli, "alice"), Gate::Admitted { until: None });
    cli.ok(&["user", "renew", "alice", "--in", "1d"]);
    assert!(expires_at(&cli, "alice").is_some());
    assert!(matches!(
        gate(&api, &cli, "alice"),
        Gate::Admitted { until: Some(_) }
    ));

    // cleanup-expired: a dry run lists and changes nothing; then bob (expired long ago) goes,
    // carol (expired an hour ago) stays within the default grace of 7 days, alice stays.
    cli.ok(&["user", "add", "bob", "--no-qr"]);
    cli.ok(&["user", "add", "carol", "--no-qr"]);
    cli.ok(&["user", "expire", "bob", "--at", "2020-01-01"]);
    let hour_ago = unix_secs(SystemTime::now()) - 3600;
    let client = rt.block_on(api.unix_client());
    rt.block_on(client.expire_user("carol", hour_ago as i64))
        .unwrap();
    let dry = cli.ok(&["user", "cleanup-expired", "--dry-run"]);
    assert_eq!(
        dry,
        "would remove bob (expired 2020-01-01T00:00:00Z) and 1 device(s)\nwould remove 1 expired user(s)\n"
    );
    assert_eq!(cli.json(&["user", "list"]).as_array().unwrap().len(), 3);
    let bob_id = cli.json(&["user", "show", "bob"])["peers"][0]["id"]
        .as_u64()
        .unwrap() as u32;
    let done = cli.ok(&["user", "cleanup-expired"]);
    assert!(done.starts_with("removed bob "), "{done}");
    assert!(
        !api.plane.state().peers.contains_key(&bob_id),
        "bob's kernel peer"
    );
    let names: Vec<String> = cli
        .json(&["user", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["alice", "carol"]);
    // No grace: carol goes too.
    let done = cli.json(&["user", "cleanup-expired", "--grace", "0"]);
    assert_eq!(done[0]["user"]["name"], "carol");

    // Audited, and each one published as config-changed.
    let audit = cli.ok(&["history", "audit"]);
    for action in ["user.expire", "user.renew", "user.cleanup"] {
        assert!(audit.contains(action), "{action} not in {audit}");
    }
    let mut actions = Vec::new();
    while let Ok(ServiceEvent::ConfigChanged { action, .. }) = events.try_recv() {
        actions.push(action);
    }
    let count = |a: &str| actions.iter().filter(|x| *x == a).count();
    assert_eq!(count("user.expire"), 6, "{actions:?}");
    assert_eq!(count("user.renew"), 2, "{actions:?}");
    assert_eq!(count("user.cleanup"), 2, "{actions:?}");
}

#[test]
fn bad_expiry_input_exits_2_naming_the_field_and_changes_nothing() {
    let (rt, api, bin) = start();
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    let audit = cli.json(&["history", "audit"]);
    // Exactly one of --at and --in (clap's usage error, exit 2).
    assert_eq!(cli.run(&["user", "expire", "alice"]).code, 2);
    assert_eq!(
        cli.run(&[
            "user",
            "expire",
            "alice",
            "--at",
            "2030-01-01",
            "--in",
            "1d"
        ])
        .code,
        2
    );
    cli.fails(2, &["user", "expire", "alice", "--at", "tomorrow"], "at: ");
    cli.fails(2, &["user", "expire", "alice", "--in", "30x"], "in: ");
    cli.fails(
        2,
        &["user", "expire", "alice", "--at", "2200-01-01"],
        "at: too far in the future",
    );
    cli.fails(
        2,
        &["user", "renew", "alice", "--at", "2020-01-01"],
        "at: is in the past",
    );
    cli.fails(
        2,
        &["user", "cleanup-expired", "--grace", "soon"],
        "grace: ",
    );
    cli.fails(1, &["user", "expire", "nobody", "--in", "1d"], "nobody");
    assert_eq!(cli.json(&["history", "audit"]), audit);
    assert_eq!(expires_at(&cli, "alice"), None);
    assert_eq!(gate(&api, &cli, "alice"), Gate::Admitted { until: None });

    // Over gRPC: a missing or negative time names the field; a read token may not.
    let client = rt.block_on(api.unix_client());
    let (code, m) = refused(rt.block_on(client.expire_user("alice", 0)));
    assert_eq!((code, m.as_str()), (Code::InvalidArgument, "at: required"));
    let (code, m) = refused(rt.block_on(client.expire_user("alice", -1)));
    assert_eq!(code, Code::InvalidArgument);
    assert!(m.starts_with("at: "), "{m}");
    let read = rt.block_on(api.tcp_client(Some(&api.token(Scope::Read))));
    let at = unix_secs(SystemTime::now() + Duration::from_secs(60)) as i64;
    let (code, _) = refused(rt.block_on(read.expire_user("alice", at)));
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) = refused(rt.block_on(read.cleanup_expired(Some(0), true)));
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(expires_at(&cli, "alice"), None);
}
