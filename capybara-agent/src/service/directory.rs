//! The directory: the users' devices as an in-memory index over the store (by `user/device`,
//! by public key, the ids and addresses in use), user records, and address allocation. Every
//! feature reads devices here; only `devices` and `users` change it (under the writer lock,
//! after their batch is committed).
//!
//! ## Addresses and ids
//! A device gets the lowest free host of the tunnel's IPv4 subnet (not the network, the
//! server's address or the broadcast) and the IPv6 address with the same host offset in the
//! IPv6 subnet, and the lowest free dense peer id. Both are rebuilt from the store at open.
//! A full IPv4 subnet (or an IPv6 subnet too small for the offset) is `Exhausted`, naming
//! `--tunnel-ipv4` (`--tunnel-ipv6`) and what to do; the default subnet holds every peer id
//! (`daemon::DEFAULT_TUNNEL_IPV4`).
//! Kernel peers the store does not know are removed at start (`service::devices`); kept with
//! `--keep-unknown-peers`, they keep their ids and addresses: allocation never hands them out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use capybara_common::peer::{MAX_PEERS, PeerId};
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::Core,
    domain::{Peer, PublicKey, User, UserDetail, UserName},
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

/// The index itself.
#[derive(Debug, Default)]
struct Index {
    /// Peer key (`user/device`) → record.
    peers: BTreeMap<String, PeerRecord>,
    used_ids: BTreeSet<PeerId>,
    used_v4: BTreeSet<Ipv4Addr>,
    pubkeys: HashMap<PublicKey, String>,
}

impl Index {
    fn records_of(&self, user: &UserName) -> Vec<PeerRecord> {
        let prefix = keys::user_peers_prefix(user.as_str());
        self.peers
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r.clone())
            .collect()
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
        let mut index = Index::default();
        let t = std::time::Instant::now();
        for (key, rec) in core.store.scan::<PeerRecord>(Cf::Peers, "")? {
            index.used_ids.insert(rec.peer.id);
            index.used_v4.insert(rec.peer.ipv4);
            index.pubkeys.insert(rec.peer.public_key, key.clone());
            index.peers.insert(key, rec);
        }
        tracing::info!(
            devices = index.peers.len(),
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
        (ix.used_ids.clone(), ix.pubkeys.keys().copied().collect())
    }

    /// Whether `id` is a stored device's.
    pub fn has_id(&self, id: PeerId) -> bool {
        self.index.read().unwrap().used_ids.contains(&id)
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
        let users = page
            .items
            .into_iter()
            .map(|user| UserDetail {
                peers: ix
                    .records_of(&user.name)
                    .into_iter()
                    .map(|r| r.peer)
                    .collect(),
                user,
            })
            .collect();
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

    /// The devices of one page of users that have devices, in `user/device` key order: every
    /// device of up to `users` users whose key prefix (`user/`) comes after `after` (a user's
    /// devices are contiguous in that order), read under the index's read lock without copying
    /// the rest of it; and the last user's prefix when more users follow.
    pub fn user_devices_page(
        &self,
        after: Option<&str>,
        users: usize,
    ) -> (Vec<Peer>, Option<String>) {
        let ix = self.index.read().unwrap();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut out = Vec::new();
        let mut prefix: Option<String> = None;
        let mut seen = 0;
        for (k, r) in ix
            .peers
            .range::<str, _>((start, std::ops::Bound::Unbounded))
        {
            if after.is_some_and(|a| k.starts_with(a)) {
                continue;
            }
            if prefix.as_deref().is_none_or(|p| !k.starts_with(p)) {
                if seen == users {
                    return (out, prefix);
                }
                seen += 1;
                prefix = Some(keys::user_peers_prefix(r.peer.user.as_str()));
            }
            out.push(r.peer.clone());
        }
        (out, None)
    }

    /// A free peer id and addresses for a new device.
    pub fn allocate(&self) -> Result<(PeerId, Ipv4Addr, Ipv6Addr), ServiceError> {
        let ix = self.index.read().unwrap();
        // Peers in the kernel that the store does not know keep their ids and addresses.
        let kernel = self.core.plane.peers();
        let kernel_addrs: BTreeSet<std::net::IpAddr> = kernel
            .values()
            .flatten()
            .filter(|c| c.is_host())
            .map(|c| c.addr())
            .collect();
        let id = (0..MAX_PEERS)
            .find(|i| !ix.used_ids.contains(i) && !kernel.contains_key(i))
            .ok_or_else(|| ServiceError::Exhausted {
                what: "peer id".into(),
            })?;
        let cfg = &self.core.cfg;
        let net = cfg.server_v4.trunc();
        let base = u32::from(net.network());
        let hosts = (1u32 << (32 - net.prefix_len().min(31))).saturating_sub(2);
        let server = cfg.server_v4.addr();
        let (offset, v4) = (1..=hosts)
            .map(|o| (o, Ipv4Addr::from(base + o)))
            .find(|(_, a)| {
                *a != server
                    && !ix.used_v4.contains(a)
                    && !kernel_addrs.contains(&std::net::IpAddr::V4(*a))
            })
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
        // The IPv6 address has the same host offset: the IPv6 subnet must have room for it.
        let net6 = cfg.server_v6.trunc();
        let host_bits6 = 128 - u32::from(net6.prefix_len());
        if host_bits6 < 128 && u128::from(offset) >> host_bits6 != 0 {
            return Err(ServiceError::Exhausted {
                what: format!(
                    "IPv6 address in {net6} for host offset {offset} of {v4} (--tunnel-ipv6 \
                     {}/{}); give --tunnel-ipv6 a subnet at least as large as --tunnel-ipv4's, \
                     e.g. a /64",
                    cfg.server_v6.addr(),
                    net6.prefix_len(),
                ),
            });
        }
        let v6 = Ipv6Addr::from(u128::from(net6.network()) + u128::from(offset));
        Ok((id, v4, v6))
    }

    /// A committed new (or re-keyed) device joins the index.
    pub fn insert(&self, pkey: String, rec: PeerRecord) {
        let mut ix = self.index.write().unwrap();
        if let Some(old) = ix.peers.get(&pkey).map(|r| r.peer.public_key) {
            ix.pubkeys.remove(&old);
        }
        ix.used_ids.insert(rec.peer.id);
        ix.used_v4.insert(rec.peer.ipv4);
        ix.pubkeys.insert(rec.peer.public_key, pkey.clone());
        ix.peers.insert(pkey, rec);
    }

    /// A committed removal leaves the index.
    pub fn remove(&self, peer: &Peer) {
        let mut ix = self.index.write().unwrap();
        ix.used_ids.remove(&peer.id);
        ix.used_v4.remove(&peer.ipv4);
        ix.pubkeys.remove(&peer.public_key);
        ix.peers
            .remove(&keys::peer(peer.user.as_str(), peer.device.as_str()));
    }
}
