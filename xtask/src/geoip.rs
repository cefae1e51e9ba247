//! The country database for `geo block/allow`: fetched by `cargo xtask setup` (and on its own by
//! `cargo xtask geoip`) into the cache, never into the repository.
//!
//! What: ip-location-db's `geo-whois-asn-country` in MMDB form, the npm package
//! [`PACKAGE`]@[`VERSION`] (CC0-1.0; its data is derived from the RIRs' whois and ASN data, CC BY
//! 4.0 by the NRO, and geofeeds). One file of it, `geo-whois-asn-country.mmdb` (IPv4 and IPv6,
//! records `{"country_code": "CN"}`, ~7.8 MB), is installed as [`installed_path`]:
//! `<cache>/geoip/geo-whois-asn-country.mmdb`, `/var/cache/capybara/geoip/…` by default, the
//! path the agent looks at when `--geoip-db` is not given (`capybara_agent::paths::GEOIP_DB`).
//!
//! How: the tarball is downloaded with `curl` from the npm registry, its SHA-512 compared with
//! [`SHA512`] (the package's `dist.integrity` in the registry's metadata, pinned here, so a
//! changed or corrupted download is refused), the one file extracted with `tar`, and renamed
//! into place (a crash never leaves a partial database at the path); then the stamp
//! `<cache>/geoip/SOURCE` records what was installed. A second run finds the stamp naming
//! [`VERSION`] and the file, and does nothing.
//!
//! Why pinned rather than "latest": the download is verified against a hash that did not come
//! over the same connection, and the package's README says npm releases are frozen (the
//! project moved its updates to GitHub releases), so "latest" would not be fresher. For more
//! accurate data, MaxMind's GeoLite2 Country (free account) works the same way:
//! `capybara-agent --geoip-db /path/GeoLite2-Country.mmdb`.
//!
//! Measured here (one run): the tarball is 7 610 169 bytes, downloaded in 0.12 s; the database
//! 7 841 291 bytes (251 countries; the agent compiles it at start); a second run takes 0.17 s.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::exec::{self, cmd};

/// The npm package.
pub const PACKAGE: &str = "@ip-location-db/geo-whois-asn-country-mmdb";
/// The pinned version.
pub const VERSION: &str = "2.3.2026061719";
/// The tarball of [`VERSION`].
const TARBALL: &str = "https://registry.npmjs.org/@ip-location-db/geo-whois-asn-country-mmdb/-/\
                       geo-whois-asn-country-mmdb-2.3.2026061719.tgz";
/// SHA-512 of the tarball, hex: npm's `dist.integrity`
/// `sha512-xemBDNQl4mCYDuVbqe3jKGKsVDykZGkfvebhtOh/3VGLadq8vsp7t7ontpMUt3hH7sAGT0eLDyJ99SV+0waxZg==`.
const SHA512: &str = "c5e9810cd425e260980ee55ba9ede32862ac543ca464691fbde6e1b4e87fdd51\
                      8b69dabcbeca7bb7ba27b69314b77847eec0064f478b0f227df5257ed306b166";
/// The file of the package that is installed (IPv4 and IPv6 in one database).
const MEMBER: &str = "package/geo-whois-asn-country.mmdb";
/// Its name in the cache (the agent's default `--geoip-db` is `/var/cache/capybara/geoip/` + this).
pub const FILE_NAME: &str = "geo-whois-asn-country.mmdb";

/// Flags of `cargo xtask geoip`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The pinned version was already installed.
    Present(PathBuf),
    /// This run downloaded and installed it.
    Fetched {
        /// Where.
        path: PathBuf,
        /// Size of the tarball, bytes.
        tarball_bytes: u64,
        /// Size of the installed database, bytes.
        db_bytes: u64,
        /// Download time, seconds.
        download_secs: f64,
    },
}

/// `<cache>/geoip`.
pub fn dir(cache: &Path) -> PathBuf {
    cache.join("geoip")
}

/// The installed database: `<cache>/geoip/geo-whois-asn-country.mmdb`.
pub fn installed_path(cache: &Path) -> PathBuf {
    dir(cache).join(FILE_NAME)
}

/// What the stamp says when [`VERSION`] is installed.
fn stamp_text() -> String {
    format!("{PACKAGE}@{VERSION} {MEMBER} sha512:{SHA512}\n")
}

/// Whether the pinned version is installed under `cache`.
pub fn is_installed(cache: &Path) -> bool {
    installed_path(cache).is_file()
        && fs::read_to_string(dir(cache).join("SOURCE")).is_ok_and(|s| s == stamp_text())
}

/// Entry point of `cargo xtask geoip` (setup's geo step on its own).
pub fn run(_args: &Args) -> Result<()> {
    match ensure(&exec::cache_dir())? {
        Outcome::Present(path) => eprintln!(
            "geoip: ok: {PACKAGE}@{VERSION} already at {}",
            path.display()
        ),
        Outcome::Fetched {
            path,
            tarball_bytes,
            db_bytes,
            download_secs,
        } => eprintln!(
            "geoip: done: {PACKAGE}@{VERSION} at {} ({db_bytes} bytes; tarball {tarball_bytes} \
             bytes downloaded in {download_secs:.2} s)",
            path.display()
        ),
    }
    Ok(())
}

/// Install the pinned database under `cache` unless it is there already.
pub fn ensure(cache: &Path) -> Result<Outcome> {
    let path = installed_path(cache);
    if is_installed(cache) {
        return Ok(Outcome::Present(path));
    }
    let dir = dir(cache);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // A scratch directory beside the result, so the final rename stays on one file system.
    let scratch = dir.join(".download");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("remove {}", scratch.display()))?;
    }
    fs::create_dir(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let result = fetch_into(&scratch, &path);
    let _ = fs::remove_dir_all(&scratch);
    let (tarball_bytes, download_secs) = result?;
    fs::write(dir.join("SOURCE"), stamp_text())
        .with_context(|| format!("write {}", dir.join("SOURCE").display()))?;
    let db_bytes = fs::metadata(&path)
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    Ok(Outcome::Fetched {
        path,
        tarball_bytes,
        db_bytes,
        download_secs,
    })
}

/// Download, verify, extract into `scratch`, then rename the database to `dest`.
fn fetch_into(scratch: &Path, dest: &Path) -> Result<(u64, f64)> {
    let tarball = scratch.join("package.tgz");
    let started = Instant::now();
    exec::run(
        cmd("curl")
            .args(["--fail", "--silent", "--show-error", "--location"])
            .args(["--retry", "3", "--max-time", "300", "--output"])
            .arg(&tarball)
            .arg(TARBALL),
    )
    .context("download the country database (is https://registry.npmjs.org reachable?)")?;
    let download_secs = started.elapsed().as_secs_f64();
    let tarball_bytes = fs::metadata(&tarball)
        .with_context(|| format!("stat {}", tarball.display()))?
        .len();
    let out = exec::output(cmd("sha512sum").arg(&tarball))?;
    let digest = String::from_utf8_lossy(&out.stdout);
    check_digest(digest.split_whitespace().next().unwrap_or_default())?;
    exec::run(
        cmd("tar")
            .args(["-xzmf"])
            .arg(&tarball)
            .arg("-C")
            .arg(scratch)
            .arg(MEMBER),
    )?;
    let extracted = scratch.join(MEMBER);
    fs::rename(&extracted, dest)
        .with_context(|| format!("move {} to {}", extracted.display(), dest.display()))?;
    Ok((tarball_bytes, download_secs))
}

/// Refuse a tarball whose SHA-512 (hex) is not the pinned one.
fn check_digest(hex: &str) -> Result<()> {
    if !hex.eq_ignore_ascii_case(SHA512) {
        bail!(
            "the downloaded {PACKAGE}@{VERSION} has SHA-512 {hex}, expected {SHA512} (npm's \
             dist.integrity): refusing it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_digest_is_refused_and_the_stamp_decides_what_is_installed() {
        check_digest(SHA512).unwrap();
        check_digest(&SHA512.to_uppercase()).unwrap();
        let e = check_digest(&"0".repeat(128)).unwrap_err().to_string();
        assert!(e.contains("refusing") && e.contains(VERSION), "{e}");

        let cache = std::env::temp_dir().join(format!("xtask-geoip-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(dir(&cache)).unwrap();
        assert!(!is_installed(&cache));
        fs::write(installed_path(&cache), b"db").unwrap();
        assert!(!is_installed(&cache), "no stamp: fetched again");
        fs::write(dir(&cache).join("SOURCE"), "@other@1\n").unwrap();
        assert!(!is_installed(&cache), "another version: fetched again");
        fs::write(dir(&cache).join("SOURCE"), stamp_text()).unwrap();
        assert!(is_installed(&cache));
        assert_eq!(
            ensure(&cache).unwrap(),
            Outcome::Present(installed_path(&cache))
        );
        fs::remove_dir_all(&cache).unwrap();
    }
}
