//! The cluster's membership on a real etcd (issue 25): three etcd members (Debian's `etcd`) and
//! three agents on one LAN ([`capybara_tests::cluster`]), each agent a node with a 4 s lease.
//!
//! - All three nodes are listed by `cluster status` on any of them, each once, the asking node
//!   marked; `cluster health` sees three reachable members, one leader, and the node's lease.
//! - A node SIGKILLed leaves the list when its lease expires: within its TTL (4 s) plus a
//!   renewal period, well inside the 30 s the issue allows; measured and printed.
//! - A node stopped cleanly leaves at once (it revokes its lease).
//! - One etcd member killed: the cluster keeps answering and `health` says 2 of 3, healthy.
//!   Two killed: `status` fails with a clear error and `health` is unhealthy; with the members
//!   back, the node is listed again (it re-grants its lease by itself).
//!   Without a quorum a change (`user add`) is refused with the cluster's error and nothing
//!   changes.
//! - **TLS**: members serving `https://` with required client certificates (a throw-away CA):
//!   a node with the CA and a client certificate joins; a node with the CA only gets no lease,
//!   and its `cluster health` says each member refused it.
//! - **Shared state**: n1 seeds the empty cluster with the user it had; n2, a new node, reads
//!   everything; a user added on n2 is on n1 within 1 s (the issue's bound; measured and
//!   printed) and its client, configured for n1, gets through n1; a quota set on n1 reaches n2's
//!   kernel (a bucket); a node stopped while the others change things resumes from its
//!   revision when it starts again (no full read) and has them; a removal propagates too.
//! - **Failover and fencing**: two nodes of a failover group (one service address on the LAN,
//!   one server key); `cluster failover enable` (the design line, verbatim) elects one, which
//!   holds the address; a client on the LAN configured with the address gets through. SIGKILL
//!   the primary: the other takes the address and the client's traffic resumes with its
//!   original config within 30 s (measured and printed), and raises `server-down` for the lost
//!   primary, which reaches a webhook receiver (Python `standardwebhooks`, one in each node's
//!   namespace on the same loopback port: the endpoint is shared, each node delivers its own
//!   events). The killed node comes back as the
//!   standby; then the primary's LAN link goes down (cut off from etcd): it fences itself
//!   (admits no new sessions, releases the address) and only then does the other take the
//!   address. A sampler reads every live node's addresses every 20 ms throughout: at no sample
//!   do two hold it.
//!
//! Slow for a reason: etcd's start and elections (about 2 s), three debug agents (about 2 s
//! each), waits bounded by the lease's TTL, and in the failover test the client's own retry:
//! wireguard-go sends a new handshake 15 s (keepalive 10 s + rekey 5 s) after its last answer.

use std::time::{Duration, Instant};

use capybara_tests::cluster::{Etcd, Lan, Node};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The nodes `cluster status` lists on `node`, by name (none while it fails).
fn listed(node: &Node) -> Vec<String> {
    let o = node.lab.run(&["--json", "cluster", "status"]);
    if !o.status.success() {
        eprintln!(
            "{}: cluster status failed: {}",
            node.name,
            String::from_utf8_lossy(&o.stderr)
        );
        return Vec::new();
    }
    let s: Value = serde_json::from_slice(&o.stdout).expect("status's JSON");
    s["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .map(|n| n["record"]["name"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (≤ `within`) until `f` holds; returns how long it took.
fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn nodes_join_leave_by_lease_and_ride_out_a_lost_etcd_member() {
    let lan = Lan::new(171);
    let mut etcd = Etcd::start(&lan);
    let nodes: Vec<Node> = (0..3u8)
        .map(|i| {
            Node::start(
                &lan,
                &etcd,
                &format!("n{}", i + 1),
                11 + i,
                (173 + 4 * i, 175 + 4 * i),
                "4s",
            )
        })
        .collect();
    let all = ["n1", "n2", "n3"].map(String::from).to_vec();
    for n in &nodes {
        wait(
            &format!("{} lists every node", n.name),
            Duration::from_secs(15),
            || listed(n) == all,
        );
    }
    let s = nodes[0].lab.json(&["cluster", "status"]);
    eprintln!("{s:#}");
    assert_eq!(s["clustered"], true);
    assert_eq!(s["node"], "n1");
    let rows = s["nodes"].as_array().unwrap();
    let this: Vec<&Value> = rows.iter().filter(|n| n["this_node"] == true).collect();
    assert_eq!(this.len(), 1, "{s:#}");
    assert_eq!(this[0]["record"]["name"], "n1");
    assert!(rows.iter().all(|n| n["lease_ttl_s"] == 4), "{s:#}");
    let table = nodes[1].lab.capybara(&["cluster", "status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("n2 ") && l.contains("(this node)")),
        "{table}"
    );
    let h = nodes[0].lab.json(&["cluster", "health"]);
    eprintln!("{h:#}");
    assert_eq!(h["healthy"], true, "{h:#}");
    assert_eq!(h["lease_held"], true);
    let members = h["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["reachable"] == true), "{h:#}");
    assert_eq!(
        members.iter().filter(|m| m["leader"] == true).count(),
        1,
        "one leader: {h:#}"
    );

    // SIGKILL n3: gone when its lease expires.
    nodes[2].lab.server.kill(nodes[2].pid, Signal::SIGKILL);
    let gone = wait("n3 leaves the list", Duration::from_secs(30), || {
        listed(&nodes[0]) == ["n1", "n2"]
    });
    eprintln!("n3 (SIGKILL) left the list after {gone:?} (lease TTL 4 s)");
    // Its TTL and one renewal period at most, with room for a slow read.
    assert!(gone <= Duration::from_secs(8), "{gone:?}");

    // A clean stop of n2 revokes its lease: gone at once.
    nodes[1].lab.server.kill(nodes[1].pid, Signal::SIGTERM);
    let gone = wait("n2 leaves the list", Duration::from_secs(10), || {
        listed(&nodes[0]) == ["n1"]
    });
    eprintln!("n2 (SIGTERM) left the list after {gone:?}");
    assert!(
        gone <= Duration::from_secs(2),
        "{gone:?}: not revoked at stop"
    );

    // One etcd member down: still answering, 2 of 3 reachable, healthy.
    etcd.kill(&lan, 2);
    assert_eq!(listed(&nodes[0]), ["n1"]);
    let h = nodes[0].lab.json(&["cluster", "health"]);
    let reachable = h["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["reachable"] == true)
        .count();
    assert_eq!((reachable, &h["healthy"]), (2, &Value::Bool(true)), "{h:#}");

    // Two down: no quorum. `status` fails naming the cluster, `health` is unhealthy.
    etcd.kill(&lan, 1);
    let o = nodes[0].lab.run(&["cluster", "status"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "status answered without a quorum");
    assert!(err.contains("cluster"), "{err}");
    let o = nodes[0].lab.run(&["--json", "cluster", "health"]);
    assert!(!o.status.success(), "health said healthy without a quorum");
    let h: Value = serde_json::from_slice(&o.stdout).expect("health's JSON");
    assert_eq!(h["healthy"], false, "{h:#}");

    // Without a quorum a change is refused, clearly, and nothing changed.
    let before = nodes[0].lab.json(&["user", "list"]);
    let o = nodes[0].lab.run(&["user", "add", "nobody", "--no-qr"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a change without a quorum was accepted"
    );
    assert!(
        err.contains("the cluster is unavailable") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(nodes[0].lab.json(&["user", "list"]), before);

    // Quorum back: n1 is listed again (its lease renewed, or re-granted if it expired).
    etcd.restart(&lan, 1);
    etcd.restart(&lan, 2);
    etcd.wait_healthy(&lan, Duration::from_secs(30));
    let back = wait("n1 listed again", Duration::from_secs(30), || {
        nodes[0]
            .lab
            .run(&["--json", "cluster", "status"])
            .status
            .success()
            && listed(&nodes[0]) == ["n1"]
    });
    eprintln!("with the quorum back, n1 was listed again after {back:?}");
    // Its own clock judged the lease lost while no renewal got through for a TTL (etcd, which
    // extends leases across a leader change, may still hold it): healthy again at its next
    // renewal, within a renewal period.
    let healthy = wait("n1 healthy again", Duration::from_secs(10), || {
        let o = nodes[0].lab.run(&["--json", "cluster", "health"]);
        o.status.success()
    });
    eprintln!("n1 healthy again after another {healthy:?}");
}

#[test]
fn nodes_speak_tls_to_etcd_and_a_node_without_a_client_certificate_is_refused() {
    let lan = Lan::new(191);
    let etcd = Etcd::start_tls(&lan);
    let tls = etcd.tls().expect("started with TLS");
    let ca = tls.ca.ca_pem.display().to_string();
    let (cert, key) = tls.ca.issue("n1", "", "clientAuth");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let n1 = Node::start_with(
        &lan,
        &etcd,
        "n1",
        11,
        (193, 195),
        &[
            "--cluster-ttl",
            "4s",
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    wait("n1 listed over TLS", Duration::from_secs(15), || {
        listed(&n1) == ["n1"]
    });
    let h = n1.lab.json(&["cluster", "health"]);
    assert_eq!(h["healthy"], true, "{h:#}");
    assert!(
        h["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["reachable"] == true
                && m["endpoint"].as_str().unwrap().starts_with("https://")),
        "{h:#}"
    );

    // The members require a client certificate: a node that has only the CA never gets a
    // lease, and says why.
    let n2 = Node::start_with(
        &lan,
        &etcd,
        "n2",
        12,
        (197, 199),
        &["--cluster-ttl", "4s", "--etcd-ca", &ca],
    );
    let o = n2.lab.run(&["--json", "cluster", "health"]);
    assert!(
        !o.status.success(),
        "health passed without a client certificate"
    );
    let h: Value = serde_json::from_slice(&o.stdout).expect("health's JSON");
    eprintln!("{h:#}");
    assert_eq!(h["lease_held"], false, "{h:#}");
    assert!(
        h["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["reachable"] == false && !m["error"].as_str().unwrap_or("").is_empty()),
        "{h:#}"
    );
    // A TTL later, still only n1 is a node.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(listed(&n1), ["n1"]);
}

/// The users `user list` shows on `node`, by name.
fn users(node: &Node) -> Vec<String> {
    let o = node.lab.run(&["--json", "user", "list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("user list's JSON");
    let mut names: Vec<String> = v
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["user"]["name"].as_str().unwrap_or("").to_owned())
        .collect();
    names.sort();
    names
}

/// `wg_quick` with its `[Peer]` public key and endpoint replaced by those of `server`'s config.
fn aimed_at(wg_quick: &str, server: &str) -> String {
    let line = |cfg: &str, k: &str| {
        cfg.lines()
            .rfind(|l| l.starts_with(k))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{k} in {cfg}"))
    };
    let (key, endpoint) = (line(server, "PublicKey"), line(server, "Endpoint"));
    wg_quick
        .lines()
        .map(|l| {
            if l.starts_with("PublicKey") {
                key.clone()
            } else if l.starts_with("Endpoint") {
                endpoint.clone()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shared_state_reaches_every_node_and_a_client_gets_through_another_node() {
    use capybara_tests::wg::{WgProcess, ping_until};
    let lan = Lan::new(181);
    let etcd = Etcd::start(&lan);
    // Every node on the same tunnel subnet (a cluster's devices share one address pool).
    let tunnel_net = 185;
    let n1 = Node::start(&lan, &etcd, "n1", 11, (183, tunnel_net), "4s");
    // n1 seeds the empty cluster with its own users (it had one before n2 existed).
    n1.lab.capybara(&["user", "add", "early", "--no-qr"]);
    let n2 = Node::start(&lan, &etcd, "n2", 12, (187, tunnel_net), "4s");
    wait("n2 has n1's user", Duration::from_secs(10), || {
        users(&n2) == ["early"]
    });
    assert!(
        n2.lab.log(1).contains("shared state read in full"),
        "a new node reads everything"
    );

    // A user added on n2 is on n1 within 1 s; its client, aimed at n1, gets through n1.
    let cfg = n2.lab.json(&["user", "add", "bob", "--no-qr"]);
    let t0 = Instant::now();
    wait("bob on n1", Duration::from_secs(1), || {
        users(&n1) == ["bob", "early"]
    });
    eprintln!("bob, added on n2, was on n1 after {:?}", t0.elapsed());
    let probe = n1.lab.json(&["user", "add", "probe", "--no-qr"]);
    let wg_quick = aimed_at(
        cfg["wg_quick"].as_str().unwrap(),
        probe["wg_quick"].as_str().unwrap(),
    );
    let v4 = cfg["peer"]["ipv4"].as_str().unwrap().parse().unwrap();
    let server = n1.lab.server_v4.into();
    let _client = WgProcess::from_wg_quick(&n1.lab.client, "cw", &wg_quick, None, server, v4);
    assert!(
        ping_until(&n1.lab.client, server, Duration::from_secs(10)),
        "bob's client (created on n2) got no answer through n1"
    );
    // Its session is n1's.
    let s = n1.lab.wait_session("bob", "through n1", |_| true);
    eprintln!("bob's session on n1: {s}");

    // A quota set on n1 reaches n2's kernel: a bucket of its own with the limit.
    n1.lab.capybara(&[
        "quota", "set", "bob", "--limit", "5GB", "--period", "monthly",
    ]);
    let on_n1 = n1.lab.json(&["quota", "show", "bob"])[0].clone();
    wait("bob's quota on n2", Duration::from_secs(2), || {
        let q = n2.lab.json(&["quota", "show", "bob"])[0].clone();
        q["limit_bytes"] == on_n1["limit_bytes"] && q["bucket"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        on_n1["limit_bytes"].as_u64().unwrap() >= 5_000_000_000,
        "{on_n1}"
    );

    // n2 stops; n1 changes things; n2 starts again and resumes from its revision.
    n2.lab.server.kill(n2.pid, Signal::SIGTERM);
    wait("n2 stopped", Duration::from_secs(15), || {
        !n2.lab.server.is_running(n2.pid)
    });
    n1.lab.capybara(&["user", "remove", "early"]);
    n1.lab.capybara(&["user", "add", "carol", "--no-qr"]);
    let _pid = n2.lab.start_agent(
        2,
        &[
            "--etcd",
            &etcd.endpoints(),
            "--node-name",
            "n2",
            "--cluster-ttl",
            "4s",
        ],
    );
    wait("n2 caught up", Duration::from_secs(10), || {
        users(&n2) == ["bob", "carol", "probe"]
    });
    assert!(
        !n2.lab.log(2).contains("shared state read in full"),
        "a restarted node resumes from its revision"
    );
    // A removal on n2 leaves n1's tunnel: bob's client gets no more answers.
    n2.lab.capybara(&["user", "remove", "bob"]);
    wait("bob gone from n1", Duration::from_secs(1), || {
        users(&n1) == ["carol", "probe"]
    });
    assert!(
        !ping_until(&n1.lab.client, server, Duration::from_secs(2)),
        "bob's client still gets through n1 after bob was removed on n2"
    );
}

/// When a sample was taken, and which live nodes held the address then.
type Samples = Vec<(Instant, Vec<usize>)>;

/// Samples which live nodes hold `addr` every 20 ms until stopped.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
    task: Option<std::thread::JoinHandle<Samples>>,
}

impl Sampler {
    fn start(nodes: &[&Node], addr: std::net::Ipv4Addr) -> Sampler {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(vec![true; nodes.len()]));
        let spaces: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.lab.server.name().to_owned(), n.lan_if.clone()))
            .collect();
        let (s, l) = (stop.clone(), live.clone());
        let task = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let live = l.lock().unwrap().clone();
                let holders: Vec<usize> = spaces
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| live[*i])
                    .filter(|(_, (ns, dev))| {
                        let o = std::process::Command::new("ip")
                            .args(["-n", ns, "-o", "-4", "addr", "show", "dev", dev])
                            .output()
                            .expect("ip addr");
                        String::from_utf8_lossy(&o.stdout).contains(&format!("inet {addr}/"))
                    })
                    .map(|(i, _)| i)
                    .collect();
                samples.push((Instant::now(), holders));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Sampler {
            stop,
            live,
            task: Some(task),
        }
    }

    /// Node `i`'s agent is dead (killed): its namespace's leftovers are not a holder.
    fn dead(&self, i: usize) {
        self.live.lock().unwrap()[i] = false;
    }

    fn alive(&self, i: usize) {
        self.live.lock().unwrap()[i] = true;
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.take().unwrap().join().unwrap()
    }
}

/// The failover section of `cluster status` on `node`.
fn failover(node: &Node) -> Value {
    let o = node.lab.run(&["--json", "cluster", "status"]);
    if !o.status.success() {
        return Value::Null;
    }
    let s: Value = serde_json::from_slice(&o.stdout).expect("status's JSON");
    s["failover"].clone()
}

#[test]
fn failover_moves_the_service_address_and_a_cut_off_primary_fences_itself_first() {
    use capybara_tests::{
        netns::NetNs,
        wg::{WgProcess, ping_until},
    };
    let lan = Lan::new(201);
    let etcd = Etcd::start(&lan);
    let tunnel_net = 205;
    let service = lan.addr(100);
    let address = format!("{service}/24");
    let args = [
        "--cluster-ttl",
        "4s",
        "--failover-address",
        &address,
        "--failover-interface",
        "{lan_if}",
    ];
    let n1 = Node::start_keyed(&lan, &etcd, "n1", 11, (203, tunnel_net), &args, None);
    let n2 = Node::start_keyed(&lan, &etcd, "n2", 12, (207, tunnel_net), &args, Some(&n1));
    // A webhook receiver in each node's namespace, on the same port; the endpoint added once.
    let tmp = tempfile::tempdir().expect("temp dir");
    let secret = capybara_tests::receivers::random_secret();
    let receivers: Vec<capybara_tests::receivers::PyReceiver> = [&n1, &n2]
        .iter()
        .map(|n| {
            capybara_tests::receivers::PyReceiver::start_in(
                Some(n.lab.server.name()),
                &secret,
                18_181,
                tmp.path().join(format!("{}.jsonl", n.name)),
            )
        })
        .collect();
    n1.lab.capybara(&[
        "webhook",
        "add",
        &receivers[0].url(),
        "--event",
        "server-down",
        "--secret",
        &secret,
        "--allow-private",
    ]);
    // Off until enabled: nobody holds the address.
    std::thread::sleep(Duration::from_secs(1));
    assert!(!n1.holds(service) && !n2.holds(service));
    assert_eq!(failover(&n1)["enabled"], false);
    let out = n1.lab.capybara(&["cluster", "failover", "enable"]);
    assert!(out.contains("failover enabled"), "{out}");
    let nodes = [&n1, &n2];
    wait(
        "a primary holds the address",
        Duration::from_secs(10),
        || nodes.iter().filter(|n| n.holds(service)).count() == 1,
    );
    let sampler = Sampler::start(&nodes, service);
    let (p, s) = if n1.holds(service) { (0, 1) } else { (1, 0) };
    eprintln!("primary: {}", nodes[p].name);
    wait("status names the primary", Duration::from_secs(5), || {
        let f = failover(nodes[s]);
        f["primary"] == nodes[p].name.as_str() && f["role"] == "standby"
    });

    // A client on the LAN, configured with the service address.
    let client_ns = NetNs::new("fc");
    lan.attach(&client_ns, 50);
    let cfg = nodes[p].lab.json(&["user", "add", "roamer", "--no-qr"]);
    let v4 = cfg["peer"]["ipv4"].as_str().unwrap().parse().unwrap();
    let server = nodes[p].lab.server_v4.into();
    let endpoint = std::net::SocketAddr::from((service, 51820));
    let _client = WgProcess::from_wg_quick(
        &client_ns,
        "fo",
        cfg["wg_quick"].as_str().unwrap(),
        Some(endpoint),
        server,
        v4,
    );
    assert!(
        ping_until(&client_ns, server, Duration::from_secs(10)),
        "no answer through the primary at the service address"
    );

    // SIGKILL the primary: the standby takes the address; the client's traffic resumes.
    let killed = Instant::now();
    nodes[p].lab.server.kill(nodes[p].pid, Signal::SIGKILL);
    sampler.dead(p);
    let took = wait(
        "the standby takes the address",
        Duration::from_secs(30),
        || nodes[s].holds(service),
    );
    if !ping_until(&client_ns, server, Duration::from_secs(30)) {
        let neigh = client_ns.try_exec(&["ip", "neigh"]);
        let wg = client_ns.try_exec(&["wg", "show"]);
        panic!(
            "the client's traffic did not resume through the new primary\nclient: {}{}\nnew primary's log:\n{}",
            String::from_utf8_lossy(&neigh.stdout),
            String::from_utf8_lossy(&wg.stdout),
            nodes[s]
                .lab
                .log(1)
                .lines()
                .filter(|l| l.contains("cluster"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let resumed = killed.elapsed();
    eprintln!(
        "SIGKILL of the primary: address taken after {took:?}, traffic resumed after {resumed:?} (TTL 4 s)"
    );
    assert!(resumed < Duration::from_secs(30), "{resumed:?}");
    // The new primary's session: the client's original config, re-handshaken.
    nodes[s]
        .lab
        .wait_session("roamer", "through the new primary", |_| true);
    // It raised server-down for the lost primary; its receiver got it, signed.
    let down = wait(
        "server-down at the new primary's receiver",
        Duration::from_secs(10),
        || {
            receivers[s].records().iter().any(|r| {
                r.verified
                    && r.body["event"] == "server-down"
                    && r.body["data"]["node"] == nodes[p].name.as_str()
            })
        },
    );
    eprintln!(
        "server-down for {} received (checked for {down:?})",
        nodes[p].name
    );

    // The killed node comes back (its leftover address removed at start) as the standby.
    let back = if p == 0 { &n1 } else { &n2 };
    let _pid = back.lab.start_agent(
        2,
        &[
            "--etcd",
            &etcd.endpoints(),
            "--node-name",
            &back.name,
            "--cluster-ttl",
            "4s",
            "--failover-address",
            &address,
            "--failover-interface",
            &back.lan_if,
        ],
    );
    wait(
        "the restarted node releases its leftover",
        Duration::from_secs(5),
        || !back.holds(service),
    );
    sampler.alive(p);
    wait(
        "the restarted node is the standby",
        Duration::from_secs(10),
        || failover(back)["role"] == "standby",
    );

    // Cut the primary off from etcd: it fences itself before the other takes over.
    let primary = nodes[s];
    primary
        .lab
        .server
        .exec(&["ip", "link", "set", &primary.lan_if, "down"]);
    let cut = Instant::now();
    wait(
        "the cut-off primary releases the address",
        Duration::from_secs(15),
        || !primary.holds(service),
    );
    let released = cut.elapsed();
    wait(
        "the other node takes the address",
        Duration::from_secs(30),
        || back.holds(service),
    );
    let taken = cut.elapsed();
    eprintln!("cut off: released after {released:?}, taken by the other after {taken:?}");
    assert!(released < taken, "released {released:?}, taken {taken:?}");
    let log = primary.lab.log(1);
    assert!(
        log.contains("admitting no new sessions"),
        "fenced: no admission"
    );
    let samples = sampler.finish();
    let both: Vec<_> = samples.iter().filter(|(_, h)| h.len() > 1).collect();
    eprintln!(
        "{} address samples, {} with two holders",
        samples.len(),
        both.len()
    );
    assert!(both.is_empty(), "two nodes held the address: {both:?}");
}
