//! Scheduled tasks, wired: the runner (`service::schedules::runner`) on the system clock, and
//! the commands it runs through the `capybara` CLI's own code in-process
//! (`cli::scheduled`) over an in-memory connection to this agent's API (`api::inproc`). The
//! service layer knows neither the CLI nor the API: it is handed them as its `Commands` port.
//!
//! [`start`] is called by the daemon (and by in-process test agents) before the API serves; the
//! returned [`Incoming`] goes into `api::Listeners::in_process`, whose shutdown also stops the
//! runner (`Schedules::join_runner` waits for it: the daemon does before it shuts the dataplane
//! down).

use std::sync::Arc;

use crate::{
    api::inproc::{self, Incoming},
    service::{Service, schedules::runner},
};

/// Hands the service its command runner and starts the runner task; the connections the API
/// must serve for the tasks' commands.
pub fn start(svc: &Arc<Service>) -> Incoming {
    let (connector, incoming) = inproc::channel();
    svc.schedules
        .set_commands(Arc::new(crate::cli::scheduled::InAgent::new(connector)));
    svc.schedules
        .set_runner(tokio::spawn(runner::run(svc.schedules.clone())));
    incoming
}

#[cfg(test)]
mod tests;
