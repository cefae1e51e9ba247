//! `geo_compile_500k_ms`: [`GeoDb::open`] of a generated GeoLite2-size database (the fixture
//! shape of the geo module's tests, seed 1), the figure the geo module's docs quote.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use capybara_agent::geo::{CountryCode, GeoDb, mmdb_writer::MmdbWriter};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::{Figure, GEO_COMPILE_500K_MS, median};
use crate::progress;

/// IPv4 networks in the fixture.
const V4_NETWORKS: usize = 350_000;
/// IPv6 networks in the fixture.
const V6_NETWORKS: usize = 150_000;
/// How many times the database is compiled (the median is reported).
const RUNS: usize = 3;

/// Generates a database shaped like GeoLite2-Country (as `geo::tests::geolite_like` does): the
/// IPv4 space walked in order from 1.0.0.0 with networks of /18–/24 (aligned down to the walk
/// position), 10 % gaps, runs of one country so that adjacent networks merge; IPv6 likewise from
/// 2400::, /29–/48. Returns the writer and the number of networks inserted.
pub fn geolite_like(seed: u64, n_v4: usize, n_v6: usize) -> Result<(MmdbWriter, usize)> {
    let codes: Vec<CountryCode> = CountryCode::all().collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = MmdbWriter::new(6);
    let mut inserted = 0usize;
    let mut country = codes[0];
    let mut next_country = |rng: &mut StdRng| {
        if rng.random_bool(0.7) {
            country = codes[rng.random_range(0..codes.len())];
        }
        country
    };
    let mut a: u64 = 1 << 24;
    while inserted < n_v4 && a < 0xe000_0000 {
        let len = rng
            .random_range(18..=24u32)
            .max(32 - (a as u32).trailing_zeros().min(32));
        if !rng.random_bool(0.1) {
            let n = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a as u32), len as u8)?);
            w.insert(n, next_country(&mut rng).as_str())?;
            inserted += 1;
        }
        a += 1u64 << (32 - len);
    }
    let v4 = inserted;
    let mut a: u128 = 0x2400 << 112;
    while inserted - v4 < n_v6 {
        let len = rng
            .random_range(29..=48u32)
            .max(128 - a.trailing_zeros().min(128));
        if !rng.random_bool(0.1) {
            let n = IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len as u8)?);
            w.insert(n, next_country(&mut rng).as_str())?;
            inserted += 1;
        }
        a += 1u128 << (128 - len);
    }
    Ok((w, inserted))
}

/// Writes the fixture to a temporary file and times `GeoDb::open` on it [`RUNS`] times.
pub fn compile_500k() -> Result<Figure> {
    let t = Instant::now();
    let (w, networks) = geolite_like(1, V4_NETWORKS, V6_NETWORKS)?;
    let bytes = w.to_bytes();
    drop(w);
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    let path = dir.path().join("geolite-like-500k.mmdb");
    std::fs::write(&path, &bytes).with_context(|| format!("write {}", path.display()))?;
    progress!(
        "geo: fixture of {networks} networks ({:.1} MB) built in {:.1} s",
        bytes.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let mut runs = Vec::with_capacity(RUNS);
    for run in 1..=RUNS {
        let t = Instant::now();
        let db = GeoDb::open(&path).with_context(|| format!("GeoDb::open {}", path.display()))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (v4, v6) = db
            .per_country
            .values()
            .fold((0, 0), |(a, b), n| (a + n.v4.len(), b + n.v6.len()));
        ensure!(
            v4 > 0 && v6 > 0 && db.per_country.len() > 200,
            "the compiled database is implausible: {} countries, {v4} IPv4 + {v6} IPv6 networks",
            db.per_country.len()
        );
        progress!(
            "geo: run {run}/{RUNS}: GeoDb::open {ms:.1} ms -> {} countries, {v4} IPv4 + {v6} IPv6 \
             merged networks",
            db.per_country.len()
        );
        runs.push(ms);
    }
    Ok(Figure {
        name: GEO_COMPILE_500K_MS,
        value: median(&runs),
        unit: "ms",
    })
}
