//! [`TunWire`]: the server's tunnel device without WireGuard.
//!
//! A TUN device (`IFF_TUN | IFF_NO_PI`: raw IPv4/IPv6 packets, no Ethernet header) in namespace A
//! — where the agent's tunnel device would be — and one in namespace B — the peer — joined by a
//! userspace forwarder thread that copies every packet both ways. What the peer sends is written
//! into A's device, so it passes A's TC **ingress**, exactly as boringtun writes decrypted packets;
//! what A routes to the peer leaves through A's TC **egress** and is read from A's device, exactly
//! as boringtun reads packets to encrypt. Dropping the wire stops the forwarder and closes both
//! devices (which removes them).

use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::netns::{NetNs, unique_name};

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, and the rest of the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(size_of::<IfReqFlags>() == 40);

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, IfReqFlags);

/// Opens `/dev/net/tun` and creates the TUN device `name` in the calling thread's namespace.
fn open_tun(name: &str) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("cannot open /dev/net/tun: {e}"));
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    assert!(name.len() < libc::IFNAMSIZ, "TUN name {name:?} too long");
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a live, fully initialised
    // `struct ifreq`-sized buffer that TUNSETIFF reads (and may write the name back into).
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }
        .unwrap_or_else(|e| panic!("TUNSETIFF {name}: {e}"));
    file
}

/// Addresses on the two ends of a [`TunWire`].
#[derive(Clone, Debug)]
pub struct TunEnd {
    /// The TUN device's name (in its namespace).
    pub ifname: String,
    /// IPv4 address (`/24` on the device).
    pub v4: Ipv4Addr,
    /// IPv6 address (ULA, `/64` on the device).
    pub v6: Ipv6Addr,
}

/// Two TUN devices in two namespaces joined by a forwarder thread. See the module docs.
pub struct TunWire {
    /// The server's device (namespace A): the device under test.
    pub a: TunEnd,
    /// The peer's device (namespace B).
    pub b: TunEnd,
    stop: Arc<AtomicBool>,
    forwarded_ab: Arc<AtomicU64>,
    forwarded_ba: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TunWire {
    /// Creates the devices, addresses them (`10.<net>.0.1/24`, `fd00:<net>::1/64` on A; `…2` on
    /// B), brings them up and starts the forwarder.
    ///
    /// IPv6 addresses skip DAD and the devices get no link-local address (`addrgenmode none`),
    /// so the kernel sends as little traffic of its own over them as it can; what it still sends
    /// (MLD reports for the solicited-node groups) goes to multicast addresses of no peer.
    pub fn new(ns_a: &NetNs, ns_b: &NetNs, net: u8) -> Self {
        let a = TunEnd {
            ifname: unique_name("ta"),
            v4: Ipv4Addr::new(10, net, 0, 1),
            v6: format!("fd00:{net:x}::1").parse().unwrap(),
        };
        let b = TunEnd {
            ifname: unique_name("tb"),
            v4: Ipv4Addr::new(10, net, 0, 2),
            v6: format!("fd00:{net:x}::2").parse().unwrap(),
        };
        let fa = ns_a.run(|| open_tun(&a.ifname));
        let fb = ns_b.run(|| open_tun(&b.ifname));
        for (ns, end) in [(ns_a, &a), (ns_b, &b)] {
            ns.exec(&["ip", "link", "set", &end.ifname, "addrgenmode", "none"]);
            ns.add_addr(&end.ifname, &format!("{}/24", end.v4));
            ns.add_addr(&end.ifname, &format!("{}/64", end.v6));
            ns.exec(&["ip", "link", "set", &end.ifname, "up"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded_ab = Arc::new(AtomicU64::new(0));
        let forwarded_ba = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, ab, ba) = (stop.clone(), forwarded_ab.clone(), forwarded_ba.clone());
            std::thread::Builder::new()
                .name("tunwire".into())
                .spawn(move || forward(fa, fb, &stop, &ab, &ba))
                .unwrap()
        };
        TunWire {
            a,
            b,
            stop,
            forwarded_ab,
            forwarded_ba,
            thread: Some(thread),
        }
    }

    /// Packets the forwarder copied from A's device to B's (i.e. that left A through TC egress).
    pub fn forwarded_a_to_b(&self) -> u64 {
        self.forwarded_ab.load(Ordering::Relaxed)
    }

    /// Packets the forwarder copied from B's device into A's (i.e. that met A's TC ingress).
    pub fn forwarded_b_to_a(&self) -> u64 {
        self.forwarded_ba.load(Ordering::Relaxed)
    }
}

/// Copies packets between the two devices until `stop` is set.
fn forward(mut fa: File, mut fb: File, stop: &AtomicBool, ab: &AtomicU64, ba: &AtomicU64) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (ra, rb) = {
            let mut fds = [
                PollFd::new(fa.as_fd(), PollFlags::POLLIN),
                PollFd::new(fb.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(50u8)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("tunwire poll: {e}"),
            }
            let ready = |f: &PollFd<'_>| {
                f.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP)
                })
            };
            (ready(&fds[0]), ready(&fds[1]))
        };
        if ra {
            copy_one(&mut fa, &mut fb, &mut buf, ab);
        }
        if rb {
            copy_one(&mut fb, &mut fa, &mut buf, ba);
        }
    }
}

/// Reads one packet from `from` and writes it to `to`.
fn copy_one(from: &mut File, to: &mut File, buf: &mut [u8], counter: &AtomicU64) {
    let n = match from.read(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
            return;
        }
        Err(e) => panic!("tunwire read: {e}"),
    };
    match to.write(&buf[..n]) {
        // One write is one packet: the TUN driver takes it whole or refuses it.
        Ok(w) if w == n => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(w) => eprintln!("tunwire: short write of {w} of {n} bytes"),
        // A packet the other side's stack refuses (e.g. device down) is lost as on a real link.
        Err(e) => eprintln!("tunwire: write of {n} bytes failed: {e}"),
    }
}

impl Drop for TunWire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The forwarder owns both descriptors; closing them (when it returns) removes the
            // non-persistent devices. A forwarder panic is reported by the join, not re-raised
            // here (we may already be unwinding).
            if t.join().is_err() {
                eprintln!("tunwire: forwarder thread panicked");
            }
        }
    }
}
