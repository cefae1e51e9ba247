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
    net::{TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, Kernel, SocketRole, Target};

/// How long connecting to a destination may take (each of its addresses).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The relay's buffer per direction. 64 KiB: a TLS record or a Shadowsocks chunk (≤ 16 KiB of
/// payload) never needs two reads, and a bulk transfer moves a GSO super-packet per call.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Resolves `target` and connects to its first address that answers, from a socket bound to
/// `id` as [`SocketRole::Upstream`] before it sends anything.
pub async fn connect_upstream(
    target: &Target,
    id: PeerId,
    kernel: &dyn Kernel,
) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = match target {
        Target::Addr(a) => vec![*a],
        Target::Domain(host, port) => tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{target}: no address"));
    for addr in addrs {
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

/// An authenticated, admitted connection as both endpoints serve it: registered (the
/// [`super::ProxyEvent::Opened`] report), connected upstream (bound before `connect`), its client
/// socket bound, then `reply` written to the client and `payload` (what the header carried past
/// itself) upstream, relayed until either side ends or it is cut (a cut one is [`abort`]ed,
/// and so is one whose `stop` fires: the agent stopping), and the
/// [`super::ProxyEvent::Closed`] report with the bytes moved. `client_fd` gives the client
/// stream's socket.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's parts, each the endpoint's own"
)]
pub async fn proxy<C>(
    hub: &super::Hub,
    identity: super::Identity,
    source: SocketAddr,
    target: Target,
    mut client: C,
    client_fd: impl for<'a> Fn(&'a C) -> BorrowedFd<'a>,
    (reply, payload): (&[u8], &[u8]),
    stop: Option<&CancellationToken>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    use std::time::SystemTime;

    use tokio::io::AsyncWriteExt as _;

    use super::ProxyEvent;
    let protocol = identity.protocol;
    let conn = hub
        .registry
        .open(identity.clone(), source, target.clone(), SystemTime::now());
    hub.events.report(ProxyEvent::Opened {
        conn: conn.id(),
        identity: identity.clone(),
        source,
        target: target.clone(),
        at: SystemTime::now(),
    });
    let closed = |moved: Moved, reason: CloseReason| {
        hub.events.report(ProxyEvent::Closed {
            conn: conn.id(),
            identity: identity.clone(),
            rx_bytes: moved.rx_bytes,
            tx_bytes: moved.tx_bytes,
            reason,
            at: SystemTime::now(),
        });
    };
    let mut upstream = match connect_upstream(&target, identity.id, &*hub.kernel).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%source, %target, %protocol, error = %e, "proxy: upstream unreachable");
            let _ = client.shutdown().await;
            return closed(Moved::default(), CloseReason::Unreachable);
        }
    };
    if let Err(e) = hub
        .kernel
        .bind(client_fd(&client), identity.id, SocketRole::Client)
    {
        // Unbound, the client socket would escape the gate and the shaping: not served.
        tracing::warn!(%source, %protocol, error = %e, "proxy: binding the client socket failed");
        return closed(Moved::default(), CloseReason::Closed);
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
    let started = async {
        if !reply.is_empty() {
            client.write_all(reply).await?;
            client.flush().await?;
        }
        upstream.write_all(payload).await
    };
    let (mut moved, reason) = match started.await {
        Ok(()) => relay(&mut client, &mut upstream, conn.cut()).await,
        Err(_) => (Moved::default(), CloseReason::Closed),
    };
    if let Some(w) = watcher {
        w.abort();
    }
    if reason == CloseReason::Cut {
        abort(&*hub.kernel, &[client_fd(&client), upstream.as_fd()]);
    }
    moved.rx_bytes += payload.len() as u64;
    closed(moved, reason);
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
