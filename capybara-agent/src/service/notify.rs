//! Notifications: the events webhooks deliver (`user-connect`, `quota-exceeded`, …), as one
//! typed value every source builds and hands to [`Core::notify`](super::core::Core::notify).
//!
//! A source (the session recorder, the kernel event reader, the health watcher, the audit
//! trail) builds a [`Notification`]; the core writes it to the durable webhook outbox (see
//! `service::webhooks`) and then publishes it on the service's event bus
//! ([`ServiceEvent::Notified`](super::ServiceEvent::Notified)) for anything else that listens.
//! The payload a receiver gets is [`Notification::payload`]: the design's fields (`event`,
//! `timestamp` as RFC 3339 UTC, `user`, `ip`, `vpn_ip`, `protocol`), a stable `id` (the
//! outbox's, the same on every retry and after a restart) and the event's own `data`.
//!
//! ## The sources
//! Each event comes from one real source; `user`, `ip` (the device's public endpoint address),
//! `vpn_ip` (its tunnel address; none for a proxy protocol) and `protocol` (`wireguard`,
//! `shadowsocks`, `vless`) are set for events about a device.
//! Latency is from the source's moment to [`Core::notify`](super::core::Core::notify); the
//! bound is what a flood can make of it.
//!
//! | event | source | `data` | latency | bound |
//! |---|---|---|---|---|
//! | `user-connect` | the session recorder (`service::history`), after the session's record is written | `device`, `session` (the connection id), `endpoint`, `vpn_ipv6` | the tunnel's handshake → one synced store write: a few ms (measured 2.2 ms, `e2e_notify`) | one per session: sessions come from authenticated peers only |
//! | `user-disconnect` | the same, after the close is written; also for sessions closed as stale at start (`agent-stopped`: the agent was killed) | the above plus `reason` (`idle`, `kicked`, `removed`, `agent-stopped`), `bytes_in`, `bytes_out`, `packets_in`, `packets_out`, `started_at`, `duration_s` | as for connect (idle: when the tunnel notices, `--disconnect-timeout`) | one per session |
//! | `quota-warning` | the kernel's quota event at 80 % and 90 % (`service::alerts`) | `percent`, `used`, `limit`, `period`, `epoch`, `device`, `group` (a shared pool: `user` is the member whose packet reached it), `kernel_time_ns` | the ring buffer's wake-up and one queue hop: under 1 ms (measured 0.49 ms for `quota-exceeded`, `e2e_notify`) | once per bucket, threshold and period (the kernel's own rule) |
//! | `quota-exceeded` | the kernel's 100 % event | as `quota-warning`, `percent` 100 | as `quota-warning` | as `quota-warning` |
//! | `account-expired` | a timer in the alerts thread at the user's expiry; at start for expiries passed while the agent was down | `expires_at`, `late_s`, `devices` | at the deadline (the thread sleeps until it) | exactly once per expiry value (a durable marker; see `service::alerts`) |
//! | `server-down` / `server-up` | the health watcher (every `--health-interval`, 5 s), the `Components` RPC and the API's health refresh (`service::health`) | `component` (`store`, `dataplane`, `tunnel`, `history`, `uplink`), `detail`; `server-up`: `down_since` | within the interval | one per component transition, across restarts |
//! | `suspicious-activity` | failed handshakes per source prefix from the tunnel's auth reports; kernel flow-limit refusals per device (`service::alerts`); wrong MFA codes that start a lock (`service::mfa`: `kind` `mfa-failures`, `user`, `device`, `source`, `locked_secs`, one per lock) | `kind` (`auth-failures`, `flow-limit-storm`), `prefix` or `device`, `source`, `reason`, `count`, `window_s`, `threshold`, `suppressed` | the tunnel's reports: the first failure at once, the rest within 20 s | one per source per window; at most 10 per window in all |
//! | `suspicious-activity` | failed handshakes per source prefix from the tunnel's auth reports; kernel flow-limit refusals per device (`service::alerts`) | `kind` (`auth-failures`, `flow-limit-storm`), `prefix` or `device`, `source`, `reason`, `count`, `window_s`, `threshold`, `suppressed` | the tunnel's reports: the first failure at once, the rest within 20 s | one per source per window; at most 10 per window in all |
//! | `suspicious-activity` (`auto-block`) | a source auto-blocked by the reputation engine (`service::reputation`) | `kind` `auto-block`, `source`, `list`, `score`, `threshold`, `parts` (per part: `count`, `points`), `ttl_s`, `until` | staged in the block's own batch: at the list change, within 250 ms of the crossing | exactly one per block; at most 4 096 blocks a second |
//! | `config-changed` | every audit record (`service::core`) | `actor`, `action`, `target`, `seq` | the commit | one per audit record |

use std::{net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::domain::{Protocol, ValidationError};

/// What happened. The wire names are the design's (`user-connect`, …) plus `quota-warning`
/// (80 % and 90 % of a quota) and `server-up` (recovery after `server-down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyKind {
    /// A device completed its first handshake after being disconnected (a session opened).
    UserConnect,
    /// A session ended (`data.reason`: idle, kicked, removed, agent-stopped).
    UserDisconnect,
    /// A quota reached 80 % or 90 % (`data.percent`).
    QuotaWarning,
    /// A quota is exhausted: the kernel drops the user's traffic from the next packet on.
    QuotaExceeded,
    /// A user's account expiry passed (reported once, even if the agent was down then).
    AccountExpired,
    /// A component of the server became unavailable (`data.component`, `data.detail`).
    ServerDown,
    /// A component recovered after `server-down`.
    ServerUp,
    /// Failed handshakes or unknown keys from one source over a threshold, or a flow-limit
    /// storm (`data.kind`).
    SuspiciousActivity,
    /// A configuration change (one per audit record: `data.actor`, `action`, `target`, `seq`).
    ConfigChanged,
    /// `capybara webhook test ID`: sent to that one endpoint only, whatever its events; not in
    /// [`NotifyKind::ALL`], so it cannot be subscribed to.
    #[serde(rename = "webhook.test")]
    WebhookTest,
}

impl NotifyKind {
    /// Every kind, in the order `webhook list` and the docs show them.
    pub const ALL: [NotifyKind; 9] = [
        NotifyKind::UserConnect,
        NotifyKind::UserDisconnect,
        NotifyKind::QuotaWarning,
        NotifyKind::QuotaExceeded,
        NotifyKind::AccountExpired,
        NotifyKind::ServerDown,
        NotifyKind::ServerUp,
        NotifyKind::SuspiciousActivity,
        NotifyKind::ConfigChanged,
    ];

    /// The wire name (`user-connect`).
    pub const fn as_str(self) -> &'static str {
        match self {
            NotifyKind::UserConnect => "user-connect",
            NotifyKind::UserDisconnect => "user-disconnect",
            NotifyKind::QuotaWarning => "quota-warning",
            NotifyKind::QuotaExceeded => "quota-exceeded",
            NotifyKind::AccountExpired => "account-expired",
            NotifyKind::ServerDown => "server-down",
            NotifyKind::ServerUp => "server-up",
            NotifyKind::SuspiciousActivity => "suspicious-activity",
            NotifyKind::ConfigChanged => "config-changed",
            NotifyKind::WebhookTest => "webhook.test",
        }
    }

    /// Parses a wire name; an unknown one names `field` and lists the known ones.
    pub fn parse(field: &'static str, s: &str) -> Result<NotifyKind, ValidationError> {
        NotifyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ValidationError::Value {
                field,
                reason: format!(
                    "unknown event {s:?} (expected one of {})",
                    NotifyKind::ALL.map(NotifyKind::as_str).join(", ")
                ),
            })
    }
}

impl std::fmt::Display for NotifyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event for webhooks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// What happened.
    pub kind: NotifyKind,
    /// When it happened (the source's time, not the delivery's).
    pub at: SystemTime,
    /// The user it is about, if any.
    pub user: Option<String>,
    /// The device's public source address (its endpoint's IP), if known.
    pub ip: Option<IpAddr>,
    /// The device's address inside the tunnel, if any.
    pub vpn_ip: Option<IpAddr>,
    /// The protocol (`wireguard`, `shadowsocks`, `vless`), for events about a device.
    pub protocol: Option<String>,
    /// The event's own fields (a JSON object; `null` for none).
    pub data: serde_json::Value,
}

impl Notification {
    /// A notification of `kind` now, with no user, addresses or data.
    pub fn new(kind: NotifyKind) -> Notification {
        Notification {
            kind,
            at: SystemTime::now(),
            user: None,
            ip: None,
            vpn_ip: None,
            protocol: None,
            data: serde_json::Value::Null,
        }
    }

    /// A notification of `kind` at `at` about a device of `user` connecting by `protocol`:
    /// its public address `ip` (if known) and its tunnel address `vpn_ip` (a WireGuard
    /// device's; none for a proxy protocol); `data` as given.
    pub fn device(
        kind: NotifyKind,
        at: SystemTime,
        user: &str,
        ip: Option<IpAddr>,
        vpn_ip: Option<IpAddr>,
        protocol: Protocol,
        data: serde_json::Value,
    ) -> Notification {
        Notification {
            kind,
            at,
            user: Some(user.to_owned()),
            ip,
            vpn_ip,
            protocol: Some(protocol.as_str().to_owned()),
            data,
        }
    }

    /// The JSON body a receiver gets, with the outbox's stable `id`.
    pub fn payload(&self, id: &str) -> serde_json::Value {
        let ts = chrono::DateTime::<chrono::Utc>::from(self.at)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        serde_json::json!({
            "id": id,
            "event": self.kind.as_str(),
            "timestamp": ts,
            "user": self.user,
            "ip": self.ip,
            "vpn_ip": self.vpn_ip,
            "protocol": self.protocol,
            "data": self.data,
        })
    }
}

/// What the outbox holds for one event: its stable id (the payload's `id` and the
/// `webhook-id` header, the same on every attempt, after a restart and on a `webhook retry`),
/// the one endpoint it is for if it is not for every subscriber (a test or a retry), and the
/// event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// `msg_` and 24 random hex digits.
    pub id: String,
    /// Only this endpoint (its id), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<String>,
    /// The event.
    pub event: Notification,
}

impl OutboxEvent {
    /// `n` with a new id, for every endpoint that subscribed to its kind.
    pub fn new(n: Notification) -> OutboxEvent {
        let r: [u8; 12] = rand::random();
        OutboxEvent {
            id: format!(
                "msg_{}",
                r.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            only: None,
            event: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_names_the_field() {
        for k in NotifyKind::ALL {
            assert_eq!(NotifyKind::parse("event", k.as_str()).unwrap(), k);
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        let e = NotifyKind::parse("event", "user-login").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("event: unknown event \"user-login\""),
            "{e}"
        );
    }

    #[test]
    fn payload_has_the_designs_fields() {
        let mut n = Notification::new(NotifyKind::UserConnect);
        n.at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_762_455_600_250);
        n.user = Some("alice".into());
        n.ip = Some("192.168.1.100".parse().unwrap());
        n.vpn_ip = Some("10.7.0.2".parse().unwrap());
        n.protocol = Some("wireguard".into());
        let p = n.payload("evt_1");
        assert_eq!(
            p,
            serde_json::json!({
                "id": "evt_1",
                "event": "user-connect",
                "timestamp": "2025-11-06T19:00:00.250Z",
                "user": "alice",
                "ip": "192.168.1.100",
                "vpn_ip": "10.7.0.2",
                "protocol": "wireguard",
                "data": null,
            })
        );
    }
}
