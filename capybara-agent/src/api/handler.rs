//! [`Api`], the implementation of every `capybara.v1` service (each feature's file implements
//! its services for it): who is calling and may they ([`Api::auth`], see `server` for the
//! rules), and running a service call on the blocking pool until what it wrote is on disk
//! ([`Api::call`]).

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap, transport::server::UdsConnectInfo};

use super::status::{auth_status, status_of};
use crate::service::{
    AuthError, Service, ServiceError,
    domain::{Actor, Scope},
};

/// Who is calling, and may they do what needs `need`?
pub(super) fn authorize(
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
