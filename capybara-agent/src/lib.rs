//! The Capybara agent library.
pub mod api;
pub mod dataplane;
pub mod store;
