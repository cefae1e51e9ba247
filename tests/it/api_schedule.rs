//! Scheduled tasks from the `capybara` CLI against an in-process agent (real gRPC server, real
//! store, the scheduler with its in-process API connection): `schedule add/list/run/disable/
//! enable/delete/history`, refusals naming the field (exit 2, nothing stored), a run's actor
//! `schedule:<id>` in the audit trail, and the schedulable commands run both from the shell and
//! in the agent: `backup create --keep N` (rotation in the agent's backup directory),
//! `user cleanup-expired`, `quota reset --all`, `history clear --older-than`, `health`.
//! (Due times on a manual clock are the agent's `scheduler` unit tests.)

use std::os::unix::fs::PermissionsExt as _;

use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, TestApi};

fn start() -> (tokio::runtime::Runtime, TestApi, Cli) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let cli = Cli::socket(&agent_crate_binary("capybara"), &api.socket);
    (rt, api, cli)
}

/// Adds a task; its id.
fn add(cli: &Cli, command: &str, cron: &str) -> u64 {
    let t = cli.json(&["schedule", "add", command, "--cron", cron]);
    t["id"].as_u64().unwrap_or_else(|| panic!("{t}"))
}

/// The audit records (newest first) as JSON.
fn audit(cli: &Cli) -> Vec<serde_json::Value> {
    cli.json(&["history", "audit"]).as_array().unwrap().clone()
}

#[test]
fn schedule_commands_from_the_cli_run_in_the_agent_as_schedule_id() {
    let (_rt, _api, cli) = start();
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    cli.ok(&["user", "add", "bob", "--no-qr"]);
    cli.ok(&["user", "expire", "bob", "--at", "2020-01-01"]);

    let out = cli.ok(&[
        "schedule",
        "add",
        "user cleanup-expired --grace 7d",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    assert!(
        out.starts_with(
            "schedule 1: \"user cleanup-expired --grace 7d\" at \"0 3 * * *\" Europe/Berlin, missed runs: run; enabled; next run "
        ),
        "{out}"
    );
    let list = cli.ok(&["schedule", "list"]);
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    for col in [
        "ID",
        "COMMAND",
        "CRON",
        "TZ",
        "ENABLED",
        "NEXT RUN",
        "LAST RUN",
        "LAST STATUS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.next().unwrap();
    assert!(row.starts_with("1 "), "{row}");
    assert!(
        row.contains("Europe/Berlin") && row.contains(" yes "),
        "{row}"
    );
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[cells.len() - 2..], ["-", "-"], "no run yet: {row}");

    // Run now: the command's own output, from the agent.
    let out = cli.ok(&["schedule", "run", "1"]);
    assert_eq!(
        out,
        "removed bob (expired 2020-01-01T00:00:00Z) and 1 device(s)\nremoved 1 expired user(s)\n"
    );
    let users = cli.json(&["user", "list"]);
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
    // Audited as the task, the run itself as the admin who ran it.
    let records = audit(&cli);
    let cleanup = records
        .iter()
        .find(|r| r["action"] == "user.cleanup")
        .unwrap_or_else(|| panic!("{records:?}"));
    assert_eq!(cleanup["actor"], "schedule:1");
    assert_eq!(cleanup["target"], "user:bob");
    let ran = records
        .iter()
        .find(|r| r["action"] == "schedule.run")
        .unwrap();
    assert_eq!(ran["actor"], "uid:0");
    let added = records
        .iter()
        .find(|r| r["action"] == "schedule.add")
        .unwrap();
    assert_eq!(added["target"], "schedule:1");

    // History: the run with its output; list shows it as the last run.
    let hist = cli.ok(&["schedule", "history", "1"]);
    assert!(hist.starts_with("run 0 (manual): started "), "{hist}");
    assert!(hist.lines().next().unwrap().ends_with(": ok"), "{hist}");
    assert!(hist.contains("\nremoved bob "), "{hist}");
    let runs = cli.json(&["schedule", "history", "1"]);
    assert_eq!(runs[0]["status"], "ok");
    assert_eq!(runs[0]["exit_code"], 0);
    let row = cli
        .ok(&["schedule", "list"])
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(row.split_whitespace().last(), Some("ok"), "{row}");

    // Disable, enable, delete.
    let out = cli.ok(&["schedule", "disable", "1"]);
    assert!(out.contains("; disabled; next run -"), "{out}");
    let row = cli
        .ok(&["schedule", "list"])
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(row.contains(" no "), "{row}");
    let out = cli.ok(&["schedule", "enable", "1"]);
    assert!(out.contains("; enabled; next run 20"), "{out}");
    let out = cli.ok(&["schedule", "delete", "1"]);
    assert_eq!(
        out,
        "deleted schedule 1 (\"user cleanup-expired --grace 7d\")\n"
    );
    assert_eq!(
        cli.ok(&["schedule", "list"]).lines().count(),
        1,
        "header only"
    );
    for action in ["schedule.disable", "schedule.enable", "schedule.delete"] {
        assert!(
            audit(&cli)
                .iter()
                .any(|r| r["action"] == action && r["actor"] == "uid:0"),
            "{action}"
        );
    }
    cli.fails(1, &["schedule", "run", "1"], "schedule \"1\" not found");
    cli.fails(1, &["schedule", "history", "1"], "not found");
}

#[test]
fn bad_schedules_are_refused_naming_the_field_and_nothing_is_stored() {
    let (_rt, _api, cli) = start();
    for (args, needle) in [
        (
            vec!["top", "--cron", "0 2 * * *"],
            "command: top cannot be scheduled",
        ),
        (
            vec!["stats --watch", "--cron", "0 2 * * *"],
            "command: stats --watch cannot be scheduled",
        ),
        (
            vec!["schedule list", "--cron", "0 2 * * *"],
            "command: schedule cannot be scheduled",
        ),
        (
            vec!["backup restore --input x", "--cron", "0 2 * * *"],
            "command: backup restore cannot be scheduled",
        ),
        (
            vec![
                "user list --endpoint http://127.0.0.1:9",
                "--cron",
                "0 2 * * *",
            ],
            "command: --endpoint is a connection option",
        ),
        (
            vec!["no-such thing", "--cron", "0 2 * * *"],
            "command: \"no-such thing\" does not parse",
        ),
        (
            vec!["user list 'open", "--cron", "0 2 * * *"],
            "command: \"user list 'open\": unclosed '",
        ),
        (
            vec!["backup create", "--cron", "0 0 2 * * *"],
            "cron: \"0 0 2 * * *\" has six fields",
        ),
        (
            vec!["backup create", "--cron", "0 2 * *"],
            "cron: \"0 2 * *\": expected five fields",
        ),
        (vec!["backup create", "--cron", "0 2 * * FUNDAY"], "cron: "),
        (
            vec![
                "backup create",
                "--cron",
                "0 2 * * *",
                "--tz",
                "Mars/Olympus",
            ],
            "tz: unknown time zone \"Mars/Olympus\"",
        ),
    ] {
        let mut a = vec!["schedule", "add"];
        a.extend(args);
        cli.fails(2, &a, needle);
    }
    cli.fails(
        2,
        &["schedule", "run", "x"],
        "id: \"x\" is not a schedule id",
    );
    cli.fails(
        2,
        &[
            "schedule",
            "add",
            "health",
            "--cron",
            "* * * * *",
            "--missed",
            "later",
        ],
        "--missed",
    );
    assert_eq!(
        cli.ok(&["schedule", "list"]).lines().count(),
        1,
        "header only"
    );
    assert!(!audit(&cli).iter().any(|r| r["action"] == "schedule.add"));
    // A failed run: exit 1, its error line in the CLI's and the history's words.
    let id = add(&cli, "group delete nosuch", "0 2 * * *");
    let o = cli.run(&["schedule", "run", &id.to_string()]);
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "schedule {id} run 0: failed (exit 1): group \"nosuch\" not found"
        )),
        "{}",
        o.stderr
    );
    let runs = cli.json(&["schedule", "history", &id.to_string()]);
    assert_eq!(runs[0]["status"], "failed");
    assert_eq!(runs[0]["exit_code"], 1);
}

/// The agent's backup directory in a [`TestApi`] (under its data directory).
fn backups(api: &TestApi) -> std::path::PathBuf {
    api.dir.path().join("data/backups")
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn backup_create_keep_rotates_only_its_own_files_from_the_shell_and_a_schedule() {
    let (_rt, api, cli) = start();
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    let dir = backups(&api);
    // Files that are not the agent's backups: never deleted.
    std::fs::create_dir_all(&dir).unwrap();
    for foreign in [
        "notes.txt",
        "backup-old.capy",
        "backup-20200101T000000Z.capy.keep",
    ] {
        std::fs::write(dir.join(foreign), b"x").unwrap();
    }
    // An old backup of the pattern: the oldest, deleted first.
    std::fs::write(dir.join("backup-20200101T000000Z.capy"), b"old").unwrap();
    let out = cli.ok(&["backup", "create", "--keep", "2"]);
    assert!(
        out.starts_with(&format!("backup written to {}/backup-", dir.display())),
        "{out}"
    );
    let mut written = Vec::new();
    for _ in 0..3 {
        let r = cli.json(&["backup", "create", "--keep", "2"]);
        written.push(r["path"].as_str().unwrap().to_owned());
        assert!(r["records"]["users"].as_u64() == Some(1), "{r}");
    }
    let left = names(&dir);
    let ours: Vec<&String> = left
        .iter()
        .filter(|n| {
            n.starts_with("backup-2") && n.ends_with(".capy") && !n.starts_with("backup-2020")
        })
        .collect();
    assert_eq!(ours.len(), 2, "{left:?}");
    for w in &written[1..] {
        let name = std::path::Path::new(w)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert!(left.iter().any(|n| n == name), "{name} kept: {left:?}");
    }
    for foreign in [
        "notes.txt",
        "backup-old.capy",
        "backup-20200101T000000Z.capy.keep",
    ] {
        assert!(
            left.iter().any(|n| n == foreign),
            "{foreign} untouched: {left:?}"
        );
    }
    assert!(
        !left.iter().any(|n| n == "backup-20200101T000000Z.capy"),
        "{left:?}"
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(std::path::Path::new(&written[2])), 0o600);
    // What it holds restores: it is a whole backup.
    let bytes = std::fs::read(&written[2]).unwrap();
    assert!(bytes.len() > 100);
    // --keep 0 and --keep with --output are refused.
    cli.fails(2, &["backup", "create", "--keep", "0"], "--keep");
    cli.fails(
        2,
        &["backup", "create", "--keep", "2", "--output", "x"],
        "--output",
    );
    // --output works as before.
    let file = api.dir.path().join("mine.backup");
    cli.ok(&["backup", "create", "--output", file.to_str().unwrap()]);
    assert_eq!(mode(&file), 0o600);

    // Scheduled, as the design's line, with rotation.
    let id = add(&cli, "backup create --keep 2", "0 2 * * *");
    let out = cli.ok(&["schedule", "run", &id.to_string()]);
    assert!(
        out.starts_with(&format!("backup written to {}/backup-", dir.display())),
        "{out}"
    );
    assert!(out.contains("\ndeleted older backup "), "{out}");
    let ours = names(&dir)
        .into_iter()
        .filter(|n| n.starts_with("backup-2") && n.ends_with(".capy"))
        .count();
    assert_eq!(ours, 2);
}

#[test]
fn quota_reset_all_history_clear_and_health_run_from_the_shell_and_in_the_agent() {
    let (_rt, _api, cli) = start();
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    cli.ok(&["user", "add", "bob", "--no-qr"]);
    cli.ok(&[
        "quota", "set", "alice", "--limit", "1GB", "--period", "monthly",
    ]);
    cli.ok(&["group", "create", "eng"]);
    cli.ok(&["group", "add", "eng", "bob"]);
    cli.ok(&[
        "group",
        "policy",
        "eng",
        "--shared-limit",
        "10GB",
        "--period",
        "monthly",
    ]);
    let out = cli.ok(&["quota", "reset", "--all"]);
    assert!(out.starts_with("reset 2 quota bucket(s): "), "{out}");
    assert!(
        out.contains("user:alice") && out.contains("group:eng"),
        "{out}"
    );
    let resets: Vec<serde_json::Value> = audit(&cli)
        .into_iter()
        .filter(|r| r["action"] == "quota.reset")
        .collect();
    assert_eq!(resets.len(), 2, "{resets:?}");
    // The single forms stay.
    cli.ok(&["quota", "reset", "alice"]);
    cli.ok(&["quota", "reset", "--group", "eng"]);
    cli.fails(2, &["quota", "reset", "alice", "--all"], "--all");
    cli.fails(2, &["quota", "reset"], "required");

    for (command, starts) in [
        ("quota reset --all", "reset 2 quota bucket(s): "),
        (
            "history clear --older-than 90d",
            "removed 0 sessions and 0 auth attempts",
        ),
        ("health", "COMPONENT "),
        ("--json user list", "["),
    ] {
        let id = add(&cli, command, "0 1 1 * *");
        let out = cli.ok(&["schedule", "run", &id.to_string()]);
        assert!(out.starts_with(starts), "{command}: {out}");
    }
    let by_task: Vec<serde_json::Value> = audit(&cli)
        .into_iter()
        .filter(|r| r["action"] == "quota.reset" && r["actor"] == "schedule:1")
        .collect();
    assert_eq!(by_task.len(), 2, "{by_task:?}");
}
