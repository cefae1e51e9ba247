//! Connection ids and kick by connection over the API and the CLI (in-process agent, in-memory
//! tunnel; the sessions come from the history recorder as the daemon feeds it): every live
//! connection's id is its session's id in the history; `Kick` with `connection` ends that one
//! device's session; exactly one of `user` and `connection`; unknown, closed and malformed ids;
//! a token restricted to a user reaches its own connections only.

use std::{net::SocketAddr, path::PathBuf, time::SystemTime};

use capybara_agent::{
    api::client::Client,
    service::{
        EndReason, NewToken, NewUser, SessionEvent,
        domain::{Actor, DeviceName, Peer, Scope, UserName},
        history::Recorder,
    },
};
use capybara_proto::v1 as pb;
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn name(s: &str) -> UserName {
    UserName::parse("name", s).unwrap()
}

/// alice (`default`, `phone`) and bob (`default`), each device with an open session.
fn connected(api: &TestApi) -> (Recorder, Vec<Peer>) {
    let svc = &api.svc;
    let mut peers = Vec::new();
    for u in ["alice", "bob"] {
        let (_, cfg) = svc
            .users
            .add_user(
                &root(),
                NewUser {
                    name: name(u),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
            )
            .expect("add user");
        peers.push(cfg.peer);
    }
    let phone = svc
        .devices
        .add_device(
            &root(),
            &name("alice"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .expect("add device");
    peers.insert(1, phone.peer);
    let mut rec = Recorder::start(svc.history.clone(), SystemTime::now()).unwrap();
    for (i, p) in peers.iter().enumerate() {
        rec.on_event(SessionEvent::Connected {
            key: p.public_key,
            endpoint: format!("198.51.100.{}:5000", i + 1)
                .parse::<SocketAddr>()
                .unwrap(),
            at: SystemTime::now(),
        })
        .unwrap();
    }
    (rec, peers)
}

/// The connection id of `p` from `ListConnections`.
async fn id_of(c: &Client, p: &Peer) -> String {
    c.connections()
        .await
        .unwrap()
        .into_iter()
        .find(|c| {
            c.peer
                .as_ref()
                .is_some_and(|x| x.public_key == p.public_key)
        })
        .and_then(|c| c.id)
        .map(|i| i.to_string())
        .unwrap_or_default()
}

fn kicks(api: &TestApi, p: &Peer) -> u32 {
    api.tunnel.state()[&p.public_key].kicks
}

#[test]
fn kick_by_connection_id_over_grpc_ends_one_device_and_refuses_bad_ids() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let (mut rec, peers) = connected(&api);
    let (alice, phone, bob) = (&peers[0], &peers[1], &peers[2]);
    let (read, write) = (api.token(Scope::Read), api.token(Scope::Write));
    rt.block_on(async {
        let r = api.tcp_client(Some(&read)).await;
        let w = api.tcp_client(Some(&write)).await;
        // Every connection has its open session's id: the same one ListSessions gives.
        let sessions = r.history("", "", 0, false).await.unwrap().sessions;
        for p in &peers {
            let id = id_of(&r, p).await;
            assert_eq!(id.len(), 25, "{id}");
            let s = sessions.iter().find(|s| s.peer_id == p.id).unwrap();
            assert_eq!(s.id.to_string(), id);
        }
        let id = id_of(&r, alice).await;

        // A read token may not kick.
        assert_eq!(
            refused(r.kick_connection(&id).await).0,
            Code::PermissionDenied
        );
        // Bad input: the field named, nothing changed.
        let audit_before = api.svc.core.audit_records(None, 100).unwrap().len();
        let bad = [
            (
                pb::KickRequest {
                    user: "alice".into(),
                    connection: id.clone(),
                },
                "connection: give either connection or user, not both",
            ),
            (pb::KickRequest::default(), "user: required (or connection)"),
            (
                pb::KickRequest {
                    connection: "session/1/2".into(),
                    ..Default::default()
                },
                "connection: invalid connection id",
            ),
            (
                pb::KickRequest {
                    connection: id.to_uppercase(),
                    ..Default::default()
                },
                "connection: invalid connection id",
            ),
        ];
        for (req, want) in bad {
            let (code, m) = refused(w.kick_request(req.clone()).await);
            assert_eq!(code, Code::InvalidArgument, "{req:?}: {m}");
            assert!(m.starts_with(want), "{req:?}: {m}");
        }
        // Unknown (well-formed): not found, naming it.
        let unknown = format!("{}-00000999", &id[..16]);
        let (code, m) = refused(w.kick_connection(&unknown).await);
        assert_eq!(code, Code::NotFound);
        assert_eq!(m, format!("connection \"{unknown}\" not found"));
        assert!(peers.iter().all(|p| kicks(&api, p) == 0));
        assert_eq!(
            api.svc.core.audit_records(None, 100).unwrap().len(),
            audit_before
        );

        // alice's laptop only.
        let kicked = w.kick_connection(&id).await.unwrap();
        assert_eq!(kicked.len(), 1);
        assert_eq!(kicked[0].public_key, alice.public_key);
        assert_eq!(
            (kicks(&api, alice), kicks(&api, phone), kicks(&api, bob)),
            (1, 0, 0)
        );
        let audit = api.unix_client().await.audit("alice", 1).await.unwrap();
        assert_eq!(audit[0].action, "connection.kick");
        assert_eq!(audit[0].target, "peer:alice/default");
    });
    // The tunnel reports the kick: the session closes as kicked under the same id.
    rec.on_event(SessionEvent::Disconnected {
        key: alice.public_key,
        reason: EndReason::Kicked,
        at: SystemTime::now(),
    })
    .unwrap();
    rt.block_on(async {
        let r = api.tcp_client(Some(&read)).await;
        let w = api.tcp_client(Some(&write)).await;
        let s = r.history("alice", "", 0, false).await.unwrap().sessions;
        let closed = s.iter().find(|s| s.reason.is_some()).expect("closed");
        assert_eq!(closed.reason, Some(EndReason::Kicked));
        assert_eq!(id_of(&r, alice).await, "", "no open session, no id");
        let (code, m) = refused(w.kick_connection(&closed.id.to_string()).await);
        assert_eq!(code, Code::NotFound, "{m}");
        assert!(m.contains(&closed.id.to_string()), "{m}");
        assert_eq!(kicks(&api, alice), 1);
        assert_ne!(
            id_of(&r, phone).await,
            "",
            "alice's phone is still connected"
        );
    });
}

#[test]
fn a_token_restricted_to_a_user_kicks_its_own_connections_only() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let (_rec, peers) = connected(&api);
    let (phone, bob) = (&peers[1], &peers[2]);
    let (_, secret) = api
        .svc
        .tokens
        .create_token(
            &root(),
            NewToken {
                scope: Scope::Write,
                name: "alice-app".into(),
                expires_at: None,
                user: Some(name("alice")),
            },
        )
        .unwrap();
    let reader = api.token(Scope::Read);
    rt.block_on(async {
        let r = api.tcp_client(Some(&reader)).await;
        let c = api.tcp_client(Some(&secret)).await;
        let bobs = id_of(&r, bob).await;
        let (code, m) = refused(c.kick_connection(&bobs).await);
        assert_eq!(code, Code::NotFound, "another user's connection: {m}");
        assert_eq!(kicks(&api, bob), 0);
        // Listing every connection stays refused to it; its own sessions give it the ids.
        assert_eq!(refused(c.connections().await).0, Code::PermissionDenied);
        let own = c.history("alice", "", 0, false).await.unwrap().sessions;
        let phones = own.iter().find(|s| s.device == "phone").unwrap().id;
        assert_eq!(phones.to_string(), id_of(&r, phone).await);
        let kicked = c.kick_connection(&phones.to_string()).await.unwrap();
        assert_eq!(kicked[0].public_key, phone.public_key);
        assert_eq!(kicks(&api, phone), 1);
    });
}

#[test]
fn the_cli_shows_connection_ids_and_kicks_one_by_id() {
    let bin: PathBuf = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let (_rec, peers) = connected(&api);
    let (alice, phone) = (&peers[0], &peers[1]);
    let cli = Cli::socket(&bin, &api.socket);
    let json = cli.json(&["connections"]);
    let id = json
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"]["user"] == "alice" && c["peer"]["device"] == "default")
        .expect("alice listed")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let table = cli.ok(&["connections"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..3], ["USER", "DEVICE", "ID"], "{table}");
    assert!(
        lines.any(|l| l.starts_with("alice ") && l.split_whitespace().nth(2) == Some(&*id)),
        "{table}"
    );
    // The same id in the history: show, export.
    let show = cli.ok(&["history", "show", "alice"]);
    assert!(show.lines().next().unwrap().starts_with("USER "), "{show}");
    assert!(show.lines().any(|l| l.contains(&id)), "{show}");
    let csv = cli.ok(&["history", "export", "--format", "csv"]);
    assert!(
        csv.lines()
            .any(|l| l.starts_with(&format!("session,{id},alice,default,"))),
        "{csv}"
    );
    let exported = cli.json(&["history", "export", "--format", "json"]);
    assert!(
        exported["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == *id)
    );

    // Bad input: exit 2, nothing kicked.
    let o = cli.run(&["kick", "--connection", "nope"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("connection: invalid connection id \"nope\""),
        "{}",
        o.stderr
    );
    for args in [
        &["kick"][..],
        &["kick", "alice", "--connection", &id],
        &["connections", "kick"],
    ] {
        let o = cli.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}{}", o.stdout, o.stderr);
    }
    assert!(peers.iter().all(|p| kicks(&api, p) == 0));
    // Unknown: exit 1, naming it.
    let unknown = format!("{}-00000999", &id[..16]);
    cli.fails(1, &["kick", "--connection", &unknown], &unknown);

    let out = cli.ok(&["kick", "--connection", &id]);
    assert_eq!(
        out.trim(),
        format!("kicked connection {id} (alice/default)")
    );
    assert_eq!((kicks(&api, alice), kicks(&api, phone)), (1, 0));
    let phone_id = cli
        .json(&["connections"])
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"]["device"] == "phone")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let kicked = cli.json(&["connections", "kick", &phone_id]);
    assert_eq!(kicked[0]["device"], "phone");
    assert_eq!(kicks(&api, phone), 1);
    // `kick USER` as before.
    assert!(cli.ok(&["kick", "bob"]).contains("kicked bob: 1 device(s)"));
}
