//! `capybara connections` (the devices the tunnel knows, with endpoint and latest handshake)
//! and `capybara kick USER` (ends a user's sessions now).

use clap::Args;

use super::{
    Cli, CliError, connect,
    output::{opt_time, out, outln, print_json},
    table::Table,
};
use crate::service::domain::UserName;

/// `capybara kick`.
#[derive(Debug, Args)]
pub(super) struct KickArgs {
    /// The user.
    user: String,
}

/// Runs `capybara connections`.
pub(super) async fn connections(cli: &Cli) -> Result<(), CliError> {
    let c = connect(cli).await?.connections().await?;
    if cli.json {
        print_json(&c)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        "USER",
        "DEVICE",
        "ADDRESS",
        "ENDPOINT",
        "HANDSHAKE",
        "RX",
        "TX",
    ]);
    for c in &c {
        t.row(vec![
            c.peer.user.to_string(),
            c.peer.device.to_string(),
            c.peer.ipv4.to_string(),
            c.endpoint.clone().unwrap_or_else(|| "-".into()),
            opt_time(c.last_handshake),
            c.rx_bytes.to_string(),
            c.tx_bytes.to_string(),
        ]);
    }
    out!("{t}")?;
    Ok(())
}

/// Runs `capybara kick`.
pub(super) async fn kick(cli: &Cli, args: &KickArgs) -> Result<(), CliError> {
    let user = &args.user;
    UserName::parse("user", user)?;
    let peers = connect(cli).await?.kick(user).await?;
    if cli.json {
        print_json(&peers)?;
    } else {
        outln!("kicked {user}: {} device(s)", peers.len())?;
    }
    Ok(())
}
