//! The live views `capybara top` and `capybara stats --watch` share: one frame a second from the
//! agent's `WatchStats` stream (never a poll of whole tables), drawn for a person or printed for
//! a script.
//!
//! - **On a terminal**: the alternate screen (as `top` and `less` use it, so the shell's screen
//!   comes back on exit) with the cursor hidden; each frame is drawn from the top-left corner
//!   (ANSI home + clear) and fits the terminal: lines cut at its width, rows at its height (the
//!   rows asked of the agent are what fits, unless `--top N`). Only standard ANSI sequences, no
//!   raw mode: plain terminals over SSH work, and the terminal's own settings are never changed.
//! - **Not a terminal** (a pipe, a file): the same frames as plain text with no control codes, a
//!   blank line between them, `--top` (default 20) rows each.
//! - **`--json`**: one JSON object per line per tick (the `LiveView`: totals, rates per second,
//!   counters, the listed users and devices, the rest summed, drops), no control codes.
//! - **Ending**: Ctrl-C (SIGINT), SIGTERM or SIGHUP ends the view with exit code **0** — it is
//!   the way to stop a live view, not a failure; the terminal is restored first (main screen,
//!   cursor shown), on every way out, a panic and an error included (a guard's `Drop`). A stream
//!   the agent ends (it is stopping) or breaks is an error (exit 1); a closed pipe ends it
//!   quietly (141, as for every command).

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
};

use super::{CliError, output::time, table::Table};
use crate::{
    api::client::Client,
    service::watch::{Line, LiveTraffic, LiveView, MAX_TOP},
};

/// Which view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Layout {
    /// `capybara top`: totals, users, devices.
    Top,
    /// `capybara stats --watch`: the `stats` table with rates.
    Stats,
}

/// Rows per list when the terminal's height is unknown or output is not a terminal.
const PLAIN_TOP: u32 = 20;

/// Lines of a frame that are not rows (title, totals, drops, headers, the "more" lines, blanks).
fn fixed_lines(layout: Layout) -> usize {
    match layout {
        Layout::Top => 10,
        Layout::Stats => 5,
    }
}

/// How the frames go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Screen,
    Plain,
    Json,
}

/// Leaves the alternate screen and shows the cursor again when dropped: on return, on error
/// and on panic alike.
struct ScreenGuard;

impl ScreenGuard {
    /// Enters the alternate screen and hides the cursor.
    fn enter() -> Result<ScreenGuard, CliError> {
        raw_stdout("\x1b[?1049h\x1b[?25l")?;
        Ok(ScreenGuard)
    }
}

impl Drop for ScreenGuard {
    fn drop(&mut self) {
        let _ = raw_stdout("\x1b[?25h\x1b[?1049l");
    }
}

fn raw_stdout(s: &str) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())
        .and_then(|()| o.flush())
        .map_err(CliError::Stdout)
}

/// The terminal's (columns, rows), if standard output is one.
fn terminal_size() -> Option<(usize, usize)> {
    crossterm::terminal::size()
        .ok()
        .filter(|(c, r)| *c > 0 && *r > 0)
        .map(|(c, r)| (usize::from(c), usize::from(r)))
}

/// Rows per list that fit `rows` lines.
fn fitting_top(layout: Layout, rows: usize) -> u32 {
    let free = rows.saturating_sub(fixed_lines(layout));
    let per = match layout {
        Layout::Top => free / 2,
        Layout::Stats => free,
    };
    (per.max(1) as u32).min(MAX_TOP as u32)
}

/// Runs a live view until Ctrl-C (see the module docs).
pub(super) async fn run(
    client: &Client,
    json: bool,
    user: &str,
    top: Option<u32>,
    layout: Layout,
) -> Result<(), CliError> {
    let mode = if json {
        Mode::Json
    } else if std::io::stdout().is_terminal() {
        Mode::Screen
    } else {
        Mode::Plain
    };
    let size = (mode == Mode::Screen).then(terminal_size).flatten();
    let ask = top.unwrap_or_else(|| size.map_or(PLAIN_TOP, |(_, r)| fitting_top(layout, r)));
    let mut ticks = client.watch_stats(user, ask).await?;
    let mut signals = Signals::new()?;
    let _guard = match mode {
        Mode::Screen => Some(ScreenGuard::enter()?),
        _ => None,
    };
    let mut first = true;
    loop {
        let next = tokio::select! {
            () = signals.any() => return Ok(()),
            n = ticks.next() => n,
        };
        let view = match next {
            None => return Err(CliError::WatchEnded),
            Some(v) => v?,
        };
        let text = match mode {
            Mode::Json => {
                let mut s = serde_json::to_string(&view).expect("domain values serialise");
                s.push('\n');
                s
            }
            Mode::Plain => {
                let mut s = String::new();
                if !first {
                    s.push('\n');
                }
                for l in frame(&view, layout, user) {
                    let _ = writeln!(s, "{l}");
                }
                s
            }
            Mode::Screen => {
                // The size now: the terminal may have been resized.
                let (cols, rows) = terminal_size().or(size).unwrap_or((80, 24));
                let mut s = String::from("\x1b[H\x1b[2J");
                let lines = frame(&view, layout, user);
                for (i, l) in lines.iter().take(rows).enumerate() {
                    if i > 0 {
                        s.push_str("\r\n");
                    }
                    s.extend(l.chars().take(cols));
                }
                s
            }
        };
        first = false;
        raw_stdout(&text)?;
    }
}

/// SIGINT, SIGTERM and SIGHUP.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, CliError> {
        use tokio::signal::unix::{SignalKind, signal};
        let s = |k| signal(k).map_err(CliError::Signals);
        Ok(Signals {
            int: s(SignalKind::interrupt())?,
            term: s(SignalKind::terminate())?,
            hup: s(SignalKind::hangup())?,
        })
    }

    async fn any(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// Bytes with an SI prefix, three significant digits: `950 B`, `1.23 kB`, `45.6 MB`.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 999.5 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if v >= 99.95 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 9.995 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The traffic cells of a `top` row: RX/S, TX/S, RX PKT/S, TX PKT/S, RX, TX.
fn top_cells(t: &LiveTraffic) -> [String; 6] {
    [
        rate(t.rx.bytes),
        rate(t.tx.bytes),
        t.rx.packets.to_string(),
        t.tx.packets.to_string(),
        bytes(t.rx_total.bytes),
        bytes(t.tx_total.bytes),
    ]
}

fn rate(n: u64) -> String {
    format!("{}/s", bytes(n))
}

fn totals_line(t: &LiveTraffic) -> String {
    format!(
        "rx {} {} pkt/s   tx {} {} pkt/s   (in all: rx {}, tx {})",
        rate(t.rx.bytes),
        t.rx.packets,
        rate(t.tx.bytes),
        t.tx.packets,
        bytes(t.rx_total.bytes),
        bytes(t.tx_total.bytes),
    )
}

fn drops_line(v: &LiveView) -> String {
    if v.drops.is_empty() {
        return "drops: none".into();
    }
    let parts: Vec<String> = v
        .drops
        .iter()
        .map(|d| format!("{} {}/s ({})", d.reason, d.per_second, d.packets))
        .collect();
    format!("drops: {}", parts.join(" · "))
}

fn more_line(what: &str, o: &crate::service::watch::Others) -> Option<String> {
    (o.count > 0).then(|| {
        format!(
            "… {} more {what}: rx {}, tx {}",
            o.count,
            rate(o.traffic.rx.bytes),
            rate(o.traffic.tx.bytes)
        )
    })
}

fn table_lines(t: &Table) -> impl Iterator<Item = String> + '_ {
    // `Table` prints whole lines; a frame is a list of them.
    t.to_string()
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
}

/// The lines of one frame.
pub(super) fn frame(v: &LiveView, layout: Layout, user: &str) -> Vec<String> {
    let when = time(v.at_ms / 1000);
    let every = format!("{:.1} s", v.interval_ms as f64 / 1000.0);
    let scope = if user.is_empty() {
        String::new()
    } else {
        format!(" · user {user}")
    };
    let mut out = Vec::new();
    match layout {
        Layout::Top => {
            out.push(format!(
                "capybara top · {when} · every {every}{scope} · Ctrl-C quits"
            ));
            out.push(format!(
                "users {}   devices {}   sessions {} online",
                v.users, v.devices, v.sessions
            ));
            out.push(totals_line(&v.total));
            out.push(drops_line(v));
            out.push(String::new());
            let mut u = Table::new(&[
                "USER", "DEVICES", "ONLINE", "RX/S", "TX/S", "RX PKT/S", "TX PKT/S", "RX", "TX",
            ]);
            for r in &v.top_users {
                let mut row = vec![
                    r.user.clone(),
                    r.devices.to_string(),
                    r.sessions.to_string(),
                ];
                row.extend(top_cells(&r.traffic));
                u.row(row);
            }
            out.extend(table_lines(&u));
            out.extend(more_line("users", &v.other_users));
            out.push(String::new());
            let mut d = Table::new(&[
                "USER", "DEVICE", "ADDRESS", "ONLINE", "RX/S", "TX/S", "RX PKT/S", "TX PKT/S",
                "RX", "TX",
            ]);
            for r in &v.top_devices {
                let address = match &r.line {
                    Line::Peer(p) => p.ipv4.to_string(),
                    Line::Proxy(_) => "-".into(),
                };
                let mut row = vec![
                    r.line.user().to_string(),
                    r.line.name().to_owned(),
                    address,
                    if r.online { "yes" } else { "no" }.into(),
                ];
                row.extend(top_cells(&r.traffic));
                d.row(row);
            }
            out.extend(table_lines(&d));
            out.extend(more_line("devices", &v.other_devices));
        }
        Layout::Stats => {
            out.push(format!(
                "capybara stats --watch · {when} · every {every}{scope} · sessions {} online · \
                 Ctrl-C quits",
                v.sessions
            ));
            let mut t = Table::new(&[
                "USER", "DEVICE", "RX BYTES", "RX PKTS", "TX BYTES", "TX PKTS", "RX/S", "TX/S",
            ]);
            for r in &v.top_devices {
                t.row(vec![
                    r.line.user().to_string(),
                    r.line.name().to_owned(),
                    r.traffic.rx_total.bytes.to_string(),
                    r.traffic.rx_total.packets.to_string(),
                    r.traffic.tx_total.bytes.to_string(),
                    r.traffic.tx_total.packets.to_string(),
                    rate(r.traffic.rx.bytes),
                    rate(r.traffic.tx.bytes),
                ]);
            }
            out.extend(table_lines(&t));
            out.extend(more_line("devices", &v.other_devices));
            out.push(format!("total: {}", totals_line(&v.total)));
            out.push(drops_line(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{
        Traffic,
        watch::{DropRate, Others, Rate, UserRow},
    };

    #[test]
    fn bytes_have_three_significant_digits() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_000), "1.00 kB");
        assert_eq!(bytes(1_234_567), "1.23 MB");
        assert_eq!(bytes(45_600_000), "45.6 MB");
        assert_eq!(bytes(999_600), "1.00 MB");
        assert_eq!(bytes(123_000_000_000), "123 GB");
        assert_eq!(bytes(u64::MAX), "18.4 EB");
    }

    fn view() -> LiveView {
        let t = |rx: u64| LiveTraffic {
            rx: Rate {
                bytes: rx,
                packets: 10,
            },
            tx: Rate {
                bytes: 500,
                packets: 5,
            },
            rx_total: Traffic {
                packets: 1,
                bytes: 2_000_000,
            },
            tx_total: Traffic::default(),
        };
        LiveView {
            at_ms: 1_700_000_000_000,
            interval_ms: 1_000,
            users: 3,
            devices: 4,
            sessions: 2,
            total: t(1_500_000),
            top_users: vec![UserRow {
                user: "alice".into(),
                devices: 2,
                sessions: 1,
                traffic: t(1_234_567),
            }],
            other_users: Others {
                count: 2,
                traffic: t(265_433),
            },
            top_devices: Vec::new(),
            other_devices: Others::default(),
            drops: vec![DropRate {
                reason: "quota-exhausted".into(),
                per_second: 12,
                packets: 340,
            }],
        }
    }

    #[test]
    fn the_top_frame_has_the_header_the_rows_and_the_rest() {
        let f = frame(&view(), Layout::Top, "");
        assert_eq!(
            f[0],
            "capybara top · 2023-11-14T22:13:20Z · every 1.0 s · Ctrl-C quits"
        );
        assert_eq!(f[1], "users 3   devices 4   sessions 2 online");
        assert_eq!(
            f[2],
            "rx 1.50 MB/s 10 pkt/s   tx 500 B/s 5 pkt/s   (in all: rx 2.00 MB, tx 0 B)"
        );
        assert_eq!(f[3], "drops: quota-exhausted 12/s (340)");
        assert!(f[5].starts_with("USER "), "{f:#?}");
        assert!(
            f[6].starts_with("alice ") && f[6].contains("1.23 MB/s"),
            "{f:#?}"
        );
        assert_eq!(f[7], "… 2 more users: rx 265 kB/s, tx 500 B/s");
        assert!(f.iter().all(|l| !l.contains('\x1b')));
    }

    #[test]
    fn a_proxy_identity_is_a_row_named_by_its_protocol_without_an_address() {
        use crate::service::{
            domain::{Protocol, ProxyAccess, UserName},
            watch::DeviceRow,
        };
        let mut v = view();
        v.top_devices = vec![DeviceRow {
            line: Line::Proxy(ProxyAccess {
                id: 7,
                user: UserName::parse("user", "alice").unwrap(),
                protocol: Protocol::Shadowsocks,
                created_at: 0,
            }),
            online: true,
            traffic: v.total,
        }];
        for layout in [Layout::Top, Layout::Stats] {
            let f = frame(&v, layout, "");
            let row = f
                .iter()
                .find(|l| l.starts_with("alice ") && l.contains("shadowsocks"))
                .unwrap_or_else(|| panic!("{f:#?}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cells[1], "shadowsocks", "{row}");
            if layout == Layout::Top {
                assert_eq!((cells[2], cells[3]), ("-", "yes"), "{row}");
            }
        }
    }

    #[test]
    fn the_asked_rows_fit_the_terminal() {
        assert_eq!(fitting_top(Layout::Top, 40), 15);
        assert_eq!(fitting_top(Layout::Stats, 40), 35);
        assert_eq!(fitting_top(Layout::Top, 3), 1);
        assert_eq!(fitting_top(Layout::Stats, 5_000), MAX_TOP as u32);
        // A frame of that many rows is no taller than the terminal.
        let mut v = view();
        v.top_users = vec![v.top_users[0].clone(); 15];
        let n = frame(&v, Layout::Top, "").len();
        assert!(n <= 40, "{n}");
    }
}
