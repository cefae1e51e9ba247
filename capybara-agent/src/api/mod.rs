//! The API layer: the only code that knows protobuf/tonic. Conversions between `capybara_proto`
//! and domain types live here (`From`/`TryFrom`), so the service layer speaks domain types only.
//!
//! - [`server`]: the gRPC services, authentication by peer credentials or bearer token, the
//!   health and reflection services, and `run(listeners, shutdown)`.
//! - [`client`]: the client the `capybara` CLI uses, answering in domain types.
//! - [`history`]: the History and Backup services, their client calls and conversions.
//! - [`policy`]: the `Policy` service (groups, quotas, limits, explain) and its client calls.
//! - [`templates`]: the `Templates` service (quota and configuration templates).
//! - `convert` (kernel types) and `domain` (control API types): the conversions.

pub mod client;
mod convert;
pub mod domain;
pub mod history;
pub mod policy;
pub mod server;
pub mod templates;

pub use convert::{
    ConvertError, counter_to_proto, drop_reason_from_proto, drop_reason_to_proto,
    peer_stats_to_proto,
};
pub use server::{ApiError, Listeners, TlsIdentity, bind_unix, run};
