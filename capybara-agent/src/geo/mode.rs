//! The two geo modes as lists: block mode (one `geo:XX` list per country) and allow mode (one
//! drop set: everything but the allowed countries, the reserved ranges and explicit allows).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::country::CountryCode;
use super::db::GeoDb;
use super::ranges::{self, Range};

/// A special-purpose range that allow mode never drops, with where it is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved<N> {
    /// The range.
    pub net: N,
    /// The RFC that defines it.
    pub rfc: &'static str,
    /// What it is for.
    pub purpose: &'static str,
}

const fn v4(
    a: u8,
    b: u8,
    c: u8,
    d: u8,
    len: u8,
    rfc: &'static str,
    purpose: &'static str,
) -> Reserved<Ipv4Net> {
    Reserved {
        net: Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len),
        rfc,
        purpose,
    }
}

const fn v6(addr: u128, len: u8, rfc: &'static str, purpose: &'static str) -> Reserved<Ipv6Net> {
    Reserved {
        net: Ipv6Net::new_assert(Ipv6Addr::from_bits(addr), len),
        rfc,
        purpose,
    }
}

/// IPv4 private and special-purpose ranges (after the IANA special-purpose registry,
/// RFC 6890): never geo-dropped, since they are not "from" any country and dropping them
/// would cut off the LAN, loopback and the tunnel's own addresses.
pub const RESERVED_V4: [Reserved<Ipv4Net>; 16] = [
    v4(0, 0, 0, 0, 8, "RFC 1122 §3.2.1.3", "\"this network\""),
    v4(10, 0, 0, 0, 8, "RFC 1918", "private use"),
    v4(
        100,
        64,
        0,
        0,
        10,
        "RFC 6598",
        "shared address space (carrier-grade NAT)",
    ),
    v4(127, 0, 0, 0, 8, "RFC 1122 §3.2.1.3", "loopback"),
    v4(169, 254, 0, 0, 16, "RFC 3927", "link local"),
    v4(172, 16, 0, 0, 12, "RFC 1918", "private use"),
    v4(192, 0, 0, 0, 24, "RFC 6890", "IETF protocol assignments"),
    v4(192, 0, 2, 0, 24, "RFC 5737", "documentation (TEST-NET-1)"),
    v4(
        192,
        88,
        99,
        0,
        24,
        "RFC 7526",
        "formerly 6to4 relay anycast (RFC 3068)",
    ),
    v4(192, 168, 0, 0, 16, "RFC 1918", "private use"),
    v4(198, 18, 0, 0, 15, "RFC 2544", "benchmarking"),
    v4(
        198,
        51,
        100,
        0,
        24,
        "RFC 5737",
        "documentation (TEST-NET-2)",
    ),
    v4(203, 0, 113, 0, 24, "RFC 5737", "documentation (TEST-NET-3)"),
    v4(224, 0, 0, 0, 4, "RFC 5771", "multicast"),
    v4(240, 0, 0, 0, 4, "RFC 1112 §4", "reserved for future use"),
    v4(
        255,
        255,
        255,
        255,
        32,
        "RFC 919, RFC 8190",
        "limited broadcast",
    ),
];

/// IPv6 special-purpose ranges (IANA registry, RFC 6890), never geo-dropped.
pub const RESERVED_V6: [Reserved<Ipv6Net>; 10] = [
    v6(0, 128, "RFC 4291", "unspecified address"),
    v6(1, 128, "RFC 4291", "loopback"),
    v6(0xffff << 32, 96, "RFC 4291", "IPv4-mapped addresses"),
    v6(
        0x0064_ff9b << 96,
        96,
        "RFC 6052",
        "IPv4/IPv6 translation (NAT64)",
    ),
    v6(0x0100 << 112, 64, "RFC 6666", "discard only"),
    v6(
        0x2001 << 112,
        23,
        "RFC 2928",
        "IETF protocol assignments (incl. Teredo, RFC 4380)",
    ),
    v6(0x2001_0db8 << 96, 32, "RFC 3849", "documentation"),
    v6(0xfc00 << 112, 7, "RFC 4193", "unique local"),
    v6(0xfe80 << 112, 10, "RFC 4291", "link-local unicast"),
    v6(0xff00 << 112, 8, "RFC 4291", "multicast"),
];

/// The blocklist name for a country: `geo:CN`.
pub fn list_name(country: CountryCode) -> String {
    format!("geo:{country}")
}

/// Block mode: one named list per country, `("geo:XX", IPv4 nets, IPv6 nets)`, in country
/// order, duplicates removed. A country the database has no networks for still gets its
/// (empty) list, so the configuration and what is enforced stay the same shape.
pub fn block_lists(
    db: &GeoDb,
    countries: &[CountryCode],
) -> Vec<(String, Vec<Ipv4Net>, Vec<Ipv6Net>)> {
    let mut countries = countries.to_vec();
    countries.sort_unstable();
    countries.dedup();
    countries
        .into_iter()
        .map(|c| {
            let nets = db.country(c).cloned().unwrap_or_default();
            (list_name(c), nets.v4, nets.v6)
        })
        .collect()
}

/// Allow mode: the minimal CIDR cover of the addresses to **drop**: everything except the
/// allowed countries' networks, [`RESERVED_V4`]/[`RESERVED_V6`] and `explicit_allows`.
///
/// Addresses the database does not place in any country are dropped (an allowlist admits
/// what it can vouch for). IPv4 explicit allows apply to IPv4 and IPv6 ones to IPv6; an
/// IPv4-mapped IPv6 allow is covered by the reserved `::ffff:0:0/96` anyway.
pub fn allow_mode_block(
    db: &GeoDb,
    allowed: &[CountryCode],
    explicit_allows: &[IpNet],
) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut keep4: Vec<Range> = RESERVED_V4
        .iter()
        .map(|r| ranges::v4_range(r.net))
        .collect();
    let mut keep6: Vec<Range> = RESERVED_V6
        .iter()
        .map(|r| ranges::v6_range(r.net))
        .collect();
    for c in allowed {
        if let Some(nets) = db.country(*c) {
            keep4.extend(nets.v4.iter().map(|n| ranges::v4_range(*n)));
            keep6.extend(nets.v6.iter().map(|n| ranges::v6_range(*n)));
        }
    }
    for net in explicit_allows {
        match ranges::range_of(*net) {
            (true, r) => keep4.push(r),
            (false, r) => keep6.push(r),
        }
    }
    ranges::normalize(&mut keep4);
    ranges::normalize(&mut keep6);
    (
        ranges::v4_cidrs(&ranges::complement(&keep4, ranges::V4_MAX)),
        ranges::v6_cidrs(&ranges::complement(&keep6, ranges::V6_MAX)),
    )
}
