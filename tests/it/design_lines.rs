//! The design document's command lines, verbatim. `DESIGN-PHASE4.md` (the design Capybara was
//! built from) is the CLI's contract: each `capybara.py X` line in it works as `capybara X`,
//! arguments in that order, once its feature exists. [`DESIGN_LINES`] is every such line, in
//! the document's order; `every_design_line_works_verbatim` runs each one of an existing feature
//! with the built `capybara` binary against an in-process agent (its control socket, a fixture
//! country database), asserting exit 0 and something of its output, and checks at the end that
//! every line was either run or is listed in [`NOT_YET`] (its feature does not exist yet, with
//! the reason).
//!
//! Lines run in an order that makes each meaningful: `user add alice` and `bob` first (not
//! design lines: setup), `group policy engineering …` before `group delete engineering`, and
//! `template delete corporate-standard` (setup) between `template export` and `template import`
//! (which otherwise would import over the stored template). The placeholders of the lines
//! that are run are substituted: `api token revoke <id>` with the id `api token create`
//! printed, the webhook lines' `<url>` with a receiver on loopback (the agent lets every
//! webhook reach it, as with `--webhook-allow-private`: the design's lines have no
//! `--allow-private`, and traffic in tests stays on this machine) and `<id>` with the id the
//! first `webhook add` printed, `schedule run|enable|disable|delete <id>` with the id
//! `schedule add` gave.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use capybara_agent::geo::{GeoDb, mmdb_writer::MmdbWriter};
use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, Out, TestApi};

/// Every `capybara.py …` line of `DESIGN-PHASE4.md`, in its order, without `capybara.py` and
/// without the trailing comments.
const DESIGN_LINES: &[&str] = &[
    // 21. User Groups
    "group create engineering",
    "group add alice engineering",
    "group list",
    "group remove alice engineering",
    "group delete engineering",
    "group policy engineering --bandwidth 10Mbps",
    // 22. Session History & Audit Trail
    "history show",
    "history show alice",
    "history export --format csv",
    "history clear --older-than 90d",
    "history search --ip 1.2.3.4",
    "history audit --user alice",
    // 23. API Access
    "api enable",
    "api token create",
    "api token list",
    "api token revoke <id>",
    "api docs",
    "api test",
    // 24. Webhook Notifications
    "webhook add <url> --event user-connect",
    "webhook add <url> --event user-disconnect",
    "webhook add <url> --event quota-exceeded",
    "webhook add <url> --event server-down",
    "webhook add <url> --event suspicious-activity",
    "webhook list",
    "webhook test <id>",
    "webhook delete <id>",
    // 25. Scheduled Tasks & Automation
    r#"schedule add "backup create" --cron "0 2 * * *""#,
    r#"schedule add "report generate --format csv" --cron "0 9 * * MON""#,
    r#"schedule add "user cleanup-expired" --cron "0 3 * * *""#,
    "schedule list",
    "schedule run <id>",
    "schedule enable <id>",
    "schedule disable <id>",
    "schedule delete <id>",
    // 26. Multi-Factor Authentication (2FA)
    "mfa enable alice",
    "mfa disable alice",
    "mfa reset alice",
    "mfa status",
    "mfa require-all",
    // 27. Load Balancing & High Availability
    "cluster init",
    "cluster add server2.example.com",
    "cluster remove server2",
    "cluster balance",
    "cluster status",
    "cluster failover enable",
    "cluster health",
    // 28. Advanced User Quotas & Limits
    "quota set alice --limit 100GB --period monthly",
    "quota set alice --bandwidth 10Mbps --enforce",
    "quota set alice --connections 3",
    "quota set alice --time 8h",
    "quota template create corporate",
    "quota template apply corporate alice bob",
    "quota report --exceeding",
    // 29. Geographic Restrictions & IP Intelligence
    "geo block CN RU",
    "geo allow US CA GB",
    "geo list",
    "ip-intel enable",
    "ip-intel block-vpn",
    "ip-intel block-tor",
    // 30. Configuration Templates & Profiles
    "template save current corporate-standard",
    "template save current remote-worker",
    "template list",
    "template show corporate-standard",
    "template apply corporate-standard",
    "template export corporate-standard --file backup.yaml",
    "template import --file backup.yaml",
];

/// Design lines not run here (first words, why): their command does not exist yet, or needs
/// what this agent is not.
const NOT_YET: &[(&str, &str)] = &[
    (
        "cluster init",
        "membership commands do not exist yet (agents join with --etcd)",
    ),
    (
        "cluster add ",
        "membership commands do not exist yet (agents join with --etcd)",
    ),
    (
        "cluster remove ",
        "membership commands do not exist yet (agents join with --etcd)",
    ),
    ("cluster balance", "balancing does not exist yet"),
    (
        "cluster failover ",
        "needs an agent that is a node of a cluster: e2e_cluster runs it verbatim",
    ),
];

/// The fixture country database: a network for each country the design's geo lines name.
fn geo_db() -> Arc<GeoDb> {
    let mut w = MmdbWriter::new(6);
    for (net, cc) in [
        ("1.0.0.0/24", "CN"),
        ("2.0.0.0/16", "RU"),
        ("3.0.0.0/8", "US"),
        ("4.0.0.0/16", "CA"),
        ("5.0.0.0/16", "GB"),
    ] {
        w.insert(net.parse().unwrap(), cc).unwrap();
    }
    Arc::new(GeoDb::from_bytes(w.to_bytes(), Path::new("fixture.mmdb")).unwrap())
}

/// Splits a command line as a shell would for these lines (words, double quotes).
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for ch in line.chars() {
        match ch {
            '"' => (quoted, any) = (!quoted, true),
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => (cur, any) = (cur + &c.to_string(), true),
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The `capybara` binary on the agent's socket, run in a working directory of its own (the
/// design's `--file backup.yaml` is relative), keeping track of the design lines it ran.
struct Design {
    cli: Cli,
    cwd: std::path::PathBuf,
    ran: BTreeSet<&'static str>,
}

impl Design {
    fn run(&self, args: &[String]) -> Out {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli.run_in(&self.cwd, &args)
    }

    /// Runs design line `line` verbatim (after `substitute`-ing its placeholders); it must
    /// succeed.
    fn line_with(&mut self, line: &'static str, substitute: &[(&str, &str)]) -> Out {
        assert!(DESIGN_LINES.contains(&line), "not a design line: {line}");
        let mut text = line.to_owned();
        for (from, to) in substitute {
            text = text.replace(from, to);
        }
        assert!(!text.contains('<'), "a placeholder is left in {text:?}");
        let o = self.run(&words(&text));
        assert_eq!(
            o.code, 0,
            "capybara {text}: exit {}\n{}{}",
            o.code, o.stdout, o.stderr
        );
        self.ran.insert(line);
        o
    }

    /// Runs design line `line` verbatim; it must succeed. Its standard output.
    fn line(&mut self, line: &'static str) -> String {
        self.line_with(line, &[]).stdout
    }

    /// A setup step (not a design line); it must succeed.
    fn setup(&self, line: &str) -> String {
        let o = self.run(&words(line));
        assert_eq!(o.code, 0, "capybara {line}: {}{}", o.stdout, o.stderr);
        o.stdout
    }
}

fn start() -> (tokio::runtime::Runtime, TestApi, Design) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start_with(false, Some(geo_db())));
    let cwd = api.dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let d = Design {
        cli: Cli::socket(&agent_crate_binary("capybara"), &api.socket),
        cwd,
        ran: BTreeSet::new(),
    };
    (rt, api, d)
}

#[test]
fn words_split_like_a_shell() {
    assert_eq!(
        words(r#"schedule add "backup create" --cron "0 2 * * *""#),
        ["schedule", "add", "backup create", "--cron", "0 2 * * *"]
    );
    assert_eq!(words("group  list"), ["group", "list"]);
}

#[test]
fn every_design_line_works_verbatim() {
    let (rt, api, mut d) = start();
    d.setup("user add alice --no-qr");
    d.setup("user add bob --no-qr");

    // 21. User Groups (the policy before the delete, so it has a group to change).
    let out = d.line("group create engineering");
    assert!(out.starts_with("group engineering: members -;"), "{out}");
    let out = d.line("group add alice engineering");
    assert!(
        out.starts_with("group engineering: members alice;"),
        "{out}"
    );
    let out = d.line("group list");
    assert!(
        out.lines()
            .any(|l| l.starts_with("engineering ") && l.contains("alice")),
        "{out}"
    );
    let out = d.line("group policy engineering --bandwidth 10Mbps");
    assert!(out.contains("policy bandwidth=10mbit"), "{out}");
    let out = d.line("group remove alice engineering");
    assert!(out.starts_with("group engineering: members -;"), "{out}");
    let out = d.line("group delete engineering");
    assert!(out.starts_with("group engineering:"), "{out}");
    assert!(!d.setup("group list").contains("engineering"));

    // 22. Session History & Audit Trail (no tunnel traffic here: the tables are empty).
    let out = d.line("history show");
    assert!(out.starts_with("USER "), "{out}");
    let out = d.line("history show alice");
    assert!(out.starts_with("USER "), "{out}");
    let out = d.line("history export --format csv");
    assert!(out.starts_with("kind,"), "{out}");
    let out = d.line("history clear --older-than 90d");
    assert!(
        out.starts_with("removed 0 sessions and 0 auth attempts"),
        "{out}"
    );
    let out = d.line("history search --ip 1.2.3.4");
    assert!(out.starts_with("USER "), "{out}");
    let out = d.line("history audit --user alice");
    assert!(out.contains("user.add"), "{out}");

    // 23. API Access: the TCP API on its default address (gRPC and REST), a read token
    // expiring after the default 90 days, listed, revoked; the OpenAPI document; the round trip.
    let out = d.line("api enable");
    assert!(
        out.starts_with("API enabled: http://127.0.0.1:7443 (gRPC and REST under /api/v1/"),
        "{out}"
    );
    let o = d.line_with("api token create", &[]);
    assert!(o.stdout.starts_with("capy_"), "{}", o.stdout);
    assert!(o.stderr.contains("(scope read, expires "), "{}", o.stderr);
    assert!(o.stderr.contains(", the default 90d)"), "{}", o.stderr);
    let id = o.stderr.split_whitespace().nth(1).unwrap().to_owned();
    let out = d.line("api token list");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id) && l.contains(" read ")),
        "{out}"
    );
    let out = d
        .line_with("api token revoke <id>", &[("<id>", &id)])
        .stdout;
    assert_eq!(out.trim(), format!("revoked {id}"));
    let out = d.line("api docs");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("api docs prints JSON");
    assert!(
        doc["paths"]["/api/v1/connections"]["get"].is_object(),
        "{out}"
    );
    let out = d.line("api test");
    assert!(
        out.starts_with("GET http://127.0.0.1:7443/api/v1/health: 200 in "),
        "{out}"
    );
    d.setup("api disable");

    // 24. Webhook Notifications: a receiver on loopback (see the module docs).
    api.svc.webhooks.set_allow_private_everywhere(true);
    let sink = rt.block_on(capybara_tests::receivers::Sink::start());
    let url = sink.url();
    let mut first = None;
    for line in [
        "webhook add <url> --event user-connect",
        "webhook add <url> --event user-disconnect",
        "webhook add <url> --event quota-exceeded",
        "webhook add <url> --event server-down",
        "webhook add <url> --event suspicious-activity",
    ] {
        let out = d.line_with(line, &[("<url>", &url)]).stdout;
        assert!(
            out.starts_with("webhook wh_") && out.contains(&url),
            "{out}"
        );
        first.get_or_insert_with(|| out.split_whitespace().nth(1).unwrap().to_owned());
    }
    let id = first.unwrap();
    let out = d.line("webhook list");
    assert_eq!(out.lines().filter(|l| l.contains(&url)).count(), 5, "{out}");
    let out = d.line_with("webhook test <id>", &[("<id>", &id)]).stdout;
    assert!(out.contains("delivered after 1 attempt"), "{out}");
    assert!(sink.count() >= 1);
    let out = d.line_with("webhook delete <id>", &[("<id>", &id)]).stdout;
    assert!(out.starts_with(&format!("deleted webhook {id}")), "{out}");

    // 25. Scheduled Tasks & Automation: tasks 1, 2 and 3.
    let out = d.line(r#"schedule add "backup create" --cron "0 2 * * *""#);
    assert!(
        out.starts_with(r#"schedule 1: "backup create" at "0 2 * * *" UTC"#),
        "{out}"
    );
    let out = d.line(r#"schedule add "report generate --format csv" --cron "0 9 * * MON""#);
    assert!(out.starts_with("schedule 2: "), "{out}");
    let out = d.line(r#"schedule add "user cleanup-expired" --cron "0 3 * * *""#);
    assert!(out.starts_with("schedule 3: "), "{out}");
    let out = d.line("schedule list");
    assert!(out.starts_with("ID "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("1 ") && l.contains("backup create")),
        "{out}"
    );
    let out = d.line_with("schedule run <id>", &[("<id>", "1")]).stdout;
    assert!(out.starts_with("backup written to "), "{out}");
    let out = d.line_with("schedule run <id>", &[("<id>", "2")]).stdout;
    assert!(out.contains("scope,name,groups,rx_bytes,"), "{out}");
    let out = d.line_with("schedule run <id>", &[("<id>", "3")]).stdout;
    assert!(out.ends_with("removed 0 expired user(s)\n"), "{out}");
    let out = d
        .line_with("schedule disable <id>", &[("<id>", "1")])
        .stdout;
    assert!(out.contains("; disabled;"), "{out}");
    let out = d.line_with("schedule enable <id>", &[("<id>", "1")]).stdout;
    assert!(out.contains("; enabled;"), "{out}");
    let out = d.line_with("schedule delete <id>", &[("<id>", "1")]).stdout;
    assert!(out.starts_with("deleted schedule 1 "), "{out}");

    // 28. Advanced User Quotas & Limits.
    let out = d.line("quota set alice --limit 100GB --period monthly");
    assert!(out.starts_with("alice:\n"), "{out}");
    assert!(out.contains("100GB") && out.contains("monthly"), "{out}");
    let out = d.line("quota set alice --bandwidth 10Mbps --enforce");
    assert!(out.contains("10mbit") && out.contains("100GB"), "{out}");
    let out = d.line("quota set alice --connections 3");
    assert!(
        out.lines()
            .any(|l| l.starts_with("connections ") && l.ends_with(" 3")),
        "{out}"
    );
    let out = d.line("quota set alice --time 8h");
    assert!(out.contains("8h"), "{out}");
    let out = d.line("quota template create corporate");
    assert_eq!(out.trim(), "quota template corporate: -; users -");
    let out = d.line("quota template apply corporate alice bob");
    assert_eq!(out.trim(), "applied quota template corporate to alice,bob");
    // The empty template is filled later, its users keep it.
    let out = d.setup("quota template create corporate --replace --bandwidth 5Mbps");
    assert!(
        out.contains("bandwidth=5mbit") && out.contains("users alice,bob"),
        "{out}"
    );
    let out = d.line("quota report --exceeding");
    assert!(out.starts_with("USER "), "{out}");

    // 29. Geographic Restrictions (the fixture database's countries).
    let out = d.line("geo block CN RU");
    assert!(out.starts_with("geo block CN RU\n"), "{out}");
    let out = d.line("geo allow US CA GB");
    assert!(out.starts_with("geo allow "), "{out}");
    for cc in ["US", "CA", "GB"] {
        assert!(out.lines().next().unwrap().contains(cc), "{out}");
    }
    let out = d.line("geo list");
    assert!(out.starts_with("geo allow "), "{out}");
    // IP intelligence: on, and the two categories on (no source given yet: empty lists).
    let out = d.line("ip-intel enable");
    assert!(out.starts_with("ip-intel enabled\n"), "{out}");
    let out = d.line("ip-intel block-vpn");
    assert!(
        out.contains("note: the vpn list is empty until a source is given"),
        "{out}"
    );
    let out = d.line("ip-intel block-tor");
    assert!(
        out.lines()
            .any(|l| l.starts_with("tor ") && l.contains("enforced")),
        "{out}"
    );

    // 30. Configuration Templates & Profiles.
    let out = d.line("template save current corporate-standard");
    assert!(out.starts_with("template corporate-standard\n"), "{out}");
    // Saved over the built-in `remote-worker`, which it replaces until deleted.
    let out = d.line("template save current remote-worker");
    assert!(
        out.starts_with("template remote-worker (saved over the built-in;"),
        "{out}"
    );
    let out = d.line("template list");
    assert!(
        out.lines()
            .any(|l| l.starts_with("corporate-standard ") && l.contains("stored")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("remote-worker ") && l.contains("stored (over built-in)")),
        "{out}"
    );
    let out = d.line("template show corporate-standard");
    assert!(out.starts_with("template corporate-standard\n"), "{out}");
    let out = d.line("template apply corporate-standard");
    assert!(
        out.starts_with("applied template corporate-standard;"),
        "{out}"
    );
    d.line("template export corporate-standard --file backup.yaml");
    let yaml = std::fs::read_to_string(d.cwd.join("backup.yaml")).unwrap();
    assert!(yaml.contains("corporate-standard"), "{yaml}");
    d.setup("template delete corporate-standard");
    let out = d.line("template import --file backup.yaml");
    assert!(out.starts_with("template corporate-standard\n"), "{out}");

    // 26. Multi-factor authentication (the order adapted: a reset needs an enrolment, so it
    // comes before the disable).
    let out = d.line("mfa enable alice");
    assert!(out.starts_with("mfa alice: enrolment pending"), "{out}");
    assert!(
        out.contains("otpauth://totp/Capybara:alice?secret="),
        "{out}"
    );
    let out = d.line("mfa reset alice");
    assert!(out.starts_with("mfa alice: enrolment pending"), "{out}");
    let out = d.line("mfa status");
    assert!(
        out.lines()
            .any(|l| l.starts_with("alice ") && l.contains("pending")),
        "{out}"
    );
    let out = d.line("mfa disable alice");
    assert!(out.starts_with("mfa alice: none"), "{out}");
    let out = d.line("mfa require-all");
    assert!(out.starts_with("mfa require-all: on"), "{out}");
    d.setup("mfa require-all --off");

    // 27. Clustering: status and health of an agent that is no node (started without --etcd).
    let out = d.line("cluster status");
    assert!(out.starts_with("not clustered"), "{out}");
    let out = d.line("cluster health");
    assert!(out.starts_with("not clustered"), "{out}");

    // Every design line was run, or is listed as not yet existing.
    let not_covered: Vec<&str> = DESIGN_LINES
        .iter()
        .copied()
        .filter(|l| !d.ran.contains(l))
        .filter(|l| !NOT_YET.iter().any(|(p, _)| l.starts_with(p)))
        .collect();
    assert!(
        not_covered.is_empty(),
        "design lines neither run nor listed: {not_covered:?}"
    );
    for (p, why) in NOT_YET {
        assert!(
            DESIGN_LINES.iter().any(|l| l.starts_with(p)),
            "{p}: listed but in no design line ({why})"
        );
        assert!(
            !d.ran.iter().any(|l| l.starts_with(p)),
            "{p} was run: take it off NOT_YET"
        );
    }
}

#[test]
fn group_members_read_both_ways() {
    let (_rt, _api, d) = start();
    for u in ["alice", "bob", "carol", "staff"] {
        d.setup(&format!("user add {u} --no-qr"));
    }
    d.setup("group create engineering");
    // Today's GROUP USER… form, several users.
    let out = d.setup("group add engineering alice bob");
    assert!(
        out.starts_with("group engineering: members alice,bob;"),
        "{out}"
    );
    // Two arguments, only the second a group: USER GROUP.
    let out = d.setup("group remove bob engineering");
    assert!(
        out.starts_with("group engineering: members alice;"),
        "{out}"
    );
    let out = d.setup("group add carol engineering");
    assert!(
        out.starts_with("group engineering: members alice,carol;"),
        "{out}"
    );
    // Two arguments, only the first a group: GROUP USER.
    let out = d.setup("group remove engineering carol");
    assert!(
        out.starts_with("group engineering: members alice;"),
        "{out}"
    );
    // Both groups (and `staff` a user too): GROUP USER, so group `staff` would get a user
    // `engineering`, who does not exist, and the agent says so.
    d.setup("group create staff");
    let o = d.run(&words("group add staff engineering"));
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("engineering"), "{}", o.stderr);
    // Neither a group: GROUP USER, and the error names the group.
    let o = d.run(&words("group add alice nosuch"));
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("group \"alice\" not found"),
        "{}",
        o.stderr
    );
    // Nothing changed by the refusals.
    let out = d.setup("group list");
    assert!(
        out.lines()
            .any(|l| l.starts_with("engineering ") && l.contains(" alice ")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("staff ") && l.contains(" - ")),
        "{out}"
    );
    // --help states the rule.
    let help = d.setup("group add --help");
    assert!(help.contains("what exists decides"), "{help}");
}

#[test]
fn enforce_changes_nothing_and_token_defaults_are_stated() {
    let (_rt, _api, d) = start();
    d.setup("user add alice --no-qr");
    d.setup("user add bob --no-qr");
    let with = d.setup("--json quota set alice --bandwidth 10Mbps --enforce");
    let without = d.setup("--json quota set bob --bandwidth 10Mbps");
    assert_eq!(with, without, "--enforce changes nothing");
    let help = d.setup("quota set --help");
    assert!(help.contains("--enforce"), "{help}");
    assert!(help.contains("always enforced, in the kernel"), "{help}");

    let made: serde_json::Value =
        serde_json::from_str(&d.setup("--json api token create")).unwrap();
    assert_eq!(made["token"]["scope"], "read");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ahead = made["token"]["expires_at"].as_u64().unwrap() - now;
    assert!(ahead.abs_diff(90 * 86_400) < 600, "expires in {ahead} s");
    let help = d.setup("api token create --help");
    assert!(help.contains("[default: read]"), "{help}");
    // A named scope and expiry as before.
    let made: serde_json::Value =
        serde_json::from_str(&d.setup("--json api token create --scope write --expires 30d"))
            .unwrap();
    assert_eq!(made["token"]["scope"], "write");
}
