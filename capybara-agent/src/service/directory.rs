//! The directory: the users' devices as an in-memory index over the store (by `user/device`,
//! by public key, the ids and addresses in use), user records, and address allocation. Every
//! feature reads devices here; only `devices` and `users` change it (under the writer lock,
//! after their batch is committed).
//!
//! Proxy identities (`service::proxies`: a user's Shadowsocks or VLESS access) are indexed
//! here too, by `user/protocol` and by id: they take their ids from the **same** bitmap as
//! devices (a proxy identity's id is never a device's, and removal frees it for either), and no
//! address. [`Directory::user_lines`] gives every kernel line of a user (devices and proxy
//! identities), which is what the policy programs.
//!
//! ## Addresses and ids
//! A device gets the lowest free host of the tunnel's IPv4 subnet (not the network, the
//! server's address or the broadcast) and the IPv6 address with the same host offset in the
//! IPv6 subnet, and the lowest free dense peer id. Both are rebuilt from the store at open.
//! A full IPv4 subnet (or an IPv6 subnet too small for the offset) is `Exhausted`, naming
//! `--tunnel-ipv4` (`--tunnel-ipv6`) and what to do; the default subnet holds every peer id
//! (`daemon::DEFAULT_TUNNEL_IPV4`).
//! A device holds its host offset by its IPv4 address and by its IPv6 address (the two differ
//! once `--tunnel-ipv4` grew to a subnet holding the old one); the server's two addresses hold
//! theirs, so a new device never gets an address in use in either family.
//! Kernel peers the store does not know are removed at start (`service::devices`); kept with
//! `--keep-unknown-peers`, they are reserved once at start ([`Directory::reserve_unknown`]):
//! their ids and host addresses are never handed out until the next start (which reads the
//! kernel again). Allocation itself never reads the kernel.
//!
//! ## Cost of an allocation (issue 19)
//! Decision: two bitmaps in the index, of held ids (`0..MAX_PEERS`, 2 048 words) and held host
//! offsets, changed by `insert`/`remove`/`reserve_unknown` under the index's write lock (and
//! every add and removal runs under the writer lock, so allocation and insertion never
//! interleave). Each bitmap keeps the index of its first word that is not full, so the lowest
//! free id or offset is read from one word: constant time, at 10 or 131 069 devices; a
//! removal moves that index back, so freed ids and addresses are handed out again first.
//! The sets beside the bitmaps (stored ids and addresses, reserved ones) say who holds a bit,
//! so a bit is cleared only when its last holder goes.
//! Before, each allocation scanned ids `0..` and offsets `1..` against `BTreeSet`s and copied
//! the kernel's whole peer table: 155 ms per allocation at 100 000 devices (debug build), so
//! adding 100 000 devices one by one was quadratic. After (debug build, this machine, the test
//! `allocation_cost_does_not_grow_with_the_device_count`): allocate + insert of 1 000 devices
//! 11.8 ms for the first thousand, 10.8 ms for the thousand up to 100 000 (2 030 and 2 032
//! bitmap words read); one allocation at 100 000 devices 0.18 µs. The test asserts the word
//! count (a complexity check), not the time.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use capybara_common::peer::{MAX_PEERS, PeerId};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::Core,
    domain::{Peer, Protocol, ProxyAccess, PublicKey, User, UserDetail, UserName},
};
use crate::{
    net::Cidr,
    store::{Cf, keys},
};

/// What the store holds for a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The device.
    pub peer: Peer,
    /// The client's private key, sealed; only with `--keep-client-keys`.
    pub sealed_key: Option<String>,
}

/// What the store holds for a proxy identity (`service::proxies`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyRecord {
    /// The identity.
    pub access: ProxyAccess,
    /// Its credential: Shadowsocks, 32 random bytes in base64 (the key, or the password, by the
    /// cipher: `service::proxies`); VLESS, the UUID (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
    pub credential: String,
}

/// A kernel line of a user: a device's or a proxy identity's (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    /// The dense id.
    pub id: PeerId,
    /// A proxy identity's (no allowed IPs, no tunnel peer), not a device's.
    pub proxy: bool,
}

/// The tunnel subnets devices get their addresses from: host offset `o` is IPv4
/// `net4 + o` and IPv6 `net6 + o`.
#[derive(Clone, Copy, Debug)]
struct Pool {
    /// The server's IPv4 address and prefix (`--tunnel-ipv4`).
    server4: Ipv4Net,
    /// The server's IPv6 address and prefix (`--tunnel-ipv6`).
    server6: Ipv6Net,
    /// Host offsets `1..=hosts` of the IPv4 subnet (no network, no broadcast).
    hosts: u32,
}

impl Pool {
    fn new(server4: Ipv4Net, server6: Ipv6Net) -> Pool {
        let len = u32::from(server4.prefix_len().min(31));
        let hosts = u32::try_from((1u64 << (32 - len)).saturating_sub(2)).unwrap_or(u32::MAX);
        Pool {
            server4,
            server6,
            hosts,
        }
    }

    /// The host offset of an IPv4 address, if it is one of the subnet's hosts.
    fn offset4(&self, a: Ipv4Addr) -> Option<u32> {
        let o = u32::from(a).checked_sub(u32::from(self.server4.network()))?;
        (1..=self.hosts).contains(&o).then_some(o)
    }

    /// The host offset of an IPv6 address, if an IPv4 host has that offset too.
    fn offset6(&self, a: Ipv6Addr) -> Option<u32> {
        let o = u128::from(a).checked_sub(u128::from(self.server6.network()))?;
        let o = u32::try_from(o).ok()?;
        (1..=self.hosts).contains(&o).then_some(o)
    }
}

/// A set of numbers `0..` as bits in `u64` words, with the lowest number not in it found
/// without a scan: every word before `open` is full (`set` advances it past the words it
/// fills, `clear` moves it back), so the answer is in word `open`.
#[derive(Debug, Default)]
struct Bitmap {
    words: Vec<u64>,
    /// Every word before this one is full.
    open: usize,
    /// Words read to keep `open` and answer `first_free`, in all (the scale test checks it).
    visited: std::sync::atomic::AtomicU64,
}

impl Bitmap {
    fn set(&mut self, i: u32) {
        let (w, b) = (i as usize / 64, i % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
        while self.words.get(self.open) == Some(&u64::MAX) {
            self.open += 1;
            self.visited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn clear(&mut self, i: u32) {
        let (w, b) = (i as usize / 64, i % 64);
        if let Some(x) = self.words.get_mut(w) {
            *x &= !(1 << b);
            self.open = self.open.min(w);
        }
    }

    /// Whether `i` is in the set.
    fn contains(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// The lowest number not in the set.
    fn first_free(&self) -> u64 {
        self.visited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let free = self
            .words
            .get(self.open)
            .map_or(0, |x| u64::from((!x).trailing_zeros()));
        self.open as u64 * 64 + free
    }

    #[cfg(test)]
    fn visited(&self) -> u64 {
        self.visited.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The index itself. `ids` and `offsets` are what allocation reads: a bit is set while
/// anything holds the id (a stored device, a kept unknown kernel peer) or the host offset
/// (the server's addresses, a stored device's IPv4 or IPv6 address, a kept unknown kernel
/// peer's host address); the sets say who, so a bit is cleared only when its last holder goes.
#[derive(Debug)]
struct Index {
    pool: Pool,
    /// Peer key (`user/device`) → record.
    peers: BTreeMap<String, PeerRecord>,
    /// Stored devices' ids → their peer keys (kernel events name a device by id).
    used_ids: BTreeMap<PeerId, String>,
    /// Stored devices' IPv4 addresses → their peer keys (the MFA page finds a device by its
    /// tunnel source address).
    used_v4: BTreeMap<Ipv4Addr, String>,
    /// Stored devices' IPv6 addresses → their peer keys.
    used_v6: BTreeMap<Ipv6Addr, String>,
    pubkeys: HashMap<PublicKey, String>,
    /// Proxy key (`user/protocol`) → proxy identity.
    proxies: BTreeMap<String, ProxyRecord>,
    /// Proxy identities' ids → their proxy keys.
    proxy_ids: BTreeMap<PeerId, String>,
    /// Ids of kernel peers the store does not know, kept at start.
    reserved_ids: BTreeSet<PeerId>,
    /// Host addresses of kernel peers the store does not know, kept at start.
    reserved_addrs: BTreeSet<IpAddr>,
    /// Ids held (`0..MAX_PEERS`).
    ids: Bitmap,
    /// Host offsets held (`0..=hosts`; 0 is the network, always held).
    offsets: Bitmap,
}

impl Index {
    fn new(pool: Pool) -> Index {
        let mut ix = Index {
            pool,
            peers: BTreeMap::new(),
            used_ids: BTreeMap::new(),
            used_v4: BTreeMap::new(),
            used_v6: BTreeMap::new(),
            pubkeys: HashMap::new(),
            proxies: BTreeMap::new(),
            proxy_ids: BTreeMap::new(),
            reserved_ids: BTreeSet::new(),
            reserved_addrs: BTreeSet::new(),
            ids: Bitmap::default(),
            offsets: Bitmap::default(),
        };
        ix.offsets.set(0);
        for o in [
            pool.offset4(pool.server4.addr()),
            pool.offset6(pool.server6.addr()),
        ]
        .into_iter()
        .flatten()
        {
            ix.offsets.set(o);
        }
        ix
    }

    fn records_of(&self, user: &UserName) -> Vec<PeerRecord> {
        let prefix = keys::user_peers_prefix(user.as_str());
        self.peers
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn proxies_of(&self, user: &UserName) -> Vec<ProxyRecord> {
        let prefix = keys::user_proxies_prefix(user.as_str());
        self.proxies
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn detail(&self, user: User) -> UserDetail {
        UserDetail {
            peers: self
                .records_of(&user.name)
                .into_iter()
                .map(|r| r.peer)
                .collect(),
            proxies: self
                .proxies_of(&user.name)
                .into_iter()
                .map(|r| r.access)
                .collect(),
            user,
        }
    }

    /// The lowest free id (devices and proxy identities share them).
    fn allocate_id(&self) -> Result<PeerId, ServiceError> {
        let id = self.ids.first_free();
        PeerId::try_from(id)
            .ok()
            .filter(|id| *id < MAX_PEERS)
            .ok_or_else(|| ServiceError::Exhausted {
                what: "peer id".into(),
            })
    }

    /// The `n` lowest free ids that are not in `taken` (ids allocated but not yet inserted);
    /// reads past the first free id only as far as it must (`n` and `taken` are small).
    fn allocate_ids(&self, n: usize, taken: &[PeerId]) -> Result<Vec<PeerId>, ServiceError> {
        let mut out = Vec::with_capacity(n);
        let mut i = self.ids.first_free();
        while out.len() < n {
            let id = PeerId::try_from(i)
                .ok()
                .filter(|id| *id < MAX_PEERS)
                .ok_or_else(|| ServiceError::Exhausted {
                    what: "peer id".into(),
                })?;
            if !self.ids.contains(i) && !taken.contains(&id) {
                out.push(id);
            }
            i += 1;
        }
        Ok(out)
    }

    /// The lowest free id and host offset; the errors name the flag to change.
    fn allocate(&self) -> Result<(PeerId, Ipv4Addr, Ipv6Addr), ServiceError> {
        let id = self.allocate_id()?;
        let Pool {
            server4,
            server6,
            hosts,
        } = self.pool;
        let (net, server) = (server4.trunc(), server4.addr());
        let offset = self.offsets.first_free();
        let offset = u32::try_from(offset)
            .ok()
            .filter(|o| *o <= hosts)
            .ok_or_else(|| ServiceError::Exhausted {
                what: format!(
                    "IPv4 address in {net} (--tunnel-ipv4 {server}/{len}: {devices} devices); \
                     remove unused devices (`capybara user remove`), or restart the agent with \
                     a larger subnet that holds the current one{}",
                    if net.prefix_len() > 15 {
                        format!(", e.g. --tunnel-ipv4 {server}/15 (131 069 devices)")
                    } else {
                        String::new()
                    },
                    len = net.prefix_len(),
                    devices = hosts.saturating_sub(1),
                ),
            })?;
        let v4 = Ipv4Addr::from(u32::from(net.network()) + offset);
        // The IPv6 address has the same host offset: the IPv6 subnet must have room for it.
        let net6 = server6.trunc();
        let host_bits6 = 128 - u32::from(net6.prefix_len());
        if host_bits6 < 128 && u128::from(offset) >> host_bits6 != 0 {
            return Err(ServiceError::Exhausted {
                what: format!(
                    "IPv6 address in {net6} for host offset {offset} of {v4} (--tunnel-ipv6 \
                     {}/{}); give --tunnel-ipv6 a subnet at least as large as --tunnel-ipv4's, \
                     e.g. a /64",
                    server6.addr(),
                    net6.prefix_len(),
                ),
            });
        }
        let v6 = Ipv6Addr::from(u128::from(net6.network()) + u128::from(offset));
        Ok((id, v4, v6))
    }

    /// Sets or clears the bit of host offset `o` by whether anything still holds it.
    fn refresh_offset(&mut self, o: u32) {
        let p = self.pool;
        let v4 = Ipv4Addr::from(u32::from(p.server4.network()).wrapping_add(o));
        let v6 = Ipv6Addr::from(u128::from(p.server6.network()).wrapping_add(u128::from(o)));
        let held = o == 0
            || v4 == p.server4.addr()
            || v6 == p.server6.addr()
            || self.used_v4.contains_key(&v4)
            || self.used_v6.contains_key(&v6)
            || self.reserved_addrs.contains(&IpAddr::V4(v4))
            || self.reserved_addrs.contains(&IpAddr::V6(v6));
        if held {
            self.offsets.set(o);
        } else {
            self.offsets.clear(o);
        }
    }

    /// The host offsets `peer`'s addresses stand for (one, or two after `--tunnel-ipv4` grew).
    fn offsets_of(&self, peer: &Peer) -> [Option<u32>; 2] {
        [self.pool.offset4(peer.ipv4), self.pool.offset6(peer.ipv6)]
    }

    fn hold(&mut self, peer: &Peer) {
        let pkey = keys::peer(peer.user.as_str(), peer.device.as_str());
        self.used_ids.insert(peer.id, pkey.clone());
        if peer.id < MAX_PEERS {
            self.ids.set(peer.id);
        }
        self.used_v4.insert(peer.ipv4, pkey.clone());
        self.used_v6.insert(peer.ipv6, pkey);
        for o in self.offsets_of(peer).into_iter().flatten() {
            self.offsets.set(o);
        }
    }

    fn release(&mut self, peer: &Peer) {
        self.used_ids.remove(&peer.id);
        if !self.reserved_ids.contains(&peer.id) {
            self.ids.clear(peer.id);
        }
        self.used_v4.remove(&peer.ipv4);
        self.used_v6.remove(&peer.ipv6);
        for o in self.offsets_of(peer).into_iter().flatten() {
            self.refresh_offset(o);
        }
    }

    fn insert(&mut self, pkey: String, rec: PeerRecord) {
        if let Some(old) = self.peers.get(&pkey).map(|r| r.peer.clone()) {
            self.pubkeys.remove(&old.public_key);
            self.release(&old);
        }
        self.hold(&rec.peer);
        self.pubkeys.insert(rec.peer.public_key, pkey.clone());
        self.peers.insert(pkey, rec);
    }

    fn remove(&mut self, peer: &Peer) {
        let pkey = keys::peer(peer.user.as_str(), peer.device.as_str());
        // What the index holds under that key is what leaves (the caller's copy may be older).
        let Some(rec) = self.peers.remove(&pkey) else {
            return;
        };
        self.pubkeys.remove(&rec.peer.public_key);
        self.release(&rec.peer);
    }

    fn insert_proxy(&mut self, rec: ProxyRecord) {
        let a = &rec.access;
        let pkey = keys::proxy(a.user.as_str(), a.protocol.as_str());
        if let Some(old) = self.proxies.get(&pkey).map(|r| r.access.clone()) {
            self.remove_proxy(&old);
        }
        self.proxy_ids.insert(a.id, pkey.clone());
        if a.id < MAX_PEERS {
            self.ids.set(a.id);
        }
        self.proxies.insert(pkey, rec);
    }

    fn remove_proxy(&mut self, access: &ProxyAccess) {
        let pkey = keys::proxy(access.user.as_str(), access.protocol.as_str());
        let Some(rec) = self.proxies.remove(&pkey) else {
            return;
        };
        let id = rec.access.id;
        self.proxy_ids.remove(&id);
        if !self.reserved_ids.contains(&id) && !self.used_ids.contains_key(&id) {
            self.ids.clear(id);
        }
    }

    /// A kept unknown kernel peer: its id and host addresses stay out of allocation.
    fn reserve(&mut self, id: PeerId, allowed: &[Cidr]) {
        self.reserved_ids.insert(id);
        if id < MAX_PEERS {
            self.ids.set(id);
        }
        for c in allowed.iter().filter(|c| c.is_host()) {
            self.reserved_addrs.insert(c.addr());
            let o = match c.addr() {
                IpAddr::V4(a) => self.pool.offset4(a),
                IpAddr::V6(a) => self.pool.offset6(a),
            };
            if let Some(o) = o {
                self.offsets.set(o);
            }
        }
    }
}

/// The users' devices in memory, and the user records in the store.
#[derive(Debug)]
pub struct Directory {
    core: Arc<Core>,
    /// Reads take it briefly and never wait for the disk.
    index: RwLock<Index>,
}

/// The allowed IPs of a device: its two host routes.
pub fn allowed_ips(peer: &Peer) -> Vec<Cidr> {
    vec![
        Cidr::host(std::net::IpAddr::V4(peer.ipv4)),
        Cidr::host(std::net::IpAddr::V6(peer.ipv6)),
    ]
}

impl Directory {
    /// Reads every device from the store.
    pub fn load(core: Arc<Core>) -> Result<Directory, ServiceError> {
        let mut index = Index::new(Pool::new(core.cfg.server_v4, core.cfg.server_v6));
        let t = std::time::Instant::now();
        for (key, rec) in core.store.scan::<PeerRecord>(Cf::Peers, "")? {
            index.insert(key, rec);
        }
        for (_, rec) in core.store.scan::<ProxyRecord>(Cf::Proxies, "")? {
            index.insert_proxy(rec);
        }
        tracing::info!(
            devices = index.peers.len(),
            proxies = index.proxies.len(),
            ms = t.elapsed().as_millis(),
            "devices read from the store"
        );
        Ok(Directory {
            core,
            index: RwLock::new(index),
        })
    }

    /// Every device, in `user/device` order.
    pub fn all(&self) -> Vec<PeerRecord> {
        self.index.read().unwrap().peers.values().cloned().collect()
    }

    /// Runs `f` over every device record, in `user/device` order, under one read lock (no
    /// copy of the index: start-up walks 100 000 devices).
    pub fn with_records<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &PeerRecord>) -> R) -> R {
        let ix = self.index.read().unwrap();
        f(&mut ix.peers.values())
    }

    /// Every device's id and public key.
    pub fn ids_and_keys(&self) -> (BTreeSet<PeerId>, BTreeSet<PublicKey>) {
        let ix = self.index.read().unwrap();
        (
            ix.used_ids.keys().copied().collect(),
            ix.pubkeys.keys().copied().collect(),
        )
    }

    /// Whether `id` is a stored device's or proxy identity's.
    pub fn has_id(&self, id: PeerId) -> bool {
        let ix = self.index.read().unwrap();
        ix.used_ids.contains_key(&id) || ix.proxy_ids.contains_key(&id)
    }

    /// The kernel lines of `user`: its devices' ids, then its proxy identities' ids.
    pub fn user_lines(&self, user: &UserName) -> Vec<Line> {
        let ix = self.index.read().unwrap();
        let devices = ix.records_of(user).into_iter().map(|r| Line {
            id: r.peer.id,
            proxy: false,
        });
        let proxies = ix.proxies_of(user).into_iter().map(|r| Line {
            id: r.access.id,
            proxy: true,
        });
        devices.chain(proxies).collect()
    }

    /// The proxy identities of `user`, by protocol.
    pub fn proxy_records(&self, user: &UserName) -> Vec<ProxyRecord> {
        self.index.read().unwrap().proxies_of(user)
    }

    /// `user`'s proxy identity for `protocol`.
    pub fn proxy(&self, user: &UserName, protocol: Protocol) -> Option<ProxyRecord> {
        let pkey = keys::proxy(user.as_str(), protocol.as_str());
        self.index.read().unwrap().proxies.get(&pkey).cloned()
    }

    /// Every proxy identity, in `user/protocol` order.
    pub fn all_proxies(&self) -> Vec<ProxyRecord> {
        self.index
            .read()
            .unwrap()
            .proxies
            .values()
            .cloned()
            .collect()
    }

    /// The proxy identity with dataplane id `id`.
    pub fn proxy_by_id(&self, id: PeerId) -> Option<ProxyAccess> {
        let ix = self.index.read().unwrap();
        let pkey = ix.proxy_ids.get(&id)?;
        ix.proxies.get(pkey).map(|r| r.access.clone())
    }

    /// Free ids for `n` new proxy identities: the lowest ids no device or proxy identity
    /// holds and none of `taken` (allocated for the same change, not yet inserted); no
    /// address: a proxy identity has none.
    pub fn allocate_ids(&self, n: usize, taken: &[PeerId]) -> Result<Vec<PeerId>, ServiceError> {
        self.index.read().unwrap().allocate_ids(n, taken)
    }

    /// A committed new proxy identity joins the index.
    pub fn insert_proxy(&self, rec: ProxyRecord) {
        self.index.write().unwrap().insert_proxy(rec);
    }

    /// A committed removal of a proxy identity leaves the index (its id is free again).
    pub fn remove_proxy(&self, access: &ProxyAccess) {
        self.index.write().unwrap().remove_proxy(access);
    }

    /// The device records of `user`.
    pub fn records(&self, user: &UserName) -> Vec<PeerRecord> {
        self.index.read().unwrap().records_of(user)
    }

    /// The record under `user/device` key `pkey`.
    pub fn record(&self, pkey: &str) -> Option<PeerRecord> {
        self.index.read().unwrap().peers.get(pkey).cloned()
    }

    /// The devices of `user`.
    pub fn user_peers(&self, user: &UserName) -> Vec<Peer> {
        self.records(user).into_iter().map(|r| r.peer).collect()
    }

    /// The device with public key `key`.
    pub fn peer_by_key(&self, key: &PublicKey) -> Option<Peer> {
        let ix = self.index.read().unwrap();
        ix.pubkeys
            .get(key)
            .and_then(|k| ix.peers.get(k))
            .map(|r| r.peer.clone())
    }

    /// The device with dataplane id `id` (the id kernel events name it by).
    pub fn peer_by_id(&self, id: PeerId) -> Option<Peer> {
        let ix = self.index.read().unwrap();
        let pkey = ix.used_ids.get(&id)?;
        ix.peers.get(pkey).map(|r| r.peer.clone())
    }

    /// The device whose tunnel address is `addr` (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address).
    pub fn peer_at(&self, addr: IpAddr) -> Option<Peer> {
        let ix = self.index.read().unwrap();
        let pkey = match addr {
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => ix.used_v4.get(&v4),
                None => ix.used_v6.get(&a),
            },
            IpAddr::V4(a) => ix.used_v4.get(&a),
        }?;
        ix.peers.get(pkey).map(|r| r.peer.clone())
    }

    /// A stored user, or `NotFound`.
    pub fn user(&self, name: &UserName) -> Result<User, ServiceError> {
        self.core
            .store
            .get::<User>(Cf::Users, &keys::user(name.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "user",
                name: name.to_string(),
            })
    }

    /// Whether a user of that name is stored.
    pub fn user_exists(&self, name: &UserName) -> Result<bool, ServiceError> {
        Ok(self
            .core
            .store
            .get::<User>(Cf::Users, &keys::user(name.as_str()))?
            .is_some())
    }

    /// Every stored user, by name.
    pub fn users(&self) -> Result<Vec<User>, ServiceError> {
        Ok(self
            .core
            .store
            .scan::<User>(Cf::Users, "")?
            .into_iter()
            .map(|(_, u)| u)
            .collect())
    }

    /// Every stored user's name (the store's users, without copying their devices).
    pub fn user_names(&self) -> Result<Vec<UserName>, ServiceError> {
        Ok(self.users()?.into_iter().map(|u| u.name).collect())
    }

    /// One page of user names in order: up to `size` after the name `after` (read from the
    /// store a page at a time), and whether more follow.
    pub fn user_names_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<UserName>, bool), ServiceError> {
        let page = self
            .core
            .store
            .page_forward::<User>(Cf::Users, "", after, size)?;
        Ok((
            page.items.into_iter().map(|u| u.name).collect(),
            page.next.is_some(),
        ))
    }

    /// Every user with its devices' records, by name, read under one index lock.
    pub fn users_with_peers(&self) -> Result<Vec<(User, Vec<Peer>)>, ServiceError> {
        let ix = self.index.read().unwrap();
        let users = self.users()?;
        Ok(users
            .into_iter()
            .map(|u| {
                let peers = ix.records_of(&u.name).into_iter().map(|r| r.peer).collect();
                (u, peers)
            })
            .collect())
    }

    /// Every user with its devices and proxy identities, by name, read under one index lock.
    pub fn user_details(&self) -> Result<Vec<UserDetail>, ServiceError> {
        let ix = self.index.read().unwrap();
        Ok(self.users()?.into_iter().map(|u| ix.detail(u)).collect())
    }

    /// One user with its devices and proxy identities.
    pub fn user_detail(&self, name: &UserName) -> Result<UserDetail, ServiceError> {
        let user = self.user(name)?;
        Ok(self.index.read().unwrap().detail(user))
    }

    /// One page of users by name, each with its devices: up to `size` users after the name
    /// `after` (read from the store a page at a time, never every user), and whether more
    /// follow.
    pub fn users_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<UserDetail>, bool), ServiceError> {
        let page = self
            .core
            .store
            .page_forward::<User>(Cf::Users, "", after, size)?;
        let ix = self.index.read().unwrap();
        let users = page.items.into_iter().map(|user| ix.detail(user)).collect();
        Ok((users, page.next.is_some()))
    }

    /// One page of devices in `user/device` key order (of `user` only when given): up to
    /// `size` after key `after`, read from the index under its read lock without copying the
    /// rest of it, with their keys, and whether more follow.
    pub fn peers_page(
        &self,
        user: Option<&UserName>,
        after: Option<&str>,
        size: usize,
    ) -> (Vec<(String, Peer)>, bool) {
        let prefix = user.map(|u| keys::user_peers_prefix(u.as_str()));
        let ix = self.index.read().unwrap();
        let start = match (after, prefix.as_deref()) {
            (Some(a), Some(p)) if a < p => std::ops::Bound::Included(p),
            (Some(a), _) => std::ops::Bound::Excluded(a),
            (None, Some(p)) => std::ops::Bound::Included(p),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let mut it = ix
            .peers
            .range::<str, _>((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| prefix.as_deref().is_none_or(|p| k.starts_with(p)));
        let page = it
            .by_ref()
            .take(size)
            .map(|(k, r)| (k.clone(), r.peer.clone()))
            .collect();
        (page, it.next().is_some())
    }

    /// One page of every user's kernel lines: the devices and proxy identities of up to `users`
    /// users (those with either, in name order) after the user key prefix `after`
    /// (`keys::user_peers_prefix`), and the last user's key prefix when more users follow.
    pub fn user_lines_page(
        &self,
        after: Option<&str>,
        users: usize,
    ) -> (Vec<Peer>, Vec<ProxyRecord>, Option<String>) {
        let ix = self.index.read().unwrap();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        // The next users of each map (at most `users + 1` each: one more tells whether more
        // follow), merged in key-prefix order (`user/`, as the keys sort: `u1-x/` before
        // `u1/`). Keys are `user/…` in both maps.
        // A user's keys are one contiguous run of either map (a prefix range), so the next
        // users are found by walking each map only as far as `users + 1` distinct prefixes.
        let next_users = |ks: &mut dyn Iterator<Item = &String>| {
            let mut found: Vec<String> = Vec::new();
            for k in ks {
                if after.is_some_and(|a| k.starts_with(a)) {
                    continue;
                }
                let user = k.split_once('/').map_or(k.as_str(), |(u, _)| u);
                let prefix = keys::user_peers_prefix(user);
                if found.last() != Some(&prefix) {
                    if found.len() > users {
                        break;
                    }
                    found.push(prefix);
                }
            }
            found
        };
        let range = (start, std::ops::Bound::Unbounded);
        let mut names = std::collections::BTreeSet::new();
        names.extend(next_users(
            &mut ix.peers.range::<str, _>(range).map(|(k, _)| k),
        ));
        names.extend(next_users(
            &mut ix.proxies.range::<str, _>(range).map(|(k, _)| k),
        ));
        let more = names.len() > users;
        let page: Vec<String> = names.into_iter().take(users).collect();
        let mut peers = Vec::new();
        let mut proxies = Vec::new();
        for prefix in &page {
            let name = prefix.trim_end_matches('/');
            peers.extend(
                ix.peers
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(_, r)| r.peer.clone()),
            );
            let prefix = keys::user_proxies_prefix(name);
            proxies.extend(
                ix.proxies
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, r)| r.clone()),
            );
        }
        let next = more.then(|| page.last().cloned()).flatten();
        (peers, proxies, next)
    }

    /// A free peer id and addresses for a new device: the lowest free id, the lowest free
    /// host offset (its IPv4 and IPv6 addresses). Constant time (see the module docs).
    pub fn allocate(&self) -> Result<(PeerId, Ipv4Addr, Ipv6Addr), ServiceError> {
        self.index.read().unwrap().allocate()
    }

    /// Kernel peers the store does not know, kept at start (`--keep-unknown-peers`): their ids
    /// and host addresses are never handed out while the agent runs.
    pub fn reserve_unknown(&self, peers: &BTreeMap<PeerId, Vec<Cidr>>) {
        let mut ix = self.index.write().unwrap();
        for (id, allowed) in peers {
            ix.reserve(*id, allowed);
        }
    }

    /// A committed new (or re-keyed) device joins the index.
    pub fn insert(&self, pkey: String, rec: PeerRecord) {
        self.index.write().unwrap().insert(pkey, rec);
    }

    /// A committed removal leaves the index.
    pub fn remove(&self, peer: &Peer) {
        self.index.write().unwrap().remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::domain::DeviceName;

    fn index(v4: &str, v6: &str) -> Index {
        Index::new(Pool::new(v4.parse().unwrap(), v6.parse().unwrap()))
    }

    /// Allocates for device `n` and inserts it, as a committed add does.
    fn add(ix: &mut Index, n: u32) -> Peer {
        let (id, ipv4, ipv6) = ix.allocate().unwrap();
        let mut key = [0; 32];
        key[..4].copy_from_slice(&n.to_le_bytes());
        let peer = Peer {
            id,
            user: UserName::parse("name", &format!("u{n}")).unwrap(),
            device: DeviceName::parse("device", "default").unwrap(),
            public_key: PublicKey(key),
            ipv4,
            ipv6,
            created_at: 0,
            key_kept: false,
        };
        let pkey = keys::peer(peer.user.as_str(), peer.device.as_str());
        ix.insert(
            pkey,
            PeerRecord {
                peer: peer.clone(),
                sealed_key: None,
            },
        );
        peer
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn allocation_takes_the_lowest_free_id_and_address_after_removals() {
        let mut ix = index("10.99.0.1/24", "fd99::1/64");
        let peers: Vec<Peer> = (0..10).map(|n| add(&mut ix, n)).collect();
        assert_eq!((peers[0].id, peers[0].ipv4), (0, v4("10.99.0.2")));
        assert_eq!((peers[9].id, peers[9].ipv4), (9, v4("10.99.0.11")));
        ix.remove(&peers[7]);
        ix.remove(&peers[3]);
        let a = add(&mut ix, 10);
        assert_eq!(
            (a.id, a.ipv4, a.ipv6),
            (3, v4("10.99.0.5"), "fd99::5".parse().unwrap())
        );
        let b = add(&mut ix, 11);
        assert_eq!((b.id, b.ipv4), (7, v4("10.99.0.9")));
        let c = add(&mut ix, 12);
        assert_eq!((c.id, c.ipv4), (10, v4("10.99.0.12")));
        // A re-key (same key, new public key) keeps the id and the addresses held.
        let pkey = keys::peer(c.user.as_str(), c.device.as_str());
        let mut rekeyed = ix.peers[&pkey].clone();
        rekeyed.peer.public_key = PublicKey([9; 32]);
        ix.insert(pkey.clone(), rekeyed);
        assert!(!ix.pubkeys.contains_key(&c.public_key));
        assert_eq!(ix.pubkeys[&PublicKey([9; 32])], pkey);
        let d = add(&mut ix, 13);
        assert_eq!((d.id, d.ipv4), (11, v4("10.99.0.13")));
        // Removing with an older copy of the record releases what the index holds.
        ix.remove(&c);
        assert!(!ix.pubkeys.contains_key(&PublicKey([9; 32])));
        assert_eq!(ix.allocate().unwrap().0, 10);
    }

    #[test]
    fn kept_unknown_kernel_peers_keep_their_ids_and_addresses() {
        let mut ix = index("10.99.0.1/24", "fd99::1/64");
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        // Id 0 with .2 and the IPv6 address of offset 3; id 2 with .5 and a route (not a host).
        ix.reserve(0, &[cidr("10.99.0.2/32"), cidr("fd99::3/128")]);
        ix.reserve(2, &[cidr("10.99.0.5/32"), cidr("10.99.0.0/28")]);
        let a = add(&mut ix, 0);
        assert_eq!(
            (a.id, a.ipv4, a.ipv6),
            (1, v4("10.99.0.4"), "fd99::4".parse().unwrap())
        );
        let b = add(&mut ix, 1);
        assert_eq!((b.id, b.ipv4), (3, v4("10.99.0.6")));
        // Removing stored devices never frees a reserved id or address.
        ix.remove(&a);
        ix.remove(&b);
        let c = add(&mut ix, 2);
        assert_eq!((c.id, c.ipv4), (1, v4("10.99.0.4")));
    }

    #[test]
    fn a_stored_device_of_a_smaller_subnet_keeps_both_its_offsets() {
        // Stored under 10.99.0.1/24 (10.99.0.2, fd99::2), read with 10.99.0.1/15 (network
        // 10.98.0.0): its IPv4 address is offset 65 538 now, its IPv6 address still offset 2.
        let mut ix = index("10.99.0.1/15", "fd99::1/64");
        let mut old = add(&mut index("10.99.0.1/24", "fd99::1/64"), 0);
        old.id = 0;
        ix.insert(
            keys::peer(old.user.as_str(), old.device.as_str()),
            PeerRecord {
                peer: old.clone(),
                sealed_key: None,
            },
        );
        // Offset 1 is the server's IPv6 address, 2 the old device's: the first free is 3.
        let new = add(&mut ix, 1);
        assert_eq!(
            (new.id, new.ipv4, new.ipv6),
            (1, v4("10.98.0.3"), "fd99::3".parse().unwrap())
        );
        ix.remove(&old);
        assert_eq!(ix.allocate().unwrap().1, v4("10.98.0.2"));
    }

    /// Issue 19: adding 100 000 devices one by one is linear: each allocation reads a
    /// constant number of bitmap words, however many devices there are.
    #[test]
    fn allocation_cost_does_not_grow_with_the_device_count() {
        const N: u32 = 100_000;
        const WINDOW: u32 = 1_000;
        let net = crate::daemon::DEFAULT_TUNNEL_IPV4;
        let mut ix = index(net, "fd70::1/64");
        let visited = |ix: &Index| ix.ids.visited() + ix.offsets.visited();
        let mut windows = Vec::new();
        let (mut t, mut w) = (std::time::Instant::now(), visited(&ix));
        let mut last = None;
        for n in 0..N {
            if n == N - WINDOW {
                (t, w) = (std::time::Instant::now(), visited(&ix));
            }
            last = Some(add(&mut ix, n));
            if n == WINDOW - 1 || n == N - 1 {
                windows.push((t.elapsed(), visited(&ix) - w));
            }
        }
        let [(t_first, w_first), (t_last, w_last)] = windows[..] else {
            panic!("two windows");
        };
        eprintln!(
            "allocate+insert, {WINDOW} devices: first {t_first:?} ({w_first} words read), \
             last (at {N}) {t_last:?} ({w_last} words read)"
        );
        // Two `first_free` reads per allocation, and `set` moves past each filled word once.
        assert!(
            w_last <= 2 * u64::from(WINDOW) + 2 * u64::from(WINDOW / 64 + 1),
            "{w_last}"
        );
        assert!(w_last <= w_first + 4, "first {w_first}, last {w_last}");
        let t = std::time::Instant::now();
        for _ in 0..WINDOW {
            std::hint::black_box(ix.allocate().unwrap());
        }
        eprintln!(
            "allocate alone at {N} devices: {:?} each",
            t.elapsed() / WINDOW
        );
        let last = last.unwrap();
        // Offset 100 001 of 10.70.0.0/15.
        assert_eq!((last.id, last.ipv4), (N - 1, v4("10.71.134.161")));
    }
}
