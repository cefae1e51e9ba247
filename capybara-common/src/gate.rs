//! The admission gate's verification endpoint: `CAPY_GATE_ALLOW`.
//!
//! A held peer's packets are dropped (see [`crate::peer::PeerInfo`]) except those between the
//! peer and the server's own tunnel address on a configured TCP/UDP port: ingress
//! `peer → addr:port`, egress `addr:port → peer`. Each allowed `(address, protocol, port)` is one
//! key of a small hash; the kernel looks it up only for packets of held peers, so admitted
//! traffic pays nothing for it. The agent writes the cross product of the server's addresses
//! and the endpoint's ports (at most [`GATE_ALLOW_MAX`] keys).
//!
//! Non-first fragments carry no ports, so they never match: a held peer's non-first fragments
//! are dropped. The verification endpoint is TCP (path-MTU discovery, no fragments); a UDP
//! endpoint must keep its datagrams below the tunnel MTU.

use crate::pod;

/// Capacity of `CAPY_GATE_ALLOW` (addresses × ports).
pub const GATE_ALLOW_MAX: u32 = 64;

/// `GateAllowKey::family` of an IPv4 address.
pub const GATE_FAMILY_V4: u8 = 4;
/// `GateAllowKey::family` of an IPv6 address.
pub const GATE_FAMILY_V6: u8 = 6;

/// Key of `CAPY_GATE_ALLOW` (value: `u32`, non-zero). Addresses are octets in network order; an
/// IPv4 address fills `addr[0..4]` and the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GateAllowKey {
    /// The server's tunnel address.
    pub addr: [u8; 16],
    /// The server's port (host order).
    pub port: u16,
    /// IP protocol number: 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    /// [`GATE_FAMILY_V4`] or [`GATE_FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<GateAllowKey>() == 20);

impl GateAllowKey {
    /// The key of IPv4 `addr` (host-order `u32`).
    pub const fn v4(addr: u32, protocol: u8, port: u16) -> Self {
        let o = addr.to_be_bytes();
        GateAllowKey {
            addr: [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            protocol,
            family: GATE_FAMILY_V4,
        }
    }

    /// The key of IPv6 `addr`.
    pub const fn v6(addr: [u8; 16], protocol: u8, port: u16) -> Self {
        GateAllowKey {
            addr,
            port,
            protocol,
            family: GATE_FAMILY_V6,
        }
    }
}

pod!(GateAllowKey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_puts_octets_first() {
        let k = GateAllowKey::v4(u32::from_be_bytes([10, 8, 0, 1]), 6, 443);
        assert_eq!(&k.addr[..4], &[10, 8, 0, 1]);
        assert_eq!(&k.addr[4..], &[0; 12]);
        assert_eq!((k.port, k.protocol, k.family), (443, 6, GATE_FAMILY_V4));
    }
}
