//! What the tunnel reports to its subscribers
//! ([`WgTunnel::subscribe`](crate::tunnel::WgTunnel::subscribe)): [`TunnelEvent`], with why a
//! peer went away ([`DisconnectReason`]) and why a handshake failed ([`AuthFailure`], counted
//! per prefix in [`AuthReport`]s).

use std::{net::SocketAddr, time::SystemTime};

pub use super::auth_table::AuthReport;
use super::keys::PublicKey;

/// Why a peer was reported disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// No handshake and no traffic for the configured time.
    Timeout,
    /// Kicked through [`WgTunnel::kick`](crate::tunnel::WgTunnel::kick).
    Kicked,
    /// Removed through [`WgTunnel::remove_peer`](crate::tunnel::WgTunnel::remove_peer).
    Removed,
}

/// Why a handshake attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// A well-formed initiation (right server key) from a key that is no peer.
    UnknownKey,
    /// A handshake whose MAC does not match our public key (wrong server key or garbage).
    BadMac,
    /// An initiation whose static key could not be decrypted.
    Undecryptable,
    /// A peer's handshake that its session refused (replayed timestamp, wrong preshared key…).
    Rejected,
}

/// What the tunnel reports. Subscribe with
/// [`WgTunnel::subscribe`](crate::tunnel::WgTunnel::subscribe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEvent {
    /// A peer completed a handshake after being disconnected.
    Connected {
        /// The peer.
        public_key: PublicKey,
        /// Where it connected from.
        endpoint: SocketAddr,
        /// When.
        at: SystemTime,
    },
    /// A connected peer went away.
    Disconnected {
        /// The peer.
        public_key: PublicKey,
        /// Why.
        reason: DisconnectReason,
        /// When it was noticed.
        at: SystemTime,
    },
    /// A connected peer's packets now come from another address (roaming, NAT rebinding).
    EndpointChanged {
        /// The peer.
        public_key: PublicKey,
        /// The previous endpoint.
        from: SocketAddr,
        /// The new endpoint.
        to: SocketAddr,
    },
    /// The first failed handshake from a source prefix (/24, /64) in an interval, reported at
    /// once (at most `auth_table::IMMEDIATE` per 10 s; the rest are counted, see
    /// [`TunnelEvent::AuthFailures`]).
    AuthFailed {
        /// Where the attempt came from.
        source: SocketAddr,
        /// The key it claimed, when it could be read.
        public_key: Option<PublicKey>,
        /// Why it failed.
        reason: AuthFailure,
    },
    /// Failed handshakes of one prefix (or of the prefixes not reported one by one) counted
    /// since its last report: at most 24 such events per 10 s, whatever the flood (see
    /// `tunnel::auth_table`).
    AuthFailures(AuthReport),
}
