//! The clock the scheduler runs on: [`Clock`] (now, and a sleep until a time), the real one
//! ([`SystemClock`]) and a manual one for tests ([`ManualClock`]), so every scheduling rule is
//! tested without waiting in real time.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A future a [`Clock`] returns.
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Wall-clock time in Unix milliseconds, and a way to wait for a moment of it.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now, Unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Resolves at or after `at_ms` (Unix milliseconds); at once if that has passed.
    fn sleep_until(&self, at_ms: i64) -> Sleep<'_>;
}

/// The longest the real clock sleeps at once: a wall clock stepped forward (NTP, an admin)
/// while the runner sleeps on the monotonic clock is noticed within this.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The system's wall clock; sleeps on tokio's timer.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep<'_> {
        let wait = Duration::from_millis(at_ms.saturating_sub(self.now_ms()).max(0) as u64);
        Box::pin(tokio::time::sleep(wait.min(MAX_SLEEP)))
    }
}

/// A clock that moves only when told ([`ManualClock::set_ms`]); sleepers wake when it reaches
/// their time.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
    moved: tokio::sync::watch::Sender<i64>,
}

impl ManualClock {
    /// A clock standing at `ms` (Unix milliseconds).
    pub fn new(ms: i64) -> ManualClock {
        ManualClock {
            now: AtomicI64::new(ms),
            moved: tokio::sync::watch::channel(ms).0,
        }
    }

    /// Moves the clock to `ms` (never backwards) and wakes whoever's time has come.
    pub fn set_ms(&self, ms: i64) {
        let ms = self.now.fetch_max(ms, Ordering::SeqCst).max(ms);
        self.moved.send_replace(ms);
    }

    /// Moves the clock forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.set_ms(self.now_ms() + ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep<'_> {
        let mut rx = self.moved.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= at_ms).await;
        })
    }
}
