//! The page's HTTP/1.1 server (hyper): routes, limits, CSRF defence and the security headers.
//!
//! Routes (any other path is 404, any other method 405 with `Allow`):
//! - `GET /`: the page ([`super::page`]) for the device at the request's source address.
//! - `POST /`: the page's forms (`application/x-www-form-urlencoded`): `code` (verify it) or
//!   `send=email|sms` (send a one-time code), each with the device's `csrf` token; answered
//!   with the page showing the outcome (and the status code of the JSON route's answer).
//! - `POST /mfa/verify`: `{"code":"123456"}` (`application/json`) → `200 {"status":"admitted",
//!   "user","device","until" (RFC 3339),"method","confirmedEnrolment","backupCodesLeft"?}`;
//!   errors `{"error","field"?,"retryAfter"?,"attemptsLeft"?}`: 400 (bad body or code shape,
//!   nothing to verify), 401 (wrong code), 403 (not a device, cross-site), 413 (body over
//!   [`MAX_BODY`]), 415 (content type), 429 (locked or sending too often; with `Retry-After`).
//! - `GET /mfa/status`: the device's view as JSON.
//!
//! The device is its source address (IPv4-mapped IPv6 taken as IPv4); there is no login.
//!
//! Limits: a body of at most [`MAX_BODY`] bytes (a larger `Content-Length` is refused before
//! reading), a request head of at most [`MAX_HEAD`] bytes and 64 header lines read within
//! [`Limits::header_timeout`], a body within [`Limits::body_timeout`], a connection lives at
//! most [`Limits::connection_lifetime`]; at most [`Limits::max_connections`] connections at
//! once and [`Limits::max_per_source`] from one address (more are answered 503 and closed).
//! How often a code is sent is the service's rule (one per user per minute): the page shows
//! its `SendTooSoon` as 429.
//!
//! CSRF, without JavaScript: a state-changing request is refused (403, field `csrf`) when
//! `Sec-Fetch-Site` is present and not `same-origin`/`none`, or `Origin` is present and not
//! this page's origin; a form post must also carry the device's token (an HMAC of its address
//! under a key made at start, so a page on another site cannot read or guess it), and the JSON
//! route must be `application/json` (which a cross-site form cannot send). Every request's
//! `Host` must be the address the connection came in on (DNS rebinding: a name of the
//! attacker's that resolves to the tunnel address is refused with 421).
//!
//! Every answer carries `Cache-Control: no-store`, `X-Frame-Options: DENY`,
//! `X-Content-Type-Options: nosniff`, `Referrer-Policy: same-origin` (not `no-referrer`: with it
//! a browser sends `Origin: null` on the form post, which the origin check must refuse) and the strict
//! Content-Security-Policy of [`super::page::csp`].

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderValue},
};
use serde_json::json;
use sha2::Sha256;

use super::page::{self, Notice, Page, Subject};
use crate::service::{
    ServiceError,
    verification::{CodeChannel, PageStatus, PageView, VerificationPort, Verified, VerifyError},
};

/// The largest request body taken.
pub const MAX_BODY: usize = 4096;
/// The largest request head buffered (hyper's smallest allowed buffer is 8 KiB).
pub const MAX_HEAD: usize = 16 * 1024;
/// The longest code taken (backup codes included).
pub const MAX_CODE: usize = 32;

/// The server's bounds (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections from one source address at once.
    pub max_per_source: usize,
    /// A request head must arrive within this.
    pub header_timeout: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// A connection is closed after this, whatever it does.
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    /// 256 connections (64 from one address), 10 s for a head or a body, 120 s a connection.
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            max_per_source: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(120),
        }
    }
}

/// The server's state shared by its connections.
pub struct App {
    port: Arc<dyn VerificationPort>,
    csrf_key: [u8; 32],
    limits: Limits,
    conns: Arc<tokio::sync::Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("limits", &self.limits).finish()
    }
}

/// A connection's admission: frees its slots when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    app: Arc<App>,
    src: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per = self
            .app
            .per_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.src);
            }
        }
    }
}

/// The address a request came from, IPv4-mapped IPv6 as IPv4.
pub fn device_addr(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

impl App {
    /// A server over `port` with `limits` (a new CSRF key).
    pub fn new(port: Arc<dyn VerificationPort>, limits: Limits) -> Arc<App> {
        Arc::new(App {
            port,
            csrf_key: rand::random(),
            limits,
            conns: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            per_source: Mutex::new(HashMap::new()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A connection slot for `src`, or `None` over either limit.
    pub fn admit(self: &Arc<App>, src: IpAddr) -> Option<Admitted> {
        let src = device_addr(src);
        let permit = self.conns.clone().try_acquire_owned().ok()?;
        let mut per = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry(src).or_insert(0);
        if *n >= self.limits.max_per_source {
            return None;
        }
        *n += 1;
        Some(Admitted {
            _permit: permit,
            app: self.clone(),
            src,
        })
    }

    /// The CSRF token of the device at `src`: base64url of HMAC-SHA256(key, its address).
    pub fn csrf_token(&self, src: IpAddr) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.csrf_key).expect("any key length");
        mac.update(b"capybara-mfa-page-csrf\0");
        match src {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Whether `token` is the device's (compared in constant time).
    fn csrf_ok(&self, src: IpAddr, token: &str) -> bool {
        let want = self.csrf_token(src);
        want.len() == token.len()
            && want
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn VerificationPort) -> Result<T, VerifyError> + Send + 'static,
    ) -> Result<T, VerifyError> {
        let port = self.port.clone();
        match tokio::task::spawn_blocking(move || f(port.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(VerifyError::Service(ServiceError::Invalid(
                crate::service::domain::ValidationError::Value {
                    field: "request",
                    reason: format!("the service failed: {e}"),
                },
            ))),
        }
    }

    /// Answers one request from `peer` that came in on `local`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        local: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let src = device_addr(peer);
        let json_route = req.uri().path().starts_with("/mfa/");
        if !host_ok(req.headers(), local) {
            return refuse(
                json_route,
                StatusCode::MISDIRECTED_REQUEST,
                "host: this page is served only at the server's tunnel address".into(),
                Some("host"),
            );
        }
        match (req.uri().path(), req.method().clone()) {
            ("/", Method::GET | Method::HEAD) => self.page(src, None, StatusCode::OK).await,
            ("/", Method::POST) => self.form(req, src).await,
            ("/mfa/verify", Method::POST) => self.verify_json(req, src).await,
            ("/mfa/status", Method::GET | Method::HEAD) => self.status_json(src).await,
            ("/" | "/mfa/verify" | "/mfa/status", _) => {
                let allow = if req.uri().path() == "/" {
                    "GET, HEAD, POST"
                } else if req.uri().path() == "/mfa/verify" {
                    "POST"
                } else {
                    "GET, HEAD"
                };
                let mut r = refuse(
                    json_route,
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "method: {} is not allowed here (allowed: {allow})",
                        req.method()
                    ),
                    Some("method"),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            _ => refuse(
                json_route,
                StatusCode::NOT_FOUND,
                "path: no such page (the verification page is at /)".into(),
                Some("path"),
            ),
        }
    }

    /// The page for `src` with `notice`, answered with `status`.
    async fn page(
        &self,
        src: IpAddr,
        notice: Option<Notice>,
        status: StatusCode,
    ) -> Response<Full<Bytes>> {
        let view = self.blocking(move |p| p.view(src)).await;
        let (subject_view, status) = match view {
            Ok(v) => (Ok(v), status),
            Err(VerifyError::NotADevice) => (Err(Subject::NotADevice), StatusCode::FORBIDDEN),
            Err(VerifyError::NotRequired) => (Err(Subject::NotRequired), status),
            Err(e) => {
                tracing::warn!(%src, error = %e, "MFA page: the service failed");
                (Err(Subject::Unavailable), StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        let csrf = self.csrf_token(src);
        let html = match &subject_view {
            Ok(v) => page::render(&Page {
                subject: Subject::Device(v),
                notice: notice.as_ref(),
                csrf: &csrf,
                now: SystemTime::now(),
            }),
            Err(s) => page::render(&Page {
                subject: s.clone(),
                notice: notice.as_ref(),
                csrf: &csrf,
                now: SystemTime::now(),
            }),
        };
        answer(status, "text/html; charset=utf-8", html.into())
    }

    /// `POST /`: the page's forms.
    async fn form(&self, req: Request<Incoming>, src: IpAddr) -> Response<Full<Bytes>> {
        let error = |status, message: String, field| (status, Notice::Error { message, field });
        let outcome: Result<(StatusCode, Notice), (StatusCode, Notice)> = async {
            cross_site(req.headers()).map_err(|m| error(StatusCode::FORBIDDEN, m, Some("csrf")))?;
            if !content_type_is(req.headers(), "application/x-www-form-urlencoded") {
                return Err(error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content-type: the form is sent as application/x-www-form-urlencoded".into(),
                    None,
                ));
            }
            let body = self
                .body(req)
                .await
                .map_err(|(status, m)| error(status, m, Some("body")))?;
            let mut code = None;
            let mut send = None;
            let mut token = None;
            for (k, v) in form_urlencoded::parse(&body) {
                match &*k {
                    "code" => code = Some(v.into_owned()),
                    "send" => send = Some(v.into_owned()),
                    "csrf" => token = Some(v.into_owned()),
                    _ => {}
                }
            }
            if !token.is_some_and(|t| self.csrf_ok(src, &t)) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "csrf: the form expired or came from another page; reload this page and try \
                     again"
                        .into(),
                    Some("csrf"),
                ));
            }
            if let Some(send) = send {
                let channel = match send.as_str() {
                    "email" => CodeChannel::Email,
                    "sms" => CodeChannel::Sms,
                    _ => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            format!("send: unknown channel {send:?} (email or sms)"),
                            Some("send"),
                        ));
                    }
                };
                let to = self
                    .blocking(move |p| p.send_code(src, channel))
                    .await
                    .map_err(|e| {
                        let r = refusal(&e);
                        error(r.status, r.error, r.field)
                    })?;
                return Ok((StatusCode::OK, Notice::Sent { channel, to }));
            }
            let code = normalize_code(code.as_deref().unwrap_or(""))
                .map_err(|m| error(StatusCode::BAD_REQUEST, m, Some("code")))?;
            let v = self
                .blocking(move |p| p.verify(src, &code))
                .await
                .map_err(|e| {
                    let r = refusal(&e);
                    error(r.status, r.error, r.field)
                })?;
            Ok((StatusCode::OK, Notice::Verified(v)))
        }
        .await;
        let (status, notice) = match outcome {
            Ok(x) | Err(x) => x,
        };
        self.page(src, Some(notice), status).await
    }

    /// `POST /mfa/verify`.
    async fn verify_json(&self, req: Request<Incoming>, src: IpAddr) -> Response<Full<Bytes>> {
        let bad = |status, error: String, field| Refusal {
            status,
            error,
            field,
            retry_after: None,
            attempts_left: None,
        };
        let outcome: Result<Verified, Refusal> = async {
            cross_site(req.headers()).map_err(|m| bad(StatusCode::FORBIDDEN, m, Some("csrf")))?;
            if !content_type_is(req.headers(), "application/json") {
                return Err(bad(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content-type: send {\"code\":\"123456\"} as application/json".into(),
                    None,
                ));
            }
            let body = self
                .body(req)
                .await
                .map_err(|(status, m)| bad(status, m, Some("body")))?;
            let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                bad(
                    StatusCode::BAD_REQUEST,
                    format!("body: not JSON ({e}); send {{\"code\":\"123456\"}}"),
                    Some("body"),
                )
            })?;
            let code = match value.get("code") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        "code: must be a string, e.g. \"123456\"".into(),
                        Some("code"),
                    ));
                }
                None => {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        "code: missing; send {\"code\":\"123456\"}".into(),
                        Some("code"),
                    ));
                }
            };
            let code =
                normalize_code(&code).map_err(|m| bad(StatusCode::BAD_REQUEST, m, Some("code")))?;
            self.blocking(move |p| p.verify(src, &code))
                .await
                .map_err(|e| refusal(&e))
        }
        .await;
        match outcome {
            Ok(v) => {
                let mut body = json!({
                    "status": "admitted",
                    "user": v.user,
                    "device": v.device,
                    "until": page::rfc3339(v.until),
                    "method": v.method,
                    "confirmedEnrolment": v.confirmed_enrolment,
                });
                if let Some(left) = v.backup_codes_left {
                    body["backupCodesLeft"] = left.into();
                }
                json_answer(StatusCode::OK, &body)
            }
            Err(r) => r.into_json(),
        }
    }

    /// `GET /mfa/status`.
    async fn status_json(&self, src: IpAddr) -> Response<Full<Bytes>> {
        match self.blocking(move |p| p.view(src)).await {
            Ok(v) => json_answer(StatusCode::OK, &status_body(&v)),
            Err(e) => refusal(&e).into_json(),
        }
    }

    /// The body (at most [`MAX_BODY`] bytes within the body timeout).
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, (StatusCode, String)> {
        let too_large = || {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than {MAX_BODY} bytes"),
            )
        };
        if req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }
        let collect = Limited::new(req.into_body(), MAX_BODY).collect();
        match tokio::time::timeout(self.limits.body_timeout, collect).await {
            Ok(Ok(b)) => Ok(b.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err((
                StatusCode::BAD_REQUEST,
                format!("body: cannot be read ({e})"),
            )),
            Err(_) => Err((
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "body: not complete within {} s",
                    self.limits.body_timeout.as_secs()
                ),
            )),
        }
    }
}

/// The JSON view of a device (`GET /mfa/status`).
pub fn status_body(v: &PageView) -> serde_json::Value {
    let (status, until) = match v.status {
        PageStatus::Pending => ("pending", None),
        PageStatus::Enrolling => ("enrolling", None),
        PageStatus::Admitted { until } => ("admitted", Some(page::rfc3339(until))),
        PageStatus::NotRequired => ("not-required", None),
    };
    let mut body = json!({
        "user": v.user,
        "device": v.device,
        "status": status,
        "channels": v.channels.iter().map(|(c, to)| json!({"channel": c, "to": to})).collect::<Vec<_>>(),
    });
    if let Some(until) = until {
        body["until"] = until.into();
    }
    if let Some(d) = v.retry_after.filter(|d| !d.is_zero()) {
        body["retryAfter"] = retry_secs(d).into();
    }
    if let Some(uri) = &v.enrol_uri {
        body["enrolUri"] = uri.clone().into();
    }
    body
}

/// An error answer.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    error: String,
    field: Option<&'static str>,
    retry_after: Option<Duration>,
    attempts_left: Option<u32>,
}

impl Refusal {
    fn into_json(self) -> Response<Full<Bytes>> {
        let mut body = json!({ "error": self.error });
        if let Some(f) = self.field {
            body["field"] = f.into();
        }
        if let Some(d) = self.retry_after {
            body["retryAfter"] = retry_secs(d).into();
        }
        if let Some(n) = self.attempts_left {
            body["attemptsLeft"] = n.into();
        }
        let mut r = json_answer(self.status, &body);
        if let Some(d) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(d)));
        }
        r
    }
}

/// Whole seconds to wait (at least 1).
fn retry_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// What the service's refusal answers.
fn refusal(e: &VerifyError) -> Refusal {
    let r = |status, field| Refusal {
        status,
        error: e.to_string(),
        field,
        retry_after: None,
        attempts_left: None,
    };
    match e {
        VerifyError::NotADevice => r(StatusCode::FORBIDDEN, None),
        VerifyError::NotRequired => r(StatusCode::BAD_REQUEST, None),
        VerifyError::WrongCode { attempts_left } => Refusal {
            error: format!(
                "code: wrong, already used or expired ({attempts_left} attempt{} left before a \
                 lock)",
                if *attempts_left == 1 { "" } else { "s" }
            ),
            attempts_left: Some(*attempts_left),
            ..r(StatusCode::UNAUTHORIZED, Some("code"))
        },
        VerifyError::Locked { retry_after } => Refusal {
            retry_after: Some(*retry_after),
            ..r(StatusCode::TOO_MANY_REQUESTS, Some("code"))
        },
        VerifyError::SendTooSoon { retry_after } => Refusal {
            error: format!(
                "send: a code was sent a moment ago; wait {} before asking again",
                page::human_duration(*retry_after)
            ),
            retry_after: Some(*retry_after),
            ..r(StatusCode::TOO_MANY_REQUESTS, Some("send"))
        },
        VerifyError::NoChannel => r(StatusCode::BAD_REQUEST, Some("send")),
        // The channel failed (the SMTP server or the SMS gateway): say what, never hang.
        VerifyError::SendFailed(_) => r(StatusCode::BAD_GATEWAY, Some("send")),
        VerifyError::Service(ServiceError::Invalid(_)) => r(StatusCode::BAD_REQUEST, None),
        VerifyError::Service(s) => {
            tracing::warn!(error = %s, "MFA page: the service failed");
            Refusal {
                error: "the verification service failed; try again in a minute".into(),
                ..r(StatusCode::INTERNAL_SERVER_ERROR, None)
            }
        }
    }
}

/// A code as typed: white space around and inside (`123 456`) removed; 1 to [`MAX_CODE`]
/// characters of ASCII letters, digits and `-`.
pub fn normalize_code(s: &str) -> Result<String, String> {
    let code: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if code.is_empty() {
        return Err("code: empty; enter the code your authenticator app shows".into());
    }
    if code.len() > MAX_CODE {
        return Err(format!("code: longer than {MAX_CODE} characters"));
    }
    if !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err("code: only digits, letters and - are part of a code".into());
    }
    Ok(code)
}

/// Whether the `Host` header names the address the connection came in on (with its port, or
/// without it for port 80).
pub fn host_ok(headers: &HeaderMap, local: SocketAddr) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let ip = match local.ip().to_canonical() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !p.contains(']') => (n, Some(p)),
        _ => (host, None),
    };
    let name_ok = match (
        name.parse::<IpAddr>(),
        name.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>(),
    ) {
        (Ok(a), _) | (_, Ok(a)) => {
            let written = match a {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            // An IPv6 literal must be bracketed in a Host header.
            written == ip && (a.is_ipv4() || name.starts_with('['))
        }
        _ => false,
    };
    let port_ok = match port {
        None => local.port() == 80,
        Some(p) => p.parse::<u16>().is_ok_and(|p| p == local.port()),
    };
    name_ok && port_ok
}

/// Refuses a request another site made the browser send (see the module docs).
pub fn cross_site(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.to_str(), Ok("same-origin" | "none"))
    {
        {
            return Err(
                "csrf: this request came from another site; open the page itself and send the \
                 form from there"
                    .into(),
            );
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let same = match (origin.to_str(), host) {
            (Ok(o), Some(h)) => o.eq_ignore_ascii_case(&format!("http://{h}")),
            _ => false,
        };
        if !same {
            return Err(
                "csrf: this request came from another origin; open the page itself and send the \
                 form from there"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Whether the request's media type is `want` (parameters such as `charset` aside).
fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

/// An answer with the security headers every answer carries.
pub fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(page::csp()),
    );
    r
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    answer(status, "application/json", body.to_string().into())
}

/// An error: JSON on the `/mfa/` routes, a short page elsewhere.
fn refuse(
    json_route: bool,
    status: StatusCode,
    error: String,
    field: Option<&'static str>,
) -> Response<Full<Bytes>> {
    if json_route {
        Refusal {
            status,
            error,
            field,
            retry_after: None,
            attempts_left: None,
        }
        .into_json()
    } else {
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title></head>\
             <body><main><h1>{}</h1><p role=\"alert\">{}</p></main></body></html>\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            page::escape(&error)
        );
        answer(status, "text/html; charset=utf-8", html.into())
    }
}

/// Serves HTTP/1.1 on `io` (a connection from `peer` to `local`) until it closes, its head
/// times out or its lifetime ends.
pub async fn serve_io<I>(app: Arc<App>, io: I, peer: IpAddr, local: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let lifetime = app.limits.connection_lifetime;
    let header_timeout = app.limits.header_timeout;
    let svc = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, peer, local).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // A client may shut its write side down after the request and still read the answer.
        .half_close(true)
        .max_buf_size(MAX_HEAD)
        .max_headers(64)
        .serve_connection(io, svc);
    match tokio::time::timeout(lifetime, conn).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "MFA page: connection ended"),
    }
}
