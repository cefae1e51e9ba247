//! The allowed-IPs table: inner address → peer by longest prefix match, IPv4 and IPv6.
//!
//! WireGuard's cryptokey routing uses it both ways: a packet read from the TUN goes to the peer
//! whose allowed IPs hold its destination most specifically, and a packet a peer sent is accepted
//! only if its source maps back to that same peer.
//!
//! Layout: one hash map per prefix length in use, per family, probed from the longest length to
//! the shortest. Servers give each peer host routes (/32, /128) and perhaps a few subnets, so a
//! lookup is one or two hash probes whatever the number of peers; a trie would cost a pointer
//! chase per bit. The table is immutable once built into a snapshot (the data path reads a
//! snapshot without locks; see `peers.rs`), so it has no delete-in-place subtleties.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// Prefix → value, longest-prefix-match lookups. See the module docs.
#[derive(Clone, Debug)]
pub struct AllowedIps<T> {
    /// IPv4: (prefix length, masked address → value), longest length first.
    v4: Vec<(u8, HashMap<u32, T>)>,
    /// IPv6: (prefix length, masked address → value), longest length first.
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(a: Ipv4Addr, len: u8) -> u32 {
    let a = u32::from(a);
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(a: Ipv6Addr, len: u8) -> u128 {
    let a = u128::from(a);
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

fn slot<K, T>(levels: &mut Vec<(u8, HashMap<K, T>)>, len: u8) -> &mut HashMap<K, T> {
    let i = match levels.iter().position(|(l, _)| *l <= len) {
        Some(i) if levels[i].0 == len => i,
        Some(i) => {
            levels.insert(i, (len, HashMap::new()));
            i
        }
        None => {
            levels.push((len, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[i].1
}

impl<T: Clone> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `net` (host bits ignored) to `value`, replacing and returning what it mapped to.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => {
                slot(&mut self.v4, n.prefix_len()).insert(mask4(n.addr(), n.prefix_len()), value)
            }
            IpNet::V6(n) => {
                slot(&mut self.v6, n.prefix_len()).insert(mask6(n.addr(), n.prefix_len()), value)
            }
        }
    }

    /// Removes exactly `net` (not the prefixes inside it); returns its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        let out = match net {
            IpNet::V4(n) => self
                .v4
                .iter_mut()
                .find(|(l, _)| *l == n.prefix_len())
                .and_then(|(_, m)| m.remove(&mask4(n.addr(), n.prefix_len()))),
            IpNet::V6(n) => self
                .v6
                .iter_mut()
                .find(|(l, _)| *l == n.prefix_len())
                .and_then(|(_, m)| m.remove(&mask6(n.addr(), n.prefix_len()))),
        };
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
        out
    }

    /// The value of exactly `net`, if present.
    pub fn get_exact(&self, net: IpNet) -> Option<&T> {
        match net {
            IpNet::V4(n) => self
                .v4
                .iter()
                .find(|(l, _)| *l == n.prefix_len())
                .and_then(|(_, m)| m.get(&mask4(n.addr(), n.prefix_len()))),
            IpNet::V6(n) => self
                .v6
                .iter()
                .find(|(l, _)| *l == n.prefix_len())
                .and_then(|(_, m)| m.get(&mask6(n.addr(), n.prefix_len()))),
        }
    }

    /// The value of the longest prefix holding `addr`. An IPv4-mapped IPv6 address is looked up
    /// as IPv6 (WireGuard does the same: the families are separate tables).
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.iter().find_map(|(l, m)| m.get(&mask4(a, *l))),
            IpAddr::V6(a) => self.v6.iter().find_map(|(l, m)| m.get(&mask6(a, *l))),
        }
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.v6.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    /// True when no prefix is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_v4_and_v6() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), "default");
        t.insert(net("10.0.0.0/8"), "ten");
        t.insert(net("10.1.0.0/16"), "ten-one");
        t.insert(net("10.1.2.3/32"), "host");
        t.insert(net("fd00::/8"), "ula");
        t.insert(net("fd00:1::/64"), "net1");
        t.insert(net("fd00:1::5/128"), "host6");
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&"ten-one"));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&"ten"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(&"host6"));
        assert_eq!(t.lookup(ip("fd00:1::6")), Some(&"net1"));
        assert_eq!(t.lookup(ip("fd00:2::1")), Some(&"ula"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None, "no IPv6 default route");
        // IPv4 entries never answer IPv6 lookups, mapped or not.
        assert_eq!(t.lookup(ip("::ffff:10.1.2.3")), None);
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn host_bits_are_ignored_and_remove_is_exact() {
        let mut t = AllowedIps::new();
        t.insert(net("10.9.9.77/24"), 1);
        t.insert(net("10.9.9.5/32"), 2);
        assert_eq!(t.lookup(ip("10.9.9.1")), Some(&1));
        assert_eq!(t.get_exact(net("10.9.9.0/24")), Some(&1));
        assert_eq!(t.remove(net("10.9.9.0/25")), None, "not an entry");
        assert_eq!(t.remove(net("10.9.9.5/32")), Some(2));
        assert_eq!(t.lookup(ip("10.9.9.5")), Some(&1));
        assert_eq!(t.remove(net("10.9.9.0/24")), Some(1));
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.9.9.5")), None);
    }

    #[test]
    fn agrees_with_a_linear_scan() {
        use rand::Rng as _;
        let mut rng = rand::rng();
        let mut t = AllowedIps::new();
        let mut all: Vec<(IpNet, u32)> = Vec::new();
        for i in 0..300u32 {
            let len = [8u8, 16, 20, 24, 28, 32][rng.random_range(0..6)];
            let a = Ipv4Addr::from(rng.random::<u32>() & 0x0aff_ffff | 0x0a00_0000);
            let n = IpNet::new(IpAddr::V4(a), len).unwrap().trunc();
            if t.insert(n, i).is_some() {
                all.retain(|(m, _)| *m != n);
            }
            all.push((n, i));
        }
        for _ in 0..2000 {
            let a = IpAddr::V4(Ipv4Addr::from(
                rng.random::<u32>() & 0x0aff_ffff | 0x0a00_0000,
            ));
            let want = all
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| v);
            assert_eq!(t.lookup(a), want, "{a}");
        }
    }
}
