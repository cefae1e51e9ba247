//! `capybara diagnose [--config FILE]`: what an admin checks by hand when clients cannot
//! connect or traffic does not flow, one line per check: its status (`ok`, `warn`, `fail`),
//! what was found, and a fix hint when it is not ok. `--json` prints one document
//! (`{"ok": bool, "checks": [{check, status, finding, hint}]}`). Exit 1 when any check fails
//! (warnings do not fail it).
//!
//! The agent's settings (tunnel device and subnet, listen port, uplink, data dir) are read from
//! its configuration file the way the agent reads it (`daemon::config_file`, `--config`,
//! default `/etc/capybara/agent.toml`, defaults for what it does not set), so diagnose works
//! without a running agent. What only the agent knows (is it serving, are the programs
//! attached, is the store healthy) comes from it: `grpc.health.v1` and `ListComponents`.
//!
//! | check | ok | not ok |
//! |---|---|---|
//! | `kernel` | the release, ≥ 6.6 (what the project requires: README, `cargo xtask setup`) | warn below |
//! | `bpf` | the kernel config has `CONFIG_BPF_SYSCALL` and `CONFIG_BPF_JIT`, bpffs mounted at `/sys/fs/bpf` | fail |
//! | `btf` | `/sys/kernel/btf/vmlinux` exists | fail |
//! | `xdp-tc` | `CONFIG_NET_SCH_INGRESS` (clsact), `CONFIG_NET_CLS_BPF`, `CONFIG_NET_CLS_ACT`, `CONFIG_NET_SCH_HTB`, `CONFIG_IFB` in the kernel config (XDP itself is in every BPF kernel) | fail; warn when the kernel config is unreadable |
//! | `tun` | `/dev/net/tun` is a character device | fail |
//! | `agent` | the agent answers on its socket/endpoint and serves | fail, with how to start it |
//! | `programs` | the agent's `dataplane` component (programs attached, peers in the kernel) | fail |
//! | `store` | the agent's `store` component | fail |
//! | `tunnel` | the tunnel device exists and is up | fail |
//! | `listen-port` | a UDP socket is bound to the listen port (`/proc/net/udp{,6}`) | fail |
//! | `forwarding` | `net.ipv4.ip_forward` = 1 (and IPv6 forwarding, else a warning) | fail |
//! | `nat` | a masquerade rule (nftables or iptables) covers the tunnel subnet | warn (a routed setup needs none) |
//! | `mtu` | tunnel MTU + 80 (WireGuard over IPv6) ≤ uplink MTU | warn at + 60 (IPv4 only), fail beyond |
//! | `clock` | NTP-synchronized (`timedatectl`) | warn when unknown or not synced but the date is sane (≥ 2025), fail when it is not |
//! | `disk` | the data dir's file system has ≥ 10 % and ≥ 1 GiB free | warn below, fail under 1 % or 100 MiB |

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Serialize;

use super::{
    Cli, CliError, connect,
    output::{out, print_json},
    table::Table,
};
use crate::{
    daemon::{args::Args, config_file},
    paths,
};

/// Flags of `capybara diagnose`.
#[derive(Debug, clap::Args)]
pub struct DiagnoseArgs {
    /// The agent's configuration file, for its tunnel, port, uplink and data dir.
    #[arg(long, value_name = "FILE", default_value = paths::CONFIG_FILE)]
    config: PathBuf,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Worth a look; not a failure.
    Warn,
    /// Broken: clients will not connect or traffic will not flow.
    Fail,
}

/// One check's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Its name (`kernel`, `bpf`, …).
    pub check: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub finding: String,
    /// How to fix it (not ok only).
    pub hint: Option<String>,
}

fn ok(check: &'static str, finding: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Ok,
        finding: finding.into(),
        hint: None,
    }
}

fn not_ok(
    check: &'static str,
    status: Status,
    finding: impl Into<String>,
    hint: impl Into<String>,
) -> Check {
    Check {
        check,
        status,
        finding: finding.into(),
        hint: Some(hint.into()),
    }
}

/// The settings diagnose checks against.
struct Settings {
    tunnel: String,
    subnet: ipnet::Ipv4Net,
    listen_port: u16,
    uplink: Option<String>,
    data_dir: PathBuf,
}

fn settings(config: &Path) -> Result<Settings, String> {
    // Without `--config` the agent reads the default file only when it exists; so does this.
    let parsed = if config == Path::new(paths::CONFIG_FILE) {
        config_file::parse(["capybara-agent"])
    } else {
        let argv = [
            "capybara-agent".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
        ];
        config_file::parse::<_, std::ffi::OsString>(argv)
    };
    let args: Args = parsed.map_err(|e| e.to_string())?;
    let net: ipnet::Ipv4Net = args.tunnel_ipv4.parse().map_err(|_| {
        format!(
            "tunnel_ipv4 {:?} is not an IPv4 ADDRESS/PREFIX_LEN",
            args.tunnel_ipv4
        )
    })?;
    Ok(Settings {
        tunnel: args.tunnel,
        subnet: net.trunc(),
        listen_port: args.listen_port,
        uplink: args.uplink,
        data_dir: args.data_dir,
    })
}

/// Runs `capybara diagnose`.
pub(super) async fn run(cli: &Cli, args: &DiagnoseArgs) -> Result<(), CliError> {
    let mut checks = host_checks();
    match settings(&args.config) {
        Ok(s) => {
            checks.extend(agent_checks(cli).await);
            checks.extend(network_checks(&s));
            checks.push(clock());
            checks.push(disk(&s.data_dir));
        }
        Err(e) => {
            checks.push(not_ok(
                "config",
                Status::Fail,
                e,
                format!("fix {} (the agent refuses it too)", args.config.display()),
            ));
            checks.extend(agent_checks(cli).await);
            checks.push(clock());
        }
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.check)
        .collect();
    if cli.json {
        #[derive(Serialize)]
        struct Doc<'a> {
            ok: bool,
            checks: &'a [Check],
        }
        print_json(&Doc {
            ok: failed.is_empty(),
            checks: &checks,
        })?;
    } else {
        let mut t = Table::new(&["STATUS", "CHECK", "FINDING", "HINT"]);
        for c in &checks {
            t.row(vec![
                match c.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                }
                .into(),
                c.check.into(),
                c.finding.clone(),
                c.hint.clone().unwrap_or_default(),
            ]);
        }
        out!("{t}")?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Client(crate::api::client::ClientError::Status(
            tonic::Status::failed_precondition(format!(
                "{} check(s) failed: {}",
                failed.len(),
                failed.join(", ")
            )),
        )))
    }
}

/// The kernel's build configuration: `/boot/config-<release>`, else `/proc/config.gz`
/// (through `zcat`).
fn kernel_config(release: &str) -> Option<String> {
    std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .or_else(|| {
            let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
}

fn host_checks() -> Vec<Check> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut v = vec![kernel_version(&release)];
    let config = kernel_config(&release);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    v.push(bpf(config.as_deref(), &mounts));
    v.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        ok("btf", "/sys/kernel/btf/vmlinux present")
    } else {
        not_ok(
            "btf",
            Status::Fail,
            "/sys/kernel/btf/vmlinux missing",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's and Ubuntu's are)",
        )
    });
    v.push(xdp_tc(config.as_deref()));
    v.push(tun());
    v
}

fn kernel_version(release: &str) -> Check {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 6) {
        ok("kernel", format!("Linux {release}"))
    } else {
        not_ok(
            "kernel",
            Status::Warn,
            format!("Linux {release:?}"),
            "use Linux 6.6 or newer: older kernels lack BPF features the programs use",
        )
    }
}

/// `CONFIG_X=y` or `=m` in a kernel config.
fn config_has(config: &str, key: &str) -> bool {
    config
        .lines()
        .any(|l| l == format!("{key}=y") || l == format!("{key}=m"))
}

fn bpf(config: Option<&str>, mounts: &str) -> Check {
    let bpffs = mounts.lines().any(|l| {
        l.split_whitespace().nth(2) == Some("bpf")
            && l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
    });
    if let Some(c) = config {
        let missing: Vec<&str> = ["CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT"]
            .into_iter()
            .filter(|k| !config_has(c, k))
            .collect();
        if !missing.is_empty() {
            return not_ok(
                "bpf",
                Status::Fail,
                format!("kernel built without {}", missing.join(", ")),
                "use a distribution kernel (Debian 12+, Ubuntu 22.04+) or enable them",
            );
        }
    }
    if !bpffs {
        return not_ok(
            "bpf",
            Status::Fail,
            "bpffs not mounted at /sys/fs/bpf (the pins cannot survive a restart)",
            "mount -t bpf bpf /sys/fs/bpf (systemd mounts it at boot)",
        );
    }
    ok("bpf", "bpf(2) built in, bpffs mounted at /sys/fs/bpf")
}

fn xdp_tc(config: Option<&str>) -> Check {
    let Some(c) = config else {
        return not_ok(
            "xdp-tc",
            Status::Warn,
            "kernel config not found (/boot, /proc/config.gz): XDP/clsact support not checked",
            "install the kernel's config file (/boot/config-$(uname -r))",
        );
    };
    let missing: Vec<&str> = [
        "CONFIG_NET_SCH_INGRESS",
        "CONFIG_NET_CLS_BPF",
        "CONFIG_NET_CLS_ACT",
        "CONFIG_NET_SCH_HTB",
        "CONFIG_IFB",
    ]
    .into_iter()
    .filter(|k| !config_has(c, k))
    .collect();
    if missing.is_empty() {
        ok("xdp-tc", "XDP, clsact, cls_bpf, HTB and IFB available")
    } else {
        not_ok(
            "xdp-tc",
            Status::Fail,
            format!("kernel built without {}", missing.join(", ")),
            "use a kernel with clsact/cls_bpf (TC programs) and HTB/IFB (shaping)",
        )
    }
}

fn tun() -> Check {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata("/dev/net/tun") {
        Ok(m) if m.file_type().is_char_device() => ok("tun", "/dev/net/tun present"),
        _ => not_ok(
            "tun",
            Status::Fail,
            "/dev/net/tun missing",
            "modprobe tun (in a container: pass /dev/net/tun in)",
        ),
    }
}

/// The checks that ask the agent.
async fn agent_checks(cli: &Cli) -> Vec<Check> {
    let target = cli
        .endpoint
        .clone()
        .unwrap_or_else(|| cli.socket.display().to_string());
    let not_running = |finding: String| {
        vec![
            not_ok(
                "agent",
                Status::Fail,
                finding,
                "start it: systemctl start capybara-agent (why it stopped: journalctl -u capybara-agent)",
            ),
            not_ok(
                "programs",
                Status::Fail,
                "unknown: the agent is not running",
                "start the agent",
            ),
            not_ok(
                "store",
                Status::Fail,
                "unknown: the agent is not running",
                "start the agent",
            ),
        ]
    };
    let client = match connect(cli).await {
        Ok(c) => c,
        Err(e) => return not_running(format!("no agent answers at {target}: {e}")),
    };
    let components = match client.components().await {
        Ok(c) => c,
        Err(e) => return not_running(format!("the agent at {target} does not answer: {e}")),
    };
    let serving = client.health("").await.unwrap_or(false);
    let mut v = vec![if serving {
        ok("agent", format!("serving at {target}"))
    } else {
        not_ok(
            "agent",
            Status::Fail,
            format!("answers at {target} but is not serving"),
            "see `capybara health` for the component that is not",
        )
    }];
    for (check, component, hint) in [
        (
            "programs",
            "dataplane",
            "restart the agent (it re-attaches); its log says why attaching failed",
        ),
        (
            "store",
            "store",
            "check the data dir's disk and permissions; restore a backup if it is damaged",
        ),
    ] {
        v.push(match components.iter().find(|c| c.name == component) {
            Some(c) if c.ok => ok(check, c.detail.clone()),
            Some(c) => not_ok(check, Status::Fail, c.detail.clone(), hint),
            None => not_ok(
                check,
                Status::Fail,
                format!("the agent reports no {component} component"),
                hint,
            ),
        });
    }
    v
}

/// A network device as `ip -j link show` reports it (rtnetlink, in this process's network
/// namespace; `/sys/class/net` would show the namespace that mounted sysfs).
#[derive(Debug, serde::Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    mtu: Option<u32>,
}

fn links() -> Vec<Link> {
    Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default()
}

fn network_checks(s: &Settings) -> Vec<Check> {
    let links = links();
    let link = |name: &str| links.iter().find(|l| l.ifname == name);
    let mut v = vec![match link(&s.tunnel) {
        Some(l) if l.flags.iter().any(|f| f == "UP") => ok("tunnel", format!("{} is up", s.tunnel)),
        Some(_) => not_ok(
            "tunnel",
            Status::Fail,
            format!("{} is down", s.tunnel),
            format!("ip link set {} up (or restart the agent)", s.tunnel),
        ),
        None => not_ok(
            "tunnel",
            Status::Fail,
            format!("no device {}", s.tunnel),
            "start the agent (it makes the device); with another --tunnel, pass --config",
        ),
    }];
    let udp = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    v.push(if udp_port_bound(&udp, s.listen_port) {
        ok("listen-port", format!("UDP {} bound", s.listen_port))
    } else {
        not_ok(
            "listen-port",
            Status::Fail,
            format!("nothing bound to UDP {}", s.listen_port),
            "start the agent; check the port in agent.toml matches the clients' Endpoint",
        )
    });
    let v4 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap_or_default();
    v.push(forwarding(v4.trim(), v6.trim()));
    v.push(nat(&s.subnet, &nat_rules()));
    let uplink = s.uplink.clone().or_else(|| {
        default_route_device(&std::fs::read_to_string("/proc/net/route").unwrap_or_default())
    });
    let mtu_of = |dev: &str| link(dev).and_then(|l| l.mtu);
    v.push(mtu(
        &s.tunnel,
        mtu_of(&s.tunnel),
        uplink.as_deref(),
        uplink.as_deref().and_then(mtu_of),
    ));
    v
}

/// Whether `/proc/net/udp{,6}` text has a socket bound to local `port` (any address).
fn udp_port_bound(proc_net_udp: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    proc_net_udp.lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit(':').next())
            .is_some_and(|p| p == want)
    })
}

fn forwarding(v4: &str, v6: &str) -> Check {
    let hint4 = "sysctl -w net.ipv4.ip_forward=1, and keep it: echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-capybara.conf";
    match (v4, v6) {
        ("1", "1") => ok("forwarding", "IPv4 and IPv6 forwarding on"),
        ("1", _) => not_ok(
            "forwarding",
            Status::Warn,
            "IPv4 forwarding on, IPv6 off",
            "for IPv6 through the tunnel: sysctl -w net.ipv6.conf.all.forwarding=1",
        ),
        (v, _) => not_ok(
            "forwarding",
            Status::Fail,
            format!("net.ipv4.ip_forward = {v:?}: the server does not route the clients' traffic"),
            hint4,
        ),
    }
}

/// The NAT rules as text: `nft list ruleset`, else `iptables-save -t nat`.
fn nat_rules() -> Option<String> {
    for (prog, args) in [
        ("nft", &["list", "ruleset"][..]),
        ("iptables-save", &["-t", "nat"][..]),
    ] {
        if let Ok(out) = Command::new(prog).args(args).output()
            && out.status.success()
        {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.to_lowercase().contains("masquerade") || prog == "iptables-save" {
                return Some(text);
            }
        }
    }
    None
}

/// Whether `rules` masquerade the tunnel subnet: a masquerade rule naming the subnet (or a
/// subnet holding it), or one with no source match at all.
fn nat(subnet: &ipnet::Ipv4Net, rules: &Option<String>) -> Check {
    let hint = format!(
        "nft add table ip capybara; nft add chain ip capybara post '{{ type nat hook postrouting priority 100; }}'; nft add rule ip capybara post ip saddr {subnet} oifname UPLINK masquerade"
    );
    let Some(rules) = rules else {
        return not_ok(
            "nat",
            Status::Warn,
            "cannot read the NAT rules (nft/iptables-save missing or not root)",
            hint,
        );
    };
    let covers = |word: &str| {
        word.trim_matches(|c: char| c == ',' || c == '{' || c == '}')
            .parse::<ipnet::Ipv4Net>()
            .is_ok_and(|n| n.contains(subnet))
    };
    for line in rules
        .lines()
        .filter(|l| l.to_lowercase().contains("masquerade"))
    {
        let has_source = line.contains("saddr") || line.contains(" -s ");
        if line.split_whitespace().any(covers) {
            return ok("nat", format!("masquerade for {subnet}: {}", line.trim()));
        }
        if !has_source {
            return ok(
                "nat",
                format!("masquerade for every source: {}", line.trim()),
            );
        }
    }
    not_ok(
        "nat",
        Status::Warn,
        format!(
            "no masquerade rule covers {subnet}: clients reach the server but not beyond (unless this network routes {subnet} back)"
        ),
        hint,
    )
}

/// The device of the IPv4 default route in `/proc/net/route`.
fn default_route_device(proc_net_route: &str) -> Option<String> {
    proc_net_route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_owned())
    })
}

/// WireGuard's overhead on the uplink: outer IPv6 (40) + UDP (8) + WireGuard (32).
const WG_OVERHEAD_V6: u32 = 80;
/// The same over IPv4 (20-byte header).
const WG_OVERHEAD_V4: u32 = 60;

fn mtu(
    tunnel: &str,
    tunnel_mtu: Option<u32>,
    uplink: Option<&str>,
    uplink_mtu: Option<u32>,
) -> Check {
    let (Some(t), Some(u), Some(up)) = (tunnel_mtu, uplink_mtu, uplink) else {
        return not_ok(
            "mtu",
            Status::Warn,
            format!(
                "cannot compare: tunnel {tunnel} {}, uplink {}",
                tunnel_mtu.map_or("absent".into(), |m| format!("MTU {m}")),
                uplink.map_or(
                    "unknown (no --uplink, no default route)".into(),
                    |u| format!(
                        "{u} MTU {}",
                        uplink_mtu.map_or("unknown".into(), |m| m.to_string())
                    )
                )
            ),
            "set uplink in agent.toml, and start the agent",
        );
    };
    let finding = format!("tunnel {tunnel} MTU {t}, uplink {up} MTU {u}");
    let fix = format!(
        "ip link set {tunnel} mtu {} (and MTU = {} in the clients' configs)",
        u.saturating_sub(WG_OVERHEAD_V6),
        u.saturating_sub(WG_OVERHEAD_V6)
    );
    if t + WG_OVERHEAD_V6 <= u {
        ok("mtu", finding)
    } else if t + WG_OVERHEAD_V4 <= u {
        not_ok(
            "mtu",
            Status::Warn,
            format!("{finding}: clients over IPv6 get fragmented packets"),
            fix,
        )
    } else {
        not_ok(
            "mtu",
            Status::Fail,
            format!("{finding}: full-size packets do not fit the uplink"),
            fix,
        )
    }
}

fn clock() -> Check {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let synced = Command::new("timedatectl")
        .args(["show", "--property=NTPSynchronized", "--value"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes");
    clock_verdict(now, synced)
}

/// 2025-01-01T00:00:00Z: a clock before it is certainly wrong (TOTP codes, quotas' periods,
/// expiries and TLS all depend on it).
const SANE_SINCE: u64 = 1_735_689_600;

fn clock_verdict(now: u64, synced: Option<bool>) -> Check {
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(now),
    );
    let hint = "enable time sync: timedatectl set-ntp true (or run chrony)";
    if now < SANE_SINCE {
        return not_ok(
            "clock",
            Status::Fail,
            format!("the clock says {date}"),
            hint,
        );
    }
    match synced {
        Some(true) => ok("clock", format!("{date}, NTP-synchronized")),
        Some(false) => not_ok(
            "clock",
            Status::Warn,
            format!("{date}, not NTP-synchronized"),
            hint,
        ),
        None => not_ok(
            "clock",
            Status::Warn,
            format!("{date}; synchronization unknown (timedatectl did not answer)"),
            "check chrony/ntpd by hand, or use systemd-timesyncd",
        ),
    }
}

fn disk(data_dir: &Path) -> Check {
    // The data dir, or the nearest existing parent (before the first start).
    let mut at = data_dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    match nix::sys::statvfs::statvfs(at) {
        Ok(s) => {
            let block = s.fragment_size();
            disk_verdict(data_dir, s.blocks_available() * block, s.blocks() * block)
        }
        Err(e) => not_ok(
            "disk",
            Status::Warn,
            format!("cannot stat {}: {e}", at.display()),
            "check the data dir's path",
        ),
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn disk_verdict(dir: &Path, free: u64, total: u64) -> Check {
    let pct = (free * 100).checked_div(total).unwrap_or(0);
    let finding = format!(
        "{}: {} MiB free of {} MiB ({pct} %)",
        dir.display(),
        free / MIB,
        total / MIB
    );
    let hint = "free space (history clear --older-than 90d, old backups) or grow the file system: a full disk stops the store's writes";
    if free < 100 * MIB || pct < 1 {
        not_ok("disk", Status::Fail, finding, hint)
    } else if free < GIB || pct < 10 {
        not_ok("disk", Status::Warn, finding, hint)
    } else {
        ok("disk", finding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udp_port_is_found_in_proc_net_udp() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12345 2 0 0\n";
        assert!(udp_port_bound(udp, 51820));
        assert!(!udp_port_bound(udp, 51821));
        let udp6 = "  sl  local_address                         remote_address\n   0: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07\n";
        assert!(udp_port_bound(udp6, 51820));
    }

    #[test]
    fn forwarding_off_fails_with_the_sysctl() {
        assert_eq!(forwarding("1", "1").status, Status::Ok);
        assert_eq!(forwarding("1", "0").status, Status::Warn);
        let c = forwarding("0", "1");
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains("net.ipv4.ip_forward=1"));
    }

    #[test]
    fn masquerade_rules_are_matched_to_the_subnet() {
        let subnet: ipnet::Ipv4Net = "10.70.0.0/15".parse().unwrap();
        let nft = Some("table ip nat {\n chain post {\n  ip saddr 10.70.0.0/15 oifname \"eth0\" masquerade\n }\n}\n".to_owned());
        assert_eq!(nat(&subnet, &nft).status, Status::Ok);
        let wider = Some("-A POSTROUTING -s 10.0.0.0/8 -o eth0 -j MASQUERADE\n".to_owned());
        assert_eq!(nat(&subnet, &wider).status, Status::Ok);
        let all = Some("-A POSTROUTING -o eth0 -j MASQUERADE\n".to_owned());
        assert_eq!(nat(&subnet, &all).status, Status::Ok);
        let other = Some("-A POSTROUTING -s 192.168.1.0/24 -o eth0 -j MASQUERADE\n".to_owned());
        let c = nat(&subnet, &other);
        assert_eq!(c.status, Status::Warn);
        assert!(c.hint.unwrap().contains("10.70.0.0/15"));
        assert_eq!(nat(&subnet, &None).status, Status::Warn);
    }

    #[test]
    fn mtu_leaves_room_for_wireguard() {
        assert_eq!(
            mtu("capy0", Some(1420), Some("eth0"), Some(1500)).status,
            Status::Ok
        );
        assert_eq!(
            mtu("capy0", Some(1440), Some("eth0"), Some(1500)).status,
            Status::Warn
        );
        let c = mtu("capy0", Some(1500), Some("eth0"), Some(1500));
        assert_eq!(c.status, Status::Fail);
        assert!(c.hint.unwrap().contains("mtu 1420"));
        assert_eq!(
            mtu("capy0", None, Some("eth0"), Some(1500)).status,
            Status::Warn
        );
    }

    #[test]
    fn the_default_route_device_is_read() {
        let route = "Iface\tDestination\tGateway\tFlags\nlo\t0000007F\t00000000\t0001\neth0\t00000000\t0101A8C0\t0003\n";
        assert_eq!(default_route_device(route).as_deref(), Some("eth0"));
        assert_eq!(default_route_device("Iface\tDestination\n"), None);
    }

    #[test]
    fn clock_and_disk_thresholds() {
        assert_eq!(
            clock_verdict(SANE_SINCE - 1, Some(true)).status,
            Status::Fail
        );
        assert_eq!(
            clock_verdict(SANE_SINCE + 10, Some(true)).status,
            Status::Ok
        );
        assert_eq!(
            clock_verdict(SANE_SINCE + 10, Some(false)).status,
            Status::Warn
        );
        assert_eq!(clock_verdict(SANE_SINCE + 10, None).status, Status::Warn);
        let d = Path::new("/var/lib/capybara");
        assert_eq!(disk_verdict(d, 50 * GIB, 100 * GIB).status, Status::Ok);
        assert_eq!(disk_verdict(d, 5 * GIB, 100 * GIB).status, Status::Warn);
        assert_eq!(disk_verdict(d, 50 * MIB, 100 * GIB).status, Status::Fail);
    }

    #[test]
    fn kernel_config_lookups() {
        let c = "CONFIG_BPF_SYSCALL=y\nCONFIG_BPF_JIT=y\n# CONFIG_IFB is not set\n";
        assert!(config_has(c, "CONFIG_BPF_SYSCALL"));
        assert!(!config_has(c, "CONFIG_IFB"));
        let mounts = "bpf /sys/fs/bpf bpf rw,nosuid 0 0\n";
        assert_eq!(bpf(Some(c), mounts).status, Status::Ok);
        assert_eq!(bpf(Some(c), "").status, Status::Fail);
        assert_eq!(bpf(Some("CONFIG_BPF_JIT=y\n"), mounts).status, Status::Fail);
        assert_eq!(kernel_version("6.6.0-18-amd64").status, Status::Ok);
        assert_eq!(kernel_version("6.18.44-fc").status, Status::Ok);
        assert_eq!(kernel_version("6.1.0-18-amd64").status, Status::Warn);
        assert_eq!(kernel_version("5.4.0").status, Status::Warn);
    }
}
