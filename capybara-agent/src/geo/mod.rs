//! Geo restrictions: a MaxMind DB compiled into per-country CIDR lists (SPEC feature 11).
//!
//! Pure userspace: this module reads a database and does interval arithmetic; the lists it
//! returns are handed to `dataplane` like any other named list, and enforced by the XDP guard.
//!
//! ## Layout
//! - `country`: [`CountryCode`], a validated ISO 3166-1 alpha-2 code (embedded table of the
//!   249 assigned codes plus MaxMind's `XK`; case-insensitive parse, stored upper case).
//! - `db`: [`GeoDb::open`] compiles a database into
//!   `per_country: BTreeMap<CountryCode, CountryNets { v4, v6 }>`.
//! - `mode`: [`block_lists`] (block mode) and [`allow_mode_block`] (allow mode), with the
//!   [`RESERVED_V4`] / [`RESERVED_V6`] tables.
//! - `ranges`: inclusive `u128` intervals — merge, complement, intersection, minimal CIDR
//!   cover. Everything above reduces to sort + linear sweeps, `O(n log n)`.
//! - [`mmdb_writer`]: a MaxMind DB writer for test fixtures (unit tests here, privileged e2e
//!   tests elsewhere). Nothing is downloaded at test time and no `.mmdb` is committed.
//!
//! ## Reading the database
//! Two layouts are read, per record, the first field found wins:
//! - GeoLite2/GeoIP2-Country (`--geoip-db /path/GeoLite2-Country.mmdb`): the country is
//!   `country.iso_code`; when a record has no `country` (GeoLite2 has records with only a
//!   `registered_country`, e.g. some anycast and satellite networks),
//!   `registered_country.iso_code` is used instead;
//! - ip-location-db's `geo-whois-asn-country` (CC0, the default `cargo xtask setup` installs):
//!   a top-level `country_code`.
//!
//! Records with none of these (continent-only ones) are skipped. A database where no record has
//! any is [`GeoDbError::WrongLayout`] (say, an ASN database); a code outside the
//! table is [`GeoDbError::UnknownCountry`]; a file that does not parse, or whose tree or
//! records do not decode, is [`GeoDbError::Corrupt`]; a file that cannot be read is
//! [`GeoDbError::Unreadable`]. Every error names the file. Compilation is all-or-nothing: on
//! error nothing is returned, so callers keep what they had.
//!
//! All networks are walked once with `Reader::networks` (default options: networks without
//! data and the **aliases** of the IPv4 subtree are skipped). Each distinct record is decoded
//! once (keyed by its data offset): GeoLite2 has ~500k networks but only hundreds of records.
//!
//! **IPv4 in an IPv6 database.** MaxMind stores IPv4 under `::/96`; its writer aliases
//! `::ffff:0:0/96` (IPv4-mapped), `2001::/32` (Teredo) and `2002::/16` (6to4) to that
//! subtree. The reader already reports `::/96` networks as IPv4. Anything else that falls in
//! `::/96` or `::ffff:0:0/96` (a non-aliased mapped subtree, an IPv6 network wide enough to
//! span them) is converted to IPv4 too and cut out of the IPv6 list, so IPv4 data appears once,
//! as [`ipnet::Ipv4Net`], and merging removes duplicates. The 6to4/Teredo aliases are not
//! expanded: they are tunnelling prefixes, not country space.
//!
//! **Merging.** Per country and family, ranges are sorted, overlapping and adjacent ones
//! merged, and the result re-expressed as its minimal CIDR cover (so `1.0.0.0/24` + `1.0.1.0/24`
//! of one country become `1.0.0.0/23`).
//!
//! ## Block and allow mode
//! - Block mode: one list per country, named `geo:CN` ([`list_name`]).
//! - Allow mode: one drop set = the complement of (allowed countries ∪ [`RESERVED_V4`] /
//!   [`RESERVED_V6`] ∪ explicit allows), by interval arithmetic, as a minimal CIDR cover.
//!   **Addresses absent from the database are dropped** in allow mode: an allowlist admits only
//!   what it can place in an allowed country. This includes 6to4 (`2002::/16`), since the
//!   database only has it as an alias; Teredo is inside the reserved `2001::/23`.
//!
//! ## Figures
//! Measured on this machine kind (2 vCPU AMD EPYC, release build) with a generated
//! GeoLite2-size fixture — 500,000 networks (350k IPv4 of /18–/24, 150k IPv6 of /29–/48,
//! 10% gaps, 250 countries, 3.3 MB); `cargo xtask bench --filter geo_compile` measures the
//! first row (`geo_compile_500k_ms`, 100–230 ms depending on load):
//!
//! | step                                   | time    | output                              |
//! |----------------------------------------|---------|-------------------------------------|
//! | `GeoDb::open` (read + walk + merge)    | 228 ms  | 315,867 IPv4 + 139,355 IPv6 nets    |
//! | `block_lists(CN, RU)`                  | 19 µs   | 2,477 IPv4 + 1,061 IPv6 nets        |
//! | `allow_mode_block(US, CA, GB)`         | 5.4 ms  | 20,005 IPv4 + 11,846 IPv6 nets      |
//!
//! `GeoDb::open` is CPU-bound for that long: call it on a blocking thread. The allow-mode
//! output size depends on how fragmented the allowed countries are (every gap between two
//! allowed ranges costs up to `2 × bits` prefixes); with real data, allowing one large,
//! fragmented country yields a list of the same order as that country's own list.

mod country;
mod db;
pub mod mmdb_writer;
mod mode;
mod ranges;
#[cfg(test)]
mod tests;

pub use country::{CountryCode, CountryCodeError};
pub use db::{CountryNets, GeoDb, GeoDbError};
pub use mode::{RESERVED_V4, RESERVED_V6, Reserved, allow_mode_block, block_lists, list_name};
