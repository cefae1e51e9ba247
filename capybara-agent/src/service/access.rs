//! Where the TCP API (gRPC and the REST mirror) listens: `capybara api enable|disable|status`.
//!
//! The setting is stored (`policy` family, `server/api-access`, so it is in backups), audited
//! (`api.enable`, `api.disable`) and published like every change; the API layer binds and swaps
//! the listener (`api::access`) and the agent starts with it. Off by default. `--api-listen`
//! given to the agent wins over it at start (the flag is what the admin asked for this run).
//!
//! The rule for a listener (as for `--api-listen`): without TLS only a loopback address
//! (127.0.0.0/8, `::1`, `::ffff:127.x.y.z`), since every call carries a bearer token and some
//! answer keys; any other address without TLS needs `insecure`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{ServiceError, core::Core, domain::Actor};
use crate::{
    service::domain::ValidationError,
    store::{Batch, Cf, keys},
};

/// The default per-token rate limit of the TCP API: calls per second (a burst of twice that).
pub const DEFAULT_RATE_LIMIT: u32 = 100;

/// How the TCP API listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiAccess {
    /// The address (`127.0.0.1:7443`; port 0 = any free port).
    pub listen: SocketAddr,
    /// Certificate chain and private key (PEM files on the agent's host): TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allow a non-loopback address without TLS.
    pub insecure: bool,
    /// Calls per second per token (a burst of twice that); 0 = unlimited.
    pub rate_limit: u32,
}

impl ApiAccess {
    /// Checks the listener rule (module docs): the error names `listen`.
    pub fn check(&self) -> Result<(), ValidationError> {
        if self.tls.is_some() || self.insecure || crate::net::is_loopback(self.listen) {
            return Ok(());
        }
        Err(ValidationError::Value {
            field: "listen",
            reason: format!(
                "{}: refusing to serve the API without TLS on a non-loopback address (bearer \
                 tokens would cross the network in clear text); give a TLS certificate and key, \
                 or insecure to allow it anyway",
                self.listen
            ),
        })
    }

    /// A plain listener on a network address (allowed by `insecure`, logged as a warning).
    pub fn is_insecure(&self) -> bool {
        self.tls.is_none() && !crate::net::is_loopback(self.listen)
    }
}

/// The API access feature.
#[derive(Debug)]
pub struct Access {
    core: Arc<Core>,
}

impl Access {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Access {
        Access { core }
    }

    /// The stored setting; `None` = the TCP API is off.
    pub fn get(&self) -> Result<Option<ApiAccess>, ServiceError> {
        Ok(self.core.store.get(Cf::Policy, keys::API_ACCESS)?)
    }

    /// Stores `access` (`None` turns the TCP API off), audited. The caller (the API layer) has
    /// already bound the listener it describes, so a stored setting always worked once.
    pub fn set(&self, actor: &Actor, access: Option<&ApiAccess>) -> Result<(), ServiceError> {
        if let Some(a) = access {
            a.check()?;
        }
        let _w = self.core.writer.lock().unwrap();
        let before = self.get()?;
        let mut batch = Batch::default();
        match access {
            Some(a) => batch.put(Cf::Policy, keys::API_ACCESS, a)?,
            None => batch.delete(Cf::Policy, keys::API_ACCESS),
        }
        let json = |a: Option<&ApiAccess>| a.and_then(|a| serde_json::to_value(a).ok());
        self.core.audit(
            &mut batch,
            actor,
            if access.is_some() {
                "api.enable"
            } else {
                "api.disable"
            },
            access.map_or_else(|| "api".to_owned(), |a| a.listen.to_string()),
            json(before.as_ref()),
            json(access),
        )?;
        self.core.commit(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, tls: bool, insecure: bool) -> ApiAccess {
        ApiAccess {
            listen: listen.parse().unwrap(),
            tls: tls.then(|| ("c.pem".into(), "k.pem".into())),
            insecure,
            rate_limit: DEFAULT_RATE_LIMIT,
        }
    }

    #[test]
    fn plain_network_listeners_need_tls_or_insecure() {
        for ok in ["127.0.0.1:7443", "[::1]:0", "[::ffff:127.0.0.1]:1"] {
            access(ok, false, false).check().unwrap();
            assert!(!access(ok, false, false).is_insecure());
        }
        for net in ["0.0.0.0:7443", "[::]:7443", "192.0.2.1:1"] {
            let e = access(net, false, false).check().unwrap_err();
            assert_eq!(e.field(), "listen");
            assert!(e.to_string().contains(net), "{e}");
            access(net, true, false).check().unwrap();
            access(net, false, true).check().unwrap();
            assert!(access(net, false, true).is_insecure());
        }
    }
}
