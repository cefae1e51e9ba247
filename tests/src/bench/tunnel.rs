//! `tunnel_throughput_*`: iperf3 TCP from a `wireguard-go` client through a WireGuard server on
//! the same machine, in the same run, with three servers:
//!
//! - the agent's tunnel (`capybara_agent::tunnel::WgTunnel`, as the daemon starts it: TUN
//!   offloads as `DEFAULT_OFFLOAD` says unless `--tunnel-offload on|off`, the TC programs attached to its device and the client known as a dataplane
//!   peer, so the figure includes the kernel pipeline the agent runs);
//! - `boringtun-cli` 0.7.1 (installed by `cargo xtask setup`), the baseline the issue names;
//! - `wireguard-go` (Debian's 0.0.20220316) as a server.
//!
//! Each server runs in a fresh namespace joined by a veth pair to a fresh client namespace
//! (`wireguard-go` + `wg setconf`); iperf3's server listens on the server's inner address, its
//! client sends for `--iperf-seconds` (default 10, after one second of slow start left out;
//! `crate::iperf`) and the receiver's rate is reported. The
//! ratios divide the agent's rate by each baseline's. The client is the same program in all
//! three runs, so the ratios compare the servers; on a 2-core machine the client's own CPU
//! use caps every figure.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use capybara_agent::{
    dataplane::{Dataplane, DataplaneConfig},
    net::Cidr,
    tunnel::{PeerConfig, PrivateKey, PublicKey, TunnelDeviceConfig, WgConfig, WgTunnel},
};

use super::{
    BenchPins, Figure, Selection, TUNNEL_THROUGHPUT_BORINGTUN_CLI_MBPS, TUNNEL_THROUGHPUT_MBPS,
    TUNNEL_THROUGHPUT_VS_BORINGTUN_CLI, TUNNEL_THROUGHPUT_VS_WIREGUARD_GO,
    TUNNEL_THROUGHPUT_WIREGUARD_GO_MBPS,
};
use crate::{
    iperf::{self, IperfTcp},
    netns::{NetNs, VethPair, unique_name},
    progress,
    wg::{Implementation, WgProcess, start_tunnel},
};

/// Knobs of the tunnel benchmark.
#[derive(Debug, Clone, Copy)]
pub struct TunnelOptions {
    /// Measured seconds of each iperf3 run (after one second of slow start left out).
    pub seconds: u32,
    /// Open the agent's TUN device with offloads (the daemon uses
    /// `capybara_agent::tunnel::DEFAULT_OFFLOAD`).
    pub offload: bool,
}

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Server {
    Agent,
    Process(Implementation),
}

/// The WireGuard port of the baseline servers (inside their own namespace).
const PORT: u16 = 51820;

/// A WireGuard server of one [`Server`] kind in its namespace, knowing its peers by public key
/// and inner /32. The agent's tunnel runs in this process with the TC programs attached to its
/// device and every peer known to the dataplane (ids 1, 2, …), so a figure includes the kernel
/// pipeline the agent runs. Fields drop in order: the dataplane, then the server.
pub(super) struct BenchServer {
    pub dataplane: Option<Dataplane>,
    process: Option<WgProcess>,
    /// Held for its lifetime: the tunnel stops when it drops.
    _agent: Option<WgTunnel>,
    /// The server's public key.
    pub key: PublicKey,
    /// Its WireGuard port.
    pub port: u16,
}

impl BenchServer {
    /// Starts `server` in `ns` with the inner address `inner`/24 and `peers`; the agent's
    /// dataplane pins go to `pin_dir`, its TUN device opens with `offload`.
    pub(super) fn start(
        server: Server,
        ns: &NetNs,
        inner: Ipv4Addr,
        peers: &[(PublicKey, Ipv4Addr)],
        offload: bool,
        pin_dir: PathBuf,
    ) -> Result<BenchServer> {
        match server {
            Server::Agent => {
                let t = start_tunnel(
                    ns,
                    WgConfig {
                        uapi_dir: None,
                        ..WgConfig::new(
                            TunnelDeviceConfig {
                                name: unique_name("bw"),
                                ipv4: Some((inner, 24)),
                                ipv6: None,
                                mtu: 1420,
                                offload,
                            },
                            PORT,
                            PrivateKey::generate(),
                        )
                    },
                );
                t.add_peers(
                    peers
                        .iter()
                        .map(|(key, addr)| PeerConfig {
                            public_key: *key,
                            preshared_key: None,
                            allowed_ips: vec![ipnet::Ipv4Net::from(*addr).into()],
                            persistent_keepalive: None,
                        })
                        .collect(),
                )?;
                std::fs::create_dir_all(&pin_dir)?;
                let mut dp = Dataplane::open(DataplaneConfig {
                    bpffs_dir: pin_dir,
                    tunnel_l2_hlen: 0,
                })
                .context("open the dataplane for the tunnel benchmark")?;
                ns.run(|| dp.attach_tc(t.name()))
                    .context("attach TC to the tunnel")?;
                for (i, (_, addr)) in peers.iter().enumerate() {
                    dp.add_peer(i as u32 + 1, &[Cidr::host(IpAddr::V4(*addr))])?;
                }
                Ok(BenchServer {
                    dataplane: Some(dp),
                    process: None,
                    key: t.public_key(),
                    port: t.listen_port(),
                    _agent: Some(t),
                })
            }
            Server::Process(implementation) => {
                let p = WgProcess::start(ns, implementation, "bs");
                let mut conf = format!(
                    "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\n",
                    p.private_key.to_base64()
                );
                for (key, addr) in peers {
                    conf += &format!(
                        "\n[Peer]\nPublicKey = {}\nAllowedIPs = {addr}/32\n",
                        key.to_base64()
                    );
                }
                p.setconf(&conf);
                p.up(ns, &[&format!("{inner}/24")]);
                Ok(BenchServer {
                    dataplane: None,
                    key: p.public_key(),
                    port: PORT,
                    process: Some(p),
                    _agent: None,
                })
            }
        }
    }

    /// The baseline's process id (`None` for the agent's tunnel, which runs in this process).
    pub(super) fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(WgProcess::pid)
    }
}

fn inner(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, net, 1, host)
}

/// One iperf3 run through `server`; Mbit/s at the receiver.
fn measure(server: Server, net: u8, pins: &BenchPins, opts: TunnelOptions) -> Result<f64> {
    let s = NetNs::new("bs");
    let c = NetNs::new("bc");
    let veth = VethPair::new(&s, &c, net);
    let client = WgProcess::start(&c, Implementation::WireguardGo, "bc");
    let server_v4 = inner(net + 1, 1);
    let client_v4 = inner(net + 1, 2);

    let server_ = BenchServer::start(
        server,
        &s,
        server_v4,
        &[(client.public_key(), client_v4)],
        opts.offload,
        pins.path().join(format!("tunnel{net}")),
    )?;
    let (server_key, port) = (server_.key, server_.port);
    client.set_peer(
        None,
        &server_key,
        Some(SocketAddr::new(IpAddr::V4(veth.a.v4), port)),
        &[&format!("{}/24", inner(net + 1, 0))],
        None,
    );
    client.up(&c, &[&format!("{client_v4}/24")]);

    let ok = c
        .try_exec(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &server_v4.to_string(),
        ])
        .status
        .success();
    if !ok {
        bail!("{server:?}: no ping through the tunnel");
    }
    let r = iperf::tcp(
        &c,
        &s,
        IpAddr::V4(server_v4),
        &IperfTcp {
            seconds: opts.seconds,
            ..IperfTcp::default()
        },
    );
    if let Some(dp) = &server_.dataplane {
        let st = dp.peer_stats(1)?;
        progress!(
            "agent: the kernel counted {} bytes from the client ({} skbs)",
            st.rx_bytes,
            st.rx_packets
        );
    }
    drop(server_);
    Ok(r.received_bps / 1e6)
}

/// Runs the three servers (those the selection needs) and returns the figures.
pub fn run(sel: &Selection, pins: &BenchPins, opts: TunnelOptions) -> Result<Vec<Figure>> {
    let names = [
        TUNNEL_THROUGHPUT_MBPS,
        TUNNEL_THROUGHPUT_BORINGTUN_CLI_MBPS,
        TUNNEL_THROUGHPUT_WIREGUARD_GO_MBPS,
        TUNNEL_THROUGHPUT_VS_BORINGTUN_CLI,
        TUNNEL_THROUGHPUT_VS_WIREGUARD_GO,
    ];
    if !sel.wants_any(&names) {
        return Ok(Vec::new());
    }
    let mut figures = Vec::new();
    progress!(
        "tunnel: iperf3 through the agent's tunnel ({} s)",
        opts.seconds
    );
    let agent = measure(Server::Agent, 91, pins, opts)?;
    progress!("tunnel: agent {agent:.0} Mbit/s; now boringtun-cli");
    let boringtun = measure(
        Server::Process(Implementation::BoringtunCli),
        93,
        pins,
        opts,
    )?;
    progress!("tunnel: boringtun-cli {boringtun:.0} Mbit/s; now wireguard-go");
    let wggo = measure(Server::Process(Implementation::WireguardGo), 95, pins, opts)?;
    progress!("tunnel: wireguard-go {wggo:.0} Mbit/s");
    for (name, value, unit) in [
        (TUNNEL_THROUGHPUT_MBPS, agent, "Mbit/s"),
        (TUNNEL_THROUGHPUT_BORINGTUN_CLI_MBPS, boringtun, "Mbit/s"),
        (TUNNEL_THROUGHPUT_WIREGUARD_GO_MBPS, wggo, "Mbit/s"),
        (
            TUNNEL_THROUGHPUT_VS_BORINGTUN_CLI,
            agent / boringtun,
            "ratio",
        ),
        (TUNNEL_THROUGHPUT_VS_WIREGUARD_GO, agent / wggo, "ratio"),
    ] {
        if sel.wants(name) {
            figures.push(Figure { name, value, unit });
        }
    }
    Ok(figures)
}
