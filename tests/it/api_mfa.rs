//! MFA over the API, REST and the CLI (in-process agent, real store, in-memory dataplane): every
//! `Mfa` RPC and what it does to the gate, the scopes, bad input refused naming the field with
//! nothing changed, the REST routes, and `capybara mfa …` (URI, QR, `--png`, backup codes).

use std::time::SystemTime;

use capybara_agent::{
    api::client::code as grpc_code,
    dataplane::Gate,
    service::{
        domain::{Actor, DeviceName, Scope, UserName, unix_secs},
        mfa::totp,
    },
};
use capybara_common::drop::DropReason;
use capybara_tests::{agent_proc::agent_crate_binary, rest::Rest};
use serde_json::json;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

/// Adds `name` with one device; its peer id.
fn add_user(api: &TestApi, name: &str) -> u32 {
    let (_, cfg) = api
        .svc
        .users
        .add_user(
            &Actor::Local { uid: 0 },
            capybara_agent::service::NewUser {
                name: UserName::parse("name", name).unwrap(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )
        .unwrap();
    cfg.peer.id
}

fn code_now(uri: &str) -> String {
    let secret = totp::secret_of_uri(uri).unwrap();
    totp::code_at_step(&secret, totp::step_of(unix_secs(SystemTime::now())))
}

/// A 6-digit code that is none of the secret's codes around now.
fn wrong_code(uri: &str) -> String {
    let secret = totp::secret_of_uri(uri).unwrap();
    let s = totp::step_of(unix_secs(SystemTime::now()));
    (0..1_000_000u32)
        .map(|n| format!("{n:06}"))
        .find(|c| (s - 2..=s + 2).all(|st| totp::code_at_step(&secret, st) != *c))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_changes_the_gate_as_it_says_and_is_audited() {
    let api = TestApi::start(false).await;
    let id = add_user(&api, "alice");
    let gate = |api: &TestApi| api.plane.state().gates[&id];
    let c = api.unix_client().await;

    let e = c
        .mfa_enable("alice", Some("alice@example.org".into()), None)
        .await
        .unwrap();
    assert!(e.uri.starts_with("otpauth://totp/Capybara:alice?secret="));
    assert_eq!(e.backup_codes.len(), 10);
    let st = c.mfa_status("alice").await.unwrap();
    assert_eq!(st.users[0].state, "pending");
    assert_eq!(st.users[0].email.as_deref(), Some("a***@example.org"));
    assert_eq!(
        gate(&api),
        Gate::Admitted { until: None },
        "pending is not on"
    );

    // A wrong code: INVALID_ARGUMENT naming `code`, still pending.
    let (code, msg) = refused(c.mfa_confirm("alice", &wrong_code(&e.uri)).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.starts_with("code: "), "{msg}");
    assert_eq!(c.mfa_status("alice").await.unwrap(), st);

    let s = c.mfa_confirm("alice", &code_now(&e.uri)).await.unwrap();
    assert_eq!((s.state.as_str(), s.required), ("enrolled", true));
    assert_eq!(gate(&api), Gate::Held(DropReason::GateMfaPending));

    let r = c.mfa_reset("alice").await.unwrap();
    assert_ne!(totp::secret_of_uri(&r.uri), totp::secret_of_uri(&e.uri));
    assert_ne!(r.backup_codes, e.backup_codes);
    let s = c.mfa_status("alice").await.unwrap().users.remove(0);
    assert_eq!((s.state.as_str(), s.required), ("pending", true));
    assert_eq!(gate(&api), Gate::Held(DropReason::GateMfaPending));

    let s = c.mfa_disable("alice").await.unwrap();
    assert_eq!((s.state.as_str(), s.required), ("none", false));
    assert_eq!(gate(&api), Gate::Admitted { until: None });

    let o = c.mfa_require_all(true).await.unwrap();
    assert!(o.require_all);
    assert_eq!(o.users.len(), 1);
    assert_eq!(gate(&api), Gate::Held(DropReason::GateMfaPending));
    let o = c.mfa_require_all(false).await.unwrap();
    assert!(!o.require_all && o.users.is_empty(), "{o:?}");
    assert_eq!(gate(&api), Gate::Admitted { until: None });

    let actions: Vec<String> = c
        .audit("", 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .filter(|a| a.starts_with("mfa."))
        .collect();
    assert_eq!(
        actions,
        [
            "mfa.require-all",
            "mfa.require-all",
            "mfa.disable",
            "mfa.reset",
            "mfa.confirm",
            "mfa.enable"
        ]
    );
    // Neither the secrets nor the codes are in the audit trail.
    let audit = format!("{:?}", c.audit("", 20).await.unwrap());
    for uri in [&e.uri, &r.uri] {
        let b32 = uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert!(!audit.contains(b32));
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_changes_nothing_and_scopes_hold() {
    let api = TestApi::start(false).await;
    add_user(&api, "alice");
    let c = api.unix_client().await;
    c.mfa_enable("alice", None, None).await.unwrap();
    let before = c.mfa_status("").await.unwrap();
    for (r, code, field) in [
        (
            c.mfa_enable("Alice!", None, None).await.map(|_| ()),
            Code::InvalidArgument,
            "user: ",
        ),
        (
            c.mfa_enable("bob", Some("bob@".into()), None)
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            "email: ",
        ),
        (
            c.mfa_enable("bob", None, Some("12345".into()))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            "sms: ",
        ),
        (
            c.mfa_enable("alice", None, None).await.map(|_| ()),
            Code::InvalidArgument,
            "user: ",
        ),
        (
            c.mfa_confirm("alice", "12x456").await.map(|_| ()),
            Code::InvalidArgument,
            "code: ",
        ),
        (
            c.mfa_enable("", None, None).await.map(|_| ()),
            Code::InvalidArgument,
            "user",
        ),
        (
            c.mfa_disable("nobody").await.map(|_| ()),
            Code::NotFound,
            "user \"nobody\" not found",
        ),
    ] {
        let (got, msg) = refused(r);
        assert_eq!(got, code, "{msg}");
        assert!(msg.starts_with(field), "{field:?}: {msg}");
    }
    assert_eq!(c.mfa_status("").await.unwrap(), before);

    // Scopes: read may look, not enable; write may confirm, not reset or require.
    let read = api.tcp_client(Some(&api.token(Scope::Read))).await;
    assert_eq!(read.mfa_status("").await.unwrap(), before);
    let e = read.mfa_enable("alice", None, None).await.unwrap_err();
    assert_eq!(grpc_code(&e), Some(Code::PermissionDenied), "{e}");
    let write = api.tcp_client(Some(&api.token(Scope::Write))).await;
    for e in [
        write.mfa_reset("alice").await.map(|_| ()).unwrap_err(),
        write.mfa_require_all(true).await.map(|_| ()).unwrap_err(),
        write.mfa_disable("alice").await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(grpc_code(&e), Some(Code::PermissionDenied), "{e}");
    }
    assert_eq!(c.mfa_status("").await.unwrap(), before);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_routes() {
    let api = TestApi::start(false).await;
    let id = add_user(&api, "alice");
    let rest = Rest::new(api.tcp, Some(&api.token(Scope::Admin)));
    let e = rest
        .call(
            "POST",
            "/api/v1/mfa/users/alice/enable",
            Some(r#"{"sms":"+4915112345678"}"#),
        )
        .await;
    assert_eq!(e.status, 200, "{e:?}");
    let uri = e.json["uri"].as_str().unwrap().to_owned();
    assert_eq!(e.json["backupCodes"].as_array().unwrap().len(), 10);
    let s = rest.call("GET", "/api/v1/mfa?user=alice", None).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.json["users"][0]["state"], "pending");
    assert_eq!(s.json["users"][0]["sms"], "+49*********78");
    // A bad code: 400 naming the field.
    let bad = rest
        .call(
            "POST",
            "/api/v1/mfa/users/alice/confirm",
            Some(&json!({"code": wrong_code(&uri)}).to_string()),
        )
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.text.contains("code: "), "{bad:?}");
    let ok = rest
        .call(
            "POST",
            "/api/v1/mfa/users/alice/confirm",
            Some(&json!({"code": code_now(&uri)}).to_string()),
        )
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json["state"], "enrolled");
    assert_eq!(
        api.plane.state().gates[&id],
        Gate::Held(DropReason::GateMfaPending)
    );
    let r = rest
        .call("POST", "/api/v1/mfa/users/alice/reset", Some("{}"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.json["uri"].as_str().unwrap(), uri);
    let a = rest
        .call("PUT", "/api/v1/mfa/require-all", Some(r#"{"on":true}"#))
        .await;
    assert_eq!(
        (a.status, &a.json["requireAll"]),
        (200, &json!(true)),
        "{a:?}"
    );
    let d = rest
        .call("POST", "/api/v1/mfa/users/alice/disable", Some("{}"))
        .await;
    assert_eq!(d.status, 200, "{d:?}");
    let n = rest
        .call("POST", "/api/v1/mfa/users/nobody/disable", Some("{}"))
        .await;
    assert_eq!(n.status, 404, "{n:?}");
    let doc = rest.call("GET", "/api/v1/openapi.json", None).await;
    for path in [
        "/api/v1/mfa",
        "/api/v1/mfa/require-all",
        "/api/v1/mfa/users/{user}/enable",
        "/api/v1/mfa/users/{user}/confirm",
        "/api/v1/mfa/users/{user}/disable",
        "/api/v1/mfa/users/{user}/reset",
    ] {
        assert!(
            doc.json["paths"].get(path).is_some(),
            "{path} not documented"
        );
    }
    api.stop().await;
}

#[test]
fn mfa_from_the_cli() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    add_user(&api, "alice");
    let cli = Cli::socket(&bin, &api.socket);
    let png = api.dir.path().join("alice-mfa.png");
    let out = cli.ok(&[
        "mfa",
        "enable",
        "alice",
        "--email",
        "alice@example.org",
        "--png",
        png.to_str().unwrap(),
    ]);
    let uri = out
        .lines()
        .find(|l| l.starts_with("otpauth://totp/Capybara:alice?"))
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert!(out.starts_with("mfa alice: enrolment pending"), "{out}");
    assert!(
        out.contains('█') || out.contains('▀'),
        "a terminal QR code: {out}"
    );
    let codes: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("backup codes"))
        .skip(1)
        .map(str::trim)
        .collect();
    assert_eq!(codes.len(), 10, "{out}");
    assert!(
        codes
            .iter()
            .all(|c| c.len() == 11 && c.as_bytes()[5] == b'-')
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // Bad input exits 2 with one line naming the field.
    cli.fails(2, &["mfa", "enable", "Bad!"], "user: ");
    cli.fails(2, &["mfa", "confirm", "alice", &wrong_code(&uri)], "code: ");
    let out = cli.ok(&["mfa", "confirm", "alice", &code_now(&uri)]);
    assert!(
        out.starts_with("mfa alice: enrolled (devices held"),
        "{out}"
    );
    let out = cli.ok(&["mfa", "status"]);
    assert!(out.starts_with("mfa require-all: off\nUSER "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("alice ") && l.contains("enrolled")),
        "{out}"
    );
    let v = cli.json(&["mfa", "status", "alice"]);
    assert_eq!(v["users"][0]["backup_codes_left"], 10, "{v}");
    let v = cli.json(&["mfa", "reset", "alice", "--no-qr"]);
    assert!(v["uri"].as_str().unwrap().starts_with("otpauth://"), "{v}");
    let out = cli.ok(&["mfa", "require-all"]);
    assert!(out.starts_with("mfa require-all: on"), "{out}");
    let out = cli.ok(&["mfa", "require-all", "--off"]);
    assert!(out.starts_with("mfa require-all: off"), "{out}");
    let out = cli.ok(&["mfa", "disable", "alice"]);
    assert!(out.starts_with("mfa alice: none"), "{out}");
}
