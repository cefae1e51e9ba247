//! The service's errors: [`ServiceError`] for every call (the API maps each variant to one gRPC
//! code) and [`AuthError`] for a refused bearer token or local caller.

use std::sync::Arc;

use super::{
    domain::{Scope, ValidationError},
    ports::TunnelPortError,
    secrets,
};
use crate::{dataplane::DataplaneError, store::StoreError};

/// Errors of the control service. The API maps each variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Input is invalid; nothing was changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The named object does not exist.
    #[error("{what} {name:?} not found")]
    NotFound {
        /// `user`, `device`, `token` or `list`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An object of that name exists already.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// `user` or `device`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The device's private key was not kept, so its config cannot be shown again.
    #[error(
        "the private key of {user}/{device} was shown once and not kept; use --rotate for a new \
         key pair (or run the agent with --keep-client-keys)"
    )]
    KeyNotKept {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// A user has several devices and none was named.
    #[error("device: {user} has {count} devices; name one")]
    DeviceRequired {
        /// The user.
        user: String,
        /// How many devices it has.
        count: usize,
    },
    /// The token was revoked already.
    #[error("token {id} is already revoked")]
    AlreadyRevoked {
        /// The token.
        id: String,
    },
    /// The tunnel subnet has no free address, or every peer id is in use.
    #[error("no free {what}")]
    Exhausted {
        /// `IPv4 address in <subnet>` or `peer id`.
        what: String,
    },
    /// The store failed; nothing was acknowledged.
    #[error("store")]
    Store(#[from] StoreError),
    /// The dataplane failed; the change was undone.
    #[error("dataplane")]
    Dataplane(#[from] DataplaneError),
    /// The tunnel failed; the change was undone.
    #[error(transparent)]
    Tunnel(#[from] TunnelPortError),
    /// A kept client key did not open.
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    /// The object is still used by others (a quota template applied to users).
    #[error("{what} {name:?} is applied to {users}; detach them first")]
    InUse {
        /// `quota template`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Who uses it, comma-separated.
        users: String,
    },
    /// A webhook is not in a state that allows the call (disabled, for `test` and `retry`).
    #[error("webhook {id} {reason}")]
    Webhook {
        /// The webhook's id.
        id: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A geo policy was asked for but the agent has no country database.
    #[error(
        "no country database: run `cargo xtask setup` (it installs one at {}, which the agent \
         opens at start) or start the agent with --geoip-db FILE (e.g. MaxMind's \
         GeoLite2-Country.mmdb)",
        crate::paths::GEOIP_DB
    )]
    NoGeoDb,
    /// A scheduled task is still running: a run of a task never overlaps another.
    #[error("schedule {id} is running; wait for its run to end (schedule history {id})")]
    TaskRunning {
        /// The task.
        id: u64,
    },
    /// Scheduled tasks cannot run here: the agent started without its scheduler.
    #[error("scheduled tasks are not available in this agent (it runs without its scheduler)")]
    NoScheduler,
    /// A list's or database's source could not be read now (a feed that is down, answers an
    /// error or times out; a category with no source yet); nothing was changed.
    #[error("{field}: {reason}")]
    SourceUnavailable {
        /// The field that named the source (`url`, `file`, `category`).
        field: &'static str,
        /// What happened.
        reason: String,
    },
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer …` header.
    #[error("missing bearer token")]
    Missing,
    /// The header is not a token of ours, or no token has that id and secret.
    #[error("invalid token")]
    Invalid,
    /// The token expired.
    #[error("token expired")]
    Expired,
    /// The token was revoked.
    #[error("token revoked")]
    Revoked,
    /// The token is restricted to one user and the call is not about that user alone (a list
    /// of every user, a server-wide setting, …).
    #[error(
        "this token is restricted to user {user}: it may only call what concerns that user (its record, devices, configs)"
    )]
    Restricted {
        /// The token's user.
        user: String,
    },
    /// The token is restricted to one user and the call is about another.
    #[error("this token is restricted to user {user}; {target} is another user")]
    OtherUser {
        /// The token's user.
        user: String,
        /// The user the call is about.
        target: String,
    },
    /// The token is valid but its scope is too small for the call.
    #[error("this call needs scope {need}; the token has {have}")]
    Scope {
        /// The token's scope.
        have: Scope,
        /// The call's scope.
        need: Scope,
    },
    /// A local connection from a uid other than 0.
    #[error("uid {uid} is not allowed on the control socket")]
    LocalUid {
        /// The peer's uid.
        uid: u32,
    },
    /// The store failed while looking the token up.
    #[error("token lookup failed")]
    Store(#[source] Arc<StoreError>),
}

/// `NotFound` for `what` named `name`.
pub(crate) fn not_found(what: &'static str, name: impl ToString) -> ServiceError {
    ServiceError::NotFound {
        what,
        name: name.to_string(),
    }
}
