//! Nothing acknowledged is lost: the real `capybara-agent` is SIGKILLed in the middle of 1000
//! user creations over its API (the control socket, 8 calls in flight at a time), started again
//! on the same data directory and pins, and then
//! - every creation the API acknowledged is there, with its device;
//! - nothing is half-written: every stored user has exactly its one device and every device
//!   its user (a user and its device are one write batch), and the audit trail has one
//!   `user.add` record per stored user;
//! - the kernel's peer table holds exactly the stored devices with their addresses (the agent
//!   programs stored devices at start-up; a device is committed before it is programmed).
//!
//! Creations that were in flight at the kill may or may not be there; if they are, they are
//! whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use capybara_agent::{
    api::client::{Client, Endpoint},
    net::Cidr,
};
use capybara_tests::agent_proc::agent_crate_binary;
use capybara_tests::{
    agent_proc,
    netns::{BpffsDir, NetNs, unique_name},
};
use nix::sys::signal::Signal;

use crate::e2e_support::open_dataplane;

const TOTAL: usize = 1000;
const KILL_AFTER: usize = 400;
const IN_FLIGHT: usize = 8;

fn start_agent(
    bin: &Path,
    ns: &NetNs,
    tunnel: &str,
    data: &Path,
    pins: &Path,
    socket: &Path,
    run: u32,
) -> u32 {
    let log = data.parent().unwrap().join(format!("agent-{run}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["--netns", ns.name(), "--tunnel", tunnel])
        .args([
            "--tunnel-ipv4",
            "10.83.0.1/20",
            "--tunnel-ipv6",
            "fd00:83::1/64",
        ])
        .args(["--listen-port", "51820"])
        .arg("--data-dir")
        .arg(data)
        .arg("--bpffs")
        .arg(pins)
        .arg("--api-socket")
        .arg(socket)
        .args(["--public-endpoint", "192.0.2.1:51820"]);
    agent_proc::start_agent(ns, cmd, &log, Duration::from_secs(30))
}

fn name(i: usize) -> String {
    format!("user{i:04}")
}

#[test]
fn sigkill_during_1000_creations_loses_no_acknowledged_one_and_leaves_none_half_written() {
    let bin = agent_crate_binary("capybara-agent");
    let pins = BpffsDir::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let socket: PathBuf = tmp.path().join("run/agent.sock");
    let ns = NetNs::new("st");
    let tunnel = unique_name("cs");

    let pid = start_agent(&bin, &ns, &tunnel, &data, pins.path(), &socket, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let failed: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    // 8 workers create users 0..1000; the test thread kills the agent once 400 are acknowledged.
    let workers = rt.block_on(async {
        let client = Client::connect(&Endpoint::Unix(socket.clone()))
            .await
            .expect("connect to the agent");
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (0..IN_FLIGHT)
            .map(|_| {
                let (client, next, acked, failed) =
                    (client.clone(), next.clone(), acked.clone(), failed.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= TOTAL {
                            return;
                        }
                        match client.add_user(&name(i), "", 0).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(name(i));
                            }
                            Err(_) => {
                                // The agent is gone: this one and every later one are unknown.
                                failed.lock().unwrap().insert(name(i));
                                return;
                            }
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
    });
    let end = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < KILL_AFTER {
        assert!(
            Instant::now() < end,
            "creations too slow: {}",
            acked.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    ns.kill(pid, Signal::SIGKILL);
    rt.block_on(async {
        for w in workers {
            w.await.expect("worker");
        }
    });
    let acked = acked.lock().unwrap().clone();
    let in_flight = failed.lock().unwrap().clone();
    assert!(
        acked.len() >= KILL_AFTER && acked.len() < TOTAL,
        "killed midway: {}",
        acked.len()
    );
    assert!(!in_flight.is_empty(), "calls were in flight at the kill");

    // Restart on the same data and pins.
    let _pid = start_agent(&bin, &ns, &tunnel, &data, pins.path(), &socket, 2);
    let (users, audit) = rt.block_on(async {
        let c = Client::connect(&Endpoint::Unix(socket.clone()))
            .await
            .expect("connect to the restarted agent");
        let users = c.list_users().await.expect("list users");
        c.user_config("user0000", "", true)
            .await
            .expect("the first user works after the restart");
        let audit = c.audit("", 5000).await.expect("audit");
        (users, audit)
    });

    let stored: BTreeSet<String> = users.iter().map(|u| u.user.name.to_string()).collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged creations lost: {lost:?}");
    let unexpected: Vec<&String> = stored
        .iter()
        .filter(|n| !acked.contains(*n) && !in_flight.contains(*n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "users nobody created: {unexpected:?}"
    );
    for u in &users {
        assert_eq!(
            u.peers.len(),
            1,
            "{} has {} devices (half-written?)",
            u.user.name,
            u.peers.len()
        );
        assert_eq!(u.peers[0].user, u.user.name);
        assert_eq!(u.peers[0].device.as_str(), "default");
    }
    let adds: BTreeSet<&str> = audit
        .iter()
        .filter(|r| r.action == "user.add")
        .map(|r| r.target.trim_start_matches("user:"))
        .collect();
    let stored_refs: BTreeSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(
        adds, stored_refs,
        "one user.add audit record per stored user"
    );

    // The kernel holds exactly the stored devices, with their addresses.
    let dp = open_dataplane(&pins);
    let kernel: BTreeMap<u32, Vec<Cidr>> = dp.peers();
    let want: BTreeMap<u32, Vec<Cidr>> = users
        .iter()
        .flat_map(|u| &u.peers)
        .map(|p| {
            let mut v = vec![
                Cidr::host(IpAddr::V4(p.ipv4)),
                Cidr::host(IpAddr::V6(p.ipv6)),
            ];
            v.sort();
            (p.id, v)
        })
        .collect();
    let kernel_sorted: BTreeMap<u32, Vec<Cidr>> = kernel
        .into_iter()
        .map(|(id, mut v)| {
            v.sort();
            (id, v)
        })
        .collect();
    assert_eq!(kernel_sorted.len(), want.len());
    assert_eq!(
        kernel_sorted, want,
        "kernel peers differ from the stored devices"
    );
    eprintln!(
        "acknowledged {} of {TOTAL} before SIGKILL, {} in flight, {} stored after restart",
        acked.len(),
        in_flight.len(),
        stored.len()
    );
}
