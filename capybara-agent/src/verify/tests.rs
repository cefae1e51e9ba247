//! The page server over in-memory connections (raw HTTP bytes) and loopback TCP, against the
//! stand-in port (`super::testing`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{App, Limits, PageServer, server::MAX_BODY, testing::StandIn};
use crate::service::verification::{CodeChannel, CodeSender, PageStatus};

const DEVICE: &str = "10.70.0.2";
const LOCAL: &str = "10.70.0.1:80";

fn device() -> IpAddr {
    DEVICE.parse().unwrap()
}

/// Records what it was asked to send.
#[derive(Debug, Default)]
struct Recorder {
    sent: Mutex<Vec<(CodeChannel, String, String, String)>>,
    fail: bool,
}

impl CodeSender for Recorder {
    fn channels(&self) -> Vec<CodeChannel> {
        vec![CodeChannel::Email, CodeChannel::Sms]
    }
    fn send(&self, channel: CodeChannel, to: &str, user: &str, code: &str) -> Result<(), String> {
        if self.fail {
            return Err("e-mail through mail.example.org:587: connection refused".into());
        }
        self.sent
            .lock()
            .unwrap()
            .push((channel, to.into(), user.into(), code.into()));
        Ok(())
    }
}

fn stand_in() -> Arc<StandIn> {
    let s = StandIn::new("123456");
    s.add(
        device(),
        "alice",
        "laptop",
        vec![(CodeChannel::Email, "a***@example.org".into())],
    );
    *s.backup_codes.lock().unwrap() = vec!["abcd-efgh".into()];
    Arc::new(s)
}

/// The page over [`stand_in`] with the default limits.
fn default_app() -> (Arc<StandIn>, Arc<App>) {
    let port = stand_in();
    (port.clone(), App::new(port, Limits::default()))
}

/// A parsed answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn parse(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Writes `raw` on a fresh in-memory connection from `peer` and reads until the server closes.
async fn exchange(app: &Arc<App>, peer: IpAddr, raw: &[u8]) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(super::server::serve_io(
        app.clone(),
        hyper_util::rt::TokioIo::new(server),
        peer,
        LOCAL.parse().unwrap(),
    ));
    client.write_all(raw).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out).await;
    task.await.unwrap();
    out
}

async fn request(
    app: &Arc<App>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: 10.70.0.1\r\nconnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    let out = exchange(app, device(), raw.as_bytes()).await;
    parse(&out).unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&out)))
}

fn assert_security_headers(a: &Answer) {
    assert_eq!(a.header("cache-control"), Some("no-store"), "{a:?}");
    assert_eq!(a.header("x-frame-options"), Some("DENY"));
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        a.header("content-security-policy"),
        Some(super::page::csp())
    );
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn the_page_knows_the_device_by_its_address_and_a_form_post_admits_it() {
    let (port, app) = default_app();
    let a = request(&app, "GET", "/", &[], "").await;
    assert_eq!(a.status, 200);
    assert_security_headers(&a);
    assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        a.body
            .contains("User <strong>alice</strong>, device <strong>laptop</strong>")
    );
    let token = app.csrf_token(device());
    assert!(a.body.contains(&format!("name=\"csrf\" value=\"{token}\"")));

    // A browser's same-origin post with the token and a code typed with a space.
    let a = request(
        &app,
        "POST",
        "/",
        &[
            FORM,
            ("origin", "http://10.70.0.1"),
            ("sec-fetch-site", "same-origin"),
        ],
        &format!("csrf={token}&code=123+456"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_security_headers(&a);
    assert!(
        a.body
            .contains("role=\"status\" id=\"notice\"><p>Code accepted.")
    );
    assert!(a.body.contains("This device is verified"));
    assert_eq!(*port.seen.lock().unwrap(), ["123456"]);

    let s = request(&app, "GET", "/mfa/status", &[], "").await;
    assert_eq!(s.status, 200);
    assert_security_headers(&s);
    let j = s.json();
    assert_eq!(j["status"], "admitted");
    assert_eq!(j["user"], "alice");
    assert!(j["until"].as_str().unwrap().ends_with('Z'));
    assert_eq!(j["channels"][0]["channel"], "email");
}

#[tokio::test]
async fn cross_site_posts_are_refused_before_the_service_sees_a_code() {
    let (port, app) = default_app();
    let token = app.csrf_token(device());
    let other = app.csrf_token("10.70.0.3".parse().unwrap());
    assert_ne!(token, other, "the token is per device");
    for (headers, body) in [
        (vec![FORM], "code=123456".to_owned()),
        (vec![FORM], format!("csrf={other}&code=123456")),
        (
            vec![FORM],
            format!("csrf={}x&code=123456", &token[..token.len() - 1]),
        ),
        (
            vec![FORM, ("sec-fetch-site", "cross-site")],
            format!("csrf={token}&code=123456"),
        ),
        (
            vec![FORM, ("sec-fetch-site", "same-site")],
            format!("csrf={token}&code=123456"),
        ),
        (
            vec![FORM, ("origin", "http://evil.example")],
            format!("csrf={token}&code=123456"),
        ),
        (
            vec![FORM, ("origin", "null")],
            format!("csrf={token}&code=123456"),
        ),
    ] {
        let a = request(&app, "POST", "/", &headers, &body).await;
        assert_eq!(a.status, 403, "{headers:?} {body}");
        assert!(
            a.body.contains("role=\"alert\" id=\"notice\"><p>csrf: "),
            "{}",
            a.body
        );
    }
    // The JSON route: cross-site headers, or a form's content type (what a cross-site form
    // can send without a preflight).
    for headers in [
        vec![JSON, ("sec-fetch-site", "cross-site")],
        vec![JSON, ("origin", "http://evil.example")],
    ] {
        let a = request(
            &app,
            "POST",
            "/mfa/verify",
            &headers,
            r#"{"code":"123456"}"#,
        )
        .await;
        assert_eq!(a.status, 403);
        assert_eq!(a.json()["field"], "csrf");
    }
    let a = request(
        &app,
        "POST",
        "/mfa/verify",
        &[("content-type", "text/plain")],
        r#"{"code":"123456"}"#,
    )
    .await;
    assert_eq!(a.status, 415);
    let a = request(
        &app,
        "POST",
        "/",
        &[("content-type", "text/plain")],
        &format!("csrf={token}&code=123456"),
    )
    .await;
    assert_eq!(a.status, 415);
    assert!(port.seen.lock().unwrap().is_empty());
    let status = request(&app, "GET", "/mfa/status", &[], "").await.json();
    assert_eq!(status["status"], "pending");
}

#[tokio::test]
async fn the_json_route_answers_every_outcome_with_its_status_and_field() {
    let (port, app) = default_app();
    let post = |body: &'static str| {
        let app = app.clone();
        async move { request(&app, "POST", "/mfa/verify", &[JSON], body).await }
    };
    for (body, status, field, needle) in [
        ("{", 400, "body", "body: not JSON"),
        ("[]", 400, "code", "code: missing"),
        (r#"{"code":123456}"#, 400, "code", "code: must be a string"),
        (r#"{"code":""}"#, 400, "code", "code: empty"),
        (r#"{"code":"12<b>"}"#, 400, "code", "code: only digits"),
        (
            r#"{"code":"111111111111111111111111111111111"}"#,
            400,
            "code",
            "longer than 32",
        ),
    ] {
        let a = post(body).await;
        assert_eq!(a.status, status, "{body}: {}", a.body);
        assert_security_headers(&a);
        let j = a.json();
        assert_eq!(j["field"], field, "{body}");
        assert!(j["error"].as_str().unwrap().contains(needle), "{body}: {j}");
    }
    assert!(
        port.seen.lock().unwrap().is_empty(),
        "bad shapes never reach the service"
    );

    let a = post(r#"{"code":"000000"}"#).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["attemptsLeft"], 2);
    assert_eq!(a.json()["field"], "code");
    let a = post(r#"{"code":"000001"}"#).await;
    assert_eq!(a.json()["attemptsLeft"], 1);
    let a = post(r#"{"code":"000002"}"#).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), Some("60"));
    assert_eq!(a.json()["retryAfter"], 60);
    // Locked: even the good code waits; the page says for how long.
    let a = post(r#"{"code":"123456"}"#).await;
    assert_eq!(a.status, 429);
    let page = request(&app, "GET", "/", &[], "").await;
    assert!(
        page.body.contains("no code is taken for 1 min"),
        "{}",
        page.body
    );
    assert_eq!(
        request(&app, "GET", "/mfa/status", &[], "").await.json()["retryAfter"],
        60
    );

    port.set(device(), |d| d.locked_until = None);
    let a = post(r#"{"code":"abcd-efgh"}"#).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let j = a.json();
    assert_eq!(j["status"], "admitted");
    assert_eq!(j["method"], "backup");
    assert_eq!(j["backupCodesLeft"], 0);
    assert_eq!(j["confirmedEnrolment"], false);
    assert!(humantime::parse_rfc3339(j["until"].as_str().unwrap()).is_ok());

    // Not a device: 403 on every route.
    let (mut c, s) = (
        exchange(
            &app,
            "10.70.0.9".parse().unwrap(),
            b"GET /mfa/status HTTP/1.1\r\nhost: 10.70.0.1\r\nconnection: close\r\n\r\n",
        )
        .await,
        exchange(
            &app,
            "10.70.0.9".parse().unwrap(),
            b"GET / HTTP/1.1\r\nhost: 10.70.0.1\r\nconnection: close\r\n\r\n",
        )
        .await,
    );
    let status = parse(&c).unwrap();
    assert_eq!(status.status, 403);
    assert_eq!(
        status.json()["error"],
        "this address is no device of this server"
    );
    let page = parse(&s).unwrap();
    assert_eq!(page.status, 403);
    assert!(
        page.body
            .contains("This address is no device of this VPN server")
    );
    c.clear();
}

#[tokio::test]
async fn bodies_hosts_paths_and_methods_are_bounded_and_named() {
    let (_, app) = default_app();
    let big = format!(r#"{{"code":"{}"}}"#, "1".repeat(MAX_BODY));
    let a = request(&app, "POST", "/mfa/verify", &[JSON], &big).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["field"], "body");
    // A chunked body without a length is cut at the limit too.
    let mut raw = b"POST /mfa/verify HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..10 {
        raw.extend_from_slice(b"400\r\n");
        raw.extend_from_slice(&[b' '; 0x400]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let a = parse(&exchange(&app, device(), &raw).await).unwrap();
    assert_eq!(a.status, 413);

    for host in [
        "evil.example",
        "10.70.0.1:8080",
        "10.70.0.2",
        "[fd99::1]",
        "10.70.0.1:",
    ] {
        let raw = format!("GET /mfa/status HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        let a = parse(&exchange(&app, device(), raw.as_bytes()).await).unwrap();
        assert_eq!(a.status, 421, "{host}");
        assert_eq!(a.json()["field"], "host");
    }
    for host in ["10.70.0.1", "10.70.0.1:80"] {
        let raw = format!("GET /mfa/status HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        assert_eq!(
            parse(&exchange(&app, device(), raw.as_bytes()).await)
                .unwrap()
                .status,
            200,
            "{host}"
        );
    }
    let a = request(&app, "GET", "/admin", &[], "").await;
    assert_eq!(a.status, 404);
    assert_security_headers(&a);
    let a = request(&app, "GET", "/mfa/nothing", &[], "").await;
    assert_eq!((a.status, a.json()["field"].as_str()), (404, Some("path")));
    let a = request(&app, "DELETE", "/", &[], "").await;
    assert_eq!(
        (a.status, a.header("allow")),
        (405, Some("GET, HEAD, POST"))
    );
    let a = request(&app, "GET", "/mfa/verify", &[], "").await;
    assert_eq!((a.status, a.header("allow")), (405, Some("POST")));
    let a = request(&app, "PUT", "/mfa/status", &[], "").await;
    assert_eq!((a.status, a.header("allow")), (405, Some("GET, HEAD")));
    // A query string does not change the route.
    assert_eq!(
        request(&app, "GET", "/?x=%3Cscript%3E", &[], "")
            .await
            .status,
        200
    );
}

/// Garbage of every kind never panics the server: each connection gets a 4xx answer or is
/// closed, and the server still answers a good request afterwards.
#[tokio::test]
async fn garbage_bytes_get_an_error_or_a_close_never_a_panic() {
    use rand::{Rng as _, SeedableRng as _};
    let (port, app) = default_app();
    let mut cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-length: -1\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
        b"POST /mfa/verify HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-type: application/json\r\ncontent-length: 99999999999999999999\r\n\r\n".to_vec(),
        b"POST /mfa/verify HTTP/1.1\r\nhost: 10.70.0.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: \xff\xfe\r\n\r\n".to_vec(),
        b"GET /\xff HTTP/1.1\r\nhost: 10.70.0.1\r\n\r\n".to_vec(),
        format!("GET / HTTP/1.1\r\nhost: 10.70.0.1\r\nx: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
        format!("GET / HTTP/1.1\r\nhost: 10.70.0.1\r\n{}\r\n", "x: y\r\n".repeat(100)).into_bytes(),
        b"POST / HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 9\r\n\r\n%%%\xff&&==&".to_vec(),
        b"POST /mfa/verify HTTP/1.1\r\nhost: 10.70.0.1\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"code\":\"\xff\"}".to_vec(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for i in 0..300 {
        let len = rng.random_range(0..600);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            // Plausible starts get further into the parser.
            let mut start = b"POST /mfa/verify HTTP/1.1\r\nhost: 10.70.0.1\r\n".to_vec();
            start.append(&mut bytes);
            bytes = start;
        }
        cases.push(bytes);
    }
    for raw in &cases {
        let out = exchange(&app, device(), raw).await;
        if out.is_empty() {
            continue;
        }
        let a = parse(&out)
            .unwrap_or_else(|| panic!("half an answer: {:?}", String::from_utf8_lossy(&out)));
        assert!(
            (400..500).contains(&a.status),
            "{} for {:?}",
            a.status,
            String::from_utf8_lossy(raw)
        );
    }
    assert!(port.seen.lock().unwrap().iter().all(|c| c.len() <= 32));
    assert_eq!(request(&app, "GET", "/", &[], "").await.status, 200);
}

#[tokio::test]
async fn a_slow_head_is_cut_at_the_header_timeout() {
    let app = App::new(
        stand_in(),
        Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let (mut client, server) = tokio::io::duplex(4096);
    let task = tokio::spawn(super::server::serve_io(
        app,
        hyper_util::rt::TokioIo::new(server),
        device(),
        LOCAL.parse().unwrap(),
    ));
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: 10.70")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    // The client never finishes its head: the server closes (408 or a plain close).
    let closed = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut out)).await;
    assert!(
        closed.is_ok(),
        "the connection was not closed at the header timeout"
    );
    task.await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn send_buttons_send_through_the_channel_and_say_where() {
    let recorder = Arc::new(Recorder::default());
    let mut s = StandIn::new("123456");
    s.sender = Some(recorder.clone());
    s.add(
        device(),
        "alice",
        "laptop",
        vec![(CodeChannel::Email, "a***@example.org".into())],
    );
    let port = Arc::new(s);
    let app = App::new(port.clone(), Limits::default());
    let token = app.csrf_token(device());
    let page = request(&app, "GET", "/", &[], "").await;
    assert!(
        page.body
            .contains("name=\"send\" value=\"email\">Send me a code by e-mail (a***@example.org)")
    );
    let a = request(
        &app,
        "POST",
        "/",
        &[FORM],
        &format!("csrf={token}&send=email"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body
            .contains("A code was sent by e-mail to a***@example.org.")
    );
    let sent = recorder.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].1.as_str(), sent[0].2.as_str()),
        ("alice@example.org", "alice")
    );
    // The sent code never appears on the page; it admits the device.
    assert!(!a.body.contains(&sent[0].3));
    // Asking again at once is refused (the inbox is not flooded).
    let a = request(
        &app,
        "POST",
        "/",
        &[FORM],
        &format!("csrf={token}&send=email"),
    )
    .await;
    assert_eq!(a.status, 429);
    assert!(
        a.body
            .contains("send: a code was sent a moment ago; wait 1 min"),
        "{}",
        a.body
    );
    assert_eq!(recorder.sent.lock().unwrap().len(), 1);
    let a = request(
        &app,
        "POST",
        "/",
        &[FORM],
        &format!("csrf={token}&code={}", sent[0].3),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("Code accepted."));

    // A channel that fails is an error the page shows, naming what failed.
    let mut s = StandIn::new("123456");
    s.sender = Some(Arc::new(Recorder {
        fail: true,
        ..Recorder::default()
    }));
    s.add(
        device(),
        "alice",
        "laptop",
        vec![(CodeChannel::Email, "a***@example.org".into())],
    );
    let app = App::new(Arc::new(s), Limits::default());
    let token = app.csrf_token(device());
    let a = request(
        &app,
        "POST",
        "/",
        &[FORM],
        &format!("csrf={token}&send=email"),
    )
    .await;
    assert_eq!(a.status, 502);
    assert!(a.body.contains("send: the code could not be sent (e-mail through mail.example.org:587: connection refused)"), "{}", a.body);
    let a = request(
        &app,
        "POST",
        "/",
        &[FORM],
        &format!("csrf={token}&send=fax"),
    )
    .await;
    assert_eq!(a.status, 400);
    assert!(
        a.body.contains("send: unknown channel &quot;fax&quot;"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn enrolment_and_not_required_pages() {
    let port = stand_in();
    port.set(device(), |d| {
        d.view.status = PageStatus::Enrolling;
        d.view.enrol_uri = Some("otpauth://totp/Capybara:alice?secret=JBSWY3DPEHPK3PXP".into());
    });
    let app = App::new(port.clone(), Limits::default());
    let a = request(&app, "GET", "/", &[], "").await;
    assert!(a.body.contains("<svg") && a.body.contains("secret=JBSWY3DPEHPK3PXP"));
    let a = request(&app, "POST", "/mfa/verify", &[JSON], r#"{"code":"123456"}"#).await;
    assert_eq!(a.json()["confirmedEnrolment"], true);
    port.set(device(), |d| d.view.status = PageStatus::NotRequired);
    let a = request(&app, "POST", "/mfa/verify", &[JSON], r#"{"code":"123456"}"#).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.json()["error"],
        "multi-factor authentication is not on for this user"
    );
}

#[test]
fn connections_are_limited_overall_and_per_source() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let app = App::new(
        stand_in(),
        Limits {
            max_connections: 3,
            max_per_source: 2,
            ..Limits::default()
        },
    );
    let a: IpAddr = "10.70.0.2".parse().unwrap();
    let b: IpAddr = "::ffff:10.70.0.3".parse().unwrap();
    let a1 = app.admit(a).unwrap();
    let _a2 = app.admit(a).unwrap();
    assert!(app.admit(a).is_none(), "per source");
    let _b1 = app.admit(b).unwrap();
    assert!(app.admit("10.70.0.4".parse().unwrap()).is_none(), "overall");
    drop(a1);
    assert!(
        app.admit(a).is_some(),
        "a closed connection frees its slots"
    );
}

/// Over real loopback TCP: the page is served, and a connection over the limit is answered
/// 503 at once and closed.
#[tokio::test]
async fn the_server_serves_tcp_and_turns_away_connections_over_the_limit() {
    let port = stand_in();
    port.add("127.0.0.1".parse().unwrap(), "bob", "phone", Vec::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = PageServer::serve(
        App::new(
            port,
            Limits {
                max_connections: 1,
                ..Limits::default()
            },
        ),
        vec![listener],
    );
    assert_eq!(server.addrs(), [addr]);
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(format!("GET / HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0; 64 * 1024];
    let n = held.read(&mut buf).await.unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The first connection is kept alive: a second one is over the limit.
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    second.read_to_end(&mut out).await.unwrap();
    let a = parse(&out).unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(
        a.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        a.body.len()
    );
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("too many connections")
    );
    drop(held);
    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped"
    );
}
