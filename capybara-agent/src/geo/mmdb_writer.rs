//! A small MaxMind DB (`.mmdb`) writer, for test fixtures.
//!
//! Tests must not download anything, and `.mmdb` files are never committed, so unit tests here
//! and the privileged end-to-end tests generate their databases with this writer. It follows
//! the public format spec (<https://maxmind.github.io/MaxMind-DB/>):
//!
//! ```text
//! [ search tree: node_count nodes × 2 records of 24/28/32 bits ]
//! [ 16 zero bytes: data section separator ]
//! [ data section: values in MaxMind's type encoding, deduplicated ]
//! [ "\xAB\xCD\xEFMaxMind.com" ][ metadata map ]
//! ```
//!
//! A record value `< node_count` is a node number, `== node_count` means "no data", and
//! `> node_count` points at `value - node_count - 16` in the data section.
//!
//! ## Design
//! Networks go into an in-memory binary trie (an arena of `[Rec; 2]`). Inserting a prefix that
//! ends inside an existing leaf splits the leaf (both halves keep the old value); inserting a
//! prefix above existing detail replaces that whole subtree: **the last insert wins** for the
//! addresses it covers. [`MmdbWriter::to_bytes`] numbers the reachable nodes breadth first,
//! picks the smallest record size that fits (or the one forced by
//! [`MmdbWriter::record_size`] if larger), and encodes.
//!
//! An IPv6 writer ([`MmdbWriter::new`]`(6)`) accepts IPv4 networks and stores them under
//! `::/96` as MaxMind does; by default it also aliases `::ffff:0:0/96` (IPv4-mapped) and
//! `2002::/16` (6to4) to that IPv4 subtree — the alias records point at the `::/96` node, the
//! way GeoIP2/GeoLite2 databases are built, so readers see the same IPv4 data three times
//! unless they skip aliases. [`MmdbWriter::without_ipv4_aliases`] turns that off.
//!
//! Values are limited to what fixtures need: maps, arrays, UTF-8 strings, `uint16/32/64` and
//! booleans ([`Value`]).

use std::collections::HashMap;
use std::collections::VecDeque;

use ipnet::IpNet;

/// The metadata marker that precedes the metadata map.
const METADATA_MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";
/// Size of the zero-filled separator between the search tree and the data section.
const DATA_SEPARATOR: usize = 16;

// Data section type numbers (MaxMind DB spec, "Output Data Section").
const TYPE_UTF8: u8 = 2;
const TYPE_UINT16: u8 = 5;
const TYPE_UINT32: u8 = 6;
const TYPE_MAP: u8 = 7;
const TYPE_UINT64: u8 = 9;
const TYPE_ARRAY: u8 = 11;
const TYPE_BOOL: u8 = 14;

/// A value of the MaxMind DB data section (the subset fixtures need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `utf8_string` (type 2).
    String(String),
    /// `uint16` (type 5).
    Uint16(u16),
    /// `uint32` (type 6).
    Uint32(u32),
    /// `uint64` (type 9).
    Uint64(u64),
    /// `boolean` (type 14).
    Bool(bool),
    /// `map` (type 7), keys in the order given.
    Map(Vec<(String, Value)>),
    /// `array` (type 11).
    Array(Vec<Value>),
}

impl Value {
    /// A map from `(key, value)` pairs.
    pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// A string value.
    pub fn string(s: &str) -> Self {
        Value::String(s.to_owned())
    }

    /// The GeoLite2-Country record `{"country": {"iso_code": iso}}`.
    pub fn country(iso: &str) -> Self {
        Value::map([("country", Value::map([("iso_code", Value::string(iso))]))])
    }

    /// The ip-location-db record `{"country_code": iso}` (the layout of the CC0
    /// `geo-whois-asn-country` database `cargo xtask setup` installs).
    pub fn country_code(iso: &str) -> Self {
        Value::map([("country_code", Value::string(iso))])
    }

    /// `{"registered_country": {"iso_code": iso}}`: a record without `country`, as GeoLite2
    /// has for some networks (e.g. satellite and anycast providers).
    pub fn registered_country(iso: &str) -> Self {
        Value::map([(
            "registered_country",
            Value::map([("iso_code", Value::string(iso))]),
        )])
    }

    /// Appends this value's encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::String(s) => {
                control(out, TYPE_UTF8, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Uint16(n) => uint(out, TYPE_UINT16, u64::from(*n)),
            Value::Uint32(n) => uint(out, TYPE_UINT32, u64::from(*n)),
            Value::Uint64(n) => uint(out, TYPE_UINT64, *n),
            Value::Bool(b) => control(out, TYPE_BOOL, usize::from(*b)),
            Value::Map(pairs) => {
                control(out, TYPE_MAP, pairs.len());
                for (k, v) in pairs {
                    Value::String(k.clone()).encode(out);
                    v.encode(out);
                }
            }
            Value::Array(items) => {
                control(out, TYPE_ARRAY, items.len());
                for v in items {
                    v.encode(out);
                }
            }
        }
    }
}

/// Writes a control byte (plus extended type byte and size bytes) for `ty` and `size`.
fn control(out: &mut Vec<u8>, ty: u8, size: usize) {
    let (five, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65_536 {
        (30, ((size - 285) as u16).to_be_bytes().to_vec())
    } else {
        assert!(size < 65_821 + (1 << 24), "value too large for the format");
        (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec())
    };
    if ty <= 7 {
        out.push(ty << 5 | five);
    } else {
        out.push(five);
        out.push(ty - 7);
    }
    out.extend_from_slice(&extra);
}

/// Writes an unsigned integer with its big-endian bytes, leading zero bytes dropped.
fn uint(out: &mut Vec<u8>, ty: u8, n: u64) {
    let bytes = n.to_be_bytes();
    let skip = (n.leading_zeros() / 8) as usize;
    control(out, ty, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}

/// One record of a trie node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rec {
    /// No data.
    Empty,
    /// Index into [`MmdbWriter::data`].
    Data(u32),
    /// Index into [`MmdbWriter::nodes`].
    Node(u32),
}

/// A network that does not fit the writer's IP version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot insert IPv6 network {net} into an IPv4 database")]
pub struct IpVersionMismatch {
    /// The rejected network.
    pub net: IpNet,
}

/// Builds a MaxMind DB in memory; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct MmdbWriter {
    /// 4 or 6.
    ip_version: u16,
    /// The trie; node 0 is the root.
    nodes: Vec<[Rec; 2]>,
    /// Encoded values, deduplicated through `data_index`.
    data: Vec<Vec<u8>>,
    /// Encoded value → index in `data`.
    data_index: HashMap<Vec<u8>, u32>,
    /// Smallest record size to use (24, 28 or 32).
    min_record_size: u16,
    /// Whether an IPv6 database aliases `::ffff:0:0/96` and `2002::/16` to `::/96`.
    ipv4_aliases: bool,
    /// `database_type` in the metadata.
    database_type: String,
    /// `build_epoch` in the metadata.
    build_epoch: u64,
}

impl MmdbWriter {
    /// An empty database for `ip_version` 4 or 6, typed `GeoLite2-Country`.
    ///
    /// # Panics
    /// If `ip_version` is neither 4 nor 6.
    pub fn new(ip_version: u8) -> Self {
        assert!(
            ip_version == 4 || ip_version == 6,
            "ip_version must be 4 or 6, not {ip_version}"
        );
        Self {
            ip_version: u16::from(ip_version),
            nodes: vec![[Rec::Empty; 2]],
            data: Vec::new(),
            data_index: HashMap::new(),
            min_record_size: 24,
            ipv4_aliases: true,
            database_type: "GeoLite2-Country".to_owned(),
            build_epoch: 1_700_000_000,
        }
    }

    /// Uses at least `bits` (24, 28 or 32) per record; a larger size is still chosen when the
    /// tree or data section needs it.
    ///
    /// # Panics
    /// If `bits` is not 24, 28 or 32.
    pub fn record_size(mut self, bits: u16) -> Self {
        assert!(matches!(bits, 24 | 28 | 32), "record size {bits}");
        self.min_record_size = bits;
        self
    }

    /// Sets `database_type` in the metadata.
    pub fn database_type(mut self, database_type: &str) -> Self {
        database_type.clone_into(&mut self.database_type);
        self
    }

    /// Does not alias `::ffff:0:0/96` and `2002::/16` to the IPv4 subtree (IPv6 only).
    pub fn without_ipv4_aliases(mut self) -> Self {
        self.ipv4_aliases = false;
        self
    }

    /// Maps `net` to the GeoLite2-Country record `{"country": {"iso_code": country_iso}}`.
    pub fn insert(&mut self, net: IpNet, country_iso: &str) -> Result<(), IpVersionMismatch> {
        self.insert_value(net, &Value::country(country_iso))
    }

    /// Maps `net` to an arbitrary record.
    pub fn insert_value(&mut self, net: IpNet, value: &Value) -> Result<(), IpVersionMismatch> {
        let (key, prefix) = match (net, self.ip_version) {
            (IpNet::V4(n), 4) => (
                u128::from(u32::from(n.network())),
                u32::from(n.prefix_len()),
            ),
            (IpNet::V4(n), _) => (
                u128::from(u32::from(n.network())),
                96 + u32::from(n.prefix_len()),
            ),
            (IpNet::V6(_), 4) => return Err(IpVersionMismatch { net }),
            (IpNet::V6(n), _) => (u128::from(n.network()), u32::from(n.prefix_len())),
        };
        let mut encoded = Vec::new();
        value.encode(&mut encoded);
        let next = self.data.len() as u32;
        let index = *self.data_index.entry(encoded.clone()).or_insert(next);
        if index == next {
            self.data.push(encoded);
        }
        self.set(key, prefix, Rec::Data(index));
        Ok(())
    }

    fn bits(&self) -> u32 {
        if self.ip_version == 4 { 32 } else { 128 }
    }

    fn bit(&self, key: u128, depth: u32) -> usize {
        ((key >> (self.bits() - 1 - depth)) & 1) as usize
    }

    /// Returns the node at the end of `key`'s first `depth` bits, creating (splitting) nodes on
    /// the way; `depth == 0` is the root.
    fn node_at(&mut self, key: u128, depth: u32) -> usize {
        let mut node = 0;
        for d in 0..depth {
            let bit = self.bit(key, d);
            node = match self.nodes[node][bit] {
                Rec::Node(n) => n as usize,
                leaf => {
                    let n = self.nodes.len();
                    self.nodes.push([leaf; 2]);
                    self.nodes[node][bit] = Rec::Node(n as u32);
                    n
                }
            };
        }
        node
    }

    /// Sets the record for prefix `key/prefix` to `rec`, replacing whatever was below it.
    fn set(&mut self, key: u128, prefix: u32, rec: Rec) {
        if prefix == 0 {
            self.nodes[0] = [rec; 2];
            return;
        }
        let parent = self.node_at(key, prefix - 1);
        let bit = self.bit(key, prefix - 1);
        self.nodes[parent][bit] = rec;
    }

    /// Serializes the database.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut tree = self.clone();
        if tree.ip_version == 6 && tree.ipv4_aliases {
            let ipv4_root = tree.node_at(0, 96) as u32;
            tree.set(0xffff_u128 << 32, 96, Rec::Node(ipv4_root));
            tree.set(0x2002_u128 << 112, 16, Rec::Node(ipv4_root));
        }
        tree.encode()
    }

    fn encode(&self) -> Vec<u8> {
        // Number reachable nodes breadth first (aliases make the trie a DAG: visit once).
        let mut number = vec![u32::MAX; self.nodes.len()];
        let mut order = Vec::new();
        let mut queue = VecDeque::from([0usize]);
        number[0] = 0;
        while let Some(n) = queue.pop_front() {
            order.push(n);
            for rec in self.nodes[n] {
                if let Rec::Node(c) = rec
                    && number[c as usize] == u32::MAX
                {
                    number[c as usize] = (order.len() + queue.len()) as u32;
                    queue.push_back(c as usize);
                }
            }
        }
        let node_count = order.len() as u64;

        let mut offsets = Vec::with_capacity(self.data.len());
        let mut data_len = 0u64;
        for d in &self.data {
            offsets.push(data_len);
            data_len += d.len() as u64;
        }
        let max_record = node_count + DATA_SEPARATOR as u64 + data_len;
        let record_size = [24u16, 28, 32]
            .into_iter()
            .find(|&s| s >= self.min_record_size && max_record < 1u64 << s)
            .expect("database too large for 32-bit records");

        let value = |rec: Rec| -> u32 {
            match rec {
                Rec::Empty => node_count as u32,
                Rec::Node(c) => number[c as usize],
                Rec::Data(d) => (node_count + DATA_SEPARATOR as u64 + offsets[d as usize]) as u32,
            }
        };
        let node_bytes = usize::from(record_size) / 4;
        let mut out = Vec::with_capacity(order.len() * node_bytes + data_len as usize + 512);
        for &n in &order {
            let [l, r] = self.nodes[n].map(value);
            match record_size {
                24 => {
                    out.extend_from_slice(&l.to_be_bytes()[1..]);
                    out.extend_from_slice(&r.to_be_bytes()[1..]);
                }
                28 => {
                    out.extend_from_slice(&l.to_be_bytes()[1..]);
                    out.push(((l >> 24) as u8) << 4 | (r >> 24) as u8);
                    out.extend_from_slice(&r.to_be_bytes()[1..]);
                }
                _ => {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&r.to_be_bytes());
                }
            }
        }
        out.extend_from_slice(&[0; DATA_SEPARATOR]);
        for d in &self.data {
            out.extend_from_slice(d);
        }
        out.extend_from_slice(METADATA_MARKER);
        Value::map([
            ("node_count", Value::Uint32(node_count as u32)),
            ("record_size", Value::Uint16(record_size)),
            ("ip_version", Value::Uint16(self.ip_version)),
            ("database_type", Value::string(&self.database_type)),
            ("languages", Value::Array(vec![Value::string("en")])),
            ("binary_format_major_version", Value::Uint16(2)),
            ("binary_format_minor_version", Value::Uint16(0)),
            ("build_epoch", Value::Uint64(self.build_epoch)),
            (
                "description",
                Value::map([("en", Value::string("Capybara test fixture"))]),
            ),
        ])
        .encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ipnet::{Ipv4Net, Ipv6Net};
    use maxminddb::{Reader, WithinOptions, path};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn lookup_iso(reader: &Reader<Vec<u8>>, ip: IpAddr) -> Option<String> {
        reader
            .lookup(ip)
            .unwrap()
            .decode_path(&path!["country", "iso_code"])
            .unwrap()
    }

    #[test]
    fn control_bytes_follow_the_spec() {
        let mut out = Vec::new();
        control(&mut out, TYPE_UTF8, 3);
        assert_eq!(out, [0x43]);
        out.clear();
        control(&mut out, TYPE_UTF8, 29);
        assert_eq!(out, [0x5d, 0]);
        out.clear();
        control(&mut out, TYPE_UTF8, 300);
        assert_eq!(out, [0x5e, 0, 15]);
        out.clear();
        control(&mut out, TYPE_UTF8, 70_000);
        assert_eq!(out, [0x5f, 0, 0x10, 0x53]);
        out.clear();
        control(&mut out, TYPE_ARRAY, 2);
        assert_eq!(out, [0x02, 0x04]);
        out.clear();
        uint(&mut out, TYPE_UINT32, 0);
        assert_eq!(out, [0xc0]);
        out.clear();
        uint(&mut out, TYPE_UINT64, 0x1_0000);
        assert_eq!(out, [0x03, 0x02, 1, 0, 0]);
    }

    #[test]
    fn values_of_every_size_decode() {
        let long = "x".repeat(70_000);
        let mid = "y".repeat(300);
        let value = Value::map([
            ("long", Value::string(&long)),
            ("mid", Value::string(&mid)),
            ("n16", Value::Uint16(65_535)),
            ("n32", Value::Uint32(0x0102_0304)),
            ("n64", Value::Uint64(u64::MAX)),
            ("yes", Value::Bool(true)),
            (
                "list",
                Value::Array(vec![Value::Uint32(1), Value::string("a")]),
            ),
        ]);
        let mut w = MmdbWriter::new(4);
        w.insert_value("1.2.3.0/24".parse().unwrap(), &value)
            .unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        let r = reader.lookup("1.2.3.4".parse().unwrap()).unwrap();
        assert_eq!(r.decode_path::<String>(&path!["long"]).unwrap(), Some(long));
        assert_eq!(r.decode_path::<String>(&path!["mid"]).unwrap(), Some(mid));
        assert_eq!(r.decode_path::<u16>(&path!["n16"]).unwrap(), Some(65_535));
        assert_eq!(
            r.decode_path::<u32>(&path!["n32"]).unwrap(),
            Some(0x0102_0304)
        );
        assert_eq!(r.decode_path::<u64>(&path!["n64"]).unwrap(), Some(u64::MAX));
        assert_eq!(r.decode_path::<bool>(&path!["yes"]).unwrap(), Some(true));
        assert_eq!(
            r.decode_path::<String>(&path!["list", 1]).unwrap(),
            Some("a".to_owned())
        );
    }

    #[test]
    fn metadata_round_trips() {
        for (v, size) in [(4u8, 24u16), (6, 28), (6, 32)] {
            let mut w = MmdbWriter::new(v)
                .record_size(size)
                .database_type("Test-DB");
            w.insert("10.0.0.0/8".parse().unwrap(), "US").unwrap();
            let reader = Reader::from_source(w.to_bytes()).unwrap();
            let m = reader.metadata();
            assert_eq!(m.ip_version, u16::from(v));
            assert_eq!(m.record_size, size);
            assert_eq!(m.database_type, "Test-DB");
            assert_eq!(m.binary_format_major_version, 2);
            assert_eq!(m.binary_format_minor_version, 0);
            assert_eq!(m.languages, ["en"]);
            assert_eq!(m.description["en"], "Capybara test fixture");
            reader.verify().unwrap();
        }
    }

    #[test]
    fn record_size_grows_when_needed() {
        // 2^17 /24 networks with distinct values need more than 24 bits... of data offsets:
        // 70k distinct 250-byte strings are a ~17 MB data section, beyond 2^24.
        let mut w = MmdbWriter::new(4);
        let pad = "p".repeat(240);
        for i in 0..70_000u32 {
            let net = Ipv4Net::new(Ipv4Addr::from(i << 8), 24).unwrap();
            let v = Value::map([("k", Value::String(format!("{pad}{i}")))]);
            w.insert_value(IpNet::V4(net), &v).unwrap();
        }
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        assert_eq!(reader.metadata().record_size, 28);
        let r = reader.lookup("0.1.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            r.decode_path::<String>(&path!["k"]).unwrap(),
            Some(format!("{pad}256"))
        );
    }

    #[test]
    fn last_insert_wins() {
        let mut w = MmdbWriter::new(4);
        w.insert("10.0.0.0/8".parse().unwrap(), "US").unwrap();
        w.insert("10.1.0.0/16".parse().unwrap(), "CN").unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        let get = |ip: &str| lookup_iso(&reader, ip.parse().unwrap());
        assert_eq!(get("10.0.0.1").as_deref(), Some("US"));
        assert_eq!(get("10.1.2.3").as_deref(), Some("CN"));
        assert_eq!(get("10.255.0.0").as_deref(), Some("US"));
        assert_eq!(get("11.0.0.0"), None);

        w.insert("10.0.0.0/8".parse().unwrap(), "GB").unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        assert_eq!(
            lookup_iso(&reader, "10.1.2.3".parse().unwrap()).as_deref(),
            Some("GB")
        );

        let mut w = MmdbWriter::new(6);
        w.insert("::/0".parse().unwrap(), "FR").unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        assert_eq!(
            lookup_iso(&reader, "2a00::1".parse().unwrap()).as_deref(),
            Some("FR")
        );
    }

    #[test]
    fn ipv6_writer_takes_ipv4_with_aliases() {
        let mut w = MmdbWriter::new(6);
        w.insert("1.2.3.0/24".parse().unwrap(), "AU").unwrap();
        w.insert("2001:4860::/32".parse().unwrap(), "US").unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        let get = |ip: &str| lookup_iso(&reader, ip.parse().unwrap());
        assert_eq!(get("1.2.3.4").as_deref(), Some("AU"));
        assert_eq!(get("::1.2.3.4").as_deref(), Some("AU"));
        assert_eq!(get("::ffff:1.2.3.4").as_deref(), Some("AU"));
        assert_eq!(get("2002:102:304::1").as_deref(), Some("AU"));
        assert_eq!(get("2001:4860::8888").as_deref(), Some("US"));
        assert_eq!(get("1.2.4.0"), None);
        // Default iteration skips the aliases: each network once.
        let nets: Vec<String> = reader
            .networks(WithinOptions::default())
            .unwrap()
            .map(|r| r.unwrap().network().unwrap().to_string())
            .collect();
        assert_eq!(nets, ["1.2.3.0/24", "2001:4860::/32"]);

        let mut w = MmdbWriter::new(6).without_ipv4_aliases();
        w.insert("1.2.3.0/24".parse().unwrap(), "AU").unwrap();
        let reader = Reader::from_source(w.to_bytes()).unwrap();
        assert_eq!(lookup_iso(&reader, "::ffff:1.2.3.4".parse().unwrap()), None);
        assert_eq!(
            lookup_iso(&reader, "1.2.3.4".parse().unwrap()).as_deref(),
            Some("AU")
        );
    }

    #[test]
    fn ipv4_writer_rejects_ipv6() {
        let mut w = MmdbWriter::new(4);
        let err = w
            .insert("2001:db8::/32".parse().unwrap(), "US")
            .unwrap_err();
        assert!(err.to_string().contains("2001:db8::/32"), "{err}");
    }

    /// Random, non-overlapping networks with random countries; every one must read back with
    /// the same network and country, and nothing else may be in the database.
    #[test]
    fn random_round_trip() {
        const CODES: [&str; 6] = ["CN", "US", "DE", "BR", "JP", "ZA"];
        let mut rng = StdRng::seed_from_u64(42);
        for (ip_version, record_size) in [(4u8, 24u16), (4, 28), (4, 32), (6, 24), (6, 28), (6, 32)]
        {
            let mut want: BTreeMap<String, &str> = BTreeMap::new();
            let mut w = MmdbWriter::new(ip_version).record_size(record_size);
            // Disjoint by construction: distinct /16 (v4) or /40 (v6) parents, one net each.
            let mut used4 = std::collections::HashSet::new();
            let mut used6 = std::collections::HashSet::new();
            for _ in 0..500 {
                let cc = CODES[rng.random_range(0..CODES.len())];
                let net = if ip_version == 4 || rng.random_bool(0.5) {
                    let parent: u16 = rng.random();
                    if !used4.insert(parent) {
                        continue;
                    }
                    let len = rng.random_range(16..=32);
                    let addr = (u32::from(parent) << 16) | rng.random::<u32>() >> 16;
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc())
                } else {
                    // Stay clear of the IPv4 subtree and its aliases: 2400::/6.
                    let parent: u32 = rng.random::<u32>() & 0x03ff_ffff;
                    if !used6.insert(parent) {
                        continue;
                    }
                    let len = rng.random_range(38..=128);
                    let addr =
                        (0x24u128 << 120) | (u128::from(parent) << 88) | rng.random::<u128>() >> 40;
                    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(addr), len).unwrap().trunc())
                };
                w.insert(net, cc).unwrap();
                want.insert(net.to_string(), cc);
            }
            let reader = Reader::from_source(w.to_bytes()).unwrap();
            assert_eq!(reader.metadata().record_size, record_size);
            reader.verify().unwrap();
            let mut got = BTreeMap::new();
            for r in reader.networks(WithinOptions::default()).unwrap() {
                let r = r.unwrap();
                let iso: String = r
                    .decode_path(&path!["country", "iso_code"])
                    .unwrap()
                    .unwrap();
                got.insert(r.network().unwrap().to_string(), iso);
            }
            let got: BTreeMap<String, &str> =
                got.iter().map(|(k, v)| (k.clone(), v.as_str())).collect();
            assert_eq!(
                got, want,
                "ip_version {ip_version}, record size {record_size}"
            );
            // And point lookups agree.
            for (net, cc) in &want {
                let net: IpNet = net.parse().unwrap();
                for ip in [net.network(), net.broadcast()] {
                    assert_eq!(lookup_iso(&reader, ip).as_deref(), Some(*cc), "{ip}");
                }
            }
        }
    }
}
