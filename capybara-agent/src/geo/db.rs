//! [`GeoDb`]: a MaxMind DB compiled into per-country CIDR lists.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use maxminddb::{MaxMindDbError, Reader, WithinOptions, path};

use super::country::{CountryCode, CountryCodeError};
use super::ranges::{self, Range};

/// Why a MaxMind DB could not be compiled. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GeoDbError {
    /// The file could not be read (missing, permissions, …).
    #[error("cannot read MaxMind DB {path}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid MaxMind DB: no metadata marker, bad metadata, a broken search
    /// tree or undecodable records (truncated or garbage files end up here).
    #[error("{path} is not a valid MaxMind DB (corrupt or not an .mmdb file)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        #[source]
        source: MaxMindDbError,
    },
    /// The file is a valid MaxMind DB but holds no country data: no record has
    /// `country.iso_code`, `registered_country.iso_code` or `country_code` (e.g. an ASN
    /// database).
    #[error(
        "{path} has no country data (database type {database_type:?}); expected the \
         GeoLite2-Country layout (country.iso_code) or ip-location-db's country layout \
         (country_code)"
    )]
    WrongLayout {
        /// The file.
        path: PathBuf,
        /// `database_type` from the file's metadata.
        database_type: String,
    },
    /// A record holds a country code that is not ISO 3166-1 alpha-2.
    #[error("{path}: network {network} has an unknown country code")]
    UnknownCountry {
        /// The file.
        path: PathBuf,
        /// The first network found with that code.
        network: IpNet,
        /// The rejected code.
        #[source]
        source: CountryCodeError,
    },
}

/// One country's networks: disjoint, sorted, adjacent ranges merged into a minimal CIDR cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountryNets {
    /// IPv4 networks, including those an IPv6 database stores under `::/96` or
    /// `::ffff:0:0/96`.
    pub v4: Vec<Ipv4Net>,
    /// IPv6 networks, never overlapping the IPv4 subtrees above.
    pub v6: Vec<Ipv6Net>,
}

impl CountryNets {
    /// Number of networks, IPv4 and IPv6.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether there are no networks.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// A MaxMind DB compiled into CIDR lists per country.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeoDb {
    /// Every country with at least one network, alphabetically.
    pub per_country: BTreeMap<CountryCode, CountryNets>,
    /// `database_type` from the metadata (e.g. `GeoLite2-Country`).
    pub database_type: String,
    /// `build_epoch` from the metadata (seconds since the Unix epoch).
    pub build_epoch: u64,
}

/// The IPv6 ranges that hold IPv4 data: `::/96` (where MaxMind stores IPv4) and
/// `::ffff:0:0/96` (IPv4-mapped), with the IPv4 address in the low 32 bits.
const V4_IN_V6: [Range; 2] = [
    (0, ranges::V4_MAX),
    (0xffff << 32, (0xffff << 32) | ranges::V4_MAX),
];

/// Per-country ranges while compiling.
#[derive(Default)]
struct Acc {
    v4: Vec<Range>,
    v6: Vec<Range>,
}

impl GeoDb {
    /// Reads and compiles the MaxMind DB at `path`.
    ///
    /// CPU-bound (see the module docs for figures): call it from a blocking thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GeoDbError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| GeoDbError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(bytes, path)
    }

    /// Compiles a MaxMind DB already in memory; `path` only names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self, GeoDbError> {
        let corrupt = |source| GeoDbError::Corrupt {
            path: path.to_owned(),
            source,
        };
        let reader = Reader::from_source(bytes).map_err(corrupt)?;
        let metadata = reader.metadata();
        let (database_type, build_epoch) = (metadata.database_type.clone(), metadata.build_epoch);

        // Decoded country per data offset: GeoLite2 has ~500k networks but only a few hundred
        // distinct records, so each record is decoded once.
        let mut decoded: HashMap<usize, Option<CountryCode>> = HashMap::new();
        let mut acc: BTreeMap<CountryCode, Acc> = BTreeMap::new();
        // Default options skip networks without data and the aliases of the IPv4 subtree
        // (`::ffff:0:0/96`, `2002::/16`, … point at the `::/96` node), so IPv4 data is seen once.
        for item in reader.networks(WithinOptions::default()).map_err(corrupt)? {
            let item = item.map_err(corrupt)?;
            let Some(offset) = item.offset() else {
                continue;
            };
            let network = item.network().map_err(corrupt)?;
            let (ip, prefix) = (network.ip(), network.prefix());
            let country = match decoded.get(&offset) {
                Some(c) => *c,
                None => {
                    // The first of the layouts' fields that the record has (module docs).
                    let mut code = None;
                    for field in [
                        &path!["country", "iso_code"][..],
                        &path!["registered_country", "iso_code"][..],
                        &path!["country_code"][..],
                    ] {
                        code = item.decode_path::<String>(field).map_err(corrupt)?;
                        if code.is_some() {
                            break;
                        }
                    }
                    let country = code
                        .map(|code| CountryCode::parse(&code))
                        .transpose()
                        .map_err(|source| GeoDbError::UnknownCountry {
                            path: path.to_owned(),
                            network: IpNet::new(ip, prefix).expect("reader yields valid networks"),
                            source,
                        })?;
                    decoded.insert(offset, country);
                    country
                }
            };
            let Some(country) = country else { continue };
            let entry = acc.entry(country).or_default();
            match ip {
                IpAddr::V4(a) => {
                    let net = Ipv4Net::new(a, prefix).expect("reader yields valid networks");
                    entry.v4.push(ranges::v4_range(net));
                }
                IpAddr::V6(a) => {
                    let net = Ipv6Net::new(a, prefix).expect("reader yields valid networks");
                    let (first, last) = ranges::v6_range(net);
                    // A network the reader reports as IPv6 may still cover IPv4 subtrees (e.g.
                    // a non-aliased `::ffff:0:0/96`, or `::/64` with data): its IPv4 part is
                    // reported as IPv4, the rest as IPv6.
                    for (lo, hi) in V4_IN_V6 {
                        let (a, b) = (first.max(lo), last.min(hi));
                        if a <= b {
                            entry.v4.push((a - lo, b - lo));
                        }
                    }
                    entry.v6.push((first, last));
                }
            }
        }
        if acc.is_empty() {
            return Err(GeoDbError::WrongLayout {
                path: path.to_owned(),
                database_type,
            });
        }

        let mut v4_in_v6 = V4_IN_V6.to_vec();
        ranges::normalize(&mut v4_in_v6);
        let per_country = acc
            .into_iter()
            .map(|(country, mut a)| {
                ranges::normalize(&mut a.v4);
                ranges::normalize(&mut a.v6);
                let v6 = ranges::difference(&a.v6, &v4_in_v6);
                let nets = CountryNets {
                    v4: ranges::v4_cidrs(&a.v4),
                    v6: ranges::v6_cidrs(&v6),
                };
                (country, nets)
            })
            .collect();
        Ok(Self {
            per_country,
            database_type,
            build_epoch,
        })
    }

    /// The networks of `country`, if the database has any.
    pub fn country(&self, country: CountryCode) -> Option<&CountryNets> {
        self.per_country.get(&country)
    }
}
