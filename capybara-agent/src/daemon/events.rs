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

fn auth_reason(r: crate::tunnel::AuthFailure) -> &'static str {
    use crate::tunnel::AuthFailure;
    match r {
        AuthFailure::UnknownKey => "unknown-key",
        AuthFailure::BadMac => "bad-mac",
        AuthFailure::Undecryptable => "undecryptable",
        AuthFailure::Rejected => "rejected",
    }
}
