//! Shadowsocks and VLESS endpoints whose users are Capybara's users (issue 24, SPEC feature 17).
//!
//! A user's access by a proxy protocol is one **proxy identity** per protocol: its credential
//! (a Shadowsocks key, a VLESS UUID) and a dense id from the same id space as WireGuard devices,
//! so the kernel line `CAPY_PEER_HOT[id]` carries the user's policy (gate, quota bucket, flow
//! limit, rate classes) exactly as a device's line does, and its counters are the user's
//! traffic by that protocol.
//!
//! ## Who decides what
//! Every socket a proxied connection uses is bound to its identity in the kernel
//! ([`Kernel::bind`]) before it carries a byte of the user's traffic:
//! - the **upstream** socket (the agent's connection to the destination) is bound before
//!   `connect`, so its SYN already passes the programs. Its packets are the user's traffic as
//!   WireGuard's inner packets are: counted (what leaves = rx from the user, what arrives = tx
//!   to the user), charged to the quota bucket, counted as a flow, checked against the
//!   destination lists and geo rules, and shaped (the upload direction, on its way out);
//! - the **client** socket (the user's connection to the endpoint) is bound once accepted: the
//!   gate holds it too (a held user is cut at once on both sockets), and the download direction
//!   is shaped on its way out. Its bytes are not counted again.
//!
//! The endpoints themselves decide only what the kernel cannot see: who a connection belongs
//! to (the credential), refusing a held or unknown user before connecting anywhere, and closing
//! a user's open connections on `kick`, a hold the policy writes, or the identity's removal
//! ([`registry::Registry::cut`]). A cut connection is aborted ([`relay::abort`]): both sockets
//! are unbound and closed with a reset, which discards what they had not sent, so the client
//! sees the end at once even while the kernel holds the user (a held socket's FIN would be
//! dropped, and the client would wait for its own timeout).
//!
//! Overshoot bounds: the kernel's checks act on the packet that crosses the limit (quota: at
//! most one GSO super-packet, 64 KiB, per CPU past the budget; shaping: the HTB class's
//! burst); a hold the policy writes cuts the connections in the same call, and the kernel
//! drops the held sockets' packets from that write on. A hold the kernel applies by itself at a
//! deadline (an expiry: `Gate::Admitted { until }`) drops the packets from the deadline, and the
//! connections are cut when the policy's next tick (every second) writes the hold: measured in
//! `e2e_proxies`, open downloads ended 382 ms after an expiry's deadline. Kernel checks and
//! endpoint decisions apply to UDP alike: VLESS UDP and the Shadowsocks UDP relay send and
//! receive through upstream sockets bound as TCP's are, and a cut ends an association.
//!
//! ## Layout
//! - this module: the identity ([`Identity`]), what an endpoint needs from the rest of the agent
//!   ([`Credentials`], [`Kernel`], [`Events`], gathered in a [`Hub`]), proxy targets
//!   ([`Target`]);
//! - [`registry`]: the open connections, by identity, to list and to cut;
//! - [`relay`]: connecting upstream (bound before `connect`) and relaying both ways;
//! - [`shadowsocks`]: the Shadowsocks endpoint (AEAD, SIP004 and SIP022; the user found by key
//!   trial);
//! - [`tls`]: the VLESS endpoint's certificate (files, or generated and kept) and TLS config;
//! - [`vless`]: the VLESS endpoint over TLS ([`vless::serve`]) and its header parser;
//! - `testing` (tests and the `test-support` feature): doubles of the kernel and events ports.

pub mod registry;
pub mod relay;
pub mod shadowsocks;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tls;
pub mod vless;

use std::{fmt, io, net::SocketAddr, os::fd::BorrowedFd, sync::Arc, time::SystemTime};

use capybara_common::peer::PeerId;

use crate::service::domain::{Protocol, UserName};

/// Who a proxied connection belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The dense id of the user's identity for this protocol (its kernel line).
    pub id: PeerId,
    /// The user.
    pub user: UserName,
    /// The protocol.
    pub protocol: Protocol,
}

/// A Shadowsocks user's key, as an endpoint tries it: Shadowsocks carries no user name, so a
/// multi-user endpoint finds the user by the key that opens the first chunk.
#[derive(Clone, Debug)]
pub struct ShadowsocksKey {
    /// Whose key.
    pub identity: Identity,
    /// The key (the cipher's key length; for the AEAD ciphers of SIP004 derived from the
    /// password with `EVP_BytesToKey`, for the 2022 edition the base64-decoded PSK).
    pub key: Vec<u8>,
}

/// The credentials an endpoint checks, read from the service's directory.
pub trait Credentials: Send + Sync + 'static {
    /// Every user's Shadowsocks key. A snapshot: cheap to clone, replaced as users change.
    fn shadowsocks(&self) -> Arc<[ShadowsocksKey]>;
    /// The identity whose VLESS UUID this is.
    fn vless(&self, uuid: &[u8; 16]) -> Option<Identity>;
    /// Whether the identity may connect now (its gate is open). An endpoint asks this once a
    /// connection is authenticated and refuses a held user before connecting anywhere; the
    /// kernel holds the sockets of a user held later.
    fn admitted(&self, id: PeerId) -> bool;
}

/// Which end of a proxied connection a socket is (see the module docs for what each is charged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRole {
    /// The user's connection to the endpoint.
    Client,
    /// The endpoint's connection to the destination.
    Upstream,
}

/// The kernel side: binds a socket to an identity's line (`dataplane`'s socket map).
pub trait Kernel: Send + Sync + 'static {
    /// Binds the socket `fd` to `id` in `role`. Until it returns, the socket is not the user's.
    fn bind(&self, fd: BorrowedFd<'_>, id: PeerId, role: SocketRole) -> io::Result<()>;
    /// Unbinds the socket `fd`: the programs pass its next packets untouched. Only for a
    /// connection being cut ([`relay::abort`]), whose reset must pass a held user's gate.
    fn unbind(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

/// Why an endpoint refused a connection before it was anybody's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No user's credential opens it (Shadowsocks: no key decrypts the first chunk; VLESS: an
    /// unknown UUID).
    UnknownCredential,
    /// The header is not the protocol's (malformed, truncated, a replayed salt, a bad TLS
    /// handshake).
    Malformed,
    /// The credential is a user's, whose gate is closed.
    Held,
}

/// Why a proxied connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Either side closed it (or it failed).
    Closed,
    /// Cut by `kick`, a hold or the identity's removal ([`registry::Registry::cut`]).
    Cut,
    /// The destination could not be reached.
    Unreachable,
}

/// What endpoints report, for history, connections and webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyEvent {
    /// An authenticated connection was opened.
    Opened {
        /// Its registry id.
        conn: registry::ConnId,
        /// Whose.
        identity: Identity,
        /// The client's address.
        source: SocketAddr,
        /// Where it goes.
        target: Target,
        /// When.
        at: SystemTime,
    },
    /// It ended.
    Closed {
        /// Its registry id.
        conn: registry::ConnId,
        /// Whose.
        identity: Identity,
        /// Bytes relayed from the user.
        rx_bytes: u64,
        /// Bytes relayed to the user.
        tx_bytes: u64,
        /// Why.
        reason: CloseReason,
        /// When.
        at: SystemTime,
    },
    /// A connection was refused before it was anybody's (or was a held user's).
    AuthFailed {
        /// The endpoint's protocol.
        protocol: Protocol,
        /// The client's address.
        source: SocketAddr,
        /// Why.
        reason: AuthFailure,
        /// When.
        at: SystemTime,
    },
}

/// Where endpoints report to.
pub trait Events: Send + Sync + 'static {
    /// Reports `event`; must not block.
    fn report(&self, event: ProxyEvent);
}

/// What an endpoint is given.
#[derive(Clone)]
pub struct Hub {
    /// The credentials it checks.
    pub credentials: Arc<dyn Credentials>,
    /// The kernel binding of its sockets.
    pub kernel: Arc<dyn Kernel>,
    /// Where it reports.
    pub events: Arc<dyn Events>,
    /// The open connections of all endpoints.
    pub registry: Arc<registry::Registry>,
}

/// A proxy target: an address, or a domain name resolved by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A domain name (at most 255 bytes, as both protocols encode it) and port.
    Domain(String, u16),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}
