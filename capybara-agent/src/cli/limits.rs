//! Limits as the CLI takes and shows them: the limit options shared by `quota set`, `quota
//! template create` and `group policy`, a layer of limits on one table cell, and a layer as a
//! FIELD/VALUE table.

use clap::Args;

use super::table::Table;
use crate::service::policy::model::{Limits, LimitsText};

/// The limit options shared by `quota set`, `quota template create` and `group policy`.
#[derive(Debug, Args)]
pub(super) struct LimitArgs {
    /// Rate each way per device, e.g. 10Mbps (or unlimited).
    #[arg(long)]
    bandwidth: Option<String>,
    /// Data budget per period, e.g. 100GB (or unlimited).
    #[arg(long)]
    limit: Option<String>,
    /// daily, weekly, monthly or none.
    #[arg(long)]
    period: Option<String>,
    /// Extra share over the budget before traffic stops, e.g. 5%.
    #[arg(long)]
    grace: Option<String>,
    /// Devices online at once (or unlimited).
    #[arg(long)]
    connections: Option<String>,
    /// Concurrent flows per device, 1 to 65536 (or unlimited).
    #[arg(long)]
    flows: Option<String>,
    /// Online time per day, e.g. 8h (or unlimited).
    #[arg(long)]
    time: Option<String>,
    /// Allowed hours, e.g. "Mon-Fri 08:00-18:00" (or unlimited).
    #[arg(long)]
    window: Option<String>,
    /// Time zone of the window, time and period, e.g. Europe/Berlin.
    #[arg(long)]
    tz: Option<String>,
    /// Unset a field (inherit it again); repeatable.
    #[arg(long, value_name = "FIELD")]
    clear: Vec<String>,
}

impl LimitArgs {
    /// The options as the API takes them (each still text; `LimitsText::parse` checks them).
    pub(super) fn text(&self) -> LimitsText {
        LimitsText {
            bandwidth: self.bandwidth.clone(),
            limit: self.limit.clone(),
            period: self.period.clone(),
            grace: self.grace.clone(),
            connections: self.connections.clone(),
            flows: self.flows.clone(),
            time: self.time.clone(),
            window: self.window.clone(),
            tz: self.tz.clone(),
            clear: self.clear.clone(),
        }
    }
}

/// A policy layer on one table cell (`-` when empty).
pub(super) fn limits_line(l: &Limits) -> String {
    l.summary().unwrap_or_else(|| "-".into())
}

/// A policy layer as a FIELD/VALUE table, one row per field it sets.
pub(super) fn limits_table(l: &Limits) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let v = serde_json::to_value(l).unwrap_or_default();
    for (k, v) in v.as_object().into_iter().flatten() {
        t.row(vec![k.clone(), v.as_str().unwrap_or_default().to_owned()]);
    }
    t
}
