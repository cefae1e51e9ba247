//! The gRPC server: every `capybara.v1` service, the standard `grpc.health.v1` service and
//! server reflection, on a Unix socket and/or a TCP listener.
//!
//! ## Who may call what
//! - **Unix socket** (`paths::SOCKET_PATH`, mode 0600 in a 0750 directory): a connection whose
//!   peer credentials (`SO_PEERCRED`) say uid 0 acts as `Actor::Local { uid: 0 }` with the admin
//!   scope; no token is needed — this is how the CLI on the box bootstraps the first token. Any
//!   other uid is refused (`UNAUTHENTICATED`).
//! - **TCP**: every call, health and reflection included, needs `authorization: Bearer <token>`;
//!   with a certificate and key ([`TlsIdentity`], `--api-tls-cert/--api-tls-key`) the listener
//!   speaks TLS (rustls), so tokens never cross the network in clear text.
//!   A missing, malformed, unknown, expired or revoked token is `UNAUTHENTICATED`; a valid token
//!   whose scope is below the call's is `PERMISSION_DENIED`.
//!
//! | scope | calls |
//! |---|---|
//! | read | `ListUsers`, `GetUser`, `ListPeers`, `GetStats`, `ListConnections`, `ListAudit`, `ListBlocklists`, `GetBlocklist`, `GetGeo`, `ListSessions`, `ListComponents`, `GenerateReport`, health, reflection |
//! | write | `AddUser`, `RemoveUser`, `ExpireUser`, `RenewUser`, `CleanupExpired`, `AddProtocol` (its reply carries the new credential's config, once, to the caller that made it), `RemoveProtocol`, `AddPeer`, `RemovePeer`, `Kick`, `AddEntries`, `RemoveEntries`, `DeleteBlocklist`, `SetGeo` |
//! | admin | `UserConfig` (it hands out a device's private key: the kept one, audited as `peer.config`, or a new one with `rotate`; or a proxy identity's credential, audited as `proxy.config`), `CreateToken`, `ListTokens`, `RevokeToken`, `ClearHistory`, `CreateBackup`, `CreateBackupFile` |
//!
//! `AddUser` and `AddPeer` answer the new device's private key once, to the caller that made it;
//! only `UserConfig` hands out the key of a device that exists already, so it needs admin.
//!
//! The `Policy` service's scopes are listed in [`super::policy`], those of `History` and `Backup` in [`super::history`] and
//! [`super::backup`], those of `Schedules` in [`super::schedules`], those of `Webhooks` in
//! [`super::webhooks`], those of `Mfa` in [`super::mfa`],
//! those of `IpIntel` in [`super::intel`]; `UpdateGeoDb` needs admin (the
//! agent reads a file of the caller's choosing).
//!
//! - **In-process** (`super::inproc`): a scheduled task's command acts as `schedule:<id>` with
//!   the admin scope; only the agent itself can open such a connection.
//!
//! ## Errors
//! Each `ServiceError` variant maps to one code ([`super::status::status_of`]): invalid input is
//! `INVALID_ARGUMENT` with the field first in the message (`name: invalid name …`) and nothing
//! changed; `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION` (key not kept, token already
//! revoked), `RESOURCE_EXHAUSTED` (address pool, peer ids); store, dataplane and tunnel
//! failures are `INTERNAL` with the cause logged, not sent.
//!
//! Service calls run on the blocking pool (`spawn_blocking`): a synced RocksDB write waits for
//! the disk and must not stall the reactor.

use std::{future::Future, path::Path, sync::Arc};

use capybara_proto::v1::mfa_server::MfaServer;
use capybara_proto::v1::{
    api_access_server::ApiAccessServer, audit_server::AuditServer, backup_server::BackupServer,
    blocklists_server::BlocklistsServer, components_server::ComponentsServer,
    connections_server::ConnectionsServer, geo_server::GeoServer, history_server::HistoryServer,
    peers_server::PeersServer, policy_server::PolicyServer, reports_server::ReportsServer,
    schedules_server::SchedulesServer, stats_server::StatsServer,
    templates_server::TemplatesServer, tokens_server::TokensServer, users_server::UsersServer,
    webhooks_server::WebhooksServer,
};
use capybara_proto::v1::{cluster_server::ClusterServer, reputation_server::ReputationServer};
use tonic::{Request, transport::server::Router};

use super::{
    access::{self, Source, TcpControl},
    convert::MAX_DOCUMENT_MESSAGE,
    handler::Api,
    limits::RateLimits,
};
use crate::service::{
    Service,
    access::{ApiAccess, DEFAULT_RATE_LIMIT},
    domain::Scope,
};

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The control socket could not be created.
    #[error("cannot create the control socket {path}")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptor set.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TCP listener's address could not be read.
    #[error("the API's TCP listener")]
    Listener(#[source] std::io::Error),
    /// The TCP server could not be built (its TLS identity).
    #[error("cannot serve the TCP API: {0}")]
    Start(String),
    /// A server failed.
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS certificate or key file could not be read.
    #[error("cannot read the TLS {what} {path}")]
    TlsFile {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The certificate chain and private key (PEM) the TCP listener serves TLS with.
#[derive(Clone, Debug)]
pub struct TlsIdentity(tonic::transport::Identity);

impl TlsIdentity {
    /// From PEM bytes.
    pub fn from_pem(cert: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> TlsIdentity {
        TlsIdentity(tonic::transport::Identity::from_pem(cert, key))
    }

    /// Reads the PEM files (the key file should be mode 0600).
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsIdentity, ApiError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| ApiError::TlsFile {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(TlsIdentity::from_pem(
            read("certificate", cert)?,
            read("key", key)?,
        ))
    }
}

/// Where the API listens. Bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug, Default)]
pub struct Listeners {
    /// TCP: every call needs a bearer token.
    pub tcp: Option<tokio::net::TcpListener>,
    /// The control socket: root by peer credentials.
    pub unix: Option<tokio::net::UnixListener>,
    /// Serve TLS on the TCP listener with this identity.
    pub tcp_tls: Option<TlsIdentity>,
    /// The agent's metrics, served as `GET /metrics` on these listeners too (a read token over
    /// TCP); `None`: no `/metrics` here.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// What `capybara api status` says of `tcp` (`--api-listen` and its flags: the files, the
    /// rate limit); `None`: the listener's address, the default rate limit. Without `tcp`, the
    /// stored setting (`capybara api enable`), if any, is served.
    pub tcp_access: Option<ApiAccess>,
    /// The in-process connections of scheduled tasks (`api::inproc`; `crate::scheduler` makes
    /// them); `None`: scheduled tasks cannot run commands.
    pub in_process: Option<super::inproc::Incoming>,
}

/// Binds the control socket at `path`: creates its directory (mode 0750) if missing, replaces
/// a stale socket, and gives the socket mode 0600.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ApiError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode(crate::paths::SOCKET_DIR_MODE),
        )
        .map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(crate::paths::SOCKET_MODE),
    )
    .map_err(err)?;
    Ok(l)
}

/// The router with every gRPC call timed for the metrics (`crate::metrics::grpc`; REST calls
/// time themselves in `api::rest`).
pub(super) type TimedRouter = Router<
    tower::layer::util::Stack<crate::metrics::grpc::CallLayer, tower::layer::util::Identity>,
>;

/// The server of one listener: every gRPC service, health, reflection and the REST mirror.
pub(super) async fn router(api: &Api, tls: Option<&TlsIdentity>) -> Result<TimedRouter, ApiError> {
    let svc = &api.service();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<UsersServer<Api>>().await;
    reporter.set_serving::<PeersServer<Api>>().await;
    reporter.set_serving::<TokensServer<Api>>().await;
    reporter.set_serving::<StatsServer<Api>>().await;
    reporter.set_serving::<ConnectionsServer<Api>>().await;
    reporter.set_serving::<AuditServer<Api>>().await;
    reporter.set_serving::<BlocklistsServer<Api>>().await;
    reporter.set_serving::<GeoServer<Api>>().await;
    reporter.set_serving::<HistoryServer<Api>>().await;
    reporter.set_serving::<BackupServer<Api>>().await;
    reporter.set_serving::<ComponentsServer<Api>>().await;
    reporter.set_serving::<PolicyServer<Api>>().await;
    reporter.set_serving::<TemplatesServer<Api>>().await;
    reporter.set_serving::<ApiAccessServer<Api>>().await;
    reporter.set_serving::<SchedulesServer<Api>>().await;
    reporter.set_serving::<ReportsServer<Api>>().await;
    reporter.set_serving::<WebhooksServer<Api>>().await;
    reporter.set_serving::<MfaServer<Api>>().await;
    reporter
        .set_serving::<capybara_proto::v1::ip_intel_server::IpIntelServer<Api>>()
        .await;
    reporter.set_serving::<ReputationServer<Api>>().await;
    reporter.set_serving::<ClusterServer<Api>>().await;
    super::health::publish(&reporter, svc).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(capybara_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let gate = |api: Api| {
        move |req: Request<()>| {
            api.authorize(req.metadata(), req.extensions(), Scope::Read)?;
            Ok(req)
        }
    };
    let mut grpc = tonic::service::RoutesBuilder::default();
    grpc.add_service(tonic::service::interceptor::InterceptedService::new(
        health,
        gate(api.clone()),
    ))
    .add_service(tonic::service::interceptor::InterceptedService::new(
        reflection,
        gate(api.clone()),
    ))
    .add_service(UsersServer::new(api.clone()))
    .add_service(PeersServer::new(api.clone()))
    .add_service(TokensServer::new(api.clone()))
    .add_service(StatsServer::new(api.clone()))
    .add_service(ConnectionsServer::new(api.clone()))
    .add_service(AuditServer::new(api.clone()))
    .add_service(BlocklistsServer::new(api.clone()))
    .add_service(
        PolicyServer::new(api.clone())
            .max_decoding_message_size(MAX_DOCUMENT_MESSAGE)
            .max_encoding_message_size(MAX_DOCUMENT_MESSAGE),
    )
    .add_service(
        TemplatesServer::new(api.clone())
            .max_decoding_message_size(MAX_DOCUMENT_MESSAGE)
            .max_encoding_message_size(MAX_DOCUMENT_MESSAGE),
    )
    .add_service(GeoServer::new(api.clone()))
    .add_service(HistoryServer::new(api.clone()))
    .add_service(ComponentsServer::new(api.clone()))
    .add_service(ApiAccessServer::new(api.clone()))
    .add_service(BackupServer::new(api.clone()))
    .add_service(SchedulesServer::new(api.clone()))
    .add_service(
        ReportsServer::new(api.clone())
            .max_decoding_message_size(super::reports::MAX_REPORT_MESSAGE)
            .max_encoding_message_size(super::reports::MAX_REPORT_MESSAGE),
    )
    .add_service(WebhooksServer::new(api.clone()))
    .add_service(MfaServer::new(api.clone()))
    .add_service(capybara_proto::v1::ip_intel_server::IpIntelServer::new(
        api.clone(),
    ))
    .add_service(ReputationServer::new(api.clone()))
    .add_service(ClusterServer::new(api.clone()));
    // gRPC and the REST mirror on one listener: gRPC paths are `/capybara.v1.X/Y`, REST ones
    // `/api/v1/…`; HTTP/1.1 is accepted for REST clients.
    let all = grpc
        .routes()
        .into_axum_router()
        .merge(super::rest::router(api.clone(), api.metrics()))
        .fallback(super::rest::fallback);
    let mut server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(crate::metrics::grpc::CallLayer::new(svc.telemetry.clone()));
    if let Some(id) = tls {
        server =
            server.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.0.clone()))?;
    }
    Ok(server.add_routes(tonic::service::Routes::from(all)))
}

/// Serves the API on `listeners` until `shutdown` resolves, then lets in-flight calls finish.
/// The TCP listener can be swapped or stopped meanwhile (`ApiAccess`, [`access::TcpControl`]).
pub async fn run(
    svc: Arc<Service>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let tcp = Arc::new(TcpControl::default());
    let api = Api::new(
        svc.clone(),
        Arc::new(RateLimits::new(DEFAULT_RATE_LIMIT)),
        tcp.clone(),
        listeners.metrics.clone(),
    );
    if let Some(listener) = listeners.tcp {
        let bound = listener.local_addr().map_err(ApiError::Listener)?;
        let access = listeners.tcp_access.unwrap_or(ApiAccess {
            listen: bound,
            tls: None,
            insecure: false,
            rate_limit: DEFAULT_RATE_LIMIT,
        });
        let p = access::prepare_with(&api, listener, access, listeners.tcp_tls)
            .await
            .map_err(|st| ApiError::Start(st.message().to_owned()))?;
        tcp.start(&api, p, Source::Flag).await;
    } else {
        serve_stored(&api, &svc).await;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    if let Some(unix) = listeners.unix {
        tracing::info!("API listening on the control socket (root by peer credentials)");
        let r = router(&api, None).await?;
        let mut stopped = stopped.clone();
        servers.spawn(async move {
            let s = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            r.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(unix), s)
                .await
        });
    }
    if let Some(incoming) = listeners.in_process {
        let r = router(&api, None).await?;
        let mut stopped = stopped.clone();
        servers.spawn(async move {
            let s = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            r.serve_with_incoming_shutdown(incoming.into_stream(), s)
                .await
        });
    }
    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = &mut shutdown, if !*stop.borrow() => {
                svc.watch.stop(); // ends live watches, which would hold up the drain
                svc.schedules.stop(); // ends the scheduler's runner
                let _ = stop.send(true);
                tcp.stop().await;
                if servers.is_empty() {
                    break;
                }
            }
            done = servers.join_next(), if !servers.is_empty() => match done {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    result = Err(e.into());
                    let _ = stop.send(true);
                    tcp.stop().await;
                }
                Some(Err(join)) => {
                    tracing::error!(error = %join, "API server task failed");
                    let _ = stop.send(true);
                    tcp.stop().await;
                }
            },
        }
        if *stop.borrow() && servers.is_empty() {
            break;
        }
    }
    result
}

/// Serves the stored setting (`capybara api enable`), if any. One that no longer works (the
/// address taken, a certificate gone) is logged and left off: the agent still starts.
async fn serve_stored(api: &Api, svc: &Service) {
    let access = match svc.access.get() {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the TCP API setting; TCP API off");
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(access.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %access.listen, error = %e, "cannot listen for the TCP API (capybara api enable); TCP API off");
            return;
        }
    };
    match access::prepare(api, listener, access).await {
        Ok(p) => {
            api.tcp().start(api, p, Source::Store).await;
        }
        Err(st) => {
            tracing::error!(error = %st.message(), "cannot serve the TCP API (capybara api enable); TCP API off");
        }
    }
}
