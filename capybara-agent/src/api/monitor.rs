//! The `Stats` and `Connections` services (counters from the kernel, live sessions, kick),
//! their conversions and client calls.

use std::collections::BTreeMap;

use capybara_common::drop::DropReason;

use capybara_proto::v1::{
    self as pb, connections_client::ConnectionsClient, connections_server::Connections,
    stats_client::StatsClient, stats_server,
};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{
        AnswerError, drop_reason_from_proto, drop_reason_to_proto, need, opt_secs,
        protocol_from_proto, secs_opt, traffic_from_proto, traffic_to_proto,
    },
    handler::Api,
    status::invalid,
};
use crate::service::{
    Connection, PeerCounters, PeerStatsView, ProxyCounters, Stats,
    domain::{Peer, Scope, SessionId, UserName, ValidationError},
};

#[tonic::async_trait]
impl stats_server::Stats for Api {
    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let r = req.get_ref();
        let (_, user) = self.auth_opt_user(&req, Scope::Read, "user", &r.user)?;
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (st, next) = self
            .call(move |s| match user {
                Some(u) => Ok((s.monitor.stats(Some(&u))?, None)),
                None => s.monitor.stats_page(ask.after.as_deref(), ask.size),
            })
            .await?;
        let mut out: pb::GetStatsResponse = (&st).into();
        out.next_page_token = super::paging::next_token(next.as_deref());
        Ok(Response::new(out))
    }

    type WatchStatsStream = super::live::TickStream;

    async fn watch_stats(
        &self,
        req: Request<pb::WatchStatsRequest>,
    ) -> Result<Response<Self::WatchStatsStream>, Status> {
        super::live::watch_stats(self, req).await
    }
}

#[tonic::async_trait]
impl Connections for Api {
    async fn list_connections(
        &self,
        req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let c = self.call(|s| s.monitor.connections()).await?;
        // In (user, device) order: NUL sorts below every character a name may hold.
        let (page, next) = ask.take(c.iter(), |c| format!("{}\0{}", c.user, c.device));
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: page.into_iter().map(Into::into).collect(),
            next_page_token: next,
        }))
    }

    /// Exactly one of `user` and `connection` (the caller is checked first).
    async fn kick(
        &self,
        req: Request<pb::KickRequest>,
    ) -> Result<Response<pb::KickResponse>, Status> {
        let r = req.get_ref();
        let peers = match (r.user.is_empty(), r.connection.is_empty()) {
            (false, true) => {
                let (actor, user) = self.auth_user(&req, Scope::Write, "user", &r.user)?;
                self.call(move |s| s.monitor.kick(&actor, &user)).await?
            }
            (true, false) => {
                let (actor, only) = self.auth_restricted(&req, Scope::Write)?;
                let id = SessionId::parse("connection", &r.connection).map_err(invalid)?;
                let peer = self
                    .call(move |s| s.monitor.kick_connection(&actor, id, only.as_ref()))
                    .await?;
                // A proxy session's kick cuts its connections and names no device.
                peer.into_iter().collect()
            }
            (user_empty, _) => {
                self.auth_restricted(&req, Scope::Write)?;
                return Err(invalid(if user_empty {
                    ValidationError::MissingEither {
                        field: "user",
                        or: "connection",
                    }
                } else {
                    ValidationError::Conflict {
                        field: "connection",
                        other: "user",
                    }
                }));
            }
        };
        Ok(Response::new(pb::KickResponse {
            kicked: peers.iter().map(Into::into).collect(),
        }))
    }
}

fn drops_to_proto(drops: &BTreeMap<String, u64>) -> Vec<pb::DropCount> {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            drops.get(r.name()).map(|n| pb::DropCount {
                reason: drop_reason_to_proto(*r) as i32,
                packets: *n,
            })
        })
        .collect()
}

impl From<&PeerStatsView> for pb::PeerStats {
    fn from(s: &PeerStatsView) -> pb::PeerStats {
        pb::PeerStats {
            rx: Some(traffic_to_proto(s.rx)),
            tx: Some(traffic_to_proto(s.tx)),
            drops: drops_to_proto(&s.drops),
        }
    }
}

impl From<&Stats> for pb::GetStatsResponse {
    fn from(s: &Stats) -> pb::GetStatsResponse {
        pb::GetStatsResponse {
            peers: s
                .peers
                .iter()
                .map(|p| pb::PeerStatsEntry {
                    peer: Some((&p.peer).into()),
                    stats: Some((&p.stats).into()),
                })
                .collect(),
            users: s
                .users
                .iter()
                .map(|(u, st)| pb::UserStatsEntry {
                    user: u.clone(),
                    stats: Some(st.into()),
                })
                .collect(),
            drops: drops_to_proto(&s.drops),
            next_page_token: String::new(),
            proxies: s
                .proxies
                .iter()
                .map(|p| pb::ProxyStatsEntry {
                    user: p.user.to_string(),
                    protocol: p.protocol.as_str().to_owned(),
                    id: p.id,
                    stats: Some((&p.stats).into()),
                })
                .collect(),
        }
    }
}

impl From<&Connection> for pb::Connection {
    fn from(c: &Connection) -> pb::Connection {
        pb::Connection {
            id: c.id.map(|i| i.to_string()).unwrap_or_default(),
            peer: c.peer.as_ref().map(Into::into),
            endpoint: c.endpoint.clone().unwrap_or_default(),
            last_handshake: opt_secs(c.last_handshake),
            user: c.user.to_string(),
            device: c.device.clone(),
            protocol: c.protocol.as_str().to_owned(),
            open_connections: c.open_connections,
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
        }
    }
}

fn drops_from_proto(v: Vec<pb::DropCount>) -> Result<BTreeMap<String, u64>, AnswerError> {
    v.into_iter()
        .map(|d| {
            drop_reason_from_proto("drops.reason", d.reason)
                .map(|r| (r.name().to_owned(), d.packets))
                .map_err(|_| AnswerError::Invalid {
                    field: "drops.reason",
                })
        })
        .collect()
}

impl TryFrom<pb::PeerStats> for PeerStatsView {
    type Error = AnswerError;
    fn try_from(s: pb::PeerStats) -> Result<PeerStatsView, AnswerError> {
        Ok(PeerStatsView {
            rx: traffic_from_proto(s.rx),
            tx: traffic_from_proto(s.tx),
            drops: drops_from_proto(s.drops)?,
        })
    }
}

impl TryFrom<pb::GetStatsResponse> for Stats {
    type Error = AnswerError;
    fn try_from(s: pb::GetStatsResponse) -> Result<Stats, AnswerError> {
        Ok(Stats {
            peers: s
                .peers
                .into_iter()
                .map(|p| {
                    Ok(PeerCounters {
                        peer: need("peers.peer", p.peer)?.try_into()?,
                        stats: need("peers.stats", p.stats)?.try_into()?,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            users: s
                .users
                .into_iter()
                .map(|u| Ok((u.user, need("users.stats", u.stats)?.try_into()?)))
                .collect::<Result<_, AnswerError>>()?,
            proxies: s
                .proxies
                .into_iter()
                .map(|p| {
                    Ok(ProxyCounters {
                        user: UserName::parse("proxies.user", &p.user)?,
                        protocol: protocol_from_proto("proxies.protocol", &p.protocol)?,
                        id: p.id,
                        stats: need("proxies.stats", p.stats)?.try_into()?,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            drops: drops_from_proto(s.drops)?,
        })
    }
}

impl TryFrom<pb::Connection> for Connection {
    type Error = AnswerError;
    fn try_from(c: pb::Connection) -> Result<Connection, AnswerError> {
        Ok(Connection {
            id: if c.id.is_empty() {
                None
            } else {
                Some(SessionId::parse("connection.id", &c.id)?)
            },
            user: UserName::parse("connection.user", &c.user)?,
            device: c.device,
            protocol: protocol_from_proto("connection.protocol", &c.protocol)?,
            peer: c.peer.map(TryInto::try_into).transpose()?,
            endpoint: (!c.endpoint.is_empty()).then_some(c.endpoint),
            last_handshake: secs_opt(c.last_handshake),
            open_connections: c.open_connections,
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
        })
    }
}

impl Client {
    /// Counters.
    pub async fn stats(&self, user: &str) -> Result<Stats, ClientError> {
        let max = crate::service::core::MAX_PAGE_SIZE as u32;
        let (mut all, mut token) = self.stats_page(user, max, String::new()).await?;
        while !token.is_empty() {
            let (page, next) = self.stats_page(user, max, token).await?;
            all.peers.extend(page.peers);
            all.proxies.extend(page.proxies);
            all.users.extend(page.users);
            all.drops = page.drops;
            token = next;
        }
        Ok(all)
    }

    /// One page of stats (of every user, by user; `page_size` 0 = the default) and the next
    /// page's token (empty on the last page).
    pub async fn stats_page(
        &self,
        user: &str,
        page_size: u32,
        page_token: String,
    ) -> Result<(Stats, String), ClientError> {
        let r = StatsClient::new(self.channel.clone())
            .get_stats(self.req(pb::GetStatsRequest {
                user: user.into(),
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let next = r.next_page_token.clone();
        Ok((r.try_into()?, next))
    }

    /// Live connections.
    pub async fn connections(&self) -> Result<Vec<Connection>, ClientError> {
        super::paging::walk(|page_token| async move {
            let r = ConnectionsClient::new(self.channel.clone())
                .list_connections(self.req(pb::ListConnectionsRequest {
                    page_size: crate::service::core::MAX_PAGE_SIZE as u32,
                    page_token,
                }))
                .await?
                .into_inner();
            let connections = r
                .connections
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, AnswerError>>()?;
            Ok((connections, r.next_page_token))
        })
        .await
    }

    /// Kicks a user.
    pub async fn kick(&self, user: &str) -> Result<Vec<Peer>, ClientError> {
        self.kick_request(pb::KickRequest {
            user: user.into(),
            ..Default::default()
        })
        .await
    }

    /// Kicks one connection by its id: the device whose session it is.
    pub async fn kick_connection(&self, id: &str) -> Result<Vec<Peer>, ClientError> {
        self.kick_request(pb::KickRequest {
            connection: id.into(),
            ..Default::default()
        })
        .await
    }

    /// Sends a `Kick`.
    pub async fn kick_request(&self, req: pb::KickRequest) -> Result<Vec<Peer>, ClientError> {
        let r = ConnectionsClient::new(self.channel.clone())
            .kick(self.req(req))
            .await?
            .into_inner();
        Ok(r.kicked
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }
}
