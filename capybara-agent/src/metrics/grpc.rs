//! The tower layer that times every gRPC call ([`CallLayer`], on the tonic server): from the
//! request to the response's `grpc-status` (in the headers of an error answered at once, else in
//! the trailers after the last message: a server stream is timed to its end), reported to
//! `service::telemetry::Telemetry::observe_call` with the method's path as the route and the
//! status code's name. A path that is no method of the API is reported as `unknown`, so a
//! client sending random paths cannot grow the number of series; a call whose answer never
//! ends (the client went away) is reported as `CANCELLED` when the response is dropped.
//!
//! Per call: one `Instant::now()`, a set lookup, and one histogram observation. REST paths
//! (`/api/…`) and `/metrics` are left to `api::rest`, which times each REST call under its
//! route template.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::service::telemetry::Telemetry;

/// The route label of a path that is no method of the API.
pub const UNKNOWN_ROUTE: &str = "unknown";

/// Every gRPC method the agent serves, as `/package.Service/Method`: read from the descriptor
/// sets the server registers (Capybara's, health's) plus server reflection.
pub fn known_routes() -> HashSet<String> {
    use prost::Message as _;
    let mut routes = HashSet::new();
    for set in [
        capybara_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for svc in file.service {
                let name = svc.name.unwrap_or_default();
                for m in svc.method {
                    let method = m.name.unwrap_or_default();
                    routes.insert(if package.is_empty() {
                        format!("/{name}/{method}")
                    } else {
                        format!("/{package}.{name}/{method}")
                    });
                }
            }
        }
    }
    for r in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        routes.insert(r.to_owned());
    }
    routes
}

/// The canonical name of gRPC status code `code` (`OK`, `INVALID_ARGUMENT`, …); an out of range
/// code is `UNKNOWN`, as gRPC reads it.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let v = headers.get("grpc-status")?;
    let n = v.to_str().ok()?.trim().parse::<i32>().unwrap_or(2);
    Some(code_name(n))
}

/// Times every call of the service it wraps (see the module docs).
#[derive(Clone)]
pub struct CallLayer {
    telemetry: Arc<Telemetry>,
    routes: Arc<HashSet<String>>,
}

impl std::fmt::Debug for CallLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallLayer")
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl CallLayer {
    /// Reports to `telemetry` (which forwards to the metrics once they are installed).
    pub fn new(telemetry: Arc<Telemetry>) -> CallLayer {
        CallLayer {
            telemetry,
            routes: Arc::new(known_routes()),
        }
    }
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> CallService<S> {
        CallService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`CallLayer`] makes.
#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
    layer: CallLayer,
}

/// One call being timed; reports once, when its code is known or when it is dropped.
struct Timing {
    telemetry: Arc<Telemetry>,
    route: String,
    started: Instant,
    done: bool,
}

impl Timing {
    fn finish(&mut self, code: &str) {
        if !std::mem::replace(&mut self.done, true) {
            self.telemetry
                .observe_call(&self.route, code, self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<TimedBody<RB>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let known = self.layer.routes.contains(path);
        // The REST mirror and `/metrics` share the listener: REST calls time themselves under
        // their route template (`api::rest`), and a scrape is not an API call.
        let http = !known && (path.starts_with("/api/") || path == "/metrics");
        let timing = (!http).then(|| Timing {
            telemetry: self.layer.telemetry.clone(),
            route: if known {
                path.to_owned()
            } else {
                UNKNOWN_ROUTE.to_owned()
            },
            started: Instant::now(),
            done: false,
        });
        CallFuture {
            inner: self.inner.call(req),
            timing,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CallService`].
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        timing: Option<Timing>,
    }
}

impl<F, RB, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<TimedBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut timing = this.timing.take();
        Poll::Ready(match result {
            Ok(resp) => {
                // An error answered at once carries its status in the headers.
                if let (Some(code), Some(t)) = (grpc_status(resp.headers()), timing.as_mut()) {
                    t.finish(code);
                }
                Ok(resp.map(|body| TimedBody { body, timing }))
            }
            Err(e) => {
                if let Some(t) = timing.as_mut() {
                    t.finish("UNKNOWN");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports its call when the trailers (`grpc-status`) pass.
    pub struct TimedBody<B> {
        #[pin]
        body: B,
        timing: Option<Timing>,
    }
}

impl<B: Body> Body for TimedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if let Some(t) = this.timing.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                        t.finish(code);
                    }
                }
                Some(Err(_)) => t.finish("UNKNOWN"),
                // The end without trailers: a gRPC answer always has them.
                None => t.finish("UNKNOWN"),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_the_served_methods() {
        let r = known_routes();
        for m in [
            "/capybara.v1.Users/AddUser",
            "/capybara.v1.Stats/GetStats",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(r.contains(m), "{m} missing from {} routes", r.len());
        }
        assert!(!r.contains("/capybara.v1.Users/Nope"));
        assert!(r.len() > 40, "{r:?}");
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(3), "INVALID_ARGUMENT");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }
}
