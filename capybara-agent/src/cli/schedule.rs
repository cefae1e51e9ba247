//! `capybara schedule add|list|run|enable|disable|delete|history`: scheduled tasks, capybara
//! commands the agent runs on a cron schedule (`service::schedules` says how: in the agent,
//! never through a shell, as `schedule:<id>`).
//!
//! As the design writes them: `schedule add "backup create" --cron "0 2 * * *"` (the command
//! one quoted argument, as a shell would split it), `schedule run <id>` (runs it now, waits,
//! prints its output; exit 1 if it failed), `schedule enable|disable|delete <id>`. The command,
//! the expression and the zone are checked here with the agent's own parsers (exit 2 naming
//! `command`, `cron` or `tz`) before a connection is made.

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{opt_time, out, outln, print_json, time},
    table::Table,
};
use crate::service::{
    domain::ValidationError,
    schedules::{CronSchedule, Missed, Run, RunStatus, TaskView, parse_id, split_command},
};

/// `capybara schedule …`.
#[derive(Debug, Subcommand)]
pub(super) enum ScheduleCmd {
    /// Run a capybara command on a cron schedule, in the agent (e.g. "backup create --keep 7").
    Add {
        /// The command after `capybara`, one argument: "backup create --keep 7" (it may start
        /// with an option: "--json user list").
        #[arg(allow_hyphen_values = true)]
        command: String,
        /// When: five fields, minute hour day-of-month month day-of-week ("0 2 * * *",
        /// "0 9 * * MON", "*/15 * * * *"); no seconds.
        #[arg(long)]
        cron: String,
        /// The IANA time zone the expression is read in (e.g. Europe/Berlin).
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// A due time missed while the agent was down: run once at start, or skip it.
        #[arg(long, default_value = "run", value_parser = ["run", "skip"])]
        missed: String,
    },
    /// Every task with its next run, last run and last status.
    List,
    /// Run a task now, wait for it and print its output.
    Run {
        /// The task's id (schedule list).
        id: String,
    },
    /// Let a task run on its schedule again.
    Enable {
        /// The task's id.
        id: String,
    },
    /// Stop a task from running on its schedule (it can still be run by hand).
    Disable {
        /// The task's id.
        id: String,
    },
    /// Delete a task and its history.
    Delete {
        /// The task's id.
        id: String,
    },
    /// A task's runs, newest first, with their output (the newest 50 are kept).
    History {
        /// The task's id.
        id: String,
        /// At most this many runs.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
}

/// `ms` Unix milliseconds as RFC 3339 to the second.
fn time_ms(ms: i64) -> String {
    time(ms.div_euclid(1000).max(0) as u64)
}

fn took(r: &Run) -> String {
    match r.ended_ms {
        Some(e) => format!("{:.1} s", (e - r.started_ms) as f64 / 1000.0),
        None => "-".into(),
    }
}

fn status_line(r: &Run) -> String {
    let mut s = r.status.name().to_owned();
    if let Some(c) = r.exit_code.filter(|c| *c != 0) {
        s.push_str(&format!(" (exit {c})"));
    }
    if let Some(e) = &r.error {
        s.push_str(": ");
        s.push_str(e);
    }
    s
}

fn task_line(t: &TaskView) -> String {
    format!(
        "schedule {}: {:?} at {:?} {}, missed runs: {}; {}; next run {}",
        t.task.id,
        t.task.command,
        t.task.cron,
        t.task.tz,
        t.task.missed.name(),
        if t.task.enabled {
            "enabled"
        } else {
            "disabled"
        },
        opt_time(t.next_run.map(|n| n.max(0) as u64)),
    )
}

fn print_output(r: &Run) -> Result<(), CliError> {
    out!("{}", r.output)?;
    if !r.output.is_empty() && !r.output.ends_with('\n') {
        outln!()?;
    }
    if r.output_dropped > 0 {
        outln!("[{} more bytes of output not kept]", r.output_dropped)?;
    }
    Ok(())
}

/// Runs `capybara schedule …`.
pub(super) async fn run(cli: &Cli, cmd: &ScheduleCmd) -> Result<(), CliError> {
    let id_of = |s: &str| parse_id("id", s);
    match cmd {
        ScheduleCmd::Add {
            command,
            cron,
            tz,
            missed,
        } => {
            let args = split_command("command", command)?;
            super::scheduled::check(&args).map_err(|reason| ValidationError::Value {
                field: "command",
                reason,
            })?;
            CronSchedule::parse(cron, tz)?;
            Missed::parse("missed", missed)?;
            let t = connect(cli)
                .await?
                .add_schedule(command, cron, tz, missed)
                .await?;
            if cli.json {
                return print_json(&t);
            }
            outln!("{}", task_line(&t))
        }
        ScheduleCmd::List => {
            let ts = connect(cli).await?.list_schedules().await?;
            if cli.json {
                return print_json(&ts);
            }
            let mut t = Table::new(&[
                "ID",
                "COMMAND",
                "CRON",
                "TZ",
                "ENABLED",
                "NEXT RUN",
                "LAST RUN",
                "LAST STATUS",
            ]);
            for v in &ts {
                let last = v.task.last_run.as_ref();
                t.row(vec![
                    v.task.id.to_string(),
                    v.task.command.clone(),
                    v.task.cron.clone(),
                    v.task.tz.clone(),
                    if v.task.enabled { "yes" } else { "no" }.into(),
                    opt_time(v.next_run.map(|n| n.max(0) as u64)),
                    last.map_or_else(|| "-".into(), |l| time_ms(l.started_ms)),
                    last.map_or_else(|| "-".into(), |l| l.status.name().into()),
                ]);
            }
            out!("{t}")
        }
        ScheduleCmd::Run { id } => {
            let id = id_of(id)?;
            let r = connect(cli).await?.run_schedule(id).await?;
            if cli.json {
                print_json(&r)?;
            } else {
                print_output(&r)?;
            }
            match r.status {
                RunStatus::Ok => Ok(()),
                _ => Err(CliError::Agent(format!(
                    "schedule {id} run {}: {}",
                    r.n,
                    status_line(&r)
                ))),
            }
        }
        ScheduleCmd::Enable { id } | ScheduleCmd::Disable { id } => {
            let enable = matches!(cmd, ScheduleCmd::Enable { .. });
            let t = connect(cli)
                .await?
                .enable_schedule(id_of(id)?, enable)
                .await?;
            if cli.json {
                return print_json(&t);
            }
            outln!("{}", task_line(&t))
        }
        ScheduleCmd::Delete { id } => {
            let t = connect(cli).await?.delete_schedule(id_of(id)?).await?;
            if cli.json {
                return print_json(&t);
            }
            outln!("deleted schedule {} ({:?})", t.task.id, t.task.command)
        }
        ScheduleCmd::History { id, limit } => {
            let runs = connect(cli)
                .await?
                .schedule_history(id_of(id)?, limit.unwrap_or(0))
                .await?;
            if cli.json {
                return print_json(&runs);
            }
            if runs.is_empty() {
                return outln!("no runs yet");
            }
            for r in &runs {
                outln!(
                    "run {} ({}{}): started {}, ended {} ({}): {}",
                    r.n,
                    r.trigger.name(),
                    r.due
                        .map_or_else(String::new, |d| format!(", due {}", time(d.max(0) as u64))),
                    time_ms(r.started_ms),
                    r.ended_ms.map_or_else(|| "-".into(), time_ms),
                    took(r),
                    status_line(r)
                )?;
                print_output(r)?;
            }
            Ok(())
        }
    }
}
