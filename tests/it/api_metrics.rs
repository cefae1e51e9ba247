//! The API latency histograms in-process: a real gRPC server on 127.0.0.1:0 (the in-memory
//! dataplane and tunnel), metrics installed on its service, and calls answered `OK`,
//! `UNAUTHENTICATED`, `PERMISSION_DENIED` and `INVALID_ARGUMENT`, plus a path that is no method:
//! each lands in `capybara_api_request_duration_seconds` under its method and code, and the
//! unknown path under `route="unknown"` (bounded cardinality), never under its own path.

use capybara_agent::service::domain::Scope;

use crate::api_support::TestApi;

fn count(text: &str, route: &str, code: &str) -> u64 {
    let series = format!(
        "capybara_api_request_duration_seconds_count{{route=\"{route}\",code=\"{code}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_call_is_timed_under_its_method_and_code() {
    let api = TestApi::start(false).await;
    // The server's own metrics (what `GET /metrics` answers).
    let metrics = api.metrics.clone();
    let admin = api.tcp_client(Some(&api.token(Scope::Admin))).await;
    let read = api.tcp_client(Some(&api.token(Scope::Read))).await;
    let none = api.tcp_client(None).await;

    admin.list_users().await.expect("list users");
    admin.list_users().await.expect("list users");
    admin.add_user("alice", "laptop", 0).await.expect("add");
    assert!(none.list_users().await.is_err());
    assert!(read.add_user("bob", "laptop", 0).await.is_err());
    assert!(admin.add_user("Not A Name", "laptop", 0).await.is_err());
    // A path that is no method, with a bearer token (answered UNIMPLEMENTED by tonic's router).
    let url = format!("{}/capybara.v1.Users/NoSuchMethod", api.url());
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-X", "POST"])
        .args(["-H", "content-type: application/grpc", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", &url])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");

    let text = tokio::task::spawn_blocking(move || metrics.encode_prometheus().unwrap())
        .await
        .unwrap();
    let users = "/capybara.v1.Users";
    assert_eq!(
        count(&text, &format!("{users}/ListUsers"), "OK"),
        2,
        "{text}"
    );
    assert_eq!(count(&text, &format!("{users}/AddUser"), "OK"), 1, "{text}");
    assert_eq!(
        count(&text, &format!("{users}/ListUsers"), "UNAUTHENTICATED"),
        1,
        "{text}"
    );
    assert_eq!(
        count(&text, &format!("{users}/AddUser"), "PERMISSION_DENIED"),
        1,
        "{text}"
    );
    assert_eq!(
        count(&text, &format!("{users}/AddUser"), "INVALID_ARGUMENT"),
        1,
        "{text}"
    );
    assert_eq!(count(&text, "unknown", "UNIMPLEMENTED"), 1, "{text}");
    assert!(!text.contains("NoSuchMethod"), "{text}");
    // Nothing answered was counted as cancelled.
    assert!(!text.contains("code=\"CANCELLED\""), "{text}");
    api.stop().await;
}
