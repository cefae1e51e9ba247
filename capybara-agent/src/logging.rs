//! The agent's log filter, changeable at runtime: the `capybara-agent` binary installs the
//! subscriber here ([`install`]: `RUST_LOG`, else `info`) and a configuration template's
//! `log_level` replaces the filter ([`set_level`]) when the template is applied and when the
//! agent starts with one applied. Code that runs the agent in-process (tests) installs nothing,
//! and [`set_level`] then reports that it changed nothing.

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// The handle of the installed filter.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The level is not a filter directive.
    #[error("invalid log level {level:?}")]
    Level {
        /// The level.
        level: String,
        /// The parser's error.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The subscriber is gone.
    #[error("cannot change the log filter")]
    Reload(#[source] reload::Error),
}

/// Installs the global subscriber (`tracing_subscriber`'s formatted logs) with a reloadable filter:
/// `RUST_LOG`, else `info`.
pub fn install() {
    let (layer, handle) = reload::Layer::new(default_filter());
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer())
        .init();
    let _ = FILTER.set(handle);
}

fn default_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Replaces the filter with `level` (`info`, `debug`, …; `None`: back to `RUST_LOG`, else
/// `info`); `Ok(false)` when no subscriber was installed here (the agent runs in-process).
pub fn set_level(level: Option<&str>) -> Result<bool, LogError> {
    let Some(handle) = FILTER.get() else {
        return Ok(false);
    };
    let filter = match level {
        None => default_filter(),
        Some(l) => EnvFilter::try_new(l).map_err(|source| LogError::Level {
            level: l.to_owned(),
            source,
        })?,
    };
    handle.reload(filter).map_err(LogError::Reload)?;
    Ok(true)
}
