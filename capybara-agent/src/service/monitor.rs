//! Monitoring and control: counters per device and user from the kernel maps (exact), the
//! tunnel's live sessions, and kicking a user off, or one device's session by its id.
//!
//! ## Connection ids
//! A live connection's id is the id of its open session in the history ([`SessionId`], see
//! `service::live`): the same id `capybara history` keeps for it after it ends. Every device
//! the tunnel knows is listed; one with no open session (never handshaked, its session ended,
//! or a handshake a few milliseconds old whose session the recorder has not written yet) has
//! no id and cannot be kicked by one.
//!
//! ## Kick
//! A kick holds the device at the admission gate as `kicked` and tears its tunnel session
//! down; the tunnel reports the disconnect and the history closes the session with reason
//! `kicked`. Kicking a user does so for each of its devices; kicking a connection for that
//! device only (its user's other devices stay connected). A kick is not a ban: the device's
//! next completed handshake admits it again, as a new session with a new id
//! ([`Monitor::on_handshake`]).

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use capybara_common::{
    counters::Counter,
    drop::DropReason,
    peer::{PeerId, PeerStats},
};
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, to_json},
    directory::{Directory, ProxyRecord},
    domain::{Actor, Peer, Protocol, PublicKey, SessionId, UserName, unix_secs},
    error::not_found,
    live::LiveSessions,
    policy::Policy,
};
use crate::{dataplane::Gate, proxy::registry::CutCause, store::Batch};

/// Counters of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// The device.
    pub peer: Peer,
    /// Its counters.
    pub stats: PeerStatsView,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl From<Counter> for Traffic {
    fn from(c: Counter) -> Traffic {
        Traffic {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

/// Counters of a peer or a user: bytes/packets each way and drops by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatsView {
    /// From the peer, passed.
    pub rx: Traffic,
    /// To the peer, passed.
    pub tx: Traffic,
    /// Dropped packets by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

impl PeerStatsView {
    /// The view of kernel counters.
    pub fn from_kernel(s: &PeerStats) -> PeerStatsView {
        let mut v = PeerStatsView::default();
        v.add(s);
        v
    }

    fn add(&mut self, s: &PeerStats) {
        self.rx.packets += s.rx_packets;
        self.rx.bytes += s.rx_bytes;
        self.tx.packets += s.tx_packets;
        self.tx.bytes += s.tx_bytes;
        for r in DropReason::ALL {
            let n = s.drops[r as usize];
            if n > 0 {
                *self.drops.entry(r.name().to_owned()).or_default() += n;
            }
        }
    }
}

/// A user's proxy identity (Shadowsocks or VLESS) and its kernel counters: the traffic of its
/// proxied connections, as the socket programs count it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounters {
    /// The user.
    pub user: UserName,
    /// The protocol.
    pub protocol: Protocol,
    /// Its kernel line.
    pub id: PeerId,
    /// Its counters.
    pub stats: PeerStatsView,
}

/// The answer of [`Service::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Per device.
    pub peers: Vec<PeerCounters>,
    /// Per proxy identity.
    #[serde(default)]
    pub proxies: Vec<ProxyCounters>,
    /// Per user (sums of its devices and proxy identities).
    pub users: BTreeMap<String, PeerStatsView>,
    /// Every drop of the dataplane by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

/// A live (or configured) session of a device, or the open session of a user's proxy
/// identity (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The id of its open session (the session's id in the history); `None` when the device
    /// has no open session (see the module docs).
    pub id: Option<SessionId>,
    /// The user.
    pub user: UserName,
    /// The device's name; a proxy protocol's name for a proxy session.
    pub device: String,
    /// How it connects.
    pub protocol: Protocol,
    /// The WireGuard device; `None` for a proxy session.
    pub peer: Option<Peer>,
    /// Where it connects from (a proxy session: the client address of its latest connection).
    pub endpoint: Option<String>,
    /// Latest handshake, Unix seconds (a proxy session: when its latest connection opened).
    pub last_handshake: Option<u64>,
    /// A proxy session's TCP connections open now (0 for WireGuard).
    pub open_connections: u32,
    /// Bytes from it.
    pub rx_bytes: u64,
    /// Bytes to it.
    pub tx_bytes: u64,
}

/// The monitoring feature.
#[derive(Debug)]
pub struct Monitor {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    live: Arc<LiveSessions>,
}

impl Monitor {
    /// The feature over the shared core, directory, policy and open sessions.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
        live: Arc<LiveSessions>,
    ) -> Monitor {
        Monitor {
            core,
            dir,
            policy,
            live,
        }
    }

    /// One page of [`Monitor::stats`] for every user: the counters of every device of up to
    /// `users` users (those with devices, in `user/device` key order) after the user key prefix
    /// `after`, their sums, and every drop; and the last user's key prefix when more follow.
    pub fn stats_page(
        &self,
        after: Option<&str>,
        users: usize,
    ) -> Result<(Stats, Option<String>), ServiceError> {
        let (peers, proxies, next) = self.dir.user_lines_page(after, users);
        Ok((self.stats_of(peers, proxies)?, next))
    }

    /// The counters of `peers` and `proxies`, their users' sums and every drop.
    fn stats_of(&self, peers: Vec<Peer>, proxies: Vec<ProxyRecord>) -> Result<Stats, ServiceError> {
        let mut out = Stats::default();
        for peer in peers {
            let k = self.core.plane.peer_stats(peer.id)?;
            out.users.entry(peer.user.to_string()).or_default().add(&k);
            out.peers.push(PeerCounters {
                stats: PeerStatsView::from_kernel(&k),
                peer,
            });
        }
        for rec in proxies {
            let a = rec.access;
            let k = self.core.plane.peer_stats(a.id)?;
            out.users.entry(a.user.to_string()).or_default().add(&k);
            out.proxies.push(ProxyCounters {
                user: a.user,
                protocol: a.protocol,
                id: a.id,
                stats: PeerStatsView::from_kernel(&k),
            });
        }
        for (r, c) in self.core.plane.drops()? {
            if c.packets > 0 {
                out.drops.insert(r.name().to_owned(), c.packets);
            }
        }
        Ok(out)
    }

    /// Counters per device, per proxy identity and per user (of `user` only if given), and
    /// global drops by reason.
    pub fn stats(&self, user: Option<&UserName>) -> Result<Stats, ServiceError> {
        let (peers, proxies) = match user {
            Some(u) => {
                self.dir.user(u)?;
                (self.dir.user_peers(u), self.dir.proxy_records(u))
            }
            None => (
                self.dir.all().into_iter().map(|r| r.peer).collect(),
                self.dir.all_proxies(),
            ),
        };
        self.stats_of(peers, proxies)
    }

    /// Every device the tunnel reports, with its open session's id, endpoint and latest
    /// handshake.
    pub fn connections(&self) -> Result<Vec<Connection>, ServiceError> {
        let mut out: Vec<Connection> = self
            .core
            .tunnel
            .peers()
            .into_iter()
            .filter_map(|s| {
                let peer = self.dir.peer_by_key(&s.key)?;
                Some(Connection {
                    id: self.live.of_peer(peer.id, &peer.public_key),
                    user: peer.user.clone(),
                    device: peer.device.to_string(),
                    protocol: Protocol::Wireguard,
                    peer: Some(peer),
                    endpoint: s.endpoint.map(|e| e.to_string()),
                    last_handshake: s.last_handshake.map(unix_secs),
                    open_connections: 0,
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                })
            })
            .collect();
        out.extend(self.proxy_connections()?);
        out.sort_by(|a, b| (&a.user, &a.device).cmp(&(&b.user, &b.device)));
        Ok(out)
    }

    /// One row per proxy identity with connections open: its session, its latest connection's
    /// client address and time, and its kernel counters (the bytes its upstream sockets moved).
    fn proxy_connections(&self) -> Result<Vec<Connection>, ServiceError> {
        let mut by_id: BTreeMap<u32, Connection> = BTreeMap::new();
        for c in self.core.proxies.list() {
            let row = by_id.entry(c.identity.id).or_insert_with(|| Connection {
                id: self.live.of_proxy(c.identity.id),
                user: c.identity.user.clone(),
                device: c.identity.protocol.as_str().to_owned(),
                protocol: c.identity.protocol,
                peer: None,
                endpoint: None,
                last_handshake: None,
                open_connections: 0,
                rx_bytes: 0,
                tx_bytes: 0,
            });
            row.open_connections += 1;
            // `list` is in opening order: the last one seen is the latest.
            row.endpoint = Some(c.source.to_string());
            row.last_handshake = Some(unix_secs(c.opened_at));
        }
        for (id, row) in &mut by_id {
            let s = self.core.plane.peer_stats(*id)?;
            (row.rx_bytes, row.tx_bytes) = (s.rx_bytes, s.tx_bytes);
        }
        Ok(by_id.into_values().collect())
    }

    /// Ends every session of `user` now: its devices are held at the gate as kicked and their
    /// tunnel sessions torn down. A device passes the gate again when it completes a new
    /// handshake ([`Monitor::on_handshake`]).
    pub fn kick(&self, actor: &Actor, user: &UserName) -> Result<Vec<Peer>, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        let peers = self.dir.user_peers(user);
        for p in &peers {
            self.core
                .plane
                .set_gate(p.id, Gate::Held(DropReason::GateKicked))?;
            self.core.tunnel.kick(&p.public_key)?;
        }
        self.policy.forget_online(&peers);
        let cut = self.kick_proxies(user)?;
        let mut batch = Batch::default();
        self.core.audit(
            &mut batch,
            actor,
            "connection.kick",
            format!("user:{user}"),
            None,
            to_json(&serde_json::json!({ "peers": &peers, "proxy_connections": cut })),
        )?;
        self.core.commit(batch)?;
        Ok(peers)
    }

    /// Ends the open session `id` now (that device only): the device is held at the gate as
    /// kicked and its tunnel session torn down, like [`Monitor::kick`] does for each device of
    /// a user. `only`: the user the caller's token is restricted to; a session of another
    /// user is then `NotFound`, as to such a token other users' connections do not exist.
    /// Audited as `connection.kick` of the device (`peer:<user>/<device>`, so `history audit
    /// --user` finds it), the id and device in its `after`.
    pub fn kick_connection(
        &self,
        actor: &Actor,
        id: SessionId,
        only: Option<&UserName>,
    ) -> Result<Option<Peer>, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let gone = || not_found("connection", id);
        let Some(key) = self.live.key_of(id).ok_or_else(gone)? else {
            return self.kick_proxy_session(actor, id, only).map(|()| None);
        };
        let peer = self
            .dir
            .peer_by_key(&key)
            .filter(|p| p.id == id.peer && only.is_none_or(|u| *u == p.user))
            .ok_or_else(gone)?;
        self.core
            .plane
            .set_gate(peer.id, Gate::Held(DropReason::GateKicked))?;
        self.core.tunnel.kick(&peer.public_key)?;
        self.policy.forget_online(std::slice::from_ref(&peer));
        let mut batch = Batch::default();
        self.core.audit(
            &mut batch,
            actor,
            "connection.kick",
            format!("peer:{}/{}", peer.user, peer.device),
            None,
            to_json(&serde_json::json!({ "connection": id, "peer": &peer })),
        )?;
        self.core.commit(batch)?;
        Ok(Some(peer))
    }

    /// Kicks `user`'s proxy identities: their open connections are cut (the endpoints abort
    /// them: the client sees a reset at once) and they are offline. Unlike a device, an
    /// identity is not held in the kernel: its next connection authenticates again, which is
    /// what a device's next handshake is (a kernel hold here also dropped the endpoint's own
    /// FIN, so the client saw no end; measured in `e2e_proxies`). Returns how many connections
    /// were cut.
    fn kick_proxies(&self, user: &UserName) -> Result<usize, ServiceError> {
        let now = SystemTime::now();
        let mut cut = 0;
        for rec in self.dir.proxy_records(user) {
            cut += self.core.proxies.cut(rec.access.id, CutCause::Kick);
            self.policy.on_proxy_close(rec.access.id, now)?;
        }
        Ok(cut)
    }

    /// Ends the open session `id` of a proxy identity: cuts all its open connections (its next
    /// connection is a new session). Audited as `connection.kick` of `proxy:<user>/<protocol>`.
    fn kick_proxy_session(
        &self,
        actor: &Actor,
        id: SessionId,
        only: Option<&UserName>,
    ) -> Result<(), ServiceError> {
        let gone = || not_found("connection", id);
        let identity = self
            .core
            .proxies
            .identity(id.peer)
            .filter(|i| only.is_none_or(|u| *u == i.user))
            .ok_or_else(gone)?;
        let cut = self.core.proxies.cut(id.peer, CutCause::Kick);
        let mut batch = Batch::default();
        self.core.audit(
            &mut batch,
            actor,
            "connection.kick",
            format!("proxy:{}/{}", identity.user, identity.protocol),
            None,
            to_json(&serde_json::json!({ "connection": id, "proxy_connections": cut })),
        )?;
        self.core.commit(batch)
    }

    /// The tunnel saw a completed handshake of `key`: the device passes the gate again (a
    /// kicked device is admitted by its next handshake). Unknown keys are ignored.
    pub fn on_handshake(&self, key: &PublicKey) -> Result<(), ServiceError> {
        // The policy decides the gate (admitted, or held by a device limit or a window).
        self.policy.on_connect(key, SystemTime::now())
    }
}
