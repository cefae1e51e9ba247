//! The daemon: wires the store, the dataplane and the tunnel together and runs until shutdown.
//!
//! `run(config, shutdown)` takes its dependencies as arguments, so tests start a real agent
//! in-process; the binary only parses flags and installs the signal handler.
//!
//! Start-up order (each step logged):
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
//!    tunnel) and serve the API on the control socket and/or TCP (`ApiSettings`).
//!
//! Tunnel events feed the session recorder (`service::control::history`, a blocking thread:
//! its writes are synced) after the handshake admission; the recorder prunes the history to
//! `history_retention` at start and hourly, and closes open sessions at shutdown.
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
//! Shutdown leaves the programs enforcing (pinned links) unless `detach_on_exit` is set.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use crate::{
    api::{self, ApiError, Listeners},
    dataplane::{Dataplane, DataplaneConfig, DataplaneError, Event, EventStream},
    paths,
    service::{
        self, EndReason, Service, ServiceConfig, ServiceError, ServiceEvent, SessionEvent,
        ports::TunnelPort,
        secrets::{self, SecretError},
    },
    store::{Store, StoreError},
    tunnel::{KeyError, PrivateKey, TunnelDeviceConfig, WgConfig, WgError, WgTunnel},
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
    /// MaxMind country database for geo policies (`--geoip-db`).
    pub geo_db: Option<PathBuf>,
    /// Certificate and key (PEM files) for TLS on the TCP listener.
    pub tls: Option<(PathBuf, PathBuf)>,
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
}

/// Runs the agent until `shutdown` resolves. `on_ready` is called once everything is attached.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Running),
) -> Result<(), DaemonError> {
    let store = Store::open(&config.data_dir)?;
    tracing::info!(path = %store.path().display(), "store open");

    let mut dataplane = Dataplane::open(DataplaneConfig {
        bpffs_dir: config.bpffs_dir.clone(),
        ..DataplaneConfig::default()
    })?;
    tracing::info!(bpffs = %config.bpffs_dir.display(), "dataplane loaded, maps pinned");
    // Peers get their addresses from the tunnel's IPv4 subnet: the kernel attributes those by
    // array (a subnet larger than the pool array stays on the hash).
    let (v4, len) = config.tunnel_ipv4;
    let pool = ipnet::Ipv4Net::new(v4, len).ok().map(|n| n.trunc());
    match dataplane.set_peer_pool_v4(pool) {
        Err(e @ crate::dataplane::DataplaneError::PeerPoolTooLarge { .. }) => {
            tracing::warn!(error = %e, "peers are attributed by hash");
            dataplane.set_peer_pool_v4(None)?;
        }
        r => r?,
    }

    let snapshot = service::lists::stored_snapshot(&store)?;
    let report = dataplane.restore_lists(&snapshot)?;
    tracing::info!(
        lists = snapshot.lists.len(),
        ?report,
        "blocklists restored from the store"
    );

    let private_key = PrivateKey::load_or_generate(&crate::paths::key_file(&config.data_dir))?;
    let tunnel = Arc::new(WgTunnel::start(WgConfig {
        uapi_dir: Some(config.wg_uapi_dir.clone()),
        disconnect_after: config.disconnect_after,
        ..WgConfig::new(
            TunnelDeviceConfig {
                name: config.tunnel.clone(),
                ipv4: Some(config.tunnel_ipv4),
                ipv6: Some(config.tunnel_ipv6),
                mtu: 1420,
                offload: crate::tunnel::DEFAULT_OFFLOAD,
            },
            config.listen_port,
            private_key,
        )
    })?);
    dataplane.attach_tc(tunnel.name())?;

    dataplane.set_guard_ports(&[config.listen_port])?;
    match &config.uplink {
        Some(uplink) => {
            dataplane.attach_xdp(uplink)?;
        }
        None => tracing::warn!("no --uplink: running without the XDP guard"),
    }

    let (events, _) = tokio::sync::broadcast::channel(EVENT_BUS_CAPACITY);
    let reader = tokio::spawn(publish_events(dataplane.event_stream()?, events.clone()));

    // The control service and its API. The dataplane is shared from here on.
    let dataplane = Arc::new(Mutex::new(dataplane));
    let sealer = if config.api.keep_client_keys {
        let key = secrets::load_or_create_key(
            &paths::client_keys_key_file(&config.data_dir),
            rand::random,
        )?;
        Some(secrets::Sealer::new(&key))
    } else {
        None
    };
    let tunnel_port: Arc<dyn TunnelPort> = tunnel.clone();
    let v4 = ipnet::Ipv4Net::new(config.tunnel_ipv4.0, config.tunnel_ipv4.1)
        .expect("validated by the binary");
    let v6 = ipnet::Ipv6Net::new(config.tunnel_ipv6.0, config.tunnel_ipv6.1)
        .expect("validated by the binary");
    let svc = Arc::new(Service::open(
        Arc::new(store),
        dataplane.clone(),
        tunnel_port,
        ServiceConfig {
            server_v4: v4,
            server_v6: v6,
            server_public_key: crate::service::domain::PublicKey(*tunnel.public_key().as_bytes()),
            endpoint: config.api.endpoint.clone(),
            dns: config.api.dns.clone(),
            keep_client_keys: sealer,
            geo_db: match &config.api.geo_db {
                Some(path) => Some(Arc::new(crate::geo::GeoDb::open(path)?)),
                None => None,
            },
        },
    )?);
    svc.templates.set_listen_port(config.listen_port);
    let tcp = match config.api.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::ApiListen { addr, source })?,
        ),
        None => None,
    };
    let api_tcp = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let unix = config
        .api
        .socket
        .as_deref()
        .map(api::bind_unix)
        .transpose()?;
    let tcp_tls = config
        .api
        .tls
        .as_ref()
        .map(|(cert, key)| api::TlsIdentity::from_files(cert, key))
        .transpose()?;
    let (session_tx, session_rx) = std::sync::mpsc::channel();
    let recorder = {
        let (svc, retention) = (svc.clone(), config.history_retention);
        tokio::task::spawn_blocking(move || {
            crate::service::history::run_recorder(svc.history.clone(), session_rx, retention)
        })
    };
    let handshakes = tokio::spawn(forward_handshakes(
        tunnel.subscribe(),
        svc.clone(),
        session_tx,
    ));
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    // Without a listener the API task ends at once; that is not a failure to shut down for.
    let serving = tcp.is_some() || unix.is_some();
    let listeners = Listeners { tcp, unix, tcp_tls };
    let mut api_task = tokio::spawn(api::run(svc.clone(), listeners, async {
        let _ = api_stopped.await;
    }));

    on_ready(&Running {
        events: events.clone(),
        service_events: svc.events(),
        tunnel: tunnel.name().to_owned(),
        uplink: config.uplink.clone(),
        listen_port: config.listen_port,
        wireguard: tunnel.clone(),
        api_tcp,
    });
    let mut policy_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    policy_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(crate::dataplane::flows::SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut api_result = Ok(());
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            done = &mut api_task, if serving => {
                api_result = done.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "API task failed");
                    Ok(())
                });
                tracing::error!("the API stopped; shutting down");
                break;
            }
            _ = policy_tick.tick() => {
                // Quota periods, windows, daily online time (service::policy).
                let svc = svc.clone();
                let ticked = tokio::task::spawn_blocking(move || {
                    svc.policy.tick(std::time::SystemTime::now())
                })
                .await;
                if let Ok(Err(e)) = ticked {
                    tracing::warn!(error = %e, "policy tick failed; retrying at the next one");
                }
            }
            _ = sweep.tick() => {
                let swept = dataplane
                    .lock()
                    .unwrap()
                    .expire_flows(crate::dataplane::sys::boottime_now());
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "flow sweep failed; retrying at the next tick");
                }
            }
        }
    }
    tracing::info!(detach = config.detach_on_exit, "shutting down");
    let _ = api_stop.send(());
    if !api_task.is_finished() {
        match (&mut api_task).await {
            Ok(r) => api_result = api_result.and(r),
            Err(e) => tracing::error!(error = %e, "API task failed"),
        }
    }
    if let Some(path) = &config.api.socket {
        let _ = std::fs::remove_file(path);
    }
    handshakes.abort();
    // The forwarder's end of the channel is gone: the recorder closes the open sessions.
    let _ = handshakes.await;
    if let Err(e) = recorder.await {
        tracing::error!(error = %e, "session recorder failed");
    }
    drop(svc);
    reader.abort();
    match Arc::try_unwrap(dataplane) {
        Ok(dp) => dp
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .shutdown(config.detach_on_exit)?,
        Err(_) => {
            tracing::error!("the dataplane is still shared at shutdown; programs stay attached")
        }
    }
    drop(tunnel);
    api_result?;
    Ok(())
}

/// Reads kernel events until the stream fails, logging each and publishing it to subscribers.
async fn publish_events(mut stream: EventStream, bus: tokio::sync::broadcast::Sender<Event>) {
    loop {
        match stream.next().await {
            Ok(event) => {
                tracing::debug!(?event, "kernel event");
                // No subscriber is not an error: the event is logged above.
                let _ = bus.send(event);
            }
            Err(e) => {
                tracing::error!(error = %e, "kernel event stream failed; events are no longer read");
                return;
            }
        }
    }
}

/// Tells the service about completed handshakes (a kicked device is admitted again by its next
/// one) and hands every event to the session recorder.
async fn forward_handshakes(
    mut events: tokio::sync::broadcast::Receiver<crate::tunnel::TunnelEvent>,
    svc: Arc<Service>,
    sessions: std::sync::mpsc::Sender<SessionEvent>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(ev) => {
                match &ev {
                    crate::tunnel::TunnelEvent::Connected { public_key, .. } => {
                        let key = crate::service::domain::PublicKey(*public_key.as_bytes());
                        if let Err(e) = svc.monitor.on_handshake(&key) {
                            tracing::warn!(error = %e, "cannot admit a peer after its handshake");
                        }
                    }
                    crate::tunnel::TunnelEvent::Disconnected { public_key, at, .. } => {
                        let key = crate::service::domain::PublicKey(*public_key.as_bytes());
                        if let Err(e) = svc.policy.on_disconnect(&key, *at) {
                            tracing::warn!(
                                error = %e,
                                "cannot update the device limit after a disconnect"
                            );
                        }
                    }
                    _ => {}
                }
                // The recorder ends only after this task: a send cannot fail before.
                let _ = sessions.send(session_event(ev));
            }
            Err(RecvError::Lagged(n)) => tracing::warn!(n, "tunnel events lost"),
            Err(RecvError::Closed) => break,
        }
    }
}

/// A tunnel event in the service's terms.
fn session_event(ev: crate::tunnel::TunnelEvent) -> SessionEvent {
    use crate::tunnel::{AuthFailure, DisconnectReason, TunnelEvent};
    let key = |k: crate::tunnel::PublicKey| crate::service::domain::PublicKey(*k.as_bytes());
    match ev {
        TunnelEvent::Connected {
            public_key,
            endpoint,
            at,
        } => SessionEvent::Connected {
            key: key(public_key),
            endpoint,
            at,
        },
        TunnelEvent::Disconnected {
            public_key,
            reason,
            at,
        } => SessionEvent::Disconnected {
            key: key(public_key),
            reason: match reason {
                DisconnectReason::Timeout => EndReason::Idle,
                DisconnectReason::Kicked => EndReason::Kicked,
                DisconnectReason::Removed => EndReason::Removed,
            },
            at,
        },
        TunnelEvent::EndpointChanged { public_key, to, .. } => SessionEvent::EndpointChanged {
            key: key(public_key),
            to,
            at: std::time::SystemTime::now(),
        },
        TunnelEvent::AuthFailed {
            source,
            public_key,
            reason,
        } => SessionEvent::AuthFailed {
            source,
            key: public_key.map(key),
            reason: match reason {
                AuthFailure::UnknownKey => "unknown-key",
                AuthFailure::BadMac => "bad-mac",
                AuthFailure::Undecryptable => "undecryptable",
                AuthFailure::Rejected => "rejected",
            },
            at: std::time::SystemTime::now(),
        },
    }
}
