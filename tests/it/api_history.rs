//! Session history, auth attempts and backups through the real gRPC API and the `capybara`
//! binary, over an in-process agent API (real server and store, in-memory dataplane and tunnel;
//! sessions are fed to the agent's recorder as the tunnel would report them):
//! - scopes: read lists, admin clears and backs up; bad input is `INVALID_ARGUMENT` naming
//!   the field and changes nothing;
//! - the CLI's `history show|search|export|clear|audit` tables, `--json`, CSV and exit 2;
//! - `backup create` → `user remove` → stop → `backup restore` → start: the user is back and
//!   programmed into the tunnel and the dataplane.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use capybara_agent::{
    api::{self, Listeners, client::code},
    service::{
        EndReason, NewUser, Service, ServiceConfig, SessionEvent,
        domain::{Actor, DeviceName, Peer, PublicKey, Scope, UserName},
        history::Recorder,
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};
use capybara_common::peer::PeerStats;
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi};

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn add_user(svc: &Service, name: &str) -> Peer {
    svc.users
        .add_user(
            &root(),
            NewUser {
                name: UserName::parse("name", name).unwrap(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )
        .expect("add user")
        .1
        .peer
}

fn counters(plane: &MemoryPlane, id: u32, rx: u64, tx: u64) {
    plane.with(|s| {
        s.stats.insert(
            id,
            PeerStats {
                rx_packets: rx / 100,
                rx_bytes: rx,
                tx_packets: tx / 100,
                tx_bytes: tx,
                ..PeerStats::default()
            },
        );
    });
}

/// alice: one kicked session from 192.0.2.10 (150 000 B in, 20 000 B out); bob: one open
/// session from 198.51.100.7; one failed handshake from 203.0.113.66.
fn record_sessions(api: &TestApi) -> (Peer, Peer) {
    let alice = add_user(&api.svc, "alice");
    let bob = add_user(&api.svc, "bob");
    let mut rec = Recorder::start(api.svc.history.clone(), SystemTime::now()).unwrap();
    let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
    let t0 = SystemTime::now();
    rec.on_event(SessionEvent::Connected {
        key: alice.public_key,
        endpoint: ep("192.0.2.10:40000"),
        at: t0,
    })
    .unwrap();
    counters(&api.plane, alice.id, 150_000, 20_000);
    rec.on_event(SessionEvent::Disconnected {
        key: alice.public_key,
        reason: EndReason::Kicked,
        at: t0 + Duration::from_secs(65),
    })
    .unwrap();
    rec.on_event(SessionEvent::Connected {
        key: bob.public_key,
        endpoint: ep("198.51.100.7:5000"),
        at: t0 + Duration::from_secs(1),
    })
    .unwrap();
    rec.on_event(SessionEvent::AuthFailed {
        source: ep("203.0.113.66:777"),
        key: Some(PublicKey([5; 32])),
        reason: "unknown-key",
        at: t0,
    })
    .unwrap();
    (alice, bob)
}

#[test]
fn history_rpcs_check_scopes_and_refuse_bad_input_without_changes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    record_sessions(&api);
    let (read, write, admin) = (
        api.token(Scope::Read),
        api.token(Scope::Write),
        api.token(Scope::Admin),
    );
    rt.block_on(async {
        let r = api.tcp_client(Some(&read)).await;
        let w = api.tcp_client(Some(&write)).await;
        let a = api.tcp_client(Some(&admin)).await;
        let all = r.history("", "", 0, true).await.unwrap();
        assert_eq!(all.sessions.len(), 2);
        assert_eq!(all.auth_attempts.len(), 1);
        let alice = r.history("alice", "", 0, true).await.unwrap();
        assert_eq!(alice.sessions.len(), 1);
        assert!(alice.auth_attempts.is_empty(), "auth attempts have no user");
        let s = &alice.sessions[0];
        assert_eq!(s.reason, Some(EndReason::Kicked));
        assert_eq!((s.traffic.rx.bytes, s.traffic.tx.bytes), (150_000, 20_000));
        let from = r.history("", "203.0.113.0/24", 0, true).await.unwrap();
        assert_eq!((from.sessions.len(), from.auth_attempts.len()), (0, 1));

        // Scopes.
        for c in [&r, &w] {
            assert_eq!(
                code(&c.clear_history(1).await.unwrap_err()),
                Some(Code::PermissionDenied)
            );
            assert_eq!(
                code(&c.create_backup(&mut std::io::sink()).await.unwrap_err()),
                Some(Code::PermissionDenied)
            );
        }
        let none = api.tcp_client(None).await;
        assert_eq!(
            code(&none.history("", "", 0, false).await.unwrap_err()),
            Some(Code::Unauthenticated)
        );

        // Health: every component serves; a device missing from the tunnel makes the tunnel
        // (and the agent) not serving within one refresh.
        for name in [
            "",
            "capybara.store",
            "capybara.dataplane",
            "capybara.tunnel",
        ] {
            assert!(r.health(name).await.unwrap(), "{name} not serving");
        }

        // Bad input: INVALID_ARGUMENT naming the field; nothing changes.
        let audit_before = a.audit("", 1000).await.unwrap();
        for (call, field) in [
            (a.history("Not/A/User", "", 0, false).await, "user"),
            (a.history("", "10.0.0.0/33", 0, false).await, "ip"),
            (a.history("", "example.com", 0, false).await, "ip"),
        ] {
            let e = call.unwrap_err();
            assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let e = a.clear_history(0).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument));
        assert!(e.to_string().starts_with("older_than_secs"), "{e}");
        assert_eq!(a.history("", "", 0, true).await.unwrap(), all);
        assert_eq!(a.audit("", 1000).await.unwrap(), audit_before);

        // Clearing what is a day old removes nothing here (alice's ended just now), audited.
        let p = a.clear_history(86_400).await.unwrap();
        assert_eq!((p.sessions, p.auth_attempts), (0, 0));
        assert_eq!(a.history("", "", 0, true).await.unwrap(), all);
        assert_eq!(a.audit("", 1).await.unwrap()[0].action, "history.clear");

        use capybara_agent::service::ports::TunnelPort as _;
        let alice = api.svc.devices.list_peers(None).unwrap()[0].clone();
        api.tunnel.remove_peer(&alice.public_key).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(12);
        while r.health("capybara.tunnel").await.unwrap() {
            assert!(std::time::Instant::now() < end, "tunnel still serving");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!r.health("").await.unwrap());
        assert!(r.health("capybara.store").await.unwrap());
    });
}

#[test]
fn history_commands_print_tables_json_and_csv_and_exit_2_on_bad_input() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    record_sessions(&api);
    let cli = Cli::socket(&bin, &api.socket);
    let show = cli.ok(&["history", "show"]);
    let lines: Vec<&str> = show.lines().collect();
    assert!(lines[0].starts_with("USER "), "{show}");
    assert!(
        lines[1].starts_with("bob ") && lines[1].contains("open"),
        "{show}"
    );
    assert!(
        lines[2].starts_with("alice ")
            && lines[2].contains("0:01:05")
            && lines[2].contains("192.0.2.10:40000")
            && lines[2].contains("150000")
            && lines[2].ends_with("kicked"),
        "{show}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "history", "show", "alice"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert_eq!(json[0]["reason"], "kicked");
    assert_eq!(json[0]["traffic"]["rx"]["bytes"], 150_000);

    let search = cli.ok(&["history", "search", "--ip", "203.0.113.0/24"]);
    assert!(
        search.contains("failed handshakes") && search.contains("203.0.113.66:777 "),
        "{search}"
    );
    assert!(search.contains("unknown-key"), "{search}");

    let csv = api.dir.path().join("history.csv");
    cli.ok(&[
        "history",
        "export",
        "--format",
        "csv",
        "--output",
        csv.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 4, "header, 2 sessions, 1 auth attempt: {text}");
    assert!(rows[0].starts_with("kind,id,user,device,start,end,reason"));
    assert!(
        rows.iter()
            .any(|r| r.starts_with("session,") && r.contains(",alice,") && r.contains(",kicked,"))
    );
    assert!(rows[3].starts_with("auth,") && rows[3].contains("203.0.113.66:777"));
    let exported: serde_json::Value =
        serde_json::from_str(&cli.ok(&["history", "export", "--format", "json"])).unwrap();
    assert_eq!(exported["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(exported["auth_attempts"].as_array().unwrap().len(), 1);

    let audit = cli.ok(&["history", "audit", "--user", "alice"]);
    assert!(
        audit.contains("user.add") && audit.contains("user:alice"),
        "{audit}"
    );

    // Bad input: exit 2, one line naming the field, nothing changed.
    let before = cli.ok(&["--json", "history", "export", "--format", "json"]);
    cli.fails(2, &["history", "clear", "--older-than", "0d"], "older_than");
    cli.fails(
        2,
        &["history", "clear", "--older-than", "soon"],
        "older_than",
    );
    cli.fails(2, &["history", "search", "--ip", "999.1.1.1"], "ip");
    cli.fails(2, &["history", "show", "Bad/User"], "user");
    cli.fails(2, &["history", "export", "--format", "xml"], "xml");
    assert_eq!(
        cli.ok(&["--json", "history", "export", "--format", "json"]),
        before
    );
    assert!(
        cli.ok(&["history", "clear", "--older-than", "90d"])
            .contains("removed 0 sessions and 0 auth attempts")
    );
}

/// An agent API over the data directory `dir`, with its own in-memory dataplane and tunnel.
struct Agent {
    svc: Arc<Service>,
    plane: Arc<MemoryPlane>,
    tunnel: Arc<MemoryTunnel>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), api::ApiError>>,
}

async fn start_agent(dir: &Path, socket: &Path) -> Agent {
    let store = Arc::new(Store::open(&dir.join("data")).expect("store"));
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let svc = Arc::new(
        Service::open(
            store,
            plane.clone(),
            tunnel.clone(),
            ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "192.0.2.1:51820"),
        )
        .expect("service"),
    );
    let unix = api::bind_unix(socket).expect("bind unix");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(api::run(
        svc.clone(),
        Listeners {
            tcp: None,
            unix: Some(unix),
            tcp_tls: None,
            metrics: None,
            tcp_access: None,
            in_process: None,
        },
        async {
            let _ = stopped.await;
        },
    ));
    Agent {
        svc,
        plane,
        tunnel,
        stop,
        task,
    }
}

#[test]
fn backup_create_remove_restore_brings_the_user_back() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/agent.sock");
    let cli = Cli::socket(&bin, &socket);
    let backup = dir.path().join("backup.json");
    let data = dir.path().join("data");

    let agent = rt.block_on(start_agent(dir.path(), &socket));
    let alice = add_user(&agent.svc, "alice");
    add_user(&agent.svc, "bob");
    let out = cli.ok(&["backup", "create", "--output", backup.to_str().unwrap()]);
    assert!(out.starts_with("backup written to"), "{out}");
    cli.ok(&["user", "remove", "alice"]);
    cli.ok(&["user", "add", "carol", "--no-qr"]);
    cli.fails(1, &["user", "show", "alice"], "not found");
    // The agent holds its store: an online restore is refused, nothing changes.
    cli.fails(
        1,
        &[
            "backup",
            "restore",
            "--input",
            backup.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        "cannot open the store",
    );
    // A file that is not a backup is bad input.
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"format\":\"other\"}").unwrap();
    cli.fails(
        2,
        &[
            "backup",
            "restore",
            "--input",
            junk.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        "not a capybara backup",
    );
    rt.block_on(async {
        let _ = agent.stop.send(());
        agent.task.await.unwrap().unwrap();
    });
    drop(agent.svc);
    drop((agent.plane, agent.tunnel));

    let out = cli.ok(&[
        "backup",
        "restore",
        "--input",
        backup.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.starts_with("restored "), "{out}");

    let agent = rt.block_on(start_agent(dir.path(), &socket));
    let users: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "user", "list"])).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"], "the backup's users, not carol");
    // Programmed again at start: same key, same id.
    assert!(agent.tunnel.state().contains_key(&alice.public_key));
    assert!(agent.plane.state().peers.contains_key(&alice.id));
    // The removal itself is gone from the audit trail with the rest of the later state.
    let audit = cli.ok(&["history", "audit", "--user", "alice"]);
    assert!(!audit.contains("user.remove"), "{audit}");
    rt.block_on(async {
        let _ = agent.stop.send(());
        agent.task.await.unwrap().unwrap();
    });
}

/// Writes `n` closed sessions of alice and `n` counted auth records straight into the store
/// (the recorder would take hours to make that many).
fn many_records(api: &TestApi, n: u64) {
    use capybara_agent::{
        service::{
            AuthAttempt,
            domain::SessionId,
            history::{Counters, EndpointSeen, Session, StoredSession},
        },
        store::{Batch, Cf, keys},
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut b = Batch::default();
    for i in 0..n {
        let ns = (now - 3600) * 1_000_000_000 + i;
        let s = StoredSession {
            session: Session {
                id: SessionId {
                    start_ns: ns,
                    peer: 1,
                },
                user: "alice".into(),
                device: "laptop".into(),
                peer_id: 1,
                protocol: Default::default(),
                public_key: Some(PublicKey([4; 32])),
                ipv4: Some("10.99.0.2".parse().unwrap()),
                ipv6: Some("fd99::2".parse().unwrap()),
                start: now - 3600,
                end: Some(now - 60),
                endpoints: vec![EndpointSeen {
                    at: now - 3600,
                    endpoint: "192.0.2.10:1".parse().unwrap(),
                }],
                traffic: Counters::default(),
                reason: Some(EndReason::Idle),
            },
            base: Counters::default(),
        };
        b.put(Cf::Sessions, &s.session.id.key(), &s).unwrap();
        let a = AuthAttempt {
            protocol: Default::default(),
            at: now - 60,
            source: "203.0.113.9:1".parse().unwrap(),
            public_key: None,
            reason: "bad-mac".into(),
            count: 10,
            prefix: Some("203.0.113.0/24".parse().unwrap()),
            first_seen: now - 70,
        };
        b.put(Cf::Sessions, &keys::auth_attempt(ns, 0), &a).unwrap();
    }
    api.svc.core.store.commit(b).unwrap();
}

#[test]
fn history_pages_cover_every_record_once_capped_and_the_cli_walks_them() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let n = 2_345u64;
    many_records(&api, n);
    let read = api.token(Scope::Read);
    rt.block_on(async {
        let c = api.tcp_client(Some(&read)).await;
        let q = api::history::HistoryRequest {
            page_size: 5_000,
            include_auth: true,
            ..Default::default()
        };
        let (mut ids, mut auth, mut pages, mut token) = (Vec::new(), 0u64, 0, String::new());
        loop {
            let (page, next) = c.history_page(&q, &token).await.unwrap();
            assert!(page.sessions.len() <= 1000 && page.auth_attempts.len() <= 1000);
            ids.extend(page.sessions.into_iter().map(|s| s.id));
            auth += page.auth_attempts.iter().map(|a| a.count).sum::<u64>();
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, 3, "page_size 5000 is capped at 1000");
        let total = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(
            (total as u64, ids.len() as u64),
            (n, n),
            "each session once"
        );
        assert_eq!(auth, 10 * n, "every auth record once, with its count");
        // 0 is the default page, not everything.
        let first = c.history("", "", 0, true).await.unwrap();
        assert_eq!(
            (first.sessions.len(), first.auth_attempts.len()),
            (100, 100)
        );
        let e = c
            .history_page(&q, "h1;not-a-key;")
            .await
            .expect_err("a forged token");
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains("page_token"), "{e}");
    });
    let cli = Cli::socket(&bin, &api.socket);
    let show = cli.ok(&["history", "show", "--limit", "1500"]);
    assert_eq!(show.lines().count(), 1 + 1500, "header and 1500 sessions");
    let exported: serde_json::Value =
        serde_json::from_str(&cli.ok(&["history", "export", "--format", "json"])).unwrap();
    assert_eq!(exported["sessions"].as_array().unwrap().len() as u64, n);
    assert_eq!(
        exported["auth_attempts"].as_array().unwrap().len() as u64,
        n
    );
    let csv = cli.ok(&["history", "export", "--format", "csv"]);
    assert_eq!(csv.lines().count() as u64, 1 + 2 * n);
}
