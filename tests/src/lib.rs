//! Support for the privileged tests and the benchmarks (root required; not a default member).
//!
//! - [`netns`], [`tunwire`], [`traffic`], [`iperf`]: namespaces, veth pairs, TUN "wires", bpffs
//!   dirs as RAII guards that clean up even on panic, and real UDP/TCP traffic between namespaces.
//! - [`wg`]: wireguard-go / boringtun-cli interfaces driven by `wg`, the agent's tunnel in a
//!   namespace, `wg show` parsed.
//! - [`agent_proc`]: the agent's binaries built for a test and `capybara-agent` started in a
//!   namespace until ready; [`lab`]: the agent in a namespace with a client namespace, driven
//!   by the CLI.
//! - [`bpf`], [`packets`]: BPF_PROG_TEST_RUN fixtures and packet builders (shared with the
//!   benchmarks).
//! - [`auth_flood`]: the agent flooded with failed handshakes from spoofed sources (the
//!   `e2e_auth_flood` test and the `auth_flood_*` benchmarks).
//! - [`receivers`]: webhook receivers on loopback (a Python one verifying signatures with the
//!   `standardwebhooks` package, a fast in-process one, a dead one).
//! - [`smtp_sink`]: a local SMTP sink speaking STARTTLS (aiosmtpd) with a test CA, collecting
//!   the messages (the e-mail code channel).
//! - [`browser`]: headless Chromium over the W3C WebDriver protocol (chromedriver), in this
//!   namespace or a test's.
//! - [`rest`]: a client of the agent's REST mirror (the `api_rest` tests and the REST bench).
//! - [`loadgen`], [`cpu`]: a WireGuard load generator that is not the bottleneck (real
//!   handshakes, pre-encrypted full-MTU datagrams) and the CPU accounting of `/proc` it reports
//!   with (the `tunnel_cpu_*` benchmarks).
//! - [`v2ray`]: Debian's `v2ray` as a VLESS-over-TLS client (SOCKS inbound) or server, and a
//!   SOCKS5 connect (the `e2e_vless` test and the `vless_throughput_*` benchmark).
//! - [`shadowsocks`]: Debian's `ss-local` / `ss-server` on loopback, a SOCKS5 client, a file
//!   server, and test doubles of the agent's proxy ports (issue 24).
//! - [`origin`]: a TCP origin in a namespace serving a file or an endless stream (what proxied
//!   and tunnelled downloads fetch in the end-to-end tests).
//! - [`proxied`]: the agent with its Shadowsocks and VLESS endpoints and alice's three real
//!   clients (`e2e_proxies`, the `multi_protocol_quota_*` benchmark).
//! - [`socks`]: a SOCKS5 client (through `ss-local` and v2ray); [`free_port`].
//! - [`ca`]: a throw-away CA issuing server and client certificates (`openssl`).
//! - [`cluster`]: a LAN with a three-member etcd cluster and agents as its nodes (issue 25).
//! - [`bench`]: the benchmarks behind `cargo xtask bench` (binary `capybara-bench`).

pub mod agent_proc;
pub mod auth_flood;
pub mod browser;
pub mod ca;
pub mod cluster;
pub mod cpu;
pub mod iperf;
pub mod lab;
pub mod loadgen;
pub mod netns;
pub mod origin;
pub mod proxied;
pub mod receivers;
pub mod rest;
pub mod shadowsocks;
pub mod smtp_sink;
pub mod socks;
pub mod traffic;
pub mod tunwire;
pub mod wg;

// BPF_PROG_TEST_RUN fixtures (packet builders and the loaded-object fixture).
pub mod bpf;
pub mod packets;

// Benchmarks run by the `capybara-bench` binary (`cargo xtask bench`).
pub mod bench;

// Issue 24, the VLESS endpoint: Debian's v2ray as client and reference server.
pub mod v2ray;

/// A free loopback TCP port (bound, read, released: another process could take it in between,
/// which a loopback-only test on this machine accepts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
