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
//! | read | `ListUsers`, `GetUser`, `ListPeers`, `GetStats`, `ListConnections`, `ListAudit`, `ListBlocklists`, `GetBlocklist`, `GetGeo`, `ListSessions`, health, reflection |
//! | write | `AddUser`, `RemoveUser`, `UserConfig`, `AddPeer`, `RemovePeer`, `Kick`, `AddEntries`, `RemoveEntries`, `DeleteBlocklist`, `SetGeo` |
//! | admin | `CreateToken`, `ListTokens`, `RevokeToken`, `ClearHistory`, `CreateBackup` |
//!
//! The `Policy` service's scopes are listed in [`super::policy`].
//!
//! ## Errors
//! Each `ServiceError` variant maps to one code ([`status_of`]): invalid input is
//! `INVALID_ARGUMENT` with the field first in the message (`name: invalid name …`) and nothing
//! changed; `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION` (key not kept, token already
//! revoked), `RESOURCE_EXHAUSTED` (address pool, peer ids); store, dataplane and tunnel
//! failures are `INTERNAL` with the cause logged, not sent.
//!
//! Service calls run on the blocking pool (`spawn_blocking`): a synced RocksDB write waits for
//! the disk and must not stall the reactor.

use std::{future::Future, path::Path, sync::Arc};

use capybara_proto::v1::{
    self as pb,
    audit_server::{Audit, AuditServer},
    blocklists_server::{Blocklists, BlocklistsServer},
    connections_server::{Connections, ConnectionsServer},
    geo_server::{Geo, GeoServer},
    peers_server::{Peers, PeersServer},
    stats_server::{Stats, StatsServer},
    tokens_server::{Tokens, TokensServer},
    users_server::{Users, UsersServer},
};
use tonic::{
    Request, Response, Status,
    metadata::MetadataMap,
    transport::server::{Router, UdsConnectInfo},
};

use super::domain::{cidrs, direction_from_proto, list_name, opt_device, opt_user};
use crate::service::{
    AuthError, EntriesOp, NewToken, NewUser, Service, ServiceError,
    domain::{Actor, DeviceName, Scope, TokenId, UserName, ValidationError},
    geo::GeoPolicy,
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

/// The gRPC status of a service error.
pub fn status_of(e: ServiceError) -> Status {
    match &e {
        ServiceError::Invalid(v) => Status::invalid_argument(v.to_string()),
        ServiceError::DeviceRequired { .. } => Status::invalid_argument(e.to_string()),
        ServiceError::NotFound { .. } => Status::not_found(e.to_string()),
        ServiceError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        ServiceError::KeyNotKept { .. }
        | ServiceError::AlreadyRevoked { .. }
        | ServiceError::InUse { .. }
        | ServiceError::NoGeoDb => Status::failed_precondition(e.to_string()),
        ServiceError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        ServiceError::Store(_)
        | ServiceError::Dataplane(_)
        | ServiceError::Tunnel(_)
        | ServiceError::Secret(_) => {
            tracing::error!(error = %ErrorChain(&e), "API call failed");
            Status::internal(format!("{e}; see the agent's log"))
        }
    }
}

/// The gRPC status of an authentication failure.
pub fn auth_status(e: &AuthError) -> Status {
    match e {
        AuthError::Scope { .. } => Status::permission_denied(e.to_string()),
        AuthError::Store(source) => {
            tracing::error!(error = %ErrorChain(source.as_ref()), "token lookup failed");
            Status::unavailable(e.to_string())
        }
        AuthError::Missing
        | AuthError::Invalid
        | AuthError::Expired
        | AuthError::Revoked
        | AuthError::LocalUid { .. } => Status::unauthenticated(e.to_string()),
    }
}

pub(super) fn invalid(e: ValidationError) -> Status {
    status_of(ServiceError::Invalid(e))
}

/// Displays an error with its sources.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

/// Who is calling, and may they do what needs `need`?
fn authorize(
    svc: &Service,
    metadata: &MetadataMap,
    extensions: &tonic::Extensions,
    need: Scope,
) -> Result<Actor, Status> {
    let actor = if let Some(uds) = extensions.get::<UdsConnectInfo>() {
        match uds.peer_cred.map(|c| c.uid()) {
            Some(0) => Actor::Local { uid: 0 },
            Some(uid) => return Err(auth_status(&AuthError::LocalUid { uid })),
            None => return Err(auth_status(&AuthError::Missing)),
        }
    } else {
        let header = metadata
            .get("authorization")
            .ok_or(AuthError::Missing)
            .map_err(|e| auth_status(&e))?;
        let bearer = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(AuthError::Invalid)
            .map_err(|e| auth_status(&e))?;
        svc.tokens
            .authenticate(bearer.trim())
            .map_err(|e| auth_status(&e))?
    };
    let have = actor.scope();
    if !have.allows(need) {
        return Err(auth_status(&AuthError::Scope { have, need }));
    }
    Ok(actor)
}

/// The implementation of every `capybara.v1` service.
#[derive(Clone, Debug)]
pub struct Api {
    svc: Arc<Service>,
}

impl Api {
    /// The API over `svc`.
    pub fn new(svc: Arc<Service>) -> Api {
        Api { svc }
    }

    pub(super) fn auth<T>(&self, req: &Request<T>, need: Scope) -> Result<Actor, Status> {
        authorize(&self.svc, req.metadata(), req.extensions(), need)
    }

    /// Runs `f` on the blocking pool and waits until what it wrote is on disk (the reply is
    /// the acknowledgement).
    pub(super) async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Service) -> Result<R, ServiceError> + Send + 'static,
    ) -> Result<R, Status> {
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || {
            let r = f(&svc)?;
            svc.settle()?;
            Ok(r)
        })
        .await
        .map_err(|e| Status::internal(format!("call aborted: {e}")))?
        .map_err(status_of)
    }
}

#[tonic::async_trait]
impl Users for Api {
    async fn add_user(
        &self,
        req: Request<pb::AddUserRequest>,
    ) -> Result<Response<pb::AddUserResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let new = NewUser::try_from(req.into_inner()).map_err(invalid)?;
        let (user, cfg) = self.call(move |s| s.users.add_user(&actor, new)).await?;
        Ok(Response::new(pb::AddUserResponse {
            user: Some((&user).into()),
            config: Some((&cfg).into()),
        }))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let users = self.call(|s| s.users.list_users()).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(Into::into).collect(),
        }))
    }

    async fn get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::UserDetail>, Status> {
        self.auth(&req, Scope::Read)?;
        let name = UserName::parse("name", &req.get_ref().name).map_err(invalid)?;
        let d = self.call(move |s| s.users.get_user(&name)).await?;
        Ok(Response::new((&d).into()))
    }

    async fn remove_user(
        &self,
        req: Request<pb::RemoveUserRequest>,
    ) -> Result<Response<pb::RemoveUserResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let name = UserName::parse("name", &req.get_ref().name).map_err(invalid)?;
        let d = self
            .call(move |s| s.users.remove_user(&actor, &name))
            .await?;
        Ok(Response::new(pb::RemoveUserResponse {
            removed: Some((&d).into()),
        }))
    }

    async fn user_config(
        &self,
        req: Request<pb::UserConfigRequest>,
    ) -> Result<Response<pb::UserConfigResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let name = UserName::parse("name", &r.name).map_err(invalid)?;
        let device = opt_device("device", &r.device).map_err(invalid)?;
        let cfg = self
            .call(move |s| {
                s.devices
                    .user_config(&actor, &name, device.as_ref(), r.rotate)
            })
            .await?;
        Ok(Response::new(pb::UserConfigResponse {
            config: Some((&cfg).into()),
        }))
    }
}

#[tonic::async_trait]
impl Peers for Api {
    async fn add_peer(
        &self,
        req: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::AddPeerResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let user = UserName::parse("user", &r.user).map_err(invalid)?;
        let device = DeviceName::parse("device", &r.device).map_err(invalid)?;
        let cfg = self
            .call(move |s| s.devices.add_device(&actor, &user, &device))
            .await?;
        Ok(Response::new(pb::AddPeerResponse {
            config: Some((&cfg).into()),
        }))
    }

    async fn list_peers(
        &self,
        req: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let user = opt_user("user", &req.get_ref().user).map_err(invalid)?;
        let peers = self
            .call(move |s| s.devices.list_peers(user.as_ref()))
            .await?;
        Ok(Response::new(pb::ListPeersResponse {
            peers: peers.iter().map(Into::into).collect(),
        }))
    }

    async fn remove_peer(
        &self,
        req: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let user = UserName::parse("user", &r.user).map_err(invalid)?;
        let device = DeviceName::parse("device", &r.device).map_err(invalid)?;
        let p = self
            .call(move |s| s.devices.remove_device(&actor, &user, &device))
            .await?;
        Ok(Response::new(pb::RemovePeerResponse {
            removed: Some((&p).into()),
        }))
    }
}

#[tonic::async_trait]
impl Tokens for Api {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let new = NewToken::try_from(req.into_inner()).map_err(invalid)?;
        let (token, secret) = self
            .call(move |s| s.tokens.create_token(&actor, new))
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some((&token).into()),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.auth(&req, Scope::Admin)?;
        let tokens = self.call(|s| s.tokens.list_tokens()).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(Into::into).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let id = TokenId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let t = self
            .call(move |s| s.tokens.revoke_token(&actor, &id))
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some((&t).into()),
        }))
    }
}

#[tonic::async_trait]
impl Stats for Api {
    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let user = opt_user("user", &req.get_ref().user).map_err(invalid)?;
        let st = self.call(move |s| s.monitor.stats(user.as_ref())).await?;
        Ok(Response::new((&st).into()))
    }
}

#[tonic::async_trait]
impl Connections for Api {
    async fn list_connections(
        &self,
        req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let c = self.call(|s| s.monitor.connections()).await?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: c.iter().map(Into::into).collect(),
        }))
    }

    async fn kick(
        &self,
        req: Request<pb::KickRequest>,
    ) -> Result<Response<pb::KickResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let user = UserName::parse("user", &req.get_ref().user).map_err(invalid)?;
        let peers = self.call(move |s| s.monitor.kick(&actor, &user)).await?;
        Ok(Response::new(pb::KickResponse {
            kicked: peers.iter().map(Into::into).collect(),
        }))
    }
}

#[tonic::async_trait]
impl Audit for Api {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let user = opt_user("user", &req.get_ref().user).map_err(invalid)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n as usize,
        };
        let recs = self
            .call(move |s| s.core.audit_records(user.as_ref(), limit))
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: recs.iter().map(Into::into).collect(),
        }))
    }
}

#[tonic::async_trait]
impl Blocklists for Api {
    async fn list_blocklists(
        &self,
        req: Request<pb::ListBlocklistsRequest>,
    ) -> Result<Response<pb::ListBlocklistsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let lists = self.call(|s| s.lists.blocklists()).await?;
        Ok(Response::new(pb::ListBlocklistsResponse {
            lists: lists.iter().map(Into::into).collect(),
        }))
    }

    async fn get_blocklist(
        &self,
        req: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
        let name = list_name("name", &r.name).map_err(invalid)?;
        let l = self.call(move |s| s.lists.blocklist(dir, &name)).await?;
        Ok(Response::new((&l).into()))
    }

    async fn add_entries(
        &self,
        req: Request<pb::ChangeEntriesRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        self.change(req, EntriesOp::Add).await
    }

    async fn remove_entries(
        &self,
        req: Request<pb::ChangeEntriesRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        self.change(req, EntriesOp::Remove).await
    }

    async fn delete_blocklist(
        &self,
        req: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::DeleteBlocklistResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
        let name = list_name("name", &r.name).map_err(invalid)?;
        self.call(move |s| s.lists.delete_blocklist(&actor, dir, &name))
            .await?;
        Ok(Response::new(pb::DeleteBlocklistResponse {}))
    }
}

#[tonic::async_trait]
impl Geo for Api {
    async fn get_geo(
        &self,
        req: Request<pb::GetGeoRequest>,
    ) -> Result<Response<pb::GeoStatus>, Status> {
        self.auth(&req, Scope::Read)?;
        let g = self.call(|s| s.geo.status()).await?;
        Ok(Response::new((&g).into()))
    }

    async fn set_geo(
        &self,
        req: Request<pb::SetGeoRequest>,
    ) -> Result<Response<pb::GeoStatus>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let policy = GeoPolicy::try_from(req.into_inner()).map_err(invalid)?;
        let g = self.call(move |s| s.geo.set(&actor, &policy)).await?;
        Ok(Response::new((&g).into()))
    }
}

impl Api {
    async fn change(
        &self,
        req: Request<pb::ChangeEntriesRequest>,
        op: EntriesOp,
    ) -> Result<Response<pb::Blocklist>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
        let name = list_name("name", &r.name).map_err(invalid)?;
        let entries = cidrs("cidrs", &r.cidrs).map_err(invalid)?;
        let l = self
            .call(move |s| s.lists.change_entries(&actor, dir, &name, op, &entries))
            .await?;
        Ok(Response::new((&l).into()))
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

async fn router(svc: &Arc<Service>, tls: Option<&TlsIdentity>) -> Result<Router, ApiError> {
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
    super::history::set_serving(&reporter, svc).await;
    reporter
        .set_serving::<pb::policy_server::PolicyServer<Api>>()
        .await;
    reporter
        .set_serving::<pb::templates_server::TemplatesServer<Api>>()
        .await;
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
    let mut server = tonic::transport::Server::builder();
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
        .add_service(pb::policy_server::PolicyServer::new(api.clone()))
        .add_service(pb::templates_server::TemplatesServer::new(api.clone()))
        .add_service(GeoServer::new(api.clone()));
    Ok(super::history::add_services(server, api))
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
