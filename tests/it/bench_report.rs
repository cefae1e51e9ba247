//! The benchmark report's charts as a person sees them: `report::write` renders a run holding
//! every figure `cargo xtask bench` measures (the values of the last full run in BENCHMARKS.md,
//! and issue 23's tunnel CPU, worker and load generator figures), headless Chromium opens each
//! chart through chromedriver, and the test checks what it drew:
//! - every expected chart is there and `report.md` shows each;
//! - no two texts overlap and none is cut off: the boxes Chromium laid the texts out in
//!   (`getBoundingClientRect`, so rotated axis titles count as drawn) pairwise, and against the
//!   picture's edges;
//! - every bar has its value label, right of the bar's end, on the bar's row; every bar of a
//!   chart's list whose figure the run has is drawn, in the list's order.
//!
//! Each chart's screenshot is kept in `/work/shots/report-<chart>.png` for a person to look at.

use std::path::{Path, PathBuf};

use capybara_tests::{
    bench::{
        ALL, Figure,
        report::{self, Machine, charts},
    },
    browser::Driver,
};
use serde_json::{Value, json};

/// Every figure of a full run: the last full run's values (BENCHMARKS.md), and issue 23's new
/// figures at plausible values.
const RUN: &[(&str, f64, &str)] = &[
    ("xdp_guard_ns_empty", 92.191, "ns"),
    ("xdp_guard_ns_1k", 299.2, "ns"),
    ("xdp_guard_ns_100k", 299.1, "ns"),
    ("xdp_guard_ns_1m", 328.8, "ns"),
    ("xdp_guard_1m_over_1k", 1.099, "ratio"),
    ("xdp_guard_ns_1m_lpm_baseline", 1466.1, "ns"),
    ("list_replace_1m_ms", 425.0, "ms"),
    ("geo_compile_500k_ms", 97.576, "ms"),
    ("tc_pipeline_ns_10_peers", 299.5, "ns"),
    ("tc_pipeline_ns_100k_peers", 1243.9, "ns"),
    ("tc_pipeline_100k_over_10", 4.153, "ratio"),
    ("tc_pipeline_100k_over_10_floor", 2.076, "ratio"),
    ("tc_floor_parse_ns_10_peers", 81.25, "ns"),
    ("tc_floor_parse_ns_100k_peers", 80.05, "ns"),
    ("tc_floor_line_ns_10_peers", 85.815, "ns"),
    ("tc_floor_line_ns_100k_peers", 220.1, "ns"),
    ("tc_floor_3_lines_ns_10_peers", 125.1, "ns"),
    ("tc_floor_3_lines_ns_100k_peers", 447.3, "ns"),
    ("throttle_accuracy_5m", 0.958, "ratio"),
    ("throttle_accuracy_50m", 0.965, "ratio"),
    ("throttle_accuracy_500m", 0.965, "ratio"),
    ("throttle_accuracy_5m_from_peer", 0.988, "ratio"),
    ("throttle_accuracy_50m_from_peer", 0.965, "ratio"),
    ("throttle_accuracy_500m_from_peer", 0.960, "ratio"),
    ("throttle_retransmits_5m", 0.0, "count"),
    ("throttle_retransmits_50m", 0.0, "count"),
    ("throttle_retransmits_500m", 0.0, "count"),
    ("veth_throughput_ratio", 0.994, "ratio"),
    ("veth_throughput_mbit_bare", 14768.5, "Mbit/s"),
    ("veth_throughput_mbit_programs", 14682.5, "Mbit/s"),
    ("veth_throughput_ratio_shaped", 0.620, "ratio"),
    ("tunnel_throughput_mbps", 1596.2, "Mbit/s"),
    ("tunnel_throughput_boringtun_cli_mbps", 912.4, "Mbit/s"),
    ("tunnel_throughput_wireguard_go_mbps", 729.6, "Mbit/s"),
    ("tunnel_throughput_vs_boringtun_cli", 1.749, "ratio"),
    ("tunnel_throughput_vs_wireguard_go", 2.188, "ratio"),
    ("api_load_p99_ms", 87.473, "ms"),
    ("api_load_p50_ms", 14.367, "ms"),
    ("api_load_calls_per_s", 499.4, "calls/s"),
    ("api_load_errors", 0.0, "count"),
    ("group_policy_fanout_10k_ms", 68.588, "ms"),
    ("group_policy_fanout_rpc_ms", 108.0, "ms"),
    ("policy_update_p99_us", 908.1, "us"),
    ("policy_update_p50_us", 342.6, "us"),
    ("policy_update_rpc_p99_us", 2367.0, "us"),
    ("policy_update_p99_us_two_cores", 5668.3, "us"),
    ("policy_update_p50_us_two_cores", 416.7, "us"),
    ("blocklist_vs_nftables_1m", 1.765, "ratio"),
    ("blocklist_vs_iptables_ipset_1m", 2.667, "ratio"),
    ("blocklist_pps_xdp_1m", 229653.3, "pps"),
    ("blocklist_pps_nftables_1m", 130079.7, "pps"),
    ("blocklist_pps_iptables_ipset_1m", 86105.5, "pps"),
    ("blocklist_pps_no_filter", 495503.6, "pps"),
    ("enforcement_vs_nftables_tc_1k_peers", 1.052, "ratio"),
    ("enforcement_mbps_capybara_1k_peers", 20338.3, "Mbit/s"),
    ("enforcement_mbps_nftables_tc_1k_peers", 19331.3, "Mbit/s"),
    ("enforcement_mbps_none_1k_peers", 20973.6, "Mbit/s"),
    (
        "enforcement_ceiling_vs_nftables_tc_1k_peers",
        1.085,
        "ratio",
    ),
    ("enforcement_mbps_htb_alone_1k_peers", 19236.4, "Mbit/s"),
    (
        "enforcement_htb_ceiling_vs_nftables_tc_1k_peers",
        0.995,
        "ratio",
    ),
    ("enforcement_udp_vs_nftables_tc_1k_peers", 1.210, "ratio"),
    ("enforcement_udp_kpps_capybara_1k_peers", 203.8, "kpps"),
    ("enforcement_udp_kpps_nftables_tc_1k_peers", 168.4, "kpps"),
    ("enforcement_udp_kpps_none_1k_peers", 260.1, "kpps"),
    (
        "enforcement_udp_ceiling_vs_nftables_tc_1k_peers",
        1.545,
        "ratio",
    ),
    ("enforcement_udp_kpps_htb_alone_1k_peers", 229.1, "kpps"),
    (
        "enforcement_udp_htb_ceiling_vs_nftables_tc_1k_peers",
        1.361,
        "ratio",
    ),
    ("rule_update_us_capybara", 11.892, "us"),
    ("rule_update_us_tc", 2480.4, "us"),
    ("throttle_accuracy_tc_htb_5m", 0.947, "ratio"),
    ("throttle_accuracy_tc_htb_50m", 0.944, "ratio"),
    ("throttle_accuracy_tc_htb_500m", 0.922, "ratio"),
    ("throttle_accuracy_nft_limit_5m", 1.004, "ratio"),
    ("throttle_accuracy_nft_limit_50m", 1.008, "ratio"),
    ("throttle_accuracy_nft_limit_500m", 0.992, "ratio"),
    ("agent_rss_mb_100k_peers", 194.2, "MiB"),
    ("load_100k_peers_ms", 1522.8, "ms"),
    ("agent_rss_mb_empty", 42.414, "MiB"),
    ("agent_start_ms_empty", 584.6, "ms"),
    ("agent_start_ms_100k_peers", 2107.4, "ms"),
    ("auth_flood_store_bytes_per_min", 25003.9, "B/min"),
    ("auth_flood_agent_cpu_share", 0.262, "ratio"),
    ("auth_flood_agent_cpu_share_idle", 0.0, "ratio"),
    ("auth_flood_sender_cpu_share", 0.455, "ratio"),
    ("auth_flood_pps", 99999.5, "pps"),
    ("auth_flood_records_per_min", 136.0, "count"),
    ("handshake_flood_cpu_ratio", 0.0074, "ratio"),
    ("handshake_flood_cpu_share_blocked", 0.0012, "ratio"),
    ("handshake_flood_cpu_share_unblocked", 0.169, "ratio"),
    ("handshake_flood_pps", 49998.0, "pps"),
    ("rest_p50_us", 471.0, "us"),
    ("grpc_p50_us", 557.0, "us"),
    ("rest_vs_grpc_p50_ratio", 0.846, "ratio"),
    ("rest_vs_grpc_errors", 0.0, "count"),
    ("report_month_10k_users_ms", 946.9, "ms"),
    ("report_month_10k_users_hourly_ms", 15189.0, "ms"),
    ("report_month_10k_users_write_s", 296.7, "s"),
    ("webhook_events_per_s", 16891.0, "events/s"),
    ("webhook_latency_p99_ms", 1.23, "ms"),
    ("webhook_latency_p50_ms", 0.27, "ms"),
    ("webhook_latency_samples", 100.0, "count"),
    ("webhook_latency_post_p99_ms", 0.044, "ms"),
    // Issue 23: the tunnel's CPU per gigabit (the `tunnel_cpu` bench), its workers and its
    // load generator.
    ("tunnel_cpu_s_per_gbit_agent", 0.92, "s/Gbit"),
    ("tunnel_cpu_s_per_gbit_boringtun_cli", 1.84, "s/Gbit"),
    ("tunnel_cpu_s_per_gbit_wireguard_go", 1.31, "s/Gbit"),
    ("tunnel_cpu_vs_boringtun_cli", 0.5, "ratio"),
    ("tunnel_cpu_vs_wireguard_go", 0.702, "ratio"),
    ("tunnel_cpu_s_per_gbit_agent_bidir", 1.05, "s/Gbit"),
    ("tunnel_cpu_s_per_gbit_boringtun_cli_bidir", 2.1, "s/Gbit"),
    ("tunnel_cpu_s_per_gbit_wireguard_go_bidir", 1.52, "s/Gbit"),
    ("tunnel_cpu_vs_boringtun_cli_bidir", 0.5, "ratio"),
    ("tunnel_cpu_vs_wireguard_go_bidir", 0.691, "ratio"),
    ("tunnel_cpu_s_per_gbit_agent_16_peers", 0.81, "s/Gbit"),
    (
        "tunnel_cpu_s_per_gbit_boringtun_cli_16_peers",
        1.77,
        "s/Gbit",
    ),
    (
        "tunnel_cpu_s_per_gbit_wireguard_go_16_peers",
        1.12,
        "s/Gbit",
    ),
    ("tunnel_cpu_vs_boringtun_cli_16_peers", 0.458, "ratio"),
    ("tunnel_cpu_vs_wireguard_go_16_peers", 0.723, "ratio"),
    ("tunnel_throughput_16_peers_1_worker_mbps", 1210.0, "Mbit/s"),
    (
        "tunnel_throughput_16_peers_2_workers_mbps",
        2050.0,
        "Mbit/s",
    ),
    ("tunnel_workers_2_over_1", 1.694, "ratio"),
    ("tunnel_cpu_loadgen_cores", 0.186, "cores"),
    ("tunnel_cpu_loadgen_cores_bidir", 0.152, "cores"),
    ("tunnel_cpu_loadgen_cores_16_peers", 0.151, "cores"),
    ("tunnel_cpu_mbps_agent", 573.0, "Mbit/s"),
    ("tunnel_cpu_mbps_boringtun_cli", 443.0, "Mbit/s"),
    ("tunnel_cpu_mbps_wireguard_go", 328.0, "Mbit/s"),
    ("tunnel_cpu_mbps_agent_bidir", 1180.0, "Mbit/s"),
    ("tunnel_cpu_mbps_boringtun_cli_bidir", 820.0, "Mbit/s"),
    ("tunnel_cpu_mbps_wireguard_go_bidir", 610.0, "Mbit/s"),
    ("tunnel_cpu_mbps_agent_16_peers", 2700.0, "Mbit/s"),
    ("tunnel_cpu_mbps_boringtun_cli_16_peers", 1450.0, "Mbit/s"),
    ("tunnel_cpu_mbps_wireguard_go_16_peers", 1120.0, "Mbit/s"),
    // Issue 24.
    ("vless_throughput_mbps_capybara", 3053.0, "Mbit/s"),
    ("vless_throughput_mbps_v2ray", 1769.0, "Mbit/s"),
    ("vless_throughput_vs_v2ray", 1.726, "ratio"),
    // Issue 24, the Shadowsocks endpoint.
    ("shadowsocks_throughput_mbps_capybara", 2290.0, "Mbit/s"),
    ("shadowsocks_throughput_mbps_ssserver", 1836.0, "Mbit/s"),
    ("multi_protocol_quota_overshoot_bytes", 1159.0, "bytes"),
    (
        "multi_protocol_quota_overshoot_bound_bytes",
        135_856.0,
        "bytes",
    ),
    ("shadowsocks_throughput_vs_ssserver", 1.247, "ratio"),
    ("shadowsocks_key_lookup_us_1", 1.262, "µs"),
    ("shadowsocks_key_lookup_us_100", 126.6, "µs"),
    ("shadowsocks_key_lookup_us_1000", 935.1, "µs"),
    // Issue 25.
    ("cluster_propagation_p99_ms", 12.4, "ms"),
    ("cluster_propagation_p50_ms", 6.1, "ms"),
    ("cluster_apply_10k_users_ms", 410.0, "ms"),
    ("cluster_apply_10k_users_local_ms", 150.0, "ms"),
];

/// Every chart a full run draws, in the report's order.
const CHARTS: &[&str] = &[
    "cost_vs_blocklist_size.svg",
    "cost_vs_peer_count.svg",
    "tunnel_throughput.svg",
    "tunnel_cpu_per_gbit.svg",
    "tunnel_cpu_throughput.svg",
    "tunnel_workers.svg",
    "load_generator_cpu.svg",
    "enforcement_tcp.svg",
    "enforcement_udp.svg",
    "rule_update.svg",
    "blocklist_flood.svg",
    "throttle_accuracy.svg",
    "veth_throughput.svg",
    "rest_vs_grpc.svg",
    "usage_report.svg",
    "webhook_latency.svg",
    "handshake_flood.svg",
    "vless_throughput.svg",
];

/// What Chromium drew: the picture's size, every text's box and words, every bar's box.
const LAYOUT: &str = r#"
const svg = document.documentElement;
const box = (e) => { const r = e.getBoundingClientRect();
  return [r.left, r.top, r.right, r.bottom]; };
return {
  size: [svg.width.baseVal.value, svg.height.baseVal.value],
  texts: Array.from(document.querySelectorAll('text'))
    .filter((t) => t.textContent.trim() !== '')
    .map((t) => ({ text: t.textContent, box: box(t),
                   value_of: t.getAttribute('data-value-of') })),
  bars: Array.from(document.querySelectorAll('rect[data-figure]'))
    .map((r) => ({ figure: r.getAttribute('data-figure'), box: box(r) })),
};
"#;

fn boxes(v: &Value) -> [f64; 4] {
    let a = v.as_array().expect("a box");
    [0, 1, 2, 3].map(|i| a[i].as_f64().expect("a number"))
}

/// Pixels of `a` and `b` that overlap (their intersection's area).
fn overlap(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = a[2].min(b[2]) - a[0].max(b[0]);
    let h = a[3].min(b[3]) - a[1].max(b[1]);
    if w > 0.0 && h > 0.0 { w * h } else { 0.0 }
}

fn run() -> Vec<Figure> {
    RUN.iter()
        .map(|&(name, value, unit)| Figure { name, value, unit })
        .collect()
}

#[test]
fn every_chart_is_drawn_legibly_with_its_values() {
    let missing: Vec<&&str> = ALL
        .iter()
        .filter(|n| !RUN.iter().any(|r| r.0 == **n))
        .collect();
    assert!(
        missing.is_empty(),
        "the fixture run lacks figures the benches measure: {missing:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let machine = Machine {
        cpu: "AMD EPYC".into(),
        cores: 2,
        kernel: "6.18".into(),
    };
    let md = report::write(dir.path(), &run(), &[], &[], &[], &machine, "fixture").unwrap();
    let md = std::fs::read_to_string(md).unwrap();
    let drawn: Vec<&str> = md
        .lines()
        .filter_map(|l| l.strip_prefix("![")?.split(']').next())
        .collect();
    assert_eq!(drawn, CHARTS, "the charts report.md shows");

    let driver = Driver::start(None);
    let session = driver.session(1000, 1600);
    let shots = Path::new("/work/shots");
    let _ = std::fs::create_dir_all(shots);
    let mut problems = Vec::new();
    for chart in CHARTS {
        let path: PathBuf = dir.path().join(chart);
        session.navigate(&format!("file://{}", path.display()));
        let layout = session.execute(LAYOUT, vec![]);
        let [w, h] = [0, 1].map(|i| layout["size"][i].as_f64().unwrap());
        let texts = layout["texts"].as_array().unwrap();
        assert!(texts.len() > 3, "{chart}: texts {texts:?}");
        for (i, a) in texts.iter().enumerate() {
            let ba = boxes(&a["box"]);
            if ba[0] < -0.5 || ba[1] < -0.5 || ba[2] > w + 0.5 || ba[3] > h + 0.5 {
                problems.push(format!(
                    "{chart}: {:?} at {ba:?} is cut off ({w}×{h})",
                    a["text"]
                ));
            }
            for b in &texts[i + 1..] {
                let bb = boxes(&b["box"]);
                // Boxes include the font's ascent and descent: touching lines share a pixel.
                if overlap(ba, bb) > 2.0 {
                    problems.push(format!(
                        "{chart}: {:?} {ba:?} overlaps {:?} {bb:?}",
                        a["text"], b["text"]
                    ));
                }
            }
        }
        let bars = layout["bars"].as_array().unwrap();
        for bar in bars {
            let figure = bar["figure"].as_str().unwrap();
            let rb = boxes(&bar["box"]);
            // A figure may be drawn twice in a chart (the 1M guard figure beside its sizes and
            // beside the LPM trie): its label is the one on the bar's row.
            let mid = (rb[1] + rb[3]) / 2.0;
            let labels: Vec<[f64; 4]> = texts
                .iter()
                .filter(|t| t["value_of"] == json!(figure))
                .map(|t| boxes(&t["box"]))
                .collect();
            if labels.is_empty() {
                problems.push(format!("{chart}: bar {figure} has no value label"));
            } else if !labels
                .iter()
                .any(|tb| tb[0] >= rb[2] && tb[0] <= rb[2] + 20.0 && (tb[1]..=tb[3]).contains(&mid))
            {
                problems.push(format!(
                    "{chart}: no value label of {figure} {labels:?} at its bar's end {rb:?}"
                ));
            }
        }
        let spec = charts::CHARTS
            .iter()
            .find(|c| c.file == *chart)
            .unwrap_or_else(|| panic!("{chart} is not in charts::CHARTS"));
        let specified: Vec<&str> = spec
            .groups
            .iter()
            .flat_map(|g| g.bars)
            .map(|b| b.1)
            .filter(|f| RUN.iter().any(|r| r.0 == *f))
            .collect();
        let drawn: Vec<&str> = bars.iter().filter_map(|b| b["figure"].as_str()).collect();
        assert_eq!(drawn, specified, "{chart}: the bars drawn");
        let png = session.element_screenshot_png(&session.find("svg"));
        let stem = chart.trim_end_matches(".svg");
        if let Err(e) = std::fs::write(shots.join(format!("report-{stem}.png")), &png) {
            eprintln!("cannot keep /work/shots/report-{stem}.png: {e}");
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_partial_run_draws_only_what_it_measured_and_says_which_baseline_did_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let figures = [
        Figure {
            name: "tunnel_cpu_s_per_gbit_agent",
            value: 0.9,
            unit: "s/Gbit",
        },
        Figure {
            name: "tunnel_cpu_vs_boringtun_cli",
            value: 0.3,
            unit: "ratio",
        },
        Figure {
            name: "tunnel_cpu_s_per_gbit_boringtun_cli",
            value: 3.0,
            unit: "s/Gbit",
        },
    ];
    let plots = report::write_plots(dir.path(), &figures).unwrap();
    let names: Vec<_> = plots
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tunnel_cpu_per_gbit.svg"]);
    let svg = std::fs::read_to_string(&plots[0]).unwrap();
    assert!(
        svg.contains("Capybara / boringtun-cli = 0.3 (target ≤ 0.35: ✔ met)"),
        "{svg}"
    );
    assert!(svg.contains("wireguard-go (Debian): not run"), "{svg}");
    assert!(!svg.contains("both directions"), "{svg}");
}
