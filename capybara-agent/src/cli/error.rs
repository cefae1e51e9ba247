//! Why a command failed, its exit code and its one-line message: **2** for bad input (a value
//! that does not parse here, the agent's `INVALID_ARGUMENT`, a token refused for plain
//! `http://` off the machine, a backup that cannot be restored), 1 for anything else, and 141
//! with no message when standard output is a pipe whose reader has gone (as if SIGPIPE had
//! ended the process: `capybara user list | head -1` is not an error).
//!
//! The line is the message and its causes, never the gRPC code's description (the agent's
//! messages say what went wrong, and for FAILED_PRECONDITION what to do), then a short hint where
//! the cause is on this side: no agent on the control socket (how to start one, `--socket`), not
//! root on it, nothing listening at `--endpoint`, no `--token`, an UNAVAILABLE agent (its log).
//! `--verbose` adds the gRPC code.

use std::path::{Path, PathBuf};

use super::Cli;
use crate::{
    api::client::{ClientError, is_bad_input},
    service::domain::ValidationError,
    store::backup::BackupError,
};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CliError {
    /// Bad input caught here.
    #[error(transparent)]
    Input(#[from] ValidationError),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The QR code could not be made.
    #[error("QR code: {0}")]
    Qr(#[from] qrcode::types::QrError),
    /// A backup could not be restored.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The agent's answer or state does not allow the command (said in words).
    #[error("{0}")]
    Agent(String),
    /// The agent ended a live view's stream (it is stopping).
    #[error("the agent ended the live view (is it stopping?)")]
    WatchEnded,
    /// The signal handlers of a live view could not be installed.
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
    /// Standard output could not be written (a closed pipe ends the command quietly).
    #[error("standard output")]
    Stdout(#[source] std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub(super) fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Client(e) if is_bad_input(e) => 2,
            CliError::Backup(e) if !matches!(e, BackupError::Store(_)) => 2,
            _ if self.is_closed_pipe() => 141,
            _ => 1,
        }
    }

    /// Whether standard output is a pipe whose reader has gone: the command ends quietly.
    pub(super) fn is_closed_pipe(&self) -> bool {
        matches!(self, CliError::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// For `map_err`: an I/O error on the local file `path`.
    pub(super) fn file(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
        move |source| CliError::File {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The error and its causes on one line, then a hint where one helps ([`hint`]); with
    /// `verbose` the gRPC code too. A gRPC status counts with its message only: its `Display`
    /// adds the code's description ("code: 'The system is not in a state required…'").
    pub(super) fn one_line(&self, cli: &Cli) -> String {
        let mut s = self.to_string();
        let mut code = None;
        let mut src = std::error::Error::source(self);
        while let Some(c) = src {
            let m = match c.downcast_ref::<tonic::Status>() {
                Some(status) => {
                    code = code.or(Some(status.code()));
                    status.message().to_owned()
                }
                None => c.to_string(),
            };
            if !s.contains(&m) {
                s.push_str(": ");
                s.push_str(&m);
            }
            src = c.source();
        }
        if let Some(h) = hint(self, cli) {
            s.push_str("; ");
            s.push_str(h);
        }
        if let Some(code) = code.filter(|_| cli.verbose) {
            s.push_str(&format!(" (gRPC code {code:?})"));
        }
        s.replace('\n', " ")
    }
}

/// What to do about `e`, when the cause is on this side and the message does not say it.
fn hint(e: &CliError, cli: &Cli) -> Option<&'static str> {
    let CliError::Client(e) = e else {
        return None;
    };
    match e {
        ClientError::Connect { .. } if cli.endpoint.is_some() => Some(
            "is the agent running with its TCP API there (capybara-agent --api-listen ADDR)? \
             Check --endpoint",
        ),
        ClientError::Connect { .. } => match io_kind(e) {
            Some(std::io::ErrorKind::PermissionDenied) => Some(
                "the control socket is root's: run as root, or use --endpoint URL --token TOKEN",
            ),
            _ => Some(
                "is the agent running? Start it with `cargo xtask run` (or `capybara-agent`), \
                 or name its socket with --socket",
            ),
        },
        ClientError::Status(s) => match s.code() {
            tonic::Code::Unauthenticated if cli.endpoint.is_some() && cli.token.is_none() => {
                Some("give a token with --token TOKEN (or CAPYBARA_TOKEN)")
            }
            tonic::Code::Unauthenticated if cli.endpoint.is_none() => Some(
                "the control socket is root's: run as root, or use --endpoint URL --token TOKEN",
            ),
            // (`capybara health` says so in its own message.)
            tonic::Code::Unavailable if !s.message().contains("log") => {
                Some("is the agent running? Its log says why it does not serve")
            }
            _ => None,
        },
        _ => None,
    }
}

/// The kind of the I/O error among `e`'s causes.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut src = Some(e);
    while let Some(c) = src {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        src = c.source();
    }
    None
}
