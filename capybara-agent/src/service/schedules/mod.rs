//! Scheduled tasks: a `capybara` command run by the agent on a cron schedule
//! (`capybara schedule add "backup create --keep 7" --cron "0 2 * * *" --tz Europe/Berlin`).
//!
//! - **The command** is split like a shell would (words, `'…'`, `"…"`, `\`; no variables,
//!   globs or pipes: there is no shell) and checked at `add` by the CLI's own clap definitions
//!   through the [`Commands`] port (the `capybara` CLI's in-agent runner, wired by
//!   `crate::scheduler`): a command that does not parse, or is not schedulable (the live views
//!   `top` and `stats --watch`, `schedule …` itself, `backup restore`, the hidden `generate`,
//!   the connection options `--socket/--endpoint/--token/--ca-cert`), is refused naming
//!   `command`, and nothing is stored. It runs **in the agent, never through a shell**: the CLI's
//!   own command code, in-process, against the agent's own API over an in-memory connection, so
//!   it passes the same handlers, scope checks, validation and audit as any call; its actor is
//!   `schedule:<id>` ([`Actor::Schedule`]) with the admin scope (only an admin may add a task).
//!   What it prints is kept with the run, at most [`MAX_OUTPUT_BYTES`] (64 KiB; the rest is
//!   counted); its status is the CLI's exit class: `ok` (exit 0) or `failed` with the error line
//!   and exit code.
//! - **When** ([`cron`]): five-field cron in an IANA zone (default UTC), with the
//!   daylight-saving rule stated there.
//! - **The runner** (`runner`): one task in the agent sleeping on a [`Clock`] until the next due
//!   time, woken early by any change of the tasks; no polling. Disabled tasks do not run; a run
//!   of a task never overlaps another of the same task (one due while the last is going is
//!   recorded as `skipped`); `schedule run ID` runs it now and waits for the result (refused
//!   while it runs).
//! - **Missed runs**: each task remembers the last due time it handled (`last_due`: run,
//!   skipped, or when it was added or enabled). A due time between that and now found when the
//!   runner starts (the agent was down, or stopped by a clock step) is one missed run: it runs
//!   **once**, at start (trigger `missed`), however many due times passed, unless the task was
//!   added with `--missed skip` (then one `skipped` run is recorded). A task enabled again does
//!   not catch up on the time it was disabled. A run still `running` when the agent stopped is
//!   recorded `failed` ("the agent stopped during the run") at the next start.
//! - **History** (`schedule history ID`): each run's trigger, due time, start, end, status,
//!   exit code, error line and output; the newest [`MAX_RUNS_KEPT`] (50) runs of each task are
//!   kept (at most 50 × 64 KiB ≈ 3.2 MiB of output per task), older ones deleted as new ones
//!   are written.
//! - **Store**: the `schedules` column family (`store::keys::schedule*`): the tasks, the next id
//!   (ids are never reused) and the runs. Adding, enabling, disabling, deleting and running a
//!   task by hand are audited (`schedule.add`, …, target `schedule:<id>`); what a run's command
//!   changes is audited by the calls it makes, as `schedule:<id>`.

pub mod clock;
pub mod cron;
pub mod runner;

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, RwLock},
};

use serde::{Deserialize, Serialize};

pub use self::{
    clock::{Clock, ManualClock, SystemClock},
    cron::CronSchedule,
};
use super::{
    ServiceError,
    core::{Core, to_json},
    domain::{Actor, ValidationError},
    error::not_found,
};
use crate::store::{Batch, Cf, keys};

/// Runs of each task kept in its history.
pub const MAX_RUNS_KEPT: u64 = 50;
/// Bytes of a run's output kept; the rest is counted ([`Run::output_dropped`]).
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// The longest command line a task may have.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// What to do with a due time that passed while the agent was down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// Run once at start.
    #[default]
    Run,
    /// Record it skipped.
    Skip,
}

impl Missed {
    /// `run` or `skip` (empty: `run`), given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Missed, ValidationError> {
        match s {
            "" | "run" => Ok(Missed::Run),
            "skip" => Ok(Missed::Skip),
            _ => Err(ValidationError::Value {
                field,
                reason: format!("{s:?}: expected run or skip"),
            }),
        }
    }

    /// `run` or `skip`.
    pub const fn name(self) -> &'static str {
        match self {
            Missed::Run => "run",
            Missed::Skip => "skip",
        }
    }
}

/// How a run ended (or that it is going).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Still going.
    Running,
    /// The command succeeded (exit 0).
    Ok,
    /// The command failed (its exit code and error line are kept).
    Failed,
    /// Not run: the previous run was still going, or a missed run of a `--missed skip` task.
    Skipped,
}

impl RunStatus {
    /// The lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
        }
    }
}

/// Why a run happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Its due time came.
    Schedule,
    /// A due time passed while the agent was down (run once at start).
    Missed,
    /// `schedule run ID`.
    Manual,
}

impl Trigger {
    /// The lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Missed => "missed",
            Trigger::Manual => "manual",
        }
    }
}

/// A scheduled task as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Its id (never reused).
    pub id: u64,
    /// The command line as given.
    pub command: String,
    /// Its words (as a shell would split them).
    pub args: Vec<String>,
    /// The cron expression (five fields).
    pub cron: String,
    /// The IANA zone it is read in.
    pub tz: String,
    /// What a due time missed while the agent was down does.
    pub missed: Missed,
    /// Whether it runs.
    pub enabled: bool,
    /// When it was added, Unix seconds.
    pub created_at: i64,
    /// Who added it (an actor's display form).
    pub created_by: String,
    /// The last due time handled (run, skipped, or when it was added or enabled), Unix seconds.
    pub last_due: i64,
    /// Runs recorded so far: the number of the next.
    pub runs: u64,
    /// The latest run, if any.
    pub last_run: Option<RunSummary>,
}

/// The latest run of a task, on its record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Its number.
    pub n: u64,
    /// Start, Unix milliseconds.
    pub started_ms: i64,
    /// End, Unix milliseconds (none while running).
    pub ended_ms: Option<i64>,
    /// How it ended.
    pub status: RunStatus,
}

/// One run of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The task.
    pub task: u64,
    /// Its number among the task's runs.
    pub n: u64,
    /// Why it ran.
    pub trigger: Trigger,
    /// The due time it ran for (Unix seconds); none for a manual run.
    pub due: Option<i64>,
    /// Start, Unix milliseconds.
    pub started_ms: i64,
    /// End, Unix milliseconds (none while running).
    pub ended_ms: Option<i64>,
    /// How it ended.
    pub status: RunStatus,
    /// The command's exit code (0, 1, 2…), once it ended.
    pub exit_code: Option<u8>,
    /// The error line of a failed run, or why it was skipped.
    pub error: Option<String>,
    /// What the command printed (at most [`MAX_OUTPUT_BYTES`]).
    pub output: String,
    /// Bytes of output past [`MAX_OUTPUT_BYTES`], not kept.
    pub output_dropped: u64,
}

impl Run {
    fn summary(&self) -> RunSummary {
        RunSummary {
            n: self.n,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            status: self.status,
        }
    }
}

/// A task with its next due time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskView {
    /// The task.
    #[serde(flatten)]
    pub task: Task,
    /// When it runs next (Unix seconds): none while disabled.
    pub next_run: Option<i64>,
}

/// What a command's run gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The CLI's exit code: 0 ok, 2 bad input, 1 anything else.
    pub exit_code: u8,
    /// The error line (as the CLI prints it after `error: `), if it failed.
    pub error: Option<String>,
    /// What it printed (bounded by the runner).
    pub output: String,
    /// Bytes of output not kept.
    pub output_dropped: u64,
}

/// A command's run, as a future.
pub type RunFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// What runs the tasks' commands: the `capybara` CLI in the agent (`crate::cli::scheduled`).
pub trait Commands: Send + Sync + std::fmt::Debug {
    /// Whether `args` (the words after `capybara`) parse and may be scheduled; why not.
    fn check(&self, args: &[String]) -> Result<(), String>;
    /// Runs `args` as task `task` (its actor `schedule:<task>`).
    fn run(&self, task: u64, args: Vec<String>) -> RunFuture;
}

/// A task id as given (decimal, from 1), in `field`.
pub fn parse_id(field: &'static str, s: &str) -> Result<u64, ValidationError> {
    match s.trim().parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ if s.trim().is_empty() => Err(ValidationError::Missing { field }),
        _ => Err(ValidationError::Value {
            field,
            reason: format!("{s:?} is not a schedule id (a number from 1, see schedule list)"),
        }),
    }
}

/// Splits a command line into words as a POSIX shell would, without expanding anything:
/// blanks separate words, `'…'` is literal, `"…"` keeps `\"` and `\\` escapes, `\` outside
/// quotes escapes the next character. An unclosed quote is refused naming `field`.
pub fn split_command(field: &'static str, line: &str) -> Result<Vec<String>, ValidationError> {
    let bad = |reason: &str| ValidationError::Value {
        field,
        reason: format!("{line:?}: {reason}"),
    };
    if line.len() > MAX_COMMAND_BYTES {
        return Err(ValidationError::Value {
            field,
            reason: format!("longer than {MAX_COMMAND_BYTES} bytes"),
        });
    }
    let (mut words, mut cur, mut any) = (Vec::new(), String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            '\'' => {
                any = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(bad("unclosed '")),
                    }
                }
            }
            '"' => {
                any = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(bad("unclosed \"")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(bad("unclosed \"")),
                    }
                }
            }
            '\\' => {
                any = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(bad("ends with \\")),
                }
            }
            c => {
                any = true;
                cur.push(c);
            }
        }
    }
    if any {
        words.push(cur);
    }
    if words.is_empty() {
        return Err(ValidationError::Missing { field });
    }
    Ok(words)
}

/// The latest due time of `s` at or before `now` that is after `after`, if any.
fn latest_due(s: &CronSchedule, after: i64, now: i64) -> Option<i64> {
    let first = s.next_after(after)?;
    if first > now {
        return None;
    }
    Some(s.latest_at_or_before(now).unwrap_or(first).max(first))
}

/// The scheduled tasks feature.
#[derive(Debug)]
pub struct Schedules {
    core: Arc<Core>,
    /// What runs the commands (set once by `crate::scheduler`).
    commands: OnceLock<Arc<dyn Commands>>,
    /// The clock (the system's unless a test sets another).
    clock: RwLock<Arc<dyn Clock>>,
    /// Tasks with a run going.
    running: Mutex<HashSet<u64>>,
    /// Wakes the runner when the tasks change.
    changed: tokio::sync::Notify,
    /// Counts runs recorded as ended (ended or skipped), for whoever waits for one.
    ended: tokio::sync::watch::Sender<u64>,
    /// Set when the agent stops: the runner ends.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The runner's task (`crate::scheduler` starts it), for [`Schedules::join_runner`].
    runner: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Schedules {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Schedules {
        Schedules {
            core,
            commands: OnceLock::new(),
            clock: RwLock::new(Arc::new(SystemClock)),
            running: Mutex::new(HashSet::new()),
            changed: tokio::sync::Notify::new(),
            ended: tokio::sync::watch::channel(0).0,
            stopping: tokio::sync::watch::channel(false).0,
            runner: Mutex::new(None),
        }
    }

    /// Sets what runs the commands (once; later calls are ignored).
    pub fn set_commands(&self, commands: Arc<dyn Commands>) {
        let _ = self.commands.set(commands);
    }

    /// Sets the clock (tests set a [`ManualClock`] before the runner starts).
    pub fn set_clock(&self, clock: Arc<dyn Clock>) {
        *self.clock.write().unwrap() = clock;
    }

    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.read().unwrap().clone()
    }

    fn now_s(&self) -> i64 {
        self.clock().now_ms().div_euclid(1000)
    }

    /// A receiver of the count of runs ended so far (tests wait on it).
    pub fn ended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended.subscribe()
    }

    fn commands(&self) -> Result<Arc<dyn Commands>, ServiceError> {
        self.commands
            .get()
            .cloned()
            .ok_or(ServiceError::NoScheduler)
    }

    fn load(&self, id: u64) -> Result<Task, ServiceError> {
        self.core
            .store
            .get(Cf::Schedules, &keys::schedule(id))?
            .ok_or_else(|| not_found("schedule", id))
    }

    fn view(&self, task: Task) -> TaskView {
        let next_run = if task.enabled {
            CronSchedule::parse(&task.cron, &task.tz)
                .ok()
                .and_then(|s| s.next_after(task.last_due.max(self.now_s())))
        } else {
            None
        };
        TaskView { task, next_run }
    }

    /// Adds a task running `command` on `cron` in `tz` (empty: UTC). Refused naming `command`,
    /// `cron` or `tz`, with nothing stored, if any is bad.
    pub fn add(
        &self,
        actor: &Actor,
        command: &str,
        cron: &str,
        tz: &str,
        missed: Missed,
    ) -> Result<TaskView, ServiceError> {
        let args = split_command("command", command)?;
        let commands = self.commands()?;
        commands
            .check(&args)
            .map_err(|reason| ValidationError::Value {
                field: "command",
                reason,
            })?;
        let schedule = CronSchedule::parse(cron, tz)?;
        let now = self.now_s();
        let task = {
            let _w = self.core.writer.lock().unwrap();
            let id: u64 = self
                .core
                .store
                .get(Cf::Schedules, keys::SCHEDULE_NEXT_ID)?
                .unwrap_or(1);
            let task = Task {
                id,
                command: command.trim().to_owned(),
                args,
                cron: schedule.expr().to_owned(),
                tz: schedule.tz().to_owned(),
                missed,
                enabled: true,
                created_at: now,
                created_by: actor.to_string(),
                last_due: now,
                runs: 0,
                last_run: None,
            };
            let mut batch = Batch::default();
            batch.put(Cf::Schedules, keys::SCHEDULE_NEXT_ID, &(id + 1))?;
            batch.put(Cf::Schedules, &keys::schedule(id), &task)?;
            self.core.audit(
                &mut batch,
                actor,
                "schedule.add",
                format!("schedule:{id}"),
                None,
                to_json(&task),
            )?;
            self.core.commit(batch)?;
            task
        };
        self.changed.notify_one();
        Ok(self.view(task))
    }

    /// Every task, by id.
    pub fn list(&self) -> Result<Vec<TaskView>, ServiceError> {
        Ok(self
            .core
            .store
            .scan::<Task>(Cf::Schedules, keys::SCHEDULE_PREFIX)?
            .into_iter()
            .map(|(_, t)| self.view(t))
            .collect())
    }

    /// One task.
    pub fn get(&self, id: u64) -> Result<TaskView, ServiceError> {
        Ok(self.view(self.load(id)?))
    }

    /// Enables or disables a task. Enabled again, it runs from its next due time on (the time
    /// it was disabled is not caught up).
    pub fn set_enabled(
        &self,
        actor: &Actor,
        id: u64,
        enabled: bool,
    ) -> Result<TaskView, ServiceError> {
        let task = {
            let _w = self.core.writer.lock().unwrap();
            let before = self.load(id)?;
            let mut task = before.clone();
            if task.enabled != enabled {
                task.enabled = enabled;
                if enabled {
                    task.last_due = task.last_due.max(self.now_s());
                }
                let mut batch = Batch::default();
                batch.put(Cf::Schedules, &keys::schedule(id), &task)?;
                self.core.audit(
                    &mut batch,
                    actor,
                    if enabled {
                        "schedule.enable"
                    } else {
                        "schedule.disable"
                    },
                    format!("schedule:{id}"),
                    to_json(&serde_json::json!({ "enabled": before.enabled })),
                    to_json(&serde_json::json!({ "enabled": enabled })),
                )?;
                self.core.commit(batch)?;
            }
            task
        };
        self.changed.notify_one();
        Ok(self.view(task))
    }

    /// Deletes a task and its history (a run going ends, unrecorded).
    pub fn delete(&self, actor: &Actor, id: u64) -> Result<Task, ServiceError> {
        let task = {
            let _w = self.core.writer.lock().unwrap();
            let task = self.load(id)?;
            let mut batch = Batch::default();
            batch.delete(Cf::Schedules, &keys::schedule(id));
            for (k, _) in self
                .core
                .store
                .scan::<serde_json::Value>(Cf::Schedules, &keys::schedule_runs_prefix(id))?
            {
                batch.delete(Cf::Schedules, &k);
            }
            self.core.audit(
                &mut batch,
                actor,
                "schedule.delete",
                format!("schedule:{id}"),
                to_json(&task),
                None,
            )?;
            self.core.commit(batch)?;
            task
        };
        self.changed.notify_one();
        Ok(task)
    }

    /// The task's runs, newest first, at most `limit` (and [`MAX_RUNS_KEPT`]).
    pub fn history(&self, id: u64, limit: usize) -> Result<Vec<Run>, ServiceError> {
        self.load(id)?;
        let mut runs: Vec<Run> = self
            .core
            .store
            .scan::<Run>(Cf::Schedules, &keys::schedule_runs_prefix(id))?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        runs.reverse();
        runs.truncate(limit.clamp(1, MAX_RUNS_KEPT as usize));
        Ok(runs)
    }

    /// Writes `run` (number `task.runs`) with the task record, deleting the run that falls out
    /// of the kept history; under the writer lock.
    fn put_run(&self, batch: &mut Batch, task: &mut Task, run: &Run) -> Result<(), ServiceError> {
        task.last_run = Some(run.summary());
        batch.put(Cf::Schedules, &keys::schedule(task.id), &*task)?;
        batch.put(Cf::Schedules, &keys::schedule_run(task.id, run.n), run)?;
        if let Some(old) = run.n.checked_sub(MAX_RUNS_KEPT) {
            batch.delete(Cf::Schedules, &keys::schedule_run(task.id, old));
        }
        Ok(())
    }

    /// Claims task `id` for a run and records its start: the run's record (`running`), the
    /// task's `last_due` moved to `due`. Refused while a run of it is going
    /// ([`ServiceError::TaskRunning`]) or, for a scheduled run, once it was disabled.
    pub fn begin(
        &self,
        actor: &Actor,
        id: u64,
        trigger: Trigger,
        due: Option<i64>,
    ) -> Result<Run, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let mut task = self.load(id)?;
        if trigger != Trigger::Manual && !task.enabled {
            return Err(not_found("enabled schedule", id));
        }
        if !self.running.lock().unwrap().insert(id) {
            return Err(ServiceError::TaskRunning { id });
        }
        let run = Run {
            task: id,
            n: task.runs,
            trigger,
            due,
            started_ms: self.clock().now_ms(),
            ended_ms: None,
            status: RunStatus::Running,
            exit_code: None,
            error: None,
            output: String::new(),
            output_dropped: 0,
        };
        task.runs += 1;
        if let Some(d) = due {
            task.last_due = task.last_due.max(d);
        }
        let mut batch = Batch::default();
        let written = self.put_run(&mut batch, &mut task, &run).and_then(|()| {
            if trigger == Trigger::Manual {
                self.core.audit(
                    &mut batch,
                    actor,
                    "schedule.run",
                    format!("schedule:{id}"),
                    None,
                    to_json(&serde_json::json!({ "run": run.n })),
                )?;
            }
            self.core.commit(batch)
        });
        if let Err(e) = written {
            self.running.lock().unwrap().remove(&id);
            return Err(e);
        }
        Ok(run)
    }

    /// Records the end of `run` with what its command gave, and releases the task.
    pub fn finish(&self, mut run: Run, outcome: Outcome) -> Result<Run, ServiceError> {
        let id = run.task;
        let result = (|| {
            let _w = self.core.writer.lock().unwrap();
            run.ended_ms = Some(self.clock().now_ms().max(run.started_ms));
            run.exit_code = Some(outcome.exit_code);
            run.status = if outcome.exit_code == 0 {
                RunStatus::Ok
            } else {
                RunStatus::Failed
            };
            run.error = outcome.error;
            let (output, dropped) = bound_output(outcome.output);
            run.output = output;
            run.output_dropped = outcome.output_dropped + dropped;
            // A task deleted during its run: nothing to record it under.
            let Some(mut task) = self
                .core
                .store
                .get::<Task>(Cf::Schedules, &keys::schedule(run.task))?
            else {
                return Ok(run);
            };
            let mut batch = Batch::default();
            self.put_run(&mut batch, &mut task, &run)?;
            self.core.store.commit(batch)?;
            Ok(run)
        })();
        self.running.lock().unwrap().remove(&id);
        self.ended.send_modify(|n| *n += 1);
        result
    }

    /// Releases task `id` after a run whose end could not be recorded.
    pub fn release(&self, id: u64) {
        self.running.lock().unwrap().remove(&id);
    }

    /// Records a due time of task `id` that is not run (`reason`), moving its `last_due`.
    pub fn skip(
        &self,
        id: u64,
        trigger: Trigger,
        due: i64,
        reason: &str,
    ) -> Result<Run, ServiceError> {
        let run = {
            let _w = self.core.writer.lock().unwrap();
            let mut task = self.load(id)?;
            let now = self.clock().now_ms();
            let run = Run {
                task: id,
                n: task.runs,
                trigger,
                due: Some(due),
                started_ms: now,
                ended_ms: Some(now),
                status: RunStatus::Skipped,
                exit_code: None,
                error: Some(reason.to_owned()),
                output: String::new(),
                output_dropped: 0,
            };
            task.runs += 1;
            task.last_due = task.last_due.max(due);
            let mut batch = Batch::default();
            self.put_run(&mut batch, &mut task, &run)?;
            self.core.store.commit(batch)?;
            run
        };
        self.ended.send_modify(|n| *n += 1);
        Ok(run)
    }

    /// Runs task `id` now for `actor` and waits for the result (`schedule run ID`).
    pub async fn run_now(self: &Arc<Self>, actor: Actor, id: u64) -> Result<Run, ServiceError> {
        let commands = self.commands()?;
        let me = self.clone();
        let run = blocking(move || me.begin(&actor, id, Trigger::Manual, None)).await?;
        let args = self.load(id).map(|t| t.args);
        let args = match args {
            Ok(a) => a,
            Err(e) => {
                self.release(id);
                return Err(e);
            }
        };
        let outcome = commands.run(id, args).await;
        let me = self.clone();
        blocking(move || me.finish(run, outcome)).await
    }

    /// Every enabled task's due time to act on: `(id, due, missed rule)`, where `due` is the
    /// next due time after its `last_due` or, once that has passed, the latest due time at or
    /// before `now` (one run for any number passed).
    pub fn plan(&self, now: i64) -> Result<Vec<(u64, i64, Missed)>, ServiceError> {
        let mut out = Vec::new();
        for (_, t) in self
            .core
            .store
            .scan::<Task>(Cf::Schedules, keys::SCHEDULE_PREFIX)?
        {
            if !t.enabled {
                continue;
            }
            let Ok(s) = CronSchedule::parse(&t.cron, &t.tz) else {
                tracing::warn!(task = t.id, cron = %t.cron, tz = %t.tz, "stored schedule does not parse; not run");
                continue;
            };
            let due = latest_due(&s, t.last_due, now).or_else(|| s.next_after(t.last_due));
            if let Some(due) = due {
                out.push((t.id, due, t.missed));
            }
        }
        Ok(out)
    }

    /// At start: runs left `running` by a stopped agent are recorded `failed`.
    pub fn close_interrupted(&self) -> Result<(), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let mut batch = Batch::default();
        let mut any = false;
        for (_, mut task) in self
            .core
            .store
            .scan::<Task>(Cf::Schedules, keys::SCHEDULE_PREFIX)?
        {
            let Some(last) = task.last_run.clone() else {
                continue;
            };
            if last.status != RunStatus::Running {
                continue;
            }
            let key = keys::schedule_run(task.id, last.n);
            if let Some(mut run) = self.core.store.get::<Run>(Cf::Schedules, &key)? {
                run.status = RunStatus::Failed;
                run.ended_ms = Some(self.clock().now_ms().max(run.started_ms));
                run.error = Some("the agent stopped during the run".into());
                task.last_run = Some(run.summary());
                batch.put(Cf::Schedules, &key, &run)?;
                batch.put(Cf::Schedules, &keys::schedule(task.id), &task)?;
                any = true;
            }
        }
        if any {
            self.core.store.commit(batch)?;
        }
        Ok(())
    }

    /// Ends the runner (the agent is stopping); runs going finish on their own.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Keeps the runner's task, for [`Schedules::join_runner`].
    pub fn set_runner(&self, task: tokio::task::JoinHandle<()>) {
        *self.runner.lock().unwrap() = Some(task);
    }

    /// Waits until the runner (stopped with [`Schedules::stop`]) has ended with its runs: then
    /// nothing of the scheduler holds the service (the daemon shuts the dataplane down after).
    pub async fn join_runner(&self) {
        let task = self.runner.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Resolves once [`Schedules::stop`] was called.
    pub async fn stopped(&self) {
        let _ = self.stopping.subscribe().wait_for(|s| *s).await;
    }

    /// Tells the runner the tasks changed under it (a cluster's change applied:
    /// `service::cluster`): it plans again from the store.
    pub fn reload(&self) {
        self.changed.notify_one();
    }

    /// Resolves when the tasks changed (added, enabled, disabled, deleted) since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Keeps at most [`MAX_OUTPUT_BYTES`] of `output` (cut at a character boundary); the bytes cut.
fn bound_output(mut output: String) -> (String, u64) {
    if output.len() <= MAX_OUTPUT_BYTES {
        return (output, 0);
    }
    let mut cut = MAX_OUTPUT_BYTES;
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = (output.len() - cut) as u64;
    output.truncate(cut);
    (output, dropped)
}

/// Runs `f` on the blocking pool (store writes wait for the disk).
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, ServiceError> + Send + 'static,
) -> Result<R, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[cfg(test)]
mod tests;
