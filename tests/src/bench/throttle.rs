//! Real-traffic benchmarks of the tunnel-device programs over a veth pair between two
//! namespaces (the programs loaded with a 14-byte link-layer offset, as on any Ethernet device):
//!
//! - `throttle_accuracy_{5m,50m,500m}`: iperf3 TCP goodput / configured rate for a peer shaped
//!   to 5, 50 and 500 Mbit/s, to the peer (the kernel's default congestion control), median of 3
//!   runs of 10 s (after 1 s of slow start); `…_from_peer` the same the other way (through the
//!   IFB); `throttle_retransmits_*` the sender's retransmits of the median run.
//! - `veth_throughput_ratio`: iperf3 TCP throughput through a veth end with the tunnel-device
//!   programs attached and every per-packet feature active for the flow — attribution, gate
//!   admitted with a deadline (the clock is read), destination list of 1 000 prefixes, flow limit
//!   (the flow is tracked), quota bucket (charged), accounting, the shaping decision (the peer has
//!   no rate, so it passes) — over the same without programs, in the same run; runs alternate
//!   between the setups, each run starting with the next (median of [`VETH_RUNS`] runs of 5 s
//!   each); the lower of the two directions.
//!   `veth_throughput_mbit_bare` / `_programs` are the absolute figures of that direction.
//! - `veth_throughput_ratio_shaped`: the same with the peer shaped at the highest rate there is
//!   (10 Gbit/s) both ways, so every packet also goes through its HTB class (and, from the peer,
//!   the IFB). Faster than 10 Gbit/s bare, this is capped by the rate itself.
//!
//! The XDP guard is not on the veth: it belongs on the uplink, and a native XDP program on a
//! veth end makes the kernel turn off TSO/GSO on the other end (`veth_xdp_set`), which measures
//! the veth driver (bare 15 Gbit/s fell to 1.5 Gbit/s from the peer), not the program. Its cost
//! per packet is `xdp_guard_ns_*`.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use capybara_agent::{
    blocklist::{Direction, ListName, sample::random_v4_prefixes},
    dataplane::{Dataplane, DataplaneConfig, Gate, PeerRates},
    net::Cidr,
    units::Rate,
};

use super::{
    BenchPins, Figure, Selection, THROTTLE_ACCURACY_5M, THROTTLE_ACCURACY_5M_FROM_PEER,
    THROTTLE_ACCURACY_50M, THROTTLE_ACCURACY_50M_FROM_PEER, THROTTLE_ACCURACY_500M,
    THROTTLE_ACCURACY_500M_FROM_PEER, THROTTLE_RETRANSMITS_5M, THROTTLE_RETRANSMITS_50M,
    THROTTLE_RETRANSMITS_500M, VETH_THROUGHPUT_MBIT_BARE, VETH_THROUGHPUT_MBIT_PROGRAMS,
    VETH_THROUGHPUT_RATIO, VETH_THROUGHPUT_RATIO_SHAPED, median,
};
use crate::{
    bpf::TEST_RUN_L2_HLEN,
    iperf::{self, IperfResult, IperfTcp},
    netns::{NetNs, VethPair},
    progress,
};

/// The peer's id in the benchmark's dataplanes.
const PEER: u32 = 1;
/// Runs per figure.
const RUNS: usize = 3;
/// Runs per setup and direction of the veth throughput figures (5 s each: TCP through a veth
/// swings by a tenth between runs on this shared host, and the figure is the lower of two
/// directions, so three runs were too few).
const VETH_RUNS: usize = 5;

/// Two namespaces joined by a veth pair; `a` is the server, `b` the peer. Fields drop in order:
/// the dataplane (if any) before the devices.
struct Link {
    dp: Option<Dataplane>,
    veth: VethPair,
    b: NetNs,
    a: NetNs,
}

impl Link {
    fn new(net: u8) -> Link {
        let a = NetNs::new("a");
        let b = NetNs::new("b");
        let veth = VethPair::new(&a, &b, net);
        Link {
            dp: None,
            veth,
            b,
            a,
        }
    }

    /// Opens a dataplane on its own pins and attaches the tunnel-device programs (and, with
    /// `xdp`, the guard) to `a`'s end, the peer being `b`'s addresses.
    fn attach(&mut self, pins: &BenchPins, name: &str, xdp: bool) -> Result<&mut Dataplane> {
        let dir = pins.path().join(name);
        let mut dp = Dataplane::open(DataplaneConfig {
            bpffs_dir: dir,
            tunnel_l2_hlen: TEST_RUN_L2_HLEN,
        })?;
        let ifname = self.veth.a.ifname.clone();
        self.a.run(|| -> Result<()> {
            dp.attach_tc(&ifname)?;
            if xdp {
                dp.attach_xdp(&ifname)?;
            }
            Ok(())
        })?;
        dp.add_peer(
            PEER,
            &[
                Cidr::host(IpAddr::V4(self.veth.b.v4)),
                Cidr::host(IpAddr::V6(self.veth.b.v6)),
            ],
        )?;
        Ok(self.dp.insert(dp))
    }

    /// iperf3 TCP, `to_peer` or from it.
    fn send(&self, to_peer: bool, seconds: u32) -> IperfResult {
        let spec = IperfTcp {
            seconds,
            ..IperfTcp::default()
        };
        if to_peer {
            iperf::tcp(&self.a, &self.b, IpAddr::V4(self.veth.b.v4), &spec)
        } else {
            iperf::tcp(&self.b, &self.a, IpAddr::V4(self.veth.a.v4), &spec)
        }
    }
}

/// The run with the median goodput of `runs`.
fn median_run(mut runs: Vec<IperfResult>) -> IperfResult {
    runs.sort_by(|x, y| x.received_bps.total_cmp(&y.received_bps));
    runs[runs.len() / 2]
}

/// Runs the throttle and veth benchmarks the selection asks for.
pub fn run(sel: &Selection, pins: &BenchPins) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let rates = [
        (
            5,
            THROTTLE_ACCURACY_5M,
            THROTTLE_ACCURACY_5M_FROM_PEER,
            THROTTLE_RETRANSMITS_5M,
        ),
        (
            50,
            THROTTLE_ACCURACY_50M,
            THROTTLE_ACCURACY_50M_FROM_PEER,
            THROTTLE_RETRANSMITS_50M,
        ),
        (
            500,
            THROTTLE_ACCURACY_500M,
            THROTTLE_ACCURACY_500M_FROM_PEER,
            THROTTLE_RETRANSMITS_500M,
        ),
    ];
    if rates.iter().any(|(_, a, b, c)| sel.wants_any(&[a, b, c])) {
        let mut link = Link::new(71);
        link.attach(pins, "throttle", false)?;
        for (mbit, to_name, from_name, retr_name) in rates {
            if !sel.wants_any(&[to_name, from_name, retr_name]) {
                continue;
            }
            let rate = Rate::mbit(mbit)?;
            let dp = link.dp.as_mut().context("dataplane")?;
            dp.set_rates(
                PEER,
                PeerRates {
                    to_peer: Some(rate),
                    from_peer: Some(rate),
                },
            )?;
            for (to_peer, name) in [(true, to_name), (false, from_name)] {
                let runs: Vec<IperfResult> = (0..RUNS).map(|_| link.send(to_peer, 10)).collect();
                for r in &runs {
                    progress!(
                        "{name}: {:.2} Mbit/s ({:.3}), {} retransmits",
                        r.received_bps / 1e6,
                        r.received_bps / rate.bits_per_sec() as f64,
                        r.retransmits
                    );
                }
                let m = median_run(runs);
                out.push(Figure {
                    name,
                    value: m.received_bps / rate.bits_per_sec() as f64,
                    unit: "ratio",
                });
                if to_peer {
                    out.push(Figure {
                        name: retr_name,
                        value: m.retransmits as f64,
                        unit: "count",
                    });
                }
            }
        }
    }
    if sel.wants_any(&[
        VETH_THROUGHPUT_RATIO,
        VETH_THROUGHPUT_MBIT_BARE,
        VETH_THROUGHPUT_MBIT_PROGRAMS,
        VETH_THROUGHPUT_RATIO_SHAPED,
    ]) {
        out.extend(veth_ratio(pins)?);
    }
    Ok(out)
}

/// Turns every feature on for the peer of `dp`, shaping only with `shape`.
fn everything_on(dp: &mut Dataplane, shape: bool) -> Result<()> {
    let until = SystemTime::now() + Duration::from_secs(3600);
    dp.set_gate(PEER, Gate::Admitted { until: Some(until) })?;
    dp.set_flow_limit(PEER, 64)?;
    dp.set_quota_limit(1, u64::MAX / 2)?;
    dp.assign_quota(PEER, Some(1))?;
    if shape {
        dp.set_rates(
            PEER,
            PeerRates {
                to_peer: Some(Rate::MAX),
                from_peer: Some(Rate::MAX),
            },
        )?;
    }
    let manual = ListName::parse("manual")?;
    dp.list_replace(
        Direction::Destination,
        &manual,
        &random_v4_prefixes(7, 1000),
    )?;
    dp.list_replace(Direction::Source, &manual, &random_v4_prefixes(8, 1000))?;
    dp.set_guard_ports(&[51820], &[])?;
    Ok(())
}

fn veth_ratio(pins: &BenchPins) -> Result<Vec<Figure>> {
    let bare = Link::new(72);
    let mut with = Link::new(73);
    everything_on(with.attach(pins, "veth", false)?, false)?;
    let mut shaped = Link::new(74);
    everything_on(shaped.attach(pins, "veth-shaped", false)?, true)?;
    // Each direction: the lower ratio is the figure.
    let mut worst: Option<(f64, f64, f64)> = None;
    let mut worst_shaped: Option<f64> = None;
    for to_peer in [true, false] {
        // Bare, with programs, shaped; each run starts with the next setup, so a slow phase
        // of the shared machine weighs on every setup alike.
        let links = [&bare, &with, &shaped];
        let mut bps: [Vec<f64>; 3] = Default::default();
        for run in 0..VETH_RUNS {
            for k in 0..links.len() {
                let i = (run + k) % links.len();
                bps[i].push(links[i].send(to_peer, 5).received_bps);
            }
        }
        let [mb, mw, ms] = bps.map(|v| median(&v));
        let (ratio, ratio_shaped) = (mw / mb, ms / mb);
        progress!(
            "veth {}: bare {:.0} Mbit/s, with programs {:.0} Mbit/s (ratio {ratio:.3}), shaped \
             at 10 Gbit/s {:.0} Mbit/s (ratio {ratio_shaped:.3})",
            if to_peer {
                "to the peer"
            } else {
                "from the peer"
            },
            mb / 1e6,
            mw / 1e6,
            ms / 1e6,
        );
        if worst.is_none_or(|(r, _, _)| ratio < r) {
            worst = Some((ratio, mb, mw));
        }
        if worst_shaped.is_none_or(|r| ratio_shaped < r) {
            worst_shaped = Some(ratio_shaped);
        }
    }
    let (ratio, mb, mw) = worst.context("no veth run")?;
    Ok(vec![
        Figure {
            name: VETH_THROUGHPUT_RATIO,
            value: ratio,
            unit: "ratio",
        },
        Figure {
            name: VETH_THROUGHPUT_MBIT_BARE,
            value: mb / 1e6,
            unit: "Mbit/s",
        },
        Figure {
            name: VETH_THROUGHPUT_MBIT_PROGRAMS,
            value: mw / 1e6,
            unit: "Mbit/s",
        },
        Figure {
            name: VETH_THROUGHPUT_RATIO_SHAPED,
            value: worst_shaped.context("no shaped run")?,
            unit: "ratio",
        },
    ])
}
