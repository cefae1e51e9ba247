//! What the agent's metrics (`crate::metrics`) read that no other feature answers, in domain
//! types: the kernel's verdict counters (kernel events written and lost among them), the
//! tunnel's sessions online and handshakes, the users' quota standing; and the port through
//! which the API reports how long each call took ([`CallTimer`]), so every interface (gRPC,
//! REST) feeds the same latency histograms without knowing the metrics exist.
//!
//! Everything here is read when the metrics are scraped, never on the packet path: enforcement
//! does not depend on a scrape.

use std::sync::{Arc, OnceLock};

use super::{ServiceError, core::Core, monitor::Traffic, policy::Policy, ports::TunnelTelemetry};

/// Told how long each API call took. Called once per call on the serving task: it must be cheap
/// (a histogram observation).
pub trait CallTimer: Send + Sync {
    /// `route` (a gRPC method path or a REST route template, never a raw path with ids in it)
    /// answered `code` (the gRPC code name, or the HTTP status) after `seconds`.
    fn observe_call(&self, route: &str, code: &str, seconds: f64);
}

/// How many users stand where against their data quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaStanding {
    /// Users without a quota.
    pub unlimited: u64,
    /// Below [`QuotaStanding::WARNING_PERCENT`] of their budget.
    pub ok: u64,
    /// At or above [`QuotaStanding::WARNING_PERCENT`] and below 100 %.
    pub warning: u64,
    /// At or over their budget (`quota report --exceeding`).
    pub exceeded: u64,
}

impl QuotaStanding {
    /// The first quota warning level (the kernel warns at 80, 90 and 100 %).
    pub const WARNING_PERCENT: u64 = 80;

    /// Counts one user who used `used` of `limit` bytes (`limit` 0: no quota).
    pub fn count(&mut self, used: u64, limit: u64) {
        if limit == 0 {
            self.unlimited += 1;
        } else if used >= limit {
            self.exceeded += 1;
        } else if u128::from(used) * 100 >= u128::from(limit) * u128::from(Self::WARNING_PERCENT) {
            self.warning += 1;
        } else {
            self.ok += 1;
        }
    }
}

/// Users read per page by [`Telemetry::quota_standing`] (bounded memory for any user count).
const QUOTA_PAGE: usize = 1000;

/// The telemetry feature.
pub struct Telemetry {
    core: Arc<Core>,
    policy: Arc<Policy>,
    calls: OnceLock<Arc<dyn CallTimer>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("timed", &self.calls.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The feature over the shared core and the policy.
    pub fn new(core: Arc<Core>, policy: Arc<Policy>) -> Telemetry {
        Telemetry {
            core,
            policy,
            calls: OnceLock::new(),
        }
    }

    /// Reports every later API call to `timer`. Only the first timer set is kept; answers
    /// whether this one was.
    pub fn time_calls(&self, timer: Arc<dyn CallTimer>) -> bool {
        self.calls.set(timer).is_ok()
    }

    /// An API call to `route` answered `code` after `seconds` (see [`CallTimer`]); nothing
    /// happens without a timer.
    pub fn observe_call(&self, route: &str, code: &str, seconds: f64) {
        if let Some(t) = self.calls.get() {
            t.observe_call(route, code, seconds);
        }
    }

    /// The tunnel's sessions online and handshakes.
    pub fn tunnel(&self) -> TunnelTelemetry {
        self.core.tunnel.telemetry()
    }

    /// The kernel's global verdict counters by name (`events_lost` among them).
    pub fn verdicts(&self) -> Result<Vec<(&'static str, Traffic)>, ServiceError> {
        Ok(self
            .core
            .plane
            .verdicts()?
            .into_iter()
            .map(|(name, c)| (name, c.into()))
            .collect())
    }

    /// Every user's standing against its data quota, read a page of users at a time.
    pub fn quota_standing(&self) -> Result<QuotaStanding, ServiceError> {
        let mut standing = QuotaStanding::default();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self
                .policy
                .show_quota_page(after.as_deref(), QUOTA_PAGE, false)?;
            for st in &page {
                standing.count(st.used_bytes, st.limit_bytes);
            }
            match next {
                Some(n) => after = Some(n),
                None => return Ok(standing),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::QuotaStanding;

    #[test]
    fn standing_thresholds() {
        let mut s = QuotaStanding::default();
        for (used, limit) in [
            (5, 0),
            (0, 100),
            (79, 100),
            (80, 100),
            (99, 100),
            (100, 100),
        ] {
            s.count(used, limit);
        }
        s.count(u64::MAX, u64::MAX);
        s.count(u64::MAX - 1, u64::MAX);
        assert_eq!(
            s,
            QuotaStanding {
                unlimited: 1,
                ok: 2,
                warning: 3,
                exceeded: 2,
            }
        );
    }
}
