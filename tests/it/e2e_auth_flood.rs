//! A flood of failed handshakes from spoofed sources against the agent's real UDP port (issue
//! 19): 100 000 random sources and one busy /24 at 30 000 datagrams a second for 21 s, from a
//! namespace of the test's own over a veth. The store grows by the agent's bounded reports
//! (at most 24 per 10 s, see `capybara_agent::tunnel::auth_table`), not per source: before
//! the fix, the per-source limiter wrote up to 4 096 synced records per 10 s (≈ 1 MB a
//! minute). The failures are counted, per prefix, and the counts add up.

use std::time::Duration;

use capybara_tests::{
    agent_proc::agent_crate_binary,
    auth_flood::{FloodRig, PORT, auth_records, dir_bytes, flood, sources},
    netns::BpffsDir,
};

const PPS: u64 = 30_000;
const SECONDS: u64 = 21;

#[test]
fn a_spoofed_flood_grows_the_store_by_bounded_counted_records_per_prefix() {
    let bin = agent_crate_binary("capybara-agent");
    let work = tempfile::tempdir().unwrap();
    let pins = BpffsDir::new();
    let mut rig = FloodRig::start(&bin, work.path(), pins.path(), 191).expect("agent started");
    // Settle: the start-up's own writes are not the flood's.
    std::thread::sleep(Duration::from_secs(2));
    let before = dir_bytes(&rig.data_dir);
    let srcs = sources(100_000, 2_000, 7);
    let stats = flood(
        &rig.sender_ns,
        &srcs,
        rig.veth.a.v4,
        PORT,
        PPS,
        Duration::from_secs(SECONDS),
    )
    .expect("flood");
    // The last flush (≤ 10 s) and the recorder's drain (1 s).
    std::thread::sleep(Duration::from_secs(12));
    let grown = dir_bytes(&rig.data_dir).saturating_sub(before);
    let log = std::fs::read_to_string(&rig.log).unwrap_or_default();
    rig.stop();
    let r = auth_records(&rig.data_dir).expect("auth records");
    let (records, failures, prefixes) = (r.records, r.failures, r.prefixes);
    let intervals = (SECONDS + 12).div_ceil(10) + 1;
    eprintln!(
        "sent {} in {:?}; {records} records counting {failures} failures; store +{grown} B",
        stats.sent, stats.elapsed
    );
    assert!(
        stats.sent > PPS * SECONDS / 2,
        "the flood was not sent: {stats:?}"
    );
    assert!(
        records <= intervals * 24,
        "{records} auth records for {intervals} intervals (at most 24 each)"
    );
    assert!(
        failures <= stats.sent && failures > stats.sent / 10,
        "the records count {failures} failures of {} sent",
        stats.sent
    );
    let busy: u64 = prefixes
        .iter()
        .filter(|(p, _)| p == "192.0.2.0/24")
        .map(|(_, c)| c)
        .sum();
    assert!(
        busy > stats.sent / 100,
        "the busy /24 is counted per prefix: {busy} of {} ({prefixes:?})",
        stats.sent
    );
    assert!(
        prefixes.iter().any(|(p, c)| p == "0.0.0.0/0" && *c > 1000),
        "the random sources are in the other tally: {prefixes:?}"
    );
    assert!(
        grown < 256 * 1024,
        "the store grew by {grown} bytes under a {SECONDS} s flood"
    );
    let lines = log
        .lines()
        .filter(|l| l.contains("AuthFailed") || l.contains("AuthFailures"))
        .count();
    assert_eq!(lines, 0, "a log line per failure at the info level");
}
