//! Deterministic random prefixes for benchmarks and tests (no `rand` dependency at runtime).
//!
//! [`random_v4_prefixes`] follows the shape of real country and threat lists, as the benchmark
//! `list_replace_1m_ms` specifies: spread over the whole IPv4 space, 95 % of lengths uniform in
//! /20–/32 and 5 % in /16–/19.

use crate::net::Cidr;

/// SplitMix64: a tiny, fast, well-distributed generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    #[expect(
        clippy::should_implement_trait,
        reason = "not an iterator: it never ends"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the slight modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` random IPv4 prefixes (duplicates possible), deterministic for a given `seed`.
pub fn random_v4_prefixes(seed: u64, n: usize) -> Vec<Cidr> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let len = if rng.below(20) == 0 {
                16 + rng.below(4)
            } else {
                20 + rng.below(13)
            } as u8;
            let addr = (rng.next() as u32) & (u32::MAX << (32 - u32::from(len)));
            Cidr::from(ipnet::Ipv4Net::new(addr.into(), len).expect("len <= 32"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_canonical_and_deterministic() {
        let a = random_v4_prefixes(1, 1000);
        assert_eq!(a, random_v4_prefixes(1, 1000));
        assert!(
            a.iter()
                .all(|c| c.is_ipv4() && (16..=32).contains(&c.prefix_len()))
        );
        assert!(a.iter().filter(|c| c.prefix_len() < 20).count() < 150);
    }
}
