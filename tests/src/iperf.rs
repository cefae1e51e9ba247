//! iperf3 between namespaces: a one-shot server in one namespace, a client in another, the
//! client's JSON report parsed into [`IperfResult`].
//!
//! The client is always the **sender** (no `-R`): its report then carries the sender's own
//! retransmit count, and the congestion control asked for (`-C`) is the sender's.

use std::{net::IpAddr, time::Duration};

use crate::netns::NetNs;

/// One TCP test's outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IperfResult {
    /// Goodput at the receiver, bits per second (omitted seconds excluded).
    pub received_bps: f64,
    /// Bytes the receiver got (omitted seconds excluded).
    pub received_bytes: u64,
    /// Bytes the sender wrote (omitted seconds excluded): an upper bound of what crossed, as it
    /// includes what was still in the sender's socket buffer when the streams closed (the
    /// receiver's count is a lower bound: it misses what was in flight at the end).
    pub sent_bytes: u64,
    /// Segments the sender retransmitted.
    pub retransmits: u64,
    /// The median of the receiver's whole-second goodputs (omitted seconds excluded), bits per
    /// second: a second in which the shared host stalled the path does not move it, where a
    /// rate cap (a shaper) turns every stall into goodput the flow can never make up.
    pub received_median_second_bps: f64,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct IperfTcp<'a> {
    /// Measured seconds.
    pub seconds: u32,
    /// Seconds at the start left out of the figures (slow start).
    pub omit: u32,
    /// Congestion control of the sender (`None`: the kernel's default).
    pub congestion: Option<&'a str>,
    /// Parallel streams.
    pub streams: u32,
}

impl Default for IperfTcp<'_> {
    fn default() -> Self {
        IperfTcp {
            seconds: 5,
            omit: 1,
            congestion: None,
            streams: 1,
        }
    }
}

/// A port for the one-shot server (distinct per call in this process).
fn port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    5201 + (std::process::id() as u16 % 1000) * 8 + NEXT.fetch_add(1, Ordering::Relaxed) % 8
}

/// Sends TCP with iperf3 from namespace `from` to a one-shot server on `to_addr` in namespace
/// `to`. Panics with iperf3's output if it fails.
pub fn tcp(from: &NetNs, to: &NetNs, to_addr: IpAddr, spec: &IperfTcp<'_>) -> IperfResult {
    let port = port().to_string();
    let addr = to_addr.to_string();
    // `-J`: the server's own JSON report, with its per-second figures, comes back to the
    // client (`--get-server-output`).
    let server = to.spawn(&["iperf3", "-s", "-1", "-J", "-B", &addr, "-p", &port]);
    // Wait for the server to listen (at most 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ss = to.exec(&["ss", "-Hltn", &format!("sport = :{port}")]);
        if !ss.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "iperf3 server on {addr}:{port} in {} did not start",
            to.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (secs, omit, streams) = (
        spec.seconds.to_string(),
        spec.omit.to_string(),
        spec.streams.to_string(),
    );
    let mut args = vec![
        "iperf3",
        "-c",
        &addr,
        "-p",
        &port,
        "-t",
        &secs,
        "-O",
        &omit,
        "-P",
        &streams,
        "-J",
        "--get-server-output",
    ];
    if let Some(cc) = spec.congestion {
        args.extend(["-C", cc]);
    }
    let out = from.try_exec(&args);
    if to.is_running(server) {
        to.kill(server, nix::sys::signal::Signal::SIGKILL);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "iperf3 {args:?} in {} printed no JSON ({e}): {text}{}",
            from.name(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(err) = json.get("error") {
        panic!("iperf3 {args:?} in {} failed: {err}", from.name());
    }
    let end = &json["end"];
    let num = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .unwrap_or_else(|| panic!("iperf3 report has no {what}: {text}"))
    };
    let seconds: Vec<f64> = json["server_output_json"]["intervals"]
        .as_array()
        .unwrap_or_else(|| panic!("iperf3 report has no server intervals: {text}"))
        .iter()
        .map(|i| &i["sum"])
        // The last interval is the fraction of a second the test ran over.
        .filter(|sum| sum["omitted"] != true && sum["seconds"].as_f64().is_some_and(|s| s > 0.9))
        .map(|sum| num(&sum["bits_per_second"], "an interval's rate"))
        .collect();
    assert!(
        !seconds.is_empty(),
        "iperf3 report has no whole second: {text}"
    );
    IperfResult {
        received_median_second_bps: crate::bench::median(&seconds),
        received_bps: num(&end["sum_received"]["bits_per_second"], "received rate"),
        received_bytes: num(&end["sum_received"]["bytes"], "received bytes") as u64,
        sent_bytes: num(&end["sum_sent"]["bytes"], "sent bytes") as u64,
        retransmits: num(&end["sum_sent"]["retransmits"], "retransmits") as u64,
    }
}
