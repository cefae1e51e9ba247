//! The `capybara-agent` command line: every flag, its default and its help text. The library
//! owns it (not the binary) so that `cargo xtask install` can generate the man page and the
//! shell completions from it.

use std::path::PathBuf;

use clap::Parser;

use crate::{daemon, paths};

/// The Capybara WireGuard server agent.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Uplink interface for the XDP guard (the interface clients reach the server on).
    #[arg(long)]
    pub uplink: Option<String>,
    /// Name of the tunnel device the agent creates.
    #[arg(long, default_value = "capy0")]
    pub tunnel: String,
    /// The server's inner IPv4 address on the tunnel, with prefix length: devices get the
    /// other hosts of this subnet. The default /15 (10.70.0.0–10.71.255.255) holds 131 069
    /// devices, as many as the agent has peer ids, and is outside the subnets home routers,
    /// Docker, Kubernetes, CGNAT/Tailscale and the big clouds use by default.
    #[arg(long, default_value = daemon::DEFAULT_TUNNEL_IPV4)]
    pub tunnel_ipv4: String,
    /// The server's inner IPv6 address on the tunnel, with prefix length (a device gets the
    /// same host offset as in the IPv4 subnet).
    #[arg(long, default_value = daemon::DEFAULT_TUNNEL_IPV6)]
    pub tunnel_ipv6: String,
    /// WireGuard UDP listen port.
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// Tunnel workers per direction (1–256; default: one per CPU this process may use): each
    /// has its own UDP socket on the listen port (SO_REUSEPORT), its own TUN queue and two
    /// threads, and the kernel spreads peers across them by their UDP 4-tuple.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=crate::tunnel::MAX_WORKERS as i64))]
    pub tunnel_workers: Option<u16>,
    /// Data directory (the embedded store lives under it).
    #[arg(long, default_value = paths::DATA_DIR)]
    pub data_dir: PathBuf,
    /// bpffs directory for pinned maps and links.
    #[arg(long = "bpffs", default_value = paths::BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Run in the named network namespace (`/run/netns/NAME`) while keeping the host's mount
    /// namespace, so the pins stay on the host's bpffs (`ip netns exec` would mount a new one).
    #[arg(long)]
    pub netns: Option<String>,
    /// Detach the kernel programs on exit instead of leaving them enforcing.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Directory of the WireGuard UAPI socket `<tunnel>.sock` (what `wg show` reads).
    #[arg(long, default_value = paths::WG_UAPI_DIR)]
    pub wg_uapi_dir: PathBuf,
    /// TCP address of the gRPC API, e.g. 0.0.0.0:7443 (every call needs a bearer token).
    /// Without --api-tls-cert/--api-tls-key only a loopback address is accepted, unless
    /// --insecure is given.
    #[arg(long)]
    pub api_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP, no token) on this address, e.g.
    /// 127.0.0.1:9464. Only a loopback address is accepted unless --insecure is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Users with metric series of their own (the most bytes); the rest are summed as one
    /// `_other` series.
    #[arg(long, default_value_t = crate::metrics::DEFAULT_TOP_USERS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(0..=crate::metrics::MAX_TOP_USERS as u64))]
    pub metrics_top_users: usize,
    /// Allow --api-listen on a non-loopback address without TLS: bearer tokens then cross the
    /// network in clear text (logged as a warning at start).
    #[arg(long)]
    pub insecure: bool,
    /// The control socket (root only, no token).
    #[arg(long, default_value = paths::SOCKET_PATH)]
    pub api_socket: PathBuf,
    /// Serve no control socket.
    #[arg(long, conflicts_with = "api_socket")]
    pub no_api_socket: bool,
    /// The server's endpoint written into client configs (host:port); default: this host's
    /// name and the listen port.
    #[arg(long)]
    pub public_endpoint: Option<String>,
    /// DNS server written into client configs (repeatable).
    #[arg(long)]
    pub dns: Vec<std::net::IpAddr>,
    /// Keep generated client private keys, encrypted, so `user config` can show them again.
    #[arg(long)]
    pub keep_client_keys: bool,
    /// Leave kernel peers the store does not know in the pinned maps (by default they are
    /// removed at start, their counters logged).
    #[arg(long)]
    pub keep_unknown_peers: bool,
    /// TLS certificate chain (PEM) for the TCP API.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the TCP API.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Country database (.mmdb) for `geo block/allow`: MaxMind's GeoLite2/GeoIP2-Country or
    /// ip-location-db's geo-whois-asn-country layout. Default: /var/cache/capybara/geoip/geo-whois-asn-country.mmdb
    /// (installed by `cargo xtask setup`) when that file exists.
    #[arg(long, value_name = "FILE")]
    pub geoip_db: Option<PathBuf>,
    /// A connected peer with no handshake and no traffic for this long is disconnected (its
    /// session ends as `idle`), e.g. 180s, 5m.
    #[arg(long, default_value = "180s")]
    pub disconnect_timeout: String,
    /// Keep sessions and auth attempts this long, e.g. 90d (pruned at start and hourly).
    #[arg(long, default_value = "90d")]
    pub history_retention: String,
    /// Keep audit records this long, e.g. 365d (pruned at start and hourly).
    #[arg(long, default_value = "365d")]
    pub audit_retention: String,
    /// Failed handshakes from one source prefix (/24, /64) within
    /// `--suspicious-auth-window` that raise `suspicious-activity`.
    #[arg(long, default_value_t = crate::service::alerts::DEFAULT_AUTH_THRESHOLD)]
    pub suspicious_auth_threshold: u64,
    /// The window of `--suspicious-auth-threshold`, e.g. 60s.
    #[arg(long, default_value = "60s")]
    pub suspicious_auth_window: String,
    /// Seconds with new flows of one device refused at its flow limit within
    /// `--suspicious-flow-window` that raise `suspicious-activity` (a flow-limit storm).
    #[arg(long, default_value_t = crate::service::alerts::DEFAULT_FLOW_THRESHOLD)]
    pub suspicious_flow_threshold: u64,
    /// The window of `--suspicious-flow-threshold`, e.g. 60s.
    #[arg(long, default_value = "60s")]
    pub suspicious_flow_window: String,
    /// How often the health watcher checks the components (`server-down` / `server-up`),
    /// e.g. 5s.
    #[arg(long, default_value = "5s")]
    pub health_interval: String,
    /// Directory of the backups the agent writes itself (`capybara backup create` without
    /// --output, scheduled backups; `--keep N` rotates them); created mode 0700. Default:
    /// <data-dir>/backups.
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Let every webhook reach loopback, private and link-local addresses (by default only a
    /// webhook added with `--allow-private` may: server-side request forgery).
    #[arg(long)]
    pub webhook_allow_private: bool,
    /// SMTP server for one-time codes by e-mail: smtp://host[:port] (STARTTLS required, port
    /// 587 by default) or smtps://host[:port] (implicit TLS, 465).
    #[arg(long, value_name = "URL", requires = "mfa_smtp_from")]
    pub mfa_smtp: Option<String>,
    /// The sender of the e-mailed codes, e.g. "VPN <vpn@example.org>".
    #[arg(long, value_name = "ADDRESS", requires = "mfa_smtp")]
    pub mfa_smtp_from: Option<String>,
    /// A file (mode 0600) whose first line is the SMTP login, user:password.
    #[arg(long, value_name = "FILE", requires = "mfa_smtp")]
    pub mfa_smtp_credentials: Option<PathBuf>,
    /// A PEM CA certificate to trust for the SMTP server besides the Mozilla roots (a private
    /// CA).
    #[arg(long, value_name = "FILE", requires = "mfa_smtp")]
    pub mfa_smtp_ca: Option<PathBuf>,
    /// SMS gateway webhook for one-time codes by SMS: a POST of {"to","text"} signed the
    /// Standard Webhooks way (loopback and private addresses only with
    /// --webhook-allow-private).
    #[arg(long, value_name = "URL", requires = "mfa_sms_secret")]
    pub mfa_sms_webhook: Option<String>,
    /// A file (mode 0600) holding the whsec_ secret the SMS webhook is signed with.
    #[arg(long, value_name = "FILE", requires = "mfa_sms_webhook")]
    pub mfa_sms_secret: Option<PathBuf>,
    /// TCP port of the MFA verification page on the server's tunnel addresses: a device held as
    /// mfa-pending reaches it there and nothing else.
    #[arg(long, default_value_t = crate::service::mfa::DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub mfa_port: u16,
    /// How long a good MFA code admits a device (the end of its session ends it earlier), e.g.
    /// 12h. After it the kernel holds the device as mfa-pending again by itself.
    #[arg(long, default_value = "12h")]
    pub mfa_lifetime: String,
    /// How long too many wrong MFA codes (5 in 5 min of a device, 10 in 15 min of a user) lock
    /// the device or the user, e.g. 15m.
    #[arg(long, default_value = "15m")]
    pub mfa_lock: String,
    /// Score sources by their failed handshakes, flow-limit hits and gate drops and block those
    /// over --reputation-threshold in the `auto` source list (the engine is off without it
    /// until `ip-intel enable`).
    #[arg(long)]
    pub reputation: bool,
    /// The score (in bad handshakes' worth; it halves every 10 minutes) at which a source is
    /// auto-blocked.
    #[arg(long, default_value_t = crate::service::reputation::DEFAULT_THRESHOLD)]
    pub reputation_threshold: u32,
    /// How long an auto-block lasts, e.g. 1h, 30m.
    #[arg(long, default_value = "1h")]
    pub reputation_ttl: String,
    /// Join the etcd cluster at these client URLs (comma-separated, e.g.
    /// http://10.0.0.1:2379,http://10.0.0.2:2379): the agent is a node of the cluster, holding a
    /// lease and publishing itself and its load (`capybara cluster status`). Without it the
    /// agent runs alone.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// The node's lease TTL, e.g. 10s: a node that dies leaves the cluster within it.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub cluster_ttl: String,
    /// TLS to etcd: the CA certificate (PEM) that signed the members' certificates; the
    /// `--etcd` URLs are then https://.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This node's client certificate (PEM) for members that require one (with --etcd-key).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// This node is in the cluster's failover group: while elected primary (and `capybara
    /// cluster failover enable` is in force) it holds this service address, e.g.
    /// 10.0.0.100/24, on --failover-interface. The group's nodes share the server key.
    #[arg(long, value_name = "ADDRESS/PREFIX", requires_all = ["etcd", "failover_interface"])]
    pub failover_address: Option<String>,
    /// The interface that holds --failover-address (the uplink).
    #[arg(long, value_name = "IFACE", requires = "failover_address")]
    pub failover_interface: Option<String>,
    /// Serve Shadowsocks (AEAD; TCP, and UDP relayed on the same port) on this address, e.g.
    /// 0.0.0.0:8388: users given the
    /// `shadowsocks` protocol connect here (their configs name its port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub shadowsocks_listen: Option<std::net::SocketAddr>,
    /// The Shadowsocks cipher: 2022-blake3-aes-256-gcm, 2022-blake3-aes-128-gcm,
    /// 2022-blake3-chacha20-poly1305, aes-256-gcm, aes-128-gcm or chacha20-ietf-poly1305 (the
    /// SIP004 ones for clients without the 2022 edition, e.g. shadowsocks-libev). Users'
    /// credentials serve every cipher: changing it changes their configs, not their keys.
    #[arg(long, value_name = "CIPHER", default_value = "2022-blake3-aes-256-gcm",
          value_parser = |s: &str| s.parse::<crate::service::proxies::ShadowsocksCipher>().map_err(|e| e.to_string()))]
    pub shadowsocks_cipher: crate::service::proxies::ShadowsocksCipher,
    /// Serve VLESS over TLS on this address, e.g. 0.0.0.0:8443: users given the `vless`
    /// protocol connect here.
    #[arg(long, value_name = "ADDR:PORT")]
    pub vless_listen: Option<std::net::SocketAddr>,
    /// The VLESS endpoint's TLS certificate chain (PEM); without it the agent generates a
    /// self-signed certificate, which the client configs pin.
    #[arg(long, value_name = "FILE", requires = "vless_key")]
    pub vless_cert: Option<PathBuf>,
    /// The private key (PEM) of --vless-cert.
    #[arg(long, value_name = "FILE", requires = "vless_cert")]
    pub vless_key: Option<PathBuf>,
    /// The TLS server name VLESS clients send (and a generated certificate is made for);
    /// default: the host of --public-endpoint.
    #[arg(long, value_name = "NAME")]
    pub vless_sni: Option<String>,
    /// Configuration file (TOML): every key is one of these flags, its name with `_` for `-`
    /// (`listen_port = 51820`); a flag given here overrides the key. The default file is read
    /// only when it exists; a file named here must exist.
    #[arg(long, value_name = "FILE", default_value = paths::CONFIG_FILE)]
    pub config: PathBuf,
}

impl Args {
    /// The proxy endpoints' settings for the service (`service::proxies::Proxies::configure`),
    /// without the VLESS certificate (the daemon fills `cert_pem` / `cert_sha256` once it
    /// loaded or generated it).
    pub fn proxy_settings(&self) -> crate::service::proxies::ProxySettings {
        use crate::service::proxies::{ProxySettings, ShadowsocksEndpoint, VlessEndpoint};
        ProxySettings {
            shadowsocks: self.shadowsocks_listen.map(|listen| ShadowsocksEndpoint {
                listen,
                cipher: self.shadowsocks_cipher,
            }),
            vless: self.vless_listen.map(|listen| VlessEndpoint {
                listen,
                sni: self.vless_sni.clone(),
                cert_pem: None,
                cert_sha256: None,
            }),
        }
    }
}
