//! The gRPC API in-process: a real server on 127.0.0.1:0 and on a Unix socket, real RocksDB,
//! the in-memory dataplane and tunnel. Authentication codes per listener and scope, bad input
//! answered `INVALID_ARGUMENT` naming the field with nothing changed, CRUD round trips, the
//! audit trail, health and reflection.

use capybara_agent::{
    api::client::{Client, ClientError, code},
    blocklist::Direction,
    service::domain::Scope,
};
use capybara_proto::v1 as pb;
use tonic::Code;

use crate::api_support::TestApi;

fn status(e: ClientError) -> tonic::Status {
    match e {
        ClientError::Status(s) => s,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

async fn code_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => code(&e).unwrap_or_else(|| panic!("not a status: {e}")),
    }
}

/// Everything the state consists of, to compare before/after a refused call.
async fn snapshot(c: &Client) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        c.list_users().await.unwrap(),
        c.list_tokens().await.unwrap(),
        c.blocklists().await.unwrap(),
        c.audit("", 1000).await.unwrap().len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_a_valid_token_and_enough_scope() {
    let api = TestApi::start(false).await;
    let read = api.token(Scope::Read);
    let write = api.token(Scope::Write);
    let admin = api.token(Scope::Admin);

    // Missing, garbage, well-formed but unknown: UNAUTHENTICATED, on every service.
    let none = api.tcp_client(None).await;
    assert_eq!(
        code_of(none.list_users().await).await,
        Code::Unauthenticated
    );
    assert_eq!(code_of(none.stats("").await).await, Code::Unauthenticated);
    assert_eq!(code_of(none.health("").await).await, Code::Unauthenticated);
    let garbage = api.tcp_client(Some("hunter2")).await;
    assert_eq!(
        code_of(garbage.list_users().await).await,
        Code::Unauthenticated
    );
    let forged = format!("{}AAAA", &admin[..admin.len() - 4]);
    let forged = api.tcp_client(Some(&forged)).await;
    assert_eq!(
        code_of(forged.list_tokens().await).await,
        Code::Unauthenticated
    );

    // Scope per RPC: read < write < admin.
    let r = api.tcp_client(Some(&read)).await;
    r.list_users().await.unwrap();
    r.stats("").await.unwrap();
    assert!(r.health("").await.unwrap());
    assert_eq!(
        code_of(r.add_user("alice", "", 0).await).await,
        Code::PermissionDenied
    );
    assert_eq!(code_of(r.kick("alice").await).await, Code::PermissionDenied);
    assert_eq!(code_of(r.list_tokens().await).await, Code::PermissionDenied);
    let w = api.tcp_client(Some(&write)).await;
    w.add_user("alice", "", 0).await.unwrap();
    w.kick("alice").await.unwrap();
    assert_eq!(
        code_of(w.create_token(Scope::Read, "", 0).await).await,
        Code::PermissionDenied
    );
    assert_eq!(code_of(w.list_tokens().await).await, Code::PermissionDenied);
    let a = api.tcp_client(Some(&admin)).await;
    let (tok, secret) = a
        .create_token(Scope::Read, "made-over-tcp", 0)
        .await
        .unwrap();
    assert_eq!(a.list_tokens().await.unwrap().len(), 4);

    // The new token works until it is revoked, then UNAUTHENTICATED.
    let fresh = api.tcp_client(Some(&secret)).await;
    fresh.list_users().await.unwrap();
    a.revoke_token(tok.id.as_str()).await.unwrap();
    assert_eq!(
        code_of(fresh.list_users().await).await,
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(a.revoke_token(tok.id.as_str()).await).await,
        Code::FailedPrecondition
    );

    // The control socket needs no token (the test runs as root: SO_PEERCRED uid 0).
    let local = api.unix_client().await;
    local.list_tokens().await.unwrap();
    let (_, t) = local
        .create_token(Scope::Admin, "bootstrap", 3600)
        .await
        .unwrap();
    assert!(t.starts_with("capy_"));

    // Every mutation was audited with its actor.
    let audit = local.audit("", 100).await.unwrap();
    let actors: Vec<&str> = audit.iter().map(|r| r.actor.as_str()).collect();
    assert!(actors.contains(&"uid:0"), "{actors:?}");
    assert!(
        !actors.iter().any(|a| *a == format!("token:{}", tok.id)),
        "the read token never mutated"
    );
    assert!(audit.iter().any(|r| r.action == "token.revoke"));
    assert!(audit.iter().any(|r| r.action == "connection.kick"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_changes_nothing() {
    let api = TestApi::start(false).await;
    let admin = api.token(Scope::Admin);
    let c = api.tcp_client(Some(&admin)).await;
    c.add_user("alice", "laptop", 0).await.unwrap();
    c.change_entries(
        Direction::Source,
        "manual",
        vec!["192.0.2.0/24".into()],
        true,
    )
    .await
    .unwrap();
    let before = snapshot(&c).await;

    let cases: Vec<(&str, Result<(), ClientError>)> = vec![
        ("name: ", c.add_user("Bad Name", "", 0).await.map(drop)),
        ("name: ", c.add_user("", "", 0).await.map(drop)),
        ("device: ", c.add_user("bob", "a/b", 0).await.map(drop)),
        ("expires_at: ", c.add_user("bob", "", -1).await.map(drop)),
        ("expires_at: ", c.add_user("bob", "", 1).await.map(drop)),
        ("name: ", c.remove_user("../x").await.map(drop)),
        ("device: ", c.add_peer("alice", "").await.map(drop)),
        ("user: ", c.kick("ALICE").await.map(drop)),
        ("id: ", c.revoke_token("not-an-id").await.map(drop)),
        (
            "cidrs: ",
            c.change_entries(
                Direction::Source,
                "manual",
                vec!["198.51.100.0/24".into(), "10.0.0.1/8".into()],
                true,
            )
            .await
            .map(drop),
        ),
        (
            "cidrs: ",
            c.change_entries(Direction::Source, "manual", vec![], true)
                .await
                .map(drop),
        ),
        (
            "name: ",
            c.change_entries(
                Direction::Source,
                "no spaces",
                vec!["192.0.2.0/24".into()],
                true,
            )
            .await
            .map(drop),
        ),
    ];
    for (field, r) in cases {
        let s = status(r.unwrap_err());
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().starts_with(field), "{field}: {}", s.message());
    }
    // Token scope unspecified, with a raw client (the typed client cannot send it).
    let mut raw = pb::tokens_client::TokensClient::connect(api.url())
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::CreateTokenRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let s = raw.create_token(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(s.message(), "scope: required");

    assert_eq!(snapshot(&c).await, before, "a refused call changed state");
    // Kernel and tunnel state unchanged too: one device.
    assert_eq!(api.plane.state().peers.len(), 1);
    assert_eq!(api.tunnel.state().len(), 1);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_devices_configs_round_trip() {
    let api = TestApi::start(true).await;
    let w = api.token(Scope::Write);
    let c = api.tcp_client(Some(&w)).await;

    let (user, cfg) = c.add_user("alice", "laptop", 0).await.unwrap();
    assert_eq!(user.name.as_str(), "alice");
    assert!(cfg.private_key.is_some());
    assert!(cfg.wg_quick.contains(&format!(
        "PrivateKey = {}",
        cfg.private_key.as_ref().unwrap()
    )));
    assert_eq!(
        code_of(c.add_user("alice", "", 0).await).await,
        Code::AlreadyExists
    );

    let phone = c.add_peer("alice", "phone").await.unwrap();
    assert_ne!(phone.peer.ipv4, cfg.peer.ipv4);
    assert_eq!(
        code_of(c.add_peer("bob", "phone").await).await,
        Code::NotFound
    );

    let got = c.get_user("alice").await.unwrap();
    let devices: Vec<&str> = got.peers.iter().map(|p| p.device.as_str()).collect();
    assert_eq!(devices, ["laptop", "phone"]);
    assert_eq!(c.list_users().await.unwrap().len(), 1);

    // A device's private key is handed out again only to admin: a write token may not read it
    // (nor replace it).
    for rotate in [false, true] {
        assert_eq!(
            code_of(c.user_config("alice", "laptop", rotate).await).await,
            Code::PermissionDenied
        );
    }
    let admin = api.token(Scope::Admin);
    let a = api.tcp_client(Some(&admin)).await;

    // Kept keys: the config comes back identical; without a device name it is ambiguous.
    let again = a.user_config("alice", "laptop", false).await.unwrap();
    assert_eq!(again.wg_quick, cfg.wg_quick);
    assert_eq!(
        code_of(a.user_config("alice", "", false).await).await,
        Code::InvalidArgument
    );
    let rotated = a.user_config("alice", "laptop", true).await.unwrap();
    assert_ne!(rotated.peer.public_key, cfg.peer.public_key);
    assert!(api.tunnel.state().contains_key(&rotated.peer.public_key));

    // Kick, connections, stats.
    let kicked = c.kick("alice").await.unwrap();
    assert_eq!(kicked.len(), 2);
    assert_eq!(c.connections().await.unwrap().len(), 2);
    let stats = c.stats("alice").await.unwrap();
    assert_eq!(stats.peers.len(), 2);
    assert_eq!(code_of(c.stats("nobody").await).await, Code::NotFound);

    // Remove a device, then the user.
    c.remove_peer("alice", "phone").await.unwrap();
    assert_eq!(
        code_of(c.remove_peer("alice", "phone").await).await,
        Code::NotFound
    );
    let removed = c.remove_user("alice").await.unwrap();
    assert_eq!(removed.peers.len(), 1);
    assert_eq!(code_of(c.get_user("alice").await).await, Code::NotFound);
    assert!(api.plane.state().peers.is_empty());
    assert!(api.tunnel.state().is_empty());

    // The audit trail, filtered by user, names the token and has before/after.
    let recs = c.audit("alice", 100).await.unwrap();
    let actions: Vec<&str> = recs.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "user.remove",
            "peer.remove",
            "connection.kick",
            "peer.rotate",
            "peer.config",
            "peer.add",
            "user.add"
        ]
    );
    assert!(recs.iter().all(|r| r.actor.starts_with("token:")));
    assert!(recs[0].before.is_some() && recs[0].after.is_none());
    assert!(recs[3].before.is_some() && recs[3].after.is_some());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kept_keys_a_config_is_shown_once() {
    let api = TestApi::start(false).await;
    let c = api.unix_client().await;
    let (_, cfg) = c.add_user("bob", "", 0).await.unwrap();
    assert!(cfg.private_key.is_some());
    assert_eq!(
        code_of(c.user_config("bob", "", false).await).await,
        Code::FailedPrecondition
    );
    let rotated = c.user_config("bob", "", true).await.unwrap();
    assert!(rotated.private_key.is_some());
    assert_ne!(rotated.private_key, cfg.private_key);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklists_round_trip() {
    let api = TestApi::start(false).await;
    let c = api.unix_client().await;
    let l = c
        .change_entries(
            Direction::Destination,
            "malware",
            vec!["203.0.113.0/24".into(), "2001:db8::/32".into()],
            true,
        )
        .await
        .unwrap();
    assert_eq!((l.entries, l.cidrs.len()), (2, 0));
    let l = c
        .change_entries(
            Direction::Destination,
            "malware",
            vec!["203.0.113.0/24".into()],
            false,
        )
        .await
        .unwrap();
    assert_eq!((l.entries, l.cidrs.len()), (1, 0));
    assert_eq!(c.blocklists().await.unwrap().len(), 1);
    assert_eq!(
        code_of(c.delete_blocklist(Direction::Source, "malware").await).await,
        Code::NotFound
    );
    c.delete_blocklist(Direction::Destination, "malware")
        .await
        .unwrap();
    assert!(c.blocklists().await.unwrap().is_empty());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_and_health_answers() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let api = TestApi::start(false).await;
    let read = api.token(Scope::Read);
    let mut client = ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(api.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut req = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {read}").parse().unwrap());
    let mut stream = client
        .server_reflection_info(req)
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for want in [
        "capybara.v1.Audit",
        "capybara.v1.Blocklists",
        "capybara.v1.Connections",
        "capybara.v1.Peers",
        "capybara.v1.Stats",
        "capybara.v1.Tokens",
        "capybara.v1.Users",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    // Without a token, reflection is refused on TCP too.
    let mut client = ServerReflectionClient::new(
        tonic::transport::Channel::from_shared(api.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let req = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    let s = client.server_reflection_info(req).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    let c = api.tcp_client(Some(&read)).await;
    assert!(c.health("").await.unwrap());
    assert!(c.health("capybara.v1.Users").await.unwrap());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_root_only_by_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let api = TestApi::start(false).await;
    let mode = std::fs::metadata(&api.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    api.stop().await;
}
