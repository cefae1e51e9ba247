//! The daemon's event plumbing: kernel events decoded from the ring buffer onto a broadcast bus,
//! and the tunnel's events handed to the service (handshakes admit, disconnects free device-limit
//! slots) and, as session events, to the history recorder.

use std::sync::Arc;

use crate::{
    dataplane::{Event, EventStream},
    service::{EndReason, Service, SessionEvent},
};

/// Reads kernel events until the stream fails, logging each and publishing it to subscribers.
pub(super) async fn publish_events(
    mut stream: EventStream,
    bus: tokio::sync::broadcast::Sender<Event>,
) {
    loop {
        match stream.next().await {
            Ok(event) => {
                tracing::debug!(?event, "kernel event");
                // No subscriber is not an error: the event is logged above.
                let _ = bus.send(event);
            }
            Err(e) => {
                tracing::error!(error = %e, "kernel event stream failed; events are no longer read");
                return;
            }
        }
    }
}

/// Tells the service about completed handshakes (a kicked device is admitted again by its next
/// one) and hands every event to the session recorder.
pub(super) async fn forward_handshakes(
    mut events: tokio::sync::broadcast::Receiver<crate::tunnel::TunnelEvent>,
    svc: Arc<Service>,
    sessions: crate::service::history::RecorderSender,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(ev) => {
                match &ev {
                    crate::tunnel::TunnelEvent::Connected { public_key, .. } => {
                        let key = crate::service::domain::PublicKey(*public_key.as_bytes());
                        if let Err(e) = svc.monitor.on_handshake(&key) {
                            tracing::warn!(error = %e, "cannot admit a peer after its handshake");
                        }
                    }
                    crate::tunnel::TunnelEvent::Disconnected { public_key, at, .. } => {
                        let key = crate::service::domain::PublicKey(*public_key.as_bytes());
                        if let Err(e) = svc.policy.on_disconnect(&key, *at) {
                            tracing::warn!(
                                error = %e,
                                "cannot update the device limit after a disconnect"
                            );
                        }
                    }
                    _ => {}
                }
                // The recorder ends only after this task: a send cannot fail before. An auth
                // report that finds the recorder's bounded queue full is dropped and counted.
                let _ = sessions.send(session_event(ev));
            }
            Err(RecvError::Lagged(n)) => tracing::warn!(n, "tunnel events lost"),
            Err(RecvError::Closed) => break,
        }
    }
}

/// A tunnel event in the service's terms.
fn session_event(ev: crate::tunnel::TunnelEvent) -> SessionEvent {
    use crate::tunnel::{DisconnectReason, TunnelEvent};
    let key = |k: crate::tunnel::PublicKey| crate::service::domain::PublicKey(*k.as_bytes());
    match ev {
        TunnelEvent::Connected {
            public_key,
            endpoint,
            at,
        } => SessionEvent::Connected {
            key: key(public_key),
            endpoint,
            at,
        },
        TunnelEvent::Disconnected {
            public_key,
            reason,
            at,
        } => SessionEvent::Disconnected {
            key: key(public_key),
            reason: match reason {
                DisconnectReason::Timeout => EndReason::Idle,
                DisconnectReason::Kicked => EndReason::Kicked,
                DisconnectReason::Removed => EndReason::Removed,
            },
            at,
        },
        TunnelEvent::EndpointChanged { public_key, to, .. } => SessionEvent::EndpointChanged {
            key: key(public_key),
            to,
            at: std::time::SystemTime::now(),
        },
        TunnelEvent::AuthFailed {
            source,
            public_key,
            reason,
        } => SessionEvent::AuthFailed {
            source,
            key: public_key.map(key),
            reason: auth_reason(reason),
            at: std::time::SystemTime::now(),
        },
        TunnelEvent::AuthFailures(r) => SessionEvent::AuthFailures {
            prefix: r.prefix,
            sample: r.sample,
            key: r.public_key.map(key),
            reason: auth_reason(r.reason),
            count: r.count,
            first: r.first_seen,
            last: r.last_seen,
        },
    }
}

/// The proxy endpoints' reports, handed to the session recorder as session events.
pub(super) struct ProxyEvents {
    /// The recorder's queues.
    pub sessions: crate::service::history::RecorderSender,
    /// The identities' kernel counters, read as a connection opens.
    pub history: Arc<crate::service::history::History>,
    /// Scores the sources of refused connections (`proxy-auth`).
    pub reputation: Arc<crate::service::reputation::Reputation>,
}

impl crate::proxy::Events for ProxyEvents {
    fn report(&self, event: crate::proxy::ProxyEvent) {
        use crate::proxy::{AuthFailure, ProxyEvent};
        // A wrong credential or a header that is not the protocol's counts against its source
        // (a held user's connection does not: it is a user's).
        if let ProxyEvent::AuthFailed {
            source,
            reason: AuthFailure::UnknownCredential | AuthFailure::Malformed,
            ..
        } = &event
        {
            self.reputation
                .on_event(source.ip(), crate::service::reputation::Part::ProxyAuth);
        }
        // The recorder ends after the endpoints; an auth report that finds its bounded queue
        // full is dropped and counted, as the tunnel's are.
        let _ = self
            .sessions
            .send(proxy_session_event(event, &self.history));
    }
}

/// A proxy endpoint's event in the service's terms.
/// An `Opened` reads the identity's counters here, synchronously: the endpoint reports it before
/// it connects upstream, so the session's base holds none of the connection's bytes.
fn proxy_session_event(
    ev: crate::proxy::ProxyEvent,
    history: &crate::service::history::History,
) -> SessionEvent {
    use crate::proxy::{AuthFailure, ProxyEvent};
    match ev {
        ProxyEvent::Opened {
            identity,
            source,
            at,
            ..
        } => SessionEvent::ProxyOpened {
            id: identity.id,
            user: identity.user.to_string(),
            protocol: identity.protocol,
            source,
            base: history.counters(identity.id).unwrap_or_else(|e| {
                tracing::error!(error = %e, peer = identity.id, "cannot read a proxy identity's counters: its session counts from zero");
                Default::default()
            }),
            at,
        },
        ProxyEvent::Closed { identity, at, .. } => SessionEvent::ProxyClosed {
            id: identity.id,
            at,
        },
        ProxyEvent::AuthFailed {
            protocol,
            source,
            reason,
            at,
        } => SessionEvent::ProxyAuthFailed {
            protocol,
            source,
            reason: match reason {
                AuthFailure::UnknownCredential => "unknown-credential",
                AuthFailure::Malformed => "malformed",
                AuthFailure::Held => "held",
            },
            at,
        },
    }
}

fn auth_reason(r: crate::tunnel::AuthFailure) -> &'static str {
    use crate::tunnel::AuthFailure;
    match r {
        AuthFailure::UnknownKey => "unknown-key",
        AuthFailure::BadMac => "bad-mac",
        AuthFailure::Undecryptable => "undecryptable",
        AuthFailure::Rejected => "rejected",
    }
}

/// Feeds the alerts thread (`service::alerts`) without ever waiting on it: quota thresholds and
/// flow-limit refusals from the kernel event bus, failed handshakes from the tunnel, and a
/// nudge to look at the expiries after every configuration change (or a lost event). A full
/// alerts queue drops the input and counts it; a lagging receiver here loses the oldest events
/// and logs how many. Ends when the kernel or the tunnel bus closes.
pub(super) async fn forward_alerts(
    mut kernel: tokio::sync::broadcast::Receiver<Event>,
    mut tunnel: tokio::sync::broadcast::Receiver<crate::tunnel::TunnelEvent>,
    mut service: tokio::sync::broadcast::Receiver<crate::service::ServiceEvent>,
    alerts: crate::service::alerts::AlertSender,
) {
    use tokio::sync::broadcast::error::RecvError;

    use crate::service::{ServiceEvent, alerts::AlertInput};
    loop {
        let input = tokio::select! {
            ev = kernel.recv() => match ev {
                Ok(ev) => kernel_alert(&ev),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(n, "kernel events lost by the alerts feed");
                    None
                }
                Err(RecvError::Closed) => break,
            },
            ev = tunnel.recv() => match ev {
                Ok(ev) => tunnel_alert(ev),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(n, "tunnel events lost by the alerts feed");
                    None
                }
                Err(RecvError::Closed) => break,
            },
            ev = service.recv() => match ev {
                Ok(ServiceEvent::ConfigChanged { .. }) | Err(RecvError::Lagged(_)) => {
                    Some(AlertInput::Recheck)
                }
                Ok(_) => None,
                Err(RecvError::Closed) => break,
            },
        };
        if let Some(input) = input
            && !alerts.send(input)
        {
            break;
        }
    }
}

/// The alert input of a kernel event, if it is one.
fn kernel_alert(ev: &Event) -> Option<crate::service::alerts::AlertInput> {
    use crate::service::alerts::{AlertInput, QuotaReached};
    match *ev {
        Event::Quota {
            bucket,
            threshold,
            used,
            limit,
            epoch,
            peer,
            at,
        } => Some(AlertInput::Quota(QuotaReached {
            bucket,
            percent: threshold.percent(),
            used,
            limit,
            epoch,
            peer,
            at,
        })),
        // A full flow table (all peers together) is no storm of one device.
        Event::FlowLimit {
            peer,
            limit,
            table_full: false,
            at,
            ..
        } => Some(AlertInput::FlowLimit { peer, limit, at }),
        _ => None,
    }
}

/// The alert input of a tunnel event: failed handshakes, counted per prefix.
fn tunnel_alert(ev: crate::tunnel::TunnelEvent) -> Option<crate::service::alerts::AlertInput> {
    use crate::{service::alerts::AlertInput, tunnel::TunnelEvent};
    match ev {
        TunnelEvent::AuthFailed { source, reason, .. } => Some(AlertInput::AuthFailures {
            prefix: crate::service::history::prefix_of(source.ip())?,
            sample: source,
            reason: auth_reason(reason),
            count: 1,
            at: std::time::SystemTime::now(),
        }),
        TunnelEvent::AuthFailures(r) => Some(AlertInput::AuthFailures {
            prefix: r.prefix,
            sample: r.sample,
            reason: auth_reason(r.reason),
            count: r.count,
            at: r.last_seen,
        }),
        _ => None,
    }
}

/// The health watcher: every `interval` checks the components off the reactor and reports
/// each transition (`server-down`, `server-up`; see `service::health`). Ends with the service.
pub(super) async fn watch_health(svc: std::sync::Weak<Service>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(svc) = svc.upgrade() else { break };
        if tokio::task::spawn_blocking(move || svc.health.check_and_report())
            .await
            .is_err()
        {
            tracing::error!("the health check panicked");
        }
    }
}

/// The reputation part of a failed handshake.
pub(super) fn reputation_part(r: crate::tunnel::AuthFailure) -> crate::service::reputation::Part {
    use crate::{service::reputation::Part, tunnel::AuthFailure};
    match r {
        AuthFailure::UnknownKey => Part::UnknownKey,
        AuthFailure::BadMac => Part::BadMac,
        AuthFailure::Undecryptable => Part::Undecryptable,
        AuthFailure::Rejected => Part::Replay,
    }
}

/// Feeds the reputation engine the kernel's flow-limit refusals (of one device, not a full
/// table) and gate drops, as events of the devices' endpoints; the engine resolves the
/// endpoint on its own thread, so this never waits. Ends when the kernel bus closes.
pub(super) async fn forward_reputation(
    mut kernel: tokio::sync::broadcast::Receiver<Event>,
    rep: Arc<crate::service::reputation::Reputation>,
) {
    use tokio::sync::broadcast::error::RecvError;

    use crate::service::reputation::Part;
    loop {
        match kernel.recv().await {
            Ok(Event::FlowLimit {
                peer,
                table_full: false,
                ..
            }) => rep.on_peer_event(peer, Part::FlowLimit),
            Ok(Event::GateDrop { peer, .. }) => rep.on_peer_event(peer, Part::GateDrop),
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(n, "kernel events lost by the reputation feed");
            }
            Err(RecvError::Closed) => break,
        }
    }
}
