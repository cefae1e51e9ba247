//! `capybara top [USER]`: a live view refreshed every second — totals and sessions online, then
//! the busiest users and devices by rate, the rest summed, and drops by reason (`live` draws
//! it, from the agent's `WatchStats` stream).

use clap::Args;

use super::{
    Cli, CliError, connect,
    live::{self, Layout},
};
use crate::service::domain::UserName;

/// `capybara top`.
#[derive(Debug, Args)]
pub(super) struct TopArgs {
    /// Only this user's devices.
    user: Option<String>,
    /// Users and devices listed, each (default: what fits the terminal, 20 when not a
    /// terminal); the rest are summed on one line.
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    top: Option<u32>,
}

/// Runs `capybara top` until Ctrl-C.
pub(super) async fn run(cli: &Cli, args: &TopArgs) -> Result<(), CliError> {
    let user = args.user.as_deref().unwrap_or("");
    if !user.is_empty() {
        UserName::parse("user", user)?;
    }
    let client = connect(cli).await?;
    live::run(&client, cli.json, user, args.top, Layout::Top).await
}
