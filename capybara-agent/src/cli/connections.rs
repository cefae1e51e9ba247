//! `capybara connections` (the devices the tunnel knows, with their connection id, endpoint and
//! latest handshake), `capybara kick USER` (ends a user's sessions now) and `capybara kick
//! --connection ID` / `capybara connections kick ID` (ends that one device's session).
//!
//! A connection's id is its session's id in the history (`history show` lists it under the same
//! id); a device with no open session has none (`-`).

use clap::{Args, Subcommand};

use super::{
    Cli, CliError, connect,
    output::{opt_time, out, outln, print_json},
    table::Table,
};
use crate::service::domain::{Peer, SessionId, UserName};

/// `capybara connections [kick ID]`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct ConnectionsArgs {
    #[command(subcommand)]
    cmd: Option<ConnectionsCmd>,
}

/// `capybara connections …`.
#[derive(Debug, Subcommand)]
enum ConnectionsCmd {
    /// End one connection's session now (that device only), by the id `connections` shows.
    Kick {
        /// The connection id.
        id: String,
    },
}

/// `capybara kick`: a user, or one connection.
#[derive(Debug, Args)]
pub(super) struct KickArgs {
    /// The user: every device of it.
    #[arg(required_unless_present = "connection")]
    user: Option<String>,
    /// One connection by its id (from `capybara connections`): that device's session only.
    #[arg(long, value_name = "ID", conflicts_with = "user")]
    connection: Option<String>,
}

/// Runs `capybara connections [kick ID]`.
pub(super) async fn run(cli: &Cli, args: &ConnectionsArgs) -> Result<(), CliError> {
    match &args.cmd {
        None => connections(cli).await,
        Some(ConnectionsCmd::Kick { id }) => kick_connection(cli, id).await,
    }
}

/// Runs `capybara connections`.
async fn connections(cli: &Cli) -> Result<(), CliError> {
    let c = connect(cli).await?.connections().await?;
    if cli.json {
        print_json(&c)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        "USER",
        "DEVICE",
        "ID",
        "ADDRESS",
        "ENDPOINT",
        "HANDSHAKE",
        "RX",
        "TX",
    ]);
    for c in &c {
        t.row(vec![
            c.user.to_string(),
            c.device.clone(),
            c.id.map_or_else(|| "-".into(), |i| i.to_string()),
            c.peer
                .as_ref()
                .map_or_else(|| "-".into(), |p| p.ipv4.to_string()),
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
    // clap lets exactly one of them through.
    if let Some(id) = &args.connection {
        return kick_connection(cli, id).await;
    }
    let user = args.user.as_deref().unwrap_or_default();
    UserName::parse("user", user)?;
    let peers = connect(cli).await?.kick(user).await?;
    if cli.json {
        print_json(&peers)?;
    } else {
        outln!("kicked {user}: {} device(s)", peers.len())?;
    }
    Ok(())
}

/// Kicks connection `id`.
async fn kick_connection(cli: &Cli, id: &str) -> Result<(), CliError> {
    SessionId::parse("connection", id)?;
    let peers: Vec<Peer> = connect(cli).await?.kick_connection(id).await?;
    if cli.json {
        print_json(&peers)?;
    } else {
        for p in &peers {
            outln!("kicked connection {id} ({}/{})", p.user, p.device)?;
        }
        if peers.is_empty() {
            // A proxy protocol's session: its connections were cut.
            outln!("kicked connection {id}")?;
        }
    }
    Ok(())
}
