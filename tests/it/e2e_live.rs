//! Live monitoring end to end: the real `capybara-agent` in a namespace, a stock `wireguard-go`
//! client (the session history's lab) sending a steady UDP stream through the tunnel, and
//! `capybara top` / `capybara stats --watch` as a person and a script run them.
//!
//! - `top` runs in a real terminal: a tmux server of the test's own (`-L`, a unique socket, killed
//!   on drop even when the test fails) with one 160 × 40 pane running `sh`. The test types the
//!   command, reads the screen with `capture-pane -p` and checks what a person sees: the header
//!   with the user and session counts, alice's row with a non-zero receive rate. Then `C-c`: the
//!   process has exited with 0 (`echo exit=$?` in the same shell), the pane is off the alternate
//!   screen and shows the shell's earlier output again, and the cursor is visible (tmux's own
//!   `alternate_on` / `cursor_flag`).
//! - `stats --watch --json alice` runs with its output piped for a few seconds, then gets SIGINT:
//!   every line parses as one tick; between ticks the counters moved by rate × interval; while
//!   the stream ran the rates are those of the datagrams sent (1 028 IP bytes each, within
//!   a factor the shared machine's scheduling allows); the process exits 0.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capybara_tests::{
    netns::unique_name,
    traffic::{UdpSink, UdpStream},
    wg::{WgProcess, ping_until},
};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

use crate::e2e_session_history::Lab;

const WAIT: Duration = Duration::from_secs(10);
/// Datagram payload; 1 028 bytes of IPv4 each.
const SIZE: usize = 1000;
const IP_BYTES: u64 = SIZE as u64 + 28;

/// A tmux server of the test's own with one session; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `sh` in a `cols` × `rows` pane.
    fn start(cols: u16, rows: u16) -> Tmux {
        let t = Tmux {
            socket: unique_name("tm"),
        };
        let out = t.cmd(&[
            "new-session",
            "-d",
            "-s",
            "live",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            "env PS1='$ ' sh",
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux (is it installed?)")
    }

    /// Types `text` and Enter.
    fn type_line(&self, text: &str) {
        assert!(
            self.cmd(&["send-keys", "-t", "live", "-l", text])
                .status
                .success()
        );
        assert!(
            self.cmd(&["send-keys", "-t", "live", "Enter"])
                .status
                .success()
        );
    }

    fn keys(&self, key: &str) {
        assert!(self.cmd(&["send-keys", "-t", "live", key]).status.success());
    }

    /// What the screen shows now.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "live"]).stdout)
            .into_owned()
    }

    /// A tmux format of the pane (`#{alternate_on}`, …).
    fn format(&self, f: &str) -> String {
        String::from_utf8_lossy(&self.cmd(&["display-message", "-p", "-t", "live", f]).stdout)
            .trim()
            .to_owned()
    }

    /// Waits until the screen satisfies `f`; panics with the screen.
    fn wait_screen(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "the screen never showed {what} within {WAIT:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The cells of a table line (columns are two or more spaces apart; a cell may hold one).
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The lab with alice's client connected and a UDP stream from it to a sink on the server's
/// tunnel address (every `interval`, for at most 30 s).
fn lab_with_traffic(veth: u8, tunnel: u8) -> (Lab, u32, UdpStream, UdpSink, WgProcess) {
    let lab = Lab::new(veth, tunnel);
    let pid = lab.start_agent(1, &[]);
    let (wg, client_v4) = lab.add_client("alice");
    let server = IpAddr::V4(lab.server_v4);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping through the tunnel\n{}",
        lab.log(1)
    );
    let sink = UdpSink::start(&lab.server, SocketAddr::new(server, 0));
    let stream = UdpStream::start(
        &lab.client,
        Some(client_v4),
        sink.addr(),
        SIZE,
        Duration::from_millis(4),
        Duration::from_secs(30),
    );
    (lab, pid, stream, sink, wg)
}

#[test]
fn top_in_a_real_terminal_shows_the_users_rate_and_ctrl_c_restores_it() {
    let (lab, pid, stream, _sink, _wg) = lab_with_traffic(121, 123);
    let tmux = Tmux::start(160, 40);
    tmux.type_line("printf 'before-top\\n'");
    tmux.wait_screen("the shell's output", |s| s.contains("before-top"));
    tmux.type_line(&format!(
        "{} --socket {} top",
        lab.cli.display(),
        lab.socket().display()
    ));
    // A person sees the header, the counts and alice's row moving.
    let screen = tmux.wait_screen("alice's row with a non-zero rate", |s| {
        s.lines().any(|l| {
            let c = cells(l);
            c.first() == Some(&"alice") && c.len() == 9 && c[3] != "0 B/s"
        })
    });
    eprintln!("{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    assert!(
        lines[0].starts_with("capybara top · ") && lines[0].ends_with("Ctrl-C quits"),
        "{screen}"
    );
    assert_eq!(
        lines[1], "users 1   devices 1   sessions 1 online",
        "{screen}"
    );
    assert!(lines[2].starts_with("rx "), "{screen}");
    let users_header = lines
        .iter()
        .position(|l| l.starts_with("USER  ") && l.contains("DEVICES"))
        .unwrap_or_else(|| panic!("no users table:\n{screen}"));
    let alice = cells(lines[users_header + 1]);
    assert_eq!(&alice[..3], ["alice", "1", "1"], "{screen}");
    // The device table has alice's laptop online.
    assert!(
        lines.iter().any(|l| {
            let c = cells(l);
            c.first() == Some(&"alice") && c.get(3) == Some(&"yes")
        }),
        "{screen}"
    );
    assert!(
        !screen.contains("before-top"),
        "not on the alternate screen:\n{screen}"
    );
    assert_eq!(tmux.format("#{alternate_on}"), "1");
    assert_eq!(
        tmux.format("#{cursor_flag}"),
        "0",
        "the cursor is hidden while drawing"
    );
    assert!(lines.len() <= 40);

    tmux.keys("C-c");
    let after = tmux.wait_screen("the shell again", |s| {
        s.contains("before-top") && !s.contains("capybara top ·")
    });
    tmux.type_line("echo exit=$?");
    tmux.wait_screen("top's exit code", |s| s.contains("exit=0"));
    assert_eq!(tmux.format("#{alternate_on}"), "0", "{after}");
    assert_eq!(
        tmux.format("#{cursor_flag}"),
        "1",
        "cursor hidden after exit"
    );
    assert_eq!(tmux.format("#{pane_current_command}"), "sh");
    drop(tmux);
    assert!(stream.stop() > 0);
    lab.server.kill(pid, Signal::SIGTERM);
}

#[test]
fn stats_watch_json_prints_a_tick_a_line_with_the_rates_sent() {
    let (lab, pid, stream, sink, _wg) = lab_with_traffic(125, 127);
    let started = (Instant::now(), stream.sent());
    let mut child = Command::new(&lab.cli)
        .arg("--socket")
        .arg(lab.socket())
        .args(["--json", "stats", "--watch", "alice"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capybara");
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let mut ticks: Vec<Value> = Vec::new();
    while ticks.len() < 5 {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the stream ended after {} ticks", ticks.len()))
            .expect("read a line");
        assert!(!line.contains('\x1b'), "control codes in --json: {line:?}");
        ticks.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
    }
    let (elapsed, sent) = (started.0.elapsed(), stream.sent() - started.1);
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C ends the watch with 0");
    assert!(stream.stop() > 0);
    let sent_rate = (sent * IP_BYTES) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "sent {sent} datagrams in {elapsed:?} ({sent_rate:.0} B/s); sink got {}",
        sink.packets()
    );
    for (i, t) in ticks.iter().enumerate() {
        eprintln!("{t}");
        assert_eq!(t["users"], 1);
        assert_eq!(t["devices"], 1);
        assert_eq!(t["sessions"], 1);
        let dev = &t["top_devices"][0];
        assert_eq!(dev["peer"]["user"], "alice");
        let rx = &dev["traffic"]["rx"];
        let (bps, pps) = (
            rx["bytes"].as_u64().unwrap(),
            rx["packets"].as_u64().unwrap(),
        );
        // The client's packets are the test's datagrams (the pings are over; a stray packet of
        // the client's kernel, an MLD report, is allowed for).
        assert!(
            bps.abs_diff(pps * IP_BYTES) <= 2 * IP_BYTES,
            "tick {i}: {bps} B/s is not {pps} datagrams/s of {IP_BYTES} B"
        );
        // Near what was sent: the sender sleeps 4 ms a datagram, so its rate is set by the
        // scheduler; a tick's second may see a burst or a stall, never ten times off.
        assert!(
            (bps as f64) > sent_rate / 3.0 && (bps as f64) < sent_rate * 3.0,
            "tick {i}: {bps} B/s while {sent_rate:.0} B/s were sent"
        );
        if i > 0 {
            // The counters moved by rate × interval.
            let prev = &ticks[i - 1]["top_devices"][0]["traffic"]["rx_total"]["bytes"];
            let now = dev["traffic"]["rx_total"]["bytes"].as_u64().unwrap();
            let moved = now - prev.as_u64().unwrap();
            let expect = bps as f64 * t["interval_ms"].as_u64().unwrap() as f64 / 1000.0;
            assert!(
                (moved as f64 - expect).abs() <= expect * 0.01 + 2.0,
                "tick {i}: counters moved {moved} B, rate × interval {expect:.0} B"
            );
            let dt = t["at_ms"].as_u64().unwrap() - ticks[i - 1]["at_ms"].as_u64().unwrap();
            assert!(
                (500..=2_500).contains(&dt),
                "ticks {dt} ms apart, not about a second"
            );
        }
    }
    lab.server.kill(pid, Signal::SIGTERM);
}
