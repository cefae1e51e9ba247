//! Start-up, in the order of the module docs: [`open`] the store, the dataplane (pinned maps,
//! blocklists restored) and the tunnel with the programs attached; then [`wire`] the control
//! service, the session recorder, the usage rollups' writer, the event forwarders and the API
//! to them.

use std::sync::{Arc, Mutex};

use super::{
    AgentConfig, DaemonError, EVENT_BUS_CAPACITY,
    agent::Agent,
    events::{forward_alerts, forward_handshakes, publish_events},
};
use crate::{
    api::{self, Listeners},
    dataplane::{Dataplane, DataplaneConfig, DataplaneError},
    paths,
    service::{self, Service, ServiceConfig, ports::TunnelPort, secrets},
    store::Store,
    tunnel::{PrivateKey, TunnelDeviceConfig, WgConfig, WgTunnel},
};

/// The store, the dataplane and the tunnel, open and attached.
pub(super) struct Opened {
    store: Store,
    dataplane: Dataplane,
    tunnel: Arc<WgTunnel>,
}

/// Opens the store and the dataplane, restores the blocklists, starts the tunnel and attaches
/// the TC programs to it and the XDP guard to the uplink.
pub(super) fn open(config: &AgentConfig) -> Result<Opened, DaemonError> {
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
        Err(e @ DataplaneError::PeerPoolTooLarge { .. }) => {
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

    let private_key = PrivateKey::load_or_generate(&paths::key_file(&config.data_dir))?;
    let tunnel = Arc::new(WgTunnel::start(WgConfig {
        // A failover group's node listens on the service address only (replies leave from it).
        listen_address: config
            .cluster
            .as_ref()
            .and_then(|c| c.failover.as_ref())
            .map(|f| std::net::IpAddr::V4(f.address)),
        uapi_dir: Some(config.wg_uapi_dir.clone()),
        disconnect_after: config.disconnect_after,
        workers: config.tunnel_workers,
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
    // The MFA verification page: devices held at the gate reach the server's tunnel addresses
    // on this TCP port and nothing else.
    dataplane.set_verification_endpoint(
        &[
            std::net::IpAddr::V4(config.tunnel_ipv4.0),
            std::net::IpAddr::V6(config.tunnel_ipv6.0),
        ],
        &[(crate::dataplane::L4Proto::Tcp, config.mfa.port)],
    )?;

    // The XDP guard admits sources to the WireGuard port and to the proxy endpoints' ports
    // alike (blocklists, geo rules): Shadowsocks's for TCP and its UDP relay.
    let (udp_ports, tcp_ports) = {
        let p = &config.proxies.settings;
        let ss = p.shadowsocks.as_ref().map(|e| e.listen.port());
        let udp: Vec<u16> = std::iter::once(config.listen_port).chain(ss).collect();
        let tcp: Vec<u16> = ss
            .into_iter()
            .chain(p.vless.as_ref().map(|e| e.listen.port()))
            .collect();
        (udp, tcp)
    };
    dataplane.set_guard_ports(&udp_ports, &tcp_ports)?;
    match &config.uplink {
        Some(uplink) => {
            dataplane.attach_xdp(uplink)?;
        }
        None => tracing::warn!("no --uplink: running without the XDP guard"),
    }
    Ok(Opened {
        store,
        dataplane,
        tunnel,
    })
}

/// Starts the kernel event reader, opens the control service over the store, the (now shared)
/// dataplane and the tunnel, and starts the session recorder, the tunnel event forwarder and
/// the API.
pub(super) async fn wire(config: &AgentConfig, opened: Opened) -> Result<Agent, DaemonError> {
    let Opened {
        store,
        mut dataplane,
        tunnel,
    } = opened;
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
            server_public_key: service::domain::PublicKey(*tunnel.public_key().as_bytes()),
            endpoint: config.api.endpoint.clone(),
            dns: config.api.dns.clone(),
            keep_client_keys: sealer,
            geo_db: match &config.api.geo_db {
                Some(path) => {
                    let db = crate::geo::GeoDb::open(path)?;
                    tracing::info!(
                        path = %path.display(),
                        database_type = %db.database_type,
                        countries = db.per_country.len(),
                        "country database opened"
                    );
                    Some(Arc::new(db))
                }
                None => {
                    tracing::info!("no country database (--geoip-db): geo policies unavailable");
                    None
                }
            },
            keep_unknown_peers: config.keep_unknown_peers,
        },
    )?);
    svc.templates.set_listen_port(config.listen_port);
    if let Some(dir) = &config.backup_dir {
        svc.backup.set_dir(dir.clone());
    }
    svc.webhooks
        .set_allow_private_everywhere(config.webhook_allow_private);
    // MFA (`service::mfa`): its lifetime and lock, and the code channels it sends through.
    // The verification page's server (below) is handed `svc.mfa` as its `VerificationPort`.
    svc.mfa.configure(config.mfa.config);
    if let Some(channels) = &config.mfa_page.channels {
        svc.mfa.set_sender(channels.clone());
    }
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
    service::core::prune_audit_at_start_and_hourly(&svc.core, config.audit_retention)?;
    let (session_tx, session_rx) = service::history::recorder_channel(service::history::AUTH_QUEUE);
    svc.health.count_auth_drops(session_tx.auth_drop_counter());
    let recorder = {
        let (history, retention) = (svc.history.clone(), config.history_retention);
        tokio::task::spawn_blocking(move || {
            service::history::run_recorder(history, session_rx, retention)
        })
    };
    let usage_writer = match service::usage::start_writer(svc.usage.clone()) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the usage writer; usage is not recorded");
            None
        }
    };
    let proxies = super::proxies::start(config, &svc, &dataplane, session_tx.clone()).await?;
    let handshakes = tokio::spawn(forward_handshakes(
        tunnel.subscribe(),
        svc.clone(),
        session_tx,
    ));
    // Webhook events from watching (`service::alerts`): their own thread, fed without waiting.
    svc.alerts
        .configure(config.alerts)
        .map_err(|e| DaemonError::Service(e.into()))?;
    let (alert_tx, alert_rx) = service::alerts::alert_channel();
    let alerts = {
        let alerts = svc.alerts.clone();
        tokio::task::spawn_blocking(move || service::alerts::run_alerts(alerts, alert_rx))
    };
    let alert_feed = tokio::spawn(forward_alerts(
        events.subscribe(),
        tunnel.subscribe(),
        svc.events().subscribe(),
        alert_tx,
    ));
    // The reputation engine: scored on `wg-udp` (the hook) and from kernel events, blocks made
    // by its own thread (`service::reputation`).
    svc.reputation
        .configure(config.reputation.threshold, config.reputation.ttl)
        .map_err(|e| DaemonError::Service(e.into()))?;
    // The engine follows `ip-intel enable|disable` (set by `service::intel`); `--reputation`
    // turns it on at start whatever the switch says.
    if config.reputation.enabled {
        svc.reputation.set_enabled(true);
    }
    {
        let rep = Arc::downgrade(&svc.reputation);
        tunnel.set_failure_hook(Box::new(move |ip, reason| {
            if let Some(rep) = rep.upgrade() {
                rep.on_event(ip, super::events::reputation_part(reason));
            }
        }));
    }
    if let Err(e) = service::reputation::start(&svc.reputation) {
        tracing::error!(error = %e, "cannot start the reputation thread; sources are not auto-blocked");
    }
    let reputation_feed = tokio::spawn(super::events::forward_reputation(
        events.subscribe(),
        svc.reputation.clone(),
    ));
    svc.health.watch_links(service::health::Links {
        tunnel: tunnel.name().to_owned(),
        uplink: config.uplink.clone(),
        probe: Arc::new(crate::net::link_state),
    });
    // IP intelligence's reload schedule and the watched country database (each task holds its
    // feature weakly and ends with it).
    service::intel::runner::spawn(&svc.intel);
    service::geo::spawn_watch(&svc.geo);
    let health_watch = tokio::spawn(super::events::watch_health(
        Arc::downgrade(&svc),
        config.health_interval,
    ));
    let metrics = crate::metrics::Metrics::install(&svc, config.metrics.config);
    let metrics_server = match config.metrics.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::MetricsListen { addr, source })?;
            let addr = listener.local_addr().unwrap_or(addr);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(crate::metrics::serve(listener, metrics.clone(), async {
                let _ = stopped.await;
            }));
            Some(super::agent::MetricsServer { addr, stop, task })
        }
        None => None,
    };
    // The MFA verification page on the tunnel addresses and the port the gate lets held devices
    // reach (`--mfa-port`), asking `service::mfa` (or the port the settings give instead).
    let verification: Arc<dyn crate::service::verification::VerificationPort> =
        match &config.mfa_page.verification {
            Some(port) => port.clone(),
            None => svc.mfa.clone(),
        };
    // A port taken by another server (a web server on 0.0.0.0:80) does not stop the agent: the
    // agent ran without a page before MFA existed, and users without MFA need none. It is
    // logged as an error naming the flag; devices held for MFA cannot verify until it is fixed.
    let mfa_page = match crate::verify::PageServer::start(
        verification,
        &[v4.addr().into(), v6.addr().into()],
        config.mfa.port,
        config.mfa_page.limits,
    ) {
        Ok(page) => {
            tracing::info!(addrs = ?page.addrs(), "MFA verification page served");
            Some(page)
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                source = %std::error::Error::source(&e).map_or_else(String::new, ToString::to_string),
                "the MFA verification page is NOT served: devices held for MFA cannot verify; \
                 free the port or choose another with --mfa-port"
            );
            None
        }
    };
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    // Without a listener the API task ends at once; that is not a failure to shut down for.
    // With a stored TCP setting (`capybara api enable`) the API serves without either.
    let serving = tcp.is_some() || unix.is_some() || svc.access.get()?.is_some();
    let tcp_access = api_tcp.map(|listen| service::access::ApiAccess {
        listen,
        tls: config.api.tls.clone(),
        insecure: config.api.insecure,
        rate_limit: service::access::DEFAULT_RATE_LIMIT,
    });
    let listeners = Listeners {
        tcp,
        unix,
        tcp_tls,
        tcp_access,
        metrics: Some(metrics.clone()),
        in_process: Some(crate::scheduler::start(&svc)),
    };
    let api_task = tokio::spawn(api::run(svc.clone(), listeners, async {
        let _ = api_stopped.await;
    }));
    let cluster = match &config.cluster {
        Some(c) => Some(join_cluster(c, &svc, &tunnel).await?),
        None => None,
    };
    Ok(Agent {
        dataplane,
        tunnel,
        svc,
        events,
        reader,
        recorder,
        handshakes,
        api_stop,
        api_task,
        serving,
        api_tcp,
        metrics,
        metrics_server,
        alerts,
        alert_feed,
        reputation_feed,
        health_watch,
        usage_writer,
        mfa_page,
        proxies,
        cluster,
    })
}

/// Makes the agent a node of the etcd cluster of `config` (`crate::cluster`): holds its lease
/// and publishes it, with its devices online as its load, until the agent stops. An etcd that
/// does not answer yet is retried; the agent serves meanwhile.
async fn join_cluster(
    config: &crate::cluster::ClusterConfig,
    svc: &Arc<Service>,
    tunnel: &Arc<WgTunnel>,
) -> Result<super::agent::ClusterNode, DaemonError> {
    let weak = Arc::downgrade(svc);
    let online = Box::new(move || {
        weak.upgrade().map_or(0, |svc| {
            let n = svc
                .core
                .tunnel
                .peers()
                .iter()
                .filter(|p| p.connected)
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        })
    });
    let weak = Arc::downgrade(svc);
    let applied = Box::new(move || {
        weak.upgrade()
            .map_or(0, |svc| svc.core.store.shared_revision())
    });
    let node = crate::cluster::Node::connect(config.clone(), online, applied)
        .await
        .map_err(DaemonError::Cluster)?;
    svc.cluster.set_node(node.clone());
    // From here on a change of shared records reaches etcd before this node's store.
    svc.core
        .store
        .replicate_through(Arc::new(crate::cluster::state::Replication::new(
            node.clone(),
            tokio::runtime::Handle::current(),
        )));
    let stop = tokio_util::sync::CancellationToken::new();
    tracing::info!(node = %config.node, endpoints = ?config.endpoints, prefix = %config.prefix, "joining the cluster");
    let applier: Arc<dyn crate::cluster::state::Applier> = svc.clone();
    let follow = tokio::spawn(crate::cluster::state::follow(
        node.clone(),
        applier,
        stop.clone(),
    ));
    // Fencing and failover: no new sessions without a live lease (none until the first one is
    // granted), the service address while elected.
    let t = Arc::downgrade(tunnel);
    let admit = Box::new(move |admitting: bool| {
        if let Some(t) = t.upgrade() {
            t.set_admitting(admitting);
        }
    });
    let (weak, me) = (Arc::downgrade(svc), config.node.clone());
    let took_over_from = Box::new(move |old: &str| {
        let Some(svc) = weak.upgrade() else { return };
        let mut n = service::notify::Notification::new(service::notify::NotifyKind::ServerDown);
        n.data = serde_json::json!({
            "component": "cluster",
            "node": old,
            "detail": format!("the failover primary {old} lost its lease; {me} took the service address"),
        });
        if let Err(e) = svc.core.notify(n) {
            tracing::error!(error = %e, "cannot raise server-down for the lost primary");
        }
    });
    let fencing = tokio::spawn(crate::cluster::failover::run(
        node.clone(),
        config.failover.clone(),
        node.failover.clone(),
        crate::cluster::failover::Hooks {
            admit,
            took_over_from,
        },
        stop.clone(),
    ));
    let task = tokio::spawn(node.run(stop.clone()));
    Ok(super::agent::ClusterNode {
        stop,
        task,
        follow,
        fencing,
    })
}
