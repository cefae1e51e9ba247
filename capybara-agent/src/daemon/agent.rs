//! The running agent: what [`super::start::wire`] started, the loop that runs until shutdown
//! (the policy tick every second, the flow sweep every `dataplane::flows::SWEEP_INTERVAL`), and
//! the shutdown that stops it all in order.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::{AgentConfig, DaemonError, Running};
use crate::{
    api::ApiError,
    dataplane::{Dataplane, Event},
    service::Service,
    tunnel::WgTunnel,
};

/// Everything the daemon runs, once wired.
pub(super) struct Agent {
    /// The dataplane, shared with the service.
    pub(super) dataplane: Arc<Mutex<Dataplane>>,
    /// The WireGuard tunnel.
    pub(super) tunnel: Arc<WgTunnel>,
    /// The control service.
    pub(super) svc: Arc<Service>,
    /// The kernel event bus.
    pub(super) events: tokio::sync::broadcast::Sender<Event>,
    /// The kernel event reader.
    pub(super) reader: tokio::task::JoinHandle<()>,
    /// The session recorder's thread.
    pub(super) recorder: tokio::task::JoinHandle<()>,
    /// The tunnel event forwarder.
    pub(super) handshakes: tokio::task::JoinHandle<()>,
    /// Tells the API to stop.
    pub(super) api_stop: tokio::sync::oneshot::Sender<()>,
    /// The API.
    pub(super) api_task: tokio::task::JoinHandle<Result<(), ApiError>>,
    /// Whether the API has a listener (without one its task ends at once).
    pub(super) serving: bool,
    /// The TCP API's bound address.
    pub(super) api_tcp: Option<SocketAddr>,
    /// The metrics (installed on the service whether or not they have a listener).
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// The metrics listener: its address, its stop signal and its task.
    pub(super) metrics_server: Option<MetricsServer>,
    /// The alerts thread (`service::alerts`).
    pub(super) alerts: tokio::task::JoinHandle<()>,
    /// What feeds it (kernel, tunnel and service events).
    pub(super) alert_feed: tokio::task::JoinHandle<()>,
    /// What feeds the reputation engine the kernel's events (`service::reputation`; its
    /// blocker thread ends with the engine).
    pub(super) reputation_feed: tokio::task::JoinHandle<()>,
    /// The health watcher (`server-down` / `server-up`).
    pub(super) health_watch: tokio::task::JoinHandle<()>,
    /// The usage rollups' writer thread (`service::usage`).
    pub(super) usage_writer: Option<std::thread::JoinHandle<()>>,
    /// The MFA verification page, when served.
    pub(super) mfa_page: Option<crate::verify::PageServer>,
    /// The proxy endpoints, when configured.
    pub(super) proxies: Option<super::proxies::Endpoints>,
    /// The agent's node of an etcd cluster, when it is one.
    pub(super) cluster: Option<ClusterNode>,
}

/// The tasks that hold the node's lease (`crate::cluster::Node::run`), follow the shared state
/// (`crate::cluster::state::follow`) and fence the node / hold its failover address
/// (`crate::cluster::failover::run`), and their stop.
pub(super) struct ClusterNode {
    pub(super) stop: tokio_util::sync::CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) follow: tokio::task::JoinHandle<()>,
    pub(super) fencing: tokio::task::JoinHandle<()>,
}

/// The `--metrics-listen` server.
pub(super) struct MetricsServer {
    pub(super) addr: SocketAddr,
    pub(super) stop: tokio::sync::oneshot::Sender<()>,
    pub(super) task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Agent {
    /// What the daemon reports once it is running.
    pub(super) fn running(&self, config: &AgentConfig) -> Running {
        Running {
            events: self.events.clone(),
            service_events: self.svc.events(),
            tunnel: self.tunnel.name().to_owned(),
            uplink: config.uplink.clone(),
            listen_port: config.listen_port,
            wireguard: self.tunnel.clone(),
            api_tcp: self.api_tcp,
            metrics_tcp: self.metrics_server.as_ref().map(|m| m.addr),
            metrics: self.metrics.clone(),
            mfa_page: self
                .mfa_page
                .as_ref()
                .map_or_else(Vec::new, |p| p.addrs().to_vec()),
        }
    }

    /// Runs the periodic work until `shutdown` resolves or the API stops; answers the API's
    /// result if it stopped by itself.
    pub(super) async fn serve(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ApiError> {
        let mut policy_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        policy_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(crate::dataplane::flows::SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                done = &mut self.api_task, if self.serving => {
                    let result = done.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "API task failed");
                        Ok(())
                    });
                    tracing::error!("the API stopped; shutting down");
                    return result;
                }
                _ = policy_tick.tick() => {
                    // Quota periods, windows, daily online time (service::policy).
                    let svc = self.svc.clone();
                    let ticked = tokio::task::spawn_blocking(move || {
                        svc.policy.tick(std::time::SystemTime::now())
                    })
                    .await;
                    if let Ok(Err(e)) = ticked {
                        tracing::warn!(error = %e, "policy tick failed; retrying at the next one");
                    }
                }
                _ = sweep.tick() => {
                    let swept = self
                        .dataplane
                        .lock()
                        .unwrap()
                        .expire_flows(crate::dataplane::sys::boottime_now());
                    if let Err(e) = swept {
                        tracing::warn!(error = %e, "flow sweep failed; retrying at the next tick");
                    }
                }
            }
        }
    }

    /// Stops the API, the forwarder and the recorder (which closes the open sessions), then
    /// the dataplane (programs left enforcing unless `detach_on_exit`) and the tunnel. An API
    /// that failed while stopping is returned after everything else stopped.
    pub(super) async fn shut_down(self, config: &AgentConfig) -> Result<(), DaemonError> {
        tracing::info!(detach = config.detach_on_exit, "shutting down");
        let Agent {
            dataplane,
            tunnel,
            svc,
            reader,
            recorder,
            handshakes,
            api_stop,
            mut api_task,
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
            ..
        } = self;
        reputation_feed.abort();
        let _ = reputation_feed.await;
        // The node leaves the cluster first (its lease revoked: it is gone from the list now,
        // not a TTL later).
        if let Some(c) = cluster {
            c.stop.cancel();
            let _ = c.task.await;
            let _ = c.follow.await;
            let _ = c.fencing.await;
        }
        // The page and the proxy endpoints hold the service (through its ports): they stop
        // first; the endpoints' open connections are cut.
        if let Some(page) = mfa_page {
            page.stop().await;
        }
        if let Some(p) = proxies {
            p.stop().await;
        }
        if let Some(m) = metrics_server {
            let _ = m.stop.send(());
            match m.task.await {
                Ok(Err(e)) => tracing::error!(error = %e, "metrics server failed"),
                Err(e) => tracing::error!(error = %e, "metrics server task failed"),
                Ok(Ok(())) => {}
            }
        }
        drop(metrics);
        let _ = api_stop.send(());
        let mut api_result = Ok(());
        if !api_task.is_finished() {
            match (&mut api_task).await {
                Ok(r) => api_result = r,
                Err(e) => tracing::error!(error = %e, "API task failed"),
            }
        }
        if let Some(path) = &config.api.socket {
            let _ = std::fs::remove_file(path);
        }
        // The API's shutdown stopped the scheduler; its runner lets go of the service.
        svc.schedules.stop();
        svc.schedules.join_runner().await;
        handshakes.abort();
        // The forwarder's end of the channel is gone: the recorder closes the open sessions.
        let _ = handshakes.await;
        if let Err(e) = recorder.await {
            tracing::error!(error = %e, "session recorder failed");
        }
        health_watch.abort();
        let _ = health_watch.await;
        // The feed's end of the queue is gone: the alerts thread ends.
        alert_feed.abort();
        let _ = alert_feed.await;
        if let Err(e) = alerts.await {
            tracing::error!(error = %e, "alerts thread failed");
        }
        // The usage writer takes a last sample and writes a synced checkpoint.
        svc.usage.stop_writer();
        if let Some(writer) = usage_writer {
            match tokio::task::spawn_blocking(move || writer.join()).await {
                Ok(Ok(())) => {}
                _ => tracing::error!("the usage writer failed"),
            }
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
        Ok(api_result?)
    }
}
