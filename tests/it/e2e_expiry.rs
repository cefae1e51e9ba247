//! Account expiry end to end: the control service over the real dataplane (TC programs on the
//! tunnel device) and the real WireGuard tunnel, with a stock `wireguard-go` client using the
//! config the service generated.
//!
//! The service here runs no policy tick at all (nothing but the test calls it): whatever cuts the
//! device at its expiry is the kernel's admission deadline alone. Checked:
//! - a user added with `--expires`: ping through the tunnel passes before the expiry; after it
//!   the gate drops the traffic both ways, counted under `gate-expired` in the peer's kernel
//!   counters, while the gate in the kernel is still the admission with its deadline (nobody
//!   rewrote it);
//! - `renew` admits the device again; `expire --at` on the live user cuts it at the new time;
//! - an agent restart (the service opened again over the same store, pins and tunnel) programs
//!   the deadline again, even over a kernel gate that had lost it (as an agent from before this
//!   fix left it), and the device is cut at that time.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use capybara_agent::{
    dataplane::{Dataplane, Gate},
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, ClientConfig, DeviceName, PublicKey, UserName, from_unix_secs, unix_secs},
    },
    store::Store,
    tunnel::{DEFAULT_OFFLOAD, WgTunnel},
};
use capybara_common::drop::DropReason;
use capybara_tests::{
    netns::{BpffsDir, NetNs},
    wg::{ping_until, start_tunnel, tunnel_config},
};

use crate::e2e_support::{GeneratedClient, WAIT, attach_tc, open_dataplane, peer_drops};

const NET: u8 = 163;

/// Fields drop in order: the client, the service, the tunnel, the server namespace, pins.
struct Lab {
    client: Option<GeneratedClient>,
    svc: Option<Service>,
    tunnel: Arc<WgTunnel>,
    dp: Arc<Mutex<Dataplane>>,
    server: NetNs,
    store: tempfile::TempDir,
    _pins: BpffsDir,
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn alice() -> UserName {
    UserName::parse("user", "alice").unwrap()
}

/// `t` in whole seconds (the store keeps expiries in seconds).
fn whole(t: SystemTime) -> SystemTime {
    from_unix_secs(unix_secs(t))
}

impl Lab {
    fn new() -> Lab {
        let pins = BpffsDir::new();
        let server = NetNs::new("s");
        let tunnel = start_tunnel(
            &server,
            tunnel_config(
                NET,
                capybara_agent::tunnel::PrivateKey::generate(),
                DEFAULT_OFFLOAD,
            ),
        );
        let mut dp = open_dataplane(&pins);
        attach_tc(&mut dp, &server, tunnel.name());
        let mut lab = Lab {
            client: None,
            svc: None,
            tunnel: Arc::new(tunnel),
            dp: Arc::new(Mutex::new(dp)),
            server,
            store: tempfile::tempdir().unwrap(),
            _pins: pins,
        };
        lab.open();
        lab
    }

    /// Opens the service (an agent start: reconcile and policy applied).
    fn open(&mut self) {
        let server_key = PublicKey(*self.tunnel.public_key().as_bytes());
        self.svc = Some(
            Service::open(
                Arc::new(Store::open(self.store.path()).unwrap()),
                self.dp.clone(),
                self.tunnel.clone(),
                ServiceConfig {
                    server_public_key: server_key,
                    ..ServiceConfig::for_tests(
                        &format!("10.{NET}.1.1/24"),
                        &format!("fd01:{NET:x}::1/64"),
                        "unused:1",
                    )
                },
            )
            .expect("open the service"),
        );
    }

    fn svc(&self) -> &Service {
        self.svc.as_ref().expect("the service is open")
    }

    /// A wireguard-go client with the agent-generated `cfg`.
    fn client(&mut self, cfg: &ClientConfig) {
        self.client = Some(GeneratedClient::start(
            &self.server,
            self.tunnel.listen_port(),
            NET,
            NET + 1,
            cfg,
        ));
    }

    fn ns(&self) -> &NetNs {
        &self.client.as_ref().expect("a client").ns
    }

    fn server_v4(&self) -> IpAddr {
        format!("10.{NET}.1.1").parse().unwrap()
    }

    fn passes(&self) -> bool {
        ping_until(self.ns(), self.server_v4(), WAIT)
    }

    /// Three pings, none answered.
    fn dropped(&self) -> bool {
        self.client
            .as_ref()
            .expect("a client")
            .dropped(self.server_v4())
    }

    fn expired_drops(&self, id: u32) -> u64 {
        peer_drops(&self.dp, id, DropReason::GateExpired)
    }

    fn gate(&self, id: u32) -> Gate {
        self.dp.lock().unwrap().gate(id).expect("gate")
    }

    /// Sleeps until `t` plus a margin.
    fn wait_past(t: SystemTime) {
        let left = t.duration_since(SystemTime::now()).unwrap_or_default();
        std::thread::sleep(left + Duration::from_millis(300));
    }

    /// Asserts the kernel holds device `id` by the deadline `at`, which is now past: the gate
    /// is still the admission with that deadline, traffic is dropped and counted as expired.
    fn assert_cut_by_the_kernel(&self, id: u32, at: SystemTime, what: &str) {
        match self.gate(id) {
            Gate::Admitted { until: Some(t) } => {
                let skew = t.duration_since(at).unwrap_or_else(|e| e.duration());
                assert!(
                    skew < Duration::from_millis(50),
                    "{what}: deadline {skew:?} off"
                );
            }
            g => panic!("{what}: the kernel's gate is {g:?}, not the admission deadline"),
        }
        let before = self.expired_drops(id);
        assert!(self.dropped(), "{what}: traffic passed after the expiry");
        let after = self.expired_drops(id);
        eprintln!("{what}: {} drops counted as gate-expired", after - before);
        assert!(after > before, "{what}: no drop counted as gate-expired");
    }
}

#[test]
fn the_kernel_cuts_a_wireguard_go_device_at_its_users_expiry() {
    let mut lab = Lab::new();
    // Added with an expiry (the program path): admitted until then.
    let at = whole(SystemTime::now() + Duration::from_secs(8));
    let (_, cfg) = lab
        .svc()
        .users
        .add_user(
            &root(),
            NewUser {
                name: alice(),
                device: DeviceName::parse("device", "laptop").unwrap(),
                expires_at: Some(at),
            },
        )
        .expect("add user");
    let id = cfg.peer.id;
    lab.client(&cfg);
    assert!(lab.passes(), "no ping through the tunnel before the expiry");
    Lab::wait_past(at);
    lab.assert_cut_by_the_kernel(id, at, "added with an expiry");

    // Renewed: admitted again, no deadline.
    lab.svc().users.renew_user(&root(), &alice(), None).unwrap();
    assert_eq!(lab.gate(id), Gate::Admitted { until: None });
    assert!(lab.passes(), "no ping after renew");

    // `expire` on the live user: cut at the new time.
    let at = whole(SystemTime::now() + Duration::from_secs(5));
    lab.svc().users.expire_user(&root(), &alice(), at).unwrap();
    assert!(lab.passes(), "no ping before the new expiry");
    Lab::wait_past(at);
    lab.assert_cut_by_the_kernel(id, at, "expire on a live user");

    // A restart programs the deadline again, even over a kernel gate that lost it.
    let at = whole(SystemTime::now() + Duration::from_secs(10));
    lab.svc().users.expire_user(&root(), &alice(), at).unwrap();
    lab.svc = None;
    lab.dp
        .lock()
        .unwrap()
        .set_gate(id, Gate::Admitted { until: None })
        .unwrap();
    lab.open();
    assert!(
        matches!(lab.gate(id), Gate::Admitted { until: Some(_) }),
        "no deadline after the restart: {:?}",
        lab.gate(id)
    );
    assert!(lab.passes(), "no ping after the restart, before the expiry");
    Lab::wait_past(at);
    lab.assert_cut_by_the_kernel(id, at, "after a restart");
}
