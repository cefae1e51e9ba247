//! `cargo xtask run`: setup, build, and the agent in the foreground with safe defaults.
//!
//! Unless `--uplink` names an interface of this machine, xtask makes a network namespace of its
//! own ([`NETNS`]) joined to the host by a veth pair ([`HOST_VETH`] on the host,
//! [`UPLINK_VETH`] inside) on a /30 no host route uses, and starts the agent inside it, so the
//! agent attaches to nothing of the host's. The agent is entered into the namespace with
//! `nsenter --net=…` rather than `ip netns exec`, because the latter remounts `/sys` and so hides
//! bpffs at `/sys/fs/bpf`, where the agent pins its maps.
//!
//! SIGINT and SIGTERM are forwarded to the agent (a second one sends SIGKILL); xtask waits for it
//! and then removes the namespace and the veth pair, also when the agent fails.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::exec::{self, cmd};
use crate::setup;

/// The namespace xtask creates for the agent.
const NETNS: &str = "capybara-run";
/// Host side of the veth pair.
const HOST_VETH: &str = "capy-host";
/// Namespace side of the veth pair: the agent's uplink.
const UPLINK_VETH: &str = "capy-uplink";
/// The agent binary (`capybara-agent` package `capybara-agent`).
const AGENT: &str = "capybara-agent";

/// Flags of `cargo xtask run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Attach to this existing interface of the host instead of a namespace of xtask's own.
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// The agent's data dir (its RocksDB store and keys).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/capybara-run")]
    data_dir: PathBuf,
    /// The agent's bpffs directory (pinned maps and links); its own, so a run never shares
    /// maps with an agent installed on this machine.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/capybara-run")]
    bpffs: PathBuf,
    /// Name of the WireGuard tunnel device the agent creates.
    #[arg(long, value_name = "NAME", default_value = "capy0")]
    tunnel: String,
    /// UDP port the agent listens on for WireGuard.
    #[arg(long, value_name = "PORT", default_value_t = 51820)]
    listen_port: u16,
    /// Run this agent binary instead of building `capybara-agent` (e.g. a release artifact).
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    no_setup: bool,
    /// More arguments for the agent, after `--`.
    #[arg(last = true, value_name = "AGENT ARGS")]
    agent_args: Vec<String>,
}

/// Entry point of `cargo xtask run`.
pub fn run(args: &Args) -> Result<()> {
    if !exec::is_root() {
        bail!("`cargo xtask run` needs root: the agent loads BPF programs and creates devices");
    }
    if let Some(uplink) = &args.uplink
        && !Path::new("/sys/class/net").join(uplink).exists()
    {
        bail!("--uplink {uplink}: no such interface on this host (see `ip link`)");
    }
    if !args.no_setup {
        setup::run(&setup::Args {})?;
    }
    let agent = match &args.agent_bin {
        Some(path) => path.clone(),
        None => {
            exec::run(cmd("cargo").args(["build", "--release", "-p", AGENT, "--bin", AGENT]))?;
            exec::target_dir()?.join("release").join(AGENT)
        }
    };
    if !agent.is_file() {
        bail!("agent binary {} does not exist", agent.display());
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(start(args, &agent))
}

/// Create the namespace if needed and supervise the agent; the namespace is removed when this
/// returns, whatever happened.
async fn start(args: &Args, agent: &Path) -> Result<()> {
    // Listening from here on: a Ctrl-C can only be forwarded to the agent, never kill xtask
    // before it has cleaned up. (Handlers, unlike a blocked mask, are not inherited by children.)
    let mut signals = Signals::listen()?;

    let agent_args = |uplink: &str, netns: Option<&str>| {
        let mut argv = vec![
            "--uplink".to_owned(),
            uplink.to_owned(),
            "--tunnel".to_owned(),
            args.tunnel.clone(),
            "--listen-port".to_owned(),
            args.listen_port.to_string(),
            "--data-dir".to_owned(),
            args.data_dir.display().to_string(),
            "--bpffs".to_owned(),
            args.bpffs.display().to_string(),
        ];
        if let Some(netns) = netns {
            argv.extend(["--netns".to_owned(), netns.to_owned()]);
        }
        argv.extend(args.agent_args.iter().cloned());
        argv
    };

    let status = match &args.uplink {
        Some(uplink) => {
            eprintln!(
                "run: agent on host interface {uplink}; clients connect to an address of \
                 {uplink}, UDP port {}",
                args.listen_port
            );
            let mut command = cmd(agent);
            command.args(agent_args(uplink, None));
            supervise(command, &mut signals).await?
        }
        None => {
            let netns = Netns::create()?;
            eprintln!(
                "run: agent in network namespace {NETNS} (uplink {UPLINK_VETH} {}/30); from \
                 this host a WireGuard client uses Endpoint = {}:{}",
                netns.agent_addr, netns.agent_addr, args.listen_port
            );
            let mut command = cmd("nsenter");
            command
                .arg(format!("--net=/run/netns/{NETNS}"))
                .arg("--")
                .arg(agent)
                .args(agent_args(UPLINK_VETH, Some(NETNS)));
            let status = supervise(command, &mut signals).await;
            drop(netns);
            status?
        }
    };
    if !status.success() {
        bail!("{AGENT} exited with {status}");
    }
    eprintln!("run: {AGENT} exited cleanly");
    Ok(())
}

/// SIGINT and SIGTERM, caught by xtask to be forwarded to the agent.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.terminate.recv() => Signal::SIGTERM,
        }
    }
}

/// Start `command` in its own process group (so a terminal's Ctrl-C reaches it once, through
/// xtask), forward SIGINT/SIGTERM to it until it exits (a second one sends SIGKILL), and return
/// its exit status. An agent that exits because of the signal xtask forwarded counts as a clean
/// stop.
async fn supervise(
    mut command: std::process::Command,
    signals: &mut Signals,
) -> Result<ExitStatus> {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

    command.process_group(0);
    exec::echo(&command);
    let shown = exec::display(&command);
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let pid = child.id().context("agent pid")?;
    let pid = Pid::from_raw(i32::try_from(pid).context("agent pid out of range")?);
    let mut forwarded = None;
    let mut first_at = None;
    let status = loop {
        let signal = tokio::select! {
            status = child.wait() => break status.context("wait for the agent")?,
            signal = signals.next() => signal,
        };
        let send = if let Some(at) = first_at {
            // One Ctrl-C can arrive twice (e.g. `timeout` signals the child and its group):
            // only a repeat after a second means "stop waiting".
            if std::time::Instant::now().duration_since(at) < std::time::Duration::from_secs(1) {
                continue;
            }
            exec::say(format_args!(
                "run: {signal} again: killing {AGENT} (pid {pid})"
            ));
            Signal::SIGKILL
        } else {
            first_at = Some(std::time::Instant::now());
            exec::say(format_args!(
                "run: forwarding {signal} to {AGENT} (pid {pid}), waiting for it"
            ));
            signal
        };
        forwarded = Some(send);
        // Not reaped until `wait` returns, so the pid is still the agent's.
        if let Err(errno) = nix::sys::signal::kill(pid, send) {
            exec::say(format_args!("run: kill {pid}: {errno}"));
        }
    };
    let by_our_signal = matches!(
        (forwarded, status.signal()),
        (Some(sent), Some(got)) if sent as i32 == got && sent != Signal::SIGKILL
    );
    Ok(if by_our_signal {
        ExitStatus::from_raw(0)
    } else {
        status
    })
}

/// The namespace and veth pair of one run; dropping it removes both.
struct Netns {
    /// Host side address, the namespace's default gateway.
    host_addr: Ipv4Addr,
    /// Namespace side address: where clients send WireGuard packets.
    agent_addr: Ipv4Addr,
}

impl Netns {
    /// Create [`NETNS`] and the veth pair on a free /30, removing a stale namespace of a run
    /// that was killed before it could clean up.
    fn create() -> Result<Self> {
        remove_stale()?;
        let net = free_slash30()?;
        let host_addr = Ipv4Addr::from(u32::from(net) + 1);
        let agent_addr = Ipv4Addr::from(u32::from(net) + 2);

        exec::run(cmd("ip").args(["netns", "add", NETNS]))?;
        // From here on, Drop cleans up whatever was made.
        let netns = Netns {
            host_addr,
            agent_addr,
        };
        let ns = ["-n", NETNS];
        exec::run(
            cmd("ip")
                .args(["link", "add", HOST_VETH, "type", "veth", "peer", "name"])
                .args([UPLINK_VETH, "netns", NETNS]),
        )?;
        exec::run(cmd("ip").args(["addr", "add", &format!("{host_addr}/30"), "dev", HOST_VETH]))?;
        exec::run(cmd("ip").args(["link", "set", HOST_VETH, "up"]))?;
        exec::run(cmd("ip").args(ns).args([
            "addr",
            "add",
            &format!("{agent_addr}/30"),
            "dev",
            UPLINK_VETH,
        ]))?;
        exec::run(cmd("ip").args(ns).args(["link", "set", UPLINK_VETH, "up"]))?;
        exec::run(cmd("ip").args(ns).args(["link", "set", "lo", "up"]))?;
        exec::run(
            cmd("ip")
                .args(ns)
                .args(["route", "add", "default", "via"])
                .arg(netns.host_addr.to_string()),
        )?;
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes both, synchronously; the namespace goes after.
        if Path::new("/sys/class/net").join(HOST_VETH).exists()
            && let Err(err) = exec::run(cmd("ip").args(["link", "del", HOST_VETH]))
        {
            exec::say(format_args!("run: cleanup: {err:#}"));
        }
        if let Err(err) = exec::run(cmd("ip").args(["netns", "del", NETNS])) {
            exec::say(format_args!("run: cleanup: {err:#}"));
        }
        exec::say(format_args!(
            "run: removed namespace {NETNS} and veth {HOST_VETH}/{UPLINK_VETH}"
        ));
    }
}

/// Remove the namespace and veth pair of an earlier run that was killed before it could clean
/// up; fail if that run is still going or if `capy-host` is not ours.
fn remove_stale() -> Result<()> {
    let netns_exists = Path::new("/run/netns").join(NETNS).exists();
    if netns_exists {
        let out = exec::output(cmd("ip").args(["netns", "pids", NETNS]))?;
        let pids = String::from_utf8_lossy(&out.stdout);
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            bail!(
                "network namespace {NETNS} is in use (another `cargo xtask run`?): pids {}",
                pids.join(" ")
            );
        }
    }
    if Path::new("/sys/class/net").join(HOST_VETH).exists() {
        let out = exec::output(cmd("ip").args(["-o", "link", "show", "dev", HOST_VETH]))?;
        let ours = String::from_utf8_lossy(&out.stdout).contains(&format!("link-netns {NETNS}"));
        if !ours {
            bail!(
                "interface {HOST_VETH} already exists on the host and is not ours; not touching it"
            );
        }
        eprintln!("run: removing veth {HOST_VETH} left over by an earlier run");
        exec::run(cmd("ip").args(["link", "del", HOST_VETH]))?;
    }
    if netns_exists {
        eprintln!("run: removing namespace {NETNS} left over by an earlier run");
        exec::run(cmd("ip").args(["netns", "del", NETNS]))?;
    }
    Ok(())
}

/// An IPv4 network `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: u32,
    len: u32,
}

impl Net {
    fn parse(text: &str) -> Option<Net> {
        let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u32 = len.parse().ok().filter(|len| *len <= 32)?;
        Some(Net {
            addr: u32::from(addr),
            len,
        })
    }

    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    fn overlaps(self, other: Net) -> bool {
        let mask = self.mask() & other.mask();
        self.addr & mask == other.addr & mask
    }
}

/// Networks the host already routes or has addresses in (the default route aside).
fn host_networks() -> Result<Vec<Net>> {
    let routes = exec::output(cmd("ip").args(["-4", "route"]))?;
    let addrs = exec::output(cmd("ip").args(["-4", "-o", "addr", "show"]))?;
    let mut nets = Vec::new();
    for line in String::from_utf8_lossy(&routes.stdout).lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        // Route types (`unreachable 10.1.0.0/16`) come before the prefix.
        let prefix = if first.contains(|c: char| c.is_ascii_digit()) {
            first
        } else {
            words.next().unwrap_or_default()
        };
        nets.extend(Net::parse(prefix));
    }
    for line in String::from_utf8_lossy(&addrs.stdout).lines() {
        let mut words = line.split_whitespace();
        if words.any(|word| word == "inet") {
            nets.extend(words.next().and_then(Net::parse));
        }
    }
    Ok(nets)
}

/// The first 10.x.0.0/30 (x = 203, 204, …, then 10, 11, …) that nothing on the host uses.
fn free_slash30() -> Result<Ipv4Addr> {
    let taken = host_networks()?;
    pick_slash30(&taken).context("no free 10.x.0.0/30 for the veth pair")
}

fn pick_slash30(taken: &[Net]) -> Option<Ipv4Addr> {
    (203..=255u8)
        .chain(10..203)
        .map(|x| Ipv4Addr::new(10, x, 0, 0))
        .find(|candidate| {
            let net = Net {
                addr: u32::from(*candidate),
                len: 30,
            };
            !taken.iter().any(|used| used.overlaps(net))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_first_free_slash30() {
        let taken: Vec<Net> = ["192.0.2.0/24", "10.203.0.0/16", "10.204.0.1"]
            .iter()
            .filter_map(|n| Net::parse(n))
            .collect();
        assert_eq!(pick_slash30(&taken), Some(Ipv4Addr::new(10, 205, 0, 0)));
        assert_eq!(pick_slash30(&[]), Some(Ipv4Addr::new(10, 203, 0, 0)));
        let everything = [Net::parse("10.0.0.0/8").unwrap()];
        assert_eq!(pick_slash30(&everything), None);
    }
}
