//! Rate limits of the TCP API (gRPC and REST alike), checked where a call is authenticated
//! (`handler::authorize`); the control socket (root) has none.
//!
//! - **Failed authentication per source address**: a burst of [`FAIL_BURST`], then one more
//!   every [`FAIL_REFILL_SECS`] s. An address over it gets `RESOURCE_EXHAUSTED` with a
//!   `retry-after` (REST: 429 with `Retry-After`) before its token is even looked at, so a
//!   token cannot be guessed at speed.
//! - **Calls per token**: the setting's `rate_limit` per second (`capybara api enable
//!   --rate-limit`, default `service::access::DEFAULT_RATE_LIMIT`), a burst of twice that.
//!
//! Token buckets in one map each, at most [`MAX_TRACKED`] entries (when full, the buckets that
//! have refilled are dropped first, then the map is cleared: an attacker cycling addresses only
//! ever resets to a full burst). O(1) per call.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

/// Failed authentications an address may make at once.
pub const FAIL_BURST: f64 = 20.0;
/// Seconds per failed authentication an address earns back.
pub const FAIL_REFILL_SECS: f64 = 3.0;
/// Addresses and tokens tracked at most.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    /// Takes one if there is one; else the seconds until there is.
    fn take(&mut self, now: Instant, burst: f64, per_sec: f64) -> Result<(), u64> {
        self.level = (self.level + now.duration_since(self.at).as_secs_f64() * per_sec).min(burst);
        self.at = now;
        if self.level >= 1.0 {
            self.level -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.level) / per_sec).ceil().max(1.0) as u64)
        }
    }

    fn full(&self, now: Instant, burst: f64, per_sec: f64) -> bool {
        self.level + now.duration_since(self.at).as_secs_f64() * per_sec >= burst
    }
}

fn bucket<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Bucket>,
    key: K,
    now: Instant,
    burst: f64,
    per_sec: f64,
) -> &mut Bucket {
    if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
        map.retain(|_, b| !b.full(now, burst, per_sec));
        if map.len() >= MAX_TRACKED {
            map.clear();
        }
    }
    map.entry(key).or_insert(Bucket {
        level: burst,
        at: now,
    })
}

/// The TCP API's rate limits (module docs).
#[derive(Debug)]
pub struct RateLimits {
    per_token: AtomicU32,
    failures: Mutex<HashMap<IpAddr, Bucket>>,
    tokens: Mutex<HashMap<String, Bucket>>,
}

impl RateLimits {
    /// Limits with `per_token` calls per second (0 = unlimited).
    pub fn new(per_token: u32) -> RateLimits {
        RateLimits {
            per_token: AtomicU32::new(per_token),
            failures: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the calls per second per token (0 = unlimited).
    pub fn set_per_token(&self, per_sec: u32) {
        self.per_token.store(per_sec, Ordering::Relaxed);
    }

    /// May `ip` try to authenticate? `Err(seconds)` when it failed too often.
    pub fn may_try(&self, ip: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let map = self.failures.lock().unwrap();
        match map.get(&ip) {
            Some(b) if !b.full(now, FAIL_BURST, 1.0 / FAIL_REFILL_SECS) => {
                let mut probe = *b;
                probe.take(now, FAIL_BURST, 1.0 / FAIL_REFILL_SECS)
            }
            _ => Ok(()),
        }
    }

    /// `ip` failed to authenticate.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap();
        let _ = bucket(&mut map, ip, now, FAIL_BURST, 1.0 / FAIL_REFILL_SECS).take(
            now,
            FAIL_BURST,
            1.0 / FAIL_REFILL_SECS,
        );
    }

    /// May token `id` make another call? `Err(seconds)` when it is over its rate.
    pub fn call(&self, id: &str) -> Result<(), u64> {
        let rate = self.per_token.load(Ordering::Relaxed);
        if rate == 0 {
            return Ok(());
        }
        let (burst, per_sec) = (f64::from(rate) * 2.0, f64::from(rate));
        let now = Instant::now();
        let mut map = self.tokens.lock().unwrap();
        if let Some(b) = map.get_mut(id) {
            return b.take(now, burst, per_sec);
        }
        bucket(&mut map, id.to_owned(), now, burst, per_sec).take(now, burst, per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_lock_an_address_out_after_the_burst() {
        let l = RateLimits::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..FAIL_BURST as usize {
            l.may_try(ip).unwrap();
            l.failed(ip);
        }
        let wait = l.may_try(ip).unwrap_err();
        assert!((1..=FAIL_REFILL_SECS as u64).contains(&wait), "{wait}");
        // Another address is not affected; asking does not spend.
        l.may_try(other).unwrap();
        assert!(l.may_try(ip).is_err());
    }

    #[test]
    fn a_token_gets_twice_its_rate_as_a_burst_then_waits() {
        let l = RateLimits::new(5);
        for _ in 0..10 {
            l.call("a").unwrap();
        }
        assert_eq!(l.call("a"), Err(1));
        l.call("b").unwrap();
        l.set_per_token(0);
        for _ in 0..100 {
            l.call("a").unwrap();
        }
    }
}
