//! The service layer: operations that combine modules (geo + dataplane, store + dataplane),
//! speaking domain types only. The API and the daemon call these; they never reach into
//! `dataplane` or `store` internals themselves.

pub mod geo;
