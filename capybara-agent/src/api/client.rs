//! The gRPC client the CLI uses: connects over the control socket (root, no token) or TCP with a
//! bearer token, and answers in domain types.

use std::path::PathBuf;

use capybara_proto::v1::{
    self as pb, audit_client::AuditClient, blocklists_client::BlocklistsClient,
    connections_client::ConnectionsClient, geo_client::GeoClient, peers_client::PeersClient,
    stats_client::StatsClient, tokens_client::TokensClient, users_client::UsersClient,
};
use tonic::{Request, Status, metadata::MetadataValue, transport::Channel};

use super::domain::{AnswerError, direction_to_proto, scope_to_proto};
use crate::{
    blocklist::Direction,
    service::{
        BlocklistView, Connection, GeoStatus, Stats,
        domain::{AuditRecord, ClientConfig, Peer, Scope, Token, User, UserDetail},
    },
};

/// Where the agent is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The control socket.
    Unix(PathBuf),
    /// `http://host:port` or `https://host:port` with a bearer token.
    Tcp {
        /// The URL.
        url: String,
        /// The bearer token (`capy_…`).
        token: Option<String>,
        /// PEM of the CA that signed the agent's certificate (needed for `https://`).
        ca_cert: Option<Vec<u8>>,
    },
}

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot connect to the agent at {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The endpoint URL is not valid.
    #[error("invalid endpoint {endpoint:?}")]
    Endpoint {
        /// The URL.
        endpoint: String,
    },
    /// An `https://` endpoint without the CA certificate to check it with.
    #[error("an https:// endpoint needs --ca-cert FILE (the CA of the agent's certificate)")]
    NoCa,
    /// The token cannot be sent as a header.
    #[error("the token contains characters that cannot be sent in a header")]
    Token,
    /// The agent answered with an error.
    #[error("{}", .0.message())]
    Status(#[from] Status),
    /// The agent's answer does not make sense.
    #[error(transparent)]
    Answer(#[from] AnswerError),
}

/// A connected client.
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) channel: Channel,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

fn need<T>(field: &'static str, v: Option<T>) -> Result<T, ClientError> {
    v.ok_or(ClientError::Answer(AnswerError::Missing { field }))
}

impl Client {
    /// Connects to the agent.
    pub async fn connect(endpoint: &Endpoint) -> Result<Client, ClientError> {
        match endpoint {
            Endpoint::Unix(path) => {
                let path = path.clone();
                let shown = path.display().to_string();
                // The URI is required by the API but not used: the connector dials the socket.
                let channel = tonic::transport::Endpoint::from_static("http://capybara.local")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(|source| ClientError::Connect {
                        endpoint: shown,
                        source,
                    })?;
                Ok(Client {
                    channel,
                    auth: None,
                })
            }
            Endpoint::Tcp {
                url,
                token,
                ca_cert,
            } => {
                let bad = || ClientError::Endpoint {
                    endpoint: url.clone(),
                };
                let mut ep =
                    tonic::transport::Endpoint::from_shared(url.clone()).map_err(|_| bad())?;
                if url.starts_with("https://") {
                    let ca = ca_cert.as_ref().ok_or(ClientError::NoCa)?;
                    ep = ep
                        .tls_config(
                            tonic::transport::ClientTlsConfig::new()
                                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                        )
                        .map_err(|source| ClientError::Connect {
                            endpoint: url.clone(),
                            source,
                        })?;
                }
                let channel = ep.connect().await.map_err(|source| ClientError::Connect {
                    endpoint: url.clone(),
                    source,
                })?;
                let auth = token
                    .as_ref()
                    .map(|t| {
                        format!("Bearer {t}")
                            .parse()
                            .map_err(|_| ClientError::Token)
                    })
                    .transpose()?;
                Ok(Client { channel, auth })
            }
        }
    }

    /// The connection (for the calls of sibling modules).
    pub(super) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub(super) fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }

    /// Creates a user with its first device.
    pub async fn add_user(
        &self,
        name: &str,
        device: &str,
        expires_at: i64,
    ) -> Result<(User, ClientConfig), ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .add_user(self.req(pb::AddUserRequest {
                name: name.into(),
                device: device.into(),
                expires_at,
            }))
            .await?
            .into_inner();
        Ok((
            need("user", r.user)?.try_into()?,
            need("config", r.config)?.try_into()?,
        ))
    }

    /// Every user.
    pub async fn list_users(&self) -> Result<Vec<UserDetail>, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .list_users(self.req(pb::ListUsersRequest {}))
            .await?
            .into_inner();
        Ok(r.users
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// One user.
    pub async fn get_user(&self, name: &str) -> Result<UserDetail, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .get_user(self.req(pb::GetUserRequest { name: name.into() }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Removes a user.
    pub async fn remove_user(&self, name: &str) -> Result<UserDetail, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .remove_user(self.req(pb::RemoveUserRequest { name: name.into() }))
            .await?
            .into_inner();
        Ok(need("removed", r.removed)?.try_into()?)
    }

    /// A device's config.
    pub async fn user_config(
        &self,
        name: &str,
        device: &str,
        rotate: bool,
    ) -> Result<ClientConfig, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .user_config(self.req(pb::UserConfigRequest {
                name: name.into(),
                device: device.into(),
                rotate,
            }))
            .await?
            .into_inner();
        Ok(need("config", r.config)?.try_into()?)
    }

    /// Adds a device.
    pub async fn add_peer(&self, user: &str, device: &str) -> Result<ClientConfig, ClientError> {
        let r = PeersClient::new(self.channel.clone())
            .add_peer(self.req(pb::AddPeerRequest {
                user: user.into(),
                device: device.into(),
            }))
            .await?
            .into_inner();
        Ok(need("config", r.config)?.try_into()?)
    }

    /// Removes a device.
    pub async fn remove_peer(&self, user: &str, device: &str) -> Result<Peer, ClientError> {
        let r = PeersClient::new(self.channel.clone())
            .remove_peer(self.req(pb::RemovePeerRequest {
                user: user.into(),
                device: device.into(),
            }))
            .await?
            .into_inner();
        Ok(need("removed", r.removed)?.try_into()?)
    }

    /// Creates a token; returns it with its secret.
    pub async fn create_token(
        &self,
        scope: Scope,
        name: &str,
        expires_in_secs: u64,
    ) -> Result<(Token, String), ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .create_token(self.req(pb::CreateTokenRequest {
                scope: scope_to_proto(scope) as i32,
                name: name.into(),
                expires_in_secs,
            }))
            .await?
            .into_inner();
        Ok((need("token", r.token)?.try_into()?, r.secret))
    }

    /// Every token.
    pub async fn list_tokens(&self) -> Result<Vec<Token>, ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .list_tokens(self.req(pb::ListTokensRequest {}))
            .await?
            .into_inner();
        Ok(r.tokens
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, id: &str) -> Result<Token, ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .revoke_token(self.req(pb::RevokeTokenRequest { id: id.into() }))
            .await?
            .into_inner();
        Ok(need("token", r.token)?.try_into()?)
    }

    /// Counters.
    pub async fn stats(&self, user: &str) -> Result<Stats, ClientError> {
        let r = StatsClient::new(self.channel.clone())
            .get_stats(self.req(pb::GetStatsRequest { user: user.into() }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Live connections.
    pub async fn connections(&self) -> Result<Vec<Connection>, ClientError> {
        let r = ConnectionsClient::new(self.channel.clone())
            .list_connections(self.req(pb::ListConnectionsRequest {}))
            .await?
            .into_inner();
        Ok(r.connections
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Kicks a user.
    pub async fn kick(&self, user: &str) -> Result<Vec<Peer>, ClientError> {
        let r = ConnectionsClient::new(self.channel.clone())
            .kick(self.req(pb::KickRequest { user: user.into() }))
            .await?
            .into_inner();
        Ok(r.kicked
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Audit records.
    pub async fn audit(&self, user: &str, limit: u32) -> Result<Vec<AuditRecord>, ClientError> {
        let r = AuditClient::new(self.channel.clone())
            .list_audit(self.req(pb::ListAuditRequest {
                user: user.into(),
                limit,
            }))
            .await?
            .into_inner();
        Ok(r.records
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Every blocklist.
    pub async fn blocklists(&self) -> Result<Vec<BlocklistView>, ClientError> {
        let r = BlocklistsClient::new(self.channel.clone())
            .list_blocklists(self.req(pb::ListBlocklistsRequest {}))
            .await?
            .into_inner();
        Ok(r.lists
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Adds (`add`) or removes entries of a list.
    pub async fn change_entries(
        &self,
        direction: Direction,
        name: &str,
        cidrs: Vec<String>,
        add: bool,
    ) -> Result<BlocklistView, ClientError> {
        let msg = pb::ChangeEntriesRequest {
            direction: direction_to_proto(direction) as i32,
            name: name.into(),
            cidrs,
        };
        let mut c = BlocklistsClient::new(self.channel.clone());
        let r = if add {
            c.add_entries(self.req(msg)).await?
        } else {
            c.remove_entries(self.req(msg)).await?
        };
        Ok(r.into_inner().try_into()?)
    }

    /// Deletes a list.
    pub async fn delete_blocklist(
        &self,
        direction: Direction,
        name: &str,
    ) -> Result<(), ClientError> {
        BlocklistsClient::new(self.channel.clone())
            .delete_blocklist(self.req(pb::GetBlocklistRequest {
                direction: direction_to_proto(direction) as i32,
                name: name.into(),
            }))
            .await?;
        Ok(())
    }

    /// The geo policy.
    pub async fn geo(&self) -> Result<GeoStatus, ClientError> {
        let r = GeoClient::new(self.channel.clone())
            .get_geo(self.req(pb::GetGeoRequest {}))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Sets the geo policy: `mode` is `off`, `block` or `allow`.
    pub async fn set_geo(
        &self,
        mode: &str,
        countries: Vec<String>,
    ) -> Result<GeoStatus, ClientError> {
        let mode = match mode {
            "block" => pb::GeoMode::Block,
            "allow" => pb::GeoMode::Allow,
            "off" => pb::GeoMode::Off,
            _ => pb::GeoMode::Unspecified,
        };
        let r = GeoClient::new(self.channel.clone())
            .set_geo(self.req(pb::SetGeoRequest {
                mode: mode as i32,
                countries,
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// The standard health check of `service` (`""` = the whole agent): `true` when serving.
    pub async fn health(&self, service: &str) -> Result<bool, ClientError> {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let r = tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
            .check(self.req(HealthCheckRequest {
                service: service.into(),
            }))
            .await?
            .into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }
}

/// Whether a client error is the caller's bad input (the CLI exits 2 for these).
pub fn is_bad_input(e: &ClientError) -> bool {
    matches!(e, ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument)
}

/// The gRPC code of a failed call, if the agent answered.
pub fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Status(s) => Some(s.code()),
        _ => None,
    }
}
