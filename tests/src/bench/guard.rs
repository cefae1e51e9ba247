//! The XDP guard over source blocklists of 0, 1k, 100k and 1M prefixes, and replacing a 1M list.
//!
//! ## Method
//! - The lists are installed through the real API: per list size, [`Dataplane::open`] on a
//!   directory of its own under the benchmark's bpffs directory ([`BenchPins`]),
//!   [`Dataplane::set_guard_ports`], then [`Dataplane::list_replace`] of one source list. Prefixes come from
//!   [`random_v4_prefixes`]: the whole IPv4 space, 95 % of lengths in /20–/32, 5 % in /16–/19.
//! - The program measured is `xdp_guard` of a second load of the same object over the same
//!   pins (the dataplane keeps its own programs private until it attaches them), so it reads
//!   exactly the maps the dataplane wrote.
//! - Probes: `rounds × probes` **distinct** random source addresses that the list does not
//!   cover — checked against an independent interval set built from the prefixes *and* against
//!   [`Dataplane::lookup_v4`] — in Ethernet/IPv4/UDP frames (a WireGuard handshake-initiation
//!   sized payload) to the guarded port, in random order. Every frame runs **once**
//!   (`BPF_PROG_TEST_RUN`, repeat = 1) so each lookup pays its own cache and TLB misses; one
//!   round is the sum of the kernel-reported durations over its probes, divided by their number,
//!   and the figure is the median of the rounds. Rounds never re-use an address, and they are
//!   interleaved across the list sizes (all dataplanes are open at once), so the slow phases of
//!   a shared machine spread over every size instead of skewing the ratio.
//! - Checks, so that a broken program is never measured: every probe returns `XDP_PASS`, the
//!   `XDP_PASS_CLEAN` counter grows by exactly the number of probes (the guarded path ran, not
//!   the unguarded shortcut), and addresses inside random prefixes of the list return `XDP_DROP`
//!   and are counted under the list.
//! - `list_replace_1m_ms`: the 1M list replaced by another 1M list, alternately, wall clock
//!   around the API call (validation, compile, write, flip, cleanup); median of the runs.
//! - `xdp_guard_ns_1m_lpm_baseline`: the kernel's own LPM trie in the same run, without new
//!   kernel code: the object's IPv6 source trie (`SRC_V6`) of a third load (own pins, trie sized
//!   for the list) holds the same 1M prefixes as IPv4-mapped IPv6 prefixes
//!   (`::ffff:a.b.c.d/96+len`), and the same probe addresses are sent as IPv4-mapped IPv6
//!   sources. The trie's shape (nodes only at inserted prefixes and branch points) is that of an
//!   IPv4 trie of the same prefixes; the frames differ only in the IP header parsed. The same
//!   probes against the empty trie are printed for comparison.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use capybara_agent::{
    blocklist::{Direction, ListId, ListName, sample::random_v4_prefixes},
    dataplane::{Dataplane, DataplaneConfig, object::OBJECT},
    net::Cidr,
};
use capybara_common::{
    blocklist::V6KeyData,
    config::{CONFIG_F_SRC_V6_LISTS, Config},
    counters::{Counter, XDP_DROP_BLOCKLIST, XDP_PASS_CLEAN},
    maps as names,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::SliceRandom as _};

use super::{
    BenchPins, Figure, LIST_REPLACE_1M_MS, Selection, XDP_GUARD_1M_OVER_1K, XDP_GUARD_NS_1K,
    XDP_GUARD_NS_1M, XDP_GUARD_NS_1M_LPM_BASELINE, XDP_GUARD_NS_100K, XDP_GUARD_NS_EMPTY, median,
};
use crate::{bpf::TEST_CAPACITIES, packets, progress};

/// `XDP_DROP` (UAPI `enum xdp_action`).
const XDP_DROP: u32 = 1;
/// `XDP_PASS` (UAPI `enum xdp_action`).
const XDP_PASS: u32 = 2;

/// The guarded UDP port (WireGuard's default).
const GUARD_PORT: u16 = 51820;
/// Source port of the probes.
const SOURCE_PORT: u16 = 40_000;
/// UDP payload of the probes: a WireGuard handshake initiation.
const PAYLOAD: usize = 148;
/// The server's addresses in the probes.
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Addresses inside the list run per list size (must return `XDP_DROP`).
const MATCH_PROBES: usize = 256;
/// Replacements timed for `list_replace_1m_ms`.
const REPLACE_RUNS: usize = 3;

/// The name of the benchmark's source list.
const LIST: &str = "bench";

/// Seeds of the generated lists (fixed: every run measures the same lists).
const SEED_1K: u64 = 1_000;
const SEED_100K: u64 = 100_000;
const SEED_1M: u64 = 1_000_000;
/// The list that replaces the 1M list in `list_replace_1m_ms`.
const SEED_1M_OTHER: u64 = 1_000_001;
/// Seed of the probe addresses and their order.
const SEED_PROBES: u64 = 42;

/// How the XDP benchmarks sample.
#[derive(Debug, Clone, Copy)]
pub struct GuardOptions {
    /// Distinct probe addresses per round.
    pub probes: usize,
    /// Rounds per list size (the median is reported).
    pub rounds: usize,
}

/// One list size of the XDP benchmarks.
struct Size {
    name: &'static str,
    prefixes: usize,
    seed: u64,
}

const SIZES: [Size; 4] = [
    Size {
        name: XDP_GUARD_NS_EMPTY,
        prefixes: 0,
        seed: 0,
    },
    Size {
        name: XDP_GUARD_NS_1K,
        prefixes: 1_000,
        seed: SEED_1K,
    },
    Size {
        name: XDP_GUARD_NS_100K,
        prefixes: 100_000,
        seed: SEED_100K,
    },
    Size {
        name: XDP_GUARD_NS_1M,
        prefixes: 1_000_000,
        seed: SEED_1M,
    },
];

/// Runs the selected XDP and list-replace benchmarks.
pub fn run(sel: &Selection, pins: &BenchPins, opts: GuardOptions) -> Result<Vec<Figure>> {
    ensure!(
        opts.probes > 0 && opts.rounds > 0,
        "probes and rounds must be > 0"
    );
    let ratio = sel.wants(XDP_GUARD_1M_OVER_1K);
    let measure: Vec<&Size> = SIZES
        .iter()
        .filter(|s| {
            sel.wants(s.name) || (ratio && (s.name == XDP_GUARD_NS_1K || s.name == XDP_GUARD_NS_1M))
        })
        .collect();
    let baseline = sel.wants(XDP_GUARD_NS_1M_LPM_BASELINE);
    let replace = sel.wants(LIST_REPLACE_1M_MS);
    if measure.is_empty() && !baseline && !replace {
        return Ok(Vec::new());
    }

    let mut prepared = Vec::with_capacity(measure.len());
    for (i, size) in measure.iter().enumerate() {
        prepared.push(Prepared::new(pins.path(), size, i as u64, opts)?);
    }
    // Rounds are interleaved across the list sizes (each in its own dataplane), starting with a
    // different size each round, so a slow phase of a shared machine weighs on all sizes alike
    // instead of on whichever size happened to run then.
    for r in 0..opts.rounds {
        let n = prepared.len();
        for k in 0..n {
            prepared[(r + k) % n].run_round(r, opts)?;
        }
        progress!(
            "round {}/{}: {}",
            r + 1,
            opts.rounds,
            prepared
                .iter()
                .map(|p| format!("{} {:.1} ns", p.name, p.rounds[r]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut figures = Vec::new();
    let mut ns = std::collections::HashMap::new();
    for p in &mut prepared {
        let value = p.finish(opts)?;
        ns.insert(p.name, value);
        figures.push(Figure {
            name: p.name,
            value,
            unit: "ns",
        });
    }
    if let (Some(one_k), Some(one_m)) = (ns.get(XDP_GUARD_NS_1K), ns.get(XDP_GUARD_NS_1M))
        && ratio
    {
        let value = one_m / one_k;
        progress!("{XDP_GUARD_1M_OVER_1K}: {value:.3} (target <= 1.5)");
        figures.push(Figure {
            name: XDP_GUARD_1M_OVER_1K,
            value,
            unit: "ratio",
        });
    }
    figures.retain(|f| sel.wants(f.name));
    if !replace && !baseline {
        return Ok(figures);
    }

    // The 1M list, its dataplane and its probes, when measured; else made here.
    let one_m = prepared
        .iter()
        .position(|p| p.name == XDP_GUARD_NS_1M)
        .map(|i| prepared.swap_remove(i));
    drop(prepared);
    let (mut bench, list_1m, probes, matching) = match one_m {
        Some(p) => (p.bench, p.prefixes, p.probes, p.matching),
        None => {
            let list = random_v4_prefixes(SEED_1M, 1_000_000);
            let covered = Intervals::new(&list);
            let mut rng = StdRng::seed_from_u64(SEED_PROBES);
            let probes = clean_addresses(&mut rng, &covered, opts.probes * opts.rounds);
            let matching = matching_addresses(&mut rng, &list, &covered);
            let bench = GuardBench::open(pins.path(), "replace", SEED_PROBES)?;
            (bench, list, probes, matching)
        }
    };
    if replace {
        let installed = bench.list_id().is_some();
        figures.push(bench.list_replace_1m(&list_1m, installed)?);
    }
    drop(bench);
    if baseline {
        figures.push(lpm_baseline(
            pins.path(),
            &list_1m,
            &probes,
            &matching,
            opts,
        )?);
    }
    Ok(figures)
}

/// One list size, installed in a dataplane of its own, with its probes and round results.
struct Prepared {
    name: &'static str,
    bench: GuardBench,
    prefixes: Vec<Cidr>,
    covered: Intervals,
    /// Every probe address; round `r` runs `probes[r * n..(r + 1) * n]`.
    probes: Vec<Ipv4Addr>,
    /// `XDP_PASS_CLEAN` packets before the first round.
    clean_before: u64,
    /// Mean ns per probe of each round run so far.
    rounds: Vec<f64>,
    /// Addresses inside the list (run once each after the rounds, `XDP_DROP`).
    matching: Vec<Ipv4Addr>,
}

impl Prepared {
    /// Opens a dataplane in `<pins>/<size>`, installs the size's list (none for the empty size:
    /// the fresh dataplane's empty lists) and draws and checks the probes.
    fn new(pins: &Path, size: &Size, index: u64, opts: GuardOptions) -> Result<Prepared> {
        let name = size.name;
        let mut bench = GuardBench::open(
            pins,
            name.trim_start_matches("xdp_guard_ns_"),
            SEED_PROBES + index,
        )?;
        let prefixes = random_v4_prefixes(size.seed, size.prefixes);
        if prefixes.is_empty() {
            ensure!(
                bench.list_id().is_none(),
                "{name} must run on a dataplane without lists"
            );
        } else {
            let t = Instant::now();
            let u = bench
                .dp
                .list_replace(Direction::Source, &bench.list, &prefixes)
                .context("Dataplane::list_replace")?;
            progress!(
                "{name}: {} prefixes installed in {:.0} ms ({} entries longer than /24)",
                prefixes.len(),
                t.elapsed().as_secs_f64() * 1e3,
                u.v4_long
            );
        }
        let covered = Intervals::new(&prefixes);
        let total = opts.probes * opts.rounds;
        let probes = clean_addresses(&mut bench.rng, &covered, total);
        for &a in &probes {
            let id = bench.dp.lookup_v4(Direction::Source, a)?;
            ensure!(
                id == 0,
                "{name}: the dataplane puts {a} in list {id}, but no prefix of the list covers it"
            );
        }
        progress!(
            "{name}: {total} distinct clean probe sources ({:.1} % of IPv4 is covered by the list)",
            covered.fraction() * 100.0
        );
        let clean_before = bench.counter(XDP_PASS_CLEAN)?.packets;
        Ok(Prepared {
            name,
            bench,
            prefixes,
            covered,
            probes,
            clean_before,
            rounds: Vec::with_capacity(opts.rounds),
            matching: Vec::new(),
        })
    }

    /// Runs round `r`'s probes once each; every one must pass.
    fn run_round(&mut self, r: usize, opts: GuardOptions) -> Result<()> {
        let chunk = &self.probes[r * opts.probes..(r + 1) * opts.probes];
        let frames: Vec<Vec<u8>> = chunk.iter().map(|&a| frame_v4(a)).collect();
        let (ns, verdicts) = run_all(xdp_guard(&self.bench.prog)?, &frames)?;
        check_verdicts(self.name, chunk, &verdicts, XDP_PASS)?;
        self.rounds.push(ns);
        Ok(())
    }

    /// Checks the counters and the list's drops; returns the median of the rounds.
    fn finish(&mut self, opts: GuardOptions) -> Result<f64> {
        let name = self.name;
        let total = self.probes.len() as u64;
        let clean = self.bench.counter(XDP_PASS_CLEAN)?.packets - self.clean_before;
        ensure!(
            clean == total,
            "{name}: {total} probes ran but XDP_PASS_CLEAN grew by {clean}: the probes did not \
             take the guarded path"
        );
        if let Some(id) = self.bench.list_id() {
            self.matching = self
                .bench
                .check_matching(name, &self.prefixes, &self.covered, id)?;
        }
        let ns = median(&self.rounds);
        progress!(
            "{name}: median {ns:.1} ns/packet over {} rounds of {} probes",
            opts.rounds,
            opts.probes
        );
        Ok(ns)
    }
}

/// A dataplane in a directory of its own, the program that reads its maps, and its one list.
struct GuardBench {
    dp: Dataplane,
    /// A second load of the object over the dataplane's pins, with `xdp_guard` loaded.
    prog: Ebpf,
    list: ListName,
    rng: StdRng,
    /// Removed (with the pins) after `dp` and `prog` are closed, freeing the maps' memory.
    _dir: SubDir,
}

/// A subdirectory of the [`BenchPins`] directory, removed on drop.
struct SubDir(PathBuf);

impl Drop for SubDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl GuardBench {
    /// Opens a fresh dataplane in `<pins>/<sub>`, guards [`GUARD_PORT`], loads `xdp_guard` over
    /// its pins; probe addresses are drawn from `seed`.
    fn open(pins: &Path, sub: &str, seed: u64) -> Result<GuardBench> {
        let t = Instant::now();
        let dir = SubDir(pins.join(sub));
        std::fs::create_dir(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
        let mut dp = Dataplane::open(DataplaneConfig {
            bpffs_dir: dir.0.clone(),
            tunnel_l2_hlen: 0,
        })
        .with_context(|| format!("Dataplane::open on {}", dir.0.display()))?;
        dp.set_guard_ports(&[GUARD_PORT], &[])
            .context("Dataplane::set_guard_ports")?;
        ensure!(
            dp.lists().is_empty(),
            "a fresh dataplane in {} already has lists",
            dir.0.display()
        );
        let prog = load_xdp_guard(EbpfLoader::new().default_map_pin_directory(&dir.0))?;
        progress!(
            "dataplane opened in {} and xdp_guard loaded over its pins in {:.1} s",
            dir.0.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(GuardBench {
            dp,
            prog,
            list: ListName::parse(LIST)?,
            rng: StdRng::seed_from_u64(seed),
            _dir: dir,
        })
    }

    fn list_id(&self) -> Option<ListId> {
        self.dp.list_id(Direction::Source, &self.list)
    }

    /// Sources inside the list return `XDP_DROP` and are counted under it.
    fn check_matching(
        &mut self,
        name: &str,
        prefixes: &[Cidr],
        covered: &Intervals,
        id: ListId,
    ) -> Result<Vec<Ipv4Addr>> {
        let matching = matching_addresses(&mut self.rng, prefixes, covered);
        for &a in &matching {
            let got = self.dp.lookup_v4(Direction::Source, a)?;
            ensure!(
                got == id,
                "{name}: {a} is in the list but the dataplane gives list {got}, not {id}"
            );
        }
        let drops_before = self.counter(XDP_DROP_BLOCKLIST)?;
        let hits_before = self.dp.list_hits(id)?;
        let frames: Vec<Vec<u8>> = matching.iter().map(|&a| frame_v4(a)).collect();
        let (_, verdicts) = run_all(xdp_guard(&self.prog)?, &frames)?;
        check_verdicts(name, &matching, &verdicts, XDP_DROP)?;
        let drops = self.counter(XDP_DROP_BLOCKLIST)?.packets - drops_before.packets;
        let hits = self.dp.list_hits(id)?.packets - hits_before.packets;
        ensure!(
            drops == matching.len() as u64 && hits == matching.len() as u64,
            "{name}: {} blocked probes dropped, but XDP_DROP_BLOCKLIST grew by {drops} and the \
             list's hits by {hits}",
            matching.len()
        );
        progress!(
            "{name}: {} sources inside the list dropped and counted",
            matching.len()
        );
        Ok(matching)
    }

    fn counter(&self, slot: u32) -> Result<Counter> {
        Ok(self.dp.counters().context("read counters")?.get(slot))
    }

    /// `list_replace_1m_ms`: the installed 1M list (`a`; installed first if `installed` is
    /// false) replaced by another 1M list, then back, [`REPLACE_RUNS`] times.
    fn list_replace_1m(&mut self, a: &[Cidr], installed: bool) -> Result<Figure> {
        let b = random_v4_prefixes(SEED_1M_OTHER, 1_000_000);
        ensure!(a != b.as_slice(), "the two 1M lists must differ");
        if !installed {
            let t = Instant::now();
            self.dp
                .list_replace(Direction::Source, &self.list, a)
                .context("Dataplane::list_replace")?;
            progress!(
                "{LIST_REPLACE_1M_MS}: first 1M list installed in {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        let mut runs = Vec::with_capacity(REPLACE_RUNS);
        for run in 0..REPLACE_RUNS {
            let (next, label) = if run % 2 == 0 {
                (&b[..], "B")
            } else {
                (a, "A")
            };
            let t = Instant::now();
            let u = self
                .dp
                .list_replace(Direction::Source, &self.list, next)
                .context("Dataplane::list_replace")?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            progress!(
                "{LIST_REPLACE_1M_MS}: run {}/{REPLACE_RUNS} (-> list {label}): {ms:.0} ms wall, \
                 {} entries longer than /24; {:?}",
                run + 1,
                u.v4_long,
                u.timings
            );
            // The new list is the one enforced.
            let covered = Intervals::new(next);
            let id = self.list_id().context("the list vanished")?;
            let probe = matching_addresses(&mut self.rng, next, &covered);
            let frames: Vec<Vec<u8>> = probe.iter().map(|&a| frame_v4(a)).collect();
            let (_, verdicts) = run_all(xdp_guard(&self.prog)?, &frames)?;
            check_verdicts(LIST_REPLACE_1M_MS, &probe, &verdicts, XDP_DROP)?;
            for &p in &probe {
                ensure!(self.dp.lookup_v4(Direction::Source, p)? == id);
            }
            runs.push(ms);
        }
        let value = median(&runs);
        progress!("{LIST_REPLACE_1M_MS}: median {value:.0} ms (target < 2000)");
        Ok(Figure {
            name: LIST_REPLACE_1M_MS,
            value,
            unit: "ms",
        })
    }
}

/// Loads the object with `loader` and `xdp_guard` through the verifier.
fn load_xdp_guard(loader: &mut EbpfLoader<'_>) -> Result<Ebpf> {
    ensure!(
        !OBJECT.is_empty(),
        "the embedded eBPF object is empty: build without AYA_BUILD_SKIP (bpf-linker on PATH)"
    );
    let mut ebpf = loader.load(OBJECT).context("load the eBPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(names::PROG_XDP_GUARD)
        .context("xdp_guard missing from the object")?
        .try_into()?;
    prog.load().context("load (verify) xdp_guard")?;
    Ok(ebpf)
}

fn xdp_guard(ebpf: &Ebpf) -> Result<&Xdp> {
    Ok(ebpf
        .program(names::PROG_XDP_GUARD)
        .context("xdp_guard missing from the object")?
        .try_into()?)
}

/// Runs every frame once (repeat = 1); returns the mean kernel-reported ns per frame and the
/// verdicts.
fn run_all(prog: &Xdp, frames: &[Vec<u8>]) -> Result<(f64, Vec<u32>)> {
    let mut total = Duration::ZERO;
    let mut verdicts = Vec::with_capacity(frames.len());
    for f in frames {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN of xdp_guard")?;
        total += r.duration;
        verdicts.push(r.return_value);
    }
    Ok((
        total.as_nanos() as f64 / frames.len().max(1) as f64,
        verdicts,
    ))
}

fn check_verdicts<A: std::fmt::Display>(
    name: &str,
    sources: &[A],
    verdicts: &[u32],
    expected: u32,
) -> Result<()> {
    let wrong: Vec<String> = sources
        .iter()
        .zip(verdicts)
        .filter(|&(_, &v)| v != expected)
        .take(5)
        .map(|(a, v)| format!("{a} -> {v}"))
        .collect();
    if !wrong.is_empty() {
        bail!(
            "{name}: xdp_guard returned {} verdicts other than {expected} (e.g. {})",
            verdicts.iter().filter(|&&v| v != expected).count(),
            wrong.join(", ")
        );
    }
    Ok(())
}

/// An Ethernet/IPv4/UDP frame from `src` to the guarded port.
fn frame_v4(src: Ipv4Addr) -> Vec<u8> {
    packets::eth_ip(&packets::udp4(
        src,
        SERVER_V4,
        SOURCE_PORT,
        GUARD_PORT,
        PAYLOAD,
    ))
}

/// An Ethernet/IPv6/UDP frame from the IPv4-mapped `src` to the guarded port.
fn frame_v4_mapped(src: Ipv4Addr) -> Vec<u8> {
    packets::eth_ip(&packets::udp6(
        src.to_ipv6_mapped(),
        SERVER_V6,
        SOURCE_PORT,
        GUARD_PORT,
        PAYLOAD,
    ))
}

/// `n` distinct random addresses outside `covered`, in random order.
fn clean_addresses(rng: &mut StdRng, covered: &Intervals, n: usize) -> Vec<Ipv4Addr> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let a: u32 = rng.random();
        if !covered.contains(a) && seen.insert(a) {
            out.push(Ipv4Addr::from(a));
        }
    }
    out.shuffle(rng);
    out
}

/// [`MATCH_PROBES`] random addresses inside random prefixes of `prefixes`.
fn matching_addresses(rng: &mut StdRng, prefixes: &[Cidr], covered: &Intervals) -> Vec<Ipv4Addr> {
    let v4: Vec<ipnet::Ipv4Net> = prefixes.iter().filter_map(Cidr::as_v4).collect();
    if v4.is_empty() {
        return Vec::new();
    }
    (0..MATCH_PROBES)
        .map(|_| {
            let net = v4[rng.random_range(0..v4.len())];
            let host: u32 = rng.random::<u32>() & !u32::from(net.netmask());
            let a = u32::from(net.network()) | host;
            debug_assert!(covered.contains(a));
            Ipv4Addr::from(a)
        })
        .collect()
}

/// The IPv4 addresses covered by a list, as sorted disjoint inclusive intervals: an oracle
/// independent of the compiler and the kernel.
struct Intervals(Vec<(u32, u32)>);

impl Intervals {
    fn new(prefixes: &[Cidr]) -> Intervals {
        let mut v: Vec<(u32, u32)> = prefixes
            .iter()
            .filter_map(Cidr::as_v4)
            .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if u64::from(s) <= u64::from(last.1) + 1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Intervals(merged)
    }

    fn contains(&self, a: u32) -> bool {
        let i = self.0.partition_point(|&(s, _)| s <= a);
        i > 0 && self.0[i - 1].1 >= a
    }

    /// The fraction of the IPv4 space covered.
    fn fraction(&self) -> f64 {
        let n: u64 = self
            .0
            .iter()
            .map(|&(s, e)| u64::from(e) - u64::from(s) + 1)
            .sum();
        n as f64 / (1u64 << 32) as f64
    }
}

/// `xdp_guard_ns_1m_lpm_baseline`: see the module docs.
fn lpm_baseline(
    pins: &Path,
    prefixes: &[Cidr],
    probes: &[Ipv4Addr],
    matching: &[Ipv4Addr],
    opts: GuardOptions,
) -> Result<Figure> {
    let name = XDP_GUARD_NS_1M_LPM_BASELINE;
    let dir = pins.join("lpm");
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let t = Instant::now();
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&dir);
    for (map, n) in TEST_CAPACITIES {
        loader.map_max_entries(map, *n);
    }
    loader.map_max_entries(names::SRC_V6, prefixes.len() as u32 + 1024);
    let mut ebpf = load_xdp_guard(&mut loader)?;
    {
        let mut ports: Array<&mut MapData, u32> = Array::try_from(
            ebpf.map_mut(names::GUARD_PORTS)
                .context("GUARD_PORTS missing")?,
        )?;
        ports.set(u32::from(GUARD_PORT), 1, 0)?;
        // The trie is consulted even while empty, so "empty trie" is a real lookup.
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(ebpf.map_mut(names::CONFIG).context("CONFIG missing")?)?;
        let flags = CONFIG_F_SRC_V6_LISTS;
        config.set(
            0,
            Config {
                flags,
                ..Config::default()
            },
            0,
        )?;
    }
    progress!(
        "{name}: object loaded with its own maps in {} in {:.1} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );

    let measure = |ebpf: &Ebpf, label: &str| -> Result<f64> {
        let clean_before = clean_packets(ebpf)?;
        let mut rounds = Vec::with_capacity(opts.rounds);
        for chunk in probes.chunks(opts.probes) {
            let frames: Vec<Vec<u8>> = chunk.iter().map(|&a| frame_v4_mapped(a)).collect();
            let (ns, verdicts) = run_all(xdp_guard(ebpf)?, &frames)?;
            check_verdicts(name, chunk, &verdicts, XDP_PASS)?;
            rounds.push(ns);
        }
        let clean = clean_packets(ebpf)? - clean_before;
        ensure!(
            clean == probes.len() as u64,
            "{name}: {} probes ran but XDP_PASS_CLEAN grew by {clean}",
            probes.len()
        );
        let ns = median(&rounds);
        progress!(
            "{name}: {label}: median {ns:.1} ns/packet (rounds: {})",
            rounds
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(ns)
    };
    measure(&ebpf, "empty trie (IPv6 path, for comparison)")?;

    let t = Instant::now();
    {
        let mut trie: LpmTrie<&mut MapData, V6KeyData, ListId> =
            LpmTrie::try_from(ebpf.map_mut(names::SRC_V6).context("SRC_V6 missing")?)?;
        for n in prefixes.iter().filter_map(Cidr::as_v4) {
            trie.insert(&v4_mapped_key(n.network(), n.prefix_len()), 1, 0)
                .with_context(|| format!("insert {n} into the LPM trie"))?;
        }
    }
    progress!(
        "{name}: {} prefixes inserted into the LPM trie in {:.1} s",
        prefixes.len(),
        t.elapsed().as_secs_f64()
    );
    let frames: Vec<Vec<u8>> = matching.iter().map(|&a| frame_v4_mapped(a)).collect();
    let (_, verdicts) = run_all(xdp_guard(&ebpf)?, &frames)?;
    check_verdicts(name, matching, &verdicts, XDP_DROP)?;
    let value = measure(&ebpf, "1M prefixes")?;
    Ok(Figure {
        name,
        value,
        unit: "ns",
    })
}

/// The `SRC_V6` key of the IPv4-mapped prefix `net/len` in generation 0.
fn v4_mapped_key(net: Ipv4Addr, len: u8) -> Key<V6KeyData> {
    let mut data = [0u8; 17];
    data[1..].copy_from_slice(&net.to_ipv6_mapped().octets());
    Key::new(8 + 96 + u32::from(len), data)
}

/// `XDP_PASS_CLEAN` packets of `ebpf`'s counters, summed over CPUs.
fn clean_packets(ebpf: &Ebpf) -> Result<u64> {
    let m: PerCpuArray<&MapData, Counter> =
        PerCpuArray::try_from(ebpf.map(names::COUNTERS).context("COUNTERS missing")?)?;
    Ok(m.get(&XDP_PASS_CLEAN, 0)?.iter().map(|c| c.packets).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_merge_and_contain() {
        let c = |s: &str| -> Cidr { s.parse().unwrap() };
        let i = Intervals::new(&[c("10.0.0.0/24"), c("10.0.1.0/24"), c("10.0.0.128/25")]);
        assert_eq!(i.0, vec![(0x0a00_0000, 0x0a00_01ff)]);
        assert!(i.contains(0x0a00_01ff));
        assert!(!i.contains(0x0a00_0200));
        assert!(!i.contains(0x09ff_ffff));
        let all = Intervals::new(&[c("0.0.0.0/1"), c("128.0.0.0/1")]);
        assert_eq!(all.fraction(), 1.0);
    }
}
