//! The Capybara agent library.
pub mod api;
pub mod dataplane;
pub mod geo;
pub mod store;
