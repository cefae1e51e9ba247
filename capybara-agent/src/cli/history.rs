//! `capybara history …`: sessions, auth attempts and the audit trail.
//!
//! - `history show [USER] [--limit N]`: sessions, newest first.
//! - `history search --ip CIDR [--limit N]`: sessions with an endpoint or tunnel address in
//!   the CIDR, and the failed handshakes from it.
//! - `history export --format csv|json [--output F] [--user U]`: every session and auth
//!   attempt. CSV has one row per record (`kind` = `session` or `auth`), times RFC 3339,
//!   bytes as the kernel counted them (IP bytes).
//! - `history clear --older-than 90d`: deletes closed sessions and auth attempts older than
//!   that (admin).
//! - `history audit [--user U] [--limit N]`: the audit trail, newest first; the agent answers in
//!   pages of at most 1 000 records, walked here until `N` (default 100) or the last page.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use super::{
    Cli, CliError, connect,
    input::opt_user,
    output::{out, outln, print_json, time, write_out},
    table::Table,
};
use crate::service::{AuthAttempt, HistoryPage, Session, domain::parse_duration};

/// `capybara history …`.
#[derive(Debug, Subcommand)]
pub(super) enum HistoryCmd {
    /// Sessions, newest first.
    Show {
        /// Only this user's sessions.
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Sessions and failed handshakes from an address range.
    Search {
        /// A CIDR or address, e.g. 203.0.113.0/24.
        #[arg(long)]
        ip: String,
        /// At most this many of each.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Every session and auth attempt, as CSV or JSON.
    Export {
        /// csv or json.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only this user's sessions (and no auth attempts).
        #[arg(long)]
        user: Option<String>,
    },
    /// Delete closed sessions and auth attempts older than the given age.
    Clear {
        /// e.g. 90d.
        #[arg(long)]
        older_than: String,
    },
    /// The audit trail, newest first.
    Audit {
        /// Only records about this user.
        #[arg(long)]
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum ExportFormat {
    /// Comma-separated, one row per record.
    Csv,
    /// The JSON of `--json`.
    Json,
}

fn duration_secs(s: u64) -> String {
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    format!("{h}:{m:02}:{s:02}")
}

fn sessions_table(sessions: &[Session]) -> Table {
    let mut t = Table::new(&[
        "USER", "DEVICE", "START", "DURATION", "ENDPOINT", "RX BYTES", "TX BYTES", "REASON",
    ]);
    for s in sessions {
        let ep = match s.endpoints.as_slice() {
            [] => "-".to_owned(),
            [one] => one.endpoint.to_string(),
            [first, .., last] => format!(
                "{} (+{} changes, last {})",
                first.endpoint,
                s.endpoints.len() - 1,
                last.endpoint
            ),
        };
        t.row(vec![
            s.user.clone(),
            s.device.clone(),
            time(s.start),
            s.end.map_or_else(
                || "open".into(),
                |e| duration_secs(e.saturating_sub(s.start)),
            ),
            ep,
            s.traffic.rx.bytes.to_string(),
            s.traffic.tx.bytes.to_string(),
            s.reason.map_or_else(|| "-".into(), |r| r.to_string()),
        ]);
    }
    t
}

fn auth_table(attempts: &[AuthAttempt]) -> Table {
    let mut t = Table::new(&["WHEN", "SOURCE", "REASON", "KEY"]);
    for a in attempts {
        t.row(vec![
            time(a.at),
            a.source.to_string(),
            a.reason.clone(),
            a.public_key.map_or_else(|| "-".into(), |k| k.to_string()),
        ]);
    }
    t
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The CSV export: a header and one row per session, then per auth attempt.
fn csv(page: &HistoryPage) -> String {
    let mut out = String::from(
        "kind,id,user,device,start,end,reason,endpoint,endpoints,rx_bytes,rx_packets,tx_bytes,tx_packets,public_key\n",
    );
    let mut row = |cells: Vec<String>| {
        let line: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    };
    for s in &page.sessions {
        row(vec![
            "session".into(),
            s.id.clone(),
            s.user.clone(),
            s.device.clone(),
            time(s.start),
            s.end.map(time).unwrap_or_default(),
            s.reason.map(|r| r.to_string()).unwrap_or_default(),
            s.endpoints
                .first()
                .map(|e| e.endpoint.to_string())
                .unwrap_or_default(),
            s.endpoints
                .iter()
                .map(|e| format!("{}@{}", e.endpoint, time(e.at)))
                .collect::<Vec<_>>()
                .join(" "),
            s.traffic.rx.bytes.to_string(),
            s.traffic.rx.packets.to_string(),
            s.traffic.tx.bytes.to_string(),
            s.traffic.tx.packets.to_string(),
            s.public_key.to_string(),
        ]);
    }
    for a in &page.auth_attempts {
        row(vec![
            "auth".into(),
            String::new(),
            String::new(),
            String::new(),
            time(a.at),
            String::new(),
            a.reason.clone(),
            a.source.to_string(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            a.public_key.map(|k| k.to_string()).unwrap_or_default(),
        ]);
    }
    out
}

/// Runs `capybara history …`.
pub(super) async fn run(cli: &Cli, cmd: &HistoryCmd) -> Result<(), CliError> {
    match cmd {
        HistoryCmd::Show { user, limit } => {
            let user = opt_user(user.as_ref())?;
            let page = connect(cli).await?.history(user, "", *limit, false).await?;
            if cli.json {
                print_json(&page.sessions)?;
            } else {
                out!("{}", sessions_table(&page.sessions))?;
            }
            Ok(())
        }
        HistoryCmd::Search { ip, limit } => {
            crate::api::lists::cidrs("ip", std::slice::from_ref(ip))?;
            let page = connect(cli).await?.history("", ip, *limit, true).await?;
            if cli.json {
                print_json(&page)?;
                return Ok(());
            }
            out!("{}", sessions_table(&page.sessions))?;
            if !page.auth_attempts.is_empty() {
                outln!("\nfailed handshakes:")?;
                out!("{}", auth_table(&page.auth_attempts))?;
            }
            Ok(())
        }
        HistoryCmd::Export {
            format,
            output,
            user,
        } => {
            let user = opt_user(user.as_ref())?;
            let page = connect(cli)
                .await?
                .history(user, "", 0, user.is_empty())
                .await?;
            let bytes = match format {
                ExportFormat::Csv => csv(&page).into_bytes(),
                ExportFormat::Json => {
                    let mut b = serde_json::to_vec_pretty(&page).expect("domain values serialise");
                    b.push(b'\n');
                    b
                }
            };
            write_out(output.as_ref(), &bytes)?;
            if output.is_some() && !cli.json {
                eprintln!(
                    "exported {} sessions and {} auth attempts",
                    page.sessions.len(),
                    page.auth_attempts.len()
                );
            }
            Ok(())
        }
        HistoryCmd::Clear { older_than } => {
            let d = parse_duration("older_than", older_than)?;
            let p = connect(cli).await?.clear_history(d.as_secs()).await?;
            if cli.json {
                print_json(&p)?;
            } else {
                outln!(
                    "removed {} sessions and {} auth attempts",
                    p.sessions,
                    p.auth_attempts
                )?;
            }
            Ok(())
        }
        HistoryCmd::Audit { user, limit } => {
            let user = opt_user(user.as_ref())?;
            let recs = connect(cli).await?.audit(user, *limit).await?;
            if cli.json {
                print_json(&recs)?;
                return Ok(());
            }
            let mut t = Table::new(&["SEQ", "WHEN", "ACTOR", "ACTION", "TARGET"]);
            for r in &recs {
                t.row(vec![
                    r.seq.to_string(),
                    time(r.at),
                    r.actor.clone(),
                    r.action.clone(),
                    r.target.clone(),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{
        EndReason, Traffic,
        domain::PublicKey,
        history::{Counters, EndpointSeen},
    };

    #[test]
    fn csv_has_one_row_per_record_and_quotes_what_needs_it() {
        let page = HistoryPage {
            sessions: vec![Session {
                id: "session/1/2".into(),
                user: "alice".into(),
                device: "lap,top".into(),
                peer_id: 2,
                public_key: PublicKey([7; 32]),
                ipv4: "10.99.0.2".parse().unwrap(),
                ipv6: "fd99::2".parse().unwrap(),
                start: 0,
                end: Some(60),
                endpoints: vec![
                    EndpointSeen {
                        at: 0,
                        endpoint: "192.0.2.1:5".parse().unwrap(),
                    },
                    EndpointSeen {
                        at: 30,
                        endpoint: "192.0.2.2:6".parse().unwrap(),
                    },
                ],
                traffic: Counters {
                    rx: Traffic {
                        packets: 3,
                        bytes: 300,
                    },
                    tx: Traffic {
                        packets: 4,
                        bytes: 400,
                    },
                },
                reason: Some(EndReason::Kicked),
            }],
            auth_attempts: vec![AuthAttempt {
                at: 0,
                source: "203.0.113.9:1".parse().unwrap(),
                public_key: None,
                reason: "unknown-key".into(),
            }],
        };
        let text = csv(&page);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0].split(',').count(), 14);
        assert!(lines[1].starts_with("session,session/1/2,alice,\"lap,top\",1970-01-01T00:00:00Z,1970-01-01T00:01:00Z,kicked,192.0.2.1:5,"));
        assert!(lines[1].contains(",300,3,400,4,"), "{}", lines[1]);
        assert!(lines[2].starts_with("auth,,,,1970-01-01T00:00:00Z,,unknown-key,203.0.113.9:1,"));
    }
}
