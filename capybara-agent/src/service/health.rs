//! What `capybara health` and the standard `grpc.health.v1` service report beyond "the API
//! answers": one status per component, each a real check against the store's devices.
//!
//! | component | healthy when |
//! |---|---|
//! | `store` | a read of the schema versions and a synced write of a probe key (`health/probe` in `meta`) succeed |
//! | `dataplane` | the kernel's counters are readable, programs are attached (link pins exist; with the links the daemon names, [`Health::watch_links`], the TC programs on the tunnel device and the XDP guard on the uplink each have theirs and the devices exist; the in-memory plane of tests has none to check) and every stored device is in the kernel's peer table |
//! | `tunnel` | the tunnel's threads (`wg-udp-<i>`, `wg-tun-<i>` per worker, `wg-timers`, `wg-uapi`) all run and every stored device is a peer of the WireGuard tunnel |
//! | `history` | always: its detail counts the auth reports dropped since start because the session recorder's bounded queue was full ([`Health::count_auth_drops`]) |
//! | `uplink` | the uplink exists and is up, administratively and operationally (`IFF_UP` and `IFF_RUNNING`, read with `SIOCGIFFLAGS` in the agent's network namespace: [`crate::net::link_state`]); always healthy without an uplink |
//!
//! Dropped auth reports do not make the agent unhealthy: dropping them is how the recorder
//! survives a handshake flood by design (sessions travel on their own, unbounded queue and are
//! never dropped; the tunnel's auth table keeps counting the failures per source), and a flood
//! anyone can forge must not be able to take the agent out of a load balancer. The count is
//! there for the operator to see (`capybara health`'s DETAIL column, the `Components` RPC).
//!
//! The API publishes each as the health service `capybara.<component>` and the whole agent
//! (`""`) as serving only when all are (refreshed every [`HEALTH_INTERVAL`]).
//!
//! ## `server-down` / `server-up`
//! [`Health::check_and_report`] checks and hands a webhook event to the outbox for each
//! component whose state changed since the last one reported: `server-down` when it became
//! unhealthy, `server-up` when it recovered (`data.component`, `data.detail`; `server-up` also
//! `data.down_since`, RFC 3339). A component never reported is taken as healthy, so an agent
//! starting healthy reports nothing. The daemon's health watcher calls it every
//! `--health-interval` (default 5 s: a transition is reported within that interval plus one
//! check), and so do the `Components` RPC (`capybara health`, which a scheduled `health` task
//! runs) and the API's periodic refresh of the `grpc.health.v1` statuses: whoever sees a
//! transition first reports it, once (one lock orders them). The last reported state of each
//! component is kept in the store (`health/reported/<component>` in `meta`) once the event is
//! handed over, so a restart neither repeats nor loses a transition; while the store fails
//! writes the state is kept in memory and written at the first check that can.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::Core,
    directory::Directory,
    notify::{Notification, NotifyKind},
};
use crate::{net::LinkState, store::Cf};

/// How often the API refreshes the health statuses.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The components, in report order.
pub const COMPONENTS: [&str; 5] = ["store", "dataplane", "tunnel", "history", "uplink"];

/// Store key prefix (family `meta`) of each component's last reported state.
const REPORTED: &str = "health/reported/";

/// How a device's state is read: [`crate::net::link_state`] in the agent; tests give their
/// own.
pub type LinkProbe = Arc<dyn Fn(&str) -> std::io::Result<Option<LinkState>> + Send + Sync>;

/// What the daemon attached programs to, for the `dataplane` and `uplink` checks.
#[derive(Clone)]
pub struct Links {
    /// The tunnel device (TC ingress and egress).
    pub tunnel: String,
    /// The uplink (XDP guard), if any.
    pub uplink: Option<String>,
    /// Reads a device's state.
    pub probe: LinkProbe,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("tunnel", &self.tunnel)
            .field("uplink", &self.uplink)
            .finish_non_exhaustive()
    }
}

/// A component's last reported state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Reported {
    ok: bool,
    detail: String,
    /// Unix seconds.
    since: u64,
}

/// The reported states in memory: loaded from the store at first use; `dirty` ones still to
/// be written.
#[derive(Debug, Default)]
struct ReportedStates {
    loaded: bool,
    states: BTreeMap<String, Reported>,
    dirty: BTreeSet<String>,
}

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
    /// The devices programs are attached to, once the daemon has named them.
    links: OnceLock<Links>,
    /// The last reported state per component (see the module docs).
    reported: Mutex<ReportedStates>,
}

impl Health {
    /// The feature over the shared core and directory.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>) -> Health {
        Health {
            core,
            dir,
            auth_drops: OnceLock::new(),
            links: OnceLock::new(),
            reported: Mutex::new(ReportedStates::default()),
        }
    }

    /// Names the tunnel device and the uplink the programs are attached to (the daemon, once
    /// at start; later calls are ignored).
    pub fn watch_links(&self, links: Links) {
        let _ = self.links.set(links);
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
                Some(_) => Ok(()),
                None => Err("schema versions missing".to_owned()),
            })
            .and_then(|()| {
                self.core
                    .store
                    .put(Cf::Meta, "health/probe", &super::core::now())
                    .map_err(|e| format!("write failed: {e}"))
            })
            .map(|()| format!("{} readable and writable", self.core.store.path().display()));
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
                Some(links) => {
                    self.expected_links(&links)?;
                    format!("{} programs attached", links.len())
                }
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
        let dead = self.core.tunnel.dead_threads();
        let tunnel = if !dead.is_empty() {
            Err(format!("tunnel threads dead: {}", dead.join(", ")))
        } else {
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
            component("uplink", self.uplink()),
        ]
    }

    /// With the links the daemon named: each expected program's link pin is there and its
    /// device exists.
    fn expected_links(&self, pins: &[String]) -> Result<(), String> {
        use capybara_common::maps::{PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP_GUARD};
        let Some(l) = self.links.get() else {
            return Ok(());
        };
        let mut want = vec![(PROG_TC_INGRESS, &l.tunnel), (PROG_TC_EGRESS, &l.tunnel)];
        if let Some(u) = &l.uplink {
            want.push((PROG_XDP_GUARD, u));
        }
        let mut missing = Vec::new();
        for (prog, dev) in want {
            if matches!((l.probe)(dev), Ok(None)) {
                missing.push(format!("{prog} on {dev} (device gone)"));
            } else if !pins.iter().any(|p| *p == format!("{prog}_{dev}")) {
                missing.push(format!("{prog} on {dev}"));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("detached: {}", missing.join(", ")))
        }
    }

    /// The uplink's operational state (see the module docs).
    fn uplink(&self) -> Result<String, String> {
        let Some((l, u)) = self.links.get().and_then(|l| Some((l, l.uplink.as_ref()?))) else {
            return Ok("no uplink".to_owned());
        };
        match (l.probe)(u) {
            Ok(Some(LinkState { up: false, .. })) => Err(format!("{u} is down (administratively)")),
            Ok(Some(LinkState { running: false, .. })) => Err(format!("{u} is down (no carrier)")),
            Ok(Some(_)) => Ok(format!("{u} is up")),
            Ok(None) => Err(format!("{u} is gone")),
            Err(e) => Err(format!("{u}: state unreadable: {e}")),
        }
    }

    /// Checks each component and reports every transition since the last one reported
    /// (`server-down`, `server-up`; see the module docs). Returns the check.
    pub fn check_and_report(&self) -> Vec<ComponentHealth> {
        let comps = self.check();
        if let Err(e) = self.report(&comps, SystemTime::now()) {
            tracing::warn!(error = %e, "cannot report a health transition; retrying at the next check");
        }
        comps
    }

    /// Hands `server-down` / `server-up` to the outbox for each component of `comps` whose
    /// state differs from the last reported one, and keeps the new state.
    pub fn report(&self, comps: &[ComponentHealth], at: SystemTime) -> Result<(), ServiceError> {
        let mut r = self.reported.lock().unwrap();
        if !r.loaded {
            for (key, rec) in self.core.store.scan::<Reported>(Cf::Meta, REPORTED)? {
                r.states.insert(key[REPORTED.len()..].to_owned(), rec);
            }
            r.loaded = true;
        }
        for c in comps {
            let was_ok = r.states.get(&c.name).is_none_or(|p| p.ok);
            if was_ok == c.ok {
                continue;
            }
            let mut n = Notification::new(if c.ok {
                NotifyKind::ServerUp
            } else {
                NotifyKind::ServerDown
            });
            n.at = at;
            n.data = serde_json::json!({ "component": c.name, "detail": c.detail });
            if let Some(p) = r.states.get(&c.name).filter(|_| c.ok) {
                n.data["down_since"] =
                    chrono::DateTime::<chrono::Utc>::from(super::domain::from_unix_secs(p.since))
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        .into();
            }
            if c.ok {
                tracing::info!(component = %c.name, detail = %c.detail, "component recovered");
            } else {
                tracing::error!(component = %c.name, detail = %c.detail, "component down");
            }
            self.core.notify(n)?;
            r.states.insert(
                c.name.clone(),
                Reported {
                    ok: c.ok,
                    detail: c.detail.clone(),
                    since: super::domain::unix_secs(at),
                },
            );
            r.dirty.insert(c.name.clone());
        }
        // Written once handed over; kept for the next check while the store fails.
        let dirty = std::mem::take(&mut r.dirty);
        let mut batch = crate::store::Batch::default();
        for name in &dirty {
            batch.put(Cf::Meta, &format!("{REPORTED}{name}"), &r.states[name])?;
        }
        if let Err(e) = self.core.store.commit(batch) {
            r.dirty = dirty;
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::service::testing::open_service;

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
        let svc = open_service(
            dir.path(),
            Arc::new(MemoryPlane::default()),
            ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "e:1"),
        );
        // The recorder is not running: its queue fills, then every further report is dropped.
        let (tx, _rx) = recorder_channel(4);
        svc.health.count_auth_drops(tx.auth_drop_counter());
        let history = |svc: &Service| {
            svc.health
                .check()
                .into_iter()
                .find(|c| c.name == "history")
                .unwrap()
        };
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

    #[test]
    fn each_transition_is_reported_once_and_survives_a_restart() {
        use crate::service::{ServiceEvent, notify::NotifyKind};
        let dir = tempfile::tempdir().unwrap();
        // The devices as the probe sees them.
        let devices: Arc<Mutex<BTreeMap<String, LinkState>>> = Arc::new(Mutex::new(
            ["wg-h", "up-h"]
                .map(|d| {
                    (
                        d.to_owned(),
                        LinkState {
                            up: true,
                            running: true,
                        },
                    )
                })
                .into(),
        ));
        let operstate = |running: bool| {
            devices.lock().unwrap().get_mut("up-h").unwrap().running = running;
        };
        let plane = Arc::new(MemoryPlane::default());
        plane.with(|s| {
            s.links = Some(vec![
                "tc_egress_wg-h".into(),
                "tc_ingress_wg-h".into(),
                "xdp_guard_up-h".into(),
            ])
        });
        let tunnel = Arc::new(MemoryTunnel::default());
        let open = || {
            let svc = Service::open(
                Arc::new(Store::open(dir.path()).unwrap()),
                plane.clone(),
                tunnel.clone(),
                ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "e:1"),
            )
            .unwrap();
            svc.health.watch_links(Links {
                tunnel: "wg-h".into(),
                uplink: Some("up-h".into()),
                probe: {
                    let devices = devices.clone();
                    Arc::new(move |d: &str| Ok(devices.lock().unwrap().get(d).copied()))
                },
            });
            svc
        };
        let events = |rx: &mut tokio::sync::broadcast::Receiver<ServiceEvent>| {
            let mut out = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                if let ServiceEvent::Notified(n) = ev {
                    out.push((
                        n.kind,
                        n.data["component"].as_str().unwrap().to_owned(),
                        n.data,
                    ));
                }
            }
            out
        };
        let svc = open();
        let mut bus = svc.events().subscribe();
        // Healthy at start: nothing to report.
        let h = svc.health.check_and_report();
        assert!(h.iter().all(|c| c.ok), "{h:?}");
        assert_eq!(h[4].detail, "up-h is up");
        assert!(events(&mut bus).is_empty());

        // A tunnel thread dies, the uplink goes down, the XDP guard is detached.
        tunnel.dead.lock().unwrap().push("wg-udp".into());
        operstate(false);
        plane.with(|s| s.links.as_mut().unwrap().retain(|l| !l.starts_with("xdp")));
        svc.health.check_and_report();
        let ev = events(&mut bus);
        let downs: Vec<(NotifyKind, &str)> = ev.iter().map(|(k, c, _)| (*k, c.as_str())).collect();
        assert_eq!(
            downs,
            [
                (NotifyKind::ServerDown, "dataplane"),
                (NotifyKind::ServerDown, "tunnel"),
                (NotifyKind::ServerDown, "uplink"),
            ]
        );
        assert_eq!(ev[0].2["detail"], "detached: xdp_guard on up-h");
        assert_eq!(ev[1].2["detail"], "tunnel threads dead: wg-udp");
        assert_eq!(ev[2].2["detail"], "up-h is down (no carrier)");
        // Still down: not again.
        svc.health.check_and_report();
        assert!(events(&mut bus).is_empty());

        // A restart with the tunnel thread still dead repeats nothing; the uplink recovered
        // while the agent was down is reported.
        drop(svc);
        operstate(true);
        let svc = open();
        let mut bus = svc.events().subscribe();
        svc.health.check_and_report();
        let ev = events(&mut bus);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].0, ev[0].1.as_str()),
            (NotifyKind::ServerUp, "uplink")
        );
        assert!(ev[0].2["down_since"].is_string(), "{}", ev[0].2);

        // The Health RPC's path sees the rest recover.
        tunnel.dead.lock().unwrap().clear();
        plane.with(|s| s.links.as_mut().unwrap().push("xdp_guard_up-h".into()));
        svc.health.check_and_report();
        let ups: Vec<(NotifyKind, String)> = events(&mut bus)
            .into_iter()
            .map(|(k, c, _)| (k, c))
            .collect();
        assert_eq!(
            ups,
            [
                (NotifyKind::ServerUp, "dataplane".to_owned()),
                (NotifyKind::ServerUp, "tunnel".to_owned()),
            ]
        );
        // The device itself gone.
        devices.lock().unwrap().remove("up-h");
        let h = svc.health.check_and_report();
        assert!(
            !h[1].ok && h[1].detail.contains("xdp_guard on up-h (device gone)"),
            "{h:?}"
        );
        assert_eq!(h[4].detail, "up-h is gone");
    }
}
