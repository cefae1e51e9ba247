//! `capybara geo block|allow|off|list`: which countries may reach the WireGuard port; every
//! command prints the policy and its lists with their hits.

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{out, outln, print_json},
    table::Table,
};
use crate::service::{domain::country, geo::GeoMode};

/// `capybara geo …`.
#[derive(Debug, Subcommand)]
pub(super) enum GeoCmd {
    /// Drop sources in these countries.
    Block {
        /// ISO 3166-1 alpha-2 codes, e.g. CN RU.
        #[arg(required = true)]
        countries: Vec<String>,
    },
    /// Drop sources outside these countries.
    Allow {
        /// ISO 3166-1 alpha-2 codes, e.g. US CA GB.
        #[arg(required = true)]
        countries: Vec<String>,
    },
    /// No geo restrictions.
    Off,
    /// The policy and its lists with their hits.
    List,
}

/// Runs `capybara geo …`.
pub(super) async fn run(cli: &Cli, cmd: &GeoCmd) -> Result<(), CliError> {
    let status = match cmd {
        GeoCmd::List => connect(cli).await?.geo().await?,
        GeoCmd::Off => {
            connect(cli)
                .await?
                .set_geo(GeoMode::Off.name(), Vec::new())
                .await?
        }
        GeoCmd::Block { countries } | GeoCmd::Allow { countries } => {
            for c in countries {
                country("countries", c)?;
            }
            let mode = if matches!(cmd, GeoCmd::Block { .. }) {
                GeoMode::Block
            } else {
                GeoMode::Allow
            };
            connect(cli)
                .await?
                .set_geo(mode.name(), countries.clone())
                .await?
        }
    };
    if cli.json {
        print_json(&status)?;
        return Ok(());
    }
    outln!("geo {} {}", status.mode, status.countries.join(" "))?;
    let mut t = Table::new(&["LIST", "ENTRIES", "HIT PKTS", "HIT BYTES"]);
    for l in &status.lists {
        t.row(vec![
            l.name.clone(),
            l.cidrs.len().to_string(),
            l.hits.packets.to_string(),
            l.hits.bytes.to_string(),
        ]);
    }
    out!("{t}")?;
    Ok(())
}
