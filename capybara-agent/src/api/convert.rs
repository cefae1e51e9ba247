//! proto ↔ domain conversions. Both sides are foreign types here (`capybara_common` and
//! `capybara_proto`), so the orphan rule asks for functions rather than `From` impls.

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
