//! Checks of command-line values that several command families share, made with the agent's own
//! parsers so bad input is refused (exit 2, naming the field) before a connection is made.

use std::path::Path;

use super::CliError;
use crate::service::domain::{UserName, ValidationError, parse_duration};

/// An optional duration from now (e.g. `30d`) in seconds.
pub(super) fn expiry(field: &'static str, s: Option<&str>) -> Result<Option<u64>, ValidationError> {
    s.map(|s| parse_duration(field, s).map(|d| d.as_secs()))
        .transpose()
}

/// An optional user name as the API takes it (`""` for none).
pub(super) fn opt_user(user: Option<&String>) -> Result<&str, ValidationError> {
    if let Some(u) = user {
        UserName::parse("user", u)?;
    }
    Ok(user.map_or("", String::as_str))
}

/// Checks every name of a `users` list.
pub(super) fn users(users: &[String]) -> Result<(), ValidationError> {
    for u in users {
        UserName::parse("users", u)?;
    }
    Ok(())
}

/// A local text file (a policy file, a template).
pub(super) fn read_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(CliError::file(path))
}
