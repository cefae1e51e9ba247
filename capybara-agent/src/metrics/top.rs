//! Bounded cardinality for per-user series: the top N users by bytes (both directions) get a
//! series each, every other user is summed into one series labelled [`OTHER`], so the exposition has at
//! most N + 1 series per metric whatever the number of users, and the series always sum to
//! the total. Memory is O(N): users are pushed one at a time (a page of users at a time from
//! the service) into a min-heap of the N largest.

use std::{cmp::Reverse, collections::BinaryHeap};

use crate::service::Traffic;

/// One user's traffic: `rx` from its devices, `tx` to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserTraffic {
    /// The user's name (`other` for the rest).
    pub user: String,
    /// From the user's devices (what its clients sent).
    pub rx: Traffic,
    /// To the user's devices.
    pub tx: Traffic,
}

impl UserTraffic {
    fn bytes(&self) -> u128 {
        u128::from(self.rx.bytes) + u128::from(self.tx.bytes)
    }

    fn add(&mut self, o: &UserTraffic) {
        for (a, b) in [(&mut self.rx, &o.rx), (&mut self.tx, &o.tx)] {
            a.bytes = a.bytes.wrapping_add(b.bytes);
            a.packets = a.packets.wrapping_add(b.packets);
        }
    }
}

/// Heap order: the smallest byte count on top, and among equal counts the greatest name (so
/// ties keep the names that sort first: a stable choice from one scrape to the next).
#[derive(Debug, PartialEq, Eq)]
struct Ranked(UserTraffic);

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        Reverse(self.0.bytes())
            .cmp(&Reverse(o.0.bytes()))
            .then_with(|| self.0.user.cmp(&o.0.user))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// Keeps the `n` users with the most bytes and sums the others.
#[derive(Debug)]
pub struct TopUsers {
    n: usize,
    top: BinaryHeap<Ranked>,
    other: UserTraffic,
    /// Users pushed.
    users: u64,
}

/// The result of [`TopUsers::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranking {
    /// Up to N users, most bytes first (ties by name).
    pub top: Vec<UserTraffic>,
    /// The sum of every other user, named [`OTHER`] (zero when every user is in `top`).
    pub other: UserTraffic,
    /// Users counted in `other`.
    pub other_users: u64,
}

/// The label value of the summed series: `_other`, a name no user can have (user names start
/// with a letter or a digit), so it never mixes with a user called `other`.
pub const OTHER: &str = "_other";

impl TopUsers {
    /// Keeps the top `n` users (`n` 0: every user goes to `other`).
    pub fn new(n: usize) -> TopUsers {
        TopUsers {
            n,
            top: BinaryHeap::with_capacity(n.min(4096) + 1),
            other: UserTraffic {
                user: OTHER.to_owned(),
                ..UserTraffic::default()
            },
            users: 0,
        }
    }

    /// Counts one user (each user once).
    pub fn push(&mut self, u: UserTraffic) {
        self.users += 1;
        self.top.push(Ranked(u));
        if self.top.len() > self.n
            && let Some(Ranked(smallest)) = self.top.pop()
        {
            self.other.add(&smallest);
        }
    }

    /// The top users, most bytes first, and the rest summed.
    pub fn finish(self) -> Ranking {
        let mut top: Vec<UserTraffic> = self.top.into_iter().map(|r| r.0).collect();
        top.sort_by(|a, b| b.bytes().cmp(&a.bytes()).then_with(|| a.user.cmp(&b.user)));
        Ranking {
            other_users: self.users - top.len() as u64,
            top,
            other: self.other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, rx: u64, tx: u64) -> UserTraffic {
        UserTraffic {
            user: name.to_owned(),
            rx: Traffic {
                bytes: rx,
                packets: rx / 100 + 1,
            },
            tx: Traffic {
                bytes: tx,
                packets: tx / 100 + 1,
            },
        }
    }

    fn sum<'a>(it: impl Iterator<Item = &'a UserTraffic>) -> UserTraffic {
        let mut s = UserTraffic::default();
        it.for_each(|u| s.add(u));
        s
    }

    /// Issue 20: N + 1 series at most, the right N, and top N + other sums to the total.
    #[test]
    fn top_n_and_other_sum_to_the_total() {
        // 10 000 users with pseudo-random traffic (a fixed LCG: reproducible), several ties.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut users = Vec::new();
        for i in 0..10_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let rx = (x >> 40) % 5_000_000;
            let tx = if i % 7 == 0 {
                rx
            } else {
                (x >> 20) % 3_000_000
            };
            users.push(user(&format!("u{i:05}"), rx, tx));
        }
        users.push(user("tie-a", 20_000_000, 0));
        users.push(user("tie-b", 0, 20_000_000));
        let total = sum(users.iter());
        for n in [0, 1, 2, 3, 50, 9_999, 10_002, 20_000] {
            let mut t = TopUsers::new(n);
            users.iter().cloned().for_each(|u| t.push(u));
            let r = t.finish();
            assert_eq!(r.top.len(), n.min(users.len()), "n = {n}");
            assert_eq!(r.other_users as usize, users.len() - r.top.len());
            assert_eq!(r.other.user, OTHER);
            let mut all = r.top.clone();
            all.push(r.other.clone());
            let s = sum(all.iter());
            assert_eq!((s.rx, s.tx), (total.rx, total.tx), "n = {n}: sums differ");

            // The top are exactly the n largest (ties by name), in that order.
            let mut expect = users.clone();
            expect.sort_by(|a, b| b.bytes().cmp(&a.bytes()).then_with(|| a.user.cmp(&b.user)));
            expect.truncate(n);
            assert_eq!(r.top, expect, "n = {n}");
            if n >= 2 {
                // 20 MB each: the two largest, the tie broken by name.
                assert_eq!(r.top[0].user, "tie-a");
                assert_eq!(r.top[1].user, "tie-b");
            }
        }
    }

    #[test]
    fn no_users_is_one_zero_other_series() {
        let r = TopUsers::new(50).finish();
        assert!(r.top.is_empty());
        assert_eq!(r.other_users, 0);
        assert_eq!(r.other.rx, Traffic::default());
    }
}
