//! Proxy identities (issue 24) through the API in-process (a real gRPC and REST server, real
//! RocksDB, the in-memory dataplane and tunnel) and the `capybara` binary: `user add
//! --protocol`, `user protocol add|remove`, `user config --protocol` with their QR codes,
//! protocols in `user list/show`, the REST routes and OpenAPI entries, bad input (exit 2,
//! `INVALID_ARGUMENT`, 400) changing nothing, ids shared with devices and freed on removal,
//! audit records, and identities surviving a restart of the service over the same store.

use std::sync::Arc;

use capybara_agent::{
    proxy::Credentials as _,
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, DeviceName, Protocol, Scope, UserName},
        proxies::{ProxySettings, ShadowsocksCipher, ShadowsocksEndpoint, VlessEndpoint},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};
use capybara_tests::{agent_proc::agent_crate_binary, rest::Rest};
use serde_json::json;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

fn settings(cipher: ShadowsocksCipher) -> ProxySettings {
    ProxySettings {
        shadowsocks: Some(ShadowsocksEndpoint {
            listen: "0.0.0.0:8388".parse().unwrap(),
            cipher,
        }),
        vless: Some(VlessEndpoint {
            listen: "0.0.0.0:8443".parse().unwrap(),
            sni: Some("vpn.example.com".into()),
            cert_pem: None,
            cert_sha256: Some([9; 32]),
        }),
    }
}

fn start() -> (tokio::runtime::Runtime, TestApi) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    api.svc
        .proxies
        .configure(settings(ShadowsocksCipher::Aes256Gcm));
    (rt, api)
}

/// The audit actions on `user`, newest first.
fn actions(cli: &Cli, user: &str) -> Vec<String> {
    cli.json(&["history", "audit", "--user", user])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_cli_adds_shows_configures_and_removes_protocols() {
    let (_rt, api) = start();
    let cli = Cli::socket(&agent_crate_binary("capybara"), &api.socket);
    let out = cli.ok(&[
        "user",
        "add",
        "alice",
        "--protocol",
        "wireguard,shadowsocks,vless",
        "--no-qr",
    ]);
    // Today's WireGuard output first, then each proxy identity's URI and JSON.
    assert!(out.starts_with("[Interface]\nPrivateKey = "), "{out}");
    assert!(out.contains("\n# shadowsocks\nss://"), "{out}");
    assert!(out.contains("@192.0.2.1:8388#alice\n"), "{out}");
    assert!(out.contains("\n# vless\nvless://"), "{out}");
    assert!(
        out.contains(
            "@192.0.2.1:8443?encryption=none&security=tls&sni=vpn.example.com&type=tcp#alice"
        ),
        "{out}"
    );
    assert!(out.contains("\"server_port\": 8388"), "{out}");
    assert!(out.contains("\"protocol\": \"vless\""), "{out}");

    let table = cli.ok(&["user", "list"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().ends_with("PROTOCOLS"), "{table}");
    assert!(
        lines
            .next()
            .unwrap()
            .ends_with("wireguard,shadowsocks,vless"),
        "{table}"
    );
    let show = cli.ok(&["user", "show", "alice"]);
    assert!(
        show.contains("protocols wireguard,shadowsocks,vless"),
        "{show}"
    );
    let users = cli.json(&["user", "list"]);
    assert_eq!(users[0]["proxies"][0]["protocol"], "shadowsocks");
    assert_eq!(users[0]["proxies"][1]["protocol"], "vless");

    // The configs again, with the QR code of the URI and its PNG.
    let png = api.dir.path().join("alice-ss.png");
    let cfg = cli.ok(&[
        "user",
        "config",
        "alice",
        "--protocol",
        "shadowsocks",
        "--png",
        png.to_str().unwrap(),
    ]);
    let uri = cfg.lines().next().unwrap();
    assert!(uri.starts_with("ss://") && uri.ends_with("#alice"), "{cfg}");
    assert!(out.contains(uri), "the same credential as at add: {cfg}");
    assert!(cfg.contains('█') || cfg.contains('▀'), "no QR code: {cfg}");
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let j = cli.json(&["user", "config", "alice", "--protocol", "vless"]);
    assert!(j["uri"].as_str().unwrap().starts_with("vless://"), "{j}");
    let v2ray: serde_json::Value = serde_json::from_str(j["json"].as_str().unwrap()).unwrap();
    assert_eq!(
        v2ray["outbounds"][0]["streamSettings"]["tlsSettings"]["serverName"],
        "vpn.example.com"
    );
    // The default protocol is today's WireGuard behaviour (the key is not kept: shown once).
    cli.fails(1, &["user", "config", "alice"], "shown once");

    // Remove and add again: a new credential.
    assert_eq!(
        cli.ok(&["user", "protocol", "remove", "alice", "shadowsocks"]),
        "removed shadowsocks access of alice\n"
    );
    let again = cli.ok(&["user", "protocol", "add", "alice", "shadowsocks", "--no-qr"]);
    assert!(again.starts_with("ss://"), "{again}");
    assert!(!again.contains(uri), "a new credential: {again}");
    assert_eq!(
        actions(&cli, "alice"),
        [
            "proxy.add",
            "proxy.remove",
            "proxy.config",
            "proxy.config",
            "user.add"
        ]
    );

    // Bad input: exit 2 naming the field, nothing changed.
    let before = cli.json(&["user", "list"]);
    let audit = actions(&cli, "alice");
    for (args, needle) in [
        (
            &["user", "add", "bob", "--protocol", "wireguard,ftp"][..],
            "protocol",
        ),
        (
            &["user", "add", "bob", "--protocol", "vless,vless"][..],
            "protocol",
        ),
        (
            &["user", "protocol", "add", "alice", "vless"][..],
            "protocol",
        ),
        (
            &["user", "protocol", "add", "alice", "wireguard"][..],
            "protocol",
        ),
        (&["user", "protocol", "add", "alice", "ftp"][..], "protocol"),
        (
            &["user", "config", "alice", "--protocol", "vless", "--rotate"][..],
            "rotate",
        ),
    ] {
        cli.fails(2, args, needle);
    }
    api.svc.proxies.configure(ProxySettings {
        vless: None,
        ..settings(ShadowsocksCipher::Aes256Gcm)
    });
    cli.fails(
        2,
        &["user", "add", "bob", "--protocol", "shadowsocks,vless"],
        "--vless-listen",
    );
    cli.fails(
        2,
        &["user", "protocol", "remove", "alice", "wireguard"],
        "protocol",
    );
    assert_eq!(cli.json(&["user", "list"]), before);
    assert_eq!(actions(&cli, "alice"), audit);

    // A user without WireGuard: no device, no tunnel peer.
    let out = cli.ok(&[
        "user",
        "add",
        "carol",
        "--protocol",
        "shadowsocks",
        "--no-qr",
    ]);
    assert!(out.starts_with("# shadowsocks\nss://"), "{out}");
    let carol = cli.json(&["user", "show", "carol"]);
    assert_eq!(carol["peers"], json!([]));
    let removed = cli.ok(&["user", "remove", "alice"]);
    assert_eq!(
        removed,
        "removed alice, 1 device(s) and 2 proxy identities (shadowsocks, vless)\n"
    );
    assert!(api.tunnel.state().is_empty());
}

#[tokio::test]
async fn grpc_and_rest_round_trips_with_scopes_and_openapi() {
    let api = TestApi::start(false).await;
    api.svc
        .proxies
        .configure(settings(ShadowsocksCipher::Blake3Aes256Gcm));
    let write = api.tcp_client(Some(&api.token(Scope::Write))).await;
    let added = write
        .add_user_with("alice", "", 0, &["vless".into()])
        .await
        .unwrap();
    assert!(added.config.is_none());
    assert_eq!(added.proxies.len(), 1);
    assert_eq!(added.proxies[0].access.protocol, Protocol::Vless);
    let cfg = write.add_protocol("alice", "shadowsocks").await.unwrap();
    assert!(
        cfg.uri.starts_with("ss://2022-blake3-aes-256-gcm:"),
        "{}",
        cfg.uri
    );
    let d = write.get_user("alice").await.unwrap();
    assert_eq!(d.protocols(), [Protocol::Shadowsocks, Protocol::Vless]);
    // A credential already given is read with admin only.
    let (code, _) = refused(write.user_config_of("alice", "", false, "vless").await);
    assert_eq!(code, Code::PermissionDenied);
    let read = api.tcp_client(Some(&api.token(Scope::Read))).await;
    let (code, _) = refused(read.add_protocol("alice", "shadowsocks").await);
    assert_eq!(code, Code::PermissionDenied);
    // Bad input: INVALID_ARGUMENT naming the field.
    for (user, proto) in [("alice", "vless"), ("alice", "ftp"), ("alice", "wireguard")] {
        let (code, msg) = refused(write.add_protocol(user, proto).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.starts_with("protocol"), "{msg}");
    }
    let (code, _) = refused(write.add_protocol("zed", "vless").await);
    assert_eq!(code, Code::NotFound);
    let (code, msg) = refused(write.add_user_with("bob", "", 0, &["ftp".into()]).await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.starts_with("protocols"), "{msg}");

    // REST: the same calls, their routes and their OpenAPI entries.
    let admin = Rest::new(api.tcp, Some(&api.token(Scope::Admin)));
    let r = admin
        .call("DELETE", "/api/v1/users/alice/protocols/vless", None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["removed"]["protocol"], "vless", "{r:?}");
    let before = admin.call("GET", "/api/v1/users/alice", None).await;
    assert_eq!(
        before.json["protocols"],
        json!(["shadowsocks"]),
        "{before:?}"
    );
    let r = admin
        .call(
            "POST",
            "/api/v1/users/alice/protocols",
            Some(r#"{"protocol":"ftp"}"#),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.json["message"].as_str().unwrap().starts_with("protocol"),
        "{r:?}"
    );
    let r = admin
        .call(
            "POST",
            "/api/v1/users/alice/protocols",
            Some(r#"{"protocol":"shadowsocks"}"#),
        )
        .await;
    assert_eq!(r.status, 400, "already present: {r:?}");
    assert_eq!(
        admin.call("GET", "/api/v1/users/alice", None).await.json,
        before.json
    );
    let r = admin
        .call(
            "POST",
            "/api/v1/users/alice/protocols",
            Some(r#"{"protocol":"vless"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.json["config"]["uri"]
            .as_str()
            .unwrap()
            .starts_with("vless://"),
        "{r:?}"
    );
    let r = admin
        .call(
            "POST",
            "/api/v1/users/alice/config",
            Some(r#"{"protocol":"shadowsocks"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["protocol"], "shadowsocks", "{r:?}");
    assert_eq!(r.json["proxy"]["uri"], cfg.uri.as_str(), "{r:?}");
    let r = admin
        .call(
            "POST",
            "/api/v1/users",
            Some(r#"{"name":"dave","protocols":["wireguard","shadowsocks"]}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["proxies"][0]["access"]["protocol"], "shadowsocks");
    assert!(r.json["config"]["privateKey"].is_string(), "{r:?}");
    let doc = admin.call("GET", "/api/v1/openapi.json", None).await;
    let paths = &doc.json["paths"];
    assert!(
        paths["/api/v1/users/{name}/protocols"]["post"].is_object(),
        "{doc:?}"
    );
    assert!(
        paths["/api/v1/users/{name}/protocols/{protocol}"]["delete"].is_object(),
        "{doc:?}"
    );
}

#[tokio::test]
async fn proxy_ids_share_the_device_id_space_and_removal_frees_them() {
    let api = TestApi::start(false).await;
    api.svc
        .proxies
        .configure(settings(ShadowsocksCipher::Aes128Gcm));
    let c = api.unix_client().await;
    let all = ["wireguard".into(), "shadowsocks".into(), "vless".into()];
    let a = c.add_user_with("alice", "", 0, &all).await.unwrap();
    let b = c.add_user_with("bob", "", 0, &all).await.unwrap();
    let mut ids: Vec<u32> = [&a, &b]
        .iter()
        .flat_map(|x| {
            x.config
                .iter()
                .map(|c| c.peer.id)
                .chain(x.proxies.iter().map(|p| p.access.id))
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3, 4, 5], "one id space, no id twice");
    // The proxy lines are in the kernel without addresses and not in the tunnel.
    let plane = api.plane.state();
    for p in a.proxies.iter().chain(&b.proxies) {
        assert_eq!(plane.peers[&p.access.id], vec![]);
    }
    assert_eq!(api.tunnel.state().len(), 2);
    // Removing a protocol frees its id: the next device gets it, never a live proxy's.
    let vless_id = a.proxies[1].access.id;
    c.remove_protocol("alice", "vless").await.unwrap();
    assert!(!api.plane.state().peers.contains_key(&vless_id));
    let phone = c.add_peer("bob", "phone").await.unwrap();
    assert_eq!(phone.peer.id, vless_id);
    // Removing the user frees its device's and its identities' ids.
    let gone = c.remove_user("alice").await.unwrap();
    assert_eq!(gone.proxies.len(), 1);
    let mut freed = vec![a.config.as_ref().unwrap().peer.id, a.proxies[0].access.id];
    freed.sort_unstable();
    let again = c
        .add_user_with("carol", "", 0, &["shadowsocks".into(), "vless".into()])
        .await
        .unwrap();
    let mut got: Vec<u32> = again.proxies.iter().map(|p| p.access.id).collect();
    got.sort_unstable();
    assert_eq!(got, freed);
    assert!(
        !api.svc.proxies.admitted(a.proxies[1].access.id + 1000),
        "an unknown id is never admitted"
    );
}

#[test]
fn identities_survive_a_restart_of_the_service_over_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || ServiceConfig::for_tests("10.98.0.1/24", "fd98::1/64", "vpn.example.com:51820");
    let open = |plane: Arc<MemoryPlane>| {
        let svc = Service::open(
            Arc::new(Store::open(dir.path()).unwrap()),
            plane,
            Arc::new(MemoryTunnel::default()),
            cfg(),
        )
        .unwrap();
        svc.proxies
            .configure(settings(ShadowsocksCipher::Blake3Aes256Gcm));
        svc
    };
    let alice = UserName::parse("name", "alice").unwrap();
    let (uris, ids, keys) = {
        let svc = open(Arc::new(MemoryPlane::default()));
        let added = svc
            .users
            .add_user_with(
                &Actor::Local { uid: 0 },
                NewUser {
                    name: alice.clone(),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
                &[Protocol::Shadowsocks, Protocol::Vless],
            )
            .unwrap();
        let uris: Vec<String> = added.proxies.iter().map(|p| p.uri.clone()).collect();
        let ids: Vec<u32> = added.proxies.iter().map(|p| p.access.id).collect();
        (uris, ids, svc.proxies.shadowsocks())
    };
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(plane.clone());
    let d = svc.users.get_user(&alice).unwrap();
    assert_eq!(d.protocols(), [Protocol::Shadowsocks, Protocol::Vless]);
    assert_eq!(
        d.proxies.iter().map(|p| p.id).collect::<Vec<_>>(),
        ids,
        "the same ids"
    );
    let root = Actor::Local { uid: 0 };
    for (p, uri) in [Protocol::Shadowsocks, Protocol::Vless].iter().zip(&uris) {
        let cfg = svc.proxies.client_config(&root, &alice, *p).unwrap();
        assert_eq!(&cfg.uri, uri, "the same credential after the restart");
    }
    let now = svc.proxies.shadowsocks();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].key, keys[0].key);
    // Programmed again into the (new) kernel, admitted.
    for id in &ids {
        assert_eq!(plane.state().peers[id], vec![]);
        assert!(svc.proxies.admitted(*id));
    }
    // A new device does not take their ids.
    let cfg = svc
        .devices
        .add_device(
            &root,
            &alice,
            &DeviceName::parse("device", "laptop").unwrap(),
        )
        .unwrap();
    assert!(!ids.contains(&cfg.peer.id), "{}", cfg.peer.id);
}

/// Debian's v2ray (4.34, what `cargo xtask setup` installs) loads the VLESS client config as
/// printed, with the self-signed certificate it pins (`certificates` with `usage: "verify"`,
/// `disableSystemRoot`) and the newer versions' `pinnedPeerCertificateChainSha256` beside it;
/// and refuses the same config with a transport it does not know (so the check can fail).
#[test]
fn v2ray_4_34_loads_the_vless_client_config() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "1", "-subj", "/CN=vpn.example.com"])
        .args(["-addext", "subjectAltName=DNS:vpn.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (cargo xtask setup installs it)");
    assert!(made.status.success(), "{made:?}");
    let ep = VlessEndpoint {
        listen: "0.0.0.0:8443".parse().unwrap(),
        sni: Some("vpn.example.com".into()),
        cert_pem: Some(std::fs::read_to_string(&cert).unwrap()),
        cert_sha256: Some([9; 32]),
    };
    let uuid = capybara_agent::service::proxies::new_uuid();
    let (_, json) =
        capybara_agent::service::proxies::vless_config(&ep, &uuid, "192.0.2.1", "alice");
    let check = |json: &str| {
        let file = dir.path().join("v2ray.json");
        std::fs::write(&file, json).unwrap();
        std::process::Command::new("v2ray")
            .args(["-test", "-config"])
            .arg(&file)
            .output()
            .expect("v2ray (cargo xtask setup installs it)")
    };
    let out = check(&json);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Configuration OK"),
        "{out:?}"
    );
    let version = std::process::Command::new("v2ray")
        .arg("-version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("V2Ray 4."),
        "{version:?}"
    );
    let bad = json.replace("\"network\": \"tcp\"", "\"network\": \"carrier-pigeon\"");
    assert_ne!(bad, json);
    assert!(
        !check(&bad).status.success(),
        "v2ray refuses an unknown network"
    );
}
