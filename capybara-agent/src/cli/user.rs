//! `capybara user add|list|show|remove|config|expire|renew|cleanup-expired|protocol`: users with
//! their devices and proxy identities, a device's wg-quick config or a proxy identity's config
//! with its QR code (printed by `client_config`), and account expiry.
//!
//! Protocols (`service::proxies`): `user add alice --protocol wireguard,shadowsocks,vless`
//! (default `wireguard`; the first device is made only when `wireguard` is listed), `user
//! protocol add|remove alice PROTO` (`shadowsocks`, `vless`), `user config alice --protocol
//! PROTO`; `user list` and `user show` list each user's protocols.
//!
//! A `DATE` (`expire --at`, `renew --at`) is RFC 3339 (`2027-01-31T18:00:00Z`,
//! `2027-01-31T18:00:00+01:00`) or a day (`2027-01-31`, its midnight UTC); a duration
//! (`--expires`, `--in`, `--grace`) is `<number><s|m|h|d|w>` as everywhere.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDate};
use clap::{ArgGroup, Subcommand};

use super::{
    Cli, CliError,
    client_config::{self, ConfigOut},
    connect,
    input::expiry,
    output::{opt_time, out, outln, print_json, time},
    table::Table,
};
use crate::service::domain::{
    DeviceName, Protocol, UserDetail, UserName, ValidationError, parse_duration, unix_secs,
};

/// `capybara user …`.
#[derive(Debug, Subcommand)]
pub(super) enum UserCmd {
    /// Create a user with its first device; prints the device's config and QR code (shown once).
    Add {
        /// The user name: a-z, 0-9, '.', '_', '-'.
        name: String,
        /// Name of the first device.
        #[arg(long, default_value = "default")]
        device: String,
        /// Account expiry from now, e.g. 30d.
        #[arg(long)]
        expires: Option<String>,
        /// The protocols the user connects with: wireguard, shadowsocks, vless (comma-separated);
        /// the device is made only when wireguard is listed.
        #[arg(
            long,
            value_name = "PROTO,...",
            value_delimiter = ',',
            default_value = "wireguard"
        )]
        protocol: Vec<String>,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Every user.
    List,
    /// One user with its devices.
    Show {
        /// The user.
        name: String,
    },
    /// Remove a user and every device.
    Remove {
        /// The user.
        name: String,
    },
    /// A device's wg-quick config and QR code, or a proxy identity's config (--protocol).
    Config {
        /// The user.
        name: String,
        /// The device (needed when the user has several).
        #[arg(long)]
        device: Option<String>,
        /// Make a new key pair for the device (the old one stops working).
        #[arg(long)]
        rotate: bool,
        /// The protocol whose config to print: wireguard (a device's), shadowsocks or vless.
        #[arg(long, value_name = "PROTO", default_value = "wireguard")]
        protocol: String,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Set a user's account expiry: its devices are cut by the kernel at that time (a time in
    /// the past cuts them at once). Exactly one of --at and --in.
    #[command(group(ArgGroup::new("when").required(true).args(["at", "in_"])))]
    Expire {
        /// The user.
        name: String,
        /// The expiry: RFC 3339 (2027-01-31T18:00:00Z) or a day (2027-01-31, midnight UTC).
        #[arg(long)]
        at: Option<String>,
        /// The expiry from now, e.g. 30d.
        #[arg(long = "in", id = "in_")]
        in_: Option<String>,
    },
    /// Renew a user: without options the expiry is cleared (the account never expires); with
    /// --at or --in it is set to that time instead, which must be ahead. Devices held as expired
    /// are admitted again.
    #[command(group(ArgGroup::new("when").args(["at", "in_"])))]
    Renew {
        /// The user.
        name: String,
        /// The new expiry: RFC 3339 or a day (midnight UTC).
        #[arg(long)]
        at: Option<String>,
        /// The new expiry from now, e.g. 30d.
        #[arg(long = "in", id = "in_")]
        in_: Option<String>,
    },
    /// Remove the users whose expiry passed more than the grace ago, with their devices; prints
    /// what was removed.
    CleanupExpired {
        /// How long after its expiry a user is kept (default 7d; 0 removes every expired user).
        #[arg(long)]
        grace: Option<String>,
        /// List the users that would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give a user access by a proxy protocol, or take it away.
    #[command(subcommand)]
    Protocol(ProtocolCmd),
}

/// `capybara user protocol …`.
#[derive(Debug, Subcommand)]
pub(super) enum ProtocolCmd {
    /// Give a user access by shadowsocks or vless; prints its config and QR code.
    Add {
        /// The user.
        name: String,
        /// shadowsocks or vless.
        protocol: String,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Take a user's access by shadowsocks or vless away (its open connections are cut).
    Remove {
        /// The user.
        name: String,
        /// shadowsocks or vless.
        protocol: String,
    },
}

/// The protocols of a user, comma-separated (`-` for none).
fn protocols_of(u: &UserDetail) -> String {
    let p: Vec<&str> = u.protocols().into_iter().map(Protocol::as_str).collect();
    if p.is_empty() {
        "-".into()
    } else {
        p.join(",")
    }
}

/// A `DATE` (see the module docs) as Unix seconds.
fn date(field: &'static str, s: &str) -> Result<i64, ValidationError> {
    let bad = ValidationError::Time {
        field,
        reason: "expected a date like 2027-01-31 or 2027-01-31T18:00:00Z",
    };
    let secs = match DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.timestamp(),
        Err(_) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| bad.clone())?
            .and_hms_opt(0, 0, 0)
            .ok_or_else(|| bad.clone())?
            .and_utc()
            .timestamp(),
    };
    if secs <= 0 {
        return Err(ValidationError::Time {
            field,
            reason: "must be after 1970-01-01T00:00:00Z",
        });
    }
    Ok(secs)
}

/// `--at DATE` or `--in DURATION` as Unix seconds; 0 for neither.
fn when(at: Option<&str>, in_: Option<&str>) -> Result<i64, ValidationError> {
    match (at, in_) {
        (Some(a), _) => date("at", a),
        (None, Some(d)) => {
            let d = parse_duration("in", d)?;
            Ok((unix_secs(SystemTime::now()) + d.as_secs()) as i64)
        }
        (None, None) => Ok(0),
    }
}

/// Prints a user's name and expiry after an expiry change.
fn print_expiry(cli: &Cli, u: &UserDetail) -> Result<(), CliError> {
    if cli.json {
        return print_json(u);
    }
    outln!(
        "{}: expires {}{}",
        u.user.name,
        opt_time(u.user.expires_at),
        expired_note(u.user.expires_at)
    )?;
    Ok(())
}

/// `" (expired: …)"` when `expires_at` has passed, else nothing.
fn expired_note(expires_at: Option<u64>) -> &'static str {
    if expires_at.is_some_and(|t| t <= unix_secs(SystemTime::now())) {
        " (expired: its devices are held at the gate, reason expired)"
    } else {
        ""
    }
}

/// Runs `capybara user …`.
pub(super) async fn run(cli: &Cli, cmd: &UserCmd) -> Result<(), CliError> {
    match cmd {
        UserCmd::Add {
            name,
            device,
            expires,
            protocol,
            out,
        } => {
            UserName::parse("name", name)?;
            DeviceName::parse("device", device)?;
            let protocols = protocol
                .iter()
                .map(|p| Protocol::parse("protocol", p.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            crate::service::users::check_protocols(&protocols)?;
            let expires_at = expiry("expires", expires.as_deref())?
                .map_or(0, |d| (unix_secs(SystemTime::now()) + d) as i64);
            let names: Vec<String> = protocols.iter().map(|p| p.to_string()).collect();
            let added = connect(cli)
                .await?
                .add_user_with(name, device, expires_at, &names)
                .await?;
            // Only a device: the JSON is today's (the device's config).
            if let (true, true, Some(cfg)) = (cli.json, added.proxies.is_empty(), &added.config) {
                return print_json(cfg);
            }
            if cli.json {
                return print_json(&added);
            }
            let mut first = true;
            if let Some(cfg) = &added.config {
                client_config::show(cli, cfg, out)?;
                first = false;
            }
            for p in &added.proxies {
                let protocol = p.access.protocol.as_str();
                if !first {
                    outln!()?;
                }
                outln!("# {protocol}")?;
                let o = out.beside(if first { "" } else { protocol });
                client_config::show_proxy(cli, p, &o)?;
                first = false;
            }
            Ok(())
        }
        UserCmd::List => {
            let users = connect(cli).await?.list_users().await?;
            if cli.json {
                print_json(&users)?;
                return Ok(());
            }
            let mut t = Table::new(&["USER", "DEVICES", "CREATED", "EXPIRES", "PROTOCOLS"]);
            for u in &users {
                t.row(vec![
                    u.user.name.to_string(),
                    u.peers.len().to_string(),
                    time(u.user.created_at),
                    opt_time(u.user.expires_at),
                    protocols_of(u),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
        UserCmd::Show { name } => {
            UserName::parse("name", name)?;
            let u = connect(cli).await?.get_user(name).await?;
            if cli.json {
                print_json(&u)?;
                return Ok(());
            }
            outln!("user     {}", u.user.name)?;
            outln!("created  {}", time(u.user.created_at))?;
            outln!(
                "expires  {}{}",
                opt_time(u.user.expires_at),
                expired_note(u.user.expires_at)
            )?;
            outln!("protocols {}", protocols_of(&u))?;
            for p in &u.proxies {
                outln!(
                    "  {:<12} id {:<8} added {}",
                    p.protocol.as_str(),
                    p.id,
                    time(p.created_at)
                )?;
            }
            outln!()?;
            let mut t = Table::new(&["ID", "DEVICE", "IPV4", "IPV6", "PUBLIC KEY", "KEY KEPT"]);
            for p in &u.peers {
                t.row(vec![
                    p.id.to_string(),
                    p.device.to_string(),
                    p.ipv4.to_string(),
                    p.ipv6.to_string(),
                    p.public_key.to_string(),
                    if p.key_kept { "yes" } else { "no" }.into(),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
        UserCmd::Remove { name } => {
            UserName::parse("name", name)?;
            let u = connect(cli).await?.remove_user(name).await?;
            if cli.json {
                print_json(&u)?;
            } else if u.proxies.is_empty() {
                outln!("removed {} and {} device(s)", u.user.name, u.peers.len())?;
            } else {
                outln!(
                    "removed {}, {} device(s) and {} proxy identit{} ({})",
                    u.user.name,
                    u.peers.len(),
                    u.proxies.len(),
                    if u.proxies.len() == 1 { "y" } else { "ies" },
                    u.proxies
                        .iter()
                        .map(|p| p.protocol.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
            }
            Ok(())
        }
        UserCmd::Config {
            name,
            device,
            rotate,
            protocol,
            out,
        } => {
            UserName::parse("name", name)?;
            if let Some(d) = device {
                DeviceName::parse("device", d)?;
            }
            let protocol = Protocol::parse("protocol", protocol)?;
            if protocol != Protocol::Wireguard {
                if device.is_some() || *rotate {
                    return Err(ValidationError::Value {
                        field: if device.is_some() { "device" } else { "rotate" },
                        reason: format!("applies to wireguard only, not to {protocol}"),
                    }
                    .into());
                }
                let cfg = connect(cli)
                    .await?
                    .user_config_of(name, "", false, protocol.as_str())
                    .await?;
                return match cfg {
                    crate::api::users::AnyClientConfig::Proxy(p) => {
                        client_config::show_proxy(cli, &p, out)
                    }
                    crate::api::users::AnyClientConfig::Wireguard(c) => {
                        client_config::show(cli, &c, out)
                    }
                };
            }
            let cfg = connect(cli)
                .await?
                .user_config(name, device.as_deref().unwrap_or(""), *rotate)
                .await?;
            client_config::show(cli, &cfg, out)
        }
        UserCmd::Expire { name, at, in_ } => {
            UserName::parse("name", name)?;
            let at = when(at.as_deref(), in_.as_deref())?;
            let u = connect(cli).await?.expire_user(name, at).await?;
            print_expiry(cli, &u)
        }
        UserCmd::Renew { name, at, in_ } => {
            UserName::parse("name", name)?;
            let at = when(at.as_deref(), in_.as_deref())?;
            let u = connect(cli).await?.renew_user(name, at).await?;
            print_expiry(cli, &u)
        }
        UserCmd::CleanupExpired { grace, dry_run } => {
            let grace = match grace.as_deref() {
                None => None,
                Some("0") => Some(Duration::ZERO),
                Some(g) => Some(parse_duration("grace", g)?),
            };
            let users = connect(cli)
                .await?
                .cleanup_expired(grace.map(|g| g.as_secs()), *dry_run)
                .await?;
            if cli.json {
                return print_json(&users);
            }
            let verb = if *dry_run { "would remove" } else { "removed" };
            for u in &users {
                outln!(
                    "{verb} {} (expired {}) and {} device(s)",
                    u.user.name,
                    opt_time(u.user.expires_at),
                    u.peers.len()
                )?;
            }
            outln!("{verb} {} expired user(s)", users.len())?;
            Ok(())
        }
        UserCmd::Protocol(ProtocolCmd::Add {
            name,
            protocol,
            out,
        }) => {
            UserName::parse("name", name)?;
            Protocol::parse("protocol", protocol)?;
            let cfg = connect(cli).await?.add_protocol(name, protocol).await?;
            client_config::show_proxy(cli, &cfg, out)
        }
        UserCmd::Protocol(ProtocolCmd::Remove { name, protocol }) => {
            UserName::parse("name", name)?;
            Protocol::parse("protocol", protocol)?;
            let removed = connect(cli).await?.remove_protocol(name, protocol).await?;
            if cli.json {
                return print_json(&removed);
            }
            outln!("removed {} access of {}", removed.protocol, removed.user)?;
            Ok(())
        }
    }
}
