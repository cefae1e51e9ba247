//! Compiled blocklists: the layout the kernel looks up and the agent writes.
//!
//! Named lists (`manual`, `auto`, `tor`, `vpn`, `geo:CN`, …) get a [`ListId`] from the agent. The
//! agent compiles every list of one direction (source lists for the XDP guard, destination lists
//! for the tunnel device) into one structure per **generation**; the kernel reads the generation
//! named in [`crate::config::Config`], so replacing any list is: write the inactive generation
//! completely, then flip one `u32`. Readers see the old or the new lists, never a mix.
//!
//! ## IPv4: DIR-24 table + long-prefix hash
//! Lookup cost must not grow with list size (`xdp_guard_1m_over_1k` ≤ 1.5), which a binary
//! LPM trie cannot give (≈5.5× from 1k to 1M prefixes on this machine kind). So:
//!
//! - `*_V4_DIR`: `2 × 2^24` [`DirEntry`] `u32`s, entry index `generation << 24 | addr >> 8`,
//!   stored two to a map element ([`DirSlot`]) — one read decides every address whose /24 holds
//!   no prefix longer than /24. `BPF_F_MMAPABLE`: the agent fills a generation with one memory
//!   copy of 64 MiB.
//! - `*_V4_LONG`: a hash of [`V4LongKey`] → `u32` list id for the parts of a /24 that differ from
//!   the /24's default. The compiled long prefixes of one /24 are **disjoint**, and the entry's
//!   length mask says which lengths exist there, so the kernel probes at most the lengths present
//!   (longest first) and the first hit is the answer.
//!
//! ## IPv6: LPM trie
//! IPv6 lists are small in practice: one LPM trie per direction whose key data is
//! `[generation, address…]` with `prefix_len = 8 + len`.
//!
//! ## Overlaps
//! The agent resolves overlaps when compiling: where several lists cover an address, the list
//! with the highest priority is recorded (and counted); the `allow` list punches holes. The kernel
//! only ever sees one list id per address.

use crate::pod;

/// Identifier of a named list; `0` means "no list" (pass).
pub type ListId = u32;

/// Number of list ids (counter slots in [`crate::maps::LIST_HITS`]); ids are `1..MAX_LISTS`.
pub const MAX_LISTS: u32 = 1024;

/// Entries per generation in a DIR-24 table.
pub const V4_DIR_ENTRIES_PER_GEN: u32 = 1 << 24;
/// Total entries of a DIR-24 table (two generations).
pub const V4_DIR_ENTRIES: u32 = 2 * V4_DIR_ENTRIES_PER_GEN;

/// A DIR-24 map element: two consecutive [`DirEntry`]s. The kernel lays array elements out
/// `round_up(value_size, 8)` bytes apart, so a `u32` element would waste half the memory and
/// break the dense view the agent writes through `mmap`; a pair fills the 8 bytes exactly, and
/// the mapped memory is then a dense `[DirEntry; V4_DIR_ENTRIES]`.
pub type DirSlot = [DirEntry; 2];

/// Elements (pairs) of a DIR-24 map: `max_entries` of the kernel map.
pub const V4_DIR_SLOTS: u32 = V4_DIR_ENTRIES / 2;

/// The element holding entry `index` (from [`dir_index`]) and the half it is in (0 or 1).
pub const fn dir_slot(index: u32) -> (u32, u32) {
    (index >> 1, index & 1)
}

/// Capacity of each long-prefix hash (both generations together).
pub const V4_LONG_MAX: u32 = 2 * 1_048_576;
/// Capacity of each IPv6 trie (both generations together).
pub const V6_MAX: u32 = 2 * 131_072;

/// One DIR-24 table entry: the list id covering the /24 by default (bits 0..16) and a mask of the
/// prefix lengths 25..=32 present in the long-prefix hash under this /24 (bit `len - 25` of
/// bits 16..24). Bits 24..32 are zero.
pub type DirEntry = u32;

/// Bits of a [`DirEntry`] that hold the list id.
pub const DIR_LIST_MASK: u32 = 0xffff;
/// Shift of the long-prefix length mask in a [`DirEntry`].
pub const DIR_LONG_SHIFT: u32 = 16;

/// Builds a [`DirEntry`].
pub const fn dir_entry(list: ListId, long_lengths_mask: u8) -> DirEntry {
    (list & DIR_LIST_MASK) | ((long_lengths_mask as u32) << DIR_LONG_SHIFT)
}

/// The list id of a [`DirEntry`].
pub const fn dir_list(e: DirEntry) -> ListId {
    e & DIR_LIST_MASK
}

/// The long-prefix length mask of a [`DirEntry`] (bit `len - 25` set when length `len` exists).
pub const fn dir_long_mask(e: DirEntry) -> u8 {
    (e >> DIR_LONG_SHIFT) as u8
}

/// Index of `addr` (host-order) in generation `generation` of a DIR-24 table.
pub const fn dir_index(generation: u32, addr: u32) -> u32 {
    ((generation & 1) << 24) | (addr >> 8)
}

/// Key of the long-prefix hash: a prefix longer than /24, in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4LongKey {
    /// Network address, host-order `u32`, host bits zero.
    pub addr: u32,
    /// Prefix length, 25..=32.
    pub prefix_len: u8,
    /// Generation, 0 or 1.
    pub generation: u8,
    /// Zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<V4LongKey>() == 8);

impl V4LongKey {
    /// The key for `addr` (host order) masked to `prefix_len` (25..=32) in `generation`.
    pub const fn new(addr: u32, prefix_len: u8, generation: u8) -> Self {
        let mask = if prefix_len >= 32 {
            u32::MAX
        } else {
            !(u32::MAX >> prefix_len)
        };
        V4LongKey {
            addr: addr & mask,
            prefix_len,
            generation,
            _pad: [0; 2],
        }
    }
}

/// IPv6 trie key data: `[generation, 16 address octets]`; the trie prefix length is `8 + len`.
pub type V6KeyData = [u8; 17];

/// Per-list hit counters live in [`crate::maps::LIST_HITS`] as [`crate::counters::Counter`].
pub type ListHits = crate::counters::Counter;

pod!(V4LongKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_entry_round_trips() {
        let e = dir_entry(1023, 0b1000_0001);
        assert_eq!(dir_list(e), 1023);
        assert_eq!(dir_long_mask(e), 0b1000_0001);
        assert_eq!(e >> 24, 0);
    }

    #[test]
    fn dir_index_selects_generation_and_slash24() {
        let a = u32::from_be_bytes([10, 1, 2, 3]);
        assert_eq!(dir_index(0, a), 0x0a0102);
        assert_eq!(dir_index(1, a), (1 << 24) | 0x0a0102);
    }

    #[test]
    fn slots_pair_consecutive_entries() {
        assert_eq!(dir_slot(0), (0, 0));
        assert_eq!(dir_slot(1), (0, 1));
        assert_eq!(dir_slot(dir_index(1, u32::MAX)), (V4_DIR_SLOTS - 1, 1));
        assert_eq!(core::mem::size_of::<DirSlot>(), 8);
    }

    #[test]
    fn long_key_masks_host_bits() {
        let a = u32::from_be_bytes([10, 1, 2, 0xff]);
        assert_eq!(
            V4LongKey::new(a, 25, 1).addr,
            u32::from_be_bytes([10, 1, 2, 0x80])
        );
        assert_eq!(V4LongKey::new(a, 32, 0).addr, a);
    }
}
