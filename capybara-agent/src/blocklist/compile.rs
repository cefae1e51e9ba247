//! The blocklist compiler: every list of one direction in, the kernel layout out (see the
//! `capybara_common::blocklist` docs for the layout and the parent module for the algorithm).
//!
//! Pure and deterministic: the same inputs give byte-identical outputs, which is what lets
//! `restore` compare a compiled snapshot with what the kernel already holds.

use capybara_common::blocklist::{
    DIR_LONG_SHIFT, DirEntry, ListId, V4_DIR_ENTRIES_PER_GEN, dir_entry,
};

/// An IPv4 prefix packed as `addr << 8 | len` (host-order address, host bits zero). Sorting the
/// packed values sorts by address, then length.
pub type V4Packed = u64;

/// An IPv6 prefix: network address (host bits zero) and length.
pub type V6Prefix = (u128, u8);

/// Packs an IPv4 prefix.
pub const fn pack_v4(addr: u32, len: u8) -> V4Packed {
    ((addr as u64) << 8) | len as u64
}

/// Unpacks an IPv4 prefix.
pub const fn unpack_v4(p: V4Packed) -> (u32, u8) {
    ((p >> 8) as u32, p as u8)
}

/// One list as the compiler sees it. Inputs are passed in priority order: the list at index 0
/// wins over every later one.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The id written to the kernel for addresses this list wins (0 for the allow list).
    pub id: ListId,
    /// IPv4 prefixes (any order, duplicates allowed).
    pub v4: &'a [V4Packed],
    /// IPv6 prefixes (any order, duplicates allowed).
    pub v6: &'a [V6Prefix],
}

/// The IPv4 part of one generation.
#[derive(Clone, PartialEq, Eq)]
pub struct CompiledV4 {
    /// `2^24` DIR entries, indexed by `addr >> 8`.
    pub dir: Vec<DirEntry>,
    /// Disjoint prefixes longer than /24 as `(addr, len, list id)`, sorted by address; never id 0.
    pub long: Vec<(u32, u8, ListId)>,
}

impl std::fmt::Debug for CompiledV4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledV4")
            .field("dir_nonzero", &self.dir.iter().filter(|e| **e != 0).count())
            .field("long", &self.long.len())
            .finish()
    }
}

impl CompiledV4 {
    /// The list id the kernel's lookup returns for `addr` (host order) — the reference semantics
    /// of the layout, used by tests.
    pub fn lookup(&self, addr: u32) -> ListId {
        let e = self.dir[(addr >> 8) as usize];
        let mask = capybara_common::blocklist::dir_long_mask(e);
        for len in (25..=32u8).rev() {
            if mask & (1 << (len - 25)) != 0 {
                let net = addr & (u32::MAX << (32 - len));
                if let Ok(i) = self
                    .long
                    .binary_search_by(|&(a, l, _)| (a, l).cmp(&(net, len)))
                {
                    return self.long[i].2;
                }
            }
        }
        capybara_common::blocklist::dir_list(e)
    }
}

/// The IPv6 part of one generation: prefixes with their resolved list id, sorted; a
/// longest-prefix match over them gives the priority answer. May contain id 0 (holes punched by
/// the allow list under a blocked prefix).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompiledV6 {
    /// `(addr, len, list id)`, sorted by address then length.
    pub prefixes: Vec<(u128, u8, ListId)>,
}

impl CompiledV6 {
    /// Longest-prefix match, the kernel trie's semantics (reference for tests).
    pub fn lookup(&self, addr: u128) -> ListId {
        let mut best: Option<(u8, ListId)> = None;
        for &(a, l, id) in &self.prefixes {
            if mask128(addr, l) == a && best.is_none_or(|(bl, _)| l > bl) {
                best = Some((l, id));
            }
        }
        best.map_or(0, |b| b.1)
    }
}

const NONE: u32 = u32::MAX;

const fn mask32(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - len as u32))
    }
}

const fn mask128(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - len as u32))
    }
}

/// The list id of `rank` in `lists` (priority order); [`NONE`] is "no list" (0).
fn id_of(lists: &[Input<'_>], rank: u32) -> ListId {
    if rank == NONE {
        0
    } else {
        lists[rank as usize].id
    }
}

/// The enclosing prefixes of the current one while walking prefixes in pre-order (sorted by
/// address, then length): `(addr, len, resolved rank)`. Shared by the IPv4 and IPv6 passes.
struct Enclosing<A> {
    stack: Vec<(A, u8, u32)>,
}

impl<A: Copy + PartialEq> Enclosing<A> {
    fn new(max_len: usize) -> Self {
        Enclosing {
            stack: Vec::with_capacity(max_len + 1),
        }
    }

    /// Enters prefix `addr/len` of list rank `rank`: returns `(parent, resolved)` ranks — the
    /// best rank covering it from outside and the best including itself — or `None` for a
    /// duplicate of the enclosing prefix (whose first copy had the better rank).
    fn enter(
        &mut self,
        addr: A,
        len: u8,
        rank: u32,
        mask: impl Fn(A, u8) -> A,
    ) -> Option<(u32, u32)> {
        while let Some(&(ta, tl, _)) = self.stack.last() {
            if tl <= len && mask(addr, tl) == ta {
                break;
            }
            self.stack.pop();
        }
        let parent = match self.stack.last() {
            Some(&(ta, tl, _)) if ta == addr && tl == len => return None,
            Some(&(_, _, r)) => r,
            None => NONE,
        };
        let resolved = rank.min(parent);
        self.stack.push((addr, len, resolved));
        Some((parent, resolved))
    }
}

/// LSD radix sort of `u64`s on the bits `lo..64` (bits below `lo` must be sorted by a stable
/// pre-order or irrelevant — here they hold the rank, which is included by starting at 0).
/// Four 16-bit passes: ≈ 4 × 2 sequential sweeps instead of `n log n` comparisons.
fn radix_sort(v: &mut Vec<u64>) {
    if v.len() < 4096 {
        v.sort_unstable();
        return;
    }
    let mut buf = vec![0u64; v.len()];
    let mut src = std::mem::take(v);
    for pass in 0..4 {
        let shift = pass * 16;
        let mut counts = vec![0usize; 1 << 16];
        for &x in &src {
            counts[((x >> shift) & 0xffff) as usize] += 1;
        }
        if counts.contains(&src.len()) {
            continue; // every key has the same digit: this pass would not move anything
        }
        let mut sum = 0;
        for c in counts.iter_mut() {
            let n = *c;
            *c = sum;
            sum += n;
        }
        for &x in &src {
            let d = ((x >> shift) & 0xffff) as usize;
            buf[counts[d]] = x;
            counts[d] += 1;
        }
        std::mem::swap(&mut src, &mut buf);
    }
    *v = src;
}

/// Calls `f(offset, len)` for each maximal aligned block of the run `[s, e)` of a /24
/// (offsets 0..=256), largest first in address order.
fn aligned_pieces(mut s: u32, e: u32, mut f: impl FnMut(u32, u8)) {
    while s < e {
        let mut size = if s == 0 {
            256
        } else {
            1u32 << s.trailing_zeros()
        };
        while s + size > e {
            size >>= 1;
        }
        f(s, (32 - size.trailing_zeros()) as u8);
        s += size;
    }
}

fn count_pieces(s: u32, e: u32) -> usize {
    let mut n = 0;
    aligned_pieces(s, e, |_, _| n += 1);
    n
}

/// Compiles the IPv4 prefixes of `lists` (priority order) into one generation.
pub fn compile_v4(lists: &[Input<'_>]) -> CompiledV4 {
    assert!(lists.len() < 0xffff, "too many lists for a 16-bit rank");
    let total: usize = lists.iter().map(|l| l.v4.len()).sum();
    let mut keys = Vec::with_capacity(total);
    for (rank, l) in lists.iter().enumerate() {
        keys.extend(
            l.v4.iter()
                .map(|&p| ((p >> 8) << 32) | ((p & 0xff) << 16) | rank as u64),
        );
    }
    radix_sort(&mut keys);

    let mut dir = vec![0u32; V4_DIR_ENTRIES_PER_GEN as usize];
    let mut long = Vec::new();
    let mut enclosing = Enclosing::new(32);
    // Resolved long prefixes of the /24 `group_block`: (offset in the /24, len, id).
    let mut group: Vec<(u32, u8, ListId)> = Vec::new();
    let mut group_block = u32::MAX;

    for &k in &keys {
        let addr = (k >> 32) as u32;
        let len = ((k >> 16) & 0xff) as u8;
        let rank = (k & 0xffff) as u32;
        let Some((_, resolved)) = enclosing.enter(addr, len, rank, mask32) else {
            continue;
        };
        if len <= 24 {
            let start = (addr >> 8) as usize;
            let n = 1usize << (24 - len);
            dir[start..start + n].fill(id_of(lists, resolved));
        } else {
            let block = addr >> 8;
            if block != group_block {
                flush_block(group_block, &mut group, &mut dir, &mut long);
                group_block = block;
            }
            group.push((addr & 0xff, len, id_of(lists, resolved)));
        }
    }
    flush_block(group_block, &mut group, &mut dir, &mut long);
    CompiledV4 { dir, long }
}

/// Resolves the long prefixes of one /24 (in pre-order) into its DIR entry and disjoint long
/// prefixes.
fn flush_block(
    block: u32,
    group: &mut Vec<(u32, u8, ListId)>,
    dir: &mut [DirEntry],
    long: &mut Vec<(u32, u8, ListId)>,
) {
    if group.is_empty() {
        return;
    }
    let base = block << 8;
    let bg = dir[block as usize];
    // Fast path: one long prefix of a blocking list (an allow hole takes the general path).
    if let [(off, len, id)] = group[..]
        && (id == bg || id != 0)
    {
        group.clear();
        if id != bg {
            long.push((base | off, len, id));
            dir[block as usize] = dir_entry(bg, 1 << (len - 25));
        }
        return;
    }
    let mut cells = [bg; 256];
    for &(off, len, id) in group.iter() {
        cells[off as usize..(off + (1 << (32 - len))) as usize].fill(id);
    }
    group.clear();
    // Runs of equal ids.
    let mut runs: Vec<(u32, u32, ListId)> = Vec::new();
    let mut s = 0u32;
    for i in 1..=256u32 {
        if i == 256 || cells[i as usize] != cells[s as usize] {
            runs.push((s, i, cells[s as usize]));
            s = i;
        }
    }
    // Default: 0 if any part passes, else the id with the most aligned pieces.
    let default = if runs.iter().any(|r| r.2 == 0) {
        0
    } else {
        let mut counts: Vec<(ListId, usize)> = Vec::new();
        for &(s, e, id) in &runs {
            let n = count_pieces(s, e);
            match counts.iter_mut().find(|c| c.0 == id) {
                Some(c) => c.1 += n,
                None => counts.push((id, n)),
            }
        }
        // Ties: the first id in address order (deterministic).
        let mut best = counts[0];
        for &c in &counts[1..] {
            if c.1 > best.1 {
                best = c;
            }
        }
        best.0
    };
    let mut mask = 0u8;
    for &(s, e, id) in &runs {
        if id != default {
            aligned_pieces(s, e, |o, l| {
                long.push((base | o, l, id));
                mask |= 1 << (l - 25);
            });
        }
    }
    dir[block as usize] = dir_entry(default, mask);
}

/// Compiles the IPv6 prefixes of `lists` (priority order).
pub fn compile_v6(lists: &[Input<'_>]) -> CompiledV6 {
    let mut keys: Vec<(u128, u8, u32)> = Vec::new();
    for (rank, l) in lists.iter().enumerate() {
        keys.extend(l.v6.iter().map(|&(a, len)| (a, len, rank as u32)));
    }
    keys.sort_unstable();
    let mut out = Vec::new();
    let mut enclosing = Enclosing::new(128);
    for &(addr, len, rank) in &keys {
        let Some((parent, resolved)) = enclosing.enter(addr, len, rank, mask128) else {
            continue;
        };
        if id_of(lists, resolved) != id_of(lists, parent) {
            out.push((addr, len, id_of(lists, resolved)));
        }
    }
    CompiledV6 { prefixes: out }
}

/// The long-prefix length mask bits of a DIR entry, for tests and checks.
pub const fn long_mask_of(e: DirEntry) -> u8 {
    (e >> DIR_LONG_SHIFT) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocklist::sample::SplitMix64;

    fn v4(s: &str) -> V4Packed {
        let (a, l) = s.split_once('/').unwrap();
        let a: std::net::Ipv4Addr = a.parse().unwrap();
        pack_v4(u32::from(a), l.parse().unwrap())
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
    }

    /// Naive reference: the best-priority list covering `addr`.
    fn naive_v4(lists: &[Input<'_>], addr: u32) -> ListId {
        for l in lists {
            if l.v4.iter().any(|&p| {
                let (a, len) = unpack_v4(p);
                mask32(addr, len) == a
            }) {
                return l.id;
            }
        }
        0
    }

    fn naive_v6(lists: &[Input<'_>], addr: u128) -> ListId {
        for l in lists {
            if l.v6.iter().any(|&(a, len)| mask128(addr, len) == a) {
                return l.id;
            }
        }
        0
    }

    /// Structural invariants of the kernel layout.
    fn check_invariants(c: &CompiledV4) {
        assert_eq!(c.dir.len(), 1 << 24);
        let mut masks = std::collections::HashMap::<u32, u8>::new();
        for w in c.long.windows(2) {
            assert!(
                (w[0].0, w[0].1) < (w[1].0, w[1].1),
                "long prefixes sorted and unique"
            );
            let (a, l, _) = w[0];
            let end = a as u64 + (1u64 << (32 - l));
            if a >> 8 == w[1].0 >> 8 {
                assert!(
                    end <= w[1].0 as u64,
                    "long prefixes of a /24 are disjoint: {w:?}"
                );
            }
        }
        for &(a, l, id) in &c.long {
            assert!((25..=32).contains(&l));
            assert_eq!(mask32(a, l), a);
            assert_ne!(id, 0, "no pass entries in the long hash");
            *masks.entry(a >> 8).or_default() |= 1 << (l - 25);
        }
        for (i, &e) in c.dir.iter().enumerate() {
            assert_eq!(e >> 24, 0);
            assert_eq!(
                long_mask_of(e),
                masks.get(&(i as u32)).copied().unwrap_or(0),
                "mask of /24 {i}"
            );
        }
    }

    #[test]
    fn single_list_paints_short_and_long_prefixes() {
        let l = [v4("10.0.0.0/8"), v4("192.168.1.128/25"), v4("1.2.3.4/32")];
        let lists = [Input {
            id: 7,
            v4: &l,
            v6: &[],
        }];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.lookup(ip("10.255.0.1")), 7);
        assert_eq!(c.lookup(ip("11.0.0.0")), 0);
        assert_eq!(c.lookup(ip("192.168.1.127")), 0);
        assert_eq!(c.lookup(ip("192.168.1.128")), 7);
        assert_eq!(c.lookup(ip("1.2.3.4")), 7);
        assert_eq!(c.lookup(ip("1.2.3.5")), 0);
        assert_eq!(
            c.long,
            vec![(ip("1.2.3.4"), 32, 7), (ip("192.168.1.128"), 25, 7)]
        );
    }

    #[test]
    fn higher_priority_wins_even_when_shorter() {
        let manual = [v4("10.0.0.0/8")];
        let geo = [v4("10.1.2.0/24"), v4("10.1.3.4/32")];
        let lists = [
            Input {
                id: 1,
                v4: &manual,
                v6: &[],
            },
            Input {
                id: 9,
                v4: &geo,
                v6: &[],
            },
        ];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.lookup(ip("10.1.2.3")), 1);
        assert_eq!(c.lookup(ip("10.1.3.4")), 1);
        assert!(
            c.long.is_empty(),
            "a /32 resolved to its /24's id needs no entry"
        );
    }

    #[test]
    fn allow_punches_holes() {
        let allow = [v4("10.1.2.5/32"), v4("10.9.0.0/16")];
        let manual = [v4("10.0.0.0/8")];
        let lists = [
            Input {
                id: 0,
                v4: &allow,
                v6: &[],
            },
            Input {
                id: 3,
                v4: &manual,
                v6: &[],
            },
        ];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.lookup(ip("10.1.2.5")), 0);
        assert_eq!(c.lookup(ip("10.1.2.4")), 3);
        assert_eq!(c.lookup(ip("10.1.2.6")), 3);
        assert_eq!(c.lookup(ip("10.9.200.1")), 0);
        assert_eq!(c.lookup(ip("10.10.0.0")), 3);
        // The /24 holding the hole defaults to pass and lists the 8 blocked pieces around it.
        assert_eq!(c.long.len(), 8);
    }

    #[test]
    fn duplicates_across_lists_go_to_the_better_one() {
        let a = [v4("1.1.1.0/24"), v4("1.1.1.0/24"), v4("2.2.2.2/32")];
        let b = [v4("1.1.1.0/24"), v4("2.2.2.2/32")];
        let lists = [
            Input {
                id: 4,
                v4: &a,
                v6: &[],
            },
            Input {
                id: 5,
                v4: &b,
                v6: &[],
            },
        ];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.lookup(ip("1.1.1.1")), 4);
        assert_eq!(c.lookup(ip("2.2.2.2")), 4);
    }

    #[test]
    fn fragmented_slash24_picks_the_cheapest_default() {
        // Three /26 of list 2 and one /26 of list 3: default 2, one entry.
        let a = [v4("5.5.5.0/26"), v4("5.5.5.64/26"), v4("5.5.5.128/26")];
        let b = [v4("5.5.5.192/26")];
        let lists = [
            Input {
                id: 2,
                v4: &a,
                v6: &[],
            },
            Input {
                id: 3,
                v4: &b,
                v6: &[],
            },
        ];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.long, vec![(ip("5.5.5.192"), 26, 3)]);
        assert_eq!(c.dir[(ip("5.5.5.0") >> 8) as usize] & 0xffff, 2);
    }

    #[test]
    fn whole_space_and_host_routes() {
        let a = [v4("0.0.0.0/0")];
        let allow = [v4("255.255.255.255/32"), v4("0.0.0.0/32")];
        let lists = [
            Input {
                id: 0,
                v4: &allow,
                v6: &[],
            },
            Input {
                id: 1,
                v4: &a,
                v6: &[],
            },
        ];
        let c = compile_v4(&lists);
        check_invariants(&c);
        assert_eq!(c.lookup(0), 0);
        assert_eq!(c.lookup(1), 1);
        assert_eq!(c.lookup(u32::MAX), 0);
        assert_eq!(c.lookup(u32::MAX - 1), 1);
    }

    #[test]
    fn output_is_deterministic_whatever_the_input_order() {
        let mut a: Vec<_> = ["9.9.9.0/25", "9.9.9.9/32", "9.9.0.0/16", "8.0.0.0/7"]
            .map(v4)
            .to_vec();
        let l1 = [Input {
            id: 1,
            v4: &a,
            v6: &[],
        }];
        let c1 = compile_v4(&l1);
        a.reverse();
        let l2 = [Input {
            id: 1,
            v4: &a,
            v6: &[],
        }];
        assert!(compile_v4(&l2) == c1);
    }

    /// Random prefixes concentrated in a small region so that lists overlap a lot.
    fn random_lists(rng: &mut SplitMix64, nlists: usize, per: usize) -> Vec<Vec<V4Packed>> {
        (0..nlists)
            .map(|_| {
                (0..per)
                    .map(|_| {
                        let len = match rng.below(10) {
                            0 => 12 + rng.below(12) as u8,
                            1..=3 => 20 + rng.below(5) as u8,
                            _ => 25 + rng.below(8) as u8,
                        };
                        let addr = 0x0a00_0000 | (rng.next() as u32 & 0x0003_ffff);
                        pack_v4(mask32(addr, len), len)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn property_matches_the_naive_reference_on_random_lists() {
        let mut rng = SplitMix64::new(0xcafe);
        for round in 0..8 {
            let nlists = 1 + rng.below(5) as usize;
            let per = 1 + rng.below(300) as usize;
            let data = random_lists(&mut rng, nlists, per);
            // Ids: the first list is sometimes the allow list (id 0).
            let lists: Vec<Input<'_>> = data
                .iter()
                .enumerate()
                .map(|(i, v)| Input {
                    id: if i == 0 && round % 2 == 0 {
                        0
                    } else {
                        10 + i as u32
                    },
                    v4: v,
                    v6: &[],
                })
                .collect();
            let c = compile_v4(&lists);
            check_invariants(&c);
            for _ in 0..5_000 {
                let addr = if rng.below(4) == 0 {
                    rng.next() as u32
                } else {
                    0x0a00_0000 | (rng.next() as u32 & 0x0003_ffff)
                };
                assert_eq!(
                    c.lookup(addr),
                    naive_v4(&lists, addr),
                    "round {round} addr {addr:#x}"
                );
            }
            // Every prefix boundary, the places an off-by-one would show.
            for v in &data {
                for &p in v {
                    let (a, l) = unpack_v4(p);
                    let last = a | ((1u64 << (32 - l)) - 1) as u32;
                    for x in [a, last, a.wrapping_sub(1), last.wrapping_add(1)] {
                        assert_eq!(c.lookup(x), naive_v4(&lists, x), "boundary {x:#x}");
                    }
                }
            }
        }
    }

    #[test]
    fn v6_resolves_priority_for_longest_match() {
        let p = |s: &str| {
            let n: ipnet::Ipv6Net = s.parse().unwrap();
            (u128::from(n.network()), n.prefix_len())
        };
        let allow = [p("2001:db8:1:1::/64")];
        let manual = [p("2001:db8::/32")];
        let geo = [p("2001:db8:1::/48"), p("2001:db9::/32"), p("2001:db9::/32")];
        let lists = [
            Input {
                id: 0,
                v4: &[],
                v6: &allow,
            },
            Input {
                id: 1,
                v4: &[],
                v6: &manual,
            },
            Input {
                id: 5,
                v4: &[],
                v6: &geo,
            },
        ];
        let c = compile_v6(&lists);
        let a = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().unwrap());
        assert_eq!(c.lookup(a("2001:db8:1:2::1")), 1);
        assert_eq!(c.lookup(a("2001:db8:1:1::1")), 0);
        assert_eq!(c.lookup(a("2001:db9::1")), 5);
        assert_eq!(c.lookup(a("2001:dba::1")), 0);
        // The geo /48 under the manual /32 resolves to manual: redundant, not emitted.
        assert_eq!(c.prefixes.len(), 3);
    }

    #[test]
    fn v6_property_matches_the_naive_reference() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..20 {
            let data: Vec<Vec<V6Prefix>> = (0..1 + rng.below(4))
                .map(|_| {
                    (0..1 + rng.below(60))
                        .map(|_| {
                            let len = 16 + rng.below(113) as u8;
                            let addr = (0x2001_0db8u128 << 96)
                                | (rng.next() as u128 & 0xffff) << 80
                                | rng.next() as u128 & 0xff;
                            (mask128(addr, len), len)
                        })
                        .collect()
                })
                .collect();
            let lists: Vec<Input<'_>> = data
                .iter()
                .enumerate()
                .map(|(i, v)| Input {
                    id: i as u32,
                    v4: &[],
                    v6: v,
                })
                .collect();
            let c = compile_v6(&lists);
            for _ in 0..3000 {
                let addr = (0x2001_0db8u128 << 96)
                    | (rng.next() as u128 & 0xffff) << 80
                    | rng.next() as u128 & 0xff;
                assert_eq!(c.lookup(addr), naive_v6(&lists, addr));
            }
            for v in &data {
                for &(a, _) in v {
                    assert_eq!(c.lookup(a), naive_v6(&lists, a));
                }
            }
        }
    }

    #[test]
    fn radix_sort_sorts() {
        let mut rng = SplitMix64::new(3);
        let mut v: Vec<u64> = (0..100_000).map(|_| rng.next()).collect();
        let mut w = v.clone();
        radix_sort(&mut v);
        w.sort_unstable();
        assert_eq!(v, w);
    }
}
