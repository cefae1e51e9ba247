//! The service layer: operations that combine modules (geo + dataplane, store + dataplane +
//! tunnel), speaking domain types only. The API and the daemon call these; they never reach into
//! `dataplane` or `store` internals themselves.
//!
//! - [`domain`]: validated domain types (names, scopes, keys, records) and their parsers.
//! - [`secrets`]: WireGuard keys, token secrets and hashes, sealing of kept client keys.
//! - [`ports`]: the traits the service needs from the dataplane and the tunnel, with in-memory
//!   implementations for tests.
//! - [`control`]: the control [`Service`]: users, devices, tokens, stats, connections,
//!   blocklists, audit; `control::history`: sessions, auth attempts, retention.
//! - [`events`]: what the service did (`config-changed`), on a broadcast bus.
//! - [`geo`]: geo policies as source lists.
//! - [`policy`]: groups, quotas and limits: the effective policy per user and its kernel state.

pub mod control;
pub mod domain;
pub mod events;
pub mod geo;
pub mod policy;
pub mod ports;
pub mod secrets;

pub use control::history::{
    AuthAttempt, EndReason, HistoryPage, HistoryQuery, Pruned, Session, SessionEvent,
};
pub use control::{
    AuthError, BlocklistView, Connection, EntriesOp, GeoStatus, NewToken, NewUser, PeerCounters,
    PeerStatsView, Service, ServiceConfig, ServiceError, Stats, Traffic,
};
pub use events::ServiceEvent;
