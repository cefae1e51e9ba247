//! `shadowsocks_throughput_vs_ssserver`: bulk download through the agent's Shadowsocks endpoint
//! over the same through Debian's `ss-server` (shadowsocks-libev 3.3.5), same client, same run;
//! and `shadowsocks_key_lookup_us_*`, the cost of finding a user by key trial.
//!
//! ## Throughput
//! One `ss-local` (shadowsocks-libev 3.3.5) per server, both on loopback, fetches a
//! [`FILE_MB`] MiB file from a local file server ([`crate::shadowsocks::FileServer`]) through a
//! SOCKS5 connection: through (a) `capybara_agent::proxy::shadowsocks::serve` in this process
//! (a tokio runtime of its own, 2 workers, the machine's cores; three users, so the key trial runs; a
//! kernel port that only records the two binds of each connection, as the dataplane's map
//! update is per socket, not per byte) and (b) `ss-server` with the same cipher and password.
//! Rounds alternate a, b, a, b, … ([`ROUNDS`] of each); each figure is the median of its
//! rounds' Mbit/s (file bytes over the time from the SOCKS5 connect to the last byte).
//!
//! The cipher is `chacha20-ietf-poly1305`: what clients pick without AES instructions and the
//! one SIP022 keeps for the same reason; on both sides it is a hand-optimised implementation
//! (aws-lc's in shadowsocks-rust's crate, libsodium's in shadowsocks-libev), so the comparison is
//! of the servers, not of one fast and one generic cipher library (libev's AES-GCM is mbedTLS).
//!
//! The client is the same for both; whether it limits them is measured, not assumed: the
//! module logs `ss-local`'s CPU share over each round (user + system over wall time; 1.0 is one
//! core, which a single-threaded `ss-local` cannot exceed) next to the server's.
//!
//! ## Key trial
//! `shadowsocks_key_lookup_us_{1,100,1000}`: `find_key` over 1, 100 and 1000 users' keys for a
//! first chunk none of them opens (a stranger: every key is tried, the worst case; a known user
//! costs half of it on average), median of [`LOOKUPS`] lookups, `aes-256-gcm` (SIP004:
//! HKDF-SHA1 and one AES-GCM open per key).
//!
//! ## Figures
//! Three runs of `capybara-bench --filter shadowsocks` (release, 2026-12-07 16:12 UTC, 5
//! alternating rounds of 128 MiB each, load average ≈ 3–5 from other helpers' builds on the 2
//! cores, so noisy): capybara 2290 / 2214 / 2294 Mbit/s, ss-server 1836 / 2004 / 2058 Mbit/s,
//! `shadowsocks_throughput_vs_ssserver` **1.25 / 1.11 / 1.12** (target ≥ 1.0). Single rounds
//! ranged 1805–2866 (ours) and 1711–2376 (ss-server). `ss-local` used 0.36–0.58 of a core in
//! every round (it is single-threaded: it is not the limit), the endpoint's runtime 0.24–0.38,
//! `ss-server` 0.31–0.46: the transfer is bound by the loopback copies both cores share.
//! Key trial: 0.95–1.26 µs (1 key), 91–127 µs (100), 0.93–1.11 ms (1000).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use capybara_agent::{
    proxy::{
        Hub, Identity, ShadowsocksKey,
        registry::Registry,
        shadowsocks::{Cipher, Config, find_key, serve},
    },
    service::domain::{Protocol, UserName},
};
use rand::{RngCore, SeedableRng, rngs::StdRng};

use super::{Figure, Selection, median};
use crate::{
    cpu, progress,
    shadowsocks::{
        ChannelEvents, FileServer, RecordingKernel, SsProcess, StaticUsers, fetch, socks5_connect,
        ss_local, ss_server,
    },
};

/// `shadowsocks_throughput_mbps_capybara`: Mbit/s through the agent's endpoint.
pub const SHADOWSOCKS_THROUGHPUT_MBPS_CAPYBARA: &str = "shadowsocks_throughput_mbps_capybara";
/// `shadowsocks_throughput_mbps_ssserver`: Mbit/s through `ss-server`.
pub const SHADOWSOCKS_THROUGHPUT_MBPS_SSSERVER: &str = "shadowsocks_throughput_mbps_ssserver";
/// `shadowsocks_throughput_vs_ssserver`: the first over the second (target ≥ 1.0).
pub const SHADOWSOCKS_THROUGHPUT_VS_SSSERVER: &str = "shadowsocks_throughput_vs_ssserver";
/// `shadowsocks_key_lookup_us_1`: µs to try 1 key.
pub const SHADOWSOCKS_KEY_LOOKUP_US_1: &str = "shadowsocks_key_lookup_us_1";
/// `shadowsocks_key_lookup_us_100`: µs to try 100 keys.
pub const SHADOWSOCKS_KEY_LOOKUP_US_100: &str = "shadowsocks_key_lookup_us_100";
/// `shadowsocks_key_lookup_us_1000`: µs to try 1000 keys.
pub const SHADOWSOCKS_KEY_LOOKUP_US_1000: &str = "shadowsocks_key_lookup_us_1000";

/// This module's figures.
pub const NAMES: &[&str] = &[
    SHADOWSOCKS_THROUGHPUT_MBPS_CAPYBARA,
    SHADOWSOCKS_THROUGHPUT_MBPS_SSSERVER,
    SHADOWSOCKS_THROUGHPUT_VS_SSSERVER,
    SHADOWSOCKS_KEY_LOOKUP_US_1,
    SHADOWSOCKS_KEY_LOOKUP_US_100,
    SHADOWSOCKS_KEY_LOOKUP_US_1000,
];

/// Rounds of each server (alternating).
pub const ROUNDS: usize = 5;
/// The file fetched per round, MiB.
pub const FILE_MB: usize = 128;
/// Lookups per key-trial figure.
pub const LOOKUPS: usize = 200;
/// The names of the endpoint's runtime threads.
const ENDPOINT_THREADS: &str = "ss-endpoint";
/// The cipher of the throughput comparison (see the module docs for why).
const CIPHER: &str = "chacha20-ietf-poly1305";
/// The users' passwords (the second one's is the client's).
const PASSWORDS: [&str; 3] = ["bench user one", "bench user two", "bench user three"];

/// Runs the benchmarks that are selected.
pub fn run(sel: &Selection) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    if sel.wants_any(&NAMES[3..]) {
        figures.extend(key_lookup());
    }
    if sel.wants_any(&NAMES[..3]) {
        // The endpoint on a runtime of its own (its threads' CPU is the endpoint's), the file
        // server and the SOCKS5 client on another.
        let endpoint_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(ENDPOINT_THREADS)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ss-bench")
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let (ours, theirs) = rt.block_on(throughput(endpoint_rt.handle()))?;
        figures.extend([
            Figure {
                name: SHADOWSOCKS_THROUGHPUT_MBPS_CAPYBARA,
                value: ours,
                unit: "Mbit/s",
            },
            Figure {
                name: SHADOWSOCKS_THROUGHPUT_MBPS_SSSERVER,
                value: theirs,
                unit: "Mbit/s",
            },
            Figure {
                name: SHADOWSOCKS_THROUGHPUT_VS_SSSERVER,
                value: ours / theirs,
                unit: "ratio",
            },
        ]);
    }
    Ok(figures.into_iter().filter(|f| sel.wants(f.name)).collect())
}

fn identity(id: u32) -> Identity {
    Identity {
        id,
        user: UserName::parse("user", &format!("bench{id}")).expect("a user name"),
        protocol: Protocol::Shadowsocks,
    }
}

fn key_lookup() -> Vec<Figure> {
    let cipher = Cipher::Aes256Gcm;
    let keys: Vec<ShadowsocksKey> = (0..1000u32)
        .map(|i| ShadowsocksKey {
            identity: identity(i),
            key: cipher
                .key_from_password(&format!("password {i}"))
                .expect("a key"),
        })
        .collect();
    let mut first = vec![0u8; cipher.first_chunk_len()];
    StdRng::seed_from_u64(24).fill_bytes(&mut first);
    [
        (SHADOWSOCKS_KEY_LOOKUP_US_1, 1),
        (SHADOWSOCKS_KEY_LOOKUP_US_100, 100),
        (SHADOWSOCKS_KEY_LOOKUP_US_1000, 1000),
    ]
    .into_iter()
    .map(|(name, n)| {
        let us: Vec<f64> = (0..LOOKUPS)
            .map(|_| {
                let t = Instant::now();
                let found = find_key(cipher, std::hint::black_box(&first), &keys[..n]);
                let us = t.elapsed().as_secs_f64() * 1e6;
                assert_eq!(found, None, "a random first chunk opened");
                us
            })
            .collect();
        let value = median(&us);
        progress!("shadowsocks key trial: {n} keys in {value:.1} µs");
        Figure {
            name,
            value,
            unit: "µs",
        }
    })
    .collect()
}

/// Medians of (ours, ss-server) Mbit/s.
async fn throughput(endpoint_rt: &tokio::runtime::Handle) -> Result<(f64, f64)> {
    let mut file = vec![0u8; FILE_MB << 20];
    StdRng::seed_from_u64(24).fill_bytes(&mut file);
    let file = Arc::new(file);
    let server = FileServer::start(Arc::clone(&file)).await?;

    let cipher: Cipher = CIPHER.parse()?;
    let keys = PASSWORDS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(ShadowsocksKey {
                identity: identity(i as u32 + 1),
                key: cipher.key_from_password(p)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (sink, mut events) = ChannelEvents::new();
    // Nobody reads them during a round: drop them as they come.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let hub = Hub {
        credentials: Arc::new(StaticUsers::shadowsocks(keys)),
        kernel: Arc::new(RecordingKernel::default()),
        events: Arc::new(sink),
        registry: Arc::new(Registry::default()),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let ours_addr = listener.local_addr()?;
    let endpoint = endpoint_rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
        serve(listener, hub, Config::new(cipher)).await
    });

    let result = async {
        let theirs = ss_server(CIPHER, PASSWORDS[1])?;
        let via_ours = ss_local(ours_addr, CIPHER, PASSWORDS[1])?;
        let via_theirs = ss_local(theirs.addr, CIPHER, PASSWORDS[1])?;
        progress!(
            "shadowsocks: ss-local config {}",
            serde_json::to_string(&via_ours.config)?
        );
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let a = round_mbps(&via_ours, None, server.addr, &file).await?;
            progress!(
                "shadowsocks round {round}: capybara {:.0} Mbit/s (ss-local {:.2} cores, endpoint {:.2})",
                a.mbps,
                a.client_cores,
                a.server_cores
            );
            let b = round_mbps(&via_theirs, Some(&theirs), server.addr, &file).await?;
            progress!(
                "shadowsocks round {round}: ss-server {:.0} Mbit/s (ss-local {:.2} cores, ss-server {:.2})",
                b.mbps,
                b.client_cores,
                b.server_cores
            );
            ours.push(a.mbps);
            base.push(b.mbps);
        }
        Ok::<_, anyhow::Error>((median(&ours), median(&base)))
    }
    .await;
    endpoint.abort();
    result
}

struct Round {
    mbps: f64,
    client_cores: f64,
    server_cores: f64,
}

/// One fetch of the file through `client`; `server` is `ss-server` (else the in-process
/// endpoint, whose CPU is its runtime's threads).
async fn round_mbps(
    client: &SsProcess,
    server: Option<&SsProcess>,
    target: SocketAddr,
    file: &[u8],
) -> Result<Round> {
    let server_cpu = || match server {
        Some(p) => cpu::process(p.pid()),
        None => cpu::threads(ENDPOINT_THREADS).map(|(t, _)| t),
    };
    let (c0, s0) = (cpu::process(client.pid())?, server_cpu()?);
    let start = Instant::now();
    let mut s = socks5_connect(client.addr, target).await?;
    let got = tokio::time::timeout(Duration::from_secs(120), fetch(&mut s))
        .await
        .context("a round over 120 s")??;
    let wall = start.elapsed().as_secs_f64();
    let (c1, s1) = (cpu::process(client.pid())?, server_cpu()?);
    if got.len() != file.len() || got != file {
        bail!(
            "the file arrived altered ({} of {} bytes)",
            got.len(),
            file.len()
        );
    }
    Ok(Round {
        mbps: file.len() as f64 * 8.0 / wall / 1e6,
        client_cores: (c1 - c0).as_secs_f64() / wall,
        server_cores: (s1 - s0).as_secs_f64() / wall,
    })
}
