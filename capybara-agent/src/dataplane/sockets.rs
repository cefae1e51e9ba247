//! Proxied sockets in the kernel: binding a Shadowsocks or VLESS connection's sockets to the
//! identity's line, and the cgroup_skb programs that enforce its policy on them (issue 24; the
//! kernel side is `capybara-ebpf`'s `sock_skb`, which runs the tunnel's pipeline).
//!
//! ## Binding
//! [`SocketBinder`] (the [`crate::proxy::Kernel`] port; cheap to clone, no lock) writes a
//! `SockBinding { peer, role }` into the socket's storage in `CAPY_SOCK_BIND`
//! (`BPF_MAP_TYPE_SK_STORAGE`): one `BPF_MAP_UPDATE_ELEM` keyed by the socket's fd. The
//! storage lives and dies with the socket, so nothing is ever unbound or leaked, and a socket
//! closed and its fd number re-used starts unbound. The map is **not pinned**: the sockets are
//! this agent's own and die with it, and two agents on one machine (tests run several) each see
//! only their own sockets.
//!
//! An identity's line is a peer with no allowed IPs: `Dataplane::set_peer(id, &[])` activates
//! it, and the gate, quota bucket, flow limit and rates are set on it as on a device's
//! (`set_gate`, `assign_quota`, `set_flow_limit`, `set_rates`); its counters are read by
//! `peer_stats`.
//!
//! ## Attaching
//! [`Dataplane::attach_sockets`] attaches `sock_egress` and `sock_ingress` to a cgroup v2
//! directory ([`own_cgroup`]: the agent's own — the cgroup2 mount from `/proc/mounts` joined
//! with the `0::` line of `/proc/self/cgroup`) as BPF links, which are always multi-attach
//! (`BPF_F_ALLOW_MULTI` semantics; `BPF_LINK_CREATE` takes no flag), so other programs on that
//! cgroup (another agent's, systemd's) keep running. The links are **held, not pinned**:
//! they end with the agent (or [`Dataplane::detach`]), and so do the sockets they enforce on —
//! unlike the tunnel's programs, there is nothing left to enforce on while the agent is down.
//!
//! ## Shaping
//! The socket programs set `skb->priority` to the identity's class on egress (`shape_rx` on an
//! upstream socket: the upload; `shape_tx` on a client socket: the download). An HTB with the
//! agent's major (`ca:`) on the device the packets leave by then queues them in the class.
//! [`Dataplane::shape_proxy_device`] installs that HTB on a device and mirrors every class of
//! both directions onto it (the classes' minors are allocated per direction, so the two
//! directions' classes take disjoint minors there: see its docs). Measured
//! (`e2e_proxy_kernel::a_20_mbit_rate_holds_in_each_direction`, real TCP over a veth, 3 s after
//! 1 s of slow start): 20 Mbit/s held as goodput 0.962 × the rate on an upstream socket's
//! upload and 0.963 × on a client socket's download (IP bytes 0.997 / 0.998 ×; the TCP
//! ceiling is 1448/1500 = 0.965), as the tunnel's HTB holds it. Why an HTB on the device and
//! not an IFB: an IFB drops packets redirected from a device's egress that were made on this
//! host (`ifb_xmit` wants `skb_iif`, which locally made packets do not have), and the socket
//! programs cannot redirect anyway.
//!
//! ## Counters
//! `CAPY_SOCK_CNT` (pinned, per CPU): one slot per verdict of the socket programs
//! (`capybara_common::sock::SOCK_COUNTER_NAMES`), read by [`Dataplane::sock_counters`].

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, cgroup_skb::CgroupSkbLink},
};
use capybara_common::{
    counters::Counter,
    maps::{self as names, PROG_SOCK_EGRESS, PROG_SOCK_INGRESS},
    peer::{MAX_PEERS, PeerId},
    sock::{
        SOCK_COUNTER_NAMES, SOCK_COUNTER_SLOTS, SOCK_ROLE_CLIENT, SOCK_ROLE_UPSTREAM, SockBinding,
    },
};

use super::{Dataplane, DataplaneError, Result, map_err, sys, sys_err};
use crate::proxy::{Kernel, SocketRole};

/// The socket maps of a loaded dataplane.
pub(super) struct SockMaps {
    /// `CAPY_SOCK_BIND` (socket storage), shared with every [`SocketBinder`].
    bind: Arc<OwnedFd>,
    /// The map as loaded: its fd is the one the programs' instructions name until they are
    /// loaded, so it stays open as long as the object.
    _bind_data: MapData,
    /// `CAPY_SOCK_CNT`.
    counters: PerCpuArray<MapData, Counter>,
}

impl SockMaps {
    pub(super) fn open(ebpf: &mut aya::Ebpf) -> Result<SockMaps> {
        let bind = match ebpf.take_map(names::SOCK_BIND) {
            Some(Map::SkStorage(d)) => d,
            _ => {
                return Err(DataplaneError::MapMissing {
                    map: names::SOCK_BIND,
                });
            }
        };
        let fd = bind
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(sys_err(names::SOCK_BIND, "dup fd"))?;
        let counters = ebpf
            .take_map(names::SOCK_COUNTERS)
            .ok_or(DataplaneError::MapMissing {
                map: names::SOCK_COUNTERS,
            })?;
        let counters =
            PerCpuArray::try_from(counters).map_err(map_err(names::SOCK_COUNTERS, "open"))?;
        Ok(SockMaps {
            bind: Arc::new(fd),
            _bind_data: bind,
            counters,
        })
    }
}

/// Binds sockets to identities ([`crate::proxy::Kernel`]): a handle on the dataplane's socket
/// map, usable from any task without the dataplane's lock.
#[derive(Clone, Debug)]
pub struct SocketBinder {
    map: Arc<OwnedFd>,
}

impl SocketBinder {
    /// Binds socket `fd` to identity `id` in `role`: from its next packet on, the socket
    /// programs apply the identity's policy to it (see the module docs). Binding again replaces
    /// the binding. `id` must be below [`MAX_PEERS`]; `fd` must be a TCP or UDP socket.
    pub fn bind_socket(&self, fd: BorrowedFd<'_>, id: PeerId, role: SocketRole) -> io::Result<()> {
        if id >= MAX_PEERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("id: {id} is beyond the peer table (ids 0..{MAX_PEERS})"),
            ));
        }
        let value = SockBinding {
            peer: id,
            role: match role {
                SocketRole::Client => SOCK_ROLE_CLIENT,
                SocketRole::Upstream => SOCK_ROLE_UPSTREAM,
            },
        };
        let key: i32 = fd.as_raw_fd();
        sys::update_elem(self.map.as_fd(), &key, &value, 0).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "binding socket fd {key} to identity {id} in {}: {e}",
                    names::SOCK_BIND
                ),
            )
        })
    }

    /// Unbinds socket `fd`: from its next packet on, the programs pass it untouched (an
    /// endpoint cutting a connection unbinds its sockets so that the reset it sends passes a
    /// held user's gate). Unbinding an unbound socket is no error.
    pub fn unbind_socket(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let key: i32 = fd.as_raw_fd();
        sys::delete_elem(self.map.as_fd(), &key)
            .map(|_| ())
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("unbinding socket fd {key} in {}: {e}", names::SOCK_BIND),
                )
            })
    }

    /// The identity and role socket `fd` is bound to, if any.
    pub fn binding(&self, fd: BorrowedFd<'_>) -> io::Result<Option<(PeerId, SocketRole)>> {
        let key: i32 = fd.as_raw_fd();
        let b: Option<SockBinding> = sys::lookup_elem(self.map.as_fd(), &key)?;
        Ok(b.and_then(|b| match b.role {
            SOCK_ROLE_CLIENT => Some((b.peer, SocketRole::Client)),
            SOCK_ROLE_UPSTREAM => Some((b.peer, SocketRole::Upstream)),
            _ => None,
        }))
    }
}

impl Kernel for SocketBinder {
    fn bind(&self, fd: BorrowedFd<'_>, id: PeerId, role: SocketRole) -> io::Result<()> {
        self.bind_socket(fd, id, role)
    }
    fn unbind(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.unbind_socket(fd)
    }
}

/// The dataplane behind the service's mutex binds sockets too (without holding the lock).
impl Kernel for Mutex<Dataplane> {
    fn bind(&self, fd: BorrowedFd<'_>, id: PeerId, role: SocketRole) -> io::Result<()> {
        let binder = self.lock().unwrap().socket_binder();
        binder.bind_socket(fd, id, role)
    }
    fn unbind(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let binder = self.lock().unwrap().socket_binder();
        binder.unbind_socket(fd)
    }
}

/// The cgroup v2 directory this process runs in: the cgroup2 mount (from `/proc/mounts`)
/// joined with the path of the `0::` line of `/proc/self/cgroup`.
pub fn own_cgroup() -> Result<PathBuf> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|source| DataplaneError::Cgroup {
            path: PathBuf::from(p),
            problem: "cannot read it",
            source: Some(source),
        })
    };
    let mounts = read("/proc/mounts")?;
    let own = read("/proc/self/cgroup")?;
    cgroup_dir(&mounts, &own).ok_or(DataplaneError::Cgroup {
        path: PathBuf::from("/proc/self/cgroup"),
        problem: "no cgroup v2 mount or no `0::` line (the socket programs need cgroup v2)",
        source: None,
    })
}

/// [`own_cgroup`], or when this mount namespace has no cgroup2 mount (`ip netns exec`
/// remounts `/sys` without one), the same directory under the hierarchy mounted at `fallback`
/// (made, and mounted once; the hierarchy is the system's one, so the attachment is the same).
/// Returns the directory and whether it mounted `fallback` (the caller unmounts it when done:
/// the programs' links hold the cgroup, not the mount).
pub fn own_cgroup_or_mount(fallback: &Path) -> Result<(PathBuf, bool)> {
    match own_cgroup() {
        Ok(dir) => Ok((dir, false)),
        Err(e) => {
            let err = |problem: &'static str, source: std::io::Error| DataplaneError::Cgroup {
                path: fallback.to_owned(),
                problem,
                source: Some(source),
            };
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .map_err(|s| err("cannot read /proc/self/cgroup", s))?;
            let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
                return Err(e);
            };
            std::fs::create_dir_all(fallback).map_err(|s| err("cannot create it", s))?;
            let mounted = std::fs::read_to_string("/proc/mounts")
                .is_ok_and(|m| cgroup_dir(&m, "0::/").is_some_and(|d| d == fallback));
            if !mounted {
                nix::mount::mount(
                    Some("cgroup2"),
                    fallback,
                    Some("cgroup2"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    None::<&str>,
                )
                .map_err(|s| err("cannot mount cgroup2 on it", s.into()))?;
                tracing::info!(dir = %fallback.display(), "no cgroup2 mount in this namespace: mounted one for the socket programs");
            }
            Ok((fallback.join(path.trim().trim_start_matches('/')), !mounted))
        }
    }
}

/// [`own_cgroup`] from the two files' contents.
fn cgroup_dir(mounts: &str, own: &str) -> Option<PathBuf> {
    let mount = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(path.trim().trim_start_matches('/')))
}

/// Where the socket programs were attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAttachment {
    /// The cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The programs, egress then ingress.
    pub progs: [&'static str; 2],
}

impl Dataplane {
    /// A handle that binds sockets to identities ([`crate::proxy::Kernel`]).
    pub fn socket_binder(&self) -> SocketBinder {
        SocketBinder {
            map: Arc::clone(&self.sockets.bind),
        }
    }

    /// Attaches the socket programs to cgroup v2 directory `cgroup` (usually [`own_cgroup`]),
    /// as multi-attach BPF links; the links are held by this dataplane (see the module docs).
    /// Attaching again to the same cgroup is a no-op.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<SocketAttachment> {
        let attachment = SocketAttachment {
            cgroup: cgroup.to_path_buf(),
            progs: [PROG_SOCK_EGRESS, PROG_SOCK_INGRESS],
        };
        if self.sock_links.iter().any(|(c, _)| c == cgroup) {
            return Ok(attachment);
        }
        let dir = std::fs::File::open(cgroup).map_err(|source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            problem: "cannot open it",
            source: Some(source),
        })?;
        let mut links = Vec::with_capacity(2);
        for (name, at) in [
            (PROG_SOCK_EGRESS, CgroupSkbAttachType::Egress),
            (PROG_SOCK_INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let ifname = cgroup.display().to_string();
            let prog: &mut CgroupSkb = self
                .ebpf
                .program_mut(name)
                .ok_or(DataplaneError::ProgramMissing { prog: name })?
                .try_into()
                .map_err(|_| DataplaneError::ProgramMissing { prog: name })?;
            if prog.fd().is_err() {
                prog.load().map_err(|e| DataplaneError::Program {
                    prog: name,
                    ifname: String::new(),
                    op: "load",
                    source: Box::new(e),
                })?;
            }
            let prog_err = |op: &'static str| {
                let ifname = ifname.clone();
                move |e| DataplaneError::Program {
                    prog: name,
                    ifname,
                    op,
                    source: Box::new(e),
                }
            };
            // A BPF link (aya makes one on kernels ≥ 5.7): links on a cgroup always run beside
            // the cgroup's other programs (multi-attach); `BPF_LINK_CREATE` refuses any flag,
            // so the mode is the flag-less `Single`.
            let id = prog
                .attach(&dir, at, CgroupAttachMode::Single)
                .map_err(prog_err("attach"))?;
            links.push(prog.take_link(id).map_err(prog_err("take link"))?);
            tracing::info!(prog = name, cgroup = %cgroup.display(), "program attached");
        }
        self.sock_links.push((cgroup.to_path_buf(), links));
        Ok(attachment)
    }

    /// Detaches the socket programs from every cgroup (also done by [`Dataplane::detach`] and
    /// when the dataplane is dropped).
    pub fn detach_sockets(&mut self) {
        for (cgroup, _) in self.sock_links.drain(..) {
            tracing::info!(cgroup = %cgroup.display(), "socket programs detached");
        }
    }

    /// The cgroups the socket programs are attached to.
    pub fn socket_cgroups(&self) -> Vec<PathBuf> {
        self.sock_links.iter().map(|(c, _)| c.clone()).collect()
    }

    /// The socket programs' verdict counters by name (`SOCK_COUNTER_NAMES`), summed over CPUs.
    pub fn sock_counters(&self) -> Result<Vec<(&'static str, Counter)>> {
        let mut out = Vec::with_capacity(SOCK_COUNTER_NAMES.len());
        for (slot, name) in SOCK_COUNTER_NAMES {
            debug_assert!(slot < SOCK_COUNTER_SLOTS);
            let per_cpu = self
                .sockets
                .counters
                .get(&slot, 0)
                .map_err(map_err(names::SOCK_COUNTERS, "read"))?;
            let mut sum = Counter::default();
            for c in per_cpu.iter() {
                sum.add(c);
            }
            out.push((name, sum));
        }
        Ok(out)
    }
}

/// Links of the socket programs on one cgroup (dropping them detaches).
pub(super) type CgroupLinks = (PathBuf, Vec<CgroupSkbLink>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_cgroup_is_found_under_the_cgroup2_mount() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let own = "4:memory:/x\n0::/\n";
        assert_eq!(
            cgroup_dir(mounts, own),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let own = "0::/system.slice/capybara.service\n";
        assert_eq!(
            cgroup_dir("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", own),
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/capybara.service"
            ))
        );
        assert_eq!(cgroup_dir("cgroup /c cgroup rw 0 0\n", "0::/\n"), None);
        assert_eq!(cgroup_dir(mounts, "4:memory:/x\n"), None);
    }
}
