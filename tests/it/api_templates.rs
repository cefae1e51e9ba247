//! Quota templates and configuration templates through the `capybara` binary and gRPC, against
//! an in-process agent API (real server, real store, the in-memory dataplane): a quota template
//! applied to a user is its `template:NAME` layer in `policy explain` and in the kernel state;
//! the policy file carries templates and round-trips; configuration templates apply, export and
//! import; a template saved over a built-in replaces it until deleted; bad input names the field or line and changes nothing.

use std::path::PathBuf;

use capybara_agent::{
    api::client::Client,
    dataplane::PeerRates,
    service::{domain::Scope, policy::model::LimitsText},
    units::Rate,
};
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

fn start() -> (tokio::runtime::Runtime, TestApi, PathBuf) {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    (rt, api, bin)
}

fn rate(mbit: u64) -> PeerRates {
    let r = Some(Rate::mbit(mbit).unwrap());
    PeerRates {
        to_peer: r,
        from_peer: r,
    }
}

/// Everything a refused call must leave as it was.
fn snapshot(rt: &tokio::runtime::Runtime, api: &TestApi, c: &Client) -> String {
    rt.block_on(async {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{:?}|{}",
            c.list_quota_templates().await.unwrap(),
            c.list_config_templates().await.unwrap(),
            c.get_config_template("current").await.unwrap(),
            c.get_limits("alice").await.unwrap(),
            c.audit("", 10_000).await.unwrap().len(),
            api.plane.state().policy.rates,
            c.export_policy_document().await.unwrap(),
        )
    })
}

#[test]
fn a_quota_template_applied_to_a_user_is_explained_and_in_the_kernel() {
    let (_rt, api, bin) = start();
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    cli.ok(&["user", "add", "bob", "--no-qr"]);
    cli.ok(&["quota", "set", "--default", "--bandwidth", "100Mbps"]);
    let out = cli.ok(&[
        "quota",
        "template",
        "create",
        "guest",
        "--bandwidth",
        "5Mbps",
        "--limit",
        "2GB",
        "--period",
        "daily",
        "--connections",
        "1",
        "--window",
        "Mon-Fri 08:00-18:00",
        "--tz",
        "Europe/Berlin",
    ]);
    assert!(out.contains("quota template guest"), "{out}");
    cli.ok(&["quota", "template", "apply", "guest", "alice"]);
    let explain = cli.json(&["policy", "explain", "alice"]);
    let source = |f: &str| {
        explain
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["field"] == f)
            .unwrap_or_else(|| panic!("{f} in {explain}"))["source"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(source("bandwidth"), "template:guest");
    assert_eq!(source("window"), "template:guest");
    assert_eq!(source("tz"), "template:guest");
    let table = cli.ok(&["policy", "explain", "alice"]);
    assert!(table.contains("template:guest"), "{table}");
    // The kernel state of the user's device follows the template; bob keeps the default.
    let users = api.svc.users.list_users().unwrap();
    let id = |n: &str| {
        users
            .iter()
            .find(|u| u.user.name.as_str() == n)
            .unwrap()
            .peers[0]
            .id
    };
    let rates = api.plane.state().policy.rates;
    assert_eq!(rates.get(&id("alice")), Some(&rate(5)));
    assert_eq!(rates.get(&id("bob")), Some(&rate(100)));
    let list = cli.json(&["quota", "template", "list"]);
    assert_eq!(list[0]["users"][0], "alice", "{list}");
    let show = cli.ok(&["quota", "template", "show", "guest"]);
    assert!(show.contains("5mbit") && show.contains("alice"), "{show}");
    // Delete is refused while applied, naming the user; detach then delete.
    let line = cli.fails(1, &["quota", "template", "delete", "guest"], "alice");
    assert!(line.contains("detach"), "{line}");
    cli.ok(&["quota", "template", "detach", "alice"]);
    assert_eq!(
        api.plane.state().policy.rates.get(&id("alice")),
        Some(&rate(100))
    );
    cli.ok(&["quota", "template", "apply", "guest", "alice"]);

    // The policy file carries templates: export → apply on an empty agent reproduces it, and
    // export → import → export is identical.
    let file = api.dir.path().join("policy.yaml");
    cli.ok(&["policy", "export", "--file", file.to_str().unwrap()]);
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(
        yaml.contains("templates:") && yaml.contains("template: guest"),
        "{yaml}"
    );
    let (rt2, api2, _) = start();
    let cli2 = Cli::socket(&bin, &api2.socket);
    cli2.ok(&["policy", "apply", file.to_str().unwrap()]);
    let again = cli2.ok(&["policy", "export"]);
    assert_eq!(again, yaml);
    assert!(
        cli2.ok(&["policy", "apply", file.to_str().unwrap()])
            .contains("no changes")
    );
    let explain2 = cli2.ok(&["policy", "explain", "alice"]);
    assert!(explain2.contains("template:guest"), "{explain2}");
    // A user naming a template the file does not have: refused naming the user, nothing applied.
    let c2 = rt2.block_on(api2.unix_client());
    let before = snapshot(&rt2, &api2, &c2);
    let bad = api.dir.path().join("bad.yaml");
    std::fs::write(&bad, yaml.replace("template: guest", "template: ghost")).unwrap();
    let line = cli2.fails(2, &["policy", "apply", bad.to_str().unwrap()], "ghost");
    assert!(
        line.contains("alice") && line.contains("template"),
        "{line}"
    );
    assert_eq!(snapshot(&rt2, &api2, &c2), before, "nothing applied");
    drop(api2);
    drop(rt2);
    drop(api);
}

#[test]
fn configuration_templates_apply_export_import_and_save_over_builtins() {
    let (rt, api, bin) = start();
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    let list = cli.ok(&["template", "list"]);
    for b in ["strict", "open", "corporate", "remote-worker", "guest"] {
        assert!(list.contains(b), "{b}: {list}");
    }
    let show = cli.ok(&["template", "show", "strict"]);
    assert!(
        show.starts_with("template strict (built in)\n")
            && show.contains("mfa_required")
            && show.contains("not enforced"),
        "{show}"
    );
    // Apply: the default limits reach the kernel, new configs carry the DNS.
    let out = cli.ok(&["template", "apply", "guest"]);
    assert!(out.contains("5mbit"), "{out}");
    let users = api.svc.users.list_users().unwrap();
    let alice = users[0].peers[0].id;
    assert_eq!(api.plane.state().policy.rates.get(&alice), Some(&rate(5)));
    let cfg = cli.ok(&["device", "add", "alice", "phone", "--no-qr"]);
    assert!(cfg.contains("DNS = 1.1.1.1, 1.0.0.1"), "{cfg}");
    let audit = cli.json(&["history", "audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "template.apply" && r["target"] == "template:guest"),
        "{audit}"
    );
    // Save current, export, import under another name, export again: identical.
    cli.ok(&["template", "save", "current", "mine"]);
    let file = api.dir.path().join("mine.yaml");
    cli.ok(&[
        "template",
        "export",
        "mine",
        "--file",
        file.to_str().unwrap(),
    ]);
    let yaml = std::fs::read_to_string(&file).unwrap();
    let copy = api.dir.path().join("copy.yaml");
    std::fs::write(&copy, yaml.replace("name: mine", "name: copy")).unwrap();
    cli.ok(&["template", "import", "--file", copy.to_str().unwrap()]);
    let back = cli.ok(&["template", "export", "copy"]);
    assert_eq!(back, yaml.replace("name: mine", "name: copy"));
    // Importing an existing name is refused unless --replace.
    cli.fails(
        1,
        &["template", "import", "--file", copy.to_str().unwrap()],
        "already exists",
    );
    cli.ok(&[
        "template",
        "import",
        "--file",
        copy.to_str().unwrap(),
        "--replace",
    ]);

    let c = rt.block_on(api.unix_client());
    // A template saved over a built-in is used instead of it until deleted (the design's
    // `template save current remote-worker`); a built-in itself cannot be deleted.
    let builtin_strict = rt.block_on(c.get_config_template("strict")).unwrap();
    let names = |c: &Client| -> Vec<String> {
        rt.block_on(c.list_config_templates())
            .unwrap()
            .into_iter()
            .map(|v| v.template.name.to_string())
            .collect()
    };
    let names_before = names(&c);
    assert!(builtin_strict.builtin && !builtin_strict.overrides_builtin);
    cli.ok(&["template", "save", "current", "strict"]);
    let saved = rt.block_on(c.get_config_template("strict")).unwrap();
    assert!(!saved.builtin && saved.overrides_builtin, "{saved:?}");
    assert_eq!(
        saved.template.limits,
        rt.block_on(c.get_config_template("current"))
            .unwrap()
            .template
            .limits,
        "the live settings, not the built-in's"
    );
    assert_ne!(saved.template.limits, builtin_strict.template.limits);
    let show = cli.ok(&["template", "show", "strict"]);
    assert!(show.contains("saved over the built-in"), "{show}");
    let list = cli.ok(&["template", "list"]);
    let row = list.lines().find(|l| l.starts_with("strict ")).unwrap();
    assert!(row.contains("stored (over built-in)"), "{row}");
    // In the built-in's place: the list keeps its names, order and length.
    assert_eq!(names(&c), names_before);
    cli.fails(
        1,
        &["template", "save", "current", "strict"],
        "already exists",
    );
    cli.ok(&["template", "delete", "strict"]);
    assert_eq!(
        rt.block_on(c.get_config_template("strict")).unwrap(),
        builtin_strict,
        "deleting the saved one brings the built-in back"
    );
    let before = snapshot(&rt, &api, &c);
    cli.fails(2, &["template", "delete", "guest"], "cannot be deleted");
    let (code, m) = refused(rt.block_on(c.delete_config_template("open")));
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        m.starts_with("name: ") && m.contains("cannot be deleted"),
        "{m}"
    );
    // YAML errors name the line and the field (CLI: before connecting; gRPC: the agent).
    let bad = api.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        yaml.replace("name: mine", "name: bad")
            .replace("5mbit", "10Mbsp"),
    )
    .unwrap();
    let line = cli.fails(
        2,
        &["template", "import", "--file", bad.to_str().unwrap()],
        "10Mbsp",
    );
    assert!(line.contains("line "), "{line}");
    let (code, m) = refused(
        rt.block_on(c.import_config_template(&std::fs::read_to_string(&bad).unwrap(), false)),
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(m.starts_with("file: line "), "{m}");
    // Unknown templates, bad names, a missing destination list.
    cli.fails(1, &["template", "apply", "nope"], "not found");
    cli.fails(2, &["template", "apply", "Bad Name"], "name");
    cli.fails(2, &["template", "save", "snapshot", "x"], "source");
    assert_eq!(
        snapshot(&rt, &api, &c),
        before,
        "the refusals changed nothing"
    );
    let needs = api.dir.path().join("needs.yaml");
    std::fs::write(&needs, "name: needs-ads\nblocklists: [ads]\n").unwrap();
    let (code, m) = refused(rt.block_on(async {
        c.import_config_template(&std::fs::read_to_string(&needs).unwrap(), false)
            .await
            .unwrap();
        c.apply_config_template("needs-ads").await
    }));
    assert_eq!(code, Code::NotFound);
    assert!(m.contains("blocklists") && m.contains("ads"), "{m}");
    rt.block_on(c.delete_config_template("needs-ads")).unwrap();
    // Quota template bad input over gRPC: the field is named, nothing changes.
    // (Tokens are made first: making one is audited.)
    let w = rt.block_on(api.tcp_client(Some(&api.token(Scope::Write))));
    let read = rt.block_on(api.tcp_client(Some(&api.token(Scope::Read))));
    let before_w = snapshot(&rt, &api, &c);
    for (t, field) in [
        (
            LimitsText {
                bandwidth: Some("10Mbsp".into()),
                ..LimitsText::default()
            },
            "bandwidth",
        ),
        (
            LimitsText {
                window: Some("Mon-Fri 25:00-18:00".into()),
                ..LimitsText::default()
            },
            "window",
        ),
    ] {
        let (code, m) = refused(rt.block_on(w.create_quota_template("t1", &t, false)));
        assert_eq!(code, Code::InvalidArgument);
        assert!(m.starts_with(&format!("{field}: ")), "{m}");
    }
    let (code, m) = refused(rt.block_on(w.apply_quota_template("ghost", &["alice".into()])));
    assert_eq!(code, Code::NotFound, "{m}");
    let (code, m) = refused(rt.block_on(w.apply_quota_template("Bad", &["alice".into()])));
    assert_eq!(code, Code::InvalidArgument);
    assert!(m.starts_with("name: "), "{m}");
    let (code, _) = refused(rt.block_on(read.apply_config_template("open")));
    assert_eq!(code, Code::PermissionDenied);
    cli.fails(
        2,
        &["quota", "template", "create", "t2", "--limit", "10XB"],
        "limit",
    );
    assert_eq!(snapshot(&rt, &api, &c), before_w, "nothing changed");
}
