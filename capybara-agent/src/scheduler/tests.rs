//! The scheduler end to end inside one process, on a manual clock: the runner, the CLI's own
//! code run in-process, the API's handlers and the service over a real store (in-memory
//! dataplane and tunnel). Nothing waits in real time for a schedule: the clock is moved and the
//! test waits for the run's end to be recorded.

use std::{path::Path, sync::Arc, time::Duration};

use chrono::DateTime;

use crate::{
    api::{self, Listeners},
    service::{
        Service, ServiceError,
        core::MAX_PAGE_SIZE,
        domain::Actor,
        schedules::{ManualClock, Missed, Run, RunStatus, Trigger},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};

fn at(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s).unwrap().timestamp()
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

/// An agent in this process: the service, its API serving only the in-process connections,
/// the scheduler on `clock`.
struct Agent {
    svc: Arc<Service>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

/// Opens the store; the previous agent's last reference may still be closing it on another
/// thread (its lock is released when the close ends).
async fn open_store(dir: &Path) -> Store {
    for _ in 0..1000 {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    Store::open(dir).unwrap()
}

async fn start(dir: &Path, clock: &Arc<ManualClock>) -> Agent {
    let svc = Arc::new(
        Service::open(
            Arc::new(open_store(dir).await),
            Arc::new(MemoryPlane::default()),
            Arc::new(MemoryTunnel::default()),
            crate::service::ServiceConfig::for_tests("10.97.0.1/24", "fd97::1/64", "vpn:51820"),
        )
        .unwrap(),
    );
    svc.schedules.set_clock(clock.clone());
    let incoming = super::start(&svc);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::run(
        svc.clone(),
        Listeners {
            in_process: Some(incoming),
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let server = tokio::spawn(async move { server.await.unwrap().unwrap() });
    Agent { svc, stop, server }
}

impl Agent {
    /// Stops the API and the runner and waits until the store is closed.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
        self.svc.schedules.join_runner().await;
        let store = Arc::downgrade(self.svc.store());
        drop(self.svc);
        for _ in 0..100_000 {
            if store.upgrade().is_none() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the store is still open after the agent stopped");
    }

    /// Waits (bounded, for a failing test) until `n` runs in all have been recorded as ended.
    async fn ended(&self, n: u64) {
        let mut rx = self.svc.schedules.ended();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|e| *e >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} runs did not end"))
            .unwrap();
    }

    fn add(&self, command: &str, cron: &str, tz: &str, missed: Missed) -> u64 {
        self.svc
            .schedules
            .add(&root(), command, cron, tz, missed)
            .unwrap()
            .task
            .id
    }

    /// The task's runs, oldest first.
    fn runs(&self, id: u64) -> Vec<Run> {
        let mut r = self.svc.schedules.history(id, 100).unwrap();
        r.reverse();
        r
    }
}

#[tokio::test]
async fn a_task_every_minute_runs_within_a_second_of_the_minute_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = at("2026-12-07T10:00:30Z");
    let clock = Arc::new(ManualClock::new(t0 * 1000));
    let a = start(dir.path(), &clock).await;
    let id = a.add("user list", "* * * * *", "", Missed::Run);
    for (k, minute) in [(1, t0 + 30), (2, t0 + 90)] {
        clock.set_ms(minute * 1000);
        a.ended(k).await;
        let runs = a.runs(id);
        assert_eq!(runs.len() as u64, k);
        let r = runs.last().unwrap();
        assert_eq!(r.trigger, Trigger::Schedule);
        assert_eq!(r.due, Some(minute));
        assert!(
            (r.started_ms - minute * 1000).abs() < 1000,
            "started {} ms after the minute",
            r.started_ms - minute * 1000
        );
        assert_eq!(r.status, RunStatus::Ok, "{r:?}");
        assert_eq!(r.exit_code, Some(0));
        // What `capybara user list` prints: its table, captured.
        assert!(r.output.starts_with("USER "), "{:?}", r.output);
    }
    let listed = a.svc.schedules.get(id).unwrap();
    assert_eq!(listed.next_run, Some(t0 + 150));
    assert_eq!(listed.task.last_run.unwrap().status, RunStatus::Ok);
    a.stop().await;
}

#[tokio::test]
async fn a_disabled_task_does_not_run_and_an_enabled_one_does_not_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = at("2026-12-07T10:00:00Z");
    let clock = Arc::new(ManualClock::new(t0 * 1000));
    let a = start(dir.path(), &clock).await;
    let off = a.add("user list", "* * * * *", "", Missed::Run);
    let witness = a.add("user list", "*/5 * * * *", "", Missed::Run);
    a.svc.schedules.set_enabled(&root(), off, false).unwrap();
    clock.set_ms((t0 + 300) * 1000);
    a.ended(1).await;
    assert_eq!(a.runs(witness).len(), 1);
    // The disabled task comes first in the runner's pass: it would have started by now.
    assert!(a.runs(off).is_empty(), "{:?}", a.runs(off));
    assert_eq!(a.svc.schedules.get(off).unwrap().next_run, None);
    // Enabled again: no run for the minutes it was disabled; the next minute runs.
    a.svc.schedules.set_enabled(&root(), off, true).unwrap();
    clock.set_ms((t0 + 360) * 1000);
    a.ended(2).await;
    let runs = a.runs(off);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].due, Some(t0 + 360));
    // Disabling and enabling are audited.
    let audit = a.svc.core.audit_records(None, MAX_PAGE_SIZE).unwrap();
    for action in ["schedule.add", "schedule.disable", "schedule.enable"] {
        assert!(
            audit
                .iter()
                .any(|r| r.action == action && r.target == format!("schedule:{off}")),
            "{action}"
        );
    }
    a.stop().await;
}

#[tokio::test]
async fn a_run_missed_while_the_agent_was_down_runs_once_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = at("2026-12-07T10:00:00Z");
    let clock = Arc::new(ManualClock::new(t0 * 1000));
    let a = start(dir.path(), &clock).await;
    let run = a.add("user list", "0 * * * *", "", Missed::Run);
    let skip = a.add("user list", "0 * * * *", "", Missed::Skip);
    a.stop().await;
    // Down for five due times.
    clock.set_ms((t0 + 5 * 3600 + 600) * 1000);
    let a = start(dir.path(), &clock).await;
    a.ended(2).await;
    let runs = a.runs(run);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].trigger, Trigger::Missed);
    assert_eq!(runs[0].due, Some(t0 + 5 * 3600));
    assert_eq!(runs[0].status, RunStatus::Ok);
    let skipped = a.runs(skip);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].status, RunStatus::Skipped);
    assert!(skipped[0].error.as_deref().unwrap().contains("missed"));
    // Then both run on their schedule again.
    clock.set_ms((t0 + 6 * 3600) * 1000);
    a.ended(4).await;
    for id in [run, skip] {
        let last = a.runs(id).pop().unwrap();
        assert_eq!(
            (last.trigger, last.due, last.status),
            (Trigger::Schedule, Some(t0 + 6 * 3600), RunStatus::Ok)
        );
    }
    // A restart with nothing missed runs nothing.
    a.stop().await;
    clock.set_ms((t0 + 6 * 3600 + 60) * 1000);
    let a = start(dir.path(), &clock).await;
    clock.set_ms((t0 + 7 * 3600) * 1000);
    a.ended(2).await;
    assert_eq!(a.runs(run).len(), 3);
    assert_eq!(a.runs(run).pop().unwrap().trigger, Trigger::Schedule);
    a.stop().await;
}

#[tokio::test]
async fn bad_expressions_zones_and_commands_name_their_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z") * 1000));
    let a = start(dir.path(), &clock).await;
    let seq = a.svc.core.next_audit_seq();
    for (command, cron, tz, field) in [
        ("backup create", "0 0 2 * * *", "", "cron: "),
        ("backup create", "0 2 * *", "", "cron: "),
        ("backup create", "0 25 * * *", "", "cron: "),
        ("backup create", "0 2 * * *", "Europe/Nowhere", "tz: "),
        ("top", "0 2 * * *", "", "command: "),
        ("stats --watch", "0 2 * * *", "", "command: "),
        ("schedule list", "0 2 * * *", "", "command: "),
        ("backup restore --input x", "0 2 * * *", "", "command: "),
        (
            "user list --endpoint http://127.0.0.1:1",
            "0 2 * * *",
            "",
            "command: ",
        ),
        ("no such command", "0 2 * * *", "", "command: "),
        ("user list 'unclosed", "0 2 * * *", "", "command: "),
        ("", "0 2 * * *", "", "command: "),
    ] {
        let e = a
            .svc
            .schedules
            .add(&root(), command, cron, tz, Missed::Run)
            .unwrap_err();
        assert!(matches!(e, ServiceError::Invalid(_)), "{e:?}");
        assert!(
            e.to_string().starts_with(field),
            "{command} {cron} {tz}: {e}"
        );
    }
    assert!(a.svc.schedules.list().unwrap().is_empty());
    assert_eq!(a.svc.core.next_audit_seq(), seq, "nothing audited");
    // The first good one gets id 1: the refusals took none.
    assert_eq!(a.add("backup create", "0 2 * * *", "", Missed::Run), 1);
    a.stop().await;
}

#[tokio::test]
async fn a_europe_berlin_task_runs_as_stated_across_both_daylight_saving_changes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-03-28T12:00:00Z") * 1000));
    let a = start(dir.path(), &clock).await;
    let id = a.add("user list", "30 2 * * *", "Europe/Berlin", Missed::Run);
    // Spring: 02:30 does not exist on 2026-03-29; the run is at 03:00 CEST (01:00 UTC).
    assert_eq!(
        a.svc.schedules.get(id).unwrap().next_run,
        Some(at("2026-03-29T01:00:00Z"))
    );
    let steps = [
        "2026-03-29T01:00:00Z",
        "2026-03-30T00:30:00Z", // 02:30 CEST
        // Autumn: 02:30 happens twice on 2026-10-25; the run is at the first (CEST).
        "2026-10-25T00:30:00Z",
        "2026-10-26T01:30:00Z", // 02:30 CET
    ];
    let mut ended = 0;
    for (i, due) in steps.iter().enumerate() {
        if i == 2 {
            // Move to just before the autumn change (one run for the months skipped over).
            clock.set_ms(at("2026-10-24T12:00:00Z") * 1000);
            ended += 1;
            a.ended(ended).await;
            assert_eq!(
                a.svc.schedules.get(id).unwrap().next_run,
                Some(at("2026-10-25T00:30:00Z"))
            );
        }
        clock.set_ms(at(due) * 1000);
        ended += 1;
        a.ended(ended).await;
        let last = a.runs(id).pop().unwrap();
        assert_eq!(last.due, Some(at(due)), "{due}");
        assert_eq!(last.status, RunStatus::Ok);
        if i == 2 {
            // The second 02:30 (CET, 01:30 UTC) is not a run: the next is the 26th.
            assert_eq!(
                a.svc.schedules.get(id).unwrap().next_run,
                Some(at("2026-10-26T01:30:00Z"))
            );
        }
    }
    let dues: Vec<i64> = a.runs(id).iter().filter_map(|r| r.due).collect();
    assert!(!dues.contains(&at("2026-10-25T01:30:00Z")), "{dues:?}");
    a.stop().await;
}

#[tokio::test]
async fn a_run_acts_as_schedule_id_in_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z") * 1000));
    let a = start(dir.path(), &clock).await;
    let id = a.add("group create eng", "0 2 * * *", "", Missed::Run);
    let run = a.svc.schedules.run_now(root(), id).await.unwrap();
    assert_eq!(run.status, RunStatus::Ok, "{run:?}");
    assert_eq!(run.trigger, Trigger::Manual);
    assert!(run.output.starts_with("group eng:"), "{:?}", run.output);
    let audit = a.svc.core.audit_records(None, MAX_PAGE_SIZE).unwrap();
    let made = audit.iter().find(|r| r.action == "group.create").unwrap();
    assert_eq!(made.actor, format!("schedule:{id}"));
    let ran = audit.iter().find(|r| r.action == "schedule.run").unwrap();
    assert_eq!(ran.actor, "uid:0");
    // A second run fails (the group exists): its status, exit code and error line are kept.
    let again = a.svc.schedules.run_now(root(), id).await.unwrap();
    assert_eq!(again.status, RunStatus::Failed);
    assert_eq!(again.exit_code, Some(1));
    assert!(
        again.error.as_deref().unwrap().contains("already exists"),
        "{again:?}"
    );
    a.stop().await;
}

#[tokio::test]
async fn runs_of_one_task_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = at("2026-12-07T10:00:00Z");
    let clock = Arc::new(ManualClock::new(t0 * 1000));
    let a = start(dir.path(), &clock).await;
    let id = a.add("user list", "* * * * *", "", Missed::Run);
    // A run is going (begun, not yet ended) when the next minute comes.
    let going = a
        .svc
        .schedules
        .begin(&root(), id, Trigger::Manual, None)
        .unwrap();
    assert!(matches!(
        a.svc.schedules.run_now(root(), id).await,
        Err(ServiceError::TaskRunning { .. })
    ));
    clock.set_ms((t0 + 60) * 1000);
    a.ended(1).await;
    let runs = a.runs(id);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[1].status, RunStatus::Skipped);
    assert!(runs[1].error.as_deref().unwrap().contains("still going"));
    a.svc
        .schedules
        .finish(going, crate::service::schedules::Outcome::default())
        .unwrap();
    clock.set_ms((t0 + 120) * 1000);
    a.ended(3).await;
    assert_eq!(a.runs(id).pop().unwrap().status, RunStatus::Ok);
    a.stop().await;
}

#[tokio::test]
async fn history_keeps_the_newest_runs_and_a_delete_takes_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z") * 1000));
    let a = start(dir.path(), &clock).await;
    let id = a.add("health", "0 2 * * *", "", Missed::Run);
    let keep = crate::service::schedules::MAX_RUNS_KEPT;
    for _ in 0..keep + 3 {
        let r = a
            .svc
            .schedules
            .begin(&root(), id, Trigger::Manual, None)
            .unwrap();
        a.svc
            .schedules
            .finish(r, crate::service::schedules::Outcome::default())
            .unwrap();
    }
    let runs = a.svc.schedules.history(id, usize::MAX).unwrap();
    assert_eq!(runs.len() as u64, keep);
    assert_eq!(runs[0].n, keep + 2);
    assert_eq!(runs.last().unwrap().n, 3);
    let stored = |store: &Store| {
        store
            .scan::<serde_json::Value>(crate::store::Cf::Schedules, "run/")
            .unwrap()
            .len()
    };
    assert_eq!(stored(a.svc.store()) as u64, keep);
    a.svc.schedules.delete(&root(), id).unwrap();
    assert_eq!(stored(a.svc.store()), 0);
    assert!(matches!(
        a.svc.schedules.history(id, 10),
        Err(ServiceError::NotFound { .. })
    ));
    a.stop().await;
}
