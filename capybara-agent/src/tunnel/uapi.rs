//! The cross-platform userspace WireGuard control protocol (UAPI): a Unix socket at
//! `<dir>/<iface>.sock` (`paths::WG_UAPI_DIR` = `/var/run/wireguard`, which is where `wg`
//! looks), so that `wg show <iface>` and `wg showconf <iface>` work on the agent's tunnel.
//!
//! Only `get=1` is served: the agent's peers are changed through its API (which records them
//! in the store and the audit trail), so `set=1` answers `errno=95` (EOPNOTSUPP) and changes
//! nothing. `last_handshake_time_sec`/`_nsec` are the wall-clock time of the last completed
//! handshake (what the kernel reports), not boringtun's "time since".
//!
//! The socket is mode 0600 in a 0755 directory (what wireguard-go does); it carries the private
//! key, as the kernel's `wg showconf` does, to root only.
//!
//! Requests are read with bounded memory and time (issue 19): a line is at most [`MAX_LINE`]
//! bytes, a connection gets 10 s in all (requests are answered inline on the socket's one
//! thread), and bytes that are not UTF-8 are an unknown request, which ends the connection.
//! `answer` is public for the `uapi` fuzz target.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    os::{
        fd::AsFd as _,
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::Weak,
    time::{Duration, UNIX_EPOCH},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{keys::PrivateKey, peers::PeerStatus};
use crate::paths;

/// What `get=1` reports, as the tunnel gives it: the socket sees the tunnel only through this
/// trait (implemented by the threads' shared state), so this module does not depend on the
/// tunnel's internals.
pub(super) trait Interface {
    /// The server's private key (`private_key=`).
    fn private_key(&self) -> &PrivateKey;
    /// The bound UDP port (`listen_port=`).
    fn listen_port(&self) -> u16;
    /// Every peer's live state, sorted by key.
    fn peers(&self) -> Vec<PeerStatus>;
}

/// Errors creating the UAPI socket.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// Creating the directory or binding the socket failed.
    #[error("UAPI socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket (a second agent or wireguard-go with this interface
    /// name).
    #[error("UAPI socket {} is in use by another process", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
}

/// The `get=1` answer (without the final `errno=0` and blank line).
pub fn format_get(private_key: &PrivateKey, listen_port: u16, peers: &[PeerStatus]) -> String {
    let mut s = String::with_capacity(256 + peers.len() * 256);
    let _ = writeln!(s, "private_key={}", private_key.to_hex());
    let _ = writeln!(s, "listen_port={listen_port}");
    for p in peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", psk.to_hex());
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for net in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s
}

/// The listening socket; the file is removed on drop.
pub(super) struct UapiSocket {
    pub(super) listener: UnixListener,
    path: PathBuf,
}

impl UapiSocket {
    /// Binds `<dir>/<iface>.sock`, replacing a stale socket file nobody answers on.
    pub(super) fn bind(dir: &Path, iface: &str) -> Result<UapiSocket, UapiError> {
        let path = paths::uapi_socket(dir, iface);
        let err = |source| UapiError::Bind {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode(paths::WG_UAPI_DIR_MODE),
        )
        .map_err(err)?;
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(UapiError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(err)?;
        }
        let listener = UnixListener::bind(&path).map_err(err)?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(paths::WG_UAPI_SOCKET_MODE),
        )
        .map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(UapiSocket { listener, path })
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves requests until `stop` becomes readable or the tunnel is gone. Runs on its own thread;
/// each request is answered inline (they are small and rare).
pub(super) fn serve(socket: UapiSocket, inner: Weak<impl Interface>, stop: std::io::PipeReader) {
    loop {
        let (ready, stopped) = {
            let mut fds = [
                PollFd::new(socket.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false))
        };
        if stopped {
            return;
        }
        if !ready {
            continue;
        }
        let Ok((stream, _)) = socket.listener.accept() else {
            continue;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let get = || format_get(inner.private_key(), inner.listen_port(), &inner.peers());
        if let Err(e) = handle(&stream, get) {
            tracing::debug!(error = %e, "UAPI request failed");
        }
    }
}

/// The longest line a request may have: the longest the protocol knows is a `public_key=`,
/// `preshared_key=` or `endpoint=` line of under 100 bytes; a longer one closes the connection
/// (it would otherwise grow the agent's memory for as long as a client streams it).
pub const MAX_LINE: usize = 4096;

/// How long one connection may take in all: requests are answered inline on the socket's
/// thread, so a client sending a byte at a time must not hold it past this.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Answers the requests on one connection, with the per-read timeouts and the connection's
/// deadline (see [`answer`]).
fn handle(stream: &UnixStream, get: impl Fn() -> String) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let deadline = std::time::Instant::now() + CONNECTION_DEADLINE;
    answer(BufReader::new(stream), stream, get, || {
        std::time::Instant::now() < deadline
    })
}

/// Answers the requests read from `reader` on `writer`: `get=1` with `get()` and `errno=0`,
/// `set=1` with `errno=95`; anything else, a line over [`MAX_LINE`] bytes, or `in_time()`
/// turning false ends the conversation. Memory is bounded by [`MAX_LINE`] whatever the input;
/// public so that the fuzz target drives the parser of this outside input.
pub fn answer(
    mut reader: impl BufRead,
    mut writer: impl std::io::Write,
    get: impl Fn() -> String,
    in_time: impl Fn() -> bool,
) -> std::io::Result<()> {
    // Bytes, not a String: a line that is not UTF-8 is an unknown request, not an I/O error.
    let mut line = Vec::new();
    let mut next_line = |line: &mut Vec<u8>| -> std::io::Result<bool> {
        use std::io::Read as _;
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', line)?;
        Ok(n > 0 && n <= MAX_LINE && in_time())
    };
    loop {
        if !next_line(&mut line)? {
            return Ok(());
        }
        let op = line.trim_ascii_end().to_owned();
        // Skip the rest of the request up to its blank line.
        loop {
            if !next_line(&mut line)? {
                if line.is_empty() {
                    break;
                }
                return Ok(());
            }
            if line.trim_ascii_end().is_empty() {
                break;
            }
        }
        let answer = match &op[..] {
            b"get=1" => {
                let mut s = get();
                s.push_str("errno=0\n\n");
                s
            }
            b"set=1" => "errno=95\n\n".to_owned(),
            _ => return Ok(()),
        };
        writer.write_all(answer.as_bytes())?;
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use std::io::Write as _;

    use super::*;
    use crate::tunnel::keys::{PresharedKey, PublicKey};

    #[test]
    fn the_socket_answers_get_and_refuses_set() {
        use std::io::Read as _;
        let (server, mut client) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || handle(&server, || "listen_port=7\n".to_owned()));
        client
            .write_all(b"get=1\n\nset=1\nprivate_key=00\n\nget=1\n\n")
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(
            out,
            "listen_port=7\nerrno=0\n\nerrno=95\n\nlisten_port=7\nerrno=0\n\n"
        );
    }

    #[test]
    fn an_endless_line_is_not_kept_and_ends_the_connection() {
        use std::io::Read as _;
        // A client streaming one line with no newline: the reader takes at most MAX_LINE + 1
        // bytes of it, answers nothing and ends the conversation.
        let endless = std::io::repeat(b'a');
        let read = std::cell::Cell::new(0usize);
        struct Counting<'a, R>(R, &'a std::cell::Cell<usize>);
        impl<R: std::io::Read> std::io::Read for Counting<'_, R> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let len = buf.len().min(512);
                let n = self.0.read(&mut buf[..len])?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let reader = BufReader::with_capacity(512, Counting(endless.take(1 << 30), &read));
        answer(reader, &mut out, || "x".to_owned(), || true).unwrap();
        assert!(out.is_empty());
        assert!(read.get() <= MAX_LINE + 512, "read {} bytes", read.get());
        // A skipped line over the cap ends it too, with no answer.
        let mut req = b"get=1\n".to_vec();
        req.extend(std::iter::repeat_n(b'b', MAX_LINE + 1));
        req.extend(b"\n\n");
        let mut out = Vec::new();
        answer(&req[..], &mut out, || "x".to_owned(), || true).unwrap();
        assert!(out.is_empty());
        // Past the connection's deadline nothing more is answered.
        let mut out = Vec::new();
        answer(&b"get=1\n\n"[..], &mut out, || "x".to_owned(), || false).unwrap();
        assert!(out.is_empty());
        // A line of exactly MAX_LINE bytes (newline included) is still read.
        let mut req = b"get=1\n".to_vec();
        req.extend(std::iter::repeat_n(b'c', MAX_LINE - 1));
        req.extend(b"\n\n");
        let mut out = Vec::new();
        answer(&req[..], &mut out, || "x=1\n".to_owned(), || true).unwrap();
        assert_eq!(out, b"x=1\nerrno=0\n\n");
    }

    #[test]
    fn get_reports_wall_clock_handshake_and_counters() {
        let sk: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        let pk = PublicKey::from_bytes([0xab; 32]);
        let at = UNIX_EPOCH + Duration::new(1_790_000_000, 123_456_789);
        let peers = vec![
            PeerStatus {
                public_key: pk,
                preshared_key: Some(PresharedKey::from_bytes([1; 32])),
                endpoint: Some("[fd00:1::2]:40000".parse().unwrap()),
                last_handshake: Some(at),
                rx_bytes: 1000,
                tx_bytes: 2000,
                persistent_keepalive: Some(25),
                allowed_ips: vec![
                    "10.99.0.2/32".parse().unwrap(),
                    "fd99::2/128".parse().unwrap(),
                ],
                connected: true,
            },
            PeerStatus {
                public_key: PublicKey::from_bytes([0xcd; 32]),
                preshared_key: None,
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
                allowed_ips: vec![],
                connected: false,
            },
        ];
        let s = format_get(&sk, 51820, &peers);
        let expect = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={ab}\npreshared_key={one}\nprotocol_version=1\n\
             endpoint=[fd00:1::2]:40000\n\
             last_handshake_time_sec=1790000000\nlast_handshake_time_nsec=123456789\n\
             tx_bytes=2000\nrx_bytes=1000\npersistent_keepalive_interval=25\n\
             allowed_ip=10.99.0.2/32\nallowed_ip=fd99::2/128\n\
             public_key={cd}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n",
            sk.to_hex(),
            ab = "ab".repeat(32),
            one = "01".repeat(32),
            cd = "cd".repeat(32),
        );
        assert_eq!(s, expect);
        // A handshake a moment ago is reported as a timestamp near now, not as "seconds since".
        let now = SystemTime::now();
        let mut p = peers[0].clone();
        p.last_handshake = Some(now);
        let s = format_get(&sk, 1, &[p]);
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(
            s.contains(&format!("last_handshake_time_sec={secs}\n")),
            "{s}"
        );
    }
}
