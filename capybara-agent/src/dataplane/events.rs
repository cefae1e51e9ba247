//! Kernel events: the `CAPY_EVENTS` ring buffer read asynchronously and decoded into [`Event`].
//!
//! [`EventStream`] wraps the ring buffer in a tokio [`AsyncFd`]: the task sleeps until the kernel
//! signals data (epoll on the ring buffer's fd), then drains every available record before
//! waiting again; there is no polling loop. The kernel side (rate limit, loss counting) is
//! described in `capybara_common::event`: a record lost to a full ring is counted in
//! `EVENTS_LOST`, and the packet's verdict never depends on the event.
//!
//! Records carry CLOCK_BOOTTIME timestamps; [`decode`] turns them into wall-clock times with the
//! clocks read at decode time (see [`super::gate`] for the conversion).

use std::{
    io,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use capybara_common::{
    drop::DropReason,
    event::{EVENT_F_EGRESS, EVENT_FLOW_LIMIT, EVENT_GATE_DROP, EVENT_QUOTA, EventRecord},
    maps as names,
    peer::PeerId,
    quota::BucketId,
};
use tokio::io::unix::AsyncFd;

use super::{
    DataplaneError, Result,
    gate::{clocks_now, is_gate_reason, wall_time_of_boottime},
};

/// Which way a packet was travelling, seen from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDirection {
    /// From the peer (tunnel device ingress).
    FromPeer,
    /// To the peer (tunnel device egress).
    ToPeer,
}

/// A quota warning threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuotaThreshold {
    /// 80 % of the budget used.
    Percent80,
    /// 90 % used.
    Percent90,
    /// 100 %: the bucket is exhausted, its traffic is dropped from the next packet on.
    Exhausted,
}

impl QuotaThreshold {
    /// The threshold in percent.
    pub const fn percent(self) -> u32 {
        match self {
            QuotaThreshold::Percent80 => 80,
            QuotaThreshold::Percent90 => 90,
            QuotaThreshold::Exhausted => 100,
        }
    }

    fn from_percent(p: u32) -> Option<QuotaThreshold> {
        match p {
            80 => Some(QuotaThreshold::Percent80),
            90 => Some(QuotaThreshold::Percent90),
            100 => Some(QuotaThreshold::Exhausted),
            _ => None,
        }
    }
}

/// A decoded kernel event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A held peer's packet was dropped at the admission gate (the first in an interval).
    GateDrop {
        /// The peer.
        peer: PeerId,
        /// Its hold reason (`GateExpired` when an admission deadline passed).
        reason: DropReason,
        /// The dropped packet's direction.
        direction: PeerDirection,
        /// When the packet was dropped.
        at: SystemTime,
        /// For `GateExpired`: the deadline that passed.
        deadline: Option<SystemTime>,
        /// The dropped packet's length in bytes.
        packet_len: u64,
    },
    /// A quota bucket reached a threshold (each once per bucket period).
    Quota {
        /// The bucket.
        bucket: BucketId,
        /// Which threshold.
        threshold: QuotaThreshold,
        /// Bytes used, the packet that reached the threshold included.
        used: u64,
        /// The budget.
        limit: u64,
        /// The bucket's period (epoch) the usage belongs to.
        epoch: u32,
        /// The peer whose packet reached it.
        peer: PeerId,
        /// When.
        at: SystemTime,
    },
    /// A new flow of a peer was refused (rate-limited: the first refusal per interval).
    FlowLimit {
        /// The peer.
        peer: PeerId,
        /// The refused packet's direction.
        direction: PeerDirection,
        /// The peer's flow limit.
        limit: u32,
        /// Its flow count when the flow was refused.
        count: u64,
        /// The refused flow's IP protocol.
        protocol: u8,
        /// The flow table was full (all peers together), rather than the peer at its limit.
        table_full: bool,
        /// When.
        at: SystemTime,
    },
    /// A kind this agent does not know (written by a newer kernel object).
    Unknown {
        /// The record's kind.
        kind: u32,
        /// The record's peer.
        peer: PeerId,
    },
}

/// A ring-buffer record that cannot be decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// The record is shorter than an `EventRecord`.
    #[error("event record of {len} bytes, expected at least {expected}")]
    Short {
        /// Its length.
        len: usize,
        /// `size_of::<EventRecord>()`.
        expected: usize,
    },
    /// A quota record whose threshold is not 80, 90 or 100, or whose bucket does not fit.
    #[error("quota event for bucket {bucket} with threshold {threshold} %, expected 80, 90 or 100")]
    BadThreshold {
        /// The raw bucket argument.
        bucket: u64,
        /// The raw threshold.
        threshold: u32,
    },
    /// A flow-limit record whose limit or protocol does not fit its field.
    #[error("flow-limit event for peer {peer} with limit {limit} and protocol {protocol}")]
    BadFlowLimit {
        /// The peer.
        peer: PeerId,
        /// The raw limit argument.
        limit: u64,
        /// The raw protocol argument.
        protocol: u64,
    },
    /// A gate-drop record whose reason is no gate reason.
    #[error("gate-drop event for peer {peer} with reason {reason}, which is no gate reason")]
    BadReason {
        /// The peer.
        peer: PeerId,
        /// The raw reason.
        reason: u32,
    },
}

/// Decodes one record, converting kernel times with clocks read at `wall_now`/`boot_now`.
pub fn decode(bytes: &[u8], wall_now: SystemTime, boot_now: Duration) -> Result<Event, EventError> {
    let rec = record(bytes)?;
    match rec.kind {
        EVENT_GATE_DROP => {
            let reason = DropReason::from_u32(rec.reason)
                .filter(|r| is_gate_reason(*r))
                .ok_or(EventError::BadReason {
                    peer: rec.peer,
                    reason: rec.reason,
                })?;
            Ok(Event::GateDrop {
                peer: rec.peer,
                reason,
                direction: if rec.flags & EVENT_F_EGRESS != 0 {
                    PeerDirection::ToPeer
                } else {
                    PeerDirection::FromPeer
                },
                at: wall_time_of_boottime(rec.time_ns, wall_now, boot_now),
                deadline: (rec.args[0] != 0)
                    .then(|| wall_time_of_boottime(rec.args[0], wall_now, boot_now)),
                packet_len: rec.args[1],
            })
        }
        EVENT_QUOTA => {
            let bad = EventError::BadThreshold {
                bucket: rec.args[0],
                threshold: rec.reason,
            };
            let threshold = QuotaThreshold::from_percent(rec.reason).ok_or(bad.clone())?;
            Ok(Event::Quota {
                bucket: BucketId::try_from(rec.args[0]).map_err(|_| bad)?,
                threshold,
                used: rec.args[1],
                limit: rec.args[2],
                epoch: rec.args[3] as u32,
                peer: rec.peer,
                at: wall_time_of_boottime(rec.time_ns, wall_now, boot_now),
            })
        }
        EVENT_FLOW_LIMIT => {
            let bad = || EventError::BadFlowLimit {
                peer: rec.peer,
                limit: rec.args[0],
                protocol: rec.args[2],
            };
            Ok(Event::FlowLimit {
                peer: rec.peer,
                direction: if rec.flags & EVENT_F_EGRESS != 0 {
                    PeerDirection::ToPeer
                } else {
                    PeerDirection::FromPeer
                },
                limit: u32::try_from(rec.args[0]).map_err(|_| bad())?,
                count: rec.args[1],
                protocol: u8::try_from(rec.args[2]).map_err(|_| bad())?,
                table_full: rec.args[3] != 0,
                at: wall_time_of_boottime(rec.time_ns, wall_now, boot_now),
            })
        }
        kind => Ok(Event::Unknown {
            kind,
            peer: rec.peer,
        }),
    }
}

/// The raw `EventRecord` at the start of `bytes` (any alignment).
pub fn record(bytes: &[u8]) -> Result<EventRecord, EventError> {
    let expected = size_of::<EventRecord>();
    if bytes.len() < expected {
        return Err(EventError::Short {
            len: bytes.len(),
            expected,
        });
    }
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap());
    Ok(EventRecord {
        kind: u32_at(0),
        peer: u32_at(4),
        reason: u32_at(8),
        flags: u32_at(12),
        time_ns: u64_at(16),
        args: [u64_at(24), u64_at(32), u64_at(40), u64_at(48)],
    })
}

/// The events ring buffer, read asynchronously. From [`super::Dataplane::event_stream`]; one per
/// dataplane (the ring buffer has one consumer position).
pub struct EventStream {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// Registers the ring buffer with the current tokio runtime's reactor (must be called
    /// within one).
    pub(super) fn new(ring: RingBuf<MapData>) -> io::Result<EventStream> {
        // SAFETY: the fd `ring.as_raw_fd()` returns is the map's, owned by `ring` (its
        // `MapData`), so it stays open and the same for as long as the `AsyncFd` owns `ring`.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(EventStream { fd })
    }

    /// The next event: returns at once while records are buffered, else waits for the kernel's
    /// wake-up. A record that does not decode is returned as [`DataplaneError::Event`]; the
    /// stream stays usable.
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            let mut guard =
                self.fd
                    .readable_mut()
                    .await
                    .map_err(|source| DataplaneError::Syscall {
                        map: names::EVENTS,
                        op: "wait for events",
                        source,
                    })?;
            if let Some(item) = guard.get_inner_mut().next() {
                let (wall_now, boot_now) = clocks_now();
                return decode(&item, wall_now, boot_now).map_err(DataplaneError::Event);
            }
            // Drained: wait for the next wake-up.
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(rec: &EventRecord) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [rec.kind, rec.peer, rec.reason, rec.flags] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(&rec.time_ns.to_ne_bytes());
        for a in rec.args {
            v.extend_from_slice(&a.to_ne_bytes());
        }
        v
    }

    const SEC: Duration = Duration::from_secs(1);

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn gate_drop_decodes_with_wall_times() {
        let rec = EventRecord {
            kind: EVENT_GATE_DROP,
            peer: 7,
            reason: DropReason::GateExpired as u32,
            flags: EVENT_F_EGRESS,
            time_ns: 95 * 1_000_000_000,
            args: [90 * 1_000_000_000, 1500, 0, 0],
        };
        let e = decode(&bytes(&rec), wall(1000), 100 * SEC).unwrap();
        assert_eq!(
            e,
            Event::GateDrop {
                peer: 7,
                reason: DropReason::GateExpired,
                direction: PeerDirection::ToPeer,
                at: wall(995),
                deadline: Some(wall(990)),
                packet_len: 1500,
            }
        );
    }

    #[test]
    fn held_reason_without_deadline_and_ingress() {
        let rec = EventRecord {
            kind: EVENT_GATE_DROP,
            peer: 3,
            reason: DropReason::GateMfaPending as u32,
            ..EventRecord::default()
        };
        let Event::GateDrop {
            direction,
            deadline,
            ..
        } = decode(&bytes(&rec), wall(1000), SEC).unwrap()
        else {
            panic!("not a gate drop");
        };
        assert_eq!((direction, deadline), (PeerDirection::FromPeer, None));
    }

    #[test]
    fn bad_records_are_typed_errors() {
        assert_eq!(
            decode(&[0u8; 10], wall(1), SEC),
            Err(EventError::Short {
                len: 10,
                expected: 56
            })
        );
        let rec = EventRecord {
            kind: EVENT_GATE_DROP,
            peer: 2,
            reason: DropReason::DestinationBlocklist as u32,
            ..EventRecord::default()
        };
        assert_eq!(
            decode(&bytes(&rec), wall(1), SEC),
            Err(EventError::BadReason { peer: 2, reason: 1 })
        );
        let rec = EventRecord {
            kind: 99,
            peer: 4,
            ..EventRecord::default()
        };
        assert_eq!(
            decode(&bytes(&rec), wall(1), SEC),
            Ok(Event::Unknown { kind: 99, peer: 4 })
        );
    }

    #[test]
    fn quota_records_decode_to_typed_thresholds() {
        for (percent, want) in [
            (80, QuotaThreshold::Percent80),
            (90, QuotaThreshold::Percent90),
            (100, QuotaThreshold::Exhausted),
        ] {
            let rec = EventRecord {
                kind: EVENT_QUOTA,
                peer: 3,
                reason: percent,
                flags: EVENT_F_EGRESS,
                time_ns: 5_000_000_000,
                args: [42, 900, 1000, 7],
            };
            assert_eq!(
                decode(&bytes(&rec), wall(100), 10 * SEC),
                Ok(Event::Quota {
                    bucket: 42,
                    threshold: want,
                    used: 900,
                    limit: 1000,
                    epoch: 7,
                    peer: 3,
                    at: wall(95),
                })
            );
            assert_eq!(want.percent(), percent);
        }
        let rec = EventRecord {
            kind: EVENT_QUOTA,
            reason: 85,
            args: [42, 0, 0, 0],
            ..EventRecord::default()
        };
        assert_eq!(
            decode(&bytes(&rec), wall(1), SEC),
            Err(EventError::BadThreshold {
                bucket: 42,
                threshold: 85
            })
        );
    }

    #[test]
    fn flow_limit_records_decode_and_bad_fields_are_typed_errors() {
        let rec = EventRecord {
            kind: EVENT_FLOW_LIMIT,
            peer: 9,
            reason: DropReason::FlowLimit as u32,
            flags: 0,
            time_ns: 5_000_000_000,
            args: [3, 3, 6, 0],
        };
        assert_eq!(
            decode(&bytes(&rec), wall(100), 10 * SEC),
            Ok(Event::FlowLimit {
                peer: 9,
                direction: PeerDirection::FromPeer,
                limit: 3,
                count: 3,
                protocol: 6,
                table_full: false,
                at: wall(95),
            })
        );
        let full = EventRecord {
            flags: EVENT_F_EGRESS,
            args: [3, 1, 17, 1],
            ..rec
        };
        assert!(matches!(
            decode(&bytes(&full), wall(100), 10 * SEC),
            Ok(Event::FlowLimit {
                direction: PeerDirection::ToPeer,
                protocol: 17,
                table_full: true,
                ..
            })
        ));
        let bad = EventRecord {
            args: [u64::MAX, 0, 6, 0],
            ..rec
        };
        assert_eq!(
            decode(&bytes(&bad), wall(1), SEC),
            Err(EventError::BadFlowLimit {
                peer: 9,
                limit: u64::MAX,
                protocol: 6
            })
        );
    }
}
