//! The agent's runtime log filter (`capybara_agent::logging`): a configuration template's level
//! replaces the filter, and without one the filter is `RUST_LOG` again. The test installs the
//! process's global subscriber, so it is the only test of the `it` binary that calls
//! `logging::install` (nextest runs each test in a process of its own; `cargo test` runs them
//! all in one, where a subscriber installed earlier would fail its first assertion).

use capybara_agent::logging;
use tracing::Level;

#[test]
fn the_log_level_changes_at_runtime() {
    assert!(
        !logging::set_level(Some("debug")).unwrap(),
        "nothing installed yet: no change"
    );
    logging::install();
    assert!(tracing::enabled!(Level::INFO));
    logging::set_level(Some("debug")).unwrap();
    assert!(tracing::enabled!(Level::DEBUG));
    logging::set_level(Some("error")).unwrap();
    assert!(!tracing::enabled!(Level::WARN));
    assert!(tracing::enabled!(Level::ERROR));
    logging::set_level(None).unwrap();
    assert_eq!(
        tracing::enabled!(Level::DEBUG),
        std::env::var("RUST_LOG").is_ok_and(|v| v.contains("debug") || v.contains("trace")),
        "back to RUST_LOG (else info)"
    );
    assert!(logging::set_level(Some("capybara=loud")).is_err());
}
