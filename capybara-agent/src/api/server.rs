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
//! | read | `ListUsers`, `GetUser`, `ListPeers`, `GetStats`, `ListConnections`, `ListAudit`, `ListBlocklists`, `GetBlocklist`, `GetGeo`, `ListSessions`, `ListComponents`, health, reflection |
//! | write | `AddUser`, `RemoveUser`, `ExpireUser`, `RenewUser`, `CleanupExpired`, `AddPeer`, `RemovePeer`, `Kick`, `AddEntries`, `RemoveEntries`, `DeleteBlocklist`, `SetGeo` |
//! | admin | `UserConfig` (it hands out a device's private key: the kept one, audited as `peer.config`, or a new one with `rotate`), `CreateToken`, `ListTokens`, `RevokeToken`, `ClearHistory`, `CreateBackup` |
//!
//! `AddUser` and `AddPeer` answer the new device's private key once, to the caller that made it;
//! only `UserConfig` hands out the key of a device that exists already, so it needs admin.
//!
//! The `Policy` service's scopes are listed in [`super::policy`], those of `History` and `Backup` in [`super::history`] and
//! [`super::backup`].
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

use capybara_proto::v1::{
    audit_server::AuditServer, backup_server::BackupServer, blocklists_server::BlocklistsServer,
    components_server::ComponentsServer, connections_server::ConnectionsServer,
    geo_server::GeoServer, history_server::HistoryServer, peers_server::PeersServer,
    policy_server::PolicyServer, stats_server::StatsServer, templates_server::TemplatesServer,
    tokens_server::TokensServer, users_server::UsersServer,
};
use tonic::{Request, transport::server::Router};

use super::{
    convert::MAX_DOCUMENT_MESSAGE,
    handler::{Api, authorize},
};
use crate::service::{Service, domain::Scope};

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

/// The router with every call timed for the metrics (`crate::metrics::grpc`).
type TimedRouter = Router<
    tower::layer::util::Stack<crate::metrics::grpc::CallLayer, tower::layer::util::Identity>,
>;

async fn router(svc: &Arc<Service>, tls: Option<&TlsIdentity>) -> Result<TimedRouter, ApiError> {
    let api = Api::new(svc.clone());
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
    super::health::publish(&reporter, svc).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(capybara_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let gate = |svc: Arc<Service>| {
        move |req: Request<()>| {
            authorize(&svc, req.metadata(), req.extensions(), Scope::Read)?;
            Ok(req)
        }
    };
    let mut server = tonic::transport::Server::builder()
        .layer(crate::metrics::grpc::CallLayer::new(svc.telemetry.clone()));
    if let Some(id) = tls {
        server =
            server.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.0.clone()))?;
    }
    let server = server
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health,
            gate(svc.clone()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            gate(svc.clone()),
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
        .add_service(BackupServer::new(api));
    Ok(server)
}

/// Serves the API on `listeners` until `shutdown` resolves, then lets in-flight calls finish.
pub async fn run(
    svc: Arc<Service>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(tcp) = listeners.tcp {
        if let Ok(a) = tcp.local_addr() {
            tracing::info!(addr = %a, tls = listeners.tcp_tls.is_some(), "API listening on TCP (bearer tokens)");
        }
        let r = router(&svc, listeners.tcp_tls.as_ref()).await?;
        let s = signal(stopped.clone());
        servers.spawn(async move {
            r.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(tcp), s)
                .await
        });
    }
    if let Some(unix) = listeners.unix {
        tracing::info!("API listening on the control socket (root by peer credentials)");
        let r = router(&svc, None).await?;
        let s = signal(stopped.clone());
        servers.spawn(async move {
            r.serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(unix), s)
                .await
        });
    }
    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = &mut shutdown, if !*stop.borrow() => {
                let _ = stop.send(true);
            }
            done = servers.join_next() => match done {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    result = Err(e.into());
                    let _ = stop.send(true);
                }
                Some(Err(join)) => {
                    tracing::error!(error = %join, "API server task failed");
                    let _ = stop.send(true);
                }
            },
        }
    }
    result
}
