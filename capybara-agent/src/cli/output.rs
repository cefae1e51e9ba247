//! What every command family prints with: `--json` output, times, `-` for nothing, and bytes
//! written to a file or standard output.

use std::{io::Write as _, path::PathBuf};

use serde::Serialize;

use super::CliError;
use crate::service::domain::from_unix_secs;

/// Prints a value as pretty JSON (`--json`).
pub(super) fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("domain values serialise")
    );
}

/// Unix seconds as RFC 3339, to the second.
pub(super) fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(from_unix_secs(secs)).to_string()
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

/// Writes `bytes` to `path`, or to standard output without one.
pub(super) fn write_out(path: Option<&PathBuf>, bytes: &[u8]) -> Result<(), CliError> {
    match path {
        Some(p) => std::fs::write(p, bytes).map_err(CliError::file(p)),
        None => std::io::stdout()
            .write_all(bytes)
            .map_err(CliError::file("-".as_ref())),
    }
}
