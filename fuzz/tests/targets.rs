//! One fuzz target per parser of outside input (issue 19), with bolero. Each runs seed inputs
//! (built here, small) mutated by byte edits, and random text, for `CAPYBARA_FUZZ_SECS` seconds
//! (default 2: the smoke time of `cargo xtask test`; `cargo xtask fuzz --time N` sets it). The
//! contract of every parser: no panic, no hang (each target's time is bounded and a stuck input
//! fails the run by its time), an error that names its field, and a round trip where the parser
//! has a writer (a document that parses writes YAML that parses to the same document).
//!
//! Targets: `policy_yaml` (policy files, `PolicyDoc::from_yaml`), `template_yaml`
//! (configuration templates), `cidr` (blocklist entries, `net::Cidr`), `window` (time windows),
//! `mmdb` (the country database reader, seeded by `geo::mmdb_writer`), `uapi` (the tunnel's `wg`
//! UAPI text protocol, `tunnel::uapi::answer`: only whole known answers come out, at most one per
//! request, whatever the bytes), `cron` (scheduled tasks' expressions and zones,
//! `service::schedules::CronSchedule`: an error names `cron` or `tz`; an accepted one parses
//! again from what it shows, and its next due time is after the start and its own latest).
//! `intel_list` (IP intelligence's list files and feeds, `service::intel::parse::parse_list`: a
//! refused list names a line that exists, quoted within its bound; an accepted one, written one
//! entry a line, parses to the same entries).

use std::time::Duration;

use capybara_agent::{
    geo::{GeoDb, mmdb_writer::MmdbWriter},
    net::Cidr,
    service::{
        intel::parse::{ListParseError, MAX_QUOTED, parse_list},
        policy::model::TimeWindow,
        policy_file::doc::PolicyDoc,
        schedules::CronSchedule,
        templates::model::ConfigTemplate,
    },
    tunnel::uapi,
};

/// How long each target runs.
fn time() -> Duration {
    let secs = std::env::var("CAPYBARA_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    Duration::from_secs(secs)
}

/// An input: a seed (by index) with one to [`MAX_EDITS`] byte edits (position modulo the
/// length + 1; byte 0 deletes, any other inserts), or raw bytes when there are no edits.
type Input = (u8, Vec<(u16, u8)>, Vec<u8>);

/// Few edits keep most mutants close to a valid input, so the parser's deeper paths run.
const MAX_EDITS: usize = 3;

/// A text target inserts printable ASCII, newlines and the separators of its grammar only
/// (raw bytes still reach it through the raw inputs).
fn text_byte(b: u8) -> u8 {
    match b % 100 {
        95 => b'\n',
        96 => b' ',
        97 => b':',
        98 => b'-',
        99 => b'/',
        n => b' ' + n,
    }
}

fn mutate(seeds: &[Vec<u8>], text: bool, (i, edits, raw): &Input) -> Vec<u8> {
    if edits.is_empty() {
        return raw.clone();
    }
    let mut s = seeds[*i as usize % seeds.len()].clone();
    for &(at, b) in edits.iter().take(1 + edits.len() % MAX_EDITS) {
        let at = at as usize % (s.len() + 1);
        match b {
            0 if at < s.len() => {
                s.remove(at);
            }
            _ => s.insert(at, if text { text_byte(b) } else { b }),
        }
    }
    s
}

/// Checks the seeds, then mutated seeds and raw inputs for [`time`]; prints how many inputs ran
/// and how many the parser accepted (`check` returns whether it did).
fn run(
    name: &str,
    text: bool,
    seeds: Vec<Vec<u8>>,
    check: impl Fn(&[u8]) -> bool + std::panic::RefUnwindSafe,
) {
    for s in &seeds {
        check(s);
    }
    let count = std::sync::atomic::AtomicUsize::new(0);
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let start = std::time::Instant::now();
    bolero::check!()
        .with_type::<Input>()
        .with_test_time(time())
        .for_each(|input| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if check(&mutate(&seeds, text, input)) {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    eprintln!(
        "fuzz {name}: {} inputs ({} accepted) in {:.1} s",
        count.into_inner(),
        accepted.into_inner(),
        start.elapsed().as_secs_f64()
    );
}

const POLICY_SEED: &str = "\
default:
  bandwidth: 100mbit
users:
  alice:
    devices: [laptop, phone]
    limits: { limit: 100GB, period: monthly, grace: 5% }
    template: guest
groups:
  staff:
    members: [alice]
    limits: { bandwidth: 10mbit, connections: 3, window: Mon-Fri 08:00-18:00, tz: Europe/Berlin }
    shared_limit: 2TB
templates:
  guest: { bandwidth: 5mbit, limit: 2GB, period: daily }
";

#[test]
fn policy_yaml() {
    const NAME: &str = "policy_yaml";
    run(
        NAME,
        true,
        vec![
            POLICY_SEED.into(),
            b"users: {a: {devices: [x]}}".to_vec(),
            b"{}".to_vec(),
        ],
        |b| {
            let Ok(text) = std::str::from_utf8(b) else {
                return false;
            };
            match PolicyDoc::from_yaml(text) {
                Ok(d) => {
                    let again = PolicyDoc::from_yaml(&d.to_yaml())
                        .unwrap_or_else(|e| panic!("{text:?} wrote YAML that fails: {e}"));
                    assert_eq!(again, d, "round trip of {text:?}");
                    true
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    false
                }
            }
        },
    );
}

#[test]
fn template_yaml() {
    const NAME: &str = "template_yaml";
    let seed = ConfigTemplate::from_yaml("name: t\n")
        .map(|t| t.to_yaml())
        .unwrap_or_else(|_| "name: t\n".into());
    run(NAME, true, vec![seed.into_bytes(), b"{}".to_vec()], |b| {
        let Ok(text) = std::str::from_utf8(b) else {
            return false;
        };
        if let Ok(t) = ConfigTemplate::from_yaml(text) {
            let again = ConfigTemplate::from_yaml(&t.to_yaml())
                .unwrap_or_else(|e| panic!("{text:?} wrote YAML that fails: {e}"));
            assert_eq!(again.to_yaml(), t.to_yaml(), "round trip of {text:?}");
            return true;
        }
        false
    });
}

/// A text parser whose values write text that parses back to them (`Display` and `FromStr`).
fn text_round_trip<T>(name: &str, seeds: &[&str])
where
    T: std::str::FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    run(
        name,
        true,
        seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        |b| {
            let Ok(text) = std::str::from_utf8(b) else {
                return false;
            };
            let Ok(v) = text.parse::<T>() else {
                return false;
            };
            let again: T = v
                .to_string()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {v} (from {text:?}) does not parse"));
            assert_eq!(again, v, "round trip of {text:?}");
            true
        },
    );
}

#[test]
fn cidr() {
    text_round_trip::<Cidr>(
        "cidr",
        &[
            "10.0.0.0/8",
            "192.0.2.1",
            "2001:db8::/32",
            "::ffff:1.2.3.4/128",
        ],
    );
}

#[test]
fn window() {
    text_round_trip::<TimeWindow>(
        "window",
        &[
            "Mon-Fri 08:00-18:00",
            "Sat,Sun 22:00-02:00",
            "daily 00:00-24:00",
        ],
    );
}

#[test]
fn cron() {
    const NAME: &str = "cron";
    // The expression on the first line, the zone (if any) on the second.
    let seeds = [
        "0 2 * * *",
        "0 9 * * MON\nEurope/Berlin",
        "*/15 8-18 * JAN-MAR mon-fri\nUTC",
        "0 0 L * *",
        "30 2 1,15 * SUN#2\nAmerica/New_York",
        "5 4 * * 7L",
    ];
    // 2026-12-07T00:00:00Z.
    const FROM: i64 = 1_796_601_600;
    run(
        NAME,
        true,
        seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        |b| {
            let Ok(text) = std::str::from_utf8(b) else {
                return false;
            };
            let (expr, tz) = text.split_once('\n').unwrap_or((text, ""));
            match CronSchedule::parse(expr, tz) {
                Err(e) => {
                    let m = e.to_string();
                    assert!(
                        m.starts_with("cron: ") || m.starts_with("tz: "),
                        "{text:?}: the error names no field: {m}"
                    );
                    false
                }
                Ok(s) => {
                    let again = CronSchedule::parse(s.expr(), s.tz())
                        .unwrap_or_else(|e| panic!("{text:?}: {} does not parse: {e}", s.expr()));
                    assert_eq!(again, s, "round trip of {text:?}");
                    if let Some(next) = s.next_after(FROM) {
                        assert!(next > FROM, "{text:?}: next {next} not after {FROM}");
                        assert_eq!(s.latest_at_or_before(next), Some(next), "{text:?}");
                    }
                    true
                }
            }
        },
    );
}

#[test]
fn mmdb() {
    const NAME: &str = "mmdb";
    let mut v4 = MmdbWriter::new(4);
    v4.insert("192.0.2.0/24".parse().unwrap(), "DE").unwrap();
    v4.insert("198.51.100.0/25".parse().unwrap(), "US").unwrap();
    let mut v6 = MmdbWriter::new(6);
    v6.insert("2001:db8::/32".parse().unwrap(), "FR").unwrap();
    v6.insert("10.0.0.0/8".parse().unwrap(), "CN").unwrap();
    let path = std::path::Path::new("fuzz.mmdb");
    run(NAME, false, vec![v4.to_bytes(), v6.to_bytes()], |b| {
        GeoDb::from_bytes(b.to_vec(), path).is_ok()
    });
}

#[test]
fn uapi() {
    const NAME: &str = "uapi";
    let seeds = [
        "get=1\n\n",
        "set=1\nprivate_key=00\nlisten_port=1\n\nget=1\n\n",
        "get=1\n\nget=1\n\nset=1\n\n",
    ];
    run(
        NAME,
        true,
        seeds.iter().map(|s| s.as_bytes().to_vec()).collect(),
        |b| {
            let mut out = Vec::new();
            uapi::answer(b, &mut out, || "listen_port=1\n".to_owned(), || true)
                .expect("reading a slice cannot fail");
            let mut rest = &out[..];
            let mut answers = 0;
            while !rest.is_empty() {
                rest = rest
                    .strip_prefix(b"listen_port=1\nerrno=0\n\n")
                    .or_else(|| rest.strip_prefix(b"errno=95\n\n"))
                    .unwrap_or_else(|| panic!("{b:?} got a partial or unknown answer {out:?}"));
                answers += 1;
            }
            assert!(answers <= b.iter().filter(|&&c| c == b'\n').count());
            answers > 0
        },
    );
}

#[test]
fn intel_list() {
    let seeds: Vec<Vec<u8>> = [
        "# Tor exits\n185.220.101.1\n185.220.101.2/32 ; trailing\n\n2001:db8::/32\r\n",
        "ExitNode 0011BD2485AD45D984EC4159C88FC066E5E3300E\nPublished 2024-05-01 10:12:33\n\
         LastStatus 2024-05-01 12:00:00\nExitAddress 162.247.74.201 2024-05-01 12:07:02\n",
        "; Spamhaus DROP\n1.10.16.0/20 ; SBL256894\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run("intel_list", true, seeds, |bytes| match parse_list(bytes) {
        Ok(list) => {
            let text: String = list.iter().map(|c| format!("{c}\n")).collect();
            assert_eq!(
                parse_list(text.as_bytes()).as_ref(),
                Ok(&list),
                "the entries of {bytes:?} written one a line do not parse back"
            );
            true
        }
        Err(ListParseError::Line { line, text, .. }) => {
            let lines = bytes.split(|&b| b == b'\n').count();
            assert!(
                (1..=lines).contains(&line),
                "line {line} of {lines} in {bytes:?}"
            );
            assert!(text.chars().count() <= MAX_QUOTED + 1, "{text:?}");
            false
        }
        Err(_) => false,
    });
}
