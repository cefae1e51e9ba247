//! Prometheus metrics: `GET /metrics`, built with `prometheus-client` (the Prometheus project's
//! Rust client), served on its own listener (`--metrics-listen`) by [`serve`], and mountable on
//! any axum server with [`router`].
//!
//! Two kinds of series:
//! - **read when scraped** (`collector`): per-user traffic, drops, list hits, kernel events,
//!   sessions online, handshakes, quota standing. The collector reads the kernel maps, the
//!   tunnel and the policy through the service layer at each scrape, on the blocking pool;
//!   nothing is copied between scrapes, and enforcement never depends on a scrape.
//! - **recorded as things happen**: API call latency (every gRPC call through
//!   [`grpc::CallLayer`]; REST routes through [`Metrics::observe_call`] or
//!   `service::telemetry::Telemetry::observe_call`) and store write and sync latency
//!   (`store::WriteTimer`). Each is one histogram observation (a few atomics; the label set's
//!   read lock in `Family`), nothing on the packet path.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `capybara_user_bytes_total` | counter | `user`, `direction` (`rx` from the devices, `tx` to them) | IP bytes per user (its devices and its proxy identities); top N users by bytes and `_other` |
//! | `capybara_user_packets_total` | counter | `user`, `direction` | IP packets, the same users |
//! | `capybara_users_other` | gauge | — | users summed under `_other` |
//! | `capybara_drops_total` | counter | `reason` (`DropReason::name`) | packets dropped by the kernel, every reason |
//! | `capybara_list_drops_total` | counter | `list`, `direction` (`source`, `destination`) | packets dropped because of a named blocklist |
//! | `capybara_kernel_events_total`, `capybara_kernel_events_lost_total` | counter | — | ring buffer records written / lost |
//! | `capybara_kernel_verdicts_total` | counter | `verdict` (`counters::COUNTER_NAMES`) | packets by verdict |
//! | `capybara_sessions_online` | gauge | — | devices connected now |
//! | `capybara_proxy_connections_open` | gauge | `protocol` (`shadowsocks`, `vless`) | proxied TCP connections open now (per-user traffic above counts proxied bytes too) |
//! | `capybara_handshakes_completed_total` | counter | — | handshakes completed (rekeys included) |
//! | `capybara_handshakes_failed_total` | counter | `reason` (`unknown-key`, `bad-mac`, `undecryptable`, `rejected`) | handshakes failed |
//! | `capybara_quota_users` | gauge | `standing` (`unlimited`, `ok`, `warning` ≥ 80 %, `exceeded`) | users by quota standing |
//! | `capybara_api_request_duration_seconds` | histogram | `route`, `code` | API call latency (gRPC method path or REST route; status code name) |
//! | `capybara_store_duration_seconds` | histogram | `op` (`write`, `sync`) | RocksDB batch write and WAL fsync latency |
//! | `capybara_auth_reports_dropped_total` | counter | — | failed-handshake reports the session recorder dropped (its queue was full; `capybara health` shows it too) |
//! | `capybara_reputation_blocked_sources`, `capybara_reputation_tracked_sources` | gauge | — | sources auto-blocked now / scored in the reputation table (`service::reputation`) |
//! | `capybara_reputation_blocks_total`, `capybara_reputation_unblocks_total` | counter | — | auto-blocks made / ended by their TTL since the agent started |
//! | `capybara_metrics_read_errors_total` | counter | — | scrape parts left out because a read failed |
//!
//! **Bounded cardinality.** Per-user series are the top N users by bytes (both directions,
//! cumulative; `--metrics-top-users`, default [`DEFAULT_TOP_USERS`]) plus one `_other` series
//! (a name no user can have) summing the rest, so the top N and `_other` always add up to the
//! total (`top`). The ranking is by cumulative bytes, so it changes rarely; when a user enters
//! the top N its bytes leave `_other`, which Prometheus reads as a counter reset of `_other`
//! (`rate()` handles it). Every other label takes values from a fixed set (drop reasons, list
//! names up to the kernel's `MAX_LISTS`, the API's methods: a path that is no method is `unknown`,
//! status code names).
//!
//! **Formats.** A scraper that accepts OpenMetrics (Prometheus does) gets it as
//! prometheus-client writes it (`application/openmetrics-text; version=1.0.0`); anyone else gets
//! the Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), where a counter's `# HELP`
//! and `# TYPE` name carries its `_total` suffix and there is no `# EOF` (what `promtool check
//! metrics` and older scrapers read).
//!
//! **Listener.** `--metrics-listen ADDR:PORT`: plain HTTP with no token (the series name users),
//! so only a loopback address unless `--insecure`, as for the API.

mod collector;
pub mod grpc;
pub mod top;

use std::{
    net::SocketAddr,
    sync::{Arc, Weak, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    metrics::{
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    service::{Service, telemetry::CallTimer},
    store::{StoreOp, WriteTimer},
};

/// The default `--metrics-top-users`: users with a series of their own.
pub const DEFAULT_TOP_USERS: usize = 50;
/// The largest `--metrics-top-users` accepted (a bound on the number of series).
pub const MAX_TOP_USERS: usize = 10_000;

/// What the metrics are configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Users with a series of their own (the rest are summed as `_other`).
    pub top_users: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            top_users: DEFAULT_TOP_USERS,
        }
    }
}

type CallLabels = [(&'static str, String); 2];
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn api_histogram() -> Histogram {
    // 0.5 ms … 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn store_histogram() -> Histogram {
    // 50 µs … 1.6 s (an fdatasync is 2.5 ms p50, 10 ms p99 on the development machine).
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// The agent's metrics: the registry, and the histograms recorded as things happen.
pub struct Metrics {
    registry: Registry,
    calls: Histograms<CallLabels>,
    store: Histograms<[(&'static str, &'static str); 1]>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// The metrics of `svc`: the collector reads it at each scrape (holding it weakly: the
    /// metrics never keep a stopped service alive), and the service's API call timer and its
    /// store's write timer report here from now on.
    pub fn install(svc: &Arc<Service>, config: MetricsConfig) -> Arc<Metrics> {
        let m = Arc::new(Metrics::new(Arc::downgrade(svc), config));
        svc.telemetry.time_calls(m.clone());
        svc.store().observe_writes(m.clone());
        m
    }

    fn new(svc: Weak<Service>, config: MetricsConfig) -> Metrics {
        let mut registry = Registry::default();
        let calls: Histograms<CallLabels> = Family::new_with_constructor(api_histogram);
        let store: Histograms<[(&'static str, &'static str); 1]> =
            Family::new_with_constructor(store_histogram);
        registry.register(
            "capybara_api_request_duration_seconds",
            "API call latency by route (gRPC method path or REST route) and status code",
            calls.clone(),
        );
        registry.register(
            "capybara_store_duration_seconds",
            "Store latency: op=write a RocksDB batch (no fsync), op=sync a WAL fsync",
            store.clone(),
        );
        registry.register_collector(Box::new(WeakCollector {
            svc,
            top_users: config.top_users,
            read_errors: Arc::new(AtomicU64::new(0)),
        }));
        Metrics {
            registry,
            calls,
            store,
        }
    }

    /// An API call to `route` answered `code` after `seconds`. `route` must come from a fixed
    /// set (a gRPC method path, a REST route template), never a raw request path.
    pub fn observe_call(&self, route: &str, code: &str, seconds: f64) {
        self.calls
            .get_or_create(&[("route", route.to_owned()), ("code", code.to_owned())])
            .observe(seconds);
    }

    /// The exposition in OpenMetrics text (reads the service: call it on the blocking pool).
    pub fn encode_openmetrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The exposition in the Prometheus text format 0.0.4 ([`to_prometheus_text`]).
    pub fn encode_prometheus(&self) -> Result<String, std::fmt::Error> {
        Ok(to_prometheus_text(&self.encode_openmetrics()?))
    }
}

impl CallTimer for Metrics {
    fn observe_call(&self, route: &str, code: &str, seconds: f64) {
        Metrics::observe_call(self, route, code, seconds);
    }
}

impl WriteTimer for Metrics {
    fn observe(&self, op: StoreOp, elapsed: Duration) {
        self.store
            .get_or_create(&[("op", op.name())])
            .observe(elapsed.as_secs_f64());
    }
}

/// The collector over a service that may be gone (then it answers nothing).
#[derive(Debug)]
struct WeakCollector {
    svc: Weak<Service>,
    top_users: usize,
    read_errors: Arc<AtomicU64>,
}

impl prometheus_client::collector::Collector for WeakCollector {
    fn encode(
        &self,
        enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let Some(svc) = self.svc.upgrade() else {
            return Ok(());
        };
        collector::ServiceCollector {
            svc,
            top_users: self.top_users,
            read_errors: self.read_errors.clone(),
        }
        .encode(enc)
    }
}

/// OpenMetrics text as prometheus-client writes it → the Prometheus text format 0.0.4: a
/// counter family's `# HELP`/`# TYPE` name gets the `_total` its samples carry, `# UNIT` and
/// `# EOF` lines go (the samples are the same in both formats for the types used here).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = kind == "counter" && !name.ends_with("_total");
            if let Some(h) = help.take() {
                match h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                    Some((n, text)) if counter && n == name => {
                        out.push_str(&format!("# HELP {n}_total {text}\n"));
                    }
                    _ => {
                        out.push_str(h);
                        out.push('\n');
                    }
                }
            }
            if counter {
                out.push_str(&format!("# TYPE {name}_total counter\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(h) = help {
        out.push_str(h);
        out.push('\n');
    }
    out
}

/// Whether an `Accept` header asks for OpenMetrics.
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// An axum router answering `GET /metrics` with `metrics`; mount it on any axum server.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::{
        extract::State,
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    async fn scrape(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> impl IntoResponse {
        let open = wants_openmetrics(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
        let encoded = tokio::task::spawn_blocking(move || {
            if open {
                m.encode_openmetrics()
            } else {
                m.encode_prometheus()
            }
        })
        .await;
        match encoded {
            Ok(Ok(text)) => (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    if open { OPENMETRICS } else { PROMETHEUS_TEXT },
                )],
                text,
            )
                .into_response(),
            _ => {
                tracing::error!("metrics: the exposition could not be written");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics could not be written\n",
                )
                    .into_response()
            }
        }
    }
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "metrics listening on http://{a}/metrics");
    }
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The rule for `--metrics-listen`: the exposition has no token and names users, so it is
/// served only on a loopback address unless `insecure`. Answers whether the address is a
/// network one (allowed by `insecure`: the daemon logs a warning), or `Err` with the address.
pub fn check_listener(addr: SocketAddr, insecure: bool) -> Result<bool, SocketAddr> {
    if crate::net::is_loopback(addr) {
        Ok(false)
    } else if insecure {
        Ok(true)
    } else {
        Err(addr)
    }
}

#[cfg(test)]
mod tests;
