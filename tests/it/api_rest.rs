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
const SCHEMATHESIS: &str = "/var/cache/capybara/pyenv/bin/st";

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
    assert!(
        std::path::Path::new(SCHEMATHESIS).exists(),
        "{SCHEMATHESIS} is missing: run `cargo xtask setup`"
    );
    let report = api.dir.path().join("schemathesis");
    let out = tokio::process::Command::new(SCHEMATHESIS)
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
            "--seed",
            "20261207",
            "--no-color",
            "--generation-deterministic",
            "--report",
            "junit",
        ])
        .arg("--report-dir")
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", "")
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
