//! Test doubles of an endpoint's ports ([`super::Credentials`], [`super::Kernel`],
//! [`super::Events`]): for the
//! endpoints' own tests and, behind the `test-support` feature, the privileged test crate and
//! its benchmarks. The real kernel port is `dataplane`'s socket map.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
};

use capybara_common::peer::PeerId;
use nix::sys::socket::{SockaddrStorage, getpeername};
use tokio::sync::mpsc;

use super::{Credentials, Events, Identity, Kernel, ProxyEvent, ShadowsocksKey, SocketRole};

/// Users with Shadowsocks keys and VLESS UUIDs, some of them held (the agent's directory and
/// policy, in a test).
#[derive(Default)]
pub struct StaticUsers {
    /// Every Shadowsocks user's key.
    pub keys: Arc<[ShadowsocksKey]>,
    /// The VLESS users, by UUID.
    pub vless: HashMap<[u8; 16], Identity>,
    /// The identities whose gate is closed.
    pub held: Mutex<HashSet<PeerId>>,
}

impl StaticUsers {
    /// Shadowsocks users with `keys`, nobody held.
    pub fn shadowsocks(keys: Vec<ShadowsocksKey>) -> StaticUsers {
        StaticUsers {
            keys: keys.into(),
            ..StaticUsers::default()
        }
    }

    /// VLESS users with these UUIDs, nobody held.
    pub fn vless(users: impl IntoIterator<Item = ([u8; 16], Identity)>) -> StaticUsers {
        StaticUsers {
            vless: users.into_iter().collect(),
            ..StaticUsers::default()
        }
    }
}

impl Credentials for StaticUsers {
    fn shadowsocks(&self) -> Arc<[ShadowsocksKey]> {
        Arc::clone(&self.keys)
    }
    fn vless(&self, uuid: &[u8; 16]) -> Option<Identity> {
        self.vless.get(uuid).cloned()
    }
    fn admitted(&self, id: PeerId) -> bool {
        !self.held.lock().unwrap().contains(&id)
    }
}

/// A bind as [`RecordingKernel`] saw it: whose, which role, and the socket's peer then (for a
/// client socket the client's address; `None` for an upstream socket not yet connected).
pub type Bind = (PeerId, SocketRole, Option<SocketAddr>);

/// A kernel port that records each bind, in order, and counts unbinds.
#[derive(Default)]
pub struct RecordingKernel {
    binds: Mutex<Vec<Bind>>,
    unbinds: Mutex<usize>,
}

impl RecordingKernel {
    /// Each bind's identity and role, in order.
    pub fn binds(&self) -> Vec<(PeerId, SocketRole)> {
        let binds = self.binds.lock().unwrap();
        binds.iter().map(|&(id, role, _)| (id, role)).collect()
    }

    /// Each bind with the socket's peer.
    pub fn binds_with_peers(&self) -> Vec<Bind> {
        self.binds.lock().unwrap().clone()
    }

    /// How many sockets were unbound (cut connections' sockets, [`super::relay::abort`]).
    pub fn unbinds(&self) -> usize {
        *self.unbinds.lock().unwrap()
    }
}

impl Kernel for RecordingKernel {
    fn bind(&self, fd: BorrowedFd<'_>, id: PeerId, role: SocketRole) -> io::Result<()> {
        let peer = getpeername::<SockaddrStorage>(fd.as_raw_fd())
            .ok()
            .and_then(|a| {
                a.as_sockaddr_in()
                    .map(|a| SocketAddr::from(SocketAddrV4::from(*a)))
                    .or_else(|| {
                        a.as_sockaddr_in6()
                            .map(|a| SocketAddr::from(SocketAddrV6::from(*a)))
                    })
            });
        self.binds.lock().unwrap().push((id, role, peer));
        Ok(())
    }

    fn unbind(&self, _fd: BorrowedFd<'_>) -> io::Result<()> {
        *self.unbinds.lock().unwrap() += 1;
        Ok(())
    }
}

/// Events kept in order, to look at once the connections are done.
#[derive(Default)]
pub struct CollectedEvents(Mutex<Vec<ProxyEvent>>);

impl CollectedEvents {
    /// The events so far.
    pub fn events(&self) -> Vec<ProxyEvent> {
        self.0.lock().unwrap().clone()
    }
}

impl Events for CollectedEvents {
    fn report(&self, event: ProxyEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// Events sent to a channel, to wait for (see [`ChannelEvents::new`]).
pub struct ChannelEvents(mpsc::UnboundedSender<ProxyEvent>);

impl ChannelEvents {
    /// The events' sink and its receiving end.
    pub fn new() -> (ChannelEvents, mpsc::UnboundedReceiver<ProxyEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ChannelEvents(tx), rx)
    }
}

impl Events for ChannelEvents {
    fn report(&self, event: ProxyEvent) {
        let _ = self.0.send(event);
    }
}

/// A UDP server on loopback that answers each datagram upper-cased, to its sender (the
/// destination of proxied datagrams in the endpoints' tests).
pub async fn upper_udp_server() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind a UDP server");
    let addr = s.local_addr().expect("its address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            buf[..n].make_ascii_uppercase();
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}
