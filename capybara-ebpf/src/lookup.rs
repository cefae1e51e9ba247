//! Lookups shared by the programs: the runtime config, peer attribution, and the blocklists.
//!
//! ## Blocklists (see `capybara_common::blocklist` for the layout)
//! One [`Blocklist`] value per direction bundles that direction's three maps (source lists for
//! the XDP guard, destination lists for the tunnel device); the lookup code is shared.
//!
//! - IPv4: one read of the DIR-24 entry `dir_index(gen, addr)` (stored two to a map element,
//!   `dir_slot` says which element and which half) decides every address whose /24 has no
//!   longer prefix. Otherwise the entry's length mask says which lengths 25..=32 exist
//!   under that /24; they are probed longest first in the long-prefix hash, and the first hit is
//!   the answer (the agent compiles the long prefixes of a /24 to be disjoint, so "first hit" is
//!   "longest match"). A hit may be list 0: an allow hole inside a blocked /24. At most 8 hash
//!   probes, in a loop with a constant bound. The cost does not depend on the list size.
//! - IPv6: one LPM trie lookup with key `[gen, addr…]`, prefix length `8 + 128`.
//!
//! The generation comes from `CONFIG` (`src_generation` / `dst_generation`), read once per
//! packet: the agent writes the inactive generation completely, then flips the `u32`, so a packet
//! sees the old lists or the new ones, never a mix.
//!
//! ## Peers
//! IPv4 addresses inside the tunnel's address pool: one array read (`PEER_POOL_V4`). Other
//! host routes: exact-match hashes (IPv4 as host-order `u32`, IPv6 as octets); only when
//! the config says some peer has a range (`CONFIG_F_PEER_V4_RANGES` / `_V6_RANGES`) the LPM trie
//! (network-order octets) is consulted, so the common all-host-routes case is one hash lookup.

use aya_ebpf::maps::{Array, HashMap, LpmTrie, lpm_trie::Key};
use capybara_common::{
    blocklist::{
        DirSlot, ListId, V4LongKey, V6KeyData, dir_index, dir_list, dir_long_mask, dir_slot,
    },
    config::{
        CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS, CONFIG_F_PEER_V4_RANGES,
        CONFIG_F_PEER_V6_RANGES, CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS, Config,
    },
    peer::PeerId,
};

use crate::maps::{
    CONFIG, DST_V4_DIR, DST_V4_LONG, DST_V6, PEER_POOL_V4, PEER_V4, PEER_V4_LPM, PEER_V6,
    PEER_V6_LPM, SRC_V4_DIR, SRC_V4_LONG, SRC_V6,
};

/// The runtime configuration (all zero if the agent has not written it yet: generation 0, no
/// flags).
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// The compiled blocklists of one direction.
pub struct Blocklist {
    dir: &'static Array<DirSlot>,
    long: &'static HashMap<V4LongKey, ListId>,
    v6: &'static LpmTrie<V6KeyData, ListId>,
    /// `CONFIG_F_*_V4_LISTS` of this direction: without it the IPv4 lookup is skipped.
    v4_flag: u32,
    /// `CONFIG_F_*_V6_LISTS` of this direction.
    v6_flag: u32,
    /// Source lists read `src_generation`, destination lists `dst_generation`.
    source: bool,
}

/// Source lists (XDP guard on the uplink).
pub static SOURCE: Blocklist = Blocklist {
    dir: &SRC_V4_DIR,
    long: &SRC_V4_LONG,
    v6: &SRC_V6,
    v4_flag: CONFIG_F_SRC_V4_LISTS,
    v6_flag: CONFIG_F_SRC_V6_LISTS,
    source: true,
};
/// Destination lists (tunnel device, both directions: the end that is not the peer).
pub static DESTINATION: Blocklist = Blocklist {
    dir: &DST_V4_DIR,
    long: &DST_V4_LONG,
    v6: &DST_V6,
    v4_flag: CONFIG_F_DST_V4_LISTS,
    v6_flag: CONFIG_F_DST_V6_LISTS,
    source: false,
};

impl Blocklist {
    #[inline(always)]
    fn generation(&self, cfg: &Config) -> u32 {
        if self.source {
            cfg.src_generation
        } else {
            cfg.dst_generation
        }
    }

    /// The list covering IPv4 `addr` (host order) in the active generation; 0 = none.
    #[inline(always)]
    pub fn v4(&self, cfg: &Config, addr: u32) -> ListId {
        if cfg.flags & self.v4_flag == 0 {
            return 0;
        }
        let generation = self.generation(cfg);
        let (slot, half) = dir_slot(dir_index(generation, addr));
        let entry = match self.dir.get(slot) {
            Some(pair) if half == 0 => pair[0],
            Some(pair) => pair[1],
            None => return 0,
        };
        let mask = dir_long_mask(entry);
        if mask != 0 {
            let generation = (generation & 1) as u8;
            let mut bit = 7u8;
            // Lengths 32 down to 25: bit `len - 25` of the mask.
            for _ in 0..8 {
                if mask & (1u8 << bit) != 0 {
                    let key = V4LongKey::new(addr, 25 + bit, generation);
                    if let Some(hit) = self.long.get_ptr(key) {
                        // SAFETY: `hit` points at the map value of a successful lookup, valid
                        // while this program runs; a concurrent update replaces it whole (u32).
                        return unsafe { *hit };
                    }
                }
                bit = bit.wrapping_sub(1);
            }
        }
        dir_list(entry)
    }

    /// The list covering IPv6 `addr` in the active generation; 0 = none.
    #[inline(always)]
    pub fn v6(&self, cfg: &Config, addr: &[u8; 16]) -> ListId {
        if cfg.flags & self.v6_flag == 0 {
            return 0;
        }
        let generation = self.generation(cfg);
        // A fixed-size copy without slice indexing (no bounds check, no panic path).
        #[rustfmt::skip]
        let [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15] = *addr;
        #[rustfmt::skip]
        let data: V6KeyData = [
            (generation & 1) as u8,
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
        ];
        match self.v6.get(Key::new(8 + 128, data)) {
            Some(l) => *l,
            None => 0,
        }
    }
}

/// The peer whose allowed IPs contain IPv4 `addr` (host order). Inside the address pool
/// (`Config::peer_pool_v4_*`) the pool's slot is authoritative for host routes: one array read,
/// no hashing; outside it, the host-route hash. Then the ranges, if any.
#[inline(always)]
pub fn peer_v4(addr: u32, cfg: &Config) -> Option<PeerId> {
    let off = addr.wrapping_sub(cfg.peer_pool_v4_base);
    if off < cfg.peer_pool_v4_len {
        if let Some(slot) = PEER_POOL_V4.get(off)
            && *slot != 0
        {
            return Some(*slot - 1);
        }
    } else if let Some(p) = PEER_V4.get_ptr(addr) {
        // SAFETY: `p` points at the value of a successful hash lookup (a `u32`), valid for this
        // program run.
        return Some(unsafe { *p });
    }
    if cfg.flags & CONFIG_F_PEER_V4_RANGES == 0 {
        return None;
    }
    PEER_V4_LPM.get(Key::new(32, addr.to_be_bytes())).copied()
}

/// The peer whose allowed IPs contain IPv6 `addr`.
#[inline(always)]
pub fn peer_v6(addr: &[u8; 16], flags: u32) -> Option<PeerId> {
    if let Some(p) = PEER_V6.get_ptr(addr) {
        // SAFETY: as in `peer_v4`.
        return Some(unsafe { *p });
    }
    if flags & CONFIG_F_PEER_V6_RANGES == 0 {
        return None;
    }
    PEER_V6_LPM.get(Key::new(128, *addr)).copied()
}
