//! Geo restrictions: a MaxMind DB compiled into per-country CIDR lists (SPEC feature 11).
//!
//! Pure userspace; the lists it produces are handed to `dataplane` like any other named list.
//!
//! TODO figures
//!
//! - [`country`]: [`CountryCode`].
//! - [`db`]: [`GeoDb::open`].
//! - [`policy`]: [`block_lists`], [`allow_mode_block`].
//! - [`mmdb_writer`]: fixtures.

mod country;
mod db;
pub mod mmdb_writer;
mod policy;
mod ranges;
#[cfg(test)]
mod tests;

pub use country::{CountryCode, CountryCodeError};
pub use db::{CountryNets, GeoDb, GeoDbError};
pub use policy::{RESERVED_V4, RESERVED_V6, Reserved, allow_mode_block, block_lists, list_name};
