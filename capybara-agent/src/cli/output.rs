//! What every command family prints with: standard output that a closed pipe ends quietly
//! ([`out!`], [`outln!`]), `--json` output, times, `-` for nothing, bytes written to a file or
//! standard output, and files that hold secrets (backups, QR codes of configs) written with
//! mode 0600.
//!
//! - Standard output is written through [`out!`] / [`outln!`], never `print!`: `print!` panics
//!   when the reader of a pipe has gone (`capybara user show alice | head -3`); these return
//!   [`CliError::Stdout`], which ends the process quietly with 141 (128 + SIGPIPE, the status a
//!   shell shows for a writer that the pipe's close ended). Rust ignores SIGPIPE in its start-up
//!   code and restoring it would take `unsafe`, which the CLI does not use.
//! - In a scheduled task's run (the CLI in the agent, `scheduled`) standard output is the run's
//!   bounded buffer instead.
//! - Times are total: one RFC 3339 cannot show (past year 9999) prints as its Unix seconds.

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use serde::Serialize;

use super::CliError;
use crate::{paths, service::domain::from_unix_secs};

/// `print!` for the CLI: a closed standard output is an error ([`CliError::Stdout`]), not a
/// panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` for the CLI, as [`out!`].
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(super) use {out, outln};

/// Writes to standard output (what [`out!`] calls); in a scheduled task's run, to its output
/// buffer (`scheduled`).
pub(super) fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    if super::scheduled::capture(&args.to_string()) {
        return Ok(());
    }
    std::io::stdout()
        .lock()
        .write_fmt(args)
        .map_err(CliError::Stdout)
}

/// Standard output as an `io::Write` (for output written as a stream), captured in a scheduled
/// task's run as [`write_stdout`] is.
pub(super) struct Stdout;

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if super::scheduled::capture(&String::from_utf8_lossy(buf)) {
            return Ok(buf.len());
        }
        std::io::stdout().lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

/// Prints a value as pretty JSON (`--json`).
pub(super) fn print_json<T: Serialize>(v: &T) -> Result<(), CliError> {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("domain values serialise")
    )
}

/// The last second RFC 3339 can show: 9999-12-31T23:59:59Z.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// Unix seconds as RFC 3339, to the second; a time past year 9999 as its number of seconds.
pub(super) fn time(secs: u64) -> String {
    let mut s = String::new();
    if secs <= LAST_RFC3339_SECOND
        && write!(
            s,
            "{}",
            humantime::format_rfc3339_seconds(from_unix_secs(secs))
        )
        .is_ok()
    {
        s
    } else {
        secs.to_string()
    }
}

/// [`time`], or `-` for none.
pub(super) fn opt_time(secs: Option<u64>) -> String {
    secs.map_or_else(|| "-".to_owned(), time)
}

/// Names joined with commas on one table cell, or `-` for none.
pub(super) fn names_line<T: ToString>(names: impl IntoIterator<Item = T>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| n.to_string()).collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// Creates or truncates `path` for writing with mode 0600 (it will hold secrets): a new
/// file is created with that mode, an existing one is narrowed to it before anything is
/// written.
pub(super) fn create_private(path: &Path) -> std::io::Result<File> {
    // The mode of the server's key file: these hold keys too.
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(paths::KEY_FILE_MODE)
        .open(path)?;
    let perm = file.metadata()?.permissions();
    if perm.mode() & 0o777 != paths::KEY_FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(paths::KEY_FILE_MODE))?;
    }
    Ok(file)
}

/// Writes `bytes` to the file `path` with mode 0600 (see [`create_private`]).
#[cfg(test)]
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    create_private(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(CliError::file(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_up_to_year_9999() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(time(LAST_RFC3339_SECOND), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn times_rfc3339_cannot_show_print_as_seconds() {
        assert_eq!(time(LAST_RFC3339_SECOND + 1), "253402300800");
        // Past what `SystemTime` holds, too.
        assert_eq!(time(u64::MAX), u64::MAX.to_string());
        assert_eq!(opt_time(Some(u64::MAX)), u64::MAX.to_string());
        assert_eq!(opt_time(None), "-");
    }

    #[test]
    fn private_files_are_0600_new_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        write_private(&new, b"secret").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&new), 0o600);
        assert_eq!(std::fs::read(&new).unwrap(), b"secret");
        let old = dir.path().join("old");
        std::fs::write(&old, b"a longer old content").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&old, b"secret").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read(&old).unwrap(), b"secret");
    }
}
