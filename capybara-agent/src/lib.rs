//! The Capybara agent library.
pub mod api;
pub mod blocklist;
pub mod daemon;
pub mod dataplane;
pub mod geo;
pub mod net;
pub mod paths;
pub mod service;
pub mod store;
pub mod tunnel;
