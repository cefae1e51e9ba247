//! The REST mirror: HTTP/JSON under `/api/v1/`, one route for every RPC, served beside gRPC on
//! the same listeners.
//!
//! Nothing here knows an API shape: the routes, the request and answer types and their JSON are
//! generated from the `.proto` files (`capybara_proto::rest`, ARCHITECTURE.md says why), and a
//! call runs the same tonic service implementation a gRPC call does, so tokens, scopes, audit
//! and validation are the gRPC API's. This file turns an HTTP request into that call (path
//! fields, query string or JSON body) and its answer or error into HTTP:
//!
//! | gRPC code | HTTP |
//! |---|---|
//! | OK | 200 (a server stream: `application/x-ndjson`, one message a line) |
//! | INVALID_ARGUMENT, OUT_OF_RANGE | 400 (the `field` first in the message, and as `field`) |
//! | UNAUTHENTICATED | 401 |
//! | PERMISSION_DENIED | 403 |
//! | NOT_FOUND | 404 |
//! | ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED (a pool) | 409 |
//! | RESOURCE_EXHAUSTED with `retry-after` (the rate limit) | 429 with `Retry-After` |
//! | UNAVAILABLE | 503 |
//! | others | 500 |
//!
//! A body larger than [`MAX_BODY`] ([`MAX_STREAM_BODY`] for a client stream) is 413 before it
//! is read further. Every error answer is `{"code", "status", "message", "field"?}`.

use std::collections::HashMap;

use axum::{
    body::Body,
    extract::{Path, RawQuery, Request},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{MethodFilter, on},
};
use capybara_proto::rest::{self as routes, Input, Output, QueryKind, Route};
use serde_json::{Map, Value, json};
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use super::handler::Api;

/// The largest JSON body of a call (a policy document or a large blocklist change).
pub const MAX_BODY: usize = 16 << 20;
/// The largest body of a client-streaming call (`…/entries/stream`: up to 4 194 304 entries).
pub const MAX_STREAM_BODY: usize = 256 << 20;

/// The routes of every RPC, `GET /api/v1/openapi.json` (no token) and, given the agent's
/// metrics, `GET /metrics` (a read token over TCP, like any call: Prometheus sends one with
/// `authorization: {credentials: …}`).
pub fn router(api: Api, metrics: Option<std::sync::Arc<crate::metrics::Metrics>>) -> axum::Router {
    let mut r = axum::Router::new();
    if let Some(m) = metrics {
        r = r.merge(
            crate::metrics::router(m).route_layer(axum::middleware::from_fn_with_state(
                api.clone(),
                needs_read,
            )),
        );
    }
    let mut r = r.route(
        "/api/v1/openapi.json",
        axum::routing::get(|| async {
            (
                [(header::CONTENT_TYPE, "application/json")],
                capybara_proto::OPENAPI_JSON,
            )
        }),
    );
    for (i, route) in routes::ROUTES.iter().enumerate() {
        let filter = match route.method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            "DELETE" => MethodFilter::DELETE,
            _ => MethodFilter::PATCH,
        };
        let api = api.clone();
        r = r.route(
            route.axum_path,
            on(
                filter,
                move |Path(params): Path<HashMap<String, String>>,
                      RawQuery(query): RawQuery,
                      req: Request| {
                    let api = api.clone();
                    async move { handle(api, i, params, query, req).await }
                },
            ),
        );
    }
    r
}

/// `/metrics` on the API listener: the caller needs the read scope.
async fn needs_read(
    axum::extract::State(api): axum::extract::State<Api>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    match api.authorize(
        &tonic::metadata::MetadataMap::from_headers(req.headers().clone()),
        req.extensions(),
        crate::service::domain::Scope::Read,
    ) {
        Ok(_) => next.run(req).await,
        Err(st) => status_response(&st),
    }
}

/// What answers a path no route has: gRPC's UNIMPLEMENTED to a gRPC client, 404 to others.
pub async fn fallback(req: Request) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return Status::unimplemented("")
            .into_http::<Body>()
            .into_response();
    }
    error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("no route {} {}", req.method(), req.uri().path()),
        None,
    )
}

async fn handle(
    api: Api,
    i: usize,
    params: HashMap<String, String>,
    query: Option<String>,
    req: Request,
) -> Response {
    let started = std::time::Instant::now();
    let route = &routes::ROUTES[i];
    let resp = answer(&api, i, route, params, query, req).await;
    // The route template, never the path (ids in paths would grow the series without bound).
    api.service().telemetry.observe_call(
        &format!("{} {}", route.method, route.template),
        resp.status().as_str(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

async fn answer(
    api: &Api,
    i: usize,
    route: &Route,
    params: HashMap<String, String>,
    query: Option<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let input = match read_input(route, &params, query.as_deref(), &parts.headers, body).await {
        Ok(input) => input,
        Err(resp) => return *resp,
    };
    let mut call = tonic::Request::new(input);
    *call.metadata_mut() = tonic::metadata::MetadataMap::from_headers(parts.headers);
    *call.extensions_mut() = parts.extensions;
    match routes::call(api, i, call).await {
        Ok(Output::One(v)) => (StatusCode::OK, axum::Json(v)).into_response(),
        Ok(Output::Stream(s)) => {
            // One message a line; an error after the first message can no longer change the
            // status: it is the last line, `{"error": {…}}`.
            let lines = s.map(|r| {
                let mut line = match r {
                    Ok(v) => serde_json::to_vec(&v),
                    Err(st) => serde_json::to_vec(&json!({ "error": error_body(&st).1 })),
                }
                .unwrap_or_default();
                line.push(b'\n');
                Ok::<_, std::convert::Infallible>(line)
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(Body::from_stream(lines))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Err(st) => status_response(&st),
    }
}

type Refusal = Box<Response>;

fn bad(field: &str, msg: impl std::fmt::Display) -> Refusal {
    Box::new(error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        format!("{field}: {msg}"),
        Some(field),
    ))
}

/// The call's request JSON: the body (or the query string), with the path's fields bound.
async fn read_input(
    route: &Route,
    params: &HashMap<String, String>,
    query: Option<&str>,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<Input, Refusal> {
    let limit = if route.client_streaming {
        MAX_STREAM_BODY
    } else {
        MAX_BODY
    };
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RESOURCE_EXHAUSTED",
            format!("body: larger than {limit} bytes"),
            Some("body"),
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    let mut messages = if route.body {
        body_messages(route, &bytes)?
    } else {
        if !bytes.is_empty() {
            return Err(bad(
                "body",
                format!(
                    "{} {} takes no body; its fields go in the query string",
                    route.method, route.template
                ),
            ));
        }
        vec![query_message(route, query.unwrap_or(""))?]
    };
    if route.body && query.is_some_and(|q| !q.is_empty()) {
        return Err(bad(
            "query",
            format!(
                "{} {} takes its fields from the JSON body, not the query string",
                route.method, route.template
            ),
        ));
    }
    for m in &mut messages {
        for (param, field) in route.path_fields {
            let Some(value) = params.get(*param) else {
                continue;
            };
            let obj = m
                .as_object_mut()
                .ok_or_else(|| bad("body", "not a JSON object"))?;
            match obj.get(*field) {
                Some(Value::String(s)) if s != value => {
                    return Err(bad(
                        field,
                        format!("the path says {value:?} and the body {s:?}"),
                    ));
                }
                _ => {
                    obj.insert((*field).to_owned(), Value::String(value.clone()));
                }
            }
        }
    }
    Ok(if route.client_streaming {
        Input::Many(messages)
    } else {
        Input::One(messages.pop().unwrap_or_else(|| json!({})))
    })
}

/// The body's message (`{}` when empty), or a client stream's: one JSON object a line, or one
/// JSON array of them.
fn body_messages(route: &Route, bytes: &[u8]) -> Result<Vec<Value>, Refusal> {
    let object = |v: Value, what: &str| match v {
        Value::Object(_) => Ok(v),
        _ => Err(bad(what, "must be a JSON object")),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(if route.client_streaming {
            Vec::new()
        } else {
            vec![json!({})]
        });
    }
    if !route.client_streaming {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad("body", e))?;
        return Ok(vec![object(v, "body")?]);
    }
    if let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(bytes) {
        return items
            .into_iter()
            .enumerate()
            .map(|(n, v)| object(v, &format!("body[{n}]")))
            .collect();
    }
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(n, l)| {
            let what = format!("line {}", n + 1);
            let v: Value = serde_json::from_slice(l).map_err(|e| bad(&what, e))?;
            object(v, &what)
        })
        .collect()
}

/// A route without a body: its fields from the query string (`?pageSize=10&user=alice`; the
/// .proto name `page_size` works too; a repeated field may be given again).
fn query_message(route: &Route, query: &str) -> Result<Value, Refusal> {
    let mut obj = Map::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let Some(f) = route
            .query
            .iter()
            .find(|f| f.name == key || f.json_name == key)
        else {
            let known: Vec<_> = route.query.iter().map(|f| f.json_name).collect();
            return Err(bad(
                &key,
                format!(
                    "unknown query parameter; {} {} takes {}",
                    route.method,
                    route.template,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let v = match f.kind {
            QueryKind::Bool => match &*value {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(bad(f.json_name, format!("{value:?} is not true or false"))),
            },
            QueryKind::Number | QueryKind::String => Value::String(value.into_owned()),
        };
        if f.repeated {
            if let Value::Array(a) = obj
                .entry(f.json_name)
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                a.push(v);
            }
        } else if obj.insert(f.json_name.to_owned(), v).is_some() {
            return Err(bad(f.json_name, "given more than once"));
        }
    }
    Ok(Value::Object(obj))
}

/// An error answer.
fn error(code: StatusCode, status: &str, message: String, field: Option<&str>) -> Response {
    let mut body = json!({ "code": code.as_u16(), "status": status, "message": message });
    if let Some(f) = field {
        body["field"] = f.into();
    }
    (code, axum::Json(body)).into_response()
}

/// The HTTP status and JSON body of a gRPC status.
fn error_body(st: &Status) -> (StatusCode, Value) {
    let retry = st.metadata().get("retry-after").cloned();
    let code = match st.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted if retry.is_some() => StatusCode::TOO_MANY_REQUESTS,
        Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::ResourceExhausted => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = st.message().to_owned();
    let mut body = json!({
        "code": code.as_u16(),
        "status": crate::metrics::grpc::code_name(st.code() as i32),
        "message": message,
    });
    if code == StatusCode::BAD_REQUEST
        && let Some((field, _)) = message.split_once(": ")
        && !field.is_empty()
        && !field.contains(' ')
    {
        body["field"] = field.into();
    }
    (code, body)
}

fn status_response(st: &Status) -> Response {
    let (code, body) = error_body(st);
    let mut resp = (code, axum::Json(body)).into_response();
    if let Some(r) = st
        .metadata()
        .get("retry-after")
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, r);
    }
    resp
}
