//! MFA end to end at the kernel gate: the control service over the real dataplane (TC programs
//! on the tunnel device) and the real WireGuard tunnel, a stock `wireguard-go` client in a
//! namespace using the config the service generated, and the verification endpoint on the
//! server's tunnel address (what the agent programs at start, `--mfa-port`).
//!
//! The code is given through `VerificationPort::verify` of the service, the call the
//! verification page makes (the page itself, served on the tunnel address and driven by
//! Chromium, is tested with it by its own e2e test). No policy tick runs here: what holds the
//! device again at the end of the MFA lifetime is the kernel alone (`PEER_F_DEADLINE_MFA`).
//! Checked:
//! - MFA on: the device's traffic is dropped and counted as `mfa-pending`, while TCP to the
//!   tunnel address on the MFA port passes the gate (another port does not);
//! - a good code admits it: traffic flows within 1 s;
//! - the lifetime passes (3 s here): held again, counted as `mfa-pending`, the kernel's gate
//!   still the admission with its deadline (nobody rewrote it); the page still reachable;
//! - a used code is refused and keeps it held; a backup code admits once.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use capybara_agent::{
    dataplane::{Dataplane, Gate, L4Proto},
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, ClientConfig, DeviceName, PublicKey, UserName, unix_secs},
        mfa::{MfaConfig, totp},
        verification::{Method, VerificationPort, VerifyError},
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

const NET: u8 = 171;
/// The verification page's port (`--mfa-port`; 80 by default, another one here to show the
/// endpoint follows the setting).
const MFA_PORT: u16 = 8080;
const OTHER_PORT: u16 = 8081;
const LIFETIME: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A TCP echo server in a namespace, stopped on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &NetNs, addr: SocketAddr) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn_thread(move || {
            let l = TcpListener::bind(addr).expect("bind the echo server");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
                        let mut buf = [0u8; 4];
                        if s.read_exact(&mut buf).is_ok() {
                            let _ = s.write_all(&buf);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(WAIT).expect("the echo server is listening");
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tcp_echo(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
            return false;
        };
        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    })
}

/// Fields drop in order: the echo servers, the client, the service, the tunnel, the server
/// namespace, the pins.
struct Lab {
    echo: Vec<Echo>,
    client: Option<GeneratedClient>,
    svc: Service,
    tunnel: Arc<WgTunnel>,
    dp: Arc<Mutex<Dataplane>>,
    server: NetNs,
    _store: tempfile::TempDir,
    _pins: BpffsDir,
}

impl Lab {
    fn new() -> Lab {
        let pins = BpffsDir::new();
        let server = NetNs::new("s");
        let tunnel = Arc::new(start_tunnel(
            &server,
            tunnel_config(
                NET,
                capybara_agent::tunnel::PrivateKey::generate(),
                DEFAULT_OFFLOAD,
            ),
        ));
        let mut dp = open_dataplane(&pins);
        attach_tc(&mut dp, &server, tunnel.name());
        // What the agent does at start with `--mfa-port`.
        dp.set_verification_endpoint(&[server_v4(), server_v6()], &[(L4Proto::Tcp, MFA_PORT)])
            .expect("the verification endpoint");
        let dp = Arc::new(Mutex::new(dp));
        let store = tempfile::tempdir().unwrap();
        let svc = Service::open(
            Arc::new(Store::open(store.path()).unwrap()),
            dp.clone(),
            tunnel.clone(),
            ServiceConfig {
                server_public_key: PublicKey(*tunnel.public_key().as_bytes()),
                ..ServiceConfig::for_tests(
                    &format!("10.{NET}.1.1/24"),
                    &format!("fd01:{NET:x}::1/64"),
                    "unused:1",
                )
            },
        )
        .expect("open the service");
        svc.mfa.configure(MfaConfig {
            lifetime: LIFETIME,
            ..MfaConfig::default()
        });
        let echo = vec![
            Echo::start(&server, SocketAddr::new(server_v4(), MFA_PORT)),
            Echo::start(&server, SocketAddr::new(server_v4(), OTHER_PORT)),
        ];
        Lab {
            echo,
            client: None,
            svc,
            tunnel,
            dp,
            server,
            _store: store,
            _pins: pins,
        }
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

    /// Three pings, none answered.
    fn dropped(&self) -> bool {
        self.client.as_ref().expect("a client").dropped(server_v4())
    }

    fn mfa_drops(&self, id: u32) -> u64 {
        peer_drops(&self.dp, id, DropReason::GateMfaPending)
    }

    fn gate(&self, id: u32) -> Gate {
        self.dp.lock().unwrap().gate(id).expect("gate")
    }

    /// The page is reachable (TCP echo on the MFA port; the first try may wait for the
    /// client's handshake) and another port is not.
    fn only_the_page(&self, what: &str) {
        let end = Instant::now() + WAIT;
        let page = SocketAddr::new(server_v4(), MFA_PORT);
        while !tcp_echo(self.ns(), page) {
            assert!(
                Instant::now() < end,
                "{what}: the MFA port is not reachable"
            );
        }
        assert!(
            !tcp_echo(self.ns(), SocketAddr::new(server_v4(), OTHER_PORT)),
            "{what}: a held device reached another port"
        );
    }
}

fn server_v4() -> IpAddr {
    format!("10.{NET}.1.1").parse().unwrap()
}

fn server_v6() -> IpAddr {
    format!("fd01:{NET:x}::1").parse().unwrap()
}

fn code_at(secret: &[u8], t: SystemTime) -> String {
    totp::code_at_step(secret, totp::step_of(unix_secs(t)))
}

#[test]
fn a_wireguard_go_device_reaches_only_the_page_until_a_code_admits_it_for_the_lifetime() {
    let mut lab = Lab::new();
    let root = Actor::Local { uid: 0 };
    let alice = UserName::parse("user", "alice").unwrap();
    let (_, cfg) = lab
        .svc
        .users
        .add_user(
            &root,
            NewUser {
                name: alice.clone(),
                device: DeviceName::parse("device", "laptop").unwrap(),
                expires_at: None,
            },
        )
        .expect("add user");
    let id = cfg.peer.id;
    let src = IpAddr::V4(cfg.peer.ipv4);
    let enrolment = lab.svc.mfa.enable(&root, &alice, None, None).unwrap();
    let secret = totp::secret_of_uri(&enrolment.uri).unwrap();
    // Confirmed with the previous step's code (within the skew), so the current step's code
    // is still unused for the page below.
    let now = SystemTime::now();
    lab.svc
        .mfa
        .confirm(
            &root,
            &alice,
            &code_at(&secret, now - Duration::from_secs(30)),
        )
        .unwrap();
    assert_eq!(lab.gate(id), Gate::Held(DropReason::GateMfaPending));

    // Held: nothing passes but the page, and the drops are counted as mfa-pending.
    lab.client(&cfg);
    lab.only_the_page("held");
    let before = lab.mfa_drops(id);
    assert!(lab.dropped(), "a held device's ping passed");
    let held_drops = lab.mfa_drops(id) - before;
    eprintln!("held: {held_drops} drops counted as gate-mfa-pending");
    assert!(held_drops >= 3, "{held_drops} drops counted as mfa-pending");

    // A good code, as the page gives it: admitted, traffic flows within 1 s.
    let port: &dyn VerificationPort = &*lab.svc.mfa;
    let v = port
        .verify(src, &code_at(&secret, SystemTime::now()))
        .unwrap();
    let admitted_at = Instant::now();
    assert_eq!(v.method, Method::Totp);
    assert!(
        ping_until(lab.ns(), server_v4(), Duration::from_secs(1)),
        "no ping within 1 s of the code"
    );
    eprintln!(
        "first ping answered {:?} after the code",
        admitted_at.elapsed()
    );
    assert!(tcp_echo(lab.ns(), SocketAddr::new(server_v4(), OTHER_PORT)));
    match lab.gate(id) {
        Gate::MfaAdmitted { until } => {
            let skew = until
                .duration_since(v.until)
                .unwrap_or_else(|e| e.duration());
            assert!(skew < Duration::from_millis(50), "deadline {skew:?} off");
        }
        g => panic!("the kernel's gate is {g:?}, not the MFA admission"),
    }
    // The same code again: refused, nothing changes.
    let again = port.verify(src, &code_at(&secret, SystemTime::now()));
    assert!(
        matches!(again, Err(VerifyError::WrongCode { .. })),
        "{again:?}"
    );

    // The lifetime passes: held again by the kernel alone (no tick, no agent call).
    let left = v
        .until
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(left + Duration::from_millis(300));
    assert!(
        matches!(lab.gate(id), Gate::MfaAdmitted { .. }),
        "someone rewrote the gate: {:?}",
        lab.gate(id)
    );
    let before = lab.mfa_drops(id);
    assert!(lab.dropped(), "traffic passed after the MFA lifetime");
    assert!(
        lab.mfa_drops(id) > before,
        "the drops after the lifetime are not counted as mfa-pending"
    );
    lab.only_the_page("after the lifetime");

    // A backup code admits once.
    let v = port.verify(src, &enrolment.backup_codes[0]).unwrap();
    assert_eq!((v.method, v.backup_codes_left), (Method::Backup, Some(9)));
    assert!(ping_until(lab.ns(), server_v4(), Duration::from_secs(1)));
    let used = port.verify(src, &enrolment.backup_codes[0]);
    assert!(
        matches!(used, Err(VerifyError::WrongCode { .. })),
        "{used:?}"
    );
    drop(lab.echo.drain(..));
}

/// The agent programs the verification endpoint at start: TCP on `--mfa-port` (80 by default)
/// at its tunnel addresses, nothing else.
#[test]
fn the_agent_opens_the_mfa_port_at_its_tunnel_addresses_at_start() {
    use capybara_agent::dataplane::EndpointAddr;
    use capybara_tests::{
        agent_proc::{agent_crate_binary, start_agent},
        netns::unique_name,
    };
    let bin = agent_crate_binary("capybara-agent");
    for (flag, port) in [(None, 80u16), (Some("8443"), 8443)] {
        let pins = BpffsDir::new();
        let ns = NetNs::new("a");
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--netns", ns.name(), "--tunnel", &unique_name("mf")])
            .args([
                "--tunnel-ipv4",
                "10.172.0.1/24",
                "--tunnel-ipv6",
                "fd00:172::1/64",
            ])
            .args(["--listen-port", "51820", "--no-api-socket"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--bpffs")
            .arg(pins.path());
        if let Some(p) = flag {
            cmd.args(["--mfa-port", p]);
        }
        let pid = start_agent(
            &ns,
            cmd,
            &dir.path().join("agent.log"),
            Duration::from_secs(20),
        );
        let dp = open_dataplane(&pins);
        let want: Vec<EndpointAddr> = ["10.172.0.1", "fd00:172::1"]
            .into_iter()
            .map(|a| EndpointAddr {
                addr: a.parse().unwrap(),
                proto: L4Proto::Tcp,
                port,
            })
            .collect();
        assert_eq!(dp.verification_endpoint().unwrap(), want, "{flag:?}");
        drop(dp);
        ns.kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}
