//! `capybara user add|list|show|remove|config`: users with their devices, and a device's
//! wg-quick config with its QR code (printed by `client_config`).

use std::time::SystemTime;

use clap::Subcommand;

use super::{
    Cli, CliError,
    client_config::{self, ConfigOut},
    connect,
    input::expiry,
    output::{opt_time, out, outln, print_json, time},
    table::Table,
};
use crate::service::domain::{DeviceName, UserName, unix_secs};

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
    /// A device's wg-quick config and QR code.
    Config {
        /// The user.
        name: String,
        /// The device (needed when the user has several).
        #[arg(long)]
        device: Option<String>,
        /// Make a new key pair for the device (the old one stops working).
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        out: ConfigOut,
    },
}

/// Runs `capybara user …`.
pub(super) async fn run(cli: &Cli, cmd: &UserCmd) -> Result<(), CliError> {
    match cmd {
        UserCmd::Add {
            name,
            device,
            expires,
            out,
        } => {
            UserName::parse("name", name)?;
            DeviceName::parse("device", device)?;
            let expires_at = expiry("expires", expires.as_deref())?
                .map_or(0, |d| (unix_secs(SystemTime::now()) + d) as i64);
            let (_, cfg) = connect(cli)
                .await?
                .add_user(name, device, expires_at)
                .await?;
            client_config::show(cli, &cfg, out)
        }
        UserCmd::List => {
            let users = connect(cli).await?.list_users().await?;
            if cli.json {
                print_json(&users)?;
                return Ok(());
            }
            let mut t = Table::new(&["USER", "DEVICES", "CREATED", "EXPIRES"]);
            for u in &users {
                t.row(vec![
                    u.user.name.to_string(),
                    u.peers.len().to_string(),
                    time(u.user.created_at),
                    opt_time(u.user.expires_at),
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
            outln!("expires  {}", opt_time(u.user.expires_at))?;
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
            } else {
                outln!("removed {} and {} device(s)", u.user.name, u.peers.len())?;
            }
            Ok(())
        }
        UserCmd::Config {
            name,
            device,
            rotate,
            out,
        } => {
            UserName::parse("name", name)?;
            if let Some(d) = device {
                DeviceName::parse("device", d)?;
            }
            let cfg = connect(cli)
                .await?
                .user_config(name, device.as_deref().unwrap_or(""), *rotate)
                .await?;
            client_config::show(cli, &cfg, out)
        }
    }
}
