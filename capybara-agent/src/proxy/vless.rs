//! The VLESS endpoint over TLS: [`serve`] accepts TLS connections on a listener, reads each
//! one's VLESS request header ([`header`]), finds the user by the UUID and relays the TCP stream
//! (or the UDP datagrams) to the target, bound to the user's identity in the kernel (see [`super`] for who decides
//! what).
//!
//! One connection, in order:
//! 1. the TLS handshake ([`super::tls`]'s server configuration), within [`HANDSHAKE_TIMEOUT`];
//! 2. the request header, within [`HEADER_TIMEOUT`] of the handshake (v2ray's client flushes it
//!    with the first payload or after 100 ms), at most [`header::MAX_REQUEST_LEN`] bytes; the
//!    bytes after it are the first payload;
//! 3. the UUID ([`super::Credentials::vless`]), then what this endpoint serves, then the gate
//!    ([`super::Credentials::admitted`]);
//! 4. [`super::relay::proxy`], which both endpoints share: registered
//!    ([`super::ProxyEvent::Opened`]), connected upstream (bound before `connect`), the client
//!    socket bound ([`super::SocketRole::Client`]), the response header, the first payload
//!    upstream, relayed until either side closes or the connection is cut (`kick`, a hold, the
//!    agent stopping; a cut one is aborted), then [`super::ProxyEvent::Closed`] with the bytes
//!    moved (payload only: the headers are not counted here; the kernel counts the upstream
//!    socket's packets).
//!
//! What is served and what is refused:
//! - **TCP** (command 1) with no `flow` (plain VLESS over TLS, what `vless://…?security=tls`
//!   and v2ray's `"flow": ""` mean) is served.
//! - **UDP** (command 2) with no `flow` is served: the stream then carries datagrams to and from
//!   the header's target, each a 2-byte big-endian length and that many bytes, both ways (v2ray's
//!   and Xray's framing without `packetEncoding`), relayed through a UDP socket bound to the
//!   user's identity before `connect` ([`super::relay::relay_datagrams`]). So the kernel sees
//!   every datagram as the user's, as it sees a TCP upstream's segments: counted, charged, the
//!   destination lists and the flow limit per datagram, shaped. One connection has one target
//!   (the client opens a connection per destination); the `rx`/`tx` it reports are payload
//!   bytes.
//! - **Refused**: mux.cool (command 3, which Xray's XUDP `packetEncoding` also uses; many
//!   targets in one stream would escape the per-connection upstream binding) and any XTLS
//!   `flow` (`xtls-rprx-origin`/`-direct`/`-splice`/`-vision`: XTLS splices the inner TLS past
//!   our TLS layer, which rustls cannot do). They are reported as
//!   [`AuthFailure::Malformed`](super::AuthFailure::Malformed) and logged with the reason;
//!   a v2ray client configured for them fails to connect rather than falling back silently.
//!
//! A refused connection (bad TLS handshake, malformed or truncated header, unknown UUID, a
//! held user, what is not served) is reported as [`super::ProxyEvent::AuthFailed`] and closed:
//! after the handshake with a TLS `close_notify`, with no VLESS response, so a v2ray client
//! sees the connection end before the response header and closes its SOCKS connection. There
//! is no fallback (Xray's `fallbacks`, which hands unknown traffic to a web server so that a
//! probe sees a web site): the port answers TLS with its certificate and closes on anything
//! that is not a user's VLESS; a fallback is a possible addition, not needed by any client.
//! One bad client never stops the accept loop: every connection runs in its own task, accept
//! errors (e.g. out of file descriptors) are logged and retried after [`ACCEPT_BACKOFF`].

pub mod header;

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig, server::TlsStream};
use tokio_util::sync::CancellationToken;

use self::header::{Command, HeaderError, Request};
use super::{
    AuthFailure, Hub, ProxyEvent, Target,
    relay::{self, Carried},
};
use crate::service::domain::Protocol;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send the VLESS request header once TLS is up.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after a failed `accept` (e.g. `EMFILE`) before the next one.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves VLESS over TLS on `listener` with the TLS configuration `tls` (from
/// [`super::tls::EndpointCert::server_config`]) for the users of `hub`, until `shutdown`
/// fires; then stops accepting and cuts the open connections (reason
/// [`CloseReason::Cut`]). Returns once the listener is dropped; connection tasks end on their
/// own shortly after.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    hub: Hub,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, source)) => {
                let (acceptor, hub, shutdown) = (acceptor.clone(), hub.clone(), shutdown.clone());
                tokio::spawn(async move { connection(tcp, source, acceptor, hub, shutdown).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "vless: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Why a connection was refused before it was anybody's (for the log; the event carries the
/// [`AuthFailure`]).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("reading the header failed")]
    Read(#[source] io::Error),
    #[error("no header within the timeout")]
    HeaderTimeout,
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("unknown UUID")]
    UnknownUuid,
    #[error("{what} is not served")]
    NotServed { what: String },
    #[error("the user is held")]
    Held,
}

impl Refused {
    fn failure(&self) -> AuthFailure {
        match self {
            Refused::UnknownUuid => AuthFailure::UnknownCredential,
            Refused::Held => AuthFailure::Held,
            _ => AuthFailure::Malformed,
        }
    }
}

/// One client connection, from TCP accept to its end.
async fn connection(
    tcp: TcpStream,
    source: SocketAddr,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
) {
    // Small writes (the response header) go out at once; bulk is sent in full records anyway.
    let _ = tcp.set_nodelay(true);
    let accepted = async {
        let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| Refused::TlsTimeout)?
            .map_err(Refused::Tls)?;
        let (request, payload) = tokio::time::timeout(HEADER_TIMEOUT, read_request(&mut tls))
            .await
            .map_err(|_| Refused::HeaderTimeout)??;
        let identity = hub
            .credentials
            .vless(&request.uuid)
            .ok_or(Refused::UnknownUuid)?;
        let target = served(&request)?;
        if !hub.credentials.admitted(identity.id) {
            return Err(Refused::Held);
        }
        Ok((tls, identity, target, payload))
    }
    .await;
    match accepted {
        Ok((tls, identity, (target, carried), payload)) => {
            let accepted = relay::Accepted {
                identity,
                source,
                target,
                carried,
                client: tls,
            };
            relay::proxy(
                &hub,
                accepted,
                client_socket,
                (&header::RESPONSE, &payload),
                Some(&shutdown),
            )
            .await;
        }
        Err(refused) => {
            tracing::debug!(%source, reason = %refused, "vless: refused");
            hub.events.report(ProxyEvent::AuthFailed {
                protocol: Protocol::Vless,
                source,
                reason: refused.failure(),
                at: SystemTime::now(),
            });
        }
    }
}

/// Reads the request header; returns it and the payload bytes that came with it.
async fn read_request(tls: &mut TlsStream<TcpStream>) -> Result<(Request, Vec<u8>), Refused> {
    // One TLS record's worth: the header is at most 533 bytes, the rest is payload.
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    loop {
        let n = tls.read(&mut buf[have..]).await.map_err(Refused::Read)?;
        if n == 0 {
            return Err(HeaderError::Truncated.into());
        }
        have += n;
        if let Some((request, len)) = header::parse_request(&buf[..have])? {
            buf.truncate(have);
            buf.drain(..len);
            return Ok((request, buf));
        }
        // A valid prefix is shorter than MAX_REQUEST_LEN < the buffer: there is room.
    }
}

/// The target of a request this endpoint serves (TCP or UDP, no flow) and what the stream
/// carries to it, or why not.
fn served(request: &Request) -> Result<(Target, Carried), Refused> {
    if !request.flow.is_empty() {
        return Err(Refused::NotServed {
            what: format!("flow {:?}", request.flow),
        });
    }
    match (&request.command, &request.target) {
        (Command::Tcp, Some(target)) => Ok((target.clone(), Carried::Stream)),
        (Command::Udp, Some(target)) => Ok((target.clone(), Carried::Datagrams)),
        (command, _) => Err(Refused::NotServed {
            what: format!("command {command:?}"),
        }),
    }
}

/// The client's socket under TLS.
fn client_socket(t: &TlsStream<TcpStream>) -> std::os::fd::BorrowedFd<'_> {
    t.get_ref().0.as_fd()
}

#[cfg(test)]
mod tests;
