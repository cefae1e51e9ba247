//! The agent's configuration file, `/etc/capybara/agent.toml` (`--config FILE`), merged with
//! the command line.
//!
//! Every key is a flag of [`Args`]: the flag's long name with `_` for `-` (`--listen-port` is
//! `listen_port`, `--bpffs` is `bpffs`); `config`, `help` and `version` are not keys. Values:
//! a string or an integer for a flag that takes a value, `true`/`false` for a switch (`false`
//! is the same as leaving the key out), an array of them for a repeatable flag (`dns`).
//!
//! Rules:
//! - **flags override the file**: a key whose flag (or a flag that conflicts with it, such as
//!   `--no-api-socket` for `api_socket`) is on the command line is ignored; a repeatable flag
//!   given on the command line replaces the file's array, it is not appended to it;
//! - **a bad file is refused whole**, before anything starts, the error naming the file and
//!   the key: an unknown key (a key spelled with `-` gets the `_` spelling as a hint), a value
//!   of the wrong TOML type, or a value the flag's own parser refuses (`listen_port = 70000`);
//!   a TOML syntax error names the line;
//! - the default file is read only when it exists (an agent without one runs on its flags); a
//!   file named by `--config` must exist.
//!
//! Mechanics: the file's keys become `--flag=value` arguments placed before the real command
//! line, and clap parses the whole; so a value from the file goes through exactly the parsing
//! and checks a flag does. [`sample`] writes the commented default file `cargo xtask install`
//! installs, from the same flag definitions.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{ArgAction, CommandFactory as _, FromArgMatches as _, parser::ValueSource};

use super::args::Args;
use crate::paths;

/// Flags that are not keys of the file.
const NOT_KEYS: &[&str] = &["config", "help", "version"];

/// Why the command line and the configuration file could not be turned into [`Args`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line itself is wrong (or asks for `--help`/`--version`): clap's own error,
    /// printed with `clap::Error::exit`.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// The configuration file is wrong.
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// A configuration file that is refused, naming the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read (a missing file named by `--config`, no permission, …).
    #[error("{}: cannot read the configuration file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML (the message names the line and column).
    #[error("{}: not valid TOML: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// A key that is no flag of the agent.
    #[error("{}: unknown key `{key}`{hint}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// How to spell it, or where the keys are listed.
        hint: String,
    },
    /// A value of the wrong TOML type for its key.
    #[error("{}: key `{key}`: expected {expected}, found {found}", path.display())]
    BadType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the key takes.
        expected: &'static str,
        /// The TOML type found.
        found: &'static str,
    },
    /// A value the flag's parser refuses.
    #[error("{}: key `{key}`: invalid value {value:?}: {reason}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The value as a flag would see it.
        value: String,
        /// The flag parser's reason.
        reason: String,
    },
}

/// The key of a flag: its long name with `_` for `-`.
fn key_of(arg: &clap::Arg) -> Option<String> {
    let long = arg.get_long()?;
    (!NOT_KEYS.contains(&long)).then(|| long.replace('-', "_"))
}

/// Parses `argv` (program name first) merged with the configuration file it names (`--config`,
/// else [`paths::CONFIG_FILE`] when that exists): see the module docs for the rules.
pub fn parse<I, T>(argv: I) -> Result<Args, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = Args::command();
    // The command line alone, for `--config` and which flags it gives: strict, except that a
    // flag's partner (`--api-tls-key` for `--api-tls-cert`) may come from the file.
    let cli = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument => cmd
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(&argv)?,
        Err(e) => return Err(e.into()),
    };
    let path = cli
        .get_one::<PathBuf>("config")
        .cloned()
        .unwrap_or_else(|| PathBuf::from(paths::CONFIG_FILE));
    let explicit = cli.value_source("config") == Some(ValueSource::CommandLine);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(ConfigFileError::Read { path, source }.into()),
    };
    let Some(text) = text else {
        return Ok(Args::from_arg_matches(&cli)?);
    };
    let from_file = file_args(&cmd, &path, &text)?;
    // Flags override the file: drop the keys given on the command line, or in conflict with a
    // flag given there.
    let on_cli =
        |a: &clap::Arg| cli.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine);
    let conflict = |a: &clap::Arg, b: &clap::Arg| {
        let names = |x: &clap::Arg, y: &clap::Arg| {
            cmd.get_arg_conflicts_with(x)
                .iter()
                .any(|c| c.get_id() == y.get_id())
        };
        names(a, b) || names(b, a)
    };
    let mut merged: Vec<OsString> = argv.first().cloned().into_iter().collect();
    for (arg, values) in from_file {
        let overridden = on_cli(arg)
            || cmd
                .get_arguments()
                .any(|given| on_cli(given) && conflict(arg, given));
        if !overridden {
            merged.extend(values);
        }
    }
    merged.extend(argv.into_iter().skip(1));
    let matches = cmd.try_get_matches_from(merged)?;
    Ok(Args::from_arg_matches(&matches)?)
}

/// The file's keys as command-line arguments, per flag, each value checked by the flag's parser.
fn file_args<'c>(
    cmd: &'c clap::Command,
    path: &Path,
    text: &str,
) -> Result<Vec<(&'c clap::Arg, Vec<OsString>)>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|source| ConfigFileError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| key_of(a).as_deref() == Some(key.as_str()))
            .ok_or_else(|| unknown_key(cmd, path, key))?;
        let long = arg.get_long().unwrap_or_default();
        let bad_type = |expected| ConfigFileError::BadType {
            path: path.to_owned(),
            key: key.clone(),
            expected,
            found: value.type_str(),
        };
        let args: Vec<OsString> = match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => vec![format!("--{long}").into()],
                toml::Value::Boolean(false) => Vec::new(),
                _ => return Err(bad_type("true or false")),
            },
            ArgAction::Append => {
                let items = match value {
                    toml::Value::Array(items) => items.iter().collect(),
                    scalar => vec![scalar],
                };
                let mut args = Vec::new();
                for item in items {
                    let v = scalar(item)
                        .ok_or_else(|| bad_type("a string, a number or an array of them"))?;
                    check_value(cmd, path, key, long, &v)?;
                    args.push(format!("--{long}={v}").into());
                }
                args
            }
            _ => {
                let v = scalar(value).ok_or_else(|| bad_type("a string or a number"))?;
                check_value(cmd, path, key, long, &v)?;
                vec![format!("--{long}={v}").into()]
            }
        };
        out.push((arg, args));
    }
    Ok(out)
}

/// A string or a number as a flag's value.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// Runs one value through its flag's parser alone (a missing partner flag, such as
/// `--api-tls-key` for `--api-tls-cert`, is checked later on the whole).
fn check_value(
    cmd: &clap::Command,
    path: &Path,
    key: &str,
    long: &str,
    value: &str,
) -> Result<(), ConfigFileError> {
    let program = cmd.get_name().to_owned();
    match cmd
        .clone()
        .try_get_matches_from([program, format!("--{long}={value}")])
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument => Ok(()),
        Err(e) => {
            let reason = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.kind().to_string());
            Err(ConfigFileError::BadValue {
                path: path.to_owned(),
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            })
        }
    }
}

fn unknown_key(cmd: &clap::Command, path: &Path, key: &str) -> ConfigFileError {
    let underscored = key.replace('-', "_");
    let hint = if underscored != key
        && cmd
            .get_arguments()
            .any(|a| key_of(a).as_deref() == Some(&underscored))
    {
        format!(" (write it `{underscored}`)")
    } else {
        " (the keys are the flags of `capybara-agent --help`, with `_` for `-`)".to_owned()
    };
    ConfigFileError::UnknownKey {
        path: path.to_owned(),
        key: key.to_owned(),
        hint,
    }
}

/// The commented default configuration file: one paragraph per key (its flag's help and its
/// default, commented out), so an installed file changes nothing until the admin edits it.
pub fn sample() -> String {
    let mut out = String::from(
        "# Capybara agent configuration (read by capybara-agent at start; `--config FILE` names\n\
         # another file). Every key is a flag of `capybara-agent` (`man capybara-agent`): its name\n\
         # with `_` for `-`. A flag given on the command line overrides the key. An unknown key or\n\
         # a bad value stops the agent, naming the key. Restart the agent to apply a change:\n\
         # `systemctl restart capybara-agent`.\n",
    );
    let cmd = Args::command();
    for arg in cmd.get_arguments() {
        let Some(key) = key_of(arg) else { continue };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        out.push('\n');
        for line in wrap(&help, 96) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        let value = match arg.get_action() {
            ArgAction::SetTrue => "false".to_owned(),
            ArgAction::Append => "[]".to_owned(),
            _ => match arg.get_default_values().first() {
                Some(d) => toml_literal(&d.to_string_lossy()),
                None => {
                    let name = arg
                        .get_value_names()
                        .and_then(|n| n.first())
                        .map_or_else(|| key.to_uppercase(), ToString::to_string);
                    format!("\"<{name}>\"  # no default")
                }
            },
        };
        out.push_str(&format!("#{key} = {value}\n"));
    }
    out
}

/// A default value as TOML: a bare integer when it is one, else a quoted string.
fn toml_literal(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.to_owned()
    } else {
        toml::Value::String(s.to_owned()).to_string()
    }
}

/// Splits `text` into lines of at most `width` characters at spaces (a longer word stays
/// whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str, flags: &[&str]) -> (tempfile::TempDir, Result<Args, LoadError>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, text).unwrap();
        let mut argv = vec!["capybara-agent".to_owned(), "--config".into()];
        argv.push(file.to_str().unwrap().to_owned());
        argv.extend(flags.iter().map(|s| (*s).to_owned()));
        let r = parse(argv);
        (dir, r)
    }

    fn file_error(text: &str) -> String {
        match with_file(text, &[]).1 {
            Err(LoadError::File(e)) => e.to_string(),
            other => panic!("{text:?} was not refused as a file error: {other:?}"),
        }
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let text = r#"
            listen_port = 51999
            tunnel = "capy9"
            dns = ["192.0.2.53", "2001:db8::53"]
            keep_client_keys = true
            detach_on_exit = false
            bpffs = "/sys/fs/bpf/other"
            disconnect_timeout = "5m"
        "#;
        let (_d, args) = with_file(text, &[]);
        let args = args.unwrap();
        assert_eq!(args.listen_port, 51999);
        assert_eq!(args.tunnel, "capy9");
        assert_eq!(args.dns.len(), 2);
        assert!(args.keep_client_keys);
        assert!(!args.detach_on_exit);
        assert_eq!(args.bpffs_dir, PathBuf::from("/sys/fs/bpf/other"));
        assert_eq!(args.disconnect_timeout, "5m");
        // Keys not in the file keep their defaults.
        assert_eq!(args.audit_retention, "365d");

        let (_d, args) = with_file(
            text,
            &[
                "--listen-port",
                "40000",
                "--dns",
                "198.51.100.1",
                "--tunnel=capy7",
            ],
        );
        let args = args.unwrap();
        assert_eq!(args.listen_port, 40000, "the flag wins");
        assert_eq!(args.tunnel, "capy7");
        assert_eq!(
            args.dns,
            ["198.51.100.1".parse::<std::net::IpAddr>().unwrap()],
            "a repeatable flag replaces the file's list"
        );
        assert!(args.keep_client_keys, "untouched keys still apply");
    }

    #[test]
    fn a_flag_in_conflict_with_a_key_overrides_it() {
        let (_d, args) = with_file(r#"api_socket = "/run/x.sock""#, &["--no-api-socket"]);
        let args = args.unwrap();
        assert!(args.no_api_socket);
        assert_eq!(args.api_socket, PathBuf::from(paths::SOCKET_PATH));
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_them() {
        let e = file_error("listen_prot = 1\n");
        assert!(
            e.contains("unknown key `listen_prot`") && e.contains("agent.toml"),
            "{e}"
        );
        let e = file_error("listen-port = 1\n");
        assert!(
            e.contains("`listen-port`") && e.contains("write it `listen_port`"),
            "{e}"
        );
        let e = file_error("config = \"/x\"\n");
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = file_error("listen_port = 70000\n");
        assert!(
            e.contains("key `listen_port`") && e.contains("70000"),
            "{e}"
        );
        let e = file_error("listen_port = \"many\"\n");
        assert!(
            e.contains("key `listen_port`") && e.contains("\"many\""),
            "{e}"
        );
        let e = file_error("keep_client_keys = \"yes\"\n");
        assert!(
            e.contains("key `keep_client_keys`") && e.contains("true or false"),
            "{e}"
        );
        let e = file_error("dns = [\"not-an-ip\"]\n");
        assert!(e.contains("key `dns`") && e.contains("not-an-ip"), "{e}");
        let e = file_error("tunnel = { name = \"x\" }\n");
        assert!(e.contains("key `tunnel`") && e.contains("table"), "{e}");
        let e = file_error("listen_port = \n");
        assert!(e.contains("not valid TOML") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn a_partner_flag_missing_from_both_is_refused_by_the_whole_parse() {
        let (_d, r) = with_file(r#"api_tls_cert = "/etc/capybara/cert.pem""#, &[]);
        let Err(LoadError::Cli(e)) = r else {
            panic!("accepted a certificate without a key: {r:?}");
        };
        assert!(e.to_string().contains("--api-tls-key"), "{e}");
        let (_d, r) = with_file(
            r#"api_tls_cert = "/etc/capybara/cert.pem""#,
            &["--api-tls-key", "/etc/capybara/key.pem"],
        );
        let args = r.unwrap();
        assert_eq!(
            args.api_tls_key,
            Some(PathBuf::from("/etc/capybara/key.pem"))
        );
    }

    #[test]
    fn a_named_file_must_exist_the_default_need_not() {
        let r = parse(["capybara-agent", "--config", "/nonexistent/agent.toml"]);
        let Err(LoadError::File(e @ ConfigFileError::Read { .. })) = r else {
            panic!("a missing --config file was accepted: {r:?}");
        };
        assert!(e.to_string().contains("/nonexistent/agent.toml"), "{e}");
    }

    /// The installed sample changes nothing (every key commented out), and every key in it,
    /// uncommented, is accepted with its default.
    #[test]
    fn the_sample_is_every_key_commented_and_valid_uncommented() {
        let sample = sample();
        let (_d, args) = with_file(&sample, &[]);
        let args = args.unwrap();
        assert_eq!(args.listen_port, 51820);
        let cmd = Args::command();
        let keys: Vec<String> = cmd.get_arguments().filter_map(key_of).collect();
        assert!(keys.len() > 20, "{keys:?}");
        for key in &keys {
            assert!(
                sample.contains(&format!("\n#{key} = ")),
                "{key} missing:\n{sample}"
            );
        }
        let uncommented: String = sample
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.starts_with(' ') && !l.contains("no default"))
            .map(|l| format!("{l}\n"))
            .collect();
        let (_d, args) = with_file(&uncommented, &[]);
        let args = args.unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(args.listen_port, 51820);
        assert_eq!(args.tunnel_ipv4, crate::daemon::DEFAULT_TUNNEL_IPV4);
        assert_eq!(args.data_dir, PathBuf::from(paths::DATA_DIR));
    }
}
