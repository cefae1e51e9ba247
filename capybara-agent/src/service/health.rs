//! What `capybara health` and the standard `grpc.health.v1` service report beyond "the API
//! answers": one status per component, each a real check against the store's devices.
//!
//! | component | healthy when |
//! |---|---|
//! | `store` | a read of the schema versions succeeds |
//! | `dataplane` | the kernel's counters are readable, programs are attached (link pins exist; the in-memory plane of tests has none to check) and every stored device is in the kernel's peer table |
//! | `tunnel` | every stored device is a peer of the WireGuard tunnel |
//! | `history` | always: its detail counts the auth reports dropped since start because the session recorder's bounded queue was full ([`Health::count_auth_drops`]) |
//!
//! Dropped auth reports do not make the agent unhealthy: dropping them is how the recorder
//! survives a handshake flood by design (sessions travel on their own, unbounded queue and are
//! never dropped; the tunnel's auth table keeps counting the failures per source), and a flood
//! anyone can forge must not be able to take the agent out of a load balancer. The count is
//! there for the operator to see (`capybara health`'s DETAIL column, the `Components` RPC).
//!
//! The API publishes each as the health service `capybara.<component>` and the whole agent
//! (`""`) as serving only when all are (refreshed every [`HEALTH_INTERVAL`]).

use std::{
    collections::BTreeSet,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{core::Core, directory::Directory};
use crate::store::Cf;

/// How often the API refreshes the health statuses.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The components, in report order.
pub const COMPONENTS: [&str; 4] = ["store", "dataplane", "tunnel", "history"];

/// One component's health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// `store`, `dataplane`, `tunnel` or `history`.
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
    /// The session recorder's count of dropped auth reports, once the daemon has wired it.
    auth_drops: OnceLock<Arc<AtomicU64>>,
}

impl Health {
    /// The feature over the shared core and directory.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>) -> Health {
        Health {
            core,
            dir,
            auth_drops: OnceLock::new(),
        }
    }

    /// Reports `counter` (the recorder's dropped auth reports,
    /// `history::RecorderSender::auth_drop_counter`) as the `history` component's detail. The
    /// daemon calls it once, when it starts the recorder; later calls are ignored.
    pub fn count_auth_drops(&self, counter: Arc<AtomicU64>) {
        let _ = self.auth_drops.set(counter);
    }

    /// The auth reports the session recorder dropped since start (0 without a recorder).
    pub fn auth_drops(&self) -> u64 {
        self.auth_drops
            .get()
            .map_or(0, |n| n.load(Ordering::Relaxed))
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
        // Never unhealthy: see the module docs.
        let history = Ok(match self.auth_drops.get() {
            Some(n) => format!(
                "auth reports dropped: {} since start",
                n.load(Ordering::Relaxed)
            ),
            None => "no session recorder".to_owned(),
        });
        vec![
            component("store", store),
            component("dataplane", dataplane),
            component("tunnel", tunnel),
            component("history", history),
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
        assert_eq!(h[3].detail, "no session recorder");

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

    #[test]
    fn dropped_auth_reports_are_counted_in_the_history_detail_and_stay_healthy() {
        use crate::service::history::{SessionEvent, recorder_channel};

        let dir = tempfile::tempdir().unwrap();
        let svc = Service::open(
            Arc::new(Store::open(dir.path()).unwrap()),
            Arc::new(MemoryPlane::default()),
            Arc::new(MemoryTunnel::default()),
            ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "e:1"),
        )
        .unwrap();
        // The recorder is not running: its queue fills, then every further report is dropped.
        let (tx, _rx) = recorder_channel(4);
        svc.health.count_auth_drops(tx.auth_drop_counter());
        let history = |svc: &Service| svc.health.check().pop().unwrap();
        assert_eq!(
            history(&svc),
            ComponentHealth {
                name: "history".into(),
                ok: true,
                detail: "auth reports dropped: 0 since start".into(),
            }
        );
        for _ in 0..4 + 7 {
            assert!(tx.send(SessionEvent::AuthFailed {
                source: "192.0.2.1:1".parse().unwrap(),
                key: None,
                reason: "bad-mac",
                at: std::time::SystemTime::now(),
            }));
        }
        let h = svc.health.check();
        assert_eq!(h[3].detail, "auth reports dropped: 7 since start");
        assert!(
            h.iter().all(|c| c.ok),
            "a flood must not make the agent unhealthy: {h:?}"
        );
    }
}
