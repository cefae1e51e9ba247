//! `capybara-agent`: the Capybara daemon. Parses flags, installs the signal handlers and runs
//! `capybara_agent::daemon::run` until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use capybara_agent::{
    daemon::{self, AgentConfig},
    paths,
};
use clap::Parser;

/// The Capybara WireGuard server agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Uplink interface for the XDP guard (the interface clients reach the server on).
    #[arg(long)]
    uplink: Option<String>,
    /// Name of the tunnel device the agent creates.
    #[arg(long, default_value = "capy0")]
    tunnel: String,
    /// The server's inner IPv4 address on the tunnel, with prefix length: devices get the
    /// other hosts of this subnet. The default /15 (10.70.0.0–10.71.255.255) holds 131 069
    /// devices, as many as the agent has peer ids, and is outside the subnets home routers,
    /// Docker, Kubernetes, CGNAT/Tailscale and the big clouds use by default.
    #[arg(long, default_value = daemon::DEFAULT_TUNNEL_IPV4)]
    tunnel_ipv4: String,
    /// The server's inner IPv6 address on the tunnel, with prefix length (a device gets the
    /// same host offset as in the IPv4 subnet).
    #[arg(long, default_value = daemon::DEFAULT_TUNNEL_IPV6)]
    tunnel_ipv6: String,
    /// WireGuard UDP listen port.
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Data directory (the embedded store lives under it).
    #[arg(long, default_value = paths::DATA_DIR)]
    data_dir: PathBuf,
    /// bpffs directory for pinned maps and links.
    #[arg(long = "bpffs", default_value = paths::BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Run in the named network namespace (`/run/netns/NAME`) while keeping the host's mount
    /// namespace, so the pins stay on the host's bpffs (`ip netns exec` would mount a new one).
    #[arg(long)]
    netns: Option<String>,
    /// Detach the kernel programs on exit instead of leaving them enforcing.
    #[arg(long)]
    detach_on_exit: bool,
    /// Directory of the WireGuard UAPI socket `<tunnel>.sock` (what `wg show` reads).
    #[arg(long, default_value = paths::WG_UAPI_DIR)]
    wg_uapi_dir: PathBuf,
    /// TCP address of the gRPC API, e.g. 0.0.0.0:7443 (every call needs a bearer token).
    /// Without --api-tls-cert/--api-tls-key only a loopback address is accepted, unless
    /// --insecure is given.
    #[arg(long)]
    api_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP, no token) on this address, e.g.
    /// 127.0.0.1:9464. Only a loopback address is accepted unless --insecure is given.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Users with metric series of their own (the most bytes); the rest are summed as one
    /// `_other` series.
    #[arg(long, default_value_t = capybara_agent::metrics::DEFAULT_TOP_USERS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(0..=capybara_agent::metrics::MAX_TOP_USERS as u64))]
    metrics_top_users: usize,
    /// Allow --api-listen on a non-loopback address without TLS: bearer tokens then cross the
    /// network in clear text (logged as a warning at start).
    #[arg(long)]
    insecure: bool,
    /// The control socket (root only, no token).
    #[arg(long, default_value = paths::SOCKET_PATH)]
    api_socket: PathBuf,
    /// Serve no control socket.
    #[arg(long, conflicts_with = "api_socket")]
    no_api_socket: bool,
    /// The server's endpoint written into client configs (host:port); default: this host's
    /// name and the listen port.
    #[arg(long)]
    public_endpoint: Option<String>,
    /// DNS server written into client configs (repeatable).
    #[arg(long)]
    dns: Vec<std::net::IpAddr>,
    /// Keep generated client private keys, encrypted, so `user config` can show them again.
    #[arg(long)]
    keep_client_keys: bool,
    /// Leave kernel peers the store does not know in the pinned maps (by default they are
    /// removed at start, their counters logged).
    #[arg(long)]
    keep_unknown_peers: bool,
    /// TLS certificate chain (PEM) for the TCP API.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the TCP API.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Country database (.mmdb) for `geo block/allow`: MaxMind's GeoLite2/GeoIP2-Country or
    /// ip-location-db's geo-whois-asn-country layout. Default: /var/cache/capybara/geoip/geo-whois-asn-country.mmdb
    /// (installed by `cargo xtask setup`) when that file exists.
    #[arg(long, value_name = "FILE")]
    geoip_db: Option<PathBuf>,
    /// A connected peer with no handshake and no traffic for this long is disconnected (its
    /// session ends as `idle`), e.g. 180s, 5m.
    #[arg(long, default_value = "180s")]
    disconnect_timeout: String,
    /// Keep sessions and auth attempts this long, e.g. 90d (pruned at start and hourly).
    #[arg(long, default_value = "90d")]
    history_retention: String,
    /// Keep audit records this long, e.g. 365d (pruned at start and hourly).
    #[arg(long, default_value = "365d")]
    audit_retention: String,
}

/// An interface address `a.b.c.d/len`: the host part may be set (it is the server's address).
fn iface_addr(field: &str, s: &str) -> anyhow::Result<ipnet::IpNet> {
    s.parse()
        .with_context(|| format!("--{field}: {s:?} is not ADDRESS/PREFIX_LEN"))
}

fn main() -> anyhow::Result<()> {
    capybara_agent::logging::install();
    let args = Args::parse();
    if let Some(name) = &args.netns {
        // Before the runtime starts: setns(2) moves only the calling thread, and every thread
        // spawned afterwards inherits it.
        let path = PathBuf::from("/run/netns").join(name);
        let ns = std::fs::File::open(&path)
            .with_context(|| format!("--netns: cannot open {}", path.display()))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("--netns: cannot enter {}", path.display()))?;
    }
    let ipnet::IpNet::V4(v4) = iface_addr("tunnel-ipv4", &args.tunnel_ipv4)? else {
        anyhow::bail!(
            "--tunnel-ipv4: {:?} is not an IPv4 address",
            args.tunnel_ipv4
        );
    };
    let ipnet::IpNet::V6(v6) = iface_addr("tunnel-ipv6", &args.tunnel_ipv6)? else {
        anyhow::bail!(
            "--tunnel-ipv6: {:?} is not an IPv6 address",
            args.tunnel_ipv6
        );
    };
    let duration = |field, s: &str| {
        capybara_agent::service::domain::parse_duration(field, s)
            .with_context(|| format!("--{}", field.replace('_', "-")))
    };
    let disconnect_after = duration("disconnect_timeout", &args.disconnect_timeout)?;
    let history_retention = duration("history_retention", &args.history_retention)?;
    let audit_retention = duration("audit_retention", &args.audit_retention)?;
    let config = AgentConfig {
        disconnect_after,
        history_retention,
        audit_retention,
        keep_unknown_peers: args.keep_unknown_peers,
        metrics: daemon::MetricsSettings {
            listen: args.metrics_listen,
            config: capybara_agent::metrics::MetricsConfig {
                top_users: args.metrics_top_users,
            },
        },
        uplink: args.uplink,
        tunnel: args.tunnel,
        tunnel_ipv4: (v4.addr(), v4.prefix_len()),
        tunnel_ipv6: (v6.addr(), v6.prefix_len()),
        listen_port: args.listen_port,
        data_dir: args.data_dir,
        bpffs_dir: args.bpffs_dir,
        detach_on_exit: args.detach_on_exit,
        wg_uapi_dir: args.wg_uapi_dir,
        api: daemon::ApiSettings {
            listen: args.api_listen,
            socket: (!args.no_api_socket).then_some(args.api_socket),
            endpoint: args.public_endpoint.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".into());
                format!("{host}:{}", args.listen_port)
            }),
            dns: args.dns.iter().map(ToString::to_string).collect(),
            keep_client_keys: args.keep_client_keys,
            geo_db: daemon::geo_db_path(args.geoip_db, std::path::Path::new(paths::GEOIP_DB)),
            tls: args.api_tls_cert.zip(args.api_tls_key),
            insecure: args.insecure,
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                _ = term.recv() => tracing::info!("SIGTERM"),
            }
        };
        daemon::run(config, shutdown, |r| {
            tracing::info!(
                tunnel = %r.tunnel,
                uplink = r.uplink.as_deref().unwrap_or("-"),
                port = r.listen_port,
                api = %r.api_tcp.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                metrics = %r.metrics_tcp.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                "capybara-agent ready"
            );
        })
        .await
    })?;
    Ok(())
}
