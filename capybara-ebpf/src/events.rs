//! Events into the `CAPY_EVENTS` ring buffer (layout: `capybara_common::event`).
//!
//! Per-peer rate limit: `PEER_EVENTS[peer].last_ns[slot]` holds when the last event of that kind
//! was emitted; a new one goes out only `Config::event_interval_ns` (default 1 s) later. The
//! claim is a compare-exchange of `last_ns` from the value read to `now`: of CPUs racing for the
//! same interval only the one whose exchange succeeds emits, so the bound is one event per
//! interval per peer and kind, whatever the CPU count. A full ring buffer loses the record
//! (counted in `EVENTS_LOST`), never the packet's verdict.

use capybara_common::{
    config::DEFAULT_EVENT_INTERVAL_NS,
    counters::{Counter, EVENTS_EMITTED, EVENTS_LOST},
    event::EventRecord,
    peer::{PEER_EVENT_SLOT_FLOW, PEER_EVENT_SLOT_GATE, PeerId},
};

use crate::{
    atomic::compare_exchange,
    counters::count,
    maps::{EVENTS, PEER_EVENTS},
};

/// True (and the state updated) when peer `id` may emit an event of `slot` at `now`.
#[inline(always)]
fn rate_ok(id: PeerId, slot: usize, now: u64, interval_ns: u64) -> bool {
    let interval = if interval_ns == 0 {
        DEFAULT_EVENT_INTERVAL_NS
    } else {
        interval_ns
    };
    let Some(state) = PEER_EVENTS.get_ptr_mut(id) else {
        return false;
    };
    // SAFETY: `state` points at the array element of a successful lookup, valid for this program
    // run (8-byte aligned `u64`s); other CPUs change it only through `compare_exchange`. `slot`
    // is a constant below `PEER_EVENT_SLOTS` at every call site, and `get_mut` bounds the index
    // anyway.
    unsafe {
        let Some(last) = (*state).last_ns.get_mut(slot) else {
            return false;
        };
        let last: *mut u64 = last;
        let seen = core::ptr::read_volatile(last);
        if seen != 0 && now.wrapping_sub(seen) < interval {
            return false;
        }
        compare_exchange(last, seen, now) == seen
    }
}

/// Emits `rec` if the peer's rate limit for `slot` allows it; counts the outcome.
#[inline(always)]
pub fn emit_limited(rec: &EventRecord, slot: usize, interval_ns: u64) {
    if !rate_ok(rec.peer, slot, rec.time_ns, interval_ns) {
        return;
    }
    emit(rec);
}

/// Emits `rec` (no rate limit: the caller guarantees the bound); counts the outcome.
#[inline(always)]
pub fn emit(rec: &EventRecord) {
    let one = Counter {
        packets: 1,
        bytes: 0,
    };
    match EVENTS.output::<EventRecord>(rec, 0) {
        Ok(()) => count(EVENTS_EMITTED, one),
        Err(_) => count(EVENTS_LOST, one),
    }
}

/// Slot of gate-drop events.
pub const SLOT_GATE: usize = PEER_EVENT_SLOT_GATE;

/// Slot of flow-limit events.
pub const SLOT_FLOW: usize = PEER_EVENT_SLOT_FLOW;
