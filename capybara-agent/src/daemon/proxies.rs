//! The proxy endpoints in the agent (`crate::proxy`): Shadowsocks (TCP, and its UDP relay on the
//! same port) on `--shadowsocks-listen`,
//! VLESS over TLS on `--vless-listen`, each given the same [`Hub`]: the service's credentials
//! (`service::proxies`), the dataplane's socket binder (the cgroup programs attached to the
//! agent's own cgroup, `dataplane::sockets`), the session recorder (`service::history`) and the
//! core's connection registry (what `kick` and removals cut).
//!
//! Started after the service opened and the recorder runs; stopped first at shutdown (its open
//! connections are cut, so the recorder closes their sessions).
//! With neither endpoint configured nothing is attached or bound; the settings still reach the
//! service, so `user protocol add` names the missing flag.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::{DaemonError, events::ProxyEvents};
use crate::{
    dataplane::Dataplane,
    proxy::{
        Hub,
        registry::CutCause,
        shadowsocks,
        tls::{CertSource, EndpointCert},
        vless,
    },
    service::{
        Service,
        history::{EndReason, RecorderSender, SessionEvent},
        proxies::ProxySettings,
    },
};

/// The endpoints' settings at start.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    /// Where each endpoint listens, the cipher, the SNI (`Args::proxy_settings`).
    pub settings: ProxySettings,
    /// The VLESS certificate and key files (`--vless-cert`, `--vless-key`); `None`: a
    /// self-signed one made once and kept in the data dir.
    pub vless_cert: Option<(PathBuf, PathBuf)>,
}

/// The running endpoints.
pub(super) struct Endpoints {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The cgroup2 mount the agent made for the socket programs, if it made one.
    mounted: Option<PathBuf>,
}

impl Endpoints {
    /// Stops accepting, cuts every open proxied connection, and unmounts the agent's own
    /// cgroup2 mount (the programs' links hold the cgroup, not the mount).
    pub(super) async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(dir) = self.mounted
            && let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
        {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot unmount the agent's cgroup2 mount");
        }
    }
}

async fn listen(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::ProxyListen { flag, addr, source })
}

/// Configures the service and starts the configured endpoints (see the module docs).
pub(super) async fn start(
    config: &super::AgentConfig,
    svc: &Arc<Service>,
    dataplane: &std::sync::Mutex<Dataplane>,
    sessions: RecorderSender,
) -> Result<Option<Endpoints>, DaemonError> {
    let mut settings = config.proxies.settings.clone();
    let (ss, vl) = (settings.shadowsocks.clone(), settings.vless.clone());
    if ss.is_none() && vl.is_none() {
        svc.proxies.configure(settings);
        return Ok(None);
    }
    let fallback = crate::paths::cgroup2_mount(&config.data_dir);
    let (binder, mounted) = {
        let mut dp = dataplane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (cgroup, mounted) = crate::dataplane::sockets::own_cgroup_or_mount(&fallback)?;
        let attached = dp.attach_sockets(&cgroup)?;
        tracing::info!(cgroup = %attached.cgroup.display(), "proxied sockets enforced by the cgroup programs");
        if let Some(uplink) = &config.uplink
            && let Err(e) = dp.shape_proxy_device(uplink)
        {
            tracing::error!(error = %e, device = %uplink, "proxied traffic leaving by the uplink is NOT shaped");
        }
        (dp.socket_binder(), mounted.then_some(fallback))
    };
    let tls = match &mut settings.vless {
        Some(v) => {
            let source = match &config.proxies.vless_cert {
                Some((cert, key)) => CertSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                None => CertSource::Generated {
                    data_dir: config.data_dir.clone(),
                    names: vec![v.sni.clone().unwrap_or_else(|| {
                        crate::service::proxies::host_of(&config.api.endpoint).to_owned()
                    })],
                },
            };
            let cert = EndpointCert::load(&source)?;
            v.cert_pem = Some(cert.chain_pem().to_owned());
            v.cert_sha256 = Some(cert.fingerprint_sha256());
            Some(cert.server_config()?)
        }
        None => None,
    };
    svc.proxies.configure(settings);
    // A kick or a removal ends the identity's session in the history at once, whether or not
    // a connection is open (a hold leaves it to go idle).
    let ended = sessions.clone();
    svc.core.proxies.on_cut(Box::new(move |id, cause| {
        let reason = match cause {
            CutCause::Kick => EndReason::Kicked,
            CutCause::Removed => EndReason::Removed,
            CutCause::Hold => return,
        };
        let at = std::time::SystemTime::now();
        ended.send(SessionEvent::ProxyEnded { id, reason, at });
    }));
    let hub = Hub {
        credentials: svc.proxies.clone(),
        kernel: Arc::new(binder),
        events: Arc::new(ProxyEvents {
            sessions,
            history: svc.history.clone(),
            reputation: svc.reputation.clone(),
        }),
        registry: svc.core.proxies.clone(),
    };
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(ep) = ss {
        let listener = listen("--shadowsocks-listen", ep.listen).await?;
        let cipher = ep.cipher;
        let udp = shadowsocks::udp::reuseport_socket(ep.listen).map_err(|source| {
            DaemonError::ProxyListen {
                flag: "--shadowsocks-listen",
                addr: ep.listen,
                source,
            }
        })?;
        tasks.push(tokio::spawn(shadowsocks::udp::serve(
            udp,
            hub.clone(),
            shadowsocks::udp::Config::new(cipher),
            stop.clone(),
        )));
        let (hub, stop) = (hub.clone(), stop.clone());
        tracing::info!(addr = %ep.listen, %cipher, "Shadowsocks endpoint listening (TCP and UDP)");
        tasks.push(tokio::spawn(async move {
            // Dropping `serve` ends the connections it serves.
            tokio::select! {
                () = shadowsocks::serve(listener, hub, shadowsocks::Config::new(cipher)) => {}
                () = stop.cancelled() => {}
            }
        }));
    }
    if let (Some(ep), Some(tls)) = (vl, tls) {
        let listener = listen("--vless-listen", ep.listen).await?;
        tracing::info!(addr = %ep.listen, "VLESS endpoint listening");
        tasks.push(tokio::spawn(vless::serve(listener, tls, hub, stop.clone())));
    }
    Ok(Some(Endpoints {
        stop,
        tasks,
        mounted,
    }))
}
