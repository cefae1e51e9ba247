//! `capybara history …`: sessions, auth attempts and the audit trail.
//!
//! - `history show [USER] [--limit N]`: sessions, newest first.
//! - `history search --ip CIDR [--limit N]`: sessions with an endpoint or tunnel address in
//!   the CIDR, and the failed handshakes from it.
//! - `history export --format csv|json [--output F] [--user U]`: every session and auth
//!   attempt. CSV has one row per record (`kind` = `session` or `auth`), times RFC 3339,
//!   bytes as the kernel counted them (IP bytes); an auth row's `start` is its last failure,
//!   `endpoint` its last source, and `count`, `prefix`, `first_seen` say how many failed from
//!   which /24 or /64 since when. The export walks the agent's pages (1 000 records a call)
//!   and writes each as it arrives, so its memory does not grow with the history.
//! - `show` and `search` walk pages until `--limit` records.
//! - `history clear --older-than 90d`: deletes closed sessions and auth attempts older than
//!   that (admin).
//! - `history audit [--user U] [--limit N]`: the audit trail, newest first; the agent answers in
//!   pages of at most 1 000 records, walked here until `N` (default 100) or the last page.

use std::{io::Write, path::PathBuf};

use clap::{Subcommand, ValueEnum};

use super::{
    Cli, CliError, connect,
    input::opt_user,
    output::{out, outln, print_json, time},
    table::Table,
};
use crate::{
    api::history::HistoryRequest,
    service::{AuthAttempt, HistoryPage, Session, domain::parse_duration},
};

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
        "USER", "DEVICE", "ID", "START", "DURATION", "ENDPOINT", "RX BYTES", "TX BYTES", "REASON",
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
            s.id.to_string(),
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
    let mut t = Table::new(&["WHEN", "SOURCE", "REASON", "KEY", "COUNT", "PREFIX"]);
    for a in attempts {
        t.row(vec![
            time(a.at),
            a.source.to_string(),
            a.reason.clone(),
            a.public_key.map_or_else(|| "-".into(), |k| k.to_string()),
            a.count.to_string(),
            a.prefix.map_or_else(|| "-".into(), |p| p.to_string()),
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

/// The CSV export's header.
const CSV_HEADER: &str = "kind,id,user,device,start,end,reason,endpoint,endpoints,rx_bytes,rx_packets,tx_bytes,tx_packets,public_key,count,prefix,first_seen,protocol\n";

fn csv_row(out: &mut String, cells: &[String]) {
    let line: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
    out.push_str(&line.join(","));
    out.push('\n');
}

/// One session's CSV row.
fn csv_session(out: &mut String, s: &Session) {
    csv_row(
        out,
        &[
            "session".into(),
            s.id.to_string(),
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
            s.public_key.map(|k| k.to_string()).unwrap_or_default(),
            String::new(),
            String::new(),
            String::new(),
            s.protocol.to_string(),
        ],
    );
}

/// One auth record's CSV row: `start` is its last failure, `endpoint` its last source.
fn csv_auth(out: &mut String, a: &AuthAttempt) {
    csv_row(
        out,
        &[
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
            a.count.to_string(),
            a.prefix.map(|p| p.to_string()).unwrap_or_default(),
            time(if a.first_seen > 0 { a.first_seen } else { a.at }),
            a.protocol.to_string(),
        ],
    );
}

/// The CSV export of one page: a header and one row per session, then per auth attempt.
#[cfg(test)]
fn csv(page: &HistoryPage) -> String {
    let mut out = String::from(CSV_HEADER);
    for s in &page.sessions {
        csv_session(&mut out, s);
    }
    for a in &page.auth_attempts {
        csv_auth(&mut out, a);
    }
    out
}

/// Writes an export as it arrives, a page at a time: the same bytes as the whole
/// [`HistoryPage`] written at once (CSV, or JSON as `serde_json::to_vec_pretty` plus a newline).
struct ExportWriter<W: Write> {
    out: W,
    format: ExportFormat,
    /// Records written in the current list.
    in_list: usize,
    sessions: usize,
    auth_attempts: usize,
}

impl<W: Write> ExportWriter<W> {
    fn new(mut out: W, format: ExportFormat) -> std::io::Result<Self> {
        match format {
            ExportFormat::Csv => out.write_all(CSV_HEADER.as_bytes())?,
            ExportFormat::Json => out.write_all(b"{\n  \"sessions\": [")?,
        }
        Ok(ExportWriter {
            out,
            format,
            in_list: 0,
            sessions: 0,
            auth_attempts: 0,
        })
    }

    fn json_item<T: serde::Serialize>(&mut self, item: &T) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(item).expect("domain values serialise");
        let sep = if self.in_list == 0 {
            "\n    "
        } else {
            ",\n    "
        };
        self.out.write_all(sep.as_bytes())?;
        self.out
            .write_all(text.replace('\n', "\n    ").as_bytes())?;
        self.in_list += 1;
        Ok(())
    }

    fn close_list(&mut self) -> std::io::Result<()> {
        if matches!(self.format, ExportFormat::Json) {
            let end: &[u8] = if self.in_list == 0 { b"]" } else { b"\n  ]" };
            self.out.write_all(end)?;
        }
        self.in_list = 0;
        Ok(())
    }

    /// Writes records as CSV rows (`csv` writes one) or JSON items; returns how many.
    fn records<T: serde::Serialize>(
        &mut self,
        items: &[T],
        csv: fn(&mut String, &T),
    ) -> std::io::Result<usize> {
        for item in items {
            match self.format {
                ExportFormat::Csv => {
                    let mut row = String::new();
                    csv(&mut row, item);
                    self.out.write_all(row.as_bytes())?;
                }
                ExportFormat::Json => self.json_item(item)?,
            }
        }
        Ok(items.len())
    }

    fn sessions(&mut self, sessions: &[Session]) -> std::io::Result<()> {
        self.sessions += self.records(sessions, csv_session)?;
        Ok(())
    }

    fn end_sessions(&mut self) -> std::io::Result<()> {
        self.close_list()?;
        if matches!(self.format, ExportFormat::Json) {
            self.out.write_all(b",\n  \"auth_attempts\": [")?;
        }
        Ok(())
    }

    fn auth_attempts(&mut self, attempts: &[AuthAttempt]) -> std::io::Result<()> {
        self.auth_attempts += self.records(attempts, csv_auth)?;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<(usize, usize)> {
        self.close_list()?;
        if matches!(self.format, ExportFormat::Json) {
            self.out.write_all(b"\n}\n")?;
        }
        self.out.flush()?;
        Ok((self.sessions, self.auth_attempts))
    }
}

/// Pages of `q` until `limit` sessions and (if asked) `limit` auth attempts, or the last page.
async fn first_records(
    client: &super::Client,
    q: HistoryRequest<'_>,
    limit: usize,
) -> Result<HistoryPage, CliError> {
    let mut all = HistoryPage::default();
    let mut token = String::new();
    loop {
        let (page, next) = client.history_page(&q, &token).await?;
        all.sessions.extend(page.sessions);
        all.auth_attempts.extend(page.auth_attempts);
        let enough = all.sessions.len() >= limit
            && (!(q.include_auth || q.auth_only) || all.auth_attempts.len() >= limit);
        if next.is_empty() || enough {
            break;
        }
        token = next;
    }
    all.sessions.truncate(limit);
    all.auth_attempts.truncate(limit);
    Ok(all)
}

/// Streams every page of `q` into `w`: the sessions, then (a second walk) the auth attempts.
async fn export<W: Write>(
    client: &super::Client,
    user: &str,
    w: &mut ExportWriter<W>,
) -> Result<(), ExportError> {
    let mut q = HistoryRequest {
        user,
        page_size: MAX_PAGE,
        ..HistoryRequest::default()
    };
    let mut token = String::new();
    loop {
        let (page, next) = client.history_page(&q, &token).await?;
        w.sessions(&page.sessions)?;
        if next.is_empty() {
            break;
        }
        token = next;
    }
    w.end_sessions()?;
    if user.is_empty() {
        q.auth_only = true;
        token.clear();
        loop {
            let (page, next) = client.history_page(&q, &token).await?;
            w.auth_attempts(&page.auth_attempts)?;
            if next.is_empty() {
                break;
            }
            token = next;
        }
    }
    Ok(())
}

/// What can stop an export: the agent, or the output.
enum ExportError {
    Api(CliError),
    Io(std::io::Error),
}

impl From<crate::api::client::ClientError> for ExportError {
    fn from(e: crate::api::client::ClientError) -> Self {
        ExportError::Api(e.into())
    }
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        ExportError::Io(e)
    }
}

/// The largest page the agent serves.
const MAX_PAGE: u32 = 1000;

/// Runs `capybara history …`.
pub(super) async fn run(cli: &Cli, cmd: &HistoryCmd) -> Result<(), CliError> {
    match cmd {
        HistoryCmd::Show { user, limit } => {
            let user = opt_user(user.as_ref())?;
            let q = HistoryRequest {
                user,
                page_size: (*limit).min(MAX_PAGE),
                ..HistoryRequest::default()
            };
            let page = first_records(&connect(cli).await?, q, *limit as usize).await?;
            if cli.json {
                print_json(&page.sessions)?;
            } else {
                out!("{}", sessions_table(&page.sessions))?;
            }
            Ok(())
        }
        HistoryCmd::Search { ip, limit } => {
            crate::api::lists::cidrs("ip", std::slice::from_ref(ip))?;
            let q = HistoryRequest {
                ip,
                page_size: (*limit).min(MAX_PAGE),
                include_auth: true,
                ..HistoryRequest::default()
            };
            let page = first_records(&connect(cli).await?, q, *limit as usize).await?;
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
            let client = connect(cli).await?;
            let sink: Box<dyn Write> = match output {
                Some(p) => Box::new(std::fs::File::create(p).map_err(CliError::file(p))?),
                None => Box::new(super::output::Stdout),
            };
            let io_err = |e: std::io::Error| match output {
                Some(p) => CliError::file(p)(e),
                None if e.kind() == std::io::ErrorKind::BrokenPipe => CliError::Stdout(e),
                None => CliError::file("-".as_ref())(e),
            };
            let mut w =
                ExportWriter::new(std::io::BufWriter::new(sink), *format).map_err(io_err)?;
            match export(&client, user, &mut w).await {
                Ok(()) => {}
                Err(ExportError::Api(e)) => return Err(e),
                Err(ExportError::Io(e)) => return Err(io_err(e)),
            }
            let (sessions, auth_attempts) = w.finish().map_err(io_err)?;
            if output.is_some() && !cli.json {
                eprintln!("exported {sessions} sessions and {auth_attempts} auth attempts");
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
        history::{Counters, EndpointSeen},
    };

    #[test]
    fn csv_has_one_row_per_record_and_quotes_what_needs_it() {
        let page = HistoryPage {
            sessions: vec![Session {
                device: "lap,top".into(),
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
                ..Session::sample(0, 60, EndReason::Kicked)
            }],
            auth_attempts: vec![AuthAttempt {
                protocol: Default::default(),
                at: 0,
                source: "203.0.113.9:1".parse().unwrap(),
                public_key: None,
                reason: "unknown-key".into(),
                count: 3,
                prefix: Some("203.0.113.0/24".parse().unwrap()),
                first_seen: 0,
            }],
        };
        let text = csv(&page);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // 17 columns, and since proxies the protocol (last, so older columns keep their place).
        assert_eq!(lines[0].split(',').count(), 18);
        assert!(lines[0].ends_with(",protocol"));
        assert!(lines[1].ends_with(",wireguard") && lines[2].ends_with(",wireguard"));
        assert!(lines[1].starts_with("session,0000000000000001-00000002,alice,\"lap,top\",1970-01-01T00:00:00Z,1970-01-01T00:01:00Z,kicked,192.0.2.1:5,"));
        assert!(lines[1].contains(",300,3,400,4,"), "{}", lines[1]);
        assert!(lines[2].starts_with("auth,,,,1970-01-01T00:00:00Z,,unknown-key,203.0.113.9:1,"));
    }

    #[test]
    fn the_streamed_export_is_the_whole_page_written_at_once() {
        let page = sample_page();
        for (format, whole) in [
            (ExportFormat::Csv, csv(&page).into_bytes()),
            (ExportFormat::Json, {
                let mut b = serde_json::to_vec_pretty(&page).unwrap();
                b.push(b'\n');
                b
            }),
        ] {
            let mut out = Vec::new();
            let mut w = ExportWriter::new(&mut out, format).unwrap();
            // In pages of one record.
            for s in page.sessions.chunks(1) {
                w.sessions(s).unwrap();
            }
            w.end_sessions().unwrap();
            for a in page.auth_attempts.chunks(1) {
                w.auth_attempts(a).unwrap();
            }
            assert_eq!(w.finish().unwrap(), (2, 2));
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(whole).unwrap()
            );
        }
        // Empty lists too.
        let mut out = Vec::new();
        let mut w = ExportWriter::new(&mut out, ExportFormat::Json).unwrap();
        w.end_sessions().unwrap();
        w.finish().unwrap();
        let mut whole = serde_json::to_vec_pretty(&HistoryPage::default()).unwrap();
        whole.push(b'\n');
        assert_eq!(out, whole);
    }

    fn sample_page() -> HistoryPage {
        let s = Session::sample(0, 60, EndReason::Kicked);
        let a = AuthAttempt {
            protocol: Default::default(),
            at: 9,
            source: "203.0.113.9:1".parse().unwrap(),
            public_key: None,
            reason: "bad-mac".into(),
            count: 40,
            prefix: Some("203.0.113.0/24".parse().unwrap()),
            first_seen: 2,
        };
        HistoryPage {
            sessions: vec![
                s.clone(),
                Session {
                    id: crate::service::domain::SessionId {
                        start_ns: 0,
                        peer: 2,
                    },
                    ..s
                },
            ],
            auth_attempts: vec![a.clone(), AuthAttempt { count: 1, ..a }],
        }
    }
}
