//! The MFA verification page on the tunnel address and the one-time-code channels.
//!
//! A device of a user with MFA is held at the kernel gate as `mfa-pending` until a code is
//! verified; the only thing it reaches meanwhile is this page, served on the server's tunnel
//! addresses (IPv4 and IPv6) on `--mfa-port` (default 80): `http://10.70.0.1/`. The page knows
//! the device by the request's source address (its tunnel address; no login form) and asks the
//! service through [`VerificationPort`] (implemented by `service::mfa`).
//!
//! - [`page`]: the HTML document, rendered by a pure function (no JavaScript, no external
//!   resources, inline CSS allowed by hash, the enrolment QR code as inline SVG).
//! - [`server`]: the HTTP/1.1 server (hyper): routes, limits, CSRF defence, security headers.
//! - [`senders`]: [`CodeSender`](crate::service::verification::CodeSender) over SMTP with
//!   STARTTLS required (lettre) and over a signed webhook to an SMS gateway (the webhooks'
//!   Standard Webhooks signing and SSRF check).
//!
//! [`PageServer::start`] binds the addresses with `IP_FREEBIND` (an IPv6 address of the tunnel
//! may still be tentative when the agent starts) and serves until [`PageServer::stop`]; it is
//! started by the daemon on `--mfa-port` with `service::mfa` as its [`VerificationPort`].

pub mod page;
pub mod senders;
pub mod server;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use server::{App, Limits};

use crate::service::verification::VerificationPort;

/// Why the page server could not start.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// An address could not be bound.
    #[error("--mfa-port: cannot listen on {addr} for the verification page")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running page server.
#[derive(Debug)]
pub struct PageServer {
    addrs: Vec<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds `addr` for the page: `SO_REUSEADDR`, `IP_FREEBIND`, IPv6 only on an IPv6 address.
fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, PageError> {
    let err = |source| PageError::Bind { addr, source };
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&sock, sockopt::IpFreebind, &true).map_err(|e| err(e.into()))?;
    if addr.is_ipv6() {
        setsockopt(&sock, sockopt::Ipv6V6Only, &true).map_err(|e| err(e.into()))?;
    }
    sock.bind(addr).map_err(err)?;
    sock.listen(1024).map_err(err)
}

/// The canned answer to a connection over the limits.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
cache-control: no-store\r\nx-frame-options: DENY\r\nretry-after: 5\r\nconnection: close\r\n\
content-length: 60\r\n\r\n{\"error\":\"too many connections: try again in a few seconds\"}";

impl PageServer {
    /// Serves `port` on `port_number` of each of `addrs` with `limits`.
    pub fn start(
        port: Arc<dyn VerificationPort>,
        addrs: &[IpAddr],
        port_number: u16,
        limits: Limits,
    ) -> Result<PageServer, PageError> {
        let listeners = addrs
            .iter()
            .map(|ip| bind(SocketAddr::new(*ip, port_number)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PageServer::serve(App::new(port, limits), listeners))
    }

    /// Serves `app` on bound `listeners`.
    pub fn serve(app: Arc<App>, listeners: Vec<tokio::net::TcpListener>) -> PageServer {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(app.clone(), l, stopped.clone())))
            .collect();
        PageServer { addrs, stop, tasks }
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting and closes every connection.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "MFA page: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(admitted) = app.admit(peer.ip()) else {
                    let _ = stream.try_write(BUSY);
                    continue;
                };
                let Ok(local) = stream.local_addr() else { continue };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                conns.spawn(async move {
                    let _admitted = admitted;
                    server::serve_io(app, hyper_util::rt::TokioIo::new(stream), peer.ip(), local)
                        .await;
                });
            }
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests;
