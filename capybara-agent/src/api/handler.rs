//! [`Api`], the implementation of every `capybara.v1` service (each feature's file implements
//! its services for it): who is calling and may they ([`Api::auth`], see `server` for the
//! rules), and running a service call on the blocking pool until what it wrote is on disk
//! ([`Api::call`]).
//!
//! ## Tokens restricted to one user
//! A token made with `--user alice` passes [`Api::auth`] for nothing (`PERMISSION_DENIED`,
//! naming its user): only calls about one user that check it with [`Api::auth_user`] admit it,
//! and only for alice — `GetUser`, `ListPeers` with `user`, `AddPeer`, `RemovePeer`,
//! `UserConfig`, `GetStats` and `WatchStats` with `user`, and `Kick` (within the token's scope). Everything else (listing
//! users or connections, another user, account changes such as `AddUser`, `RemoveUser`,
//! `ExpireUser`, `RenewUser`, tokens, policy, lists) is refused, so a call added later is
//! closed to such tokens until it opts in. Health and reflection stay open to every valid
//! token.

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap, transport::server::UdsConnectInfo};

use super::{
    convert::opt_user,
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
    metadata: &MetadataMap,
    extensions: &tonic::Extensions,
    need: Scope,
) -> Result<(Actor, Option<UserName>), Status> {
    let (actor, only) = if let Some(uds) = extensions.get::<UdsConnectInfo>() {
        match uds.peer_cred.map(|c| c.uid()) {
            Some(0) => (Actor::Local { uid: 0 }, None),
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
            .authenticate_restricted(bearer.trim())
            .map_err(|e| auth_status(&e))?
    };
    let have = actor.scope();
    if !have.allows(need) {
        return Err(auth_status(&AuthError::Scope { have, need }));
    }
    Ok((actor, only))
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

    /// The caller, if it may make a call that needs `need` and is not about one user (a token
    /// restricted to a user is refused; see the module docs).
    pub(super) fn auth<T>(&self, req: &Request<T>, need: Scope) -> Result<Actor, Status> {
        match authorize(&self.svc, req.metadata(), req.extensions(), need)? {
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
        let (actor, only) = authorize(&self.svc, req.metadata(), req.extensions(), need)?;
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
