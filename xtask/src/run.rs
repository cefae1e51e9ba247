//! `cargo xtask run`: setup, build, and the agent in the foreground with safe defaults.
//!
//! It builds both binaries of the `capybara-agent` package, the agent and the `capybara` CLI
//! (release, `<target>/release/`), and prints how to call the CLI before it starts the agent.
//!
//! Unless `--uplink` names an interface of this machine, xtask makes a network namespace of its
//! own ([`NETNS`]) joined to the host by a veth pair ([`HOST_VETH`] on the host,
//! [`UPLINK_VETH`] inside; the three names can be changed with `--netns`, `--host-veth`,
//! `--uplink-veth`, which the end-to-end test of the first run does) on a /30 no host route
//! uses, and starts the agent inside it, so the agent attaches to nothing of the host's.
//!
//! The agent gets `--public-endpoint ADDRESS:PORT` with the uplink's address (the namespace
//! side of the veth pair, or the first IPv4 address of `--uplink`), so the client config
//! `capybara user add` prints works as printed; and `--geoip-db` with the country database
//! setup installed (`crate::geoip`), if it is there. Either is left out when the agent
//! arguments after `--` give it. The agent is entered into the namespace with
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
/// The CLI binary of the same package.
const CLI: &str = "capybara";

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
    /// Run this agent binary instead of building `capybara-agent` (e.g. a release artifact);
    /// the `capybara` CLI is then the one beside it.
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Name of the network namespace made for the agent.
    #[arg(long, value_name = "NAME", default_value = NETNS)]
    netns: String,
    /// Host side of the veth pair (an interface name, at most 15 characters).
    #[arg(long, value_name = "NAME", default_value = HOST_VETH)]
    host_veth: String,
    /// Namespace side of the veth pair, the agent's uplink (at most 15 characters).
    #[arg(long, value_name = "NAME", default_value = UPLINK_VETH)]
    uplink_veth: String,
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
    for (flag, name) in [
        ("--host-veth", &args.host_veth),
        ("--uplink-veth", &args.uplink_veth),
    ] {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            bail!("{flag} {name:?}: not an interface name (1 to 15 characters, no '/' or space)");
        }
    }
    if args.netns.is_empty() || args.netns.contains(['/', ' ']) {
        bail!("--netns {:?}: not a namespace name", args.netns);
    }
    if !args.no_setup {
        setup::run(&setup::Args {})?;
    }
    let agent = match &args.agent_bin {
        Some(path) => path.clone(),
        None => {
            exec::run(
                cmd("cargo")
                    .args(["build", "--release", "-p", AGENT])
                    .args(["--bin", AGENT, "--bin", CLI]),
            )?;
            exec::target_dir()?.join("release").join(AGENT)
        }
    };
    if !agent.is_file() {
        bail!("agent binary {} does not exist", agent.display());
    }
    let cli = agent.with_file_name(CLI);
    if !cli.is_file() {
        bail!(
            "no `{CLI}` CLI beside the agent binary ({} does not exist)",
            cli.display()
        );
    }
    print_cli_usage(&cli, &args.agent_args);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(start(args, &agent))
}

/// Tell the reader where the CLI is and how to call it (it talks to the agent's control socket,
/// root's), with a command to copy; xtask changes nothing outside the target dir for it.
fn print_cli_usage(cli: &Path, agent_args: &[String]) {
    let socket = agent_flag(agent_args, "--api-socket");
    let socket_arg = socket.map_or_else(String::new, |s| format!(" --socket {s}"));
    let cli = cli.display();
    eprintln!("run: the CLI is {cli}; once the agent is ready, from another terminal:");
    eprintln!("run:     sudo {cli}{socket_arg} user add alice");
    eprintln!("run: or put it on your PATH: sudo ln -sf {cli} /usr/local/bin/{CLI}");
}

/// The value of `--flag VALUE` or `--flag=VALUE` among the agent arguments given after `--`.
fn agent_flag<'a>(agent_args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut words = agent_args.iter();
    while let Some(word) = words.next() {
        if word == flag {
            return words.next().map(String::as_str);
        }
        if let Some(value) = word
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(value);
        }
    }
    None
}

/// The agent arguments xtask adds unless those after `--` give them: the public endpoint
/// clients use, and the country database setup installed (when it is there).
fn default_agent_args(agent_args: &[String], endpoint: Option<String>) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(endpoint) = endpoint
        && agent_flag(agent_args, "--public-endpoint").is_none()
    {
        argv.extend(["--public-endpoint".to_owned(), endpoint]);
    }
    let geoip = crate::geoip::installed_path(&exec::cache_dir());
    if agent_flag(agent_args, "--geoip-db").is_none() && geoip.is_file() {
        argv.extend(["--geoip-db".to_owned(), geoip.display().to_string()]);
    }
    argv
}

/// The first IPv4 address of `iface` on this host.
fn first_ipv4(iface: &str) -> Result<Option<Ipv4Addr>> {
    let out = exec::output(cmd("ip").args(["-4", "-o", "addr", "show", "dev", iface]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        }))
}

/// Create the namespace if needed and supervise the agent; the namespace is removed when this
/// returns, whatever happened.
async fn start(args: &Args, agent: &Path) -> Result<()> {
    // Listening from here on: a Ctrl-C can only be forwarded to the agent, never kill xtask
    // before it has cleaned up. (Handlers, unlike a blocked mask, are not inherited by children.)
    let mut signals = Signals::listen()?;

    let agent_args = |uplink: &str, netns: Option<&str>, endpoint: Option<String>| {
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
        argv.extend(default_agent_args(&args.agent_args, endpoint));
        argv.extend(args.agent_args.iter().cloned());
        argv
    };

    let status = match &args.uplink {
        Some(uplink) => {
            let endpoint = first_ipv4(uplink)?.map(|a| format!("{a}:{}", args.listen_port));
            eprintln!(
                "run: agent on host interface {uplink}; clients connect to {}, UDP port {}",
                endpoint.as_deref().unwrap_or("an address of it"),
                args.listen_port
            );
            let mut command = cmd(agent);
            command.args(agent_args(uplink, None, endpoint));
            supervise(command, &mut signals).await?
        }
        None => {
            let netns = Netns::create(&args.netns, &args.host_veth, &args.uplink_veth)?;
            let endpoint = format!("{}:{}", netns.agent_addr, args.listen_port);
            eprintln!(
                "run: agent in network namespace {} (uplink {} {}/30); from this host a \
                 WireGuard client uses Endpoint = {endpoint} (the agent writes it into the \
                 configs it prints)",
                netns.name, netns.uplink_veth, netns.agent_addr
            );
            let mut command = cmd("nsenter");
            command
                .arg(format!("--net=/run/netns/{}", netns.name))
                .arg("--")
                .arg(agent)
                .args(agent_args(
                    &netns.uplink_veth,
                    Some(&netns.name),
                    Some(endpoint),
                ));
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
    /// The namespace.
    name: String,
    /// Host side of the veth pair.
    host_veth: String,
    /// Namespace side of the veth pair.
    uplink_veth: String,
    /// Host side address, the namespace's default gateway.
    host_addr: Ipv4Addr,
    /// Namespace side address: where clients send WireGuard packets.
    agent_addr: Ipv4Addr,
}

impl Netns {
    /// Create the namespace and the veth pair on a free /30, removing a stale namespace of a run
    /// that was killed before it could clean up.
    fn create(name: &str, host_veth: &str, uplink_veth: &str) -> Result<Self> {
        remove_stale(name, host_veth)?;
        let net = free_slash30()?;
        let host_addr = Ipv4Addr::from(u32::from(net) + 1);
        let agent_addr = Ipv4Addr::from(u32::from(net) + 2);

        exec::run(cmd("ip").args(["netns", "add", name]))?;
        // From here on, Drop cleans up whatever was made.
        let netns = Netns {
            name: name.to_owned(),
            host_veth: host_veth.to_owned(),
            uplink_veth: uplink_veth.to_owned(),
            host_addr,
            agent_addr,
        };
        let ns = ["-n", name];
        exec::run(
            cmd("ip")
                .args(["link", "add", host_veth, "type", "veth", "peer", "name"])
                .args([uplink_veth, "netns", name]),
        )?;
        exec::run(cmd("ip").args(["addr", "add", &format!("{host_addr}/30"), "dev", host_veth]))?;
        exec::run(cmd("ip").args(["link", "set", host_veth, "up"]))?;
        exec::run(cmd("ip").args(ns).args([
            "addr",
            "add",
            &format!("{agent_addr}/30"),
            "dev",
            uplink_veth,
        ]))?;
        exec::run(cmd("ip").args(ns).args(["link", "set", uplink_veth, "up"]))?;
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
        let (name, host_veth) = (&self.name, &self.host_veth);
        if Path::new("/sys/class/net").join(host_veth).exists()
            && let Err(err) = exec::run(cmd("ip").args(["link", "del", host_veth]))
        {
            exec::say(format_args!("run: cleanup: {err:#}"));
        }
        if let Err(err) = exec::run(cmd("ip").args(["netns", "del", name])) {
            exec::say(format_args!("run: cleanup: {err:#}"));
        }
        exec::say(format_args!(
            "run: removed namespace {name} and veth {host_veth}/{}",
            self.uplink_veth
        ));
    }
}

/// Remove the namespace and veth pair of an earlier run that was killed before it could clean
/// up; fail if that run is still going or if the host side (`capy-host`) is not ours.
fn remove_stale(name: &str, host_veth: &str) -> Result<()> {
    let netns_exists = Path::new("/run/netns").join(name).exists();
    if netns_exists {
        let out = exec::output(cmd("ip").args(["netns", "pids", name]))?;
        let pids = String::from_utf8_lossy(&out.stdout);
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            bail!(
                "network namespace {name} is in use (another `cargo xtask run`?): pids {}",
                pids.join(" ")
            );
        }
    }
    if Path::new("/sys/class/net").join(host_veth).exists() {
        let out = exec::output(cmd("ip").args(["-o", "link", "show", "dev", host_veth]))?;
        let ours = String::from_utf8_lossy(&out.stdout).contains(&format!("link-netns {name}"));
        if !ours {
            bail!(
                "interface {host_veth} already exists on the host and is not ours; not touching it"
            );
        }
        eprintln!("run: removing veth {host_veth} left over by an earlier run");
        exec::run(cmd("ip").args(["link", "del", host_veth]))?;
    }
    if netns_exists {
        eprintln!("run: removing namespace {name} left over by an earlier run");
        exec::run(cmd("ip").args(["netns", "del", name]))?;
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

    /// Issue 19: the agent gets the uplink's address as its public endpoint unless the
    /// arguments after `--` give one.
    #[test]
    fn the_endpoint_is_passed_unless_given() {
        let given = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let endpoint = Some("10.203.0.2:51820".to_owned());
        let argv = default_agent_args(&[], endpoint.clone());
        assert_eq!(argv[..2], ["--public-endpoint", "10.203.0.2:51820"]);
        for own in [
            given(&["--public-endpoint", "vpn.example.com:443"]),
            given(&["--dns", "1.1.1.1", "--public-endpoint=vpn.example.com:443"]),
        ] {
            let argv = default_agent_args(&own, endpoint.clone());
            assert!(!argv.iter().any(|w| w == "--public-endpoint"), "{argv:?}");
            assert_eq!(
                agent_flag(&own, "--public-endpoint"),
                Some("vpn.example.com:443")
            );
        }
        let argv = default_agent_args(&given(&["--geoip-db", "/x.mmdb"]), None);
        assert!(!argv.iter().any(|w| w == "--geoip-db"), "{argv:?}");
        assert_eq!(
            agent_flag(&given(&["--api-socket", "/s"]), "--api-socket"),
            Some("/s")
        );
        assert_eq!(agent_flag(&given(&["--api-socket"]), "--api-socket"), None);
    }

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
