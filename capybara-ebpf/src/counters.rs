//! Counting: every verdict increments exactly one slot of `COUNTERS` (the named constants of
//! `capybara_common::counters`) or, for the socket programs, of `SOCK_COUNTERS`
//! (`capybara_common::sock`); a drop also increments `DROPS_BASE + reason`, the hit counter of
//! the list that matched, and — when the packet belongs to a known peer — that peer's
//! `PeerDrops::drops[reason]`.
//!
//! All these maps are per-CPU arrays: a program runs on one CPU at a time and is not preempted by
//! another BPF program touching the same CPU's slot, so plain (non-atomic) adds are exact. The
//! agent sums the CPUs when it reads.

use capybara_common::{
    blocklist::ListId,
    counters::{Counter, DROPS_BASE},
    drop::DropReason,
    peer::PeerId,
    sock::SOCK_SLOT_BASE,
};

use crate::maps::{COUNTERS, LIST_HITS, PEER_DROPS, SOCK_COUNTERS};

#[inline(always)]
fn bump(c: *mut Counter, amount: Counter) {
    // SAFETY: `c` comes from a successful per-CPU array lookup: it points at this CPU's
    // `Counter`, valid for the whole program run and not shared with another CPU.
    unsafe {
        (*c).packets = (*c).packets.wrapping_add(amount.packets);
        (*c).bytes = (*c).bytes.wrapping_add(amount.bytes);
    }
}

/// Counts `amount` (packets and bytes) at verdict slot `slot`: a slot of `COUNTERS`, or from
/// `SOCK_SLOT_BASE` on one of the socket programs' `SOCK_COUNTERS` (slots are constants at
/// every call site, so the branch is folded away).
#[inline(always)]
pub fn count(slot: u32, amount: Counter) {
    let c = if slot >= SOCK_SLOT_BASE {
        SOCK_COUNTERS.get_ptr_mut(slot - SOCK_SLOT_BASE)
    } else {
        COUNTERS.get_ptr_mut(slot)
    };
    if let Some(c) = c {
        bump(c, amount);
    }
}

/// Counts a dropped packet: its verdict slot, `DROPS_BASE + reason`, and the peer's
/// `drops[reason]` when the packet belongs to a known peer.
#[inline(always)]
pub fn count_drop(slot: u32, reason: DropReason, amount: Counter, peer: Option<PeerId>) {
    count(slot, amount);
    count(DROPS_BASE + reason as u32, amount);
    if let Some(p) = peer.and_then(|id| PEER_DROPS.get_ptr_mut(id)) {
        // SAFETY: `p` comes from a successful per-CPU array lookup of `PEER_DROPS` (this CPU's
        // value). `reason as usize` is below `DROP_REASON_COUNT <= DROP_REASON_SLOTS` (asserted
        // in capybara-common), so the array index cannot go out of bounds.
        unsafe {
            let d = &mut (*p).drops[reason as usize];
            *d = d.wrapping_add(amount.packets);
        }
    }
}

/// Counts a hit of list `list` (ids beyond the map are silently not counted).
#[inline(always)]
pub fn count_list_hit(list: ListId, amount: Counter) {
    if let Some(c) = LIST_HITS.get_ptr_mut(list) {
        bump(c, amount);
    }
}
