//! proto ↔ domain conversions shared by the API's features: kernel types (drop reasons,
//! counters), times, optional names, traffic, and [`AnswerError`] for an answer that does not
//! make a domain value. Both sides of the kernel conversions are foreign types here
//! (`capybara_common` and the generated proto), hence functions rather than `From` impls. Each
//! feature's own conversions live in its file; requests become validated domain input with
//! `TryFrom` (every error names the proto field), answers become proto messages with `From`, and
//! the client turns them back with `TryFrom`, so the CLI prints domain types only.

use std::time::SystemTime;

use crate::service::{
    Traffic,
    domain::MAX_YAML_BYTES,
    domain::{DeviceName, Protocol, UserName, ValidationError, from_unix_secs},
};

/// The largest gRPC message of the services that carry a YAML document (policy files,
/// configuration templates), each way: the largest document the agent accepts
/// ([`MAX_YAML_BYTES`]) and room for the rest of the message. tonic's default, 4 MiB, would cut
/// a policy file for 100 000 users (≈ 7 MiB) with a transport error instead of our own.
pub const MAX_DOCUMENT_MESSAGE: usize = MAX_YAML_BYTES + (1 << 20);

use capybara_common::{counters::Counter, drop::DropReason, peer::PeerStats};
use capybara_proto::v1 as pb;

/// A message from a client could not be turned into a domain value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// An enum field holds a value this agent does not know (or the unspecified zero).
    #[error("field {field}: unknown value {value}")]
    UnknownEnumValue {
        /// The field's name.
        field: &'static str,
        /// The value received.
        value: i32,
    },
}

/// The proto value of a drop reason: the kernel discriminant + 1 (0 is proto3's "unspecified").
pub fn drop_reason_to_proto(r: DropReason) -> pb::DropReason {
    pb::DropReason::try_from(r as i32 + 1).expect("proto DropReason mirrors capybara-common")
}

/// The drop reason of a proto value received in field `field`.
pub fn drop_reason_from_proto(field: &'static str, value: i32) -> Result<DropReason, ConvertError> {
    u32::try_from(value - 1)
        .ok()
        .and_then(DropReason::from_u32)
        .ok_or(ConvertError::UnknownEnumValue { field, value })
}

/// Packets and bytes.
pub fn counter_to_proto(c: Counter) -> pb::Counter {
    pb::Counter {
        packets: c.packets,
        bytes: c.bytes,
    }
}

/// Per-peer counters; only reasons with drops are listed.
pub fn peer_stats_to_proto(s: &PeerStats) -> pb::PeerStats {
    let drops = DropReason::ALL
        .iter()
        .filter_map(|r| {
            let packets = s.drops[*r as usize];
            (packets > 0).then(|| pb::DropCount {
                reason: drop_reason_to_proto(*r) as i32,
                packets,
            })
        })
        .collect();
    pb::PeerStats {
        rx: Some(counter_to_proto(Counter {
            packets: s.rx_packets,
            bytes: s.rx_bytes,
        })),
        tx: Some(counter_to_proto(Counter {
            packets: s.tx_packets,
            bytes: s.tx_bytes,
        })),
        drops,
    }
}

pub(super) fn opt_secs(v: Option<u64>) -> i64 {
    v.map_or(0, |s| s as i64)
}

pub(super) fn secs_opt(v: i64) -> Option<u64> {
    (v > 0).then_some(v as u64)
}

/// A future timestamp in seconds (0 = none) from field `field`.
pub(super) fn time_field(
    field: &'static str,
    v: i64,
) -> Result<Option<SystemTime>, ValidationError> {
    match v {
        0 => Ok(None),
        v if v < 0 => Err(ValidationError::Time {
            field,
            reason: "must be seconds since the Unix epoch",
        }),
        v => Ok(Some(from_unix_secs(v as u64))),
    }
}

/// The device in `field`; empty = `None`.
pub fn opt_device(field: &'static str, s: &str) -> Result<Option<DeviceName>, ValidationError> {
    (!s.is_empty())
        .then(|| DeviceName::parse(field, s))
        .transpose()
}

/// The user in `field`; empty = `None`.
pub fn opt_user(field: &'static str, s: &str) -> Result<Option<UserName>, ValidationError> {
    (!s.is_empty())
        .then(|| UserName::parse(field, s))
        .transpose()
}

pub(super) fn traffic_to_proto(t: Traffic) -> pb::Counter {
    pb::Counter {
        packets: t.packets,
        bytes: t.bytes,
    }
}

pub(super) fn traffic_from_proto(c: Option<pb::Counter>) -> Traffic {
    c.map(|c| Traffic {
        packets: c.packets,
        bytes: c.bytes,
    })
    .unwrap_or_default()
}

/// An answer from the agent that does not make a domain value (a bug or a version skew).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// A field failed validation.
    #[error("answer field {0}")]
    Field(#[from] ValidationError),
    /// A message field is missing.
    #[error("answer field {field} is missing")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// An address or enum field does not parse.
    #[error("answer field {field} is not valid")]
    Invalid {
        /// The field.
        field: &'static str,
    },
}

pub(super) fn need<T>(field: &'static str, v: Option<T>) -> Result<T, AnswerError> {
    v.ok_or(AnswerError::Missing { field })
}

/// A protocol's name in an answer; empty (an older agent's answer) is WireGuard.
pub(super) fn protocol_from_proto(
    field: &'static str,
    s: &str,
) -> Result<Protocol, ValidationError> {
    if s.is_empty() {
        Ok(Protocol::Wireguard)
    } else {
        Protocol::parse(field, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_has_its_own_proto_value_and_comes_back() {
        let mut seen = std::collections::BTreeSet::new();
        for r in DropReason::ALL {
            let p = drop_reason_to_proto(r);
            assert!(seen.insert(p as i32), "{r:?} shares a proto value");
            assert_eq!(drop_reason_from_proto("reason", p as i32).unwrap(), r);
            // The proto names follow the kernel names: SOURCE_BLOCKLIST <-> source-blocklist.
            let proto_name = p.as_str_name().trim_start_matches("DROP_REASON_");
            assert_eq!(proto_name.to_lowercase().replace('_', "-"), r.name());
        }
        // And the proto has no reason the kernel lacks.
        let proto_reasons = (1..)
            .take_while(|v| pb::DropReason::try_from(*v).is_ok())
            .count();
        assert_eq!(proto_reasons, capybara_common::drop::DROP_REASON_COUNT);
    }

    #[test]
    fn unspecified_is_rejected_naming_the_field() {
        let err = drop_reason_from_proto("reason", 0).unwrap_err();
        assert_eq!(err.to_string(), "field reason: unknown value 0");
    }

    #[test]
    fn peer_stats_list_only_nonzero_drops() {
        let mut s = PeerStats {
            rx_packets: 1,
            rx_bytes: 2,
            tx_packets: 3,
            tx_bytes: 4,
            ..Default::default()
        };
        s.drops[DropReason::DestinationBlocklist as usize] = 7;
        let p = peer_stats_to_proto(&s);
        assert_eq!(p.rx.unwrap().bytes, 2);
        assert_eq!(p.tx.unwrap().packets, 3);
        assert_eq!(p.drops.len(), 1);
        assert_eq!(
            p.drops[0].reason,
            pb::DropReason::DestinationBlocklist as i32
        );
    }
}
