//! `webhook_events_per_s`: events delivered per second to one webhook receiver on loopback.
//!
//! An in-process agent service (a real RocksDB store in a temporary directory, the in-memory
//! dataplane and tunnel), one webhook for `quota-warning` to a fast in-process HTTP/1.1
//! receiver on 127.0.0.1 ([`crate::receivers::Sink`], answering 204). [`EVENTS`] events are
//! raised with `Core::notify` as fast as a thread can (each one written to the durable outbox
//! first), and the figure is the events over the time from the first `notify` to the last
//! request the receiver got: the whole path (outbox write, worker read, signing, one POST per
//! event on a kept-alive connection, the delivery record and cursor write, the 2xx). Every
//! event must arrive, once, in order; otherwise the stage fails. Target ≥ 5 000 (issue 21).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use capybara_agent::{
    service::{
        Service, ServiceConfig,
        domain::Actor,
        notify::{Notification, NotifyKind},
        testing::{MemoryPlane, MemoryTunnel},
        webhooks::{EventSet, NewWebhook, ssrf},
    },
    store::Store,
};

use super::{Figure, Selection};
use crate::receivers::Sink;

/// `webhook_events_per_s`.
pub const WEBHOOK_EVENTS_PER_S: &str = "webhook_events_per_s";
/// Every figure of this module.
pub const NAMES: &[&str] = &[WEBHOOK_EVENTS_PER_S];

/// Events raised.
pub const EVENTS: u64 = 50_000;

/// Runs the benchmark if it is selected.
pub fn run(sel: &Selection) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let value = rt.block_on(run_async())?;
    Ok(vec![Figure {
        name: WEBHOOK_EVENTS_PER_S,
        value,
        unit: "events/s",
    }])
}

async fn run_async() -> Result<f64> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let svc = Arc::new(Service::open(
        Arc::new(Store::open(dir.path()).context("store")?),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig::for_tests("10.95.0.1/16", "fd95::1/64", "192.0.2.1:51820"),
    )?);
    let sink = Sink::start().await;
    svc.webhooks.add(
        &Actor::Agent,
        NewWebhook {
            url: ssrf::parse_url(&sink.url())?,
            events: EventSet::parse(&["quota-warning".into()], false)?,
            secret: None,
            allow_private: true,
        },
    )?;
    let started = Instant::now();
    let raise = {
        let svc = svc.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for i in 0..EVENTS {
                let mut n = Notification::new(NotifyKind::QuotaWarning);
                n.user = Some(format!("user{}", i % 1000));
                n.data = serde_json::json!({ "i": i, "percent": 80 });
                svc.core.notify(n)?;
            }
            Ok(())
        })
    };
    let deadline = started + Duration::from_secs(300);
    while (sink.count() as u64) < EVENTS {
        if Instant::now() > deadline {
            bail!(
                "only {} of {EVENTS} events delivered in 300 s",
                sink.count()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    raise.await.context("raising events")??;
    let log = sink.log.lock().unwrap_or_else(|e| e.into_inner());
    for (k, (_, body)) in log.got.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(body)?;
        if v["data"]["i"].as_u64() != Some(k as u64) {
            bail!("event {k} arrived as {}", v["data"]["i"]);
        }
    }
    if log.got.len() as u64 != EVENTS {
        bail!("{} requests for {EVENTS} events", log.got.len());
    }
    Ok(EVENTS as f64 / took.as_secs_f64())
}
