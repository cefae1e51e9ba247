//! The deterministic parts of connect/disconnect tracking: each takes the time as an argument
//! and returns what happened, so tests drive them with made-up instants.
//!
//! - [`Liveness`]: one peer. *Connected* at the first completed handshake (or authenticated
//!   packet of a live session) after being disconnected (rekeys every two minutes are not new
//!   connections); *disconnected* once
//!   neither a handshake nor an authenticated packet (data or keepalive) arrived for the
//!   configured time (default [`DEFAULT_DISCONNECT_AFTER`], WireGuard's own REJECT_AFTER_TIME:
//!   past it the session keys are dead anyway), or at once when kicked or removed.
//!
//! Failed handshakes are counted per source prefix by `tunnel::auth_table`.

use std::time::{Duration, Instant};

/// Default time without a handshake or any authenticated packet after which a peer is
/// disconnected.
pub const DEFAULT_DISCONNECT_AFTER: Duration = Duration::from_secs(180);

/// One peer's connection state. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Whether the peer is connected (a Connected event was emitted and no Disconnected since).
    connected: bool,
    /// Last completed handshake or authenticated packet.
    last_seen: Option<Instant>,
}

impl Liveness {
    /// A completed handshake at `now`; true if this makes the peer connected (emit Connected).
    pub fn on_handshake(&mut self, now: Instant) -> bool {
        self.last_seen = Some(now);
        !std::mem::replace(&mut self.connected, true)
    }

    /// An authenticated packet (data or keepalive) at `now`; true if this makes the peer
    /// connected again: with a disconnect time shorter than a session's life (180 s), a peer
    /// can go quiet, be reported gone, and come back on the same session.
    pub fn on_traffic(&mut self, now: Instant) -> bool {
        self.last_seen = Some(now);
        !std::mem::replace(&mut self.connected, true)
    }

    /// Checks the timeout at `now`; true if the peer just went away (emit Disconnected).
    pub fn poll(&mut self, now: Instant, disconnect_after: Duration) -> bool {
        let expired = self
            .last_seen
            .is_none_or(|t| now.saturating_duration_since(t) >= disconnect_after);
        if self.connected && expired {
            self.connected = false;
            return true;
        }
        false
    }

    /// Ends the connection now (kick, removal); true if it was connected.
    pub fn end(&mut self) -> bool {
        self.last_seen = None;
        std::mem::replace(&mut self.connected, false)
    }

    /// Whether the peer is connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn connect_once_and_disconnect_after_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert!(!l.poll(t0, 180 * S), "never connected: nothing to report");
        assert!(l.on_handshake(t0), "first handshake connects");
        assert!(
            !l.on_handshake(t0 + 120 * S),
            "a rekey is not a new connection"
        );
        assert!(!l.on_traffic(t0 + 200 * S), "already connected");
        assert!(!l.poll(t0 + 379 * S, 180 * S), "traffic 179 s ago");
        assert!(l.poll(t0 + 380 * S, 180 * S), "180 s of silence");
        assert!(!l.poll(t0 + 381 * S, 180 * S), "reported once");
        assert!(!l.is_connected());
        assert!(
            l.on_handshake(t0 + 400 * S),
            "a new handshake is a new connection"
        );
    }

    #[test]
    fn the_timeout_is_configurable_and_end_is_immediate() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.on_handshake(t0);
        assert!(!l.poll(t0 + 4 * S, 5 * S));
        assert!(l.poll(t0 + 5 * S, 5 * S));
        assert!(
            l.on_traffic(t0 + 6 * S),
            "the live session's traffic reconnects"
        );
        assert!(!l.on_handshake(t0 + 7 * S));
        assert!(l.end(), "kick ends a connected peer");
        assert!(!l.end());
        assert!(!l.poll(t0 + 600 * S, 5 * S), "no second Disconnected");
    }
}
