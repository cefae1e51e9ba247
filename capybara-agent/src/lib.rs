//! The Capybara agent library.
pub mod dataplane;
