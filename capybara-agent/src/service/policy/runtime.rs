//! What the policy knows only while running: the devices online and since when, the gate it
//! last decided per device, and each user's online time on its local day (restored from the
//! store at start, written back by the tick; see the module docs of `policy`).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime},
};

use capybara_common::peer::PeerId;
use chrono::NaiveDate;

use super::{
    records::{DAY_FORMAT, ONLINE_SAVE_EVERY, OnlineRecord},
    resolve::Effective,
};
use crate::{
    dataplane::Gate,
    service::{directory::Line, domain::UserName},
    store::{Cf, Store, StoreError, keys},
};

/// What is known only while running: devices online, gates written, online time.
#[derive(Debug, Default)]
pub(super) struct Runtime {
    /// Online devices and since when.
    pub(super) online: HashMap<PeerId, SystemTime>,
    /// The policy's last decision per device (the rules' and the account expiry's, see
    /// `engine::decide`), reconciled with the kernel's gate; absent: not yet (the kernel's gate
    /// is read before anything is written).
    pub(super) written: HashMap<PeerId, Gate>,
    /// Each user's account expiry (users without one are absent); kept from the store's user
    /// records at start and by every change of a user's expiry.
    pub(super) expires: HashMap<UserName, SystemTime>,
    /// Users whose expiry has passed and whose gates the tick has decided since (see
    /// `Policy::tick`); a change of the expiry takes the user out.
    pub(super) expired_seen: HashSet<UserName>,
    /// Online time per user on its local day.
    pub(super) online_time: HashMap<UserName, (NaiveDate, Duration)>,
    /// The online time last written to the store per user.
    pub(super) saved: HashMap<UserName, (NaiveDate, Duration)>,
    /// The previous tick.
    pub(super) last_tick: Option<SystemTime>,
    /// Users whose devices need an MFA admission (MFA on, or required by `mfa require-all` or a
    /// reset); kept by `service::mfa` (`Policy::set_mfa`).
    pub(super) mfa_users: HashSet<UserName>,
    /// `mfa require-all`: every user's devices need an MFA admission.
    pub(super) mfa_all: bool,
    /// The MFA admission of a device's current session: until when (the MFA lifetime). Ended
    /// by the session's end (disconnect, kick), by the tick once passed, and by MFA turned off.
    pub(super) mfa_admitted: HashMap<PeerId, SystemTime>,
}

impl Runtime {
    /// The online time kept in the store (a record with a bad day is logged and ignored).
    pub(super) fn load(store: &Store) -> Result<Runtime, StoreError> {
        let mut runtime = Runtime::default();
        for (key, r) in store.scan::<OnlineRecord>(Cf::Policy, keys::POLICY_ONLINE)? {
            match NaiveDate::parse_from_str(&r.day, DAY_FORMAT) {
                Ok(day) => {
                    let t = (day, Duration::from_secs(r.secs));
                    runtime.online_time.insert(r.user.clone(), t);
                    runtime.saved.insert(r.user, t);
                }
                Err(e) => {
                    tracing::warn!(key, day = r.day, error = %e, "online time with a bad day ignored")
                }
            }
        }
        Ok(runtime)
    }

    /// The clock moved to `now`: the time since the previous tick, at most a minute (a long
    /// pause, a suspend or a stopped clock, is not online time).
    pub(super) fn advance(&mut self, now: SystemTime) -> Duration {
        let d = self
            .last_tick
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        self.last_tick = Some(now);
        d
    }

    /// Counts `elapsed` as `user`'s online time on `today` if one of its `lines` (devices and
    /// proxy identities) is online and admitted (a new day starts at zero).
    pub(super) fn count(
        &mut self,
        user: &UserName,
        lines: &[Line],
        today: NaiveDate,
        elapsed: Duration,
    ) {
        let online = lines.iter().any(|l| {
            self.online.contains_key(&l.id)
                && !matches!(self.written.get(&l.id), Some(Gate::Held(_)))
        });
        let entry = self
            .online_time
            .entry(user.clone())
            .or_insert((today, Duration::ZERO));
        if entry.0 != today {
            *entry = (today, Duration::ZERO);
        }
        if online {
            entry.1 += elapsed;
        }
    }

    /// `user`'s online time on `today`.
    pub(super) fn used(&self, user: &UserName, today: NaiveDate) -> Duration {
        self.online_time
            .get(user)
            .filter(|(d, _)| *d == today)
            .map_or(Duration::ZERO, |(_, t)| *t)
    }

    /// The online time to write of the users in `timed` with a daily time: grown by
    /// [`ONLINE_SAVE_EVERY`] since it was last written, or at the limit.
    pub(super) fn due_saves(
        &self,
        timed: &[(UserName, Effective)],
    ) -> Vec<(UserName, (NaiveDate, Duration))> {
        timed
            .iter()
            .filter_map(|(u, e)| {
                let limit = e.time.value?.0;
                let t = *self.online_time.get(u)?;
                let saved = self
                    .saved
                    .get(u)
                    .filter(|(day, _)| *day == t.0)
                    .map_or(Duration::ZERO, |(_, d)| *d);
                let due = t.1 >= saved + ONLINE_SAVE_EVERY || (t.1 >= limit && t.1 > saved);
                due.then(|| (u.clone(), t))
            })
            .collect()
    }

    /// Whether `user`'s devices need an MFA admission.
    pub(super) fn mfa_on(&self, user: &UserName) -> bool {
        self.mfa_all || self.mfa_users.contains(user)
    }

    /// A removed user's time.
    pub(super) fn forget_user(&mut self, user: &UserName) {
        self.online_time.remove(user);
        self.saved.remove(user);
        self.expires.remove(user);
        self.expired_seen.remove(user);
        self.mfa_users.remove(user);
    }
}
