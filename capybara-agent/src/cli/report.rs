//! `capybara report generate`: a usage report over the agent's hourly and daily rollups
//! (`service::usage`).
//!
//! `report generate [--format text|json|csv|html] [--period day|week|month | --from D [--to D]]
//! [--group G] [--output F]`: the agent renders the document (so REST callers get the same
//! one); this command writes it to standard output, or to `F` (mode 0600: it names users and
//! what they used) and says where. `--json` without `--format` means `--format json`. The
//! inputs are checked here first, with the agent's messages (the field named, exit 2).

use std::{io::Write as _, path::PathBuf};

use clap::{Args, Subcommand};

use super::{
    Cli, CliError, connect,
    output::{create_private, out, outln},
};
use crate::{
    api::reports::ReportRequest,
    service::usage::report::{Format, ReportQuery},
};

/// `capybara report …`.
#[derive(Debug, Subcommand)]
pub(super) enum ReportCmd {
    /// A usage report: bytes each way, sessions, online time, peak rate, drops, top users and
    /// quota standing per user and group (times in UTC).
    Generate(GenerateArgs),
}

/// `capybara report generate`'s options.
#[derive(Debug, Args)]
pub(super) struct GenerateArgs {
    /// text, json, csv or html (one self-contained file with charts).
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// day, week or month: the last 24 hours, 7 or 30 days up to now (default: day).
    #[arg(long, value_name = "PERIOD", conflicts_with_all = ["from", "to"])]
    period: Option<String>,
    /// The first UTC day, YYYY-MM-DD.
    #[arg(long, value_name = "DATE")]
    from: Option<String>,
    /// The last UTC day (included), YYYY-MM-DD; default today.
    #[arg(long, value_name = "DATE", requires = "from")]
    to: Option<String>,
    /// Only this group's members.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Write the report to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Runs `capybara report …`.
pub(super) async fn run(cli: &Cli, cmd: &ReportCmd) -> Result<(), CliError> {
    let ReportCmd::Generate(a) = cmd;
    let format = match (&a.format, cli.json) {
        (Some(f), _) => f.clone(),
        (None, true) => "json".into(),
        (None, false) => "text".into(),
    };
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    Format::parse("format", &format)?;
    ReportQuery::parse(&s(&a.period), &s(&a.from), &s(&a.to), &s(&a.group))?;
    let (document, _) = connect(cli)
        .await?
        .generate_report(ReportRequest {
            format,
            period: s(&a.period),
            from: s(&a.from),
            to: s(&a.to),
            group: s(&a.group),
        })
        .await?;
    match &a.output {
        Some(path) => {
            create_private(path)
                .and_then(|mut f| f.write_all(document.as_bytes()).and_then(|()| f.sync_all()))
                .map_err(CliError::file(path))?;
            outln!(
                "report written to {} ({} bytes)",
                path.display(),
                document.len()
            )
        }
        None => out!("{document}"),
    }
}
