//! `capybara geo block|allow|off|list|update`: which countries may reach the WireGuard port, and
//! the country database (`update --file X.mmdb` swaps it in without a gap); every command prints
//! the policy and its lists with their hits (`update` also the database).

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
    /// Load a new country database (.mmdb) and swap it in without a gap; the agent then
    /// watches the file and reloads it when it changes.
    Update {
        /// The MaxMind DB file on the agent's machine.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

/// Runs `capybara geo …`.
pub(super) async fn run(cli: &Cli, cmd: &GeoCmd) -> Result<(), CliError> {
    let status = match cmd {
        GeoCmd::List => connect(cli).await?.geo().await?,
        GeoCmd::Update { file } => {
            // The agent reads the file: a relative path is made absolute here.
            let path = std::path::absolute(file).map_err(CliError::file(file))?;
            let status = connect(cli)
                .await?
                .update_geo_db(path.display().to_string())
                .await?;
            if !cli.json
                && let Some(d) = &status.database
            {
                outln!(
                    "database {} ({}, built {}, {} countries)",
                    d.path,
                    d.database_type,
                    super::output::time(d.build_epoch),
                    d.countries
                )?;
            }
            status
        }
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
