//! Interval arithmetic over address ranges, and the minimal CIDR cover of a set of ranges.
//!
//! Every set of addresses is held as a sorted list of disjoint, non-adjacent **inclusive**
//! ranges `[first, last]` of `u128` (IPv4 addresses are `u32` values widened to `u128`, with
//! [`V4_MAX`] as the top of their space). Inclusive ends mean the whole space (`::/0`, whose
//! size `2^128` does not fit a `u128`) needs no special case. Union is sort + merge,
//! complement and difference are one linear sweep, and [`cidrs`] turns one range into its
//! minimal list of aligned prefixes — so every operation here is `O(n log n)` at worst.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An inclusive range of addresses `[first, last]`.
pub(crate) type Range = (u128, u128);

/// The highest IPv4 address, as a `u128`.
pub(crate) const V4_MAX: u128 = u32::MAX as u128;
/// The highest IPv6 address.
pub(crate) const V6_MAX: u128 = u128::MAX;

/// The range an IPv4 network covers.
pub(crate) fn v4_range(net: Ipv4Net) -> Range {
    (
        u128::from(u32::from(net.network())),
        u128::from(u32::from(net.broadcast())),
    )
}

/// The range an IPv6 network covers.
pub(crate) fn v6_range(net: Ipv6Net) -> Range {
    (u128::from(net.network()), u128::from(net.broadcast()))
}

/// The range a network covers, and whether it is IPv4.
pub(crate) fn range_of(net: IpNet) -> (bool, Range) {
    match net {
        IpNet::V4(n) => (true, v4_range(n)),
        IpNet::V6(n) => (false, v6_range(n)),
    }
}

/// Sorts `ranges` and merges overlapping **and adjacent** ones, in place.
pub(crate) fn normalize(ranges: &mut Vec<Range>) {
    ranges.sort_unstable();
    let mut out = 0;
    for i in 0..ranges.len() {
        let (first, last) = ranges[i];
        if out > 0 {
            let prev = &mut ranges[out - 1];
            // Adjacent (prev.1 + 1 == first) or overlapping; `checked_add` guards the top.
            if prev.1.checked_add(1).is_none_or(|next| next >= first) {
                prev.1 = prev.1.max(last);
                continue;
            }
        }
        ranges[out] = (first, last);
        out += 1;
    }
    ranges.truncate(out);
}

/// The complement of normalized `ranges` within `[0, max]`.
pub(crate) fn complement(ranges: &[Range], max: u128) -> Vec<Range> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    // `next` is the first address not yet accounted for; `None` once past `max`.
    let mut next = Some(0u128);
    for &(first, last) in ranges {
        let Some(start) = next else { break };
        if first > start {
            out.push((start, first - 1));
        }
        next = last.checked_add(1).filter(|&n| n <= max);
    }
    if let Some(start) = next {
        out.push((start, max));
    }
    out
}

/// The intersection of two normalized range lists (linear merge).
pub(crate) fn intersect(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let first = a[i].0.max(b[j].0);
        let last = a[i].1.min(b[j].1);
        if first <= last {
            out.push((first, last));
        }
        // Advance whichever ends first; the other may still overlap the next one.
        if a[i].1 < b[j].1 { i += 1 } else { j += 1 }
    }
    out
}

/// `a` minus `b`, both normalized, within `[0, u128::MAX]`.
pub(crate) fn difference(a: &[Range], b: &[Range]) -> Vec<Range> {
    intersect(a, &complement(b, V6_MAX))
}

/// Appends the minimal list of prefixes exactly covering `[first, last]` in a space of `bits`
/// bits, as `(network, prefix length)` pairs in address order.
///
/// Greedy from the left: at each step take the largest block that is aligned at `first` and
/// does not pass `last`. A range yields at most `2 × bits` prefixes.
pub(crate) fn cidrs(range: Range, bits: u32, out: &mut Vec<(u128, u8)>) {
    let (mut first, last) = range;
    loop {
        // Largest alignment of `first` (a block of 2^align addresses may start here).
        let align = first.trailing_zeros().min(bits);
        // Largest block that fits in what is left: floor(log2(last - first + 1)).
        let span = last - first; // = length - 1
        let fit = match span.checked_add(1) {
            Some(len) => 127 - len.leading_zeros(),
            None => 128,
        };
        let size = align.min(fit);
        out.push((first, (bits - size) as u8));
        if size == 128 {
            return;
        }
        let block_last = first + ((1u128 << size) - 1);
        if block_last >= last {
            return;
        }
        first = block_last + 1;
    }
}

/// The minimal IPv4 CIDR cover of normalized IPv4 `ranges`.
pub(crate) fn v4_cidrs(ranges: &[Range]) -> Vec<Ipv4Net> {
    let mut raw = Vec::with_capacity(ranges.len());
    for &r in ranges {
        cidrs(r, 32, &mut raw);
    }
    raw.into_iter()
        .map(|(addr, len)| {
            Ipv4Net::new(Ipv4Addr::from(addr as u32), len).expect("prefix length is at most 32")
        })
        .collect()
}

/// The minimal IPv6 CIDR cover of normalized IPv6 `ranges`.
pub(crate) fn v6_cidrs(ranges: &[Range]) -> Vec<Ipv6Net> {
    let mut raw = Vec::with_capacity(ranges.len());
    for &r in ranges {
        cidrs(r, 128, &mut raw);
    }
    raw.into_iter()
        .map(|(addr, len)| {
            Ipv6Net::new(Ipv6Addr::from(addr), len).expect("prefix length is at most 128")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn brute_cover_ok(range: Range, bits: u32) {
        let mut out = Vec::new();
        cidrs(range, bits, &mut out);
        // Contiguous, exact, aligned.
        let mut next = range.0;
        for &(addr, len) in &out {
            assert_eq!(addr, next, "gap or overlap in cover of {range:?}");
            let size = u32::from(bits as u8 - len);
            if size < 128 {
                assert_eq!(addr & ((1u128 << size) - 1), 0, "unaligned block");
                next = addr.wrapping_add(1u128 << size);
            } else {
                next = 0;
            }
        }
        assert_eq!(
            next.wrapping_sub(1),
            range.1,
            "cover of {range:?} ends wrong"
        );
        assert!(out.len() <= 2 * bits as usize);
        // Minimality: no two consecutive blocks could be merged into their parent.
        for pair in out.windows(2) {
            let ((a, la), (b, lb)) = (pair[0], pair[1]);
            if la == lb && la > 0 {
                let size = u32::from(bits as u8 - la);
                let parent_aligned = a & ((1u128 << (size + 1)) - 1) == 0;
                assert!(
                    !(parent_aligned && b == a + (1u128 << size)),
                    "mergeable siblings"
                );
            }
        }
    }

    #[test]
    fn cover_edges() {
        let mut out = Vec::new();
        cidrs((0, V6_MAX), 128, &mut out);
        assert_eq!(out, vec![(0, 0)]);
        out.clear();
        cidrs((0, V4_MAX), 32, &mut out);
        assert_eq!(out, vec![(0, 0)]);
        out.clear();
        cidrs((V6_MAX, V6_MAX), 128, &mut out);
        assert_eq!(out, vec![(V6_MAX, 128)]);
        out.clear();
        cidrs((1, V4_MAX - 1), 32, &mut out);
        assert_eq!(out.len(), 62);
        brute_cover_ok((1, V4_MAX - 1), 32);
        brute_cover_ok((1, V6_MAX), 128);
        brute_cover_ok((0, V6_MAX - 1), 128);
    }

    #[test]
    fn cover_random() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let a: u32 = rng.random();
            let b: u32 = rng.random();
            brute_cover_ok((u128::from(a.min(b)), u128::from(a.max(b))), 32);
            let a: u128 = rng.random();
            let b: u128 = rng.random();
            brute_cover_ok((a.min(b), a.max(b)), 128);
        }
    }

    #[test]
    fn normalize_merges_adjacent_and_overlapping() {
        let mut r = vec![
            (10, 20),
            (0, 4),
            (5, 9),
            (15, 30),
            (32, 40),
            (V6_MAX, V6_MAX),
        ];
        normalize(&mut r);
        assert_eq!(r, vec![(0, 30), (32, 40), (V6_MAX, V6_MAX)]);
        let mut r = vec![(0, V6_MAX), (3, 4)];
        normalize(&mut r);
        assert_eq!(r, vec![(0, V6_MAX)]);
    }

    #[test]
    fn intersect_and_difference() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (50, 60)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25), (50, 50)]);
        assert_eq!(difference(&a, &b), vec![(0, 4), (26, 30), (40, 49)]);
        assert_eq!(difference(&a, &[]), a.to_vec());
        assert_eq!(difference(&a, &[(0, V6_MAX)]), vec![]);
    }

    #[test]
    fn complement_edges() {
        assert_eq!(complement(&[], V4_MAX), vec![(0, V4_MAX)]);
        assert_eq!(complement(&[(0, V4_MAX)], V4_MAX), vec![]);
        assert_eq!(
            complement(&[(0, 0), (V4_MAX, V4_MAX)], V4_MAX),
            vec![(1, V4_MAX - 1)]
        );
        assert_eq!(
            complement(&[(5, 9), (20, V6_MAX)], V6_MAX),
            vec![(0, 4), (10, 19)]
        );
    }
}
