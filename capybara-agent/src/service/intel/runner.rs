//! The reload schedule of IP intelligence's sources: one tokio task that sleeps until the next
//! reload is due (or a file check, every [`FILE_CHECK`] while a file source is enforced, or a
//! settings change wakes it) and runs each reload on the blocking pool, one at a time.

use std::{sync::Arc, time::Instant};

use super::{Category, FILE_CHECK, FileSig, Intel, Source};
use crate::service::domain::Actor;

impl Intel {
    /// The categories due for a reload at `now`: enforced, with a source, and either their
    /// scheduled time has come or their file changed since it was last read.
    pub fn due(&self, now: Instant) -> Vec<Category> {
        let settings = self.settings();
        let rt = self.runtime.lock().unwrap();
        Category::ALL
            .into_iter()
            .filter(|&c| {
                let cs = settings.category(c);
                if !settings.enforced(c) {
                    return false;
                }
                let r = &rt[c.index()];
                match &cs.source {
                    None => false,
                    Some(Source::File(p)) => {
                        r.due.is_some_and(|d| d <= now) || FileSig::of(p) != r.file_sig
                    }
                    Some(Source::Url(_)) => r.due.is_some_and(|d| d <= now),
                }
            })
            .collect()
    }

    /// When the runner must look again.
    fn next_wake(&self, now: Instant) -> Instant {
        let settings = self.settings();
        let rt = self.runtime.lock().unwrap();
        let mut next = now + std::time::Duration::from_secs(3600);
        for c in Category::ALL {
            let cs = settings.category(c);
            if !settings.enforced(c) || cs.source.is_none() {
                continue;
            }
            if let Some(d) = rt[c.index()].due {
                next = next.min(d);
            }
            if matches!(cs.source, Some(Source::File(_))) {
                next = next.min(now + FILE_CHECK);
            }
        }
        next.max(now)
    }
}

/// Runs the reload schedule until the feature is dropped (the task holds it only while it
/// works, so a stopped agent's store closes) or the runtime ends.
pub fn spawn(intel: &Arc<Intel>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(intel);
    tokio::spawn(async move {
        loop {
            let Some(intel) = weak.upgrade() else { return };
            let now = Instant::now();
            for c in intel.due(now) {
                let i = intel.clone();
                // Errors are kept for `ip-intel list` and logged by `refresh`.
                let _ = tokio::task::spawn_blocking(move || {
                    if i.refresh(&Actor::Agent, c).is_ok() {
                        tracing::debug!(list = c.name(), "IP intelligence list reloaded");
                    }
                    let _ = i.core.settle();
                })
                .await;
            }
            let next = intel
                .next_wake(Instant::now())
                .min(Instant::now() + FILE_CHECK * 5);
            // `notify_one` keeps a permit when nobody waits: a change made before the wait
            // still wakes it.
            let wake = intel.wake.clone();
            drop(intel);
            tokio::select! {
                () = tokio::time::sleep_until(next.into()) => {}
                () = wake.notified() => {}
            }
        }
    })
}
