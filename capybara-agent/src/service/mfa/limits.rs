//! Failed codes, limited per device and per user; both are pure functions of the time given
//! (tests drive them with their own clock).
//!
//! - per device: [`DEVICE_RULE`] (5 failures within 5 min);
//! - per user (all its devices): [`USER_RULE`] (10 failures within 15 min);
//!
//! then the device (or every device of the user) is locked for `--mfa-lock` (default
//! [`DEFAULT_LOCK`], 15 min): no code is checked, right or wrong, until it ends. A lock's end
//! forgets the failures before it. A good code forgets the device's failures (not the user's:
//! one device cannot launder another's guesses). The lock that starts is reported once
//! ([`Failure::newly_locked`]: the caller raises `suspicious-activity` then, so at most once
//! per lock). State is in memory: a restart forgets failures and locks (it also ends every
//! session, so nothing is admitted by it).

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, SystemTime},
};

use capybara_common::peer::PeerId;

use crate::service::domain::UserName;

/// At most `max` failures within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Failures allowed within the window; the next one locks.
    pub max: u32,
    /// The window.
    pub window: Duration,
}

/// Per device.
pub const DEVICE_RULE: Rule = Rule {
    max: 5,
    window: Duration::from_secs(5 * 60),
};
/// Per user.
pub const USER_RULE: Rule = Rule {
    max: 10,
    window: Duration::from_secs(15 * 60),
};
/// How long a lock lasts by default (`--mfa-lock`).
pub const DEFAULT_LOCK: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Default)]
struct Track {
    fails: VecDeque<SystemTime>,
    locked_until: Option<SystemTime>,
}

impl Track {
    /// Drops failures out of the window and a lock that ended (with the failures before it).
    fn settle(&mut self, rule: Rule, now: SystemTime) {
        if self.locked_until.is_some_and(|t| t <= now) {
            self.locked_until = None;
            self.fails.clear();
        }
        while self
            .fails
            .front()
            .is_some_and(|t| now.duration_since(*t).unwrap_or_default() >= rule.window)
        {
            self.fails.pop_front();
        }
    }

    fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.locked_until
            .and_then(|t| t.duration_since(now).ok())
            .filter(|d| !d.is_zero())
    }
}

/// What a failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Failures left before a lock (the fewer of the device's and the user's).
    pub attempts_left: u32,
    /// Locked now for this long.
    pub locked: Option<Duration>,
    /// This failure started the lock.
    pub newly_locked: bool,
}

/// The failure tracks of devices and users.
#[derive(Debug)]
pub struct Limiter {
    lock: Duration,
    devices: HashMap<PeerId, Track>,
    users: HashMap<UserName, Track>,
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::new(DEFAULT_LOCK)
    }
}

fn settle_all<K: Eq + Hash>(map: &mut HashMap<K, Track>, rule: Rule, now: SystemTime) {
    map.retain(|_, t| {
        t.settle(rule, now);
        !t.fails.is_empty() || t.locked_until.is_some()
    });
}

impl Limiter {
    /// Locks last `lock`.
    pub fn new(lock: Duration) -> Limiter {
        Limiter {
            lock,
            devices: HashMap::new(),
            users: HashMap::new(),
        }
    }

    /// Sets how long a lock lasts (locks already started keep their end).
    pub fn set_lock(&mut self, lock: Duration) {
        self.lock = lock;
    }

    /// How long the device (or its user) is still locked, if it is.
    pub fn locked(&mut self, peer: PeerId, user: &UserName, now: SystemTime) -> Option<Duration> {
        settle_all(&mut self.devices, DEVICE_RULE, now);
        settle_all(&mut self.users, USER_RULE, now);
        let d = self.devices.get(&peer).and_then(|t| t.remaining(now));
        let u = self.users.get(user).and_then(|t| t.remaining(now));
        d.max(u)
    }

    /// Counts a failed code of `peer` (of `user`) at `now`.
    pub fn fail(&mut self, peer: PeerId, user: &UserName, now: SystemTime) -> Failure {
        let was_locked = self.locked(peer, user, now).is_some();
        let lock = self.lock;
        let step = |t: &mut Track, rule: Rule| {
            t.fails.push_back(now);
            if t.fails.len() as u32 >= rule.max && t.locked_until.is_none() {
                t.locked_until = Some(now + lock);
            }
            rule.max.saturating_sub(t.fails.len() as u32)
        };
        let d = step(self.devices.entry(peer).or_default(), DEVICE_RULE);
        let u = step(self.users.entry(user.clone()).or_default(), USER_RULE);
        let locked = self.locked(peer, user, now);
        Failure {
            attempts_left: d.min(u),
            locked,
            newly_locked: locked.is_some() && !was_locked,
        }
    }

    /// A good code of `peer`: its failures are forgotten.
    pub fn success(&mut self, peer: PeerId) {
        self.devices.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn five_failures_lock_the_device_for_the_lock_time_then_it_unlocks() {
        let alice = UserName::parse("user", "alice").unwrap();
        let mut l = Limiter::new(Duration::from_secs(900));
        for i in 0..4 {
            let f = l.fail(1, &alice, t(i));
            assert_eq!(f.locked, None, "failure {i}");
            assert_eq!(f.attempts_left, 4 - i as u32);
        }
        let f = l.fail(1, &alice, t(4));
        assert!(f.newly_locked);
        assert_eq!(f.locked, Some(Duration::from_secs(900)));
        // Locked: another failure does not start another lock (one event per lock).
        let again = l.fail(1, &alice, t(5));
        assert!(!again.newly_locked && again.locked.is_some());
        // The user's other device is not locked by this one (5 < 10).
        assert_eq!(l.locked(2, &alice, t(6)), None);
        assert_eq!(l.locked(1, &alice, t(903)), Some(Duration::from_secs(1)));
        // The lock ends at its time and forgets the failures before it.
        assert_eq!(l.locked(1, &alice, t(904)), None);
        let f = l.fail(1, &alice, t(905));
        assert_eq!((f.locked, f.attempts_left), (None, 4));
    }

    #[test]
    fn failures_age_out_of_the_window() {
        let bob = UserName::parse("user", "bob").unwrap();
        let mut l = Limiter::default();
        for i in 0..4 {
            l.fail(7, &bob, t(i));
        }
        // Five minutes after the last of them they no longer count for the device (the user's
        // window is 15 min: 5 of its 10 are used).
        let f = l.fail(7, &bob, t(303));
        assert_eq!((f.locked, f.attempts_left), (None, 4));
        let f = l.fail(7, &bob, t(304));
        assert_eq!((f.locked, f.attempts_left), (None, 3));
    }

    #[test]
    fn ten_failures_across_devices_lock_the_user_and_a_good_code_clears_only_its_device() {
        let carol = UserName::parse("user", "carol").unwrap();
        let mut l = Limiter::default();
        for i in 0..9u64 {
            let f = l.fail((i % 3) as PeerId, &carol, t(i));
            assert_eq!(f.locked, None, "failure {i}");
        }
        l.success(0);
        let f = l.fail(3, &carol, t(10));
        assert!(f.newly_locked, "{f:?}");
        // Every device of the user is locked, also one that never failed.
        assert!(l.locked(9, &carol, t(11)).is_some());
        let dave = UserName::parse("user", "dave").unwrap();
        assert_eq!(l.locked(9, &dave, t(11)), None);
    }
}
