//! What `capybara health` and the standard `grpc.health.v1` service report beyond "the API
//! answers": one status per component, each a real check against the store's devices.
//!
//! | component | healthy when |
//! |---|---|
//! | `store` | a read of the schema versions succeeds |
//! | `dataplane` | the kernel's counters are readable, programs are attached (link pins exist; the in-memory plane of tests has none to check) and every stored device is in the kernel's peer table |
//! | `tunnel` | every stored device is a peer of the WireGuard tunnel |
//!
//! The API publishes each as the health service `capybara.<component>` and the whole agent
//! (`""`) as serving only when all are (refreshed every [`HEALTH_INTERVAL`]).

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::{core::Core, directory::Directory};
use crate::store::Cf;

/// How often the API refreshes the health statuses.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The components, in report order.
pub const COMPONENTS: [&str; 3] = ["store", "dataplane", "tunnel"];

/// One component's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// `store`, `dataplane` or `tunnel`.
    pub name: String,
    /// Whether it is healthy.
    pub ok: bool,
    /// What was found (or what is wrong).
    pub detail: String,
}

fn component(name: &str, r: Result<String, String>) -> ComponentHealth {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    ComponentHealth {
        name: name.to_owned(),
        ok,
        detail,
    }
}

/// The health feature.
#[derive(Debug)]
pub struct Health {
    core: Arc<Core>,
    dir: Arc<Directory>,
}

impl Health {
    /// The feature over the shared core and directory.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>) -> Health {
        Health { core, dir }
    }

    /// Checks each component (see the module docs).
    pub fn check(&self) -> Vec<ComponentHealth> {
        let store = self
            .core
            .store
            .get::<u32>(Cf::Meta, "schema/users")
            .map_err(|e| format!("read failed: {e}"))
            .and_then(|v| match v {
                Some(_) => Ok(format!("{} readable", self.core.store.path().display())),
                None => Err("schema versions missing".to_owned()),
            });
        let (ids, keys): (BTreeSet<u32>, BTreeSet<_>) = self.dir.ids_and_keys();
        let dataplane = (|| {
            self.core
                .plane
                .drops()
                .map_err(|e| format!("counters unreadable: {e}"))?;
            let programs = match self
                .core
                .plane
                .attached()
                .map_err(|e| format!("link pins unreadable: {e}"))?
            {
                Some(links) if links.is_empty() => return Err("no program attached".into()),
                Some(links) => format!("{} programs attached", links.len()),
                None => "no programs (in-memory)".to_owned(),
            };
            let kernel = self.core.plane.peers();
            let missing = ids.iter().filter(|i| !kernel.contains_key(i)).count();
            if missing > 0 {
                return Err(format!(
                    "{missing} of {} devices missing from the kernel's peer table",
                    ids.len()
                ));
            }
            Ok(format!("{programs}, {} peers", kernel.len()))
        })();
        let tunnel = {
            let peers = self.core.tunnel.peers();
            let have: BTreeSet<_> = peers.iter().map(|p| p.key).collect();
            let missing = keys.difference(&have).count();
            let handshaken = peers.iter().filter(|p| p.last_handshake.is_some()).count();
            if missing > 0 {
                Err(format!(
                    "{missing} of {} devices missing from the tunnel",
                    keys.len()
                ))
            } else {
                Ok(format!(
                    "{} peers, {handshaken} with a handshake",
                    peers.len()
                ))
            }
        };
        vec![
            component("store", store),
            component("dataplane", dataplane),
            component("tunnel", tunnel),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        service::{
            NewUser, Service, ServiceConfig,
            domain::{Actor, DeviceName, UserName},
            ports::TunnelPort,
            testing::{MemoryPlane, MemoryTunnel},
        },
        store::Store,
    };

    #[test]
    fn each_component_reports_devices_missing_from_the_kernel_or_the_tunnel() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(MemoryPlane::default());
        let tunnel = Arc::new(MemoryTunnel::default());
        let svc = Service::open(
            Arc::new(Store::open(dir.path()).unwrap()),
            plane.clone(),
            tunnel.clone(),
            ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "e:1"),
        )
        .unwrap();
        let peer = svc
            .users
            .add_user(
                &Actor::Local { uid: 0 },
                NewUser {
                    name: UserName::parse("name", "alice").unwrap(),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
            )
            .unwrap()
            .1
            .peer;
        let h = svc.health.check();
        let names: Vec<&str> = h.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, COMPONENTS);
        assert!(h.iter().all(|c| c.ok), "{h:?}");
        assert_eq!(h[2].detail, "1 peers, 0 with a handshake");

        // Someone removed the peer behind the agent's back.
        plane.with(|s| s.peers.clear());
        tunnel.remove_peer(&peer.public_key).unwrap();
        let h = svc.health.check();
        assert!(h[0].ok);
        assert!(
            !h[1].ok && h[1].detail.contains("1 of 1 devices missing"),
            "{h:?}"
        );
        assert!(
            !h[2].ok && h[2].detail.contains("missing from the tunnel"),
            "{h:?}"
        );
    }
}
