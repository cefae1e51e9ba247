//! The REST mirror in-process (a real HTTP server on 127.0.0.1:0 beside gRPC, real RocksDB, the
//! in-memory dataplane and tunnel): the design's eight routes, every auth failure class, bad
//! input answered 400 naming the field with nothing changed, 404/409/413, the OpenAPI document.

use capybara_agent::service::domain::Scope;
use capybara_tests::rest::Rest;
use serde_json::{Value, json};

use crate::api_support::TestApi;

async fn setup() -> (TestApi, Rest) {
    let api = TestApi::start(true).await;
    let admin = api.token(Scope::Admin);
    let rest = Rest::new(api.tcp, Some(&admin));
    (api, rest)
}

/// What the state consists of, to compare before and after a refused call.
async fn snapshot(rest: &Rest) -> Value {
    let users = rest.call("GET", "/api/v1/users", None).await;
    let tokens = rest.call("GET", "/api/v1/tokens", None).await;
    let lists = rest.call("GET", "/api/v1/blocklists", None).await;
    assert_eq!(
        (users.status, tokens.status, lists.status),
        (200, 200, 200),
        "{users:?}"
    );
    json!([users.json, tokens.json, lists.json])
}

#[tokio::test]
async fn the_designs_eight_routes_answer_json() {
    let (api, rest) = setup().await;
    // POST /api/v1/users
    let a = rest
        .call(
            "POST",
            "/api/v1/users",
            Some(r#"{"name":"alice","device":"phone"}"#),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json["user"]["name"], "alice", "{a:?}");
    assert_eq!(a.json["config"]["peer"]["device"], "phone", "{a:?}");
    assert!(
        a.json["config"]["privateKey"]
            .as_str()
            .is_some_and(|k| k.len() == 44),
        "{a:?}"
    );
    // GET /api/v1/users
    let l = rest.call("GET", "/api/v1/users", None).await;
    assert_eq!(l.status, 200);
    let names: Vec<_> = l.json["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"]["name"].clone())
        .collect();
    assert_eq!(names, [json!("alice")], "{l:?}");
    // GET /api/v1/stats, /connections, /health
    let s = rest.call("GET", "/api/v1/stats?user=alice", None).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.json["users"][0]["user"], "alice", "{s:?}");
    let c = rest.call("GET", "/api/v1/connections", None).await;
    assert_eq!(c.status, 200, "{c:?}");
    assert!(c.json["connections"].is_array(), "{c:?}");
    let h = rest.call("GET", "/api/v1/health", None).await;
    assert_eq!(h.status, 200, "{h:?}");
    assert!(
        h.json["components"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{h:?}"
    );
    // POST /api/v1/backup: the backup's chunks, one JSON message a line.
    let b = rest.call("POST", "/api/v1/backup", None).await;
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(
        b.headers["content-type"], "application/x-ndjson",
        "{:?}",
        b.headers
    );
    let lines: Vec<Value> = b
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    // DELETE /api/v1/users/{id}
    let d = rest.call("DELETE", "/api/v1/users/alice", None).await;
    assert_eq!(d.status, 200, "{d:?}");
    let gone = rest.call("GET", "/api/v1/users/alice", None).await;
    assert_eq!(gone.status, 404, "{gone:?}");
    assert_eq!(gone.json["status"], "NOT_FOUND", "{gone:?}");
    // The same audit trail as gRPC: the REST calls are there, by this token.
    let audit = rest.call("GET", "/api/v1/audit?pageSize=10", None).await;
    let actions: Vec<_> = audit.json["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert!(actions.contains(&"user.add".to_owned()), "{actions:?}");
    assert!(actions.contains(&"user.remove".to_owned()), "{actions:?}");
    drop(api);
}

#[tokio::test]
async fn every_auth_failure_class_has_its_status() {
    let (api, admin) = setup().await;
    let read = api.token(Scope::Read);
    // No token, a malformed one, an unknown one: 401.
    for token in [
        None,
        Some("nonsense"),
        Some("capy_AAAAAAAAAAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"),
    ] {
        let r = admin
            .with_token(token)
            .call("GET", "/api/v1/users", None)
            .await;
        assert_eq!(r.status, 401, "{token:?}: {r:?}");
        assert_eq!(r.json["status"], "UNAUTHENTICATED", "{r:?}");
    }
    // Revoked: 401.
    let t = admin
        .call(
            "POST",
            "/api/v1/tokens",
            Some(r#"{"scope":"SCOPE_READ","name":"x"}"#),
        )
        .await;
    assert_eq!(t.status, 200, "{t:?}");
    let secret = t.json["secret"].as_str().unwrap().to_owned();
    let id = t.json["token"]["id"].as_str().unwrap().to_owned();
    let ok = admin
        .with_token(Some(&secret))
        .call("GET", "/api/v1/users", None)
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let rv = admin
        .call("DELETE", &format!("/api/v1/tokens/{id}"), None)
        .await;
    assert_eq!(rv.status, 200, "{rv:?}");
    let r = admin
        .with_token(Some(&secret))
        .call("GET", "/api/v1/users", None)
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.json["message"].as_str().unwrap().contains("revoked"),
        "{r:?}"
    );
    // Scope too small: 403.
    let r = admin
        .with_token(Some(&read))
        .call("POST", "/api/v1/users", Some(r#"{"name":"bob"}"#))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json["status"], "PERMISSION_DENIED", "{r:?}");
    // The OpenAPI document needs no token.
    let doc = admin
        .with_token(None)
        .call("GET", "/api/v1/openapi.json", None)
        .await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json["openapi"], "3.0.3");
}

#[tokio::test]
async fn bad_input_is_400_naming_the_field_and_changes_nothing() {
    let (api, rest) = setup().await;
    let a = rest
        .call("POST", "/api/v1/users", Some(r#"{"name":"alice"}"#))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let before = snapshot(&rest).await;
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "POST",
            "/api/v1/users",
            Some(r#"{"name":"Bad Name!"}"#),
            "name",
        ),
        (
            "POST",
            "/api/v1/users",
            Some(r#"{"name":"bob","colour":"red"}"#),
            "colour",
        ),
        (
            "POST",
            "/api/v1/users",
            Some(r#"{"name":"bob","expiresAt":"soon"}"#),
            "expiresAt",
        ),
        ("POST", "/api/v1/users", Some(r#"{"name":"bob""#), "body"),
        ("POST", "/api/v1/users", Some("[1,2]"), "body"),
        ("GET", "/api/v1/users?pageSize=lots", None, "pageSize"),
        ("GET", "/api/v1/users?colour=red", None, "colour"),
        (
            "GET",
            "/api/v1/users?pageSize=1&pageSize=2",
            None,
            "pageSize",
        ),
        ("GET", "/api/v1/users?pageToken=garbage", None, "page_token"),
        (
            "POST",
            "/api/v1/users/alice/devices",
            Some(r#"{"device":"x y"}"#),
            "device",
        ),
        (
            "POST",
            "/api/v1/users/alice/devices",
            Some(r#"{"user":"bob","device":"x"}"#),
            "user",
        ),
        (
            "POST",
            "/api/v1/blocklists/evil/entries",
            Some(r#"{"direction":"DIRECTION_SOURCE","cidrs":["10.0.0.0/33"]}"#),
            "cidrs",
        ),
        (
            "POST",
            "/api/v1/blocklists/evil/entries",
            Some(r#"{"direction":"SIDEWAYS","cidrs":[]}"#),
            "direction",
        ),
        ("POST", "/api/v1/users", Some(r#"{"name":"bob"}"#), "query"),
    ];
    for (method, path, body, field) in cases {
        let path = if *field == "query" {
            format!("{path}?x=1")
        } else {
            (*path).to_owned()
        };
        let r = rest.call(method, &path, *body).await;
        assert_eq!(r.status, 400, "{method} {path} {body:?}: {r:?}");
        assert_eq!(r.json["status"], "INVALID_ARGUMENT", "{r:?}");
        let msg = r.json["message"].as_str().unwrap();
        assert!(
            msg.starts_with(field)
                || msg.contains(&format!("{field}:"))
                || msg.contains(&format!("`{field}`")),
            "{method} {path}: the message names {field}: {msg}"
        );
        assert_eq!(
            snapshot(&rest).await,
            before,
            "{method} {path} changed state"
        );
    }
    // 409: exists already.
    let dup = rest
        .call("POST", "/api/v1/users", Some(r#"{"name":"alice"}"#))
        .await;
    assert_eq!(dup.status, 409, "{dup:?}");
    // 404: unknown route, unknown user.
    assert_eq!(rest.call("GET", "/api/v1/nope", None).await.status, 404);
    assert_eq!(
        rest.call("DELETE", "/api/v1/users/zed", None).await.status,
        404
    );
    // 413: a body over the limit is refused before it is read.
    let big = format!(
        r#"{{"yaml":"{}"}}"#,
        "x".repeat(capybara_agent::api::rest::MAX_BODY + 1)
    );
    let r = rest.call("POST", "/api/v1/policy/apply", Some(&big)).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(snapshot(&rest).await, before);
    drop(api);
}

#[tokio::test]
async fn a_client_stream_takes_one_json_message_a_line() {
    let (api, rest) = setup().await;
    let body = [
        r#"{"direction":"DIRECTION_SOURCE","cidrs":["192.0.2.0/24","198.51.100.7/32"]}"#,
        r#"{"cidrs":["203.0.113.0/25"]}"#,
    ]
    .join("\n");
    let r = rest
        .raw(
            "POST",
            "/api/v1/blocklists/scanners/entries/stream",
            Some(body.into_bytes()),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["entryCount"], "3", "{r:?}");
    let bad = r#"{"direction":"DIRECTION_SOURCE","cidrs":["192.0.2.0/24"]}
{"cidrs":["nope"]}"#;
    let r = rest
        .raw(
            "POST",
            "/api/v1/blocklists/other/entries/stream",
            Some(bad.as_bytes().to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let lists = rest.call("GET", "/api/v1/blocklists", None).await;
    assert_eq!(
        lists.json["lists"].as_array().unwrap().len(),
        1,
        "{lists:?}"
    );
    drop(api);
}

/// Where `cargo xtask setup` installs schemathesis (a virtual environment in its cache).
fn schemathesis() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var("CAPYBARA_CACHE").unwrap_or_else(|_| "/var/cache/capybara".into()),
    )
    .join("pyenv/bin/st")
}

/// Schemathesis (the real tool, from PyPI) against the served OpenAPI document with an admin
/// token: every operation, generated valid and invalid input, no 5xx, no answer outside the
/// document (status, content type, schema). Bounded: `--max-examples` per operation and
/// `--max-time` for the run (about a minute on 2 cores: it makes a few thousand calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let (api, rest) = setup().await;
    // Some state for the operations to find.
    for body in [r#"{"name":"alice"}"#, r#"{"name":"bob","device":"laptop"}"#] {
        assert_eq!(
            rest.call("POST", "/api/v1/users", Some(body)).await.status,
            200
        );
    }
    let admin = api.token(Scope::Admin);
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: run `cargo xtask setup`",
        st.display()
    );
    let report = api.dir.path().join("schemathesis");
    let out = tokio::process::Command::new(&st)
        .arg("run")
        .arg(format!("http://{}/api/v1/openapi.json", api.tcp))
        .args(["--header", &format!("Authorization: Bearer {admin}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "25",
            "--max-time",
            "150",
            "--workers",
            "2",
            // Not these: enabling or disabling the TCP API would move the listener this run
            // talks to (api_enable_status_test_docs_disable_from_the_cli tests them), and a
            // live watch streams until the client goes away (api_live tests it). Nor those
            // that make the agent send traffic to a URL (traffic in tests never leaves this
            // machine): adding a webhook resolves its host, testing, retrying or enabling one
            // posts to it (api_webhooks tests them against receivers on loopback). Nor
            // adding or running a scheduled task: its command is any CLI command, run as an
            // admin (api_schedule tests them). Nor setting or refreshing an IP intelligence
            // list's source: the agent fetches its URL (api_intel tests them against a server
            // on loopback with allow_private).
            "--exclude-operation-id-regex",
            "^(ApiAccess_(EnableApi|DisableApi)|Stats_WatchStats|Webhooks_(AddWebhook|TestWebhook|RetryDelivery|EnableWebhook)|Schedules_(AddSchedule|RunSchedule)|IpIntel_(SetIntelSource|RefreshIntelList))$",
            "--no-color",
            "--generation-deterministic",
            "--report",
            "junit",
        ])
        .arg("--report-dir")
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache (`.schemathesis/`) goes with the test's directory, not into the sources.
        .current_dir(api.dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
    drop(api);
}

/// `capybara api enable|status|test|docs|disable` from the CLI on the control socket: the
/// listener moves at once (the old address stops answering), the setting is stored and
/// audited, `api test` makes the round trip with a token of its own (revoked after), refused
/// settings change nothing.
#[test]
fn api_enable_status_test_docs_disable_from_the_cli() {
    use crate::api_support::Cli;
    let bin = capybara_tests::agent_proc::agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let cli = Cli::socket(&bin, &api.socket);
    // At start: the listener the agent was given (`--api-listen`).
    let s = cli.json(&["api", "status"]);
    assert_eq!(s["enabled"], true, "{s}");
    assert_eq!(s["source"], "flag", "{s}");
    assert_eq!(s["listen"], api.tcp.to_string(), "{s}");
    let first = api.tcp;

    // Refused: a plain network address, a missing certificate, a bad address. Nothing moves.
    cli.fails(2, &["api", "enable", "--listen", "0.0.0.0:0"], "listen:");
    let missing = api.dir.path().join("missing.pem");
    let m = missing.to_str().unwrap();
    cli.fails(
        2,
        &[
            "api",
            "enable",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            m,
            "--tls-key",
            m,
        ],
        "tls_cert:",
    );
    cli.fails(2, &["api", "enable", "--listen", "localhost"], "listen:");
    assert_eq!(cli.json(&["api", "status"])["listen"], first.to_string());
    assert!(api.svc.access.get().unwrap().is_none());

    // Enable on a new address: served there at once, stored, audited.
    let s = cli.json(&[
        "api",
        "enable",
        "--listen",
        "127.0.0.1:0",
        "--rate-limit",
        "500",
    ]);
    assert_eq!(s["enabled"], true, "{s}");
    assert_eq!(s["source"], "store", "{s}");
    assert_eq!(s["rate_limit"], 500, "{s}");
    let moved: std::net::SocketAddr = s["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(moved, first);
    let stored = api.svc.access.get().unwrap().expect("stored");
    assert_eq!(stored.listen.to_string(), "127.0.0.1:0");
    assert_eq!(stored.rate_limit, 500);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(first).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old listener still accepts"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let text = cli.ok(&["api", "status"]);
    assert!(text.contains(&format!("http://{moved}")), "{text}");

    // `api test`: the round trip over TCP with a temporary token, revoked after.
    let out = cli.ok(&["api", "test"]);
    assert!(
        out.starts_with(&format!("GET http://{moved}/api/v1/health: 200 in ")),
        "{out}"
    );
    let tokens = cli.json(&["api", "token", "list"]);
    let tokens = tokens.as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(
        tokens[0]["revoked_at"].as_u64().is_some_and(|t| t > 0),
        "{tokens:?}"
    );

    // `api docs`: the served OpenAPI document.
    let docs: Value = serde_json::from_str(&cli.ok(&["api", "docs"])).unwrap();
    assert_eq!(docs["openapi"], "3.0.3");
    for (path, verb) in [
        ("/api/v1/users", "get"),
        ("/api/v1/users", "post"),
        ("/api/v1/users/{name}", "delete"),
        ("/api/v1/stats", "get"),
        ("/api/v1/connections", "get"),
        ("/api/v1/health", "get"),
        ("/api/v1/backup", "post"),
    ] {
        assert!(docs["paths"][path][verb].is_object(), "{verb} {path}");
    }

    // Disable: nothing listens, the setting says off, audited twice.
    let s = cli.json(&["api", "disable"]);
    assert_eq!(s["enabled"], false, "{s}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(moved).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener still accepts"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(api.svc.access.get().unwrap().is_none());
    assert!(cli.ok(&["api", "status"]).contains("API disabled"));
    cli.fails(1, &["api", "test"], "capybara api enable");
    let audit = cli.ok(&["history", "audit"]);
    assert!(
        audit.contains("api.enable") && audit.contains("api.disable"),
        "{audit}"
    );
    drop(api);
}

/// The agent serves the stored setting at start when it is not given `--api-listen`.
#[tokio::test]
async fn a_stored_setting_is_served_at_start() {
    let api = TestApi::start(false).await;
    let access = capybara_agent::service::access::ApiAccess {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        insecure: false,
        rate_limit: 0,
    };
    api.svc
        .access
        .set(
            &capybara_agent::service::domain::Actor::Local { uid: 0 },
            Some(&access),
        )
        .unwrap();
    let socket = api.dir.path().join("second.sock");
    let unix = capybara_agent::api::bind_unix(&socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(capybara_agent::api::run(
        api.svc.clone(),
        capybara_agent::api::Listeners {
            unix: Some(unix),
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let c = capybara_agent::api::client::Client::connect(
        &capybara_agent::api::client::Endpoint::Unix(socket),
    )
    .await
    .unwrap();
    let s = c.api_access().await.unwrap();
    assert!(s.enabled, "{s:?}");
    assert_eq!(s.source.as_deref(), Some("store"));
    let addr: std::net::SocketAddr = s.listen.unwrap().parse().unwrap();
    let token = api.token(Scope::Read);
    let h = Rest::new(addr, Some(&token))
        .call("GET", "/api/v1/health", None)
        .await;
    assert_eq!(h.status, 200, "{h:?}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// 429 with `Retry-After`: a token over its rate, and an address after too many failed
/// authentications (even with a valid token then); other tokens and the socket are unaffected.
#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let (api, admin) = setup().await;
    let c = api.unix_client().await;
    let s = c
        .enable_api(capybara_agent::api::access::EnableApi {
            listen: Some("127.0.0.1:0".into()),
            rate_limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let addr: std::net::SocketAddr = s.listen.unwrap().parse().unwrap();
    let read = api.token(Scope::Read);
    let rest = Rest::new(addr, Some(&read));
    // A burst of twice the rate, then 429.
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(rest.call("GET", "/api/v1/users", None).await.status);
    }
    assert_eq!(&codes[..4], [200, 200, 200, 200], "{codes:?}");
    let r = rest.call("GET", "/api/v1/users", None).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json["status"], "RESOURCE_EXHAUSTED", "{r:?}");
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "{after}");
    // Another token is not limited by this one's calls.
    let other = rest.with_token(Some(&api.token(Scope::Read)));
    assert_eq!(other.call("GET", "/api/v1/users", None).await.status, 200);
    // Failed authentications: the burst, then the address waits, whatever token it sends.
    let bad = rest.with_token(Some("capy_0000000000000000_nope"));
    let mut fails = 0;
    loop {
        let r = bad.call("GET", "/api/v1/users", None).await;
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 401, "{r:?}");
        fails += 1;
        assert!(fails <= 20, "no lockout after {fails} failures");
    }
    assert!(fails >= 19, "locked out after only {fails} failures");
    let locked = other.call("GET", "/api/v1/users", None).await;
    assert_eq!(locked.status, 429, "{locked:?}");
    assert!(
        locked.json["message"]
            .as_str()
            .unwrap()
            .contains("failed authentications")
    );
    // The control socket has no limit.
    assert!(c.list_users().await.is_ok());
    drop(admin);
}

/// `GET /metrics` on the API listener needs a read token (over TCP, like any call), and every
/// REST call is timed under its route template, never its raw path.
#[tokio::test]
async fn metrics_on_the_api_listener_need_a_token_and_time_rest_calls_by_route() {
    let (api, admin) = setup().await;
    let anonymous = admin.with_token(None);
    let r = anonymous.call("GET", "/metrics", None).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json["status"], "UNAUTHENTICATED", "{r:?}");
    assert_eq!(
        admin
            .call("POST", "/api/v1/users", Some(r#"{"name":"zoe"}"#))
            .await
            .status,
        200
    );
    assert_eq!(
        admin.call("GET", "/api/v1/users/zoe", None).await.status,
        200
    );
    assert_eq!(
        admin.call("GET", "/api/v1/users/nobody", None).await.status,
        404
    );
    let read = admin.with_token(Some(&api.token(Scope::Read)));
    let m = read.call("GET", "/metrics", None).await;
    assert_eq!(m.status, 200, "{m:?}");
    let count = |route: &str, code: &str| {
        let needle = format!(
            "capybara_api_request_duration_seconds_count{{route=\"{route}\",code=\"{code}\"}} "
        );
        m.text
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(count("POST /api/v1/users", "200"), Some(1.0), "{}", m.text);
    assert_eq!(
        count("GET /api/v1/users/{name}", "200"),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        count("GET /api/v1/users/{name}", "404"),
        Some(1.0),
        "{}",
        m.text
    );
    assert!(
        !m.text.contains("/api/v1/users/zoe"),
        "a raw path became a label"
    );
    // The scrape itself is not an API call, and gRPC calls keep their method path.
    assert!(!m.text.contains("route=\"/metrics\""), "{}", m.text);
    api.tcp_client(Some(&api.token(Scope::Read)))
        .await
        .list_users()
        .await
        .unwrap();
    let m = read.call("GET", "/metrics", None).await;
    assert!(
        m.text
            .contains("route=\"/capybara.v1.Users/ListUsers\",code=\"OK\""),
        "{}",
        m.text
    );
}
