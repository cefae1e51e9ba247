//! Throttle-accuracy baselines for `throttle_accuracy_{5m,50m,500m}`: the same iperf3 TCP to a
//! peer over a veth pair, limited by what an admin would write instead of Capybara.
//!
//! - `throttle_accuracy_tc_htb_*`: a `tc` HTB script on the server's end (the sender's egress,
//!   where Capybara's own HTB class sits in `throttle_accuracy_*`): a root HTB whose default class
//!   is unlimited, one class `rate R ceil R` for the peer, and a `u32` filter on the peer's
//!   address (the shape of the per-peer scripts wg-easy users share). The leaf is HTB's default
//!   `pfifo`: this kernel has neither `fq_codel` nor `sfq` (Capybara's classes use a byte fifo).
//! - `throttle_accuracy_nft_limit_*`: nftables' `limit rate over R/second drop` (the nftables
//!   wiki's rate-limiting rule, a policer with its default burst), in a `prerouting` chain of the
//!   peer's namespace: the packets are dropped after they left the sender, as a server's forward
//!   chain would drop them, so the sender's TCP sees real loss rather than a local error.
//!
//! The rates are given in the tools' own units: `Rmbit` for tc, `R×125000 bytes/second` for nft
//! (nft's byte rates have no bit units, and its `kbytes` are 1024 bytes). Median of [`RUNS`] runs of the given seconds (after 1 s
//! of slow start, omitted), the kernel's default congestion control; the figure is goodput /
//! configured rate, like `throttle_accuracy_*`.

use std::net::IpAddr;

use anyhow::Result;

use super::{Figure, Selection, median, report::BaselineDoc};
use crate::{
    iperf::{self, IperfTcp},
    netns::{NetNs, VethPair},
    progress,
};

/// Goodput / rate through a tc HTB script at 5 Mbit/s.
pub const THROTTLE_ACCURACY_TC_HTB_5M: &str = "throttle_accuracy_tc_htb_5m";
/// … at 50 Mbit/s.
pub const THROTTLE_ACCURACY_TC_HTB_50M: &str = "throttle_accuracy_tc_htb_50m";
/// … at 500 Mbit/s.
pub const THROTTLE_ACCURACY_TC_HTB_500M: &str = "throttle_accuracy_tc_htb_500m";
/// Goodput / rate through nftables `limit rate` at 5 Mbit/s.
pub const THROTTLE_ACCURACY_NFT_LIMIT_5M: &str = "throttle_accuracy_nft_limit_5m";
/// … at 50 Mbit/s.
pub const THROTTLE_ACCURACY_NFT_LIMIT_50M: &str = "throttle_accuracy_nft_limit_50m";
/// … at 500 Mbit/s.
pub const THROTTLE_ACCURACY_NFT_LIMIT_500M: &str = "throttle_accuracy_nft_limit_500m";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    THROTTLE_ACCURACY_TC_HTB_5M,
    THROTTLE_ACCURACY_TC_HTB_50M,
    THROTTLE_ACCURACY_TC_HTB_500M,
    THROTTLE_ACCURACY_NFT_LIMIT_5M,
    THROTTLE_ACCURACY_NFT_LIMIT_50M,
    THROTTLE_ACCURACY_NFT_LIMIT_500M,
];

/// Runs per figure (the median is reported).
pub const RUNS: usize = 3;

/// How the baselines sample.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleOptions {
    /// Runs per figure.
    pub runs: usize,
    /// Seconds per run.
    pub seconds: u32,
}

/// The HTB script for a peer at `mbit` Mbit/s behind `dev`.
pub fn htb_script(dev: &str, peer: &str, mbit: u64) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let rate = format!("{mbit}mbit");
    vec![
        s(&[
            "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
        ]),
        s(&[
            "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
            "100gbit",
        ]),
        s(&[
            "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate",
            &rate, "ceil", &rate,
        ]),
        s(&[
            "tc",
            "filter",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "protocol",
            "ip",
            "prio",
            "1",
            "u32",
            "match",
            "ip",
            "dst",
            &format!("{peer}/32"),
            "flowid",
            "1:10",
        ]),
    ]
}

/// The nftables ruleset (one `nft -f` file) limiting traffic from `server` to `mbit` Mbit/s.
pub fn nft_limit_ruleset(server: &str, mbit: u64) -> String {
    format!(
        "table inet capythrottle {{\n  chain prerouting {{\n    type filter hook prerouting \
         priority 0; policy accept;\n    ip saddr {server} limit rate over {} bytes/second drop\n  \
         }}\n}}\n",
        mbit * 125_000
    )
}

/// Runs the selected baselines; returns their figures and commands.
pub fn run(sel: &Selection, opts: ThrottleOptions) -> Result<(Vec<Figure>, Vec<BaselineDoc>)> {
    let rates = [
        (
            5,
            THROTTLE_ACCURACY_TC_HTB_5M,
            THROTTLE_ACCURACY_NFT_LIMIT_5M,
        ),
        (
            50,
            THROTTLE_ACCURACY_TC_HTB_50M,
            THROTTLE_ACCURACY_NFT_LIMIT_50M,
        ),
        (
            500,
            THROTTLE_ACCURACY_TC_HTB_500M,
            THROTTLE_ACCURACY_NFT_LIMIT_500M,
        ),
    ];
    let (mut figures, mut docs) = (Vec::new(), Vec::new());
    for (mbit, htb_name, nft_name) in rates {
        for (name, htb) in [(htb_name, true), (nft_name, false)] {
            if !sel.wants(name) {
                continue;
            }
            let a = NetNs::new("a");
            let b = NetNs::new("b");
            let veth = VethPair::new(&a, &b, 75);
            let (server, peer) = (veth.a.v4.to_string(), veth.b.v4.to_string());
            let commands: Vec<String> = if htb {
                let script = htb_script(&veth.a.ifname, &peer, mbit);
                for c in &script {
                    let args: Vec<&str> = c.iter().map(String::as_str).collect();
                    a.exec(&args);
                }
                script.iter().map(|c| c.join(" ")).collect()
            } else {
                let ruleset = nft_limit_ruleset(&server, mbit);
                let file = tempfile::NamedTempFile::new()?;
                std::fs::write(file.path(), &ruleset)?;
                b.exec(&["nft", "-f", &file.path().to_string_lossy()]);
                vec![
                    "nft -f throttle.nft   # in the peer's namespace".to_owned(),
                    format!("# throttle.nft:\n{}", ruleset.trim_end()),
                ]
            };
            let spec = IperfTcp {
                seconds: opts.seconds,
                ..IperfTcp::default()
            };
            let rate = mbit as f64 * 1e6;
            let ratios: Vec<f64> = (0..opts.runs.max(1))
                .map(|_| {
                    let r = iperf::tcp(&a, &b, IpAddr::V4(veth.b.v4), &spec);
                    progress!(
                        "{name}: {:.2} Mbit/s ({:.3}), {} retransmits",
                        r.received_bps / 1e6,
                        r.received_bps / rate,
                        r.retransmits
                    );
                    r.received_bps / rate
                })
                .collect();
            figures.push(Figure {
                name,
                value: median(&ratios),
                unit: "ratio",
            });
            docs.push(BaselineDoc {
                benchmark: name,
                tool: if htb { "tc HTB" } else { "nftables limit rate" },
                commands,
            });
            drop(veth);
        }
    }
    Ok((figures, docs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htb_script_classifies_the_peer_into_its_class() {
        let s = htb_script("eth0", "10.0.0.2", 50);
        let lines: Vec<String> = s.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            lines[2],
            "tc class add dev eth0 parent 1: classid 1:10 htb rate 50mbit ceil 50mbit"
        );
        assert!(lines[3].ends_with("match ip dst 10.0.0.2/32 flowid 1:10"));
    }

    #[test]
    fn nft_limit_is_in_bytes_per_second() {
        let r = nft_limit_ruleset("10.0.0.1", 50);
        assert!(
            r.contains("ip saddr 10.0.0.1 limit rate over 6250000 bytes/second drop"),
            "{r}"
        );
        assert!(r.contains("hook prerouting"));
    }
}
