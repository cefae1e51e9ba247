//! `capybara device add|remove`: a user's devices (WireGuard peers); `add` prints the new
//! device's config and QR code (printed by `client_config`).

use clap::Subcommand;

use super::{
    Cli, CliError,
    client_config::{self, ConfigOut},
    connect,
    output::{outln, print_json},
};
use crate::service::domain::{DeviceName, UserName};

/// `capybara device …`.
#[derive(Debug, Subcommand)]
pub(super) enum DeviceCmd {
    /// Add a device to a user; prints its config and QR code (shown once).
    Add {
        /// The user.
        user: String,
        /// The device name.
        device: String,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Remove a device.
    Remove {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
}

/// Runs `capybara device …`.
pub(super) async fn run(cli: &Cli, cmd: &DeviceCmd) -> Result<(), CliError> {
    match cmd {
        DeviceCmd::Add { user, device, out } => {
            UserName::parse("user", user)?;
            DeviceName::parse("device", device)?;
            let cfg = connect(cli).await?.add_peer(user, device).await?;
            client_config::show(cli, &cfg, out)
        }
        DeviceCmd::Remove { user, device } => {
            UserName::parse("user", user)?;
            DeviceName::parse("device", device)?;
            let p = connect(cli).await?.remove_peer(user, device).await?;
            if cli.json {
                print_json(&p)?;
            } else {
                outln!("removed {}/{}", p.user, p.device)?;
            }
            Ok(())
        }
    }
}
