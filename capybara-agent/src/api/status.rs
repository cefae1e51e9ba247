//! Service errors as gRPC statuses: each `ServiceError` variant maps to one code
//! ([`status_of`]), each authentication failure to `UNAUTHENTICATED`, `PERMISSION_DENIED` or
//! `UNAVAILABLE` ([`auth_status`]). Internal failures are logged with their causes, not sent.

use tonic::Status;

use crate::{
    service::{AuthError, ServiceError, domain::ValidationError},
    store::{SharedError, StoreError},
};

/// The gRPC status of a service error.
pub fn status_of(e: ServiceError) -> Status {
    match &e {
        ServiceError::Invalid(v) => Status::invalid_argument(v.to_string()),
        ServiceError::DeviceRequired { .. } => Status::invalid_argument(e.to_string()),
        ServiceError::NotFound { .. } => Status::not_found(e.to_string()),
        ServiceError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        ServiceError::KeyNotKept { .. }
        | ServiceError::AlreadyRevoked { .. }
        | ServiceError::InUse { .. }
        | ServiceError::NoGeoDb
        | ServiceError::TaskRunning { .. }
        | ServiceError::NoScheduler
        | ServiceError::SourceUnavailable { .. }
        | ServiceError::Webhook { .. } => Status::failed_precondition(e.to_string()),
        ServiceError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        // The cluster refused a change of shared records: its own words, nothing to hide.
        ServiceError::Store(StoreError::Shared(s)) => match s {
            SharedError::Unavailable(_) => Status::unavailable(s.to_string()),
            SharedError::Conflict { .. } => Status::aborted(s.to_string()),
            SharedError::Refused(_) => Status::failed_precondition(s.to_string()),
        },
        ServiceError::Store(_)
        | ServiceError::Dataplane(_)
        | ServiceError::Tunnel(_)
        | ServiceError::Secret(_) => {
            tracing::error!(error = %ErrorChain(&e), "API call failed");
            Status::internal(format!("{e}; see the agent's log"))
        }
    }
}

/// The gRPC status of an authentication failure.
pub fn auth_status(e: &AuthError) -> Status {
    match e {
        AuthError::Scope { .. } | AuthError::Restricted { .. } | AuthError::OtherUser { .. } => {
            Status::permission_denied(e.to_string())
        }
        AuthError::Store(source) => {
            tracing::error!(error = %ErrorChain(source.as_ref()), "token lookup failed");
            Status::unavailable(e.to_string())
        }
        AuthError::Missing
        | AuthError::Invalid
        | AuthError::Expired
        | AuthError::Revoked
        | AuthError::LocalUid { .. } => Status::unauthenticated(e.to_string()),
    }
}

pub(super) fn invalid(e: ValidationError) -> Status {
    status_of(ServiceError::Invalid(e))
}

/// Displays an error with its sources.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

/// An error with its sources, `a: b: c`.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    ErrorChain(e).to_string()
}
