//! The API layer: the only code that knows protobuf/tonic. Conversions between `capybara_proto`
//! and domain types live here (`From`/`TryFrom`), so the service layer speaks domain types only.
//! One file per feature holds its gRPC services, its conversions and its client calls, like the
//! service layer's features:
//!
//! | file | services |
//! |---|---|
//! | [`users`] | `Users`, `Peers` |
//! | [`tokens`] | `Tokens` |
//! | [`monitor`] | `Stats`, `Connections` |
//! | [`live`] | `Stats.WatchStats` (live monitoring, streamed) |
//! | [`audit`] | `Audit` |
//! | [`lists`], [`geo`] | `Blocklists`; `Geo` |
//! | [`policy`], [`templates`] | `Policy`; `Templates` |
//! | [`history`], [`backup`] | `History`; `Backup` |
//! | [`health`] | the components' health in `grpc.health.v1` |
//! | [`schedules`] | `Schedules` (scheduled tasks); [`inproc`] is the in-process connection their commands call the API over |
//! | [`reports`] | `Reports` (usage reports over the rollups) |
//! | [`webhooks`] | `Webhooks` |
//! | [`mfa`] | `Mfa` (enrolment, status, require-all; the verification page is `service::verification`'s) |
//! | [`intel`] | `IpIntel` (IP intelligence: the switch, the tor/vpn sources, the allow list) |
//! | [`reputation`] | `Reputation` (a source's score explained, the auto-blocked sources) |
//! | [`cluster`] | `Cluster` (the nodes of an etcd cluster, etcd's members and the node's lease) |
//!
//! Beside them: [`server`] (who may call what, the router, the listeners, `run(listeners,
//! shutdown)`), [`handler`] (the [`handler::Api`] type every service is implemented on: auth and
//! the blocking call), [`status`] (service errors as gRPC codes), [`convert`] (the conversions
//! the features share), [`paging`] (the page tokens of the name-ordered list calls) and
//! [`client`] (the connection the `capybara` CLI uses).

pub mod access;
pub mod audit;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod convert;
pub mod geo;
pub mod handler;
pub mod health;
pub mod history;
pub mod inproc;
pub mod intel;
pub mod limits;
pub mod lists;
pub mod live;
pub mod mfa;
pub mod monitor;
mod paging;
pub mod policy;
pub mod reports;
pub mod reputation;
pub mod rest;
pub mod schedules;
pub mod server;
pub mod status;
pub mod templates;
pub mod tokens;
pub mod users;
pub mod webhooks;

#[cfg(test)]
mod tests;

pub use convert::{
    ConvertError, counter_to_proto, drop_reason_from_proto, drop_reason_to_proto,
    peer_stats_to_proto,
};
pub use server::{ApiError, Listeners, TlsIdentity, bind_unix, run};
