//! A minimal rtnetlink client for what the shaper needs and the `netlink-packet-route` crate
//! does not model: HTB qdiscs and classes, fifo leaf qdiscs, IFB links, and class statistics.
//!
//! One request at a time on a socket bound in the namespace it was opened in (the shaper opens
//! it while attaching, on the thread that is inside the tunnel device's namespace, so later
//! calls from any thread act on that namespace). Every request asks for an acknowledgement;
//! the kernel's extended-ack message, when it sends one, becomes part of the error.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Mutex,
};

/// `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// `struct nlattr` header.
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// Dump request (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_ECHO: u16 = 0x8;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// `NLMSGERR_ATTR_MSG`: the extended-ack text.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLA_F_NESTED: u16 = 1 << 15;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_DELQDISC: u16 = 37;
pub const RTM_NEWTCLASS: u16 = 40;
pub const RTM_DELTCLASS: u16 = 41;
pub const RTM_GETTCLASS: u16 = 42;

pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_INFO_KIND: u16 = 1;

pub const TCA_KIND: u16 = 1;
pub const TCA_OPTIONS: u16 = 2;
pub const TCA_STATS2: u16 = 7;
/// `TCA_STATS_QUEUE` inside `TCA_STATS2`: `struct gnet_stats_queue`.
pub const TCA_STATS_QUEUE: u16 = 3;

/// A netlink message being built: header placeholder, fixed body, attributes.
pub struct Msg {
    buf: Vec<u8>,
    ty: u16,
    flags: u16,
}

impl Msg {
    /// A request of type `ty` with `flags` (`NLM_F_REQUEST | NLM_F_ACK` are added) and the fixed
    /// body `body` (`ifinfomsg`, `tcmsg`, …).
    pub fn new(ty: u16, flags: u16, body: &[u8]) -> Msg {
        let mut buf = vec![0; NLMSG_HDRLEN];
        buf.extend_from_slice(body);
        pad(&mut buf);
        Msg { buf, ty, flags }
    }

    /// The message after the `nlmsghdr` (tests).
    #[cfg(test)]
    pub fn body(&self) -> &[u8] {
        &self.buf[NLMSG_HDRLEN..]
    }

    /// Appends attribute `ty` with payload `data`.
    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        pad(&mut self.buf);
        self
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data)
    }

    /// Appends a nested attribute whose members `f` appends.
    pub fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Msg)) -> &mut Msg {
        let start = self.buf.len();
        self.attr(ty | NLA_F_NESTED, &[]);
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// `struct tcmsg`.
pub fn tcmsg(ifindex: u32, handle: u32, parent: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    b[8..12].copy_from_slice(&handle.to_ne_bytes());
    b[12..16].copy_from_slice(&parent.to_ne_bytes());
    b
}

/// `struct ifinfomsg` with `flags`/`change` (e.g. `IFF_UP`).
pub fn ifinfomsg(ifindex: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// Iterates the attributes of `data` as `(type without flags, payload)`.
pub fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & !NLA_F_NESTED;
        if len < NLA_HDRLEN || len > data.len() {
            return None;
        }
        let payload = &data[NLA_HDRLEN..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((ty, payload))
    })
}

/// A route netlink socket. Requests are serialised (a request and its answers hold the lock),
/// so it can be used through `&self` from any thread.
#[derive(Debug)]
pub struct Netlink {
    /// The socket and the last sequence number used.
    inner: Mutex<(OwnedFd, u32)>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a live `c_int` and its size. Extended acks are
        // optional (a kernel without them just sends none), so the result is ignored.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_EXT_ACK,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        Ok(Netlink {
            inner: Mutex::new((fd, 0)),
        })
    }

    /// Sends `msg` and waits for its acknowledgement; returns the messages the kernel sent before
    /// it (their payloads after the `nlmsghdr`), e.g. the answer of a GET or a dump.
    pub fn request(&self, mut msg: Msg) -> io::Result<Vec<Vec<u8>>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.1 = inner.1.wrapping_add(1);
        let (fd, seq) = (inner.0.as_raw_fd(), inner.1);
        let len = msg.buf.len() as u32;
        let flags = msg.flags | NLM_F_REQUEST | NLM_F_ACK;
        msg.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        msg.buf[4..6].copy_from_slice(&msg.ty.to_ne_bytes());
        msg.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        // SAFETY: sends `msg.buf`, a live buffer of `len` bytes, on our socket (to the kernel:
        // no address needed for a netlink socket that was never connected elsewhere).
        let sent = unsafe { libc::send(fd, msg.buf.as_ptr().cast(), msg.buf.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let dump = msg.flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receives into `buf`, a live buffer of `buf.len()` bytes.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let mlen = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let mty = u16::from_ne_bytes([rest[4], rest[5]]);
                let mflags = u16::from_ne_bytes([rest[6], rest[7]]);
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if mlen < NLMSG_HDRLEN || mlen > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &rest[NLMSG_HDRLEN..mlen];
                rest = &rest[mlen.next_multiple_of(4).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                match mty {
                    NLMSG_ERROR => return ack_result(payload, mflags).map(|()| out),
                    // A dump ends with DONE (the kernel sends no acknowledgement after it; one
                    // that does would be skipped by the next request's sequence check).
                    NLMSG_DONE if dump => return Ok(out),
                    _ => out.push(payload.to_vec()),
                }
            }
        }
    }
}

/// The result an `NLMSG_ERROR` carries: 0 = acknowledged; else `-errno`, with the extended-ack
/// text when there is one.
fn ack_result(payload: &[u8], flags: u16) -> io::Result<()> {
    let Some(code) = payload.get(0..4) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink error message",
        ));
    };
    let code = i32::from_ne_bytes(code.try_into().unwrap_or_default());
    if code == 0 {
        return Ok(());
    }
    let errno = io::Error::from_raw_os_error(-code);
    // The original request's header follows the code; with NLM_F_ACK_TLVS the attributes
    // follow the (possibly capped) request.
    let text = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| {
            let orig_len = payload.get(4..8).map_or(0, |b| {
                u32::from_ne_bytes(b.try_into().unwrap_or_default()) as usize
            });
            // NLM_F_CAPPED (0x100): only the original header was echoed.
            let echoed = if flags & 0x100 != 0 {
                NLMSG_HDRLEN
            } else {
                orig_len
            };
            let tlvs = payload.get(4 + echoed..)?;
            attrs(tlvs)
                .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
                .map(|(_, v)| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned())
        })
        .flatten();
    Err(match text {
        Some(t) => io::Error::new(errno.kind(), format!("{errno}: {t}")),
        None => errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_lengths_patched() {
        let mut m = Msg::new(RTM_NEWQDISC, 0, &tcmsg(7, 0xca_0000, u32::MAX));
        m.attr_str(TCA_KIND, "htb").nested(TCA_OPTIONS, |m| {
            m.attr(2, &[1, 2, 3, 4, 5]);
        });
        let body = &m.buf[NLMSG_HDRLEN + 20..];
        let got: Vec<(u16, Vec<u8>)> = attrs(body).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (TCA_KIND, b"htb\0".to_vec()));
        assert_eq!(got[1].0, TCA_OPTIONS);
        let inner: Vec<(u16, Vec<u8>)> = attrs(&got[1].1).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(inner, vec![(2, vec![1, 2, 3, 4, 5])]);
        assert_eq!(m.buf.len() % 4, 0);
    }

    #[test]
    fn errors_carry_the_errno_and_the_extended_ack_text() {
        let mut p = (-libc::EINVAL).to_ne_bytes().to_vec();
        let mut hdr = vec![0u8; NLMSG_HDRLEN];
        hdr[0..4].copy_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        p.extend_from_slice(&hdr);
        let mut m = Msg::new(0, 0, &[]);
        m.buf.clear();
        m.attr_str(NLMSGERR_ATTR_MSG, "Quantum too small");
        p.extend_from_slice(&m.buf);
        let e = ack_result(&p, NLM_F_ACK_TLVS | 0x100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("Quantum too small"), "{e}");
        assert!(ack_result(&0i32.to_ne_bytes(), 0).is_ok());
    }
}
