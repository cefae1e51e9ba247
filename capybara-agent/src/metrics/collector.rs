//! The scrape-time collector: every series read from the kernel maps, the tunnel and the
//! policy when `/metrics` is scraped, through the service layer (`service::monitor`,
//! `service::lists`, `service::telemetry`), never on the packet path. A scrape runs on the
//! blocking pool: it costs two map reads per device (the same reads as `capybara stats`), one
//! read of the global counters, the list hits, and one walk of the users' quotas a page at a
//! time. A part that fails to read is left out of that scrape (logged, and counted in
//! `capybara_metrics_read_errors_total`); the others are still answered.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use capybara_common::drop::DropReason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::top::{TopUsers, UserTraffic};
use crate::service::{Service, ServiceError, Traffic};

/// Users read from the service per page while ranking them.
const USER_PAGE: usize = 1000;

/// A label value written escaped (`\`, `"`, newline), as the exposition format requires
/// (prometheus-client writes label values as they are). Names the agent validates never need
/// it; this keeps a future looser name from breaking the exposition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Escaped<'a>(pub(super) &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => e.write_str("\\\\")?,
                '"' => e.write_str("\\\"")?,
                '\n' => e.write_str("\\n")?,
                c => e.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Reads the service at each scrape.
#[derive(Debug)]
pub(super) struct ServiceCollector {
    pub(super) svc: Arc<Service>,
    /// Users with a series of their own (the rest are summed: [`super::top`]).
    pub(super) top_users: usize,
    /// Parts of a scrape that failed to read.
    pub(super) read_errors: Arc<AtomicU64>,
}

/// One scrape's reads, done before anything is encoded (so a failed read never leaves half a
/// metric family behind).
#[derive(Default)]
struct Reads {
    users: Option<(super::top::Ranking, BTreeMap<String, u64>)>,
    lists: Option<Vec<crate::service::BlocklistView>>,
    verdicts: Option<Vec<(&'static str, Traffic)>>,
    quota: Option<crate::service::telemetry::QuotaStanding>,
}

impl ServiceCollector {
    fn failed(&self, what: &str, e: &ServiceError) {
        self.read_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "metrics: cannot read {what}; left out of this scrape");
    }

    fn ok<T>(&self, what: &str, r: Result<T, ServiceError>) -> Option<T> {
        r.map_err(|e| self.failed(what, &e)).ok()
    }

    /// Every user's traffic, ranked, a page of users at a time; and the drops by reason.
    fn users(&self) -> Result<(super::top::Ranking, BTreeMap<String, u64>), ServiceError> {
        let mut top = TopUsers::new(self.top_users);
        let mut after: Option<String> = None;
        loop {
            let (stats, next) = self.svc.monitor.stats_page(after.as_deref(), USER_PAGE)?;
            for (user, v) in stats.users {
                top.push(UserTraffic {
                    user,
                    rx: v.rx,
                    tx: v.tx,
                });
            }
            match next {
                Some(n) => after = Some(n),
                // The global drops come with every page: the last page's are the newest.
                None => return Ok((top.finish(), stats.drops)),
            }
        }
    }

    fn read(&self) -> Reads {
        Reads {
            users: self.ok("per-user counters", self.users()),
            lists: self.ok(
                "blocklist hits",
                self.svc
                    .lists
                    .blocklists_page(None, usize::MAX)
                    .map(|p| p.0),
            ),
            verdicts: self.ok("verdict counters", self.svc.telemetry.verdicts()),
            quota: self.ok("quota standing", self.svc.telemetry.quota_standing()),
        }
    }
}

/// A counter family: one sample per label set.
fn counters<'l, L: prometheus_client::encoding::EncodeLabelSet + 'l>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family: one sample per label set.
fn gauges<L: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels.
fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge without labels.
fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(gauge_i64(v)).encode(enc.encode_descriptor(
        name,
        help,
        None,
        MetricType::Gauge,
    )?)
}

/// `[(label, value)]` pairs of escaped values.
type Labels<'a, const N: usize> = [(&'static str, Escaped<'a>); N];

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ServiceCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = self.read();
        let tunnel = self.svc.telemetry.tunnel();

        if let Some((ranking, drops)) = &r.users {
            let series: Vec<&UserTraffic> = ranking
                .top
                .iter()
                .chain(std::iter::once(&ranking.other))
                .collect();
            let per = |pick: fn(&Traffic) -> u64| {
                series.iter().flat_map(move |u| {
                    [("rx", &u.rx), ("tx", &u.tx)].map(|(dir, t)| {
                        let labels: Labels<'_, 2> =
                            [("user", Escaped(&u.user)), ("direction", Escaped(dir))];
                        (labels, pick(t))
                    })
                })
            };
            counters(
                &mut enc,
                "capybara_user_bytes",
                "IP bytes of each user's devices, rx = from the devices (what the clients sent), \
                 tx = to them; the top users by bytes have a series each (--metrics-top-users), \
                 the rest are summed under user=\"_other\"",
                per(|t| t.bytes),
            )?;
            counters(
                &mut enc,
                "capybara_user_packets",
                "IP packets of each user's devices, as capybara_user_bytes",
                per(|t| t.packets),
            )?;
            gauge(
                &mut enc,
                "capybara_users_other",
                "Users summed under user=\"_other\" (not in the top N)",
                ranking.other_users,
            )?;
            counters(
                &mut enc,
                "capybara_drops",
                "Packets dropped by the kernel programs, by reason",
                DropReason::ALL.iter().map(|reason| {
                    let name = reason.name();
                    let labels: Labels<'_, 1> = [("reason", Escaped(name))];
                    (labels, drops.get(name).copied().unwrap_or(0))
                }),
            )?;
        }

        if let Some(lists) = &r.lists {
            counters(
                &mut enc,
                "capybara_list_drops",
                "Packets dropped because of a named blocklist, by list and direction \
                 (source: the uplink guard, destination: the tunnel)",
                lists.iter().map(|l| {
                    let labels: Labels<'_, 2> = [
                        ("list", Escaped(&l.name)),
                        ("direction", Escaped(dir_name(l.direction))),
                    ];
                    (labels, l.hits.packets)
                }),
            )?;
        }

        if let Some(verdicts) = &r.verdicts {
            let get = |name: &str| {
                verdicts
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, t)| t.packets)
            };
            counter(
                &mut enc,
                "capybara_kernel_events_lost",
                "Kernel event records lost because the ring buffer was full (the packets' \
                 verdicts are unaffected)",
                get("events_lost"),
            )?;
            counter(
                &mut enc,
                "capybara_kernel_events",
                "Kernel event records written into the ring buffer",
                get("events_emitted"),
            )?;
            counters(
                &mut enc,
                "capybara_kernel_verdicts",
                "Packets by the kernel programs' verdict counters (capybara_common::counters)",
                verdicts.iter().map(|(name, t)| {
                    let labels: Labels<'_, 1> = [("verdict", Escaped(name))];
                    (labels, t.packets)
                }),
            )?;
        }

        if let Some(q) = &r.quota {
            gauges(
                &mut enc,
                "capybara_quota_users",
                "Users by data quota standing: unlimited, ok, warning (at or above 80 % of the \
                 budget), exceeded (at or over it)",
                [
                    ("unlimited", q.unlimited),
                    ("ok", q.ok),
                    ("warning", q.warning),
                    ("exceeded", q.exceeded),
                ]
                .map(|(s, n)| {
                    let labels: Labels<'_, 1> = [("standing", Escaped(s))];
                    (labels, gauge_i64(n))
                }),
            )?;
        }

        gauge(
            &mut enc,
            "capybara_sessions_online",
            "WireGuard sessions online (devices connected now)",
            tunnel.sessions_online,
        )?;
        // Open proxied connections by protocol: both protocols always present (0 when none).
        let open = self.svc.core.proxies.list();
        gauges(
            &mut enc,
            "capybara_proxy_connections_open",
            "Shadowsocks and VLESS connections open now, by protocol",
            ["shadowsocks", "vless"].map(|protocol| {
                let n = open
                    .iter()
                    .filter(|c| c.identity.protocol.as_str() == protocol)
                    .count();
                let labels: Labels<'_, 1> = [("protocol", Escaped(protocol))];
                (labels, gauge_i64(n as u64))
            }),
        )?;
        counter(
            &mut enc,
            "capybara_handshakes_completed",
            "WireGuard handshakes completed since the agent started (rekeys included)",
            tunnel.handshakes_completed,
        )?;
        counters(
            &mut enc,
            "capybara_handshakes_failed",
            "WireGuard handshakes failed since the agent started, by reason",
            tunnel.handshakes_failed.iter().map(|(reason, n)| {
                let labels: Labels<'_, 1> = [("reason", Escaped(reason))];
                (labels, *n)
            }),
        )?;
        counter(
            &mut enc,
            "capybara_auth_reports_dropped",
            "Failed-handshake reports the session recorder dropped because its bounded queue was \
             full (the tunnel never waits for it; `capybara health` shows the same count)",
            self.svc.health.auth_drops(),
        )?;
        let wh = self.svc.webhooks.stats();
        gauge(
            &mut enc,
            "capybara_webhook_outbox_depth",
            "Webhook events in the durable outbox (not yet passed by every enabled endpoint; \
             capped at 200 000, the oldest dropped past it)",
            wh.outbox_depth,
        )?;
        gauge(
            &mut enc,
            "capybara_webhook_endpoints",
            "Enabled webhook endpoints (one delivery worker each)",
            wh.endpoints,
        )?;
        counter(
            &mut enc,
            "capybara_webhook_events_delivered",
            "Webhook events delivered (a 2xx answer) since the agent started",
            wh.delivered,
        )?;
        counter(
            &mut enc,
            "capybara_webhook_attempts_failed",
            "Webhook attempts that failed (no answer, or not 2xx) since the agent started",
            wh.failed_attempts,
        )?;
        counter(
            &mut enc,
            "capybara_webhook_events_dead",
            "Webhook events dead-lettered after every attempt failed, since the agent started",
            wh.dead,
        )?;
        counter(
            &mut enc,
            "capybara_webhook_events_dropped",
            "Subscribed webhook events dropped undelivered at the outbox's cap, since the agent started",
            wh.dropped,
        )?;
        let rep = self.svc.reputation.stats();
        gauge(
            &mut enc,
            "capybara_reputation_blocked_sources",
            "Sources auto-blocked now by the reputation engine (in the `auto` source list with an \
             expiry)",
            rep.blocked,
        )?;
        counter(
            &mut enc,
            "capybara_reputation_blocks",
            "Sources auto-blocked since the agent started",
            rep.blocks,
        )?;
        counter(
            &mut enc,
            "capybara_reputation_unblocks",
            "Auto-blocks ended by their TTL since the agent started",
            rep.unblocks,
        )?;
        gauge(
            &mut enc,
            "capybara_reputation_tracked_sources",
            "Sources with a score in the reputation table (at most 16 384)",
            rep.tracked,
        )?;
        counter(
            &mut enc,
            "capybara_intel_refresh_failures",
            "IP intelligence list reloads that failed since the agent started (the old list stays \
             enforced; `capybara ip-intel list` shows why)",
            self.svc.intel.refresh_failures(),
        )?;
        counter(
            &mut enc,
            "capybara_metrics_read_errors",
            "Parts of scrapes left out because a read failed (logged)",
            self.read_errors.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

fn dir_name(d: crate::blocklist::Direction) -> &'static str {
    match d {
        crate::blocklist::Direction::Source => "source",
        crate::blocklist::Direction::Destination => "destination",
    }
}
