//! `capybara ip-intel score IP`: a source's reputation score explained (its parts, their
//! counts, the decay, the threshold, whether and until when it is auto-blocked). The
//! `ip-intel` family mounts [`ScoreArgs`] and [`run_score`] as its `score` subcommand.

use std::time::SystemTime;

use super::{
    Cli, CliError, connect,
    output::{outln, print_json},
    table::Table,
};
use crate::service::reputation::parse_ip;

/// `capybara ip-intel score IP`.
#[derive(Debug, clap::Args)]
pub(super) struct ScoreArgs {
    /// The source address (IPv4 or IPv6).
    pub ip: String,
}

/// `capybara ip-intel …` as mounted until the `ip-intel` family is merged (only `score`).
#[derive(Debug, clap::Subcommand)]
pub(super) enum IpIntelCmd {
    /// A source's reputation score explained.
    Score(ScoreArgs),
}

/// Runs `capybara ip-intel …` as mounted here.
pub(super) async fn run(cli: &Cli, cmd: &IpIntelCmd) -> Result<(), CliError> {
    match cmd {
        IpIntelCmd::Score(args) => run_score(cli, args).await,
    }
}

fn when(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Runs `capybara ip-intel score IP`.
pub(super) async fn run_score(cli: &Cli, args: &ScoreArgs) -> Result<(), CliError> {
    parse_ip("ip", &args.ip)?;
    let v = connect(cli).await?.explain_score(&args.ip).await?;
    if cli.json {
        print_json(&v)?;
        return Ok(());
    }
    let state = if v.enabled { "on" } else { "off" };
    outln!(
        "{}: score {:.1} of {:.1} (reputation {state}; the score halves every {} min)",
        v.ip,
        v.score,
        v.threshold,
        v.half_life.as_secs() / 60
    )?;
    let mut t = Table::new(&["PART", "WEIGHT", "COUNT", "POINTS"]);
    for p in &v.parts {
        t.row(vec![
            p.part.as_str().to_owned(),
            format!("{:.2}", p.weight),
            p.count.to_string(),
            format!("{:.1}", p.points),
        ]);
    }
    outln!("{t}")?;
    if let (Some(first), Some(last), Some(next)) = (v.first_seen, v.last_seen, v.next_halving) {
        outln!(
            "first seen {}, last seen {}, next halving {}",
            when(first),
            when(last),
            when(next)
        )?;
    } else {
        outln!("no events scored")?;
    }
    if let Some(b) = &v.blocked {
        outln!(
            "auto-blocked since {} until {} (score {:.1} then)",
            when(b.since),
            when(b.until),
            f64::from(b.score) / 10.0
        )?;
    } else if v.in_auto_by_hand {
        outln!("in the auto list by hand (no expiry)")?;
    } else if v.allowed {
        outln!("in the allow list: never auto-blocked")?;
    } else {
        outln!("not blocked; a block would last {} s", v.ttl.as_secs())?;
    }
    Ok(())
}
