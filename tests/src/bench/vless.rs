//! `vless_throughput_*`: bulk download through the VLESS endpoint
//! (`capybara_agent::proxy::vless::serve`, in this process on a 2-worker tokio runtime) against
//! Debian's `v2ray` 4.34 as the VLESS+TLS server, in the same run, with the same client and the
//! same certificate.
//!
//! Rig, all on loopback: a source that writes 64 KiB buffers as fast as the connection takes
//! them; for each server one Debian `v2ray` client (VLESS outbound over TLS trusting the
//! generated ECDSA P-256 certificate, the configuration of `crate::v2ray::client_config`) with
//! a SOCKS inbound; this process connects through the SOCKS port to the source and reads. Each
//! round reads for [`WARMUP`] (not counted), then `seconds`; rounds alternate Capybara, v2ray,
//! Capybara, … ([`RUNS`] of each); each throughput figure is the median of its rounds and
//! `vless_throughput_vs_v2ray` their ratio (target ≥ 1.0). The endpoint's `Hub` binds nothing
//! in the kernel (a kernel port that only records: the programs' cost is the dataplane
//! benchmarks' subject) and drops its events.
//!
//! The v2ray client decrypts everything both servers send, on the same 2 cores: when it uses
//! about one core it is the bottleneck and the ratio says only that our server leaves it at
//! least as much CPU as v2ray's does. Each round logs the client's and the server's CPU
//! share (cores: the v2ray process, or the endpoint runtime's threads) so the report can say
//! which it was.
//!
//! Measured 2026-12-07 15:47 UTC (release, `capybara-bench --filter vless`, 3 s rounds, three
//! runs one after the other under the machine-wide lock while other helpers' builds kept the
//! load average at ≈ 8 on the 2 cores, so noisy):
//!
//! | run | Capybara rounds (Mbit/s) | v2ray rounds (Mbit/s) | medians | ratio |
//! |---|---|---|---|---|
//! | 1 | 2863, 3053, 4001 | 1899, 1769, 1695 | 3053 / 1769 | 1.73 |
//! | 2 | 3851, 3105, 3335 | 1966, 1892, 2166 | 3335 / 1966 | 1.70 |
//! | 3 | 3745, 4334, 4213 | 1980, 2316, 2150 | 4213 / 2150 | 1.96 |
//!
//! Per round, the server used 0.23–0.33 cores for Capybara's endpoint and 0.54–0.66 for
//! v2ray's (so about 0.08 s against 0.31 s of CPU per gigabit), and the v2ray client
//! 0.50–0.77 cores in both rigs: no process was at a full core, the machine's other load
//! took the rest, so the figures are a lower bound for both and the ratio's cause is the
//! server's CPU per byte (rustls with ring's AES-GCM and 64 KiB relay buffers against Go's
//! `crypto/tls` and v2ray's buffer pipeline).

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use capybara_agent::{
    proxy::{
        Hub, Identity,
        registry::Registry,
        testing::{ChannelEvents, RecordingKernel, StaticUsers},
        tls::{CertSource, EndpointCert},
        vless,
    },
    service::domain::{Protocol, UserName},
};
use tokio_util::sync::CancellationToken;

use super::{Figure, Selection, median};
use crate::{
    cpu, progress,
    v2ray::{self, V2ray},
};

/// `vless_throughput_mbps_capybara`: Mbit/s of a bulk download through Capybara's endpoint.
pub const VLESS_THROUGHPUT_MBPS_CAPYBARA: &str = "vless_throughput_mbps_capybara";
/// `vless_throughput_mbps_v2ray`: the same through Debian's v2ray as the server.
pub const VLESS_THROUGHPUT_MBPS_V2RAY: &str = "vless_throughput_mbps_v2ray";
/// `vless_throughput_vs_v2ray`: ours over v2ray's, same run (target ≥ 1.0).
pub const VLESS_THROUGHPUT_VS_V2RAY: &str = "vless_throughput_vs_v2ray";

/// This module's figures.
pub const NAMES: &[&str] = &[
    VLESS_THROUGHPUT_MBPS_CAPYBARA,
    VLESS_THROUGHPUT_MBPS_V2RAY,
    VLESS_THROUGHPUT_VS_V2RAY,
];

/// Rounds of each server (alternating).
pub const RUNS: usize = 3;
/// Reading before a round's measurement starts (TLS and TCP windows up to speed).
pub const WARMUP: Duration = Duration::from_millis(500);
/// The certificate's name (SNI).
const SNI: &str = "vless.bench.test";
/// The endpoint runtime's thread names (their CPU is the server's in the Capybara rounds).
const ENDPOINT_THREADS: &str = "vless-endpoint";
/// The one user.
const UUID: [u8; 16] = *b"bench-vless-uuid";

/// A source on loopback writing 64 KiB buffers to each connection until it closes.
fn source() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        let buf = vec![0x5au8; 64 * 1024];
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let buf = buf.clone();
            std::thread::spawn(move || while s.write_all(&buf).is_ok() {});
        }
    });
    Ok(addr)
}

/// One round through the client on `socks`: Mbit/s, the client's and the server's cores.
fn round(
    socks: u16,
    source: SocketAddr,
    seconds: f64,
    client: u32,
    server: &ServerCpu<'_>,
) -> Result<Round> {
    let proxy = SocketAddr::from(([127, 0, 0, 1], socks));
    let mut s = crate::socks::connect(proxy, source).context("SOCKS connect through v2ray")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let read_for = |s: &mut std::net::TcpStream, buf: &mut [u8], d: Duration| -> Result<u64> {
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < d {
            let got = s.read(buf).context("read through v2ray")?;
            anyhow::ensure!(got > 0, "the connection through v2ray ended");
            n += got as u64;
        }
        Ok(n)
    };
    read_for(&mut s, &mut buf, WARMUP)?;
    let (c0, s0) = (cpu::process(client)?, server()?);
    let start = Instant::now();
    let bytes = read_for(&mut s, &mut buf, Duration::from_secs_f64(seconds))?;
    let secs = start.elapsed().as_secs_f64();
    let (c1, s1) = (cpu::process(client)?, server()?);
    Ok(Round {
        mbps: bytes as f64 * 8.0 / secs / 1e6,
        client_cores: (c1 - c0).as_secs_f64() / secs,
        server_cores: (s1 - s0).as_secs_f64() / secs,
    })
}

/// The server's CPU time so far.
type ServerCpu<'a> = dyn Fn() -> Result<Duration> + 'a;

struct Round {
    mbps: f64,
    client_cores: f64,
    server_cores: f64,
}

/// The figures of [`NAMES`] that `sel` wants: [`RUNS`] alternating rounds of `seconds` each.
pub fn run(sel: &Selection, seconds: f64) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    let dir = tempfile::tempdir()?;
    // Written as the agent keeps it, so v2ray's server reads the very same files.
    let cert = EndpointCert::load(&CertSource::Generated {
        data_dir: dir.path().to_owned(),
        names: vec![SNI.to_owned()],
    })?;
    let source = source()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(ENDPOINT_THREADS)
        .enable_all()
        .build()?;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let ours = listener.local_addr()?;
    // The one user; a kernel port that only records (the agent's would bind in its map), and
    // events to a channel nobody reads.
    let user = Identity {
        id: 1,
        user: UserName::parse("user", "bench").expect("a valid user name"),
        protocol: Protocol::Vless,
    };
    let hub = Hub {
        credentials: Arc::new(StaticUsers::vless([(UUID, user)])),
        kernel: Arc::new(RecordingKernel::default()),
        events: Arc::new(ChannelEvents::new().0),
        registry: Arc::new(Registry::default()),
    };
    rt.spawn(vless::serve(
        listener,
        cert.server_config()?,
        hub,
        stop.clone(),
    ));

    let theirs_port = v2ray::free_port();
    let theirs = V2ray::start(
        &v2ray::server_config(
            theirs_port,
            &[UUID],
            &capybara_agent::paths::vless_cert_file(dir.path()),
            &capybara_agent::paths::vless_key_file(dir.path()),
        ),
        theirs_port,
    );
    let client = |server: SocketAddr| {
        let port = v2ray::free_port();
        let v = V2ray::start(
            &v2ray::client_config(port, server, &UUID, SNI, cert.chain_pem()),
            port,
        );
        (v, port)
    };
    let (to_ours, ours_socks) = client(ours);
    let (to_theirs, theirs_socks) = client(SocketAddr::from(([127, 0, 0, 1], theirs_port)));

    let ours_cpu = || cpu::threads(ENDPOINT_THREADS).map(|(t, _)| t);
    let theirs_cpu = || cpu::process(theirs.pid());
    let mut got: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 0..RUNS {
        let rigs: [(&str, u16, u32, &ServerCpu<'_>); 2] = [
            ("capybara", ours_socks, to_ours.pid(), &ours_cpu),
            ("v2ray", theirs_socks, to_theirs.pid(), &theirs_cpu),
        ];
        for (name, socks, client, server) in rigs {
            let r = round(socks, source, seconds, client, server).with_context(|| {
                format!(
                    "{name} round {i}; client log: {}; server log: {}",
                    if name == "capybara" {
                        to_ours.log()
                    } else {
                        to_theirs.log()
                    },
                    theirs.log()
                )
            })?;
            progress!(
                "vless through {name}: {:.0} Mbit/s, v2ray client {:.2} cores, server {:.2} cores",
                r.mbps,
                r.client_cores,
                r.server_cores,
            );
            got.entry(name).or_default().push(r.mbps);
        }
    }
    let (a, b) = (median(&got["capybara"]), median(&got["v2ray"]));
    let figures = vec![
        Figure {
            name: VLESS_THROUGHPUT_MBPS_CAPYBARA,
            value: a,
            unit: "Mbit/s",
        },
        Figure {
            name: VLESS_THROUGHPUT_MBPS_V2RAY,
            value: b,
            unit: "Mbit/s",
        },
        Figure {
            name: VLESS_THROUGHPUT_VS_V2RAY,
            value: a / b,
            unit: "ratio",
        },
    ];
    Ok(figures.into_iter().filter(|f| sel.wants(f.name)).collect())
}
