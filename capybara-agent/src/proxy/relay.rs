//! Serving an authenticated connection ([`proxy`], both endpoints' tail): connecting upstream,
//! relaying both ways, aborting a cut one.
//!
//! The upstream socket is made and bound to the identity ([`super::Kernel::bind`]) before
//! `connect`, so the kernel sees its first packet as the user's (flow limit, destination lists,
//! quota). [`relay`] then copies both ways until either side closes or the connection is cut,
//! counting what it moved for the session's record.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use capybara_common::peer::PeerId;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream, UdpSocket},
};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, Kernel, SocketRole, Target};

/// How long connecting to a destination may take (each of its addresses).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The relay's buffer per direction. 64 KiB: a TLS record or a Shadowsocks chunk (≤ 16 KiB of
/// payload) never needs two reads, and a bulk transfer moves a GSO super-packet per call.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// The addresses of `target`: itself, or what its domain resolves to.
pub async fn resolve(target: &Target) -> io::Result<Vec<SocketAddr>> {
    match target {
        Target::Addr(a) => Ok(vec![*a]),
        Target::Domain(host, port) => Ok(tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .collect()),
    }
}

/// Resolves `target` and connects to its first address that answers, from a socket bound to
/// `id` as [`SocketRole::Upstream`] before it sends anything.
pub async fn connect_upstream(
    target: &Target,
    id: PeerId,
    kernel: &dyn Kernel,
) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{target}: no address"));
    for addr in resolve(target).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;
        kernel.bind(socket.as_fd(), id, SocketRole::Upstream)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: timed out")),
        }
    }
    Err(last)
}

/// A UDP socket of `family`'s address (the family of `like`) on an ephemeral port, bound to `id`
/// as [`SocketRole::Upstream`] before it sends anything: the upstream socket of proxied
/// datagrams. The kernel sees each datagram it sends and receives as the user's, as it sees a
/// TCP upstream socket's segments (counted, charged, destination lists per datagram, a flow per
/// destination).
pub async fn udp_upstream(
    like: SocketAddr,
    id: PeerId,
    kernel: &dyn Kernel,
) -> io::Result<UdpSocket> {
    let any: SocketAddr = if like.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).await?;
    kernel.bind(socket.as_fd(), id, SocketRole::Upstream)?;
    Ok(socket)
}

/// Resolves `target` and connects a [`udp_upstream`] socket to its first address (UDP's
/// `connect` sends nothing: it fixes the peer, so only the target's datagrams are received).
pub async fn connect_udp(
    target: &Target,
    id: PeerId,
    kernel: &dyn Kernel,
) -> io::Result<UdpSocket> {
    let addr =
        resolve(target).await?.into_iter().next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{target}: no address"))
        })?;
    let socket = udp_upstream(addr, id, kernel).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// What a relay moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Bytes from the user (read from the client side, written upstream).
    pub rx_bytes: u64,
    /// Bytes to the user (read from upstream, written to the client side).
    pub tx_bytes: u64,
}

/// Relays between the client side (the protocol's decrypted stream) and `upstream` until both
/// directions are done, one fails, or `cut` fires. Returns what moved and why it ended; a cut
/// connection's sockets are then the caller's to [`abort`].
pub async fn relay<C>(
    client: C,
    upstream: &mut TcpStream,
    cut: &CancellationToken,
) -> (Moved, CloseReason)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let rx = Arc::new(AtomicU64::new(0));
    let tx = Arc::new(AtomicU64::new(0));
    let mut client = Counting {
        inner: client,
        read: Arc::clone(&rx),
        written: Arc::clone(&tx),
    };
    let reason = tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(
            &mut client, upstream, RELAY_BUFFER, RELAY_BUFFER,
        ) => CloseReason::Closed,
        () = cut.cancelled() => CloseReason::Cut,
    };
    let moved = Moved {
        rx_bytes: rx.load(Ordering::Relaxed),
        tx_bytes: tx.load(Ordering::Relaxed),
    };
    (moved, reason)
}

/// The longest datagram a stream of length-prefixed datagrams carries (its 2-byte length).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Relays datagrams between the client side, a stream of length-prefixed datagrams (each a
/// 2-byte big-endian length and that many bytes, both ways: VLESS's UDP framing; `head` is what
/// the stream carried past the header, the start of that framing), and `upstream`, a connected
/// UDP socket, until the client's stream ends or fails, or `cut` fires. An `ECONNREFUSED` on
/// the socket (an ICMP port unreachable for an earlier datagram) does not end it: UDP has no
/// connection to lose. Counts the datagrams' payload, not their lengths.
pub async fn relay_datagrams<C>(
    client: C,
    head: &[u8],
    upstream: &UdpSocket,
    cut: &CancellationToken,
) -> (Moved, CloseReason)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let mut moved = Moved::default();
    let rx = &mut moved.rx_bytes;
    let tx = &mut moved.tx_bytes;
    let upload = async {
        let mut buf: Vec<u8> = head.to_vec();
        let mut chunk = vec![0u8; RELAY_BUFFER];
        loop {
            let mut at = 0;
            while let Some(len) = buf
                .get(at..at + 2)
                .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
            {
                let Some(datagram) = buf.get(at + 2..at + 2 + len) else {
                    break;
                };
                match upstream.send(datagram).await {
                    Ok(_) => *rx += len as u64,
                    // Refused by an earlier ICMP, or dropped by the kernel (`EPERM`: the
                    // user's quota, lists, flow limit): the datagram is lost, as UDP's are.
                    Err(e) if udp_lost(&e) => {}
                    Err(e) => return e,
                }
                at += 2 + len;
            }
            buf.drain(..at);
            match from_client.read(&mut chunk).await {
                Ok(0) => return io::Error::from(io::ErrorKind::UnexpectedEof),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return e,
            }
        }
    };
    let download = async {
        let mut frame = vec![0u8; 2 + MAX_DATAGRAM];
        loop {
            let n = match upstream.recv(&mut frame[2..]).await {
                Ok(n) => n,
                Err(e) if udp_lost(&e) => continue,
                Err(e) => return e,
            };
            frame[..2].copy_from_slice(&(n as u16).to_be_bytes());
            if let Err(e) = async {
                to_client.write_all(&frame[..2 + n]).await?;
                to_client.flush().await
            }
            .await
            {
                return e;
            }
            *tx += n as u64;
        }
    };
    let reason = tokio::select! {
        _ = upload => CloseReason::Closed,
        _ = download => CloseReason::Closed,
        () = cut.cancelled() => CloseReason::Cut,
    };
    (moved, reason)
}

/// Whether a UDP socket's error loses one datagram rather than ending the relay.
fn udp_lost(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EPERM
                | libc::ENOBUFS
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

/// What the client side of a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// A TCP stream to the target.
    Stream,
    /// Length-prefixed UDP datagrams to and from the target ([`relay_datagrams`]).
    Datagrams,
}

/// An authenticated, admitted connection, as an endpoint hands it to [`proxy`].
pub struct Accepted<C> {
    /// Whose.
    pub identity: super::Identity,
    /// The client's address.
    pub source: SocketAddr,
    /// Where it goes.
    pub target: Target,
    /// What it carries.
    pub carried: Carried,
    /// The client side: the protocol's decrypted stream.
    pub client: C,
}

/// The upstream side of a connection.
enum Upstream {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Upstream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Upstream::Tcp(s) => s.as_fd(),
            Upstream::Udp(s) => s.as_fd(),
        }
    }
}

/// An authenticated, admitted connection as both endpoints serve it: registered (the
/// [`super::ProxyEvent::Opened`] report), connected upstream (bound before `connect`: a TCP
/// stream, or a UDP socket for [`Carried::Datagrams`]), its client socket bound, then `reply`
/// written to the client and `head` (what the header carried past itself) sent upstream,
/// relayed until either side ends or it is cut (a cut one is [`abort`]ed, and so is one whose
/// `stop` fires: the agent stopping), and the [`super::ProxyEvent::Closed`] report with the
/// bytes moved. `client_fd` gives the client stream's socket.
pub async fn proxy<C>(
    hub: &super::Hub,
    accepted: Accepted<C>,
    client_fd: impl for<'a> Fn(&'a C) -> BorrowedFd<'a>,
    (reply, head): (&[u8], &[u8]),
    stop: Option<&CancellationToken>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;

    let Accepted {
        identity,
        source,
        target,
        carried,
        mut client,
    } = accepted;
    let protocol = identity.protocol;
    let conn = Registered::open(hub, &identity, source, &target);
    let kernel = &*hub.kernel;
    let upstream = match carried {
        Carried::Stream => connect_upstream(&target, identity.id, kernel)
            .await
            .map(Upstream::Tcp),
        Carried::Datagrams => connect_udp(&target, identity.id, kernel)
            .await
            .map(Upstream::Udp),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%source, %target, %protocol, error = %e, "proxy: upstream unreachable");
            let _ = client.shutdown().await;
            return conn.close(Moved::default(), CloseReason::Unreachable);
        }
    };
    if let Err(e) = kernel.bind(client_fd(&client), identity.id, SocketRole::Client) {
        // Unbound, the client socket would escape the gate and the shaping: not served.
        tracing::warn!(%source, %protocol, error = %e, "proxy: binding the client socket failed");
        return conn.close(Moved::default(), CloseReason::Closed);
    }
    // The agent stopping cuts the connection as `kick` does.
    let watcher = stop.map(|stop| {
        let (stop, cut) = (stop.clone(), conn.cut().clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => cut.cancel(),
                () = cut.cancelled() => {}
            }
        })
    });
    let replied = async {
        if !reply.is_empty() {
            client.write_all(reply).await?;
            client.flush().await?;
        }
        Ok::<_, io::Error>(())
    };
    let (moved, reason) = match (replied.await, &mut upstream) {
        (Err(_), _) => (Moved::default(), CloseReason::Closed),
        (Ok(()), Upstream::Tcp(upstream)) => match upstream.write_all(head).await {
            Ok(()) => {
                let (mut moved, reason) = relay(&mut client, upstream, conn.cut()).await;
                moved.rx_bytes += head.len() as u64;
                (moved, reason)
            }
            Err(_) => (Moved::default(), CloseReason::Closed),
        },
        (Ok(()), Upstream::Udp(upstream)) => {
            relay_datagrams(&mut client, head, upstream, conn.cut()).await
        }
    };
    if let Some(w) = watcher {
        w.abort();
    }
    if reason == CloseReason::Cut {
        abort(kernel, &[client_fd(&client), upstream.fd()]);
    }
    conn.close(moved, reason);
}

/// A connection in the registry, reported opened ([`super::ProxyEvent::Opened`]); closing it
/// reports its end ([`super::ProxyEvent::Closed`]) and unregisters it. Both endpoints' TCP
/// connections and the Shadowsocks UDP relay's associations are these.
pub struct Registered<'h> {
    hub: &'h super::Hub,
    conn: super::registry::Conn,
    identity: super::Identity,
}

impl<'h> Registered<'h> {
    /// Registers a connection of `identity` from `source` to `target` and reports it opened.
    pub fn open(
        hub: &'h super::Hub,
        identity: &super::Identity,
        source: SocketAddr,
        target: &Target,
    ) -> Registered<'h> {
        use std::time::SystemTime;
        let conn = hub
            .registry
            .open(identity.clone(), source, target.clone(), SystemTime::now());
        hub.events.report(super::ProxyEvent::Opened {
            conn: conn.id(),
            identity: identity.clone(),
            source,
            target: target.clone(),
            at: SystemTime::now(),
        });
        Registered {
            hub,
            conn,
            identity: identity.clone(),
        }
    }

    /// Fires when the connection is cut (`kick`, a hold, a removal).
    pub fn cut(&self) -> &CancellationToken {
        self.conn.cut()
    }

    /// Reports the end, with what moved and why, and unregisters the connection.
    pub fn close(self, moved: Moved, reason: CloseReason) {
        self.hub.events.report(super::ProxyEvent::Closed {
            conn: self.conn.id(),
            identity: self.identity,
            rx_bytes: moved.rx_bytes,
            tx_bytes: moved.tx_bytes,
            reason,
            at: std::time::SystemTime::now(),
        });
    }
}

/// Ends a cut connection's `sockets` at once: each is set to close with a reset
/// (`SO_LINGER` 0: what it had not sent is discarded, nothing more of the user's traffic
/// leaves) and unbound, so that the reset passes even a held user's gate; the caller then
/// drops them. Between the unbinding and the close (microseconds, no await between them) a
/// retransmission could leave uncounted; the client's socket has nothing of the user's to send
/// after the relay stopped. Failures are logged: the sockets are closed anyway.
pub fn abort(kernel: &dyn Kernel, sockets: &[BorrowedFd<'_>]) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for fd in sockets {
        if let Err(e) = setsockopt(fd, Linger, &reset) {
            tracing::warn!(error = %e, "proxy: cannot set a cut socket to reset on close");
        }
        if let Err(e) = kernel.unbind(*fd) {
            tracing::warn!(error = %e, "proxy: cannot unbind a cut socket: its reset may be held");
        }
    }
}

/// A stream that counts what is read from it and written to it.
struct Counting<C> {
    inner: C,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<C: AsyncRead + Unpin> AsyncRead for Counting<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counting<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::RecordingKernel;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    #[tokio::test]
    async fn relays_both_ways_counts_and_stops_when_cut() {
        // An echo server upstream that answers each read doubled.
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = up.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let kernel = RecordingKernel::default();
        let mut upstream = connect_upstream(&Target::Addr(up_addr), 7, &kernel)
            .await
            .unwrap();
        assert_eq!(kernel.binds(), [(7, SocketRole::Upstream)]);

        let (mut user, client_side) = tokio::io::duplex(4096);
        let cut = CancellationToken::new();
        let cut2 = cut.clone();
        let relay = tokio::spawn(async move {
            let r = relay(client_side, &mut upstream, &cut2).await;
            (r, upstream)
        });
        user.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 10];
        user.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hellohello");
        cut.cancel();
        let ((moved, reason), upstream) = relay.await.unwrap();
        assert_eq!(reason, CloseReason::Cut);
        // Aborted: unbound, and closed with a reset the upstream server sees.
        abort(&kernel, &[upstream.as_fd()]);
        assert_eq!(kernel.unbinds(), 1);
        drop(upstream);
        assert_eq!(
            moved,
            Moved {
                rx_bytes: 5,
                tx_bytes: 10
            }
        );
    }

    #[tokio::test]
    async fn an_unreachable_destination_is_an_error() {
        // A port nobody listens on: bind one, learn it, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let kernel = RecordingKernel::default();
        let e = connect_upstream(&Target::Addr(addr), 1, &kernel)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
