//! `capybara stats [USER]`: bytes and packets each way and drops by reason, per device, then
//! the drops no device owns. `--watch`: the same view with rates, refreshed every second from
//! the agent's live stream (`live`).

use clap::Args;

use super::{
    Cli, CliError, connect,
    live::{self, Layout},
    output::{out, outln, print_json},
    table::Table,
};
use crate::service::{PeerStatsView, domain::UserName};

/// `capybara stats`.
#[derive(Debug, Args)]
pub(super) struct StatsArgs {
    /// Only this user.
    user: Option<String>,
    /// Refresh every second with rates each way (Ctrl-C quits; `--json`: one object a line).
    #[arg(long)]
    watch: bool,
    /// With --watch: the busiest devices listed (default: what fits the terminal, 20 when not
    /// a terminal); the rest are summed on one line.
    #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u32).range(1..=1000))]
    top: Option<u32>,
}

impl StatsArgs {
    /// Whether this is the live view (`--watch`).
    pub(super) fn is_watch(&self) -> bool {
        self.watch
    }
}

/// Runs `capybara stats`.
pub(super) async fn run(cli: &Cli, args: &StatsArgs) -> Result<(), CliError> {
    let user = &args.user;
    if let Some(u) = user {
        UserName::parse("user", u)?;
    }
    if args.watch {
        let client = connect(cli).await?;
        let user = user.as_deref().unwrap_or("");
        return live::run(&client, cli.json, user, args.top, Layout::Stats).await;
    }
    let st = connect(cli)
        .await?
        .stats(user.as_deref().unwrap_or(""))
        .await?;
    if cli.json {
        print_json(&st)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        "USER", "DEVICE", "RX BYTES", "RX PKTS", "TX BYTES", "TX PKTS", "DROPS",
    ]);
    // A user's devices and proxy identities (named by their protocol), in user order.
    let mut lines: Vec<(String, String, &PeerStatsView)> = st
        .peers
        .iter()
        .map(|p| (p.peer.user.to_string(), p.peer.device.to_string(), &p.stats))
        .chain(
            st.proxies
                .iter()
                .map(|p| (p.user.to_string(), p.protocol.to_string(), &p.stats)),
        )
        .collect();
    lines.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    for (user, device, stats) in lines {
        let drops: Vec<String> = stats
            .drops
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        t.row(vec![
            user,
            device,
            stats.rx.bytes.to_string(),
            stats.rx.packets.to_string(),
            stats.tx.bytes.to_string(),
            stats.tx.packets.to_string(),
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(",")
            },
        ]);
    }
    out!("{t}")?;
    if !st.drops.is_empty() {
        outln!()?;
        let mut d = Table::new(&["DROP REASON", "PACKETS"]);
        for (r, n) in &st.drops {
            d.row(vec![r.clone(), n.to_string()]);
        }
        out!("{d}")?;
    }
    Ok(())
}
