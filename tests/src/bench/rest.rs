//! `rest_vs_grpc_*`: the same mixed read/write calls over the REST mirror (HTTP/1.1, JSON) and
//! over gRPC (HTTP/2, protobuf), against one in-process agent API in the same run.
//!
//! The real server on `127.0.0.1:0` (gRPC and REST on one listener, tokens checked, no rate
//! limit), a real RocksDB store, the in-memory dataplane and tunnel (the same service work for
//! both protocols, so the difference is the protocol's). Calls are made one at a time (closed
//! loop) and alternate between the protocols call by call, so both see the same machine noise:
//! for each of [`ROUNDS`] rounds, the same kind of call is made once over gRPC and once over
//! REST, on different users. The kinds, in turn: `AddUser` (a synced write), `GetUser`,
//! `GetStats` of one user, `ListConnections`, `ListAudit` (20 newest), `Kick`, `RemoveUser`.
//!
//! Figures: `rest_p50_us` and `grpc_p50_us` (median round trip as the client sees it),
//! `rest_vs_grpc_p50_ratio` (the first over the second; target ≤ 1.3) and
//! `rest_vs_grpc_errors` (calls that failed, either protocol; target 0).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use capybara_agent::{
    api::client::{Client, Endpoint},
    service::{
        NewToken, Service, ServiceConfig,
        domain::{Actor, Scope},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};

use super::{Figure, Selection, TcpApi, percentile};
use crate::{progress, rest::Rest};

/// `rest_p50_us`.
pub const REST_P50_US: &str = "rest_p50_us";
/// `grpc_p50_us`.
pub const GRPC_P50_US: &str = "grpc_p50_us";
/// `rest_vs_grpc_p50_ratio`.
pub const REST_VS_GRPC_P50_RATIO: &str = "rest_vs_grpc_p50_ratio";
/// `rest_vs_grpc_errors`.
pub const REST_VS_GRPC_ERRORS: &str = "rest_vs_grpc_errors";
/// Every figure of this module.
pub const NAMES: &[&str] = &[
    REST_P50_US,
    GRPC_P50_US,
    REST_VS_GRPC_P50_RATIO,
    REST_VS_GRPC_ERRORS,
];

/// Rounds of the seven kinds of call (each round: one call of each kind per protocol).
const ROUNDS: usize = 300;

/// Runs the comparison if any of its figures is selected.
pub fn run(sel: &Selection) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let figures = rt.block_on(run_async())?;
    Ok(figures.into_iter().filter(|f| sel.wants(f.name)).collect())
}

/// One call over one protocol: its round trip, or what went wrong.
type Timed = Result<Duration, String>;

async fn grpc_call(c: &Client, kind: usize, user: &str) -> Timed {
    let t = Instant::now();
    let r = match kind {
        0 => c.add_user(user, "", 0).await.map(drop),
        1 => c.get_user(user).await.map(drop),
        2 => c.stats(user).await.map(drop),
        3 => c.connections().await.map(drop),
        4 => c.audit("", 20).await.map(drop),
        5 => c.kick(user).await.map(drop),
        _ => c.remove_user(user).await.map(drop),
    };
    r.map(|()| t.elapsed()).map_err(|e| e.to_string())
}

async fn rest_call(r: &Rest, kind: usize, user: &str) -> Timed {
    let (method, path, body) = match kind {
        0 => (
            "POST",
            "/api/v1/users".to_owned(),
            Some(format!(r#"{{"name":"{user}"}}"#)),
        ),
        1 => ("GET", format!("/api/v1/users/{user}"), None),
        2 => ("GET", format!("/api/v1/stats?user={user}"), None),
        3 => ("GET", "/api/v1/connections".to_owned(), None),
        4 => ("GET", "/api/v1/audit?pageSize=20".to_owned(), None),
        5 => (
            "POST",
            format!("/api/v1/users/{user}/kick"),
            Some("{}".to_owned()),
        ),
        _ => ("DELETE", format!("/api/v1/users/{user}"), None),
    };
    let t = Instant::now();
    let a = r.call(method, &path, body.as_deref()).await;
    let took = t.elapsed();
    if a.status == 200 && a.json.is_object() {
        Ok(took)
    } else {
        Err(format!("{method} {path}: {} {}", a.status, a.text))
    }
}

async fn run_async() -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let svc = Arc::new(Service::open(
        Arc::new(Store::open(&dir.path().join("data"))?),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig::for_tests("10.201.0.1/16", "fd00:201::1/64", "192.0.2.1:51820"),
    )?);
    let (_, token) = svc.tokens.create_token(
        &Actor::Local { uid: 0 },
        NewToken {
            scope: Scope::Write,
            name: "bench-rest".into(),
            expires_at: None,
            user: None,
        },
    )?;
    let api = TcpApi::start(svc.clone()).await?;
    let addr: std::net::SocketAddr = api.url.trim_start_matches("http://").parse()?;
    let grpc = Client::connect(&Endpoint::Tcp {
        url: api.url.clone(),
        token: Some(token.clone()),
        ca_cert: None,
    })
    .await?;
    let rest = Rest::new(addr, Some(&token));
    // Warm both (connections, caches) before the clock.
    for kind in [0, 1, 6] {
        grpc_call(&grpc, kind, "warm-g")
            .await
            .map_err(anyhow::Error::msg)?;
        rest_call(&rest, kind, "warm-r")
            .await
            .map_err(anyhow::Error::msg)?;
    }
    progress!("rest_vs_grpc: {ROUNDS} rounds of 7 calls over each protocol");
    let (mut g, mut r) = (Vec::new(), Vec::new());
    let mut errors = 0u64;
    let mut first_error = None;
    for round in 0..ROUNDS {
        for kind in 0..7 {
            // Alternate which protocol goes first, so neither always follows the other.
            let order = if (round + kind) % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_rest in order {
                let result = if is_rest {
                    rest_call(&rest, kind, &format!("r{round}")).await
                } else {
                    grpc_call(&grpc, kind, &format!("g{round}")).await
                };
                match result {
                    Ok(d) => (if is_rest { &mut r } else { &mut g }).push(d.as_secs_f64() * 1e6),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    api.stop().await?;
    if let Some(e) = &first_error {
        progress!("rest_vs_grpc: {errors} errors, the first: {e}");
    }
    if r.is_empty() || g.is_empty() {
        bail!("rest_vs_grpc: no call succeeded: {first_error:?}");
    }
    r.sort_by(f64::total_cmp);
    g.sort_by(f64::total_cmp);
    let (rp, gp) = (percentile(&r, 0.5), percentile(&g, 0.5));
    progress!(
        "rest_vs_grpc: REST p50 {rp:.0} µs p99 {:.0} µs, gRPC p50 {gp:.0} µs p99 {:.0} µs, ratio {:.3}",
        percentile(&r, 0.99),
        percentile(&g, 0.99),
        rp / gp
    );
    Ok(vec![
        Figure {
            name: REST_P50_US,
            value: rp,
            unit: "us",
        },
        Figure {
            name: GRPC_P50_US,
            value: gp,
            unit: "us",
        },
        Figure {
            name: REST_VS_GRPC_P50_RATIO,
            value: rp / gp,
            unit: "ratio",
        },
        Figure {
            name: REST_VS_GRPC_ERRORS,
            value: errors as f64,
            unit: "count",
        },
    ])
}
