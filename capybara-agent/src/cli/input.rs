//! Checks of command-line values that several command families share, made with the agent's own
//! parsers so bad input is refused (exit 2, naming the field) before a connection is made.

use std::{io::Read as _, path::Path};

use super::CliError;
use crate::service::domain::{
    MAX_YAML_BYTES, UserName, ValidationError, parse_duration, yaml_too_large,
};

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

/// A local text file (a policy file, a template). At most one byte more than
/// [`MAX_YAML_BYTES`] is read: a larger file (or `/dev/zero`) is refused as `from_yaml` refuses
/// it, without the CLI reading all of it.
pub(super) fn read_text(path: &Path) -> Result<String, CliError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_YAML_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(CliError::file(path))?;
    if bytes.len() > MAX_YAML_BYTES {
        return Err(yaml_too_large().into());
    }
    String::from_utf8(bytes).map_err(|_| {
        CliError::file(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}
