//! The `History` service (sessions, auth attempts, retention), its client calls and proto ↔
//! domain conversions.
//!
//! | RPC | scope | input checked |
//! |---|---|---|
//! | `ListSessions` | read | `user` (a user name), `ip` (a CIDR or address), `page_token` (one this call returned); `page_size` 0 = 100, capped at 1000 |
//! | `ClearHistory` | admin | `older_than_secs` > 0 |
//!
//! Bad input is `INVALID_ARGUMENT` naming the field, before the service is called: nothing
//! changes. The audit trail (`history audit`) is the `Audit` service.

use std::{net::SocketAddr, time::Duration};

use capybara_proto::v1::{self as pb, history_client::HistoryClient, history_server::History};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, opt_user, protocol_from_proto, traffic_from_proto, traffic_to_proto},
    handler::Api,
    lists::cidrs,
    status::invalid,
};
use crate::service::{
    AuthAttempt, EndReason, HistoryPage, HistoryQuery, Pruned, Session,
    domain::{PublicKey, Scope, SessionId, ValidationError},
    history::{Counters, EndpointSeen, HistoryCursor},
};

fn reason_to_proto(r: Option<EndReason>) -> pb::EndReason {
    match r {
        None => pb::EndReason::Unspecified,
        Some(EndReason::Idle) => pb::EndReason::Idle,
        Some(EndReason::Kicked) => pb::EndReason::Kicked,
        Some(EndReason::Removed) => pb::EndReason::Removed,
        Some(EndReason::AgentStopped) => pb::EndReason::AgentStopped,
    }
}

fn reason_from_proto(v: i32) -> Result<Option<EndReason>, AnswerError> {
    Ok(
        match pb::EndReason::try_from(v).map_err(|_| AnswerError::Invalid {
            field: "session.reason",
        })? {
            pb::EndReason::Unspecified => None,
            pb::EndReason::Idle => Some(EndReason::Idle),
            pb::EndReason::Kicked => Some(EndReason::Kicked),
            pb::EndReason::Removed => Some(EndReason::Removed),
            pb::EndReason::AgentStopped => Some(EndReason::AgentStopped),
        },
    )
}

impl From<&Session> for pb::Session {
    fn from(s: &Session) -> pb::Session {
        pb::Session {
            id: s.id.to_string(),
            user: s.user.clone(),
            device: s.device.clone(),
            peer_id: s.peer_id,
            ipv4: s.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            ipv6: s.ipv6.map(|a| a.to_string()).unwrap_or_default(),
            start: s.start as i64,
            end: s.end.map_or(0, |e| e as i64),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::EndpointSeen {
                    at: e.at as i64,
                    endpoint: e.endpoint.to_string(),
                })
                .collect(),
            rx: Some(traffic_to_proto(s.traffic.rx)),
            tx: Some(traffic_to_proto(s.traffic.tx)),
            reason: reason_to_proto(s.reason) as i32,
            public_key: s.public_key.map(|k| k.to_string()).unwrap_or_default(),
            protocol: s.protocol.as_str().to_owned(),
        }
    }
}

fn parse<T: std::str::FromStr>(field: &'static str, s: &str) -> Result<T, AnswerError> {
    s.parse().map_err(|_| AnswerError::Invalid { field })
}

/// `None` for an empty string, else what `f` makes of it.
fn opt<T, E>(s: &str, f: impl FnOnce(&str) -> Result<T, E>) -> Result<Option<T>, AnswerError>
where
    AnswerError: From<E>,
{
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(f(s)?))
    }
}

impl TryFrom<pb::Session> for Session {
    type Error = AnswerError;
    fn try_from(s: pb::Session) -> Result<Session, AnswerError> {
        Ok(Session {
            protocol: protocol_from_proto("session.protocol", &s.protocol)?,
            public_key: opt(&s.public_key, |k| PublicKey::parse("session.public_key", k))?,
            ipv4: opt(&s.ipv4, |a| parse("session.ipv4", a))?,
            ipv6: opt(&s.ipv6, |a| parse("session.ipv6", a))?,
            start: s.start.max(0) as u64,
            end: (s.end > 0).then_some(s.end as u64),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    Ok(EndpointSeen {
                        at: e.at.max(0) as u64,
                        endpoint: parse("session.endpoints", &e.endpoint)?,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            traffic: Counters {
                rx: traffic_from_proto(s.rx),
                tx: traffic_from_proto(s.tx),
            },
            reason: reason_from_proto(s.reason)?,
            id: SessionId::parse("session.id", &s.id)?,
            user: s.user,
            device: s.device,
            peer_id: s.peer_id,
        })
    }
}

impl From<&AuthAttempt> for pb::AuthAttempt {
    fn from(a: &AuthAttempt) -> pb::AuthAttempt {
        pb::AuthAttempt {
            at: a.at as i64,
            source: a.source.to_string(),
            public_key: a.public_key.map(|k| k.to_string()).unwrap_or_default(),
            reason: a.reason.clone(),
            count: a.count,
            prefix: a.prefix.map(|p| p.to_string()).unwrap_or_default(),
            first_seen: a.first_seen as i64,
            protocol: a.protocol.as_str().to_owned(),
        }
    }
}

impl TryFrom<pb::AuthAttempt> for AuthAttempt {
    type Error = AnswerError;
    fn try_from(a: pb::AuthAttempt) -> Result<AuthAttempt, AnswerError> {
        Ok(AuthAttempt {
            at: a.at.max(0) as u64,
            source: parse::<SocketAddr>("auth.source", &a.source)?,
            public_key: if a.public_key.is_empty() {
                None
            } else {
                Some(PublicKey::parse("auth.public_key", &a.public_key)?)
            },
            reason: a.reason,
            count: a.count.max(1),
            prefix: if a.prefix.is_empty() {
                None
            } else {
                Some(parse("auth.prefix", &a.prefix)?)
            },
            first_seen: a.first_seen.max(0) as u64,
            protocol: protocol_from_proto("auth.protocol", &a.protocol)?,
        })
    }
}

/// The query of a `ListSessionsRequest`, validated (each error names its field).
pub fn history_query(r: &pb::ListSessionsRequest) -> Result<HistoryQuery, ValidationError> {
    Ok(HistoryQuery {
        user: opt_user("user", &r.user)?,
        ip: if r.ip.is_empty() {
            None
        } else {
            Some(cidrs("ip", std::slice::from_ref(&r.ip))?[0])
        },
        limit: Some(if r.page_size > 0 {
            r.page_size
        } else {
            r.limit
        } as usize)
        .filter(|&n| n > 0),
        include_auth: r.include_auth,
        auth_only: r.auth_only,
        page_token: if r.page_token.is_empty() {
            None
        } else {
            Some(
                HistoryCursor::from_token(&r.page_token).ok_or(ValidationError::Time {
                    field: "page_token",
                    reason: "not a next_page_token of ListSessions",
                })?,
            )
        },
    })
}

#[tonic::async_trait]
impl History for Api {
    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        // A token restricted to a user sees that user's sessions only (and so no auth attempts,
        // which belong to no user).
        self.auth_opt_user(&req, Scope::Read, "user", &req.get_ref().user)?;
        let q = history_query(req.get_ref()).map_err(invalid)?;
        let (page, next) = self.call(move |s| s.history.history_page(&q)).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: page.sessions.iter().map(Into::into).collect(),
            auth_attempts: page.auth_attempts.iter().map(Into::into).collect(),
            next_page_token: next.map(|c| c.to_token()).unwrap_or_default(),
        }))
    }

    async fn clear_history(
        &self,
        req: Request<pb::ClearHistoryRequest>,
    ) -> Result<Response<pb::ClearHistoryResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let secs = req.get_ref().older_than_secs;
        if secs == 0 {
            return Err(invalid(ValidationError::Missing {
                field: "older_than_secs",
            }));
        }
        let p = self
            .call(move |s| s.history.clear_history(&actor, Duration::from_secs(secs)))
            .await?;
        Ok(Response::new(pb::ClearHistoryResponse {
            sessions_removed: p.sessions,
            auth_attempts_removed: p.auth_attempts,
        }))
    }
}

/// What [`Client::history_page`] asks for; empty strings mean "any".
#[derive(Clone, Copy, Debug, Default)]
pub struct HistoryRequest<'a> {
    /// Only this user's sessions.
    pub user: &'a str,
    /// Only records touching this CIDR.
    pub ip: &'a str,
    /// Records of each kind per page (0 = the default, 100; at most 1000).
    pub page_size: u32,
    /// Also auth attempts.
    pub include_auth: bool,
    /// Only auth attempts.
    pub auth_only: bool,
}

impl Client {
    /// The first page of sessions (and auth attempts) matching the filters; empty strings
    /// mean "any", a `limit` of 0 the default page size.
    pub async fn history(
        &self,
        user: &str,
        ip: &str,
        limit: u32,
        include_auth: bool,
    ) -> Result<HistoryPage, ClientError> {
        let q = HistoryRequest {
            user,
            ip,
            page_size: limit,
            include_auth,
            auth_only: false,
        };
        Ok(self.history_page(&q, "").await?.0)
    }

    /// One page of `q` from `page_token` ("" = the first) and the next page's token ("" = this
    /// was the last).
    pub async fn history_page(
        &self,
        q: &HistoryRequest<'_>,
        page_token: &str,
    ) -> Result<(HistoryPage, String), ClientError> {
        let r = HistoryClient::new(self.channel.clone())
            .list_sessions(self.req(pb::ListSessionsRequest {
                user: q.user.into(),
                ip: q.ip.into(),
                limit: 0,
                include_auth: q.include_auth,
                page_size: q.page_size,
                page_token: page_token.into(),
                auth_only: q.auth_only,
            }))
            .await?
            .into_inner();
        Ok((
            HistoryPage {
                sessions: r
                    .sessions
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, AnswerError>>()?,
                auth_attempts: r
                    .auth_attempts
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, AnswerError>>()?,
            },
            r.next_page_token,
        ))
    }

    /// Deletes history older than `older_than_secs`.
    pub async fn clear_history(&self, older_than_secs: u64) -> Result<Pruned, ClientError> {
        let r = HistoryClient::new(self.channel.clone())
            .clear_history(self.req(pb::ClearHistoryRequest { older_than_secs }))
            .await?
            .into_inner();
        Ok(Pruned {
            sessions: r.sessions_removed,
            auth_attempts: r.auth_attempts_removed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Traffic;

    fn req(user: &str, ip: &str) -> pb::ListSessionsRequest {
        pb::ListSessionsRequest {
            user: user.into(),
            ip: ip.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_filters_name_their_field() {
        assert_eq!(
            history_query(&req("Bad/User", "")).unwrap_err().field(),
            "user"
        );
        assert_eq!(
            history_query(&req("", "10.0.0.0/33")).unwrap_err().field(),
            "ip"
        );
        assert_eq!(
            history_query(&req("", "nonsense")).unwrap_err().field(),
            "ip"
        );
        let q = history_query(&req("alice", "192.0.2.0/24")).unwrap();
        assert_eq!(q.user.unwrap().as_str(), "alice");
        assert_eq!(q.ip.unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(q.limit, None);
    }

    #[test]
    fn a_page_token_is_checked_and_page_size_wins_over_limit() {
        let bad = pb::ListSessionsRequest {
            page_token: "h1;nonsense;".into(),
            ..req("", "")
        };
        assert_eq!(history_query(&bad).unwrap_err().field(), "page_token");
        let cursor = HistoryCursor {
            sessions: crate::service::history::Pos::After("session/1/2".into()),
            auth: crate::service::history::Pos::Done,
        };
        let ok = pb::ListSessionsRequest {
            page_token: cursor.to_token(),
            page_size: 7,
            limit: 3,
            ..req("", "")
        };
        let q = history_query(&ok).unwrap();
        assert_eq!(q.page_token, Some(cursor));
        assert_eq!(q.limit, Some(7));
    }

    #[test]
    fn sessions_and_auth_attempts_round_trip() {
        let s = Session {
            traffic: Counters {
                rx: Traffic {
                    packets: 1,
                    bytes: 2,
                },
                tx: Traffic {
                    packets: 3,
                    bytes: 4,
                },
            },
            ..Session::sample(100, 200, EndReason::AgentStopped)
        };
        assert_eq!(Session::try_from(pb::Session::from(&s)).unwrap(), s);
        let open = Session {
            end: None,
            reason: None,
            ..s
        };
        assert_eq!(Session::try_from(pb::Session::from(&open)).unwrap(), open);
        let a = AuthAttempt {
            protocol: Default::default(),
            at: 5,
            source: "[2001:db8::1]:51820".parse().unwrap(),
            public_key: None,
            reason: "bad-mac".into(),
            count: 12,
            prefix: Some("2001:db8::/64".parse().unwrap()),
            first_seen: 3,
        };
        assert_eq!(AuthAttempt::try_from(pb::AuthAttempt::from(&a)).unwrap(), a);
    }
}
