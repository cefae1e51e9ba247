//! `Stats.WatchStats` (live monitoring, `service::watch`): one task per watcher that cuts its view
//! of the shared sampler's ticks and streams it; its conversions and the client call.
//!
//! The stream ends cleanly when the client goes away (the task sees its channel closed, drops
//! its watch, and the sampler stops once nobody watches) and when the agent shuts down
//! (`Live::stop`, so a watcher never holds up the API's graceful shutdown). A failed reading of
//! the counters ends the stream with `UNAVAILABLE`.

use capybara_proto::v1::{self as pb, stats_client::StatsClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, drop_reason_from_proto, drop_reason_to_proto, need},
    handler::Api,
};
use crate::service::{
    Traffic,
    domain::Scope,
    watch::{
        DEFAULT_TOP, DeviceRow, DropRate, Line, LiveTraffic, LiveView, MAX_TOP, Others, Rate,
        UserRow,
    },
};

/// The stream `WatchStats` answers with.
pub type TickStream = ReceiverStream<Result<pb::StatsTick, Status>>;

/// `WatchStats`: read scope; a token restricted to a user may watch that user only.
pub(super) async fn watch_stats(
    api: &Api,
    req: Request<pb::WatchStatsRequest>,
) -> Result<Response<TickStream>, Status> {
    let r = req.get_ref();
    let (_, user) = api.auth_opt_user(&req, Scope::Read, "user", &r.user)?;
    let top = match r.top {
        0 => DEFAULT_TOP,
        n => (n as usize).min(MAX_TOP),
    };
    if let Some(u) = &user {
        let u = u.clone();
        api.call(move |s| s.directory.user(&u).map(|_| ())).await?;
    }
    let mut watch = api.service().watch.watch();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = tx.closed() => break,
                n = watch.next() => n,
            };
            let msg = match next {
                None => break,
                Some(Ok(tick)) => Ok(pb::StatsTick::from(&tick.view(user.as_ref(), top))),
                Some(Err(why)) => Err(Status::unavailable(format!(
                    "reading the counters failed: {why}"
                ))),
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                break;
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

fn rate_to_proto(r: Rate) -> pb::Rate {
    pb::Rate {
        bytes: r.bytes,
        packets: r.packets,
    }
}

fn counter(t: Traffic) -> pb::Counter {
    pb::Counter {
        packets: t.packets,
        bytes: t.bytes,
    }
}

impl From<&LiveTraffic> for pb::LiveTraffic {
    fn from(t: &LiveTraffic) -> pb::LiveTraffic {
        pb::LiveTraffic {
            rx: Some(rate_to_proto(t.rx)),
            tx: Some(rate_to_proto(t.tx)),
            rx_total: Some(counter(t.rx_total)),
            tx_total: Some(counter(t.tx_total)),
        }
    }
}

impl From<&Others> for pb::OtherTick {
    fn from(o: &Others) -> pb::OtherTick {
        pb::OtherTick {
            count: o.count,
            traffic: Some((&o.traffic).into()),
        }
    }
}

impl From<&LiveView> for pb::StatsTick {
    fn from(v: &LiveView) -> pb::StatsTick {
        pb::StatsTick {
            at_ms: v.at_ms as i64,
            interval_ms: v.interval_ms.min(u64::from(u32::MAX)) as u32,
            users: v.users,
            devices: v.devices,
            sessions: v.sessions,
            total: Some((&v.total).into()),
            top_users: v
                .top_users
                .iter()
                .map(|u| pb::UserTick {
                    user: u.user.clone(),
                    devices: u.devices,
                    sessions: u.sessions,
                    traffic: Some((&u.traffic).into()),
                })
                .collect(),
            other_users: Some((&v.other_users).into()),
            top_devices: v
                .top_devices
                .iter()
                .map(|d| pb::DeviceTick {
                    peer: match &d.line {
                        Line::Peer(p) => Some(p.into()),
                        Line::Proxy(_) => None,
                    },
                    proxy: match &d.line {
                        Line::Peer(_) => None,
                        Line::Proxy(a) => Some(a.into()),
                    },
                    online: d.online,
                    traffic: Some((&d.traffic).into()),
                })
                .collect(),
            other_devices: Some((&v.other_devices).into()),
            drops: v
                .drops
                .iter()
                .filter_map(|d| {
                    capybara_common::drop::DropReason::ALL
                        .iter()
                        .find(|r| r.name() == d.reason)
                        .map(|r| pb::DropTick {
                            reason: drop_reason_to_proto(*r) as i32,
                            packets_per_second: d.per_second,
                            packets: d.packets,
                        })
                })
                .collect(),
        }
    }
}

fn rate_from_proto(r: Option<pb::Rate>) -> Rate {
    r.map(|r| Rate {
        bytes: r.bytes,
        packets: r.packets,
    })
    .unwrap_or_default()
}

fn traffic_from(c: Option<pb::Counter>) -> Traffic {
    c.map(|c| Traffic {
        packets: c.packets,
        bytes: c.bytes,
    })
    .unwrap_or_default()
}

fn live_traffic_from_proto(t: Option<pb::LiveTraffic>) -> LiveTraffic {
    t.map(|t| LiveTraffic {
        rx: rate_from_proto(t.rx),
        tx: rate_from_proto(t.tx),
        rx_total: traffic_from(t.rx_total),
        tx_total: traffic_from(t.tx_total),
    })
    .unwrap_or_default()
}

fn others_from_proto(o: Option<pb::OtherTick>) -> Others {
    o.map(|o| Others {
        count: o.count,
        traffic: live_traffic_from_proto(o.traffic),
    })
    .unwrap_or_default()
}

impl TryFrom<pb::StatsTick> for LiveView {
    type Error = AnswerError;
    fn try_from(t: pb::StatsTick) -> Result<LiveView, AnswerError> {
        Ok(LiveView {
            at_ms: u64::try_from(t.at_ms).unwrap_or(0),
            interval_ms: u64::from(t.interval_ms),
            users: t.users,
            devices: t.devices,
            sessions: t.sessions,
            total: live_traffic_from_proto(t.total),
            top_users: t
                .top_users
                .into_iter()
                .map(|u| UserRow {
                    user: u.user,
                    devices: u.devices,
                    sessions: u.sessions,
                    traffic: live_traffic_from_proto(u.traffic),
                })
                .collect(),
            other_users: others_from_proto(t.other_users),
            top_devices: t
                .top_devices
                .into_iter()
                .map(|d| {
                    let line = match (d.peer, d.proxy) {
                        (_, Some(a)) => Line::Proxy(a.try_into()?),
                        (p, None) => Line::Peer(need("top_devices.peer", p)?.try_into()?),
                    };
                    Ok(DeviceRow {
                        line,
                        online: d.online,
                        traffic: live_traffic_from_proto(d.traffic),
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            other_devices: others_from_proto(t.other_devices),
            drops: t
                .drops
                .into_iter()
                .map(|d| {
                    let r = drop_reason_from_proto("drops.reason", d.reason).map_err(|_| {
                        AnswerError::Invalid {
                            field: "drops.reason",
                        }
                    })?;
                    Ok(DropRate {
                        reason: r.name().to_owned(),
                        per_second: d.packets_per_second,
                        packets: d.packets,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
        })
    }
}

/// The ticks of a watch, as they come.
#[derive(Debug)]
pub struct LiveTicks {
    stream: tonic::Streaming<pb::StatsTick>,
}

impl LiveTicks {
    /// The next tick; `None` when the agent ended the stream.
    pub async fn next(&mut self) -> Option<Result<LiveView, ClientError>> {
        match self.stream.message().await {
            Ok(Some(t)) => Some(t.try_into().map_err(ClientError::from)),
            Ok(None) => None,
            Err(s) => Some(Err(s.into())),
        }
    }
}

impl Client {
    /// Watches live rates (of `user` only unless empty), `top` rows each (0 = the default).
    pub async fn watch_stats(&self, user: &str, top: u32) -> Result<LiveTicks, ClientError> {
        let stream = StatsClient::new(self.channel.clone())
            .watch_stats(self.req(pb::WatchStatsRequest {
                user: user.into(),
                top,
            }))
            .await?
            .into_inner();
        Ok(LiveTicks { stream })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        time::{Duration, SystemTime},
    };

    use prost::Message as _;

    use super::*;
    use crate::service::{
        domain::{DeviceName, Peer, PublicKey, UserName},
        watch::{DeviceTick, Line, Tick},
    };

    /// `n` devices of `n` users with realistic names, all busy.
    fn tick(n: u32) -> Tick {
        Tick {
            at: SystemTime::now(),
            interval: Duration::from_millis(1_000),
            devices: (0..n)
                .map(|k| DeviceTick {
                    line: Line::Peer(Peer {
                        id: k,
                        user: UserName::parse("user", &format!("user{k:06}")).unwrap(),
                        device: DeviceName::parse("device", "laptop").unwrap(),
                        public_key: PublicKey([7; 32]),
                        ipv4: Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8),
                        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (k >> 16) as u16, k as u16),
                        created_at: 1_700_000_000,
                        key_kept: false,
                    }),
                    online: true,
                    traffic: LiveTraffic {
                        rx: Rate {
                            bytes: 12_345_678 + u64::from(k),
                            packets: 9_876,
                        },
                        tx: Rate {
                            bytes: 23_456_789,
                            packets: 19_876,
                        },
                        rx_total: Traffic {
                            packets: 123_456_789,
                            bytes: 123_456_789_012,
                        },
                        tx_total: Traffic {
                            packets: 223_456_789,
                            bytes: 223_456_789_012,
                        },
                    },
                    drops: Vec::new(),
                })
                .collect(),
            drops: Vec::new(),
        }
    }

    #[test]
    fn a_tick_is_bounded_by_top() {
        let t = tick(100_000);
        let size = |top: usize| pb::StatsTick::from(&t.view(None, top)).encoded_len();
        let (s1, s20, s1000) = (size(1), size(20), size(MAX_TOP));
        eprintln!("tick of 100 000 devices: top 1 {s1} B, top 20 {s20} B, top 1000 {s1000} B");
        // About the same size whatever the peers (addresses differ in length): only `top`
        // grows it.
        let small = pb::StatsTick::from(&tick(2_000).view(None, 20)).encoded_len();
        assert!(small.abs_diff(s20) < 200, "{small} vs {s20}");
        assert!(s20 < 5_000, "{s20}");
        assert!(s1000 < 250_000, "{s1000}");
        assert!(size(5_000) == s1000, "clamped to MAX_TOP");
    }

    #[test]
    fn a_tick_round_trips() {
        let mut t = tick(30);
        t.drops = vec![(capybara_common::drop::DropReason::FlowLimit, 3, 10)];
        // The busiest row a proxy identity's.
        let mut busiest = t.devices[29].clone();
        busiest.line = Line::Proxy(crate::service::domain::ProxyAccess {
            id: 900,
            user: busiest.line.user().clone(),
            protocol: crate::service::domain::Protocol::Vless,
            created_at: 1_700_000_000,
        });
        busiest.traffic.rx.bytes += 1;
        t.devices.push(busiest);
        let v = t.view(None, 5);
        assert!(matches!(v.top_devices[0].line, Line::Proxy(_)));
        let back = LiveView::try_from(pb::StatsTick::from(&v)).unwrap();
        assert_eq!(back, v);
    }
}
