//! Packet fixtures: raw IP packets as the tunnel device carries them (no link-layer header) and
//! Ethernet frames as the uplink sees them, plus the odd shapes the kernel programs must survive
//! (truncations at every header boundary, fragments, IPv6 extension headers, IPv4 options,
//! VLAN tags).
//!
//! Shared by the BPF_PROG_TEST_RUN tests and the benchmarks, so every builder is a plain function
//! returning bytes. Checksums (IPv4 header, UDP/TCP/ICMP, ICMPv6) are computed, so the same
//! packets are valid on a real wire too. Payload bytes are a fixed pattern.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use capybara_tests::packets::{eth_ip, udp4};
//! let ip = udp4(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(1, 1, 1, 1), 4000, 53, 32);
//! assert_eq!(ip.len(), 20 + 8 + 32);
//! assert_eq!(eth_ip(&ip).len(), 14 + ip.len());
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

/// IP protocol numbers used by the builders.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// IPv6 destination options.
    pub const DSTOPTS: u8 = 60;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// EtherTypes used by the builders.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad (QinQ) VLAN tag.
    pub const QINQ: u16 = 0x88a8;
}

/// Destination MAC of built frames.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC of built frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// `len` payload bytes (a repeating pattern).
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data))
}

/// An IPv4 packet carrying `l4` (an upper-layer header and payload, checksum already set).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_with_options(src, dst, protocol, &[], l4)
}

/// An IPv4 packet with `options` (padded with zeros to a multiple of 4 bytes, at most 40).
pub fn ipv4_with_options(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let opt_len = options.len().div_ceil(4) * 4;
    assert!(opt_len <= 40, "IPv4 options are at most 40 bytes");
    let hlen = 20 + opt_len;
    let total = hlen + l4.len();
    let mut p = Vec::with_capacity(total);
    p.push(0x40 | (hlen / 4) as u8);
    p.push(0);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
    p.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    p.push(64);
    p.push(protocol);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    p.resize(hlen, 0);
    let c = checksum(&p[..hlen]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// Makes the IPv4 packet `p` a fragment at `offset_8` (in 8-byte units) with the given
/// more-fragments flag, and fixes the header checksum.
pub fn set_ipv4_fragment(p: &mut [u8], offset_8: u16, more: bool) {
    let v = (offset_8 & 0x1fff) | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&v.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let hlen = usize::from(p[0] & 0x0f) * 4;
    let c = checksum(&p[..hlen]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

fn pseudo4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, protocol]);
    ph.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&ph)
}

fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(40);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(len as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, next]);
    sum16(&ph)
}

fn udp_segment(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let len = 8 + payload_len;
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(&payload(payload_len));
    u
}

fn tcp_segment(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload_len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes()); // seq
    t.extend_from_slice(&0u32.to_be_bytes()); // ack
    t.push(5 << 4); // data offset
    t.push(if payload_len == 0 { 0x02 } else { 0x18 }); // SYN, or PSH|ACK with data
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    t.extend_from_slice(&payload(payload_len));
    t
}

fn icmp_echo(type_: u8, payload_len: usize) -> Vec<u8> {
    let mut m = vec![type_, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(&payload(payload_len));
    m
}

fn finish_l4_checksum(seg: &mut [u8], at: usize, pseudo: u32) {
    let c = fold(pseudo + sum16(seg));
    // A UDP checksum of 0 means "none": transmit all ones instead (RFC 768).
    let c = if c == 0 { 0xffff } else { c };
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// IPv4 UDP packet with `payload_len` payload bytes.
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut u = udp_segment(sport, dport, payload_len);
    let ps = pseudo4(src, dst, proto::UDP, u.len());
    finish_l4_checksum(&mut u, 6, ps);
    ipv4(src, dst, proto::UDP, &u)
}

/// IPv4 TCP packet (SYN without payload, PSH|ACK with) with `payload_len` payload bytes.
pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut t = tcp_segment(sport, dport, payload_len);
    let ps = pseudo4(src, dst, proto::TCP, t.len());
    finish_l4_checksum(&mut t, 16, ps);
    ipv4(src, dst, proto::TCP, &t)
}

/// IPv4 ICMP echo request with `payload_len` payload bytes.
pub fn icmp4(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let mut m = icmp_echo(8, payload_len);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, proto::ICMP, &m)
}

/// An IPv6 packet: fixed header with `next` and `payload` (extension headers included) after it.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(next);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// One IPv6 extension header, as [`udp6_with_ext`] lays it out.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-hop options, `8 * (1 + extra_8)` bytes (PadN).
    HopByHop { extra_8: u8 },
    /// Routing header (type 0 with no segments left), 8 bytes.
    Routing,
    /// Destination options, `8 * (1 + extra_8)` bytes (PadN).
    DestOpts { extra_8: u8 },
    /// Fragment header (8 bytes) at `offset_8` (8-byte units).
    Fragment { offset_8: u16, more: bool },
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => proto::HOPOPTS,
            Ext::Routing => proto::ROUTING,
            Ext::DestOpts { .. } => proto::DSTOPTS,
            Ext::Fragment { .. } => proto::FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop { extra_8 } | Ext::DestOpts { extra_8 } => {
                let len = 8 * (1 + usize::from(extra_8));
                // PadN option covering the rest of the header.
                let mut h = vec![next, extra_8, 1, (len - 4) as u8];
                h.resize(len, 0);
                h
            }
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Ext::Fragment { offset_8, more } => {
                let v = (offset_8 << 3) | u16::from(more);
                let mut h = vec![next, 0];
                h.extend_from_slice(&v.to_be_bytes());
                h.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
                h
            }
        }
    }
}

fn ext_chain(exts: &[Ext], upper: u8, l4: &[u8]) -> (u8, Vec<u8>) {
    let mut body = l4.to_vec();
    let mut next = upper;
    for e in exts.iter().rev() {
        let mut h = e.bytes(next);
        h.extend_from_slice(&body);
        body = h;
        next = e.number();
    }
    (next, body)
}

/// IPv6 UDP packet with `payload_len` payload bytes.
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    udp6_with_ext(src, dst, sport, dport, payload_len, &[])
}

/// IPv6 UDP packet behind the extension headers `exts` (in order).
pub fn udp6_with_ext(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload_len: usize,
    exts: &[Ext],
) -> Vec<u8> {
    let mut u = udp_segment(sport, dport, payload_len);
    let ps = pseudo6(src, dst, proto::UDP, u.len());
    finish_l4_checksum(&mut u, 6, ps);
    let (next, body) = ext_chain(exts, proto::UDP, &u);
    ipv6(src, dst, next, &body)
}

/// IPv6 TCP packet with `payload_len` payload bytes.
pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut t = tcp_segment(sport, dport, payload_len);
    let ps = pseudo6(src, dst, proto::TCP, t.len());
    finish_l4_checksum(&mut t, 16, ps);
    ipv6(src, dst, proto::TCP, &t)
}

/// ICMPv6 echo request with `payload_len` payload bytes.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, payload_len: usize) -> Vec<u8> {
    let mut m = icmp_echo(128, payload_len);
    let ps = pseudo6(src, dst, proto::ICMPV6, m.len());
    let c = fold(ps + sum16(&m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, proto::ICMPV6, &m)
}

/// An Ethernet frame (no VLAN tag) of `ethertype` carrying `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The EtherType of a raw IP packet, from its version nibble (ARP's for anything else).
pub fn ip_ethertype(ip: &[u8]) -> u16 {
    match ip.first().map(|b| b >> 4) {
        Some(4) => ethertype::IPV4,
        Some(6) => ethertype::IPV6,
        _ => ethertype::ARP,
    }
}

/// An untagged Ethernet frame carrying the raw IP packet `ip`.
pub fn eth_ip(ip: &[u8]) -> Vec<u8> {
    eth(ip_ethertype(ip), ip)
}

/// An Ethernet frame with one VLAN tag (`tpid` = [`ethertype::VLAN`] or [`ethertype::QINQ`],
/// VLAN id `vid`) carrying the raw IP packet `ip`.
pub fn eth_vlan_ip(tpid: u16, vid: u16, ip: &[u8]) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(4 + ip.len());
    tagged.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    tagged.extend_from_slice(&ip_ethertype(ip).to_be_bytes());
    tagged.extend_from_slice(ip);
    eth(tpid, &tagged)
}

/// The first `len` bytes of `p` (a truncated packet).
pub fn truncated(p: &[u8], len: usize) -> Vec<u8> {
    p[..len.min(p.len())].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = udp4(A, B, 1, 2, 10);
        assert_eq!(checksum(&p[..20]), 0);
        let mut f = p.clone();
        set_ipv4_fragment(&mut f, 100, false);
        assert_eq!(checksum(&f[..20]), 0);
    }

    #[test]
    fn udp_checksum_verifies() {
        let p = udp4(A, B, 1000, 51820, 33);
        assert_eq!(
            fold(pseudo4(A, B, proto::UDP, p.len() - 20) + sum16(&p[20..])),
            0
        );
        let s6: Ipv6Addr = "fd00::2".parse().unwrap();
        let d6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let p = udp6(s6, d6, 1, 2, 7);
        assert_eq!(
            fold(pseudo6(s6, d6, proto::UDP, p.len() - 40) + sum16(&p[40..])),
            0
        );
    }

    #[test]
    fn ext_headers_chain() {
        let s6: Ipv6Addr = "fd00::2".parse().unwrap();
        let p = udp6_with_ext(
            s6,
            s6,
            1,
            2,
            0,
            &[Ext::HopByHop { extra_8: 1 }, Ext::Routing],
        );
        assert_eq!(p[6], proto::HOPOPTS);
        assert_eq!(p[40], proto::ROUTING);
        assert_eq!(p[40 + 16], proto::UDP);
        assert_eq!(p.len(), 40 + 16 + 8 + 8);
    }
}
