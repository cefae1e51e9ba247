//! The `Users` and `Peers` services (users and their devices), their proto ↔ domain
//! conversions and client calls.

use capybara_proto::v1::{
    self as pb, peers_client::PeersClient, peers_server::Peers, users_client::UsersClient,
    users_server::Users,
};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, need, opt_device, opt_secs, secs_opt, time_field},
    handler::Api,
    status::invalid,
};
use std::time::Duration;

use crate::service::{
    NewUser,
    domain::{
        ClientConfig, DeviceName, Peer, Protocol, ProxyAccess, PublicKey, Scope, User, UserDetail,
        UserName, ValidationError,
    },
    proxies::ProxyClientConfig,
    users::{AddedUser, DEFAULT_CLEANUP_GRACE},
};

/// The protocols of an `AddUser` request: empty = wireguard only.
fn protocols(list: &[String]) -> Result<Vec<Protocol>, ValidationError> {
    if list.is_empty() {
        return Ok(vec![Protocol::Wireguard]);
    }
    list.iter()
        .map(|p| Protocol::parse("protocols", p))
        .collect()
}

#[tonic::async_trait]
impl Users for Api {
    async fn add_user(
        &self,
        req: Request<pb::AddUserRequest>,
    ) -> Result<Response<pb::AddUserResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let protocols = protocols(&r.protocols).map_err(invalid)?;
        let new = NewUser::try_from(r).map_err(invalid)?;
        let added = self
            .call(move |s| s.users.add_user_with(&actor, new, &protocols))
            .await?;
        Ok(Response::new(pb::AddUserResponse {
            user: Some((&added.user).into()),
            config: added.config.as_ref().map(Into::into),
            proxies: added.proxies.iter().map(Into::into).collect(),
        }))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (users, more) = self
            .call(move |s| s.users.list_users_page(ask.after.as_deref(), ask.size))
            .await?;
        let last = users
            .last()
            .filter(|_| more)
            .map(|u| u.user.name.to_string());
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(Into::into).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::UserDetail>, Status> {
        let (_, name) = self.auth_user(&req, Scope::Read, "name", &req.get_ref().name)?;
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
        let (actor, name) = self.auth_user(&req, Scope::Admin, "name", &req.get_ref().name)?;
        let r = req.into_inner();
        let device = opt_device("device", &r.device).map_err(invalid)?;
        let protocol = if r.protocol.is_empty() {
            Protocol::Wireguard
        } else {
            Protocol::parse("protocol", &r.protocol).map_err(invalid)?
        };
        if protocol != Protocol::Wireguard {
            let cfg = self
                .call(move |s| s.proxies.client_config(&actor, &name, protocol))
                .await?;
            return Ok(Response::new(pb::UserConfigResponse {
                config: None,
                proxy: Some((&cfg).into()),
                protocol: protocol.to_string(),
            }));
        }
        let cfg = self
            .call(move |s| {
                s.devices
                    .user_config(&actor, &name, device.as_ref(), r.rotate)
            })
            .await?;
        Ok(Response::new(pb::UserConfigResponse {
            config: Some((&cfg).into()),
            proxy: None,
            protocol: protocol.to_string(),
        }))
    }

    async fn add_protocol(
        &self,
        req: Request<pb::AddProtocolRequest>,
    ) -> Result<Response<pb::AddProtocolResponse>, Status> {
        let (actor, name) = self.auth_user(&req, Scope::Write, "name", &req.get_ref().name)?;
        let protocol = Protocol::parse("protocol", &req.get_ref().protocol).map_err(invalid)?;
        let cfg = self
            .call(move |s| s.proxies.add_protocol(&actor, &name, protocol))
            .await?;
        Ok(Response::new(pb::AddProtocolResponse {
            config: Some((&cfg).into()),
        }))
    }

    async fn remove_protocol(
        &self,
        req: Request<pb::RemoveProtocolRequest>,
    ) -> Result<Response<pb::RemoveProtocolResponse>, Status> {
        let (actor, name) = self.auth_user(&req, Scope::Write, "name", &req.get_ref().name)?;
        let protocol = Protocol::parse("protocol", &req.get_ref().protocol).map_err(invalid)?;
        let removed = self
            .call(move |s| s.proxies.remove_protocol(&actor, &name, protocol))
            .await?;
        Ok(Response::new(pb::RemoveProtocolResponse {
            removed: Some((&removed).into()),
        }))
    }

    async fn expire_user(
        &self,
        req: Request<pb::ExpireUserRequest>,
    ) -> Result<Response<pb::UserDetail>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let name = UserName::parse("name", &r.name).map_err(invalid)?;
        let at = time_field("at", r.at)
            .and_then(|t| t.ok_or(ValidationError::Missing { field: "at" }))
            .map_err(invalid)?;
        let d = self
            .call(move |s| s.users.expire_user(&actor, &name, at))
            .await?;
        Ok(Response::new((&d).into()))
    }

    async fn renew_user(
        &self,
        req: Request<pb::RenewUserRequest>,
    ) -> Result<Response<pb::UserDetail>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let name = UserName::parse("name", &r.name).map_err(invalid)?;
        let at = time_field("at", r.at).map_err(invalid)?;
        let d = self
            .call(move |s| s.users.renew_user(&actor, &name, at))
            .await?;
        Ok(Response::new((&d).into()))
    }

    async fn cleanup_expired(
        &self,
        req: Request<pb::CleanupExpiredRequest>,
    ) -> Result<Response<pb::CleanupExpiredResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let grace = r
            .grace_secs
            .map_or(DEFAULT_CLEANUP_GRACE, Duration::from_secs);
        let dry_run = r.dry_run;
        let users = self
            .call(move |s| s.users.cleanup_expired(&actor, grace, dry_run))
            .await?;
        Ok(Response::new(pb::CleanupExpiredResponse {
            users: users.iter().map(Into::into).collect(),
            dry_run,
        }))
    }
}

#[tonic::async_trait]
impl Peers for Api {
    async fn add_peer(
        &self,
        req: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::AddPeerResponse>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Write, "user", &req.get_ref().user)?;
        let r = req.into_inner();
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
        let r = req.get_ref();
        let (_, user) = self.auth_opt_user(&req, Scope::Read, "user", &r.user)?;
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (peers, more) = self
            .call(move |s| {
                s.devices
                    .list_peers_page(user.as_ref(), ask.after.as_deref(), ask.size)
            })
            .await?;
        let last = peers.last().filter(|_| more).map(|(k, _)| k.as_str());
        Ok(Response::new(pb::ListPeersResponse {
            peers: peers.iter().map(|(_, p)| p.into()).collect(),
            next_page_token: super::paging::next_token(last),
        }))
    }

    async fn remove_peer(
        &self,
        req: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerResponse>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Write, "user", &req.get_ref().user)?;
        let r = req.into_inner();
        let device = DeviceName::parse("device", &r.device).map_err(invalid)?;
        let p = self
            .call(move |s| s.devices.remove_device(&actor, &user, &device))
            .await?;
        Ok(Response::new(pb::RemovePeerResponse {
            removed: Some((&p).into()),
        }))
    }
}

impl TryFrom<pb::AddUserRequest> for NewUser {
    type Error = ValidationError;
    fn try_from(r: pb::AddUserRequest) -> Result<NewUser, ValidationError> {
        Ok(NewUser {
            name: UserName::parse("name", &r.name)?,
            device: opt_device("device", &r.device)?.unwrap_or_else(DeviceName::default_device),
            expires_at: time_field("expires_at", r.expires_at)?,
        })
    }
}

impl From<&User> for pb::User {
    fn from(u: &User) -> pb::User {
        pb::User {
            name: u.name.to_string(),
            created_at: u.created_at as i64,
            expires_at: opt_secs(u.expires_at),
        }
    }
}

impl From<&Peer> for pb::Peer {
    fn from(p: &Peer) -> pb::Peer {
        pb::Peer {
            id: p.id,
            user: p.user.to_string(),
            device: p.device.to_string(),
            public_key: p.public_key.to_string(),
            ipv4: p.ipv4.to_string(),
            ipv6: p.ipv6.to_string(),
            created_at: p.created_at as i64,
            key_kept: p.key_kept,
        }
    }
}

impl From<&UserDetail> for pb::UserDetail {
    fn from(d: &UserDetail) -> pb::UserDetail {
        pb::UserDetail {
            user: Some((&d.user).into()),
            peers: d.peers.iter().map(Into::into).collect(),
            proxies: d.proxies.iter().map(Into::into).collect(),
            protocols: d.protocols().iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<&ClientConfig> for pb::ClientConfig {
    fn from(c: &ClientConfig) -> pb::ClientConfig {
        pb::ClientConfig {
            peer: Some((&c.peer).into()),
            private_key: c.private_key.clone().unwrap_or_default(),
            server_public_key: c.server_public_key.to_string(),
            endpoint: c.endpoint.clone(),
            dns: c.dns.clone(),
            wg_quick: c.wg_quick.clone(),
        }
    }
}

impl TryFrom<pb::User> for User {
    type Error = AnswerError;
    fn try_from(u: pb::User) -> Result<User, AnswerError> {
        Ok(User {
            name: UserName::parse("user.name", &u.name)?,
            created_at: u.created_at.max(0) as u64,
            expires_at: secs_opt(u.expires_at),
        })
    }
}

impl TryFrom<pb::Peer> for Peer {
    type Error = AnswerError;
    fn try_from(p: pb::Peer) -> Result<Peer, AnswerError> {
        Ok(Peer {
            id: p.id,
            user: UserName::parse("peer.user", &p.user)?,
            device: DeviceName::parse("peer.device", &p.device)?,
            public_key: PublicKey::parse("peer.public_key", &p.public_key)?,
            ipv4: p
                .ipv4
                .parse()
                .map_err(|_| AnswerError::Invalid { field: "peer.ipv4" })?,
            ipv6: p
                .ipv6
                .parse()
                .map_err(|_| AnswerError::Invalid { field: "peer.ipv6" })?,
            created_at: p.created_at.max(0) as u64,
            key_kept: p.key_kept,
        })
    }
}

impl TryFrom<pb::UserDetail> for UserDetail {
    type Error = AnswerError;
    fn try_from(d: pb::UserDetail) -> Result<UserDetail, AnswerError> {
        Ok(UserDetail {
            user: need("user", d.user)?.try_into()?,
            peers: d
                .peers
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            proxies: d
                .proxies
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<&ProxyAccess> for pb::ProxyAccess {
    fn from(a: &ProxyAccess) -> pb::ProxyAccess {
        pb::ProxyAccess {
            id: a.id,
            user: a.user.to_string(),
            protocol: a.protocol.to_string(),
            created_at: a.created_at as i64,
        }
    }
}

impl TryFrom<pb::ProxyAccess> for ProxyAccess {
    type Error = AnswerError;
    fn try_from(a: pb::ProxyAccess) -> Result<ProxyAccess, AnswerError> {
        Ok(ProxyAccess {
            id: a.id,
            user: UserName::parse("proxy.user", &a.user)?,
            protocol: Protocol::parse("proxy.protocol", &a.protocol)?,
            created_at: a.created_at.max(0) as u64,
        })
    }
}

impl From<&ProxyClientConfig> for pb::ProxyClientConfig {
    fn from(c: &ProxyClientConfig) -> pb::ProxyClientConfig {
        pb::ProxyClientConfig {
            access: Some((&c.access).into()),
            uri: c.uri.clone(),
            json: c.json.clone(),
        }
    }
}

impl TryFrom<pb::ProxyClientConfig> for ProxyClientConfig {
    type Error = AnswerError;
    fn try_from(c: pb::ProxyClientConfig) -> Result<ProxyClientConfig, AnswerError> {
        Ok(ProxyClientConfig {
            access: need("config.access", c.access)?.try_into()?,
            uri: c.uri,
            json: c.json,
        })
    }
}

/// A client config of any protocol, as `UserConfig` answers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum AnyClientConfig {
    /// A WireGuard device's.
    Wireguard(ClientConfig),
    /// A proxy identity's.
    Proxy(ProxyClientConfig),
}

impl TryFrom<pb::ClientConfig> for ClientConfig {
    type Error = AnswerError;
    fn try_from(c: pb::ClientConfig) -> Result<ClientConfig, AnswerError> {
        Ok(ClientConfig {
            peer: need("config.peer", c.peer)?.try_into()?,
            private_key: (!c.private_key.is_empty()).then_some(c.private_key),
            server_public_key: PublicKey::parse("config.server_public_key", &c.server_public_key)?,
            endpoint: c.endpoint,
            dns: c.dns,
            wg_quick: c.wg_quick,
        })
    }
}

impl Client {
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
                protocols: vec![],
            }))
            .await?
            .into_inner();
        Ok((
            need("user", r.user)?.try_into()?,
            need("config", r.config)?.try_into()?,
        ))
    }

    /// Every user: every page walked.
    pub async fn list_users(&self) -> Result<Vec<UserDetail>, ClientError> {
        super::paging::walk(|t| self.list_users_page(crate::service::core::MAX_PAGE_SIZE as u32, t))
            .await
    }

    /// One page of users by name (`page_size` 0 = the default) and the next page's token
    /// (empty on the last page).
    pub async fn list_users_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<UserDetail>, String), ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .list_users(self.req(pb::ListUsersRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let users = r
            .users
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?;
        Ok((users, r.next_page_token))
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
                protocol: String::new(),
            }))
            .await?
            .into_inner();
        Ok(need("config", r.config)?.try_into()?)
    }

    /// Creates a user with access by `protocols` (names; empty = wireguard only): the first
    /// device's config when wireguard is listed, and the proxy identities made.
    pub async fn add_user_with(
        &self,
        name: &str,
        device: &str,
        expires_at: i64,
        protocols: &[String],
    ) -> Result<AddedUser, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .add_user(self.req(pb::AddUserRequest {
                name: name.into(),
                device: device.into(),
                expires_at,
                protocols: protocols.to_vec(),
            }))
            .await?
            .into_inner();
        Ok(AddedUser {
            user: need("user", r.user)?.try_into()?,
            config: r.config.map(TryInto::try_into).transpose()?,
            proxies: r
                .proxies
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, AnswerError>>()?,
        })
    }

    /// The client config of a user's identity of `protocol` (`wireguard` or empty: a device's,
    /// as [`Client::user_config`]).
    pub async fn user_config_of(
        &self,
        name: &str,
        device: &str,
        rotate: bool,
        protocol: &str,
    ) -> Result<AnyClientConfig, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .user_config(self.req(pb::UserConfigRequest {
                name: name.into(),
                device: device.into(),
                rotate,
                protocol: protocol.into(),
            }))
            .await?
            .into_inner();
        Ok(match r.proxy {
            Some(p) => AnyClientConfig::Proxy(p.try_into()?),
            None => AnyClientConfig::Wireguard(need("config", r.config)?.try_into()?),
        })
    }

    /// Gives a user access by a proxy protocol; returns the identity's client config.
    pub async fn add_protocol(
        &self,
        name: &str,
        protocol: &str,
    ) -> Result<ProxyClientConfig, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .add_protocol(self.req(pb::AddProtocolRequest {
                name: name.into(),
                protocol: protocol.into(),
            }))
            .await?
            .into_inner();
        Ok(need("config", r.config)?.try_into()?)
    }

    /// Takes a user's access by a proxy protocol away; returns the identity removed.
    pub async fn remove_protocol(
        &self,
        name: &str,
        protocol: &str,
    ) -> Result<ProxyAccess, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .remove_protocol(self.req(pb::RemoveProtocolRequest {
                name: name.into(),
                protocol: protocol.into(),
            }))
            .await?
            .into_inner();
        Ok(need("removed", r.removed)?.try_into()?)
    }

    /// Sets a user's expiry (Unix seconds; may be in the past).
    pub async fn expire_user(&self, name: &str, at: i64) -> Result<UserDetail, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .expire_user(self.req(pb::ExpireUserRequest {
                name: name.into(),
                at,
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Clears a user's expiry (`at` 0) or sets a new one.
    pub async fn renew_user(&self, name: &str, at: i64) -> Result<UserDetail, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .renew_user(self.req(pb::RenewUserRequest {
                name: name.into(),
                at,
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Removes (or with `dry_run` lists) the users expired more than `grace_secs` ago (`None`:
    /// the agent's default grace).
    pub async fn cleanup_expired(
        &self,
        grace_secs: Option<u64>,
        dry_run: bool,
    ) -> Result<Vec<UserDetail>, ClientError> {
        let r = UsersClient::new(self.channel.clone())
            .cleanup_expired(self.req(pb::CleanupExpiredRequest {
                grace_secs,
                dry_run,
            }))
            .await?
            .into_inner();
        Ok(r.users
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// One page of devices in `user/device` order (of `user` only, unless empty; `page_size`
    /// 0 = the default) and the next page's token (empty on the last page).
    pub async fn list_peers_page(
        &self,
        user: &str,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<Peer>, String), ClientError> {
        let r = PeersClient::new(self.channel.clone())
            .list_peers(self.req(pb::ListPeersRequest {
                user: user.into(),
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let peers = r
            .peers
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?;
        Ok((peers, r.next_page_token))
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
}
