//! The report's bar charts: one question each, ours beside the baseline measured in the same
//! run, the ratio and its target written under each group's heading. [`CHARTS`] is the whole
//! list; a chart (or a group, or a bar) whose figures are absent from a run is left out, so a
//! `--filter` run draws only what it measured.
//!
//! Why these splits: one chart used to hold the tunnels (0.5–1.6 Gbit/s) beside the 1k-peer
//! enforcement rigs on a bare veth (≈ 20–24 Gbit/s), so the tunnel bars were slivers; a chart
//! now holds figures of one unit measured by one rig, so its bars compare.

use super::{
    Figure, Goal,
    bars::{Bar, BarChart, Group, Role},
    format_value, target_of, value_of,
};

/// A bar: its label, its figure's name, and whose figure it is.
pub type BarSpec = (&'static str, &'static str, Role);

/// A ratio written under a group's heading: `ours / baseline`, read from `figure` when the run
/// has it (the figure the targets are set on), computed from the two bars otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    /// The figure holding the ratio, if there is one.
    pub figure: Option<&'static str>,
    /// The numerator's figure (one of the group's bars).
    pub ours: &'static str,
    /// The denominator's figure (one of the group's bars).
    pub baseline: &'static str,
    /// What the ratio is, when not "ours' label / the baseline's label".
    pub words: Option<&'static str>,
}

/// Bars answering one part of a chart's question.
#[derive(Debug, Clone, Copy)]
pub struct GroupSpec {
    /// The heading.
    pub heading: &'static str,
    /// The bars, top to bottom.
    pub bars: &'static [BarSpec],
    /// The ratios written under the heading.
    pub ratios: &'static [Ratio],
}

/// One chart: one question, one unit.
#[derive(Debug, Clone, Copy)]
pub struct ChartSpec {
    /// The SVG file's name in `target/bench/`.
    pub file: &'static str,
    /// The question.
    pub title: &'static str,
    /// The unit and which way is better.
    pub subtitle: &'static str,
    /// What the grey bars are, in the legend (empty: "reference point").
    pub reference: &'static str,
    /// The groups.
    pub groups: &'static [GroupSpec],
}

const fn ratio(figure: &'static str, ours: &'static str, baseline: &'static str) -> Ratio {
    Ratio {
        figure: Some(figure),
        ours,
        baseline,
        words: None,
    }
}

const fn computed(ours: &'static str, baseline: &'static str) -> Ratio {
    Ratio {
        figure: None,
        ours,
        baseline,
        words: None,
    }
}

/// A ratio whose bars' labels do not say what it is.
const fn named(
    figure: &'static str,
    ours: &'static str,
    baseline: &'static str,
    words: &'static str,
) -> Ratio {
    Ratio {
        figure: Some(figure),
        ours,
        baseline,
        words: Some(words),
    }
}

use Role::{Baseline, Ours, Reference};

/// The load generator's CPU figures (the `tunnel_cpu` bench's client, in cores): one line
/// each; a name no run has draws nothing.
pub const LOAD_GENERATOR_CPU: &[BarSpec] = &[
    (
        "load generator, 1 peer",
        "tunnel_cpu_loadgen_cores",
        Reference,
    ),
    (
        "load generator, both directions",
        "tunnel_cpu_loadgen_cores_bidir",
        Reference,
    ),
    (
        "load generator, 16 peers",
        "tunnel_cpu_loadgen_cores_16_peers",
        Reference,
    ),
];

/// The servers of the tunnel CPU runs, by figure suffix (`""`, `"_bidir"`, `"_16_peers"`).
macro_rules! cpu_group {
    ($heading:literal, $sfx:literal) => {
        GroupSpec {
            heading: $heading,
            bars: &[
                (
                    "Capybara",
                    concat!("tunnel_cpu_s_per_gbit_agent", $sfx),
                    Ours,
                ),
                (
                    "boringtun-cli",
                    concat!("tunnel_cpu_s_per_gbit_boringtun_cli", $sfx),
                    Baseline,
                ),
                (
                    "wireguard-go (Debian)",
                    concat!("tunnel_cpu_s_per_gbit_wireguard_go", $sfx),
                    Baseline,
                ),
            ],
            ratios: &[
                ratio(
                    concat!("tunnel_cpu_vs_boringtun_cli", $sfx),
                    concat!("tunnel_cpu_s_per_gbit_agent", $sfx),
                    concat!("tunnel_cpu_s_per_gbit_boringtun_cli", $sfx),
                ),
                ratio(
                    concat!("tunnel_cpu_vs_wireguard_go", $sfx),
                    concat!("tunnel_cpu_s_per_gbit_agent", $sfx),
                    concat!("tunnel_cpu_s_per_gbit_wireguard_go", $sfx),
                ),
            ],
        }
    };
}

/// The throughput of the tunnel CPU runs, by figure suffix.
macro_rules! cpu_mbps_group {
    ($heading:literal, $sfx:literal) => {
        GroupSpec {
            heading: $heading,
            bars: &[
                ("Capybara", concat!("tunnel_cpu_mbps_agent", $sfx), Ours),
                (
                    "boringtun-cli",
                    concat!("tunnel_cpu_mbps_boringtun_cli", $sfx),
                    Baseline,
                ),
                (
                    "wireguard-go (Debian)",
                    concat!("tunnel_cpu_mbps_wireguard_go", $sfx),
                    Baseline,
                ),
            ],
            ratios: &[],
        }
    };
}

/// The tunnel-device pipeline and its floors at one peer count (`"10_peers"`, `"100k_peers"`).
macro_rules! pipeline_group {
    ($heading:literal, $sfx:literal, $ratios:expr) => {
        GroupSpec {
            heading: $heading,
            bars: &[
                (
                    "Capybara's TC pipeline",
                    concat!("tc_pipeline_ns_", $sfx),
                    Ours,
                ),
                (
                    "floor: peer line + quota bucket + flow entry",
                    concat!("tc_floor_3_lines_ns_", $sfx),
                    Reference,
                ),
                (
                    "floor: peer line",
                    concat!("tc_floor_line_ns_", $sfx),
                    Reference,
                ),
                (
                    "floor: parse only",
                    concat!("tc_floor_parse_ns_", $sfx),
                    Reference,
                ),
            ],
            ratios: $ratios,
        }
    };
}

/// Every chart of the report, in the report's order.
pub const CHARTS: &[ChartSpec] = &[
    ChartSpec {
        file: "cost_vs_blocklist_size.svg",
        title: "XDP guard: per-packet cost against blocklist size",
        subtitle: "ns per packet, BPF_PROG_TEST_RUN with one distinct packet per run (lower is \
                   better)",
        reference: "",
        groups: &[
            GroupSpec {
                heading: "XDP guard (DIR-24 table) by random IPv4 prefixes in the list",
                bars: &[
                    ("empty list", "xdp_guard_ns_empty", Ours),
                    ("1 000 prefixes", "xdp_guard_ns_1k", Ours),
                    ("100 000 prefixes", "xdp_guard_ns_100k", Ours),
                    ("1 000 000 prefixes", "xdp_guard_ns_1m", Ours),
                ],
                ratios: &[ratio(
                    "xdp_guard_1m_over_1k",
                    "xdp_guard_ns_1m",
                    "xdp_guard_ns_1k",
                )],
            },
            GroupSpec {
                heading: "1 000 000 prefixes: against the kernel's LPM trie holding the same",
                bars: &[
                    ("XDP guard", "xdp_guard_ns_1m", Ours),
                    ("kernel LPM trie", "xdp_guard_ns_1m_lpm_baseline", Baseline),
                ],
                ratios: &[computed("xdp_guard_ns_1m", "xdp_guard_ns_1m_lpm_baseline")],
            },
        ],
    },
    ChartSpec {
        file: "cost_vs_peer_count.svg",
        title: "Tunnel-device pipeline: per-packet cost at 10 and 100 000 peers",
        subtitle: "ns per packet, beside minimal programs that touch only the memory any such \
                   pipeline must (the floor; lower is better)",
        reference: "floor: minimal programs",
        groups: &[
            pipeline_group!("10 peers", "10_peers", &[]),
            pipeline_group!(
                "100 000 peers",
                "100k_peers",
                &[
                    named(
                        "tc_pipeline_100k_over_10",
                        "tc_pipeline_ns_100k_peers",
                        "tc_pipeline_ns_10_peers",
                        "TC pipeline, 100 000 / 10 peers",
                    ),
                    named(
                        "tc_pipeline_100k_over_10_floor",
                        "tc_pipeline_ns_10_peers",
                        "tc_floor_3_lines_ns_100k_peers",
                        "the best a pipeline as fast at 10 peers could reach (its 10-peer cost \
                         plus the three lines' growth, over its 10-peer cost)",
                    ),
                ]
            ),
        ],
    },
    ChartSpec {
        file: "tunnel_throughput.svg",
        title: "Tunnel throughput: Capybara's tunnel against boringtun-cli and wireguard-go",
        subtitle: "Mbit/s of iperf3 TCP through each server from a wireguard-go client, same machine, \
                   same run (higher is better; the client caps all three)",
        reference: "",
        groups: &[GroupSpec {
            heading: "1 peer, client to server",
            bars: &[
                ("Capybara", "tunnel_throughput_mbps", Ours),
                (
                    "boringtun-cli",
                    "tunnel_throughput_boringtun_cli_mbps",
                    Baseline,
                ),
                (
                    "wireguard-go (Debian)",
                    "tunnel_throughput_wireguard_go_mbps",
                    Baseline,
                ),
            ],
            ratios: &[
                ratio(
                    "tunnel_throughput_vs_boringtun_cli",
                    "tunnel_throughput_mbps",
                    "tunnel_throughput_boringtun_cli_mbps",
                ),
                ratio(
                    "tunnel_throughput_vs_wireguard_go",
                    "tunnel_throughput_mbps",
                    "tunnel_throughput_wireguard_go_mbps",
                ),
            ],
        }],
    },
    ChartSpec {
        file: "tunnel_cpu_per_gbit.svg",
        title: "Tunnel CPU per gigabit: what each server costs for the same traffic",
        subtitle: "the server's CPU seconds (user + system, its softirq time counted as the \
                   tunnel_cpu bench states) per gigabit delivered (lower is better)",
        reference: "",
        groups: &[
            cpu_group!("1 peer, client to server", ""),
            cpu_group!("1 peer, both directions at once", "_bidir"),
            cpu_group!("16 peers at once", "_16_peers"),
        ],
    },
    ChartSpec {
        file: "tunnel_cpu_throughput.svg",
        title: "Tunnel throughput in the CPU runs: what each server delivered",
        subtitle: "Mbit/s of inner packets delivered under the load generator's paced load, \
                   the runs the CPU per gigabit is billed on (higher is better)",
        reference: "",
        groups: &[
            cpu_mbps_group!("1 peer, client to server", ""),
            cpu_mbps_group!("1 peer, both directions at once", "_bidir"),
            cpu_mbps_group!("16 peers at once", "_16_peers"),
        ],
    },
    ChartSpec {
        file: "tunnel_workers.svg",
        title: "Tunnel workers: 16 peers through 1 and 2 workers per direction",
        subtitle: "Mbit/s delivered through Capybara's tunnel (higher is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "16 peers at once",
            bars: &[
                (
                    "2 workers",
                    "tunnel_throughput_16_peers_2_workers_mbps",
                    Ours,
                ),
                (
                    "1 worker",
                    "tunnel_throughput_16_peers_1_worker_mbps",
                    Baseline,
                ),
            ],
            ratios: &[ratio(
                "tunnel_workers_2_over_1",
                "tunnel_throughput_16_peers_2_workers_mbps",
                "tunnel_throughput_16_peers_1_worker_mbps",
            )],
        }],
    },
    ChartSpec {
        file: "load_generator_cpu.svg",
        title: "Load generator: its share of the CPU while it drives the tunnel",
        subtitle: "cores the load generator's sending thread used during the tunnel_cpu runs \
                   (well under one core: the client is not what limits the tunnel)",
        reference: "the load generator",
        groups: &[GroupSpec {
            heading: "The tunnel CPU runs' client",
            bars: LOAD_GENERATOR_CPU,
            ratios: &[],
        }],
    },
    ChartSpec {
        file: "enforcement_tcp.svg",
        title: "Enforcing 1 000 peers, bulk TCP: Capybara against nftables + tc HTB",
        subtitle: "Mbit/s of TCP goodput on a bare veth, counters, rate and flow limits on every \
                   peer (higher is better)",
        reference: "the same rig: HTB alone, nothing enforced",
        groups: &[GroupSpec {
            heading: "1 000 peers, bulk TCP",
            bars: &[
                ("Capybara", "enforcement_mbps_capybara_1k_peers", Ours),
                (
                    "nftables + tc HTB",
                    "enforcement_mbps_nftables_tc_1k_peers",
                    Baseline,
                ),
                (
                    "HTB classes alone (the bound)",
                    "enforcement_mbps_htb_alone_1k_peers",
                    Reference,
                ),
                (
                    "nothing enforced",
                    "enforcement_mbps_none_1k_peers",
                    Reference,
                ),
            ],
            ratios: &[
                ratio(
                    "enforcement_vs_nftables_tc_1k_peers",
                    "enforcement_mbps_capybara_1k_peers",
                    "enforcement_mbps_nftables_tc_1k_peers",
                ),
                ratio(
                    "enforcement_htb_ceiling_vs_nftables_tc_1k_peers",
                    "enforcement_mbps_htb_alone_1k_peers",
                    "enforcement_mbps_nftables_tc_1k_peers",
                ),
                ratio(
                    "enforcement_ceiling_vs_nftables_tc_1k_peers",
                    "enforcement_mbps_none_1k_peers",
                    "enforcement_mbps_nftables_tc_1k_peers",
                ),
            ],
        }],
    },
    ChartSpec {
        file: "enforcement_udp.svg",
        title: "Enforcing 1 000 peers, small UDP: Capybara against nftables + tc HTB",
        subtitle: "thousands of packets per second delivered (higher is better)",
        reference: "the same rig: HTB alone, nothing enforced",
        groups: &[GroupSpec {
            heading: "1 000 peers, small UDP packets",
            bars: &[
                ("Capybara", "enforcement_udp_kpps_capybara_1k_peers", Ours),
                (
                    "nftables + tc HTB",
                    "enforcement_udp_kpps_nftables_tc_1k_peers",
                    Baseline,
                ),
                (
                    "HTB classes alone (the bound)",
                    "enforcement_udp_kpps_htb_alone_1k_peers",
                    Reference,
                ),
                (
                    "nothing enforced",
                    "enforcement_udp_kpps_none_1k_peers",
                    Reference,
                ),
            ],
            ratios: &[
                ratio(
                    "enforcement_udp_vs_nftables_tc_1k_peers",
                    "enforcement_udp_kpps_capybara_1k_peers",
                    "enforcement_udp_kpps_nftables_tc_1k_peers",
                ),
                ratio(
                    "enforcement_udp_htb_ceiling_vs_nftables_tc_1k_peers",
                    "enforcement_udp_kpps_htb_alone_1k_peers",
                    "enforcement_udp_kpps_nftables_tc_1k_peers",
                ),
                ratio(
                    "enforcement_udp_ceiling_vs_nftables_tc_1k_peers",
                    "enforcement_udp_kpps_none_1k_peers",
                    "enforcement_udp_kpps_nftables_tc_1k_peers",
                ),
            ],
        }],
    },
    ChartSpec {
        file: "rule_update.svg",
        title: "Changing one peer's limits among 1 000: Capybara against tc",
        subtitle: "µs from the change to the kernel enforcing it (lower is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "One rule update, 1 000 peers",
            bars: &[
                ("Capybara (map update)", "rule_update_us_capybara", Ours),
                ("tc class change", "rule_update_us_tc", Baseline),
            ],
            ratios: &[computed("rule_update_us_capybara", "rule_update_us_tc")],
        }],
    },
    ChartSpec {
        file: "blocklist_flood.svg",
        title: "A UDP flood from random sources against a 1M-prefix source blocklist",
        subtitle: "packets per second delivered to the receiver (higher is better)",
        reference: "the same flood, no filter",
        groups: &[GroupSpec {
            heading: "1 000 000 blocked prefixes",
            bars: &[
                ("Capybara's XDP guard", "blocklist_pps_xdp_1m", Ours),
                ("nftables set", "blocklist_pps_nftables_1m", Baseline),
                (
                    "iptables + ipset",
                    "blocklist_pps_iptables_ipset_1m",
                    Baseline,
                ),
                ("no filter", "blocklist_pps_no_filter", Reference),
            ],
            ratios: &[
                ratio(
                    "blocklist_vs_nftables_1m",
                    "blocklist_pps_xdp_1m",
                    "blocklist_pps_nftables_1m",
                ),
                ratio(
                    "blocklist_vs_iptables_ipset_1m",
                    "blocklist_pps_xdp_1m",
                    "blocklist_pps_iptables_ipset_1m",
                ),
            ],
        }],
    },
    ChartSpec {
        file: "throttle_accuracy.svg",
        title: "Shaping accuracy: achieved over configured rate, against tc HTB and nft",
        subtitle: "TCP goodput / configured rate (target 0.95–1: close to the rate, never over it)",
        reference: "",
        groups: &[
            GroupSpec {
                heading: "5 Mbit/s",
                bars: &[
                    ("Capybara, to the peer", "throttle_accuracy_5m", Ours),
                    (
                        "Capybara, from the peer",
                        "throttle_accuracy_5m_from_peer",
                        Ours,
                    ),
                    ("tc HTB script", "throttle_accuracy_tc_htb_5m", Baseline),
                    ("nft limit rate", "throttle_accuracy_nft_limit_5m", Baseline),
                ],
                ratios: &[computed(
                    "throttle_accuracy_5m",
                    "throttle_accuracy_tc_htb_5m",
                )],
            },
            GroupSpec {
                heading: "50 Mbit/s",
                bars: &[
                    ("Capybara, to the peer", "throttle_accuracy_50m", Ours),
                    (
                        "Capybara, from the peer",
                        "throttle_accuracy_50m_from_peer",
                        Ours,
                    ),
                    ("tc HTB script", "throttle_accuracy_tc_htb_50m", Baseline),
                    (
                        "nft limit rate",
                        "throttle_accuracy_nft_limit_50m",
                        Baseline,
                    ),
                ],
                ratios: &[computed(
                    "throttle_accuracy_50m",
                    "throttle_accuracy_tc_htb_50m",
                )],
            },
            GroupSpec {
                heading: "500 Mbit/s",
                bars: &[
                    ("Capybara, to the peer", "throttle_accuracy_500m", Ours),
                    (
                        "Capybara, from the peer",
                        "throttle_accuracy_500m_from_peer",
                        Ours,
                    ),
                    ("tc HTB script", "throttle_accuracy_tc_htb_500m", Baseline),
                    (
                        "nft limit rate",
                        "throttle_accuracy_nft_limit_500m",
                        Baseline,
                    ),
                ],
                ratios: &[computed(
                    "throttle_accuracy_500m",
                    "throttle_accuracy_tc_htb_500m",
                )],
            },
        ],
    },
    ChartSpec {
        file: "veth_throughput.svg",
        title: "What every program and feature costs a veth: TCP throughput with and without",
        subtitle: "Mbit/s of TCP on a veth pair (higher is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "One veth pair",
            bars: &[
                (
                    "every program and feature on",
                    "veth_throughput_mbit_programs",
                    Ours,
                ),
                ("no programs", "veth_throughput_mbit_bare", Baseline),
            ],
            ratios: &[ratio(
                "veth_throughput_ratio",
                "veth_throughput_mbit_programs",
                "veth_throughput_mbit_bare",
            )],
        }],
    },
    ChartSpec {
        file: "rest_vs_grpc.svg",
        title: "The REST mirror against gRPC: the same mixed calls",
        subtitle: "µs, median call (lower is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "p50 of the same calls",
            bars: &[
                ("REST mirror", "rest_p50_us", Ours),
                ("gRPC", "grpc_p50_us", Baseline),
            ],
            ratios: &[ratio(
                "rest_vs_grpc_p50_ratio",
                "rest_p50_us",
                "grpc_p50_us",
            )],
        }],
    },
    ChartSpec {
        file: "usage_report.svg",
        title: "A month's usage report over 10 000 users",
        subtitle: "ms to build the report (lower is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "One month, 10 000 users",
            bars: &[
                ("from daily rollups", "report_month_10k_users_ms", Ours),
                (
                    "summing the hourly records",
                    "report_month_10k_users_hourly_ms",
                    Baseline,
                ),
            ],
            ratios: &[computed(
                "report_month_10k_users_ms",
                "report_month_10k_users_hourly_ms",
            )],
        }],
    },
    ChartSpec {
        file: "webhook_latency.svg",
        title: "Quota exhausted to webhook received",
        subtitle: "ms from the kernel's event to the POST on loopback (lower is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "One receiver on loopback",
            bars: &[
                ("Capybara, p99", "webhook_latency_p99_ms", Ours),
                ("Capybara, p50", "webhook_latency_p50_ms", Ours),
                ("a bare POST, p99", "webhook_latency_post_p99_ms", Baseline),
            ],
            ratios: &[computed(
                "webhook_latency_p99_ms",
                "webhook_latency_post_p99_ms",
            )],
        }],
    },
    ChartSpec {
        file: "handshake_flood.svg",
        title: "The agent's CPU under a flood of invalid handshakes",
        subtitle: "cores the agent used during the flood (CPU seconds per second; lower is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "The same flood",
            bars: &[
                (
                    "sources blocked (XDP guard)",
                    "handshake_flood_cpu_share_blocked",
                    Ours,
                ),
                (
                    "sources not blocked",
                    "handshake_flood_cpu_share_unblocked",
                    Baseline,
                ),
            ],
            ratios: &[ratio(
                "handshake_flood_cpu_ratio",
                "handshake_flood_cpu_share_blocked",
                "handshake_flood_cpu_share_unblocked",
            )],
        }],
    },
    // Issue 24.
    ChartSpec {
        file: "vless_throughput.svg",
        title: "VLESS over TLS: Capybara's endpoint against v2ray as the server",
        subtitle: "Mbit/s of a bulk download through the same v2ray client (higher is better)",
        reference: "",
        groups: &[GroupSpec {
            heading: "One connection, server to client",
            bars: &[
                ("Capybara", "vless_throughput_mbps_capybara", Ours),
                ("v2ray 4.34", "vless_throughput_mbps_v2ray", Baseline),
            ],
            ratios: &[ratio(
                "vless_throughput_vs_v2ray",
                "vless_throughput_mbps_capybara",
                "vless_throughput_mbps_v2ray",
            )],
        }],
    },
];

/// A value with its unit as a bar's end shows it (`ratio` and `count` need no unit).
fn with_unit(value: f64, unit: &str) -> String {
    let v = short(value);
    match unit {
        "ratio" | "count" | "" => v,
        "us" => format!("{v} µs"),
        u => format!("{v} {u}"),
    }
}

/// A value as a chart shows it: four significant digits (0.0012, 85.82, 1244), trailing zeros
/// dropped, thousands separated from 10 000 on; `n/a` for NaN.
pub fn short(value: f64) -> String {
    if !value.is_finite() {
        return format_value(value);
    }
    if value == 0.0 {
        return "0".into();
    }
    if value.abs() >= 10_000.0 {
        return group_thousands(value);
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (3 - magnitude).clamp(0, 8) as usize;
    let s = format!("{value:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A large value rounded, thousands separated by a thin space.
fn group_thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

/// `target ≥ 1: ✔ met` for a figure with a target and its value.
fn verdict(name: &str, value: f64) -> Option<String> {
    target_of(name).map(|g| {
        format!(
            "target {g}: {}",
            if g.met(value) {
                "✔ met"
            } else {
                "✘ not met"
            }
        )
    })
}

/// The chart `spec` over `figures`; `None` when none of its bars was measured.
pub fn build(spec: &ChartSpec, figures: &[Figure]) -> Option<BarChart> {
    let figure = |n: &str| figures.iter().find(|f| f.name == n);
    let mut groups = Vec::new();
    for g in spec.groups {
        let bars: Vec<Bar> = g
            .bars
            .iter()
            .filter_map(|(label, name, role)| {
                let f = figure(name)?;
                let mut value_text = with_unit(f.value, f.unit);
                if let Some(v) = verdict(name, f.value) {
                    value_text = format!("{value_text} ({v})");
                }
                Some(Bar {
                    label: (*label).to_owned(),
                    figure: (*name).to_owned(),
                    value: f.value,
                    value_text,
                    role: *role,
                })
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let label = |n: &'static str| -> &'static str {
            g.bars.iter().find(|b| b.1 == n).map_or(n, |b| b.0)
        };
        let mut notes = Vec::new();
        for r in g.ratios {
            let (ours, base) = (value_of(figures, r.ours), value_of(figures, r.baseline));
            let value = r
                .figure
                .and_then(|f| value_of(figures, f))
                .or_else(|| Some(ours? / base?));
            match (ours, base, value) {
                (Some(_), None, _) if r.words.is_none() => {
                    notes.push(format!("{}: not run", label(r.baseline)));
                }
                (_, _, Some(v)) => {
                    let words = r.words.map_or_else(
                        || format!("{} / {}", label(r.ours), label(r.baseline)),
                        str::to_owned,
                    );
                    let mut note = format!("{words} = {}", short(v));
                    // The target, when it is set on the ratio's figure.
                    if let Some(t) = r.figure.and_then(|f| verdict(f, v)) {
                        note = format!("{note} ({t})");
                    }
                    notes.push(note);
                }
                _ => {}
            }
        }
        groups.push(Group {
            heading: g.heading.to_owned(),
            notes,
            bars,
        });
    }
    // Where all of ours must land in one range (shaping accuracy), the range is drawn.
    let ranges: Vec<Goal> = groups
        .iter()
        .flat_map(|g| &g.bars)
        .filter(|b| b.role == Ours)
        .map(|b| target_of(&b.figure))
        .collect::<Option<_>>()
        .unwrap_or_default();
    let band = match ranges.first() {
        Some(Goal::Within(lo, hi)) if ranges.iter().all(|g| *g == ranges[0]) => Some((*lo, *hi)),
        _ => None,
    };
    (!groups.is_empty()).then(|| BarChart {
        title: spec.title.to_owned(),
        subtitle: spec.subtitle.to_owned(),
        reference: if spec.reference.is_empty() {
            "reference point".to_owned()
        } else {
            spec.reference.to_owned()
        },
        band,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn chart_values_keep_four_significant_digits() {
        assert_eq!(short(0.0012), "0.0012");
        assert_eq!(short(85.817), "85.82");
        assert_eq!(short(81.25), "81.25");
        assert_eq!(short(1243.9), "1244");
        assert_eq!(short(0.958), "0.958");
        assert_eq!(short(1.5), "1.5");
        assert_eq!(short(20338.3), "20\u{202f}338");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(f64::NAN), "n/a");
    }
}
