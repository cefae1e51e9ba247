//! The daemon: wires the store, the dataplane and the tunnel together and runs until shutdown.
//!
//! `run(config, shutdown)` takes its dependencies as arguments, so tests start a real agent
//! in-process; the binary only parses flags and installs the signal handler.
//!
//! Start-up order (each step logged):
//! 0. check the API's TCP listener ([`ApiSettings::check_listener`]): without TLS only on a
//!    loopback address, unless `insecure` (`--insecure`, then a warning is logged); refused
//!    before anything is opened;
//! 1. open the store (data dir, mode 0700);
//! 2. open the dataplane: load the programs, re-use the pinned maps (counters continue);
//! 3. restore the named blocklists from the store — written to the kernel only when the pinned
//!    generation does not already hold them, so a restart never opens a gap;
//! 4. start the WireGuard tunnel (`tunnel::WgTunnel`: TUN device, UDP `listen_port`, the server
//!    key from `<data>/server.key`, generated at mode 0600 on first start, UAPI socket for
//!    `wg show`) and attach the TC programs to its device;
//! 5. attach the XDP guard to the uplink (swapping the program inside the pinned link if a
//!    previous agent left one) and guard the WireGuard listen port;
//! 6. open the control service (programs every stored device into the dataplane and the
//!    tunnel), install the metrics on it (`crate::metrics`: the API's call timer, the store's
//!    write timer, the scrape-time collector) and serve them on `--metrics-listen` if given
//!    ([`MetricsSettings`]: loopback unless `insecure`, checked with the API's listener before
//!    anything is opened), and serve the API on the control socket and/or TCP (`ApiSettings`).
//!
//! Tunnel events feed the session recorder (`service::history`, a blocking thread: session
//! writes are synced, auth reports go through a bounded queue and unsynced batches) after the
//! handshake admission; the recorder prunes the history to
//! `history_retention` at start and hourly, and closes open sessions at shutdown. The audit
//! trail is pruned to `audit_retention` at start and hourly (`service::core::prune_audit_at_start_and_hourly`).
//!
//! Kernel events (ring buffer) are decoded by one task and published on a broadcast channel
//! ([`Running::events`]); history, webhooks and the API subscribe to it. A subscriber that falls
//! behind loses the oldest events (logged), it never slows the reader down. The service's own
//! events (`config-changed` after every mutation: `service::events`) are on a second bus,
//! [`Running::service_events`].
//!
//! Every second the daemon runs the policy tick (quota periods, time windows, daily online
//! time: `service::policy`); the tunnel's connect and disconnect events feed the device limit.
//!
//! Until shutdown the daemon sweeps expired flows every `dataplane::flows::SWEEP_INTERVAL`
//! (5 s): the kernel never deletes an idle flow itself, so this is what frees the slots of
//! idle flows (a failed sweep is logged and retried at the next tick).
//!
//! The daemon serves the MFA verification page (`crate::verify`, asking `service::mfa`) on the
//! tunnel's IPv4 and IPv6 addresses on `--mfa-port` (the port the gate's verification endpoint
//! `CAPY_GATE_ALLOW` opens to held devices), started after the tunnel is up and stopped first at
//! shutdown (a port it cannot bind is logged as an error, the agent runs on without the page);
//! the code channels (`--mfa-smtp…`, `--mfa-sms…`) are handed to `service::mfa`.
//!
//! Shutdown leaves the programs enforcing (pinned links) unless `detach_on_exit` is set.
//!
//! The Shadowsocks and VLESS endpoints (`--shadowsocks-listen`, `--vless-listen`) start once
//! the recorder runs, with the cgroup programs attached to the agent's cgroup (`proxies`).
//!
//! Files: `start` (open and wire, in the order above), `agent` (the running agent: its loop and
//! its shutdown), `events` (kernel events onto their bus, tunnel and proxy events to the service
//! and the recorder), `proxies` (the proxy endpoints).

mod agent;
pub mod args;
pub mod config_file;
mod events;
mod proxies;
mod start;

pub use proxies::ProxyConfig;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    api::ApiError,
    dataplane::{DataplaneError, Event},
    service::{ServiceError, ServiceEvent, secrets::SecretError},
    store::StoreError,
    tunnel::{KeyError, WgError, WgTunnel},
};

/// The control API's listeners and what goes into client configs.
#[derive(Clone, Debug, Default)]
pub struct ApiSettings {
    /// TCP address of the API (every call needs a bearer token); `None` = no TCP listener.
    pub listen: Option<SocketAddr>,
    /// The control socket (root by peer credentials); `None` = no socket.
    pub socket: Option<PathBuf>,
    /// `host:port` written into client configs as the server's endpoint.
    pub endpoint: String,
    /// DNS servers written into client configs.
    pub dns: Vec<String>,
    /// Keep generated client private keys, sealed (`--keep-client-keys`).
    pub keep_client_keys: bool,
    /// The country database for geo policies (`--geoip-db`, else the installed default:
    /// [`geo_db_path`]).
    pub geo_db: Option<PathBuf>,
    /// Certificate and key (PEM files) for TLS on the TCP listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allow the TCP listener on a non-loopback address without TLS (`--insecure`): see
    /// [`ApiSettings::check_listener`].
    pub insecure: bool,
}

/// The default `--tunnel-ipv4`: the server's address and the subnet devices get their addresses
/// from. A /15 holds 131 069 devices, as many as the dataplane has peer ids
/// (`capybara_common::peer::MAX_PEERS`, 131 072), so a default install never runs out before the
/// kernel maps do (a /24 ran out at the 254th `user add`).
///
/// Why `10.70.0.0/15` (10.70.0.0–10.71.255.255): it is private (RFC 1918) and outside the
/// defaults a client or the server is likely to sit on already: home and office routers
/// (192.168.0/1.x, 10.0.0.x, 10.0.1.x, 10.1.x, 10.10.x), Docker (172.17–31.x and its
/// 192.168.x pools), CGNAT and Tailscale/NetBird/Firezone (100.64.0.0/10), Kubernetes
/// (services 10.96.0.0/12, flannel 10.244/16, k3s 10.42–43/16, Weave 10.32.0.0/12, Calico
/// 192.168/16), other VPNs (OpenVPN and wg-easy 10.8.0.x, PiVPN 10.6.0.x, Algo 10.48–49/16),
/// clouds (AWS default VPC 172.31/16, Azure and Hetzner 10.0/16, GCP auto mode 10.128.0.0/9)
/// and podman (10.88/16). A network that does use it: give `--tunnel-ipv4` another subnet
/// (devices keep the addresses they were given, so choose it before adding users, or widen
/// the current one).
pub const DEFAULT_TUNNEL_IPV4: &str = "10.70.0.1/15";
/// The default `--tunnel-ipv6`: a /64 of the ULA range; a device gets the host offset of its
/// IPv4 address in it, so it never runs out before the IPv4 subnet does.
pub const DEFAULT_TUNNEL_IPV6: &str = "fd99::1/64";

/// The country database the agent opens at start: `explicit` (`--geoip-db FILE`) when given
/// (a missing or bad file then stops the start, naming it), else `default`
/// ([`paths::GEOIP_DB`](crate::paths::GEOIP_DB), where `cargo xtask setup` installs the CC0
/// ip-location-db database) when that file exists, else none: geo policies are then refused
/// with a message saying how to get one (`ServiceError::NoGeoDb`).
pub fn geo_db_path(explicit: Option<PathBuf>, default: &std::path::Path) -> Option<PathBuf> {
    explicit.or_else(|| default.is_file().then(|| default.to_owned()))
}

/// What [`ApiSettings::check_listener`] found the TCP listener to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerCheck {
    /// No TCP listener, or one that is safe as configured (TLS, or a loopback address).
    Safe,
    /// Plain TCP on a network address, allowed by `insecure`: the daemon logs a loud warning.
    Insecure(SocketAddr),
}

impl ApiSettings {
    /// The rule for the TCP API listener, checked by [`run`] before anything is opened: without
    /// TLS it may listen only on a loopback address (127.0.0.0/8, `::1`, and `::ffff:127.x.y.z`),
    /// because every call carries a bearer token (and some return keys) that would otherwise
    /// cross the network in clear text. Any other address (`0.0.0.0` and `::` included) without
    /// TLS is refused ([`DaemonError::PlainApiListener`]) unless `insecure` is set.
    pub fn check_listener(&self) -> Result<ListenerCheck, DaemonError> {
        let Some(addr) = self.listen else {
            return Ok(ListenerCheck::Safe);
        };
        if self.tls.is_some() || crate::net::is_loopback(addr) {
            Ok(ListenerCheck::Safe)
        } else if self.insecure {
            Ok(ListenerCheck::Insecure(addr))
        } else {
            Err(DaemonError::PlainApiListener { addr })
        }
    }
}

/// The Prometheus metrics (`crate::metrics`): where `GET /metrics` is served and how many users
/// get series of their own.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsSettings {
    /// `--metrics-listen`: plain HTTP, a loopback address unless `ApiSettings::insecure`
    /// ([`crate::metrics::check_listener`]); `None` = not served on a listener of its own.
    pub listen: Option<SocketAddr>,
    /// The series (`--metrics-top-users`).
    pub config: crate::metrics::MetricsConfig,
}

/// The MFA verification page (`crate::verify`) and the one-time-code channels.
#[derive(Clone, Default)]
pub struct MfaPageSettings {
    /// What the page asks instead of `service::mfa` (tests); `None`: the service's `Mfa`.
    pub verification: Option<Arc<dyn crate::service::verification::VerificationPort>>,
    /// The configured code channels (`--mfa-smtp…`, `--mfa-sms…`), for `service::mfa`.
    pub channels: Option<Arc<crate::verify::senders::Channels>>,
    /// The page server's bounds.
    pub limits: crate::verify::Limits,
}

impl std::fmt::Debug for MfaPageSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MfaPageSettings")
            .field("verification", &self.verification.is_some())
            .field("channels", &self.channels)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Everything the daemon needs to start.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Uplink interface for the XDP guard; `None` runs without a guard (logged).
    pub uplink: Option<String>,
    /// Tunnel device name.
    pub tunnel: String,
    /// The server's inner IPv4 address on the tunnel.
    pub tunnel_ipv4: (Ipv4Addr, u8),
    /// The server's inner IPv6 address on the tunnel.
    pub tunnel_ipv6: (Ipv6Addr, u8),
    /// WireGuard UDP listen port (guarded by the XDP program).
    pub listen_port: u16,
    /// Tunnel workers per direction (`--tunnel-workers`, default one per CPU).
    pub tunnel_workers: usize,
    /// Data directory (the store lives under it).
    pub data_dir: PathBuf,
    /// bpffs directory for pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// Detach the programs on shutdown instead of leaving them enforcing.
    pub detach_on_exit: bool,
    /// Directory of the WireGuard UAPI socket (`paths::WG_UAPI_DIR`, where `wg` looks).
    pub wg_uapi_dir: PathBuf,
    /// The control API.
    pub api: ApiSettings,
    /// A connected peer with no handshake and no traffic for this long is disconnected (its
    /// session ends as `idle`); `--disconnect-timeout`, default 180 s.
    pub disconnect_after: std::time::Duration,
    /// Sessions and auth attempts older than this are pruned (at start and hourly);
    /// `--history-retention`, default 90 days.
    pub history_retention: std::time::Duration,
    /// Audit records older than this are pruned (at start and hourly); `--audit-retention`,
    /// default 365 days.
    pub audit_retention: std::time::Duration,
    /// Leave kernel peers the store does not know in place at start instead of removing them
    /// (`--keep-unknown-peers`).
    pub keep_unknown_peers: bool,
    /// The metrics.
    pub metrics: MetricsSettings,
    /// The thresholds of `suspicious-activity` (`--suspicious-*`).
    pub alerts: crate::service::alerts::AlertConfig,
    /// How often the health watcher checks the components (`--health-interval`, default 5 s).
    pub health_interval: std::time::Duration,
    /// Where the agent writes the backups it keeps itself (`--backup-dir`); `None`:
    /// `<data dir>/backups` (`paths::backup_dir`).
    pub backup_dir: Option<PathBuf>,
    /// Every webhook may reach private and loopback addresses (`--webhook-allow-private`).
    pub webhook_allow_private: bool,
    /// The MFA verification page and the code channels (`--mfa-*`).
    pub mfa_page: MfaPageSettings,
    /// MFA: the verification page's port (`--mfa-port`), the admission lifetime and the lock
    /// (`--mfa-lifetime`, `--mfa-lock`).
    pub mfa: MfaSettings,
    /// The reputation engine (`--reputation*`).
    pub reputation: ReputationSettings,
    /// The Shadowsocks and VLESS endpoints (`--shadowsocks-*`, `--vless-*`).
    pub proxies: ProxyConfig,
    /// The etcd cluster this agent is a node of (`--etcd`, `--node-name`, …); `None`: a single
    /// agent.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The daemon's MFA settings.
#[derive(Clone, Copy, Debug)]
pub struct MfaSettings {
    /// TCP port of the verification page on the server's tunnel addresses, reachable by held
    /// devices (`CAPY_GATE_ALLOW`).
    pub port: u16,
    /// The lifetime of an admission and the lock after failed codes.
    pub config: crate::service::mfa::MfaConfig,
}

/// The reputation engine's settings at start (`service::reputation`).
#[derive(Clone, Copy, Debug)]
pub struct ReputationSettings {
    /// On at start (`--reputation`).
    pub enabled: bool,
    /// The threshold in bad handshakes' worth (`--reputation-threshold`, default 20).
    pub threshold: u32,
    /// How long a block lasts (`--reputation-ttl`, default 1 h).
    pub ttl: std::time::Duration,
}

impl Default for ReputationSettings {
    fn default() -> Self {
        ReputationSettings {
            enabled: false,
            threshold: crate::service::reputation::DEFAULT_THRESHOLD,
            ttl: crate::service::reputation::DEFAULT_TTL,
        }
    }
}

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The dataplane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The WireGuard tunnel failed to start.
    #[error(transparent)]
    Tunnel(#[from] WgError),
    /// The server key could not be loaded or created.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A key file failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The control service could not start.
    #[error("control service")]
    Service(#[from] ServiceError),
    /// The API could not listen or failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The country database could not be read.
    #[error(transparent)]
    Geo(#[from] crate::geo::GeoDbError),
    /// A TCP API on a non-loopback address without TLS, and no `insecure`
    /// ([`ApiSettings::check_listener`]).
    #[error(
        "--api-listen {addr}: refusing to serve the API without TLS on a non-loopback address \
         (bearer tokens would cross the network in clear text); give --api-tls-cert and \
         --api-tls-key, or --insecure to allow it anyway"
    )]
    PlainApiListener {
        /// The address.
        addr: SocketAddr,
    },
    /// `--metrics-listen` on a non-loopback address and no `insecure`.
    #[error(
        "--metrics-listen {addr}: refusing to serve the metrics (no token; they name users) on a \
         non-loopback address; use a loopback address, or --insecure to allow it anyway"
    )]
    PlainMetricsListener {
        /// The address.
        addr: SocketAddr,
    },
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr} for the metrics")]
    MetricsListen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cluster's etcd endpoints are not valid (`--etcd`).
    #[error("--etcd: {0}")]
    Cluster(#[source] crate::cluster::ClusterError),
    /// A proxy endpoint's address could not be bound.
    #[error("{flag}: cannot listen on {addr}")]
    ProxyListen {
        /// The flag naming it.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VLESS endpoint's certificate could not be loaded or made.
    #[error(transparent)]
    ProxyTls(#[from] crate::proxy::tls::TlsError),
    /// The TCP API address could not be bound.
    #[error("cannot listen on {addr} for the API")]
    ApiListen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Events buffered per subscriber before the slowest loses the oldest.
const EVENT_BUS_CAPACITY: usize = 4096;

/// What the daemon set up, reported once it is running.
#[derive(Clone, Debug)]
pub struct Running {
    /// Kernel events, decoded; `subscribe()` for a receiver.
    pub events: tokio::sync::broadcast::Sender<Event>,
    /// Service events (`config-changed` after every mutation); `subscribe()` for a receiver.
    pub service_events: tokio::sync::broadcast::Sender<ServiceEvent>,
    /// Tunnel device name.
    pub tunnel: String,
    /// Uplink with the guard, if any.
    pub uplink: Option<String>,
    /// Guarded UDP port.
    pub listen_port: u16,
    /// The WireGuard tunnel: peers, events, status.
    pub wireguard: Arc<WgTunnel>,
    /// The TCP API's bound address (the real port when `--api-listen` gave port 0).
    pub api_tcp: Option<SocketAddr>,
    /// The metrics listener's bound address (`--metrics-listen`).
    pub metrics_tcp: Option<SocketAddr>,
    /// The metrics (installed whether or not they have a listener of their own): mount
    /// `crate::metrics::router` with them on another server.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The MFA verification page's bound addresses.
    pub mfa_page: Vec<SocketAddr>,
}

/// Runs the agent until `shutdown` resolves. `on_ready` is called once everything is attached.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Running),
) -> Result<(), DaemonError> {
    if let ListenerCheck::Insecure(addr) = config.api.check_listener()? {
        tracing::warn!(
            %addr,
            "--insecure: the API listens on {addr} WITHOUT TLS: bearer tokens, and the keys some \
             calls return, cross the network in clear text; use --api-tls-cert/--api-tls-key"
        );
    }
    if let Some(addr) = config.metrics.listen {
        match crate::metrics::check_listener(addr, config.api.insecure) {
            Err(addr) => return Err(DaemonError::PlainMetricsListener { addr }),
            Ok(true) => tracing::warn!(
                %addr,
                "--insecure: the metrics (no token, user names) are served on {addr}"
            ),
            Ok(false) => {}
        }
    }
    let opened = start::open(&config)?;
    let mut agent = start::wire(&config, opened).await?;
    on_ready(&agent.running(&config));
    let api_result = agent.serve(shutdown).await;
    agent.shut_down(&config).await?;
    api_result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths;

    fn settings(listen: &str, tls: bool, insecure: bool) -> ApiSettings {
        ApiSettings {
            listen: Some(listen.parse().unwrap()),
            tls: tls.then(|| ("cert.pem".into(), "key.pem".into())),
            insecure,
            ..ApiSettings::default()
        }
    }

    /// Issue 19 item 3: a plain TCP API is refused on a network address without `--insecure`.
    #[test]
    fn plain_listener_only_on_loopback_unless_insecure() {
        assert_eq!(
            ApiSettings::default().check_listener().unwrap(),
            ListenerCheck::Safe
        );
        for loopback in [
            "127.0.0.1:7443",
            "127.8.9.10:0",
            "[::1]:7443",
            "[::ffff:127.0.0.1]:1",
        ] {
            let s = settings(loopback, false, false);
            assert_eq!(
                s.check_listener().unwrap(),
                ListenerCheck::Safe,
                "{loopback}"
            );
        }
        for network in [
            "192.0.2.1:7443",
            "0.0.0.0:7443",
            "[::]:7443",
            "[2001:db8::1]:7443",
        ] {
            let e = settings(network, false, false)
                .check_listener()
                .unwrap_err();
            assert!(
                matches!(e, DaemonError::PlainApiListener { addr } if addr.to_string() == network),
                "{network}: {e}"
            );
            let text = e.to_string();
            for needle in [
                "--api-listen",
                "--api-tls-cert",
                "--api-tls-key",
                "--insecure",
            ] {
                assert!(text.contains(needle), "{text}");
            }
            // TLS makes it safe; --insecure allows it, to be warned about.
            let tls = settings(network, true, false);
            assert_eq!(tls.check_listener().unwrap(), ListenerCheck::Safe);
            let insecure = settings(network, false, true);
            assert_eq!(
                insecure.check_listener().unwrap(),
                ListenerCheck::Insecure(network.parse().unwrap())
            );
        }
    }

    /// Issue 19: `geo block CN RU` works on an install where `cargo xtask setup` put the
    /// country database at the default path and the agent was started without `--geoip-db`.
    #[test]
    fn geo_block_works_with_the_default_database_path() {
        use crate::geo::{
            CountryCode, GeoDb,
            mmdb_writer::{MmdbWriter, Value},
        };
        use crate::service::{
            Service, ServiceConfig, ServiceError,
            domain::{Actor, PublicKey},
            geo::GeoPolicy,
            testing::{MemoryPlane, MemoryTunnel},
        };

        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("geoip").join("geo-whois-asn-country.mmdb");
        let explicit = dir.path().join("GeoLite2-Country.mmdb");
        // Nothing installed: no database (the service then says how to get one).
        assert_eq!(geo_db_path(None, &default), None);
        assert_eq!(
            geo_db_path(Some(explicit.clone()), &default),
            Some(explicit.clone())
        );

        // What setup installs: ip-location-db's layout.
        let mut w = MmdbWriter::new(6).database_type("country ipvAll");
        for (net, cc) in [
            ("1.0.0.0/24", "CN"),
            ("2.0.0.0/16", "RU"),
            ("3.0.0.0/8", "US"),
        ] {
            w.insert_value(net.parse().unwrap(), &Value::country_code(cc))
                .unwrap();
        }
        std::fs::create_dir_all(default.parent().unwrap()).unwrap();
        std::fs::write(&default, w.to_bytes()).unwrap();
        let path = geo_db_path(None, &default).expect("the installed database is found");
        assert_eq!(path, default);
        // `--geoip-db` still wins over the installed one.
        assert_eq!(
            geo_db_path(Some(explicit.clone()), &default),
            Some(explicit)
        );

        let service = |geo_db| {
            let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
            Service::open(
                std::sync::Arc::new(store),
                std::sync::Arc::new(MemoryPlane::default()),
                std::sync::Arc::new(MemoryTunnel::default()),
                ServiceConfig {
                    server_v4: "10.70.0.1/15".parse().unwrap(),
                    server_v6: "fd99::1/64".parse().unwrap(),
                    server_public_key: PublicKey([1; 32]),
                    endpoint: "vpn.example.com:51820".into(),
                    dns: Vec::new(),
                    keep_client_keys: None,
                    geo_db,
                    keep_unknown_peers: false,
                },
            )
            .unwrap()
        };
        let root = Actor::Local { uid: 0 };
        let block = GeoPolicy::Block(vec![
            CountryCode::parse("CN").unwrap(),
            CountryCode::parse("RU").unwrap(),
        ]);
        let svc = service(Some(std::sync::Arc::new(GeoDb::open(&path).unwrap())));
        let status = svc.geo.set(&root, &block).unwrap();
        let lists: Vec<(String, Vec<String>)> = status
            .lists
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.cidrs.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            lists,
            [
                ("geo:CN".to_owned(), vec!["1.0.0.0/24".to_owned()]),
                ("geo:RU".to_owned(), vec!["2.0.0.0/16".to_owned()]),
            ]
        );
        drop(svc);

        // Without a database the error says how to get one.
        let e = service(None).geo.set(&root, &block).unwrap_err();
        assert!(matches!(e, ServiceError::NoGeoDb), "{e}");
        let text = e.to_string();
        for needle in ["--geoip-db", "cargo xtask setup", paths::GEOIP_DB] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
