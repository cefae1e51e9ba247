//! The Capybara agent library.
pub mod dataplane;
pub mod store;
pub mod api;
