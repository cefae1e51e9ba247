//! Empty library target: lets `capybara-agent` list this crate as a build-dependency so that
//! changes here rebuild the agent's embedded object. The programs are in `main.rs`.
#![no_std]
