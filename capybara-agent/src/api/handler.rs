//! [`Api`], the implementation of every `capybara.v1` service (each feature's file implements
//! its services for it): who is calling and may they ([`Api::auth`], see `server` for the
//! rules), and running a service call on the blocking pool until what it wrote is on disk
//! ([`Api::call`]).
//!
//! ## Tokens restricted to one user
//! A token made with `--user alice` passes [`Api::auth`] for nothing (`PERMISSION_DENIED`,
//! naming its user): only calls about one user that check it with [`Api::auth_user`] admit it,
//! and only for alice — `GetUser`, `ListPeers` with `user`, `AddPeer`, `RemovePeer`,
//! `UserConfig`, `GetStats` and `WatchStats` with `user`, and `Kick` (within the token's scope; a `Kick` by connection
//! id reaches alice's connections only: another user's id is `NOT_FOUND` to it, as if it did not
//! exist, since such a token cannot list them either). Everything else (listing
//! users or connections, another user, account changes such as `AddUser`, `RemoveUser`,
//! `ExpireUser`, `RenewUser`, tokens, policy, lists) is refused, so a call added later is
//! closed to such tokens until it opts in. Health and reflection stay open to every valid
//! token.
//!
//! A scheduled task's command calls over an in-process connection (`inproc`) and acts as
//! `schedule:<id>` with the admin scope.

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap, transport::server::UdsConnectInfo};

use super::{
    access::TcpControl,
    convert::opt_user,
    limits::RateLimits,
    status::{auth_status, invalid, status_of},
};
use crate::service::{
    AuthError, Service, ServiceError,
    domain::{Actor, Scope, UserName, ValidationError},
};

/// Who is calling, and may they do what needs `need`? With the one user the caller's token is
/// restricted to, if any (the caller decides whether the call is about that user).
pub(super) fn authorize(
    svc: &Service,
    limits: &RateLimits,
    metadata: &MetadataMap,
    extensions: &tonic::Extensions,
    need: Scope,
) -> Result<(Actor, Option<UserName>), Status> {
    let (actor, only) = if let Some(caller) = extensions.get::<super::inproc::ScheduleCaller>() {
        // A scheduled task's in-process connection (`api::inproc`): no socket reaches it.
        (Actor::Schedule { id: caller.task }, None)
    } else if let Some(uds) = extensions.get::<UdsConnectInfo>() {
        match uds.peer_cred.map(|c| c.uid()) {
            Some(0) => (Actor::Local { uid: 0 }, None),
            Some(uid) => return Err(auth_status(&AuthError::LocalUid { uid })),
            None => return Err(auth_status(&AuthError::Missing)),
        }
    } else {
        let ip = peer_ip(extensions);
        if let Some(ip) = ip {
            limits.may_try(ip).map_err(|secs| {
                rate_limited(
                    format!("too many failed authentications from {ip}; retry after {secs} s"),
                    secs,
                )
            })?;
        }
        let found = metadata
            .get("authorization")
            .ok_or(AuthError::Missing)
            .and_then(|header| {
                header
                    .to_str()
                    .ok()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .ok_or(AuthError::Invalid)
            })
            .and_then(|bearer| svc.tokens.authenticate_restricted(bearer.trim()));
        match found {
            Ok(found) => found,
            Err(e) => {
                if let (Some(ip), false) = (ip, matches!(e, AuthError::Store(_))) {
                    limits.failed(ip);
                }
                return Err(auth_status(&e));
            }
        }
    };
    if let Actor::Token { id, .. } = &actor {
        limits.call(id.as_str()).map_err(|secs| {
            rate_limited(
                format!("token {id} is over its rate limit; retry after {secs} s"),
                secs,
            )
        })?;
    }
    let have = actor.scope();
    if !have.allows(need) {
        return Err(auth_status(&AuthError::Scope { have, need }));
    }
    Ok((actor, only))
}

/// The address a TCP call comes from (plain or TLS).
fn peer_ip(extensions: &tonic::Extensions) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
        .map(|a| a.ip().to_canonical())
}

/// `RESOURCE_EXHAUSTED` with `retry-after` (REST: 429 with `Retry-After`).
fn rate_limited(message: String, secs: u64) -> Status {
    let mut st = Status::resource_exhausted(message);
    if let Ok(v) = secs.to_string().parse() {
        st.metadata_mut().insert("retry-after", v);
    }
    st
}

/// The implementation of every `capybara.v1` service.
#[derive(Clone, Debug)]
pub struct Api {
    svc: Arc<Service>,
    limits: Arc<RateLimits>,
    tcp: Arc<TcpControl>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Api {
    /// The API over `svc`, with the TCP API's rate limits, its listener and the agent's metrics
    /// (served as `GET /metrics` beside the API).
    pub fn new(
        svc: Arc<Service>,
        limits: Arc<RateLimits>,
        tcp: Arc<TcpControl>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Api {
        Api {
            svc,
            limits,
            tcp,
            metrics,
        }
    }

    /// The agent's metrics, if it has them.
    pub(super) fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        self.metrics.clone()
    }

    /// The TCP API's rate limits.
    pub(super) fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// The TCP listener.
    pub(super) fn tcp(&self) -> &TcpControl {
        &self.tcp
    }

    /// [`authorize`] with this API's limits.
    pub(crate) fn authorize(
        &self,
        metadata: &MetadataMap,
        extensions: &tonic::Extensions,
        need: Scope,
    ) -> Result<(Actor, Option<UserName>), Status> {
        authorize(&self.svc, &self.limits, metadata, extensions, need)
    }

    /// The caller, if it may make a call that needs `need` and is not about one user (a token
    /// restricted to a user is refused; see the module docs).
    pub(super) fn auth<T>(&self, req: &Request<T>, need: Scope) -> Result<Actor, Status> {
        match self.authorize(req.metadata(), req.extensions(), need)? {
            (actor, None) => Ok(actor),
            (_, Some(only)) => Err(auth_status(&AuthError::Restricted {
                user: only.to_string(),
            })),
        }
    }

    /// The caller and the user named by `raw` (in `field`), if the caller may make a call that
    /// needs `need` about that user alone (a token restricted to another user is refused). The
    /// caller is checked before the name.
    pub(super) fn auth_user<T>(
        &self,
        req: &Request<T>,
        need: Scope,
        field: &'static str,
        raw: &str,
    ) -> Result<(Actor, UserName), Status> {
        match self.auth_opt_user(req, need, field, raw)? {
            (actor, Some(user)) => Ok((actor, user)),
            (_, None) => Err(invalid(ValidationError::Missing { field })),
        }
    }

    /// [`Api::auth_user`] for an optional user (`raw` empty: every user, which a restricted
    /// token may not ask for).
    pub(super) fn auth_opt_user<T>(
        &self,
        req: &Request<T>,
        need: Scope,
        field: &'static str,
        raw: &str,
    ) -> Result<(Actor, Option<UserName>), Status> {
        let (actor, only) = self.authorize(req.metadata(), req.extensions(), need)?;
        let user = opt_user(field, raw).map_err(invalid)?;
        match (only, &user) {
            (None, _) => Ok((actor, user)),
            (Some(only), Some(u)) if only == *u => Ok((actor, user)),
            (Some(only), Some(u)) => Err(auth_status(&AuthError::OtherUser {
                user: only.to_string(),
                target: u.to_string(),
            })),
            (Some(only), None) => Err(auth_status(&AuthError::Restricted {
                user: only.to_string(),
            })),
        }
    }

    /// The caller, if it may make a call that needs `need`, and the one user its token is
    /// restricted to, if any: for a call whose object's user only the service knows (it must
    /// then act on that user's objects alone).
    pub(super) fn auth_restricted<T>(
        &self,
        req: &Request<T>,
        need: Scope,
    ) -> Result<(Actor, Option<UserName>), Status> {
        self.authorize(req.metadata(), req.extensions(), need)
    }

    /// The service, for a call that streams its answer from the blocking pool itself.
    pub(super) fn service(&self) -> Arc<Service> {
        self.svc.clone()
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
