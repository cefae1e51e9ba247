//! RAII guards for privileged end-to-end tests: network namespaces, veth pairs, bpffs pin dirs.
//!
//! Every guard removes what it made when dropped, also while a test panics. Names are unique per
//! test process and per guard: `ct` + pid + a counter (+ a short suffix), so tests never collide
//! with each other or with anything on the host, and interface names stay within the kernel's 15
//! characters. Leftovers of a test process that was killed (SIGKILL skips `Drop`) are swept the
//! next time a guard is created: namespaces and pin dirs named `ct<pid>-…` whose pid is gone.
//!
//! All addresses used inside the namespaces are 10.x and fd00::/8 addresses on links between
//! namespaces the tests created; no traffic ever leaves them.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A name unique to this process and call: `ct<pid><n><suffix>`, at most 15 characters (an
/// interface name). Panics if the suffix makes it longer.
pub fn unique_name(suffix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("ct{}{}{}", std::process::id(), n, suffix);
    assert!(
        name.len() <= 15,
        "generated name {name:?} is longer than an interface name may be (15)"
    );
    name
}

/// A name for a namespace or a pin dir: `ct<pid>-<n><suffix>`. The dash lets the sweep find the
/// pid of the process that made it.
fn owned_name(suffix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("ct{}-{}{}", std::process::id(), n, suffix)
}

/// The pid encoded in an [`owned_name`], if `name` is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("ct")?.split_once('-')?.0.parse().ok()
}

/// Removes namespaces and pin dirs left behind by test processes that no longer exist.
fn sweep_stale() {
    SWEEP.call_once(|| {
        let dead = |name: &str| {
            owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dead(&name) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).output();
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(BPFFS) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dead(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

/// Runs a command on the host (not in a namespace); panics with its stderr if it fails.
pub fn host(args: &[&str]) -> String {
    let out = try_host(args);
    check(args, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command on the host and returns its output whatever its exit status.
pub fn try_host(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (is it installed?)"))
}

fn check(args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
}

/// Panics with a clear message unless the process runs as root (every guard here needs it).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (network namespaces, TUN devices, bpffs): run them as root"
    );
}

/// A network namespace, deleted on drop together with every process spawned in it.
pub struct NetNs {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl NetNs {
    /// Creates a namespace named `ct<pid>-<n><suffix>` with its loopback up.
    pub fn new(suffix: &str) -> Self {
        require_root();
        sweep_stale();
        let name = owned_name(suffix);
        host(&["ip", "netns", "add", &name]);
        let ns = NetNs {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file under `/run/netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace; panics with its stderr if it fails; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = self.try_exec(args);
        check(args, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside the namespace and returns its output whatever its exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// A `Command` that runs `args` inside the namespace (`ip netns exec`), for callers that need
    /// to set its environment or stdio themselves.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Starts a background process inside the namespace; it is killed when the namespace guard is
    /// dropped (or earlier by [`NetNs::kill`]). Returns its pid.
    pub fn spawn(&self, args: &[&str]) -> u32 {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {args:?} in {}: {e}", self.name));
        self.adopt(child)
    }

    /// Hands a child process (started by the caller, e.g. from [`NetNs::command`]) to the guard,
    /// which kills it on drop. Returns its pid.
    pub fn adopt(&self, child: Child) -> u32 {
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Sends `signal` to a background process started by [`NetNs::spawn`]/[`NetNs::adopt`] and,
    /// for SIGKILL, waits for it and forgets it.
    pub fn kill(&self, pid: u32, signal: Signal) {
        let mut children = self.children.lock().unwrap();
        let Some(i) = children.iter().position(|c| c.id() == pid) else {
            panic!("pid {pid} is not a process of namespace {}", self.name);
        };
        let _ = kill(Pid::from_raw(pid as i32), signal);
        if signal == Signal::SIGKILL {
            let mut child = children.remove(i);
            let _ = child.wait();
        }
    }

    /// Whether the background process `pid` is still running (false once it exited).
    pub fn is_running(&self, pid: u32) -> bool {
        let mut children = self.children.lock().unwrap();
        children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `f` on a new thread that has entered the namespace (setns), and returns its result.
    /// Sockets made in `f` belong to the namespace. A panic in `f` is resumed on the caller.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open();
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                enter(&file, &self.name);
                f()
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Starts `f` on a background thread that has entered the namespace.
    pub fn spawn_thread<F, R>(&self, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open();
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&file, &name);
            f()
        })
    }

    /// Adds an address (`10.1.2.3/24`, `fd00::1/64`) to an interface in the namespace. IPv6
    /// addresses skip duplicate address detection so they are usable at once.
    pub fn add_addr(&self, ifname: &str, cidr: &str) {
        if cidr.contains(':') {
            self.exec(&["ip", "addr", "add", cidr, "dev", ifname, "nodad"]);
        } else {
            self.exec(&["ip", "addr", "add", cidr, "dev", ifname]);
        }
    }

    /// Adds a route in the namespace (`ip route add DEST dev IF [src SRC]`).
    pub fn add_route(&self, dest: &str, ifname: &str, src: Option<IpAddr>) {
        let src = src.map(|s| s.to_string());
        let mut args = vec!["ip", "route", "add", dest, "dev", ifname];
        if let Some(s) = &src {
            args.extend(["src", s.as_str()]);
        }
        self.exec(&args);
    }

    /// The interface's index inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let out = self.exec(&["cat", &format!("/sys/class/net/{ifname}/ifindex")]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("ifindex of {ifname}: {out:?}: {e}"))
    }

    fn open(&self) -> File {
        File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open namespace {}: {e}", self.name))
    }
}

fn enter(file: &File, name: &str) {
    setns(file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into namespace {name}: {e}"));
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// One side of a [`VethPair`]: its interface name and addresses.
#[derive(Clone, Debug)]
pub struct VethEnd {
    /// Interface name (in its namespace).
    pub ifname: String,
    /// IPv4 address.
    pub v4: std::net::Ipv4Addr,
    /// IPv6 address (ULA).
    pub v6: std::net::Ipv6Addr,
}

/// A veth pair between two namespaces, side `a` in the first, side `b` in the second, up and
/// addressed: `10.<net>.0.1/24` + `fd00:<net>::1/64` on `a`, `…2` on `b`. Deleted on drop.
pub struct VethPair {
    ns_a: String,
    /// The end in the first namespace.
    pub a: VethEnd,
    /// The end in the second namespace.
    pub b: VethEnd,
}

impl VethPair {
    /// Creates the pair (made directly inside the namespaces; the host's own namespace never sees
    /// it) with addresses in `10.<net>.0.0/24` and `fd00:<net>::/64`.
    pub fn new(ns_a: &NetNs, ns_b: &NetNs, net: u8) -> Self {
        let a_if = unique_name("va");
        let b_if = unique_name("vb");
        host(&[
            "ip",
            "link",
            "add",
            "name",
            &a_if,
            "netns",
            ns_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            ns_b.name(),
        ]);
        let pair = VethPair {
            ns_a: ns_a.name().to_owned(),
            a: VethEnd {
                ifname: a_if,
                v4: std::net::Ipv4Addr::new(10, net, 0, 1),
                v6: format!("fd00:{net:x}::1").parse().unwrap(),
            },
            b: VethEnd {
                ifname: b_if,
                v4: std::net::Ipv4Addr::new(10, net, 0, 2),
                v6: format!("fd00:{net:x}::2").parse().unwrap(),
            },
        };
        for (ns, end) in [(ns_a, &pair.a), (ns_b, &pair.b)] {
            ns.add_addr(&end.ifname, &format!("{}/24", end.v4));
            ns.add_addr(&end.ifname, &format!("{}/64", end.v6));
            ns.exec(&["ip", "link", "set", &end.ifname, "up"]);
        }
        pair
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both; the namespace guard would also remove it.
        let _ = Command::new("ip")
            .args(["-n", &self.ns_a, "link", "del", &self.a.ifname])
            .stdin(Stdio::null())
            .output();
    }
}

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A fresh directory under `/sys/fs/bpf` for one test's pins; removed with everything pinned in
/// it on drop.
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    /// Creates `/sys/fs/bpf/ct<pid>-<n>`.
    pub fn new() -> Self {
        require_root();
        sweep_stale();
        assert!(
            Path::new(BPFFS).join(".").exists(),
            "{BPFFS} does not exist: mount bpffs (mount -t bpf bpf {BPFFS})"
        );
        let path = Path::new(BPFFS).join(owned_name(""));
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!("cannot create {}: {e} (is bpffs mounted?)", path.display())
        });
        BpffsDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_short() {
        let a = unique_name("xy");
        let b = unique_name("xy");
        assert_ne!(a, b);
        assert!(a.len() <= 15);
        assert!(a.starts_with("ct"));
    }

    #[test]
    fn owner_pid_parses_owned_names_only() {
        assert_eq!(owner_pid("ct1234-5a"), Some(1234));
        assert_eq!(owner_pid(&owned_name("x")), Some(std::process::id()));
        assert_eq!(owner_pid("ct1234"), None);
        assert_eq!(owner_pid("other-1"), None);
    }
}
