//! The one enum of reasons a packet is dropped, shared by the kernel, the API and the CLI.
//!
//! The kernel stores a reason as its `u32` discriminant (map values never hold enums);
//! [`DropReason::from_u32`] is the only way back. Adding a reason appends a variant: existing
//! discriminants never change, because pinned counters are indexed by them.

/// Why a packet was dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The packet's source is in a source blocklist (XDP guard on the uplink).
    SourceBlocklist = 0,
    /// The packet's other end is in a destination blocklist (tunnel device).
    DestinationBlocklist = 1,
    /// The packet could not be parsed (truncated or inconsistent headers) and policy drops it.
    Malformed = 2,
    /// A new flow over the peer's concurrent-flow limit.
    FlowLimit = 3,
    /// The peer's quota bucket is exhausted.
    QuotaExhausted = 4,
    /// Over the peer's bandwidth limit (policing fallback).
    RateLimit = 5,
    /// Held at the admission gate: multi-factor verification pending.
    GateMfaPending = 6,
    /// Held at the admission gate: account or admission deadline expired.
    GateExpired = 7,
    /// Held at the admission gate: kicked by an administrator.
    GateKicked = 8,
    /// Held at the admission gate: over quota for the period.
    GateOverQuota = 9,
    /// Held at the admission gate: outside the allowed time window.
    GateOutsideWindow = 10,
    /// Held at the admission gate: the user's concurrent-device limit is reached.
    GateDeviceLimit = 11,
    /// A tunnel-device packet whose peer end matches no peer's allowed IPs, dropped because
    /// `CONFIG_F_DROP_UNKNOWN_PEER` is set.
    UnknownPeer = 12,
    /// Headers deeper than the kernel parser follows (more than
    /// `MAX_IPV6_EXT_HEADERS` IPv6 extension headers, or a header past `MAX_HEADER_OFFSET`
    /// bytes), or a transport header cut short, where the packet must not pass unseen: on the
    /// uplink, UDP of unknown port from a source in a source blocklist (XDP guard); on the
    /// tunnel device, a packet of a flow-limited peer whose 5-tuple cannot be read (flow step).
    Unparseable = 13,
}

/// Number of defined reasons.
pub const DROP_REASON_COUNT: usize = 14;

/// Slots reserved for reasons in counter arrays (room to append reasons without a layout change).
pub const DROP_REASON_SLOTS: usize = 16;

const _: () = assert!(DROP_REASON_COUNT <= DROP_REASON_SLOTS);

impl DropReason {
    /// Every reason, in discriminant order.
    pub const ALL: [DropReason; DROP_REASON_COUNT] = [
        DropReason::SourceBlocklist,
        DropReason::DestinationBlocklist,
        DropReason::Malformed,
        DropReason::FlowLimit,
        DropReason::QuotaExhausted,
        DropReason::RateLimit,
        DropReason::GateMfaPending,
        DropReason::GateExpired,
        DropReason::GateKicked,
        DropReason::GateOverQuota,
        DropReason::GateOutsideWindow,
        DropReason::GateDeviceLimit,
        DropReason::UnknownPeer,
        DropReason::Unparseable,
    ];

    /// The reason with discriminant `v`, if any.
    pub const fn from_u32(v: u32) -> Option<DropReason> {
        if (v as usize) < DROP_REASON_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// Stable kebab-case name, as the CLI prints it and the API documents it.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::SourceBlocklist => "source-blocklist",
            DropReason::DestinationBlocklist => "destination-blocklist",
            DropReason::Malformed => "malformed",
            DropReason::FlowLimit => "flow-limit",
            DropReason::QuotaExhausted => "quota-exhausted",
            DropReason::RateLimit => "rate-limit",
            DropReason::GateMfaPending => "gate-mfa-pending",
            DropReason::GateExpired => "gate-expired",
            DropReason::GateKicked => "gate-kicked",
            DropReason::GateOverQuota => "gate-over-quota",
            DropReason::GateOutsideWindow => "gate-outside-window",
            DropReason::GateDeviceLimit => "gate-device-limit",
            DropReason::UnknownPeer => "unknown-peer",
            DropReason::Unparseable => "unparseable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_round_trip_and_match_positions() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32 as usize, i);
            assert_eq!(DropReason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(DropReason::from_u32(DROP_REASON_COUNT as u32), None);
    }

    #[test]
    fn names_are_unique() {
        for a in DropReason::ALL {
            for b in DropReason::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }
}
