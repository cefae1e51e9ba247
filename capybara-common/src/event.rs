//! Events: fixed-size records the kernel writes into the `CAPY_EVENTS` ring buffer and the
//! agent decodes into typed events.
//!
//! One record layout for every kind ([`EventRecord`]): the kind, the peer, a reason, kind
//! specific flags, the kernel time, and four `u64` arguments whose meaning the kind defines
//! (room for quota warnings and flow-limit hits). Kinds are appended, never renumbered; the
//! agent reports a kind it does not know instead of failing.
//!
//! Events never block or fail the packet path: a record that does not fit in the ring buffer
//! is counted in `counters::EVENTS_LOST` and the packet's verdict is unchanged.

use crate::pod;

/// A peer's packet was dropped at the admission gate (the first drop of the peer in an
/// interval, `Config::event_interval_ns`). `reason`: the `Gate*` `DropReason`; `flags`:
/// [`EVENT_F_EGRESS`] when the dropped packet was going to the peer; `args[0]`: the admission
/// deadline (CLOCK_BOOTTIME ns) for `GateExpired`, else 0; `args[1]`: the packet's length.
pub const EVENT_GATE_DROP: u32 = 1;

/// A quota bucket reached a warning threshold (each at most once per bucket epoch; see
/// [`crate::quota`]). `peer`: the peer whose packet reached it; `reason`: the threshold in
/// percent (80, 90 or 100; 100 = exhausted, later packets are dropped); `flags`:
/// [`EVENT_F_EGRESS`] as for gate drops; `args`: `[bucket id, used bytes (this packet
/// included), limit bytes, bucket epoch]`.
pub const EVENT_QUOTA: u32 = 2;

/// A new flow of a peer was refused (rate-limited per peer like gate drops). `reason`:
/// `DropReason::FlowLimit`; `flags`: [`EVENT_F_EGRESS`] as for gate drops; `args`: `[the peer's
/// flow limit, its flow count when refused, the flow's IP protocol, 1 if the flow table was
/// full (else 0)]`.
pub const EVENT_FLOW_LIMIT: u32 = 3;

/// `EventRecord::flags`: the packet was travelling to the peer (TC egress); clear: from it.
pub const EVENT_F_EGRESS: u32 = 1 << 0;

/// One ring-buffer record. 56 bytes (64 in the ring with the kernel's 8-byte header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRecord {
    /// `EVENT_*` kind.
    pub kind: u32,
    /// The peer concerned.
    pub peer: u32,
    /// A `DropReason` discriminant, when the kind has one.
    pub reason: u32,
    /// `EVENT_F_*` bits.
    pub flags: u32,
    /// When, in CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`).
    pub time_ns: u64,
    /// Kind-specific arguments.
    pub args: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<EventRecord>() == 56);

/// Size of `CAPY_EVENTS` in bytes: 256 KiB, room for 4096 records in flight (a power-of-two
/// multiple of the page size, as the kernel requires).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

pod!(EventRecord);
