//! The CLI run in the agent for a scheduled task (`service::schedules`): [`check`] says whether
//! a command line parses with the CLI's own clap definitions and may be scheduled, and
//! [`InAgent`] runs it — the same command code as `capybara …` from a shell, in-process, never
//! through a shell.
//!
//! A run gets a thread of its own with a current-thread tokio runtime (as the `capybara`
//! binary has), inside which a task-local ([`RUN`]) makes [`in_agent_client`] hand out a client
//! on an in-memory connection to the agent's API (`api::inproc`, actor `schedule:<id>`) and
//! makes `output::write_stdout` append to the run's buffer: at most
//! `service::schedules::MAX_OUTPUT_BYTES` kept, the rest counted. Its outcome is the CLI's
//! exit code (0, 2 for bad input, 1 otherwise) and error line.
//!
//! Not schedulable (refused at `schedule add`, naming `command`): the live views (`top`,
//! `stats --watch`: they never end), `schedule …` itself (a task adding or running tasks),
//! `backup restore` (it replaces a *stopped* agent's store), the hidden `generate`, `--help`
//! and `--version`, and the connection options `--socket`, `--endpoint`, `--token` and
//! `--ca-cert` (a task runs against this agent's own API; its scope is that of its admin).

use std::sync::{Arc, Mutex};

use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};

use super::{Cli, Command, backup::BackupCmd};
use crate::{
    api::{
        client::{Client, ClientError},
        inproc::Connector,
    },
    service::schedules::{Commands, MAX_OUTPUT_BYTES, Outcome, RunFuture},
};

/// What a run's output holds so far.
#[derive(Debug, Default)]
pub(super) struct Captured {
    text: String,
    dropped: u64,
}

/// The run a command executes in (set around it by [`InAgent`]).
#[derive(Clone, Debug)]
pub(super) struct InAgentRun {
    connector: Connector,
    task: u64,
    out: Arc<Mutex<Captured>>,
}

tokio::task_local! {
    /// The scheduled run the current CLI command executes in, if any.
    static RUN: InAgentRun;
}

/// Appends `text` to the current run's output, if the command runs in the agent; whether it
/// did (else it goes to standard output).
pub(super) fn capture(text: &str) -> bool {
    RUN.try_with(|run| {
        let mut c = run.out.lock().unwrap();
        let room = MAX_OUTPUT_BYTES.saturating_sub(c.text.len());
        if text.len() <= room {
            c.text.push_str(text);
        } else {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            c.text.push_str(&text[..cut]);
            c.dropped += (text.len() - cut) as u64;
        }
    })
    .is_ok()
}

/// A client on the agent's own API, if the command runs in the agent.
pub(super) async fn in_agent_client() -> Option<Result<Client, ClientError>> {
    let (connector, task) = RUN.try_with(|r| (r.connector.clone(), r.task)).ok()?;
    Some(Client::in_process(&connector, task).await)
}

/// The connection options: a task runs against its agent's own API.
const CONNECTION_OPTIONS: [(&str, &str); 4] = [
    ("socket", "--socket"),
    ("endpoint", "--endpoint"),
    ("token", "--token"),
    ("ca_cert", "--ca-cert"),
];

/// Parses `args` (the words after `capybara`) with the CLI's definitions and checks that the
/// command may be scheduled (module docs); why not, in words.
pub(crate) fn check(args: &[String]) -> Result<(), String> {
    parse(args).map(|_| ())
}

fn parse(args: &[String]) -> Result<Cli, String> {
    let argv = std::iter::once("capybara").chain(args.iter().map(String::as_str));
    let matches = Cli::command().try_get_matches_from(argv).map_err(|e| {
        if !e.use_stderr() {
            return format!(
                "{:?} asks for help or the version, not a command",
                args.join(" ")
            );
        }
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("invalid arguments");
        format!(
            "{:?} does not parse: {}",
            args.join(" "),
            first.trim_start_matches("error: ")
        )
    })?;
    for (id, flag) in CONNECTION_OPTIONS {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            return Err(format!(
                "{flag} is a connection option: a scheduled command runs in the agent, against \
                 its own API"
            ));
        }
    }
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    let refuse = |what: &str, why: &str| Err(format!("{what} cannot be scheduled: {why}"));
    match &cli.command {
        Command::Top(_) => refuse("top", "a live view never ends"),
        Command::Stats(a) if a.is_watch() => refuse("stats --watch", "a live view never ends"),
        Command::Schedule(_) => refuse("schedule", "a task does not manage tasks"),
        Command::Backup(BackupCmd::Restore { .. }) => {
            refuse("backup restore", "it replaces the store of a stopped agent")
        }
        Command::Generate(_) => refuse("generate", "it is for `cargo xtask install`"),
        Command::Mfa(super::mfa::MfaCmd::Enable { .. } | super::mfa::MfaCmd::Reset { .. }) => {
            refuse(
                "mfa enable/reset",
                "its output is a user's secret, and a task's output is kept",
            )
        }
        _ => Ok(cli),
    }
}

/// Runs scheduled commands with the CLI's own code, in the agent (the `Commands` port of
/// `service::schedules`).
#[derive(Debug)]
pub struct InAgent {
    connector: Connector,
}

impl InAgent {
    /// Runs commands against the API `connector` reaches.
    pub fn new(connector: Connector) -> InAgent {
        InAgent { connector }
    }
}

impl Commands for InAgent {
    fn check(&self, args: &[String]) -> Result<(), String> {
        check(args)
    }

    fn run(&self, task: u64, args: Vec<String>) -> RunFuture {
        let connector = self.connector.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("schedule-{task}"))
                .spawn(move || {
                    let _ = tx.send(run_here(connector, task, &args));
                });
            if let Err(e) = spawned {
                return failed(format!("cannot start the run's thread: {e}"));
            }
            rx.await
                .unwrap_or_else(|_| failed("the command panicked; see the agent's log".into()))
        })
    }
}

fn failed(error: String) -> Outcome {
    Outcome {
        exit_code: 1,
        error: Some(error),
        ..Outcome::default()
    }
}

/// Runs `args` on this thread, on a runtime of its own.
fn run_here(connector: Connector, task: u64, args: &[String]) -> Outcome {
    let cli = match parse(args) {
        Ok(c) => c,
        Err(reason) => {
            return Outcome {
                exit_code: 2,
                error: Some(format!("command: {reason}")),
                ..Outcome::default()
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot start the runtime: {e}")),
    };
    let out = Arc::new(Mutex::new(Captured::default()));
    let ctx = InAgentRun {
        connector,
        task,
        out: out.clone(),
    };
    let result = runtime.block_on(RUN.scope(ctx, super::run(&cli)));
    drop(runtime);
    let captured = std::mem::take(&mut *out.lock().unwrap());
    let (exit_code, error) = match result {
        Ok(()) => (0, None),
        Err(e) => (e.exit_code(), Some(e.one_line(&cli))),
    };
    Outcome {
        exit_code,
        error,
        output: captured.text,
        output_dropped: captured.dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        crate::service::schedules::split_command("command", s).unwrap()
    }

    #[tokio::test]
    async fn a_runs_output_is_captured_and_bounded() {
        let (connector, _incoming) = crate::api::inproc::channel();
        let out = Arc::new(Mutex::new(Captured::default()));
        let ctx = InAgentRun {
            connector,
            task: 1,
            out: out.clone(),
        };
        RUN.scope(ctx, async {
            super::super::output::write_stdout(format_args!("first line\n")).unwrap();
            let big = "x".repeat(MAX_OUTPUT_BYTES);
            super::super::output::write_stdout(format_args!("{big}")).unwrap();
        })
        .await;
        let c = out.lock().unwrap();
        assert!(c.text.starts_with("first line\nxxx"));
        assert_eq!(c.text.len(), MAX_OUTPUT_BYTES);
        assert_eq!(c.dropped, 11);
        // Outside a run nothing is captured.
        assert!(!capture("to standard output"));
    }

    #[test]
    fn schedulable_commands_parse_with_the_cli() {
        for ok in [
            "backup create",
            "backup create --keep 7",
            "user cleanup-expired --grace 7d",
            "quota reset --all",
            "history clear --older-than 90d",
            "health",
            "--json user list",
            "stats alice",
        ] {
            assert_eq!(check(&words(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn unschedulable_or_unparsable_commands_say_why() {
        for (bad, why) in [
            ("top", "top cannot be scheduled"),
            ("stats --watch", "stats --watch cannot be scheduled"),
            ("schedule list", "schedule cannot be scheduled"),
            (
                "backup restore --input x",
                "backup restore cannot be scheduled",
            ),
            ("generate --out /tmp", "generate cannot be scheduled"),
            (
                "user list --endpoint http://127.0.0.1:1",
                "--endpoint is a connection option",
            ),
            ("--token abc user list", "--token is a connection option"),
            (
                "user list --socket /tmp/s",
                "--socket is a connection option",
            ),
            (
                "user list --ca-cert ca.pem",
                "--ca-cert is a connection option",
            ),
            ("no-such-command", "does not parse"),
            ("user add", "does not parse"),
            ("user list --help", "asks for help"),
        ] {
            let e = check(&words(bad)).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
