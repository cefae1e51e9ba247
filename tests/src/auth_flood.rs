//! A flood of failed WireGuard handshakes from spoofed sources against a real agent, shared by
//! the end-to-end test `e2e_auth_flood` and the benchmark `bench::auth_flood`.
//!
//! [`FloodRig`] starts `capybara-agent` in a namespace of its own (its own data dir, pins,
//! tunnel device; no uplink, no API socket) joined by a veth pair to a sender namespace, with
//! reverse-path filtering off so that packets from any source reach its socket. [`flood`]
//! sends handshake initiations (type 1, 148 bytes: the size the agent checks the MAC of) with
//! random bytes for MACs, each from a source address of a pool of random public-looking
//! addresses, through a raw IPv4 socket (`IPPROTO_RAW`, so the source is ours) with
//! `sendmmsg`, paced to a rate.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use crate::{
    agent_proc::{spawn_agent, stop_agent},
    netns::{NetNs, VethPair, unique_name},
};

/// The agent's WireGuard port.
pub const PORT: u16 = 51820;
/// A handshake initiation's size.
const INIT_LEN: usize = 148;
/// IPv4 + UDP headers.
const HEADERS: usize = 28;
/// Datagrams per `sendmmsg`.
const BATCH: usize = 64;

/// The agent under the flood and the namespaces around it. Stops the agent on drop.
pub struct FloodRig {
    /// The agent's namespace.
    pub agent_ns: NetNs,
    /// The sender's namespace.
    pub sender_ns: NetNs,
    /// `a` in the agent's namespace, `b` in the sender's.
    pub veth: VethPair,
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// The agent's log.
    pub log: PathBuf,
    /// Its control socket ([`FloodRig::start_guarded`] only).
    pub socket: Option<PathBuf>,
    pin_dir: PathBuf,
    pid: Option<u32>,
}

/// Every file's size under `dir`, summed: the store's size on disk.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl FloodRig {
    /// Starts `bin` (`capybara-agent`) with its data in `work` and its pins under `pins`,
    /// `net` choosing the veth's `10.<net>.0.0/24`; waits until it is ready.
    pub fn start(bin: &Path, work: &Path, pins: &Path, net: u8) -> Result<FloodRig> {
        FloodRig::launch(bin, work, pins, net, false)
    }

    /// [`FloodRig::start`] with the XDP guard on the agent's side of the veth (`--uplink`) and
    /// the control socket at `work/agent.sock` ([`FloodRig::socket`]), so source lists can be
    /// set and enforced.
    pub fn start_guarded(bin: &Path, work: &Path, pins: &Path, net: u8) -> Result<FloodRig> {
        FloodRig::launch(bin, work, pins, net, true)
    }

    fn launch(bin: &Path, work: &Path, pins: &Path, net: u8, guarded: bool) -> Result<FloodRig> {
        let agent_ns = NetNs::new("af");
        let sender_ns = NetNs::new("as");
        let veth = VethPair::new(&agent_ns, &sender_ns, net);
        for key in ["all", "default", veth.a.ifname.as_str()] {
            agent_ns.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")]);
        }
        // Every spoofed source is routed back through the veth (nothing is sent back).
        agent_ns.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &veth.b.v4.to_string(),
        ]);
        let data_dir = work.join("data");
        let log = work.join("agent.log");
        let uapi = work.join("uapi");
        std::fs::create_dir_all(&uapi)?;
        let pin_dir = pins.join(unique_name("pins"));
        let socket = guarded.then(|| work.join("agent.sock"));
        let mut command = Command::new(bin);
        match &socket {
            Some(path) => command
                .args(["--uplink", &veth.a.ifname])
                .arg("--api-socket")
                .arg(path),
            None => command.arg("--no-api-socket"),
        };
        command
            .args(["--netns", agent_ns.name(), "--tunnel", &unique_name("tn")])
            .args(["--listen-port", &PORT.to_string()])
            .arg("--detach-on-exit")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--bpffs")
            .arg(&pin_dir)
            .arg("--wg-uapi-dir")
            .arg(&uapi);
        let pid =
            spawn_agent(&agent_ns, command, &log, Duration::from_secs(120)).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&pin_dir);
            })?;
        Ok(FloodRig {
            agent_ns,
            sender_ns,
            veth,
            data_dir,
            log,
            socket,
            pin_dir,
            pid: Some(pid),
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid.unwrap_or(0)
    }

    /// The agent's CPU time so far.
    pub fn agent_cpu(&self) -> Result<Duration> {
        crate::cpu::process(self.pid())
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 15 s) so its store can be opened.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        stop_agent(&self.agent_ns, pid);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Drop for FloodRig {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`flood`] did.
#[derive(Clone, Copy, Debug)]
pub struct FloodStats {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The sending thread's own CPU time.
    pub cpu: Duration,
}

/// A random unicast, non-private-looking IPv4 source (not 0/8, 10/8, 127/8, 224/3).
fn random_source(rng: &mut StdRng) -> Ipv4Addr {
    loop {
        let a = Ipv4Addr::from(rng.random::<u32>());
        let o = a.octets()[0];
        if o != 0 && o != 10 && o != 127 && o < 224 {
            return a;
        }
    }
}

/// One IPv4 + UDP datagram carrying a handshake initiation with random MACs from `src`.
fn datagram(rng: &mut StdRng, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut p = vec![0u8; HEADERS + INIT_LEN];
    let total = (HEADERS + INIT_LEN) as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    // The kernel fills in the IPv4 checksum (IP_HDRINCL); UDP checksum 0 = none.
    let sport: u16 = rng.random_range(1024..65535);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + INIT_LEN) as u16).to_be_bytes());
    let body = &mut p[HEADERS..];
    rng.fill(&mut body[4..]);
    body[0] = 1;
    body[1..4].copy_from_slice(&[0, 0, 0]);
    p
}

/// The sources of [`flood`]: `random` random addresses (each its own /24, nearly always) and
/// `same_24` addresses of one /24, `192.0.2.0/24`, mixed in evenly.
pub fn sources(random: usize, same_24: usize, seed: u64) -> Vec<Ipv4Addr> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = random + same_24;
    let step = n / same_24.max(1);
    (0..n)
        .map(|i| {
            if same_24 > 0 && i % step == 0 && i / step < same_24 {
                Ipv4Addr::new(192, 0, 2, (i / step % 254 + 1) as u8)
            } else {
                random_source(&mut rng)
            }
        })
        .collect()
}

/// Sends handshake initiations with bad MACs from `sources` (round and round) to `dst:port`
/// from `ns`, at `pps` datagrams a second, for `time`.
pub fn flood(
    ns: &NetNs,
    sources: &[Ipv4Addr],
    dst: Ipv4Addr,
    port: u16,
    pps: u64,
    time: Duration,
) -> Result<FloodStats> {
    ensure!(!sources.is_empty(), "no sources");
    let sources = sources.to_vec();
    ns.run(move || -> Result<FloodStats> {
        let mut rng = StdRng::seed_from_u64(19);
        let mut packets: Vec<Vec<u8>> = sources
            .iter()
            .map(|s| datagram(&mut rng, *s, dst, port))
            .collect();
        // SAFETY: a plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: all-zero is a valid sockaddr_in.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from(dst).to_be();
        let mut iov: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: all-zero is a valid msghdr.
                let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                h.msg_name = (&raw mut to).cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = v;
                h.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                }
            })
            .collect();
        let cpu0 = thread_cpu();
        let t = Instant::now();
        let mut sent = 0u64;
        let mut next = 0usize;
        while t.elapsed() < time {
            // Pace: no more than the rate so far.
            let due = (t.elapsed().as_secs_f64() * pps as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let n = BATCH.min(hdrs.len() - next);
            // SAFETY: every header points at live buffers (`packets`, `iov`, `to`).
            let r = unsafe { libc::sendmmsg(fd, hdrs[next..].as_mut_ptr(), n as u32, 0) };
            if r > 0 {
                sent += r as u64;
                next = (next + r as usize) % hdrs.len();
            } else {
                // ENOBUFS and the like: the batch is lost, as on a wire.
                sent += n as u64;
                next = (next + n) % hdrs.len();
            }
        }
        let elapsed = t.elapsed();
        let cpu = thread_cpu().saturating_sub(cpu0);
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        drop(packets);
        Ok(FloodStats { sent, elapsed, cpu })
    })
}

/// Sends exactly `n` handshake initiations with bad MACs from `src` to `dst:port` from `ns`,
/// one `sendto` each (a burst: no pacing); answers when the last left.
pub fn send_bad_initiations(
    ns: &NetNs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    n: usize,
) -> Result<Instant> {
    ns.run(move || -> Result<Instant> {
        let mut rng = StdRng::seed_from_u64(u64::from(u32::from(src)));
        // SAFETY: a plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: all-zero is a valid sockaddr_in.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from(dst).to_be();
        let mut last = Instant::now();
        for _ in 0..n {
            let p = datagram(&mut rng, src, dst, port);
            // SAFETY: `p` and `to` are live for the call.
            let r = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            last = Instant::now();
            if r < 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
                bail!("sendto: {e}");
            }
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        Ok(last)
    })
}

fn thread_cpu() -> Duration {
    // SAFETY: all-zero is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The auth records in an agent's store.
#[derive(Clone, Debug, Default)]
pub struct AuthRecords {
    /// How many.
    pub records: u64,
    /// The failures they count.
    pub failures: u64,
    /// Each record's prefix and count.
    pub prefixes: Vec<(String, u64)>,
}

/// The agent's auth records in the store at `data_dir` (the agent stopped).
pub fn auth_records(data_dir: &Path) -> Result<AuthRecords> {
    use capybara_agent::{
        service::AuthAttempt,
        store::{Cf, Store, Walk, keys},
    };
    let store = Store::open(data_dir).context("open the agent's store")?;
    let (mut n, mut failures, mut prefixes) = (0u64, 0u64, Vec::new());
    store.walk::<AuthAttempt>(
        Cf::Sessions,
        keys::AUTH_PREFIX,
        Walk::Forward,
        None,
        |_, a| {
            n += 1;
            failures += a.count;
            prefixes.push((a.prefix.map(|p| p.to_string()).unwrap_or_default(), a.count));
            true
        },
    )?;
    Ok(AuthRecords {
        records: n,
        failures,
        prefixes,
    })
}
