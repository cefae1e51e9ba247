//! Devices: adding, removing and re-keying a user's devices, their client configs, and
//! programming them into the dataplane and the tunnel (also every stored device at start).
//!
//! ## Order of a change
//! - **Adding** a device: validate (typed input, existence, uniqueness — an error here changed
//!   nothing) → commit the records **and their audit record** in one synced RocksDB write batch
//!   → program the dataplane (peer, allowed IPs, gate) and the tunnel. If programming fails, a
//!   compensating batch deletes what was committed (audit record included: the change never
//!   took effect) and the error is returned. A SIGKILL after the commit leaves a stored device
//!   that is not programmed yet: [`Devices::reconcile`] programs every stored device at
//!   start-up. The reply (the acknowledgement) is sent only after both steps.
//! - **Removing**: the kernel and the tunnel first, then the batch; a failed commit puts the
//!   device back. A SIGKILL in between leaves a stored device that start-up programs again:
//!   the removal was not acknowledged, so nothing acknowledged is lost.
//!
//! ## Peers the store does not know
//! The store is the truth. A kernel peer the store does not know (left in the pinned maps by an
//! agent whose data dir is gone, a restore of an older backup, or a tool outside the agent) is
//! removed at start, and its counters are logged first: otherwise it would keep its id and
//! addresses, which allocation could never hand out again, and stay in the kernel for good.
//! `--keep-unknown-peers` (`ServiceConfig::keep_unknown_peers`) leaves them alone instead (and
//! allocation then skips their ids and addresses).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    directory::{Directory, PeerRecord, allowed_ips},
    domain::{
        Actor, ClientConfig, DeviceName, Peer, Protocol, UserName, ValidationError, encode_key,
    },
    policy::Policy,
    secrets,
};
use crate::{
    dataplane::DataplaneError,
    store::{Batch, Cf, keys},
};

/// The devices feature.
#[derive(Debug)]
pub struct Devices {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
}

impl Devices {
    /// The feature over the shared core, directory and policy.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>, policy: Arc<Policy>) -> Devices {
        Devices { core, dir, policy }
    }

    /// Reconciles the tunnel and the dataplane with the stored devices (agent start): every
    /// stored device is (re-)programmed; kernel peers the store does not know are left alone.
    pub fn reconcile(&self) -> Result<(), ServiceError> {
        let mut foreign = self.core.plane.peers();
        foreign.retain(|id, _| !self.dir.has_id(*id));
        if !foreign.is_empty() && self.core.cfg.keep_unknown_peers {
            tracing::warn!(
                foreign = ?foreign.keys().collect::<Vec<_>>(),
                "kernel peers the store does not know are left alone (--keep-unknown-peers); their ids and addresses are not handed out"
            );
            // Reserved once here: allocation never reads the kernel's peer table.
            self.dir.reserve_unknown(&foreign);
        }
        if !self.core.cfg.keep_unknown_peers {
            for id in foreign.into_keys() {
                let counters = self.core.plane.peer_stats(id).ok();
                tracing::warn!(
                    peer = id,
                    ?counters,
                    "a kernel peer the store does not know is removed (its counters above)"
                );
                self.core.plane.remove_peer(id)?;
            }
        }
        // In batches (the dataplane's batch syscalls, one tunnel table for all): one call per
        // device took minutes at 100 000 devices.
        let (plane, tunnel): (Vec<_>, Vec<_>) = self.dir.with_records(|recs| {
            recs.map(|rec| {
                let allowed = allowed_ips(&rec.peer);
                (
                    (rec.peer.id, allowed.clone()),
                    (rec.peer.public_key, allowed),
                )
            })
            .unzip()
        });
        let n = plane.len();
        let t = std::time::Instant::now();
        self.core.plane.set_peers(&plane)?;
        drop(plane);
        let plane_ms = t.elapsed().as_millis();
        let t = std::time::Instant::now();
        self.core.tunnel.add_peers(&tunnel)?;
        tracing::info!(
            peers = n,
            plane_ms,
            tunnel_ms = t.elapsed().as_millis(),
            "devices restored from the store"
        );
        Ok(())
    }

    /// Makes the directory, the tunnel and the dataplane match the stored devices of `users`
    /// (every user: `None`) after the store changed under them (a cluster's change applied:
    /// `service::cluster`): a device gone from the store is unprogrammed, a new one programmed,
    /// a changed one (re-keyed) both. Answers the users whose devices changed. A device that
    /// cannot be programmed is logged and left out; the others go on.
    pub fn resync(
        &self,
        users: Option<&BTreeSet<UserName>>,
    ) -> Result<BTreeSet<UserName>, ServiceError> {
        let (stored, current): (BTreeMap<String, PeerRecord>, Vec<PeerRecord>) = match users {
            None => (
                self.core.store.scan(Cf::Peers, "")?.into_iter().collect(),
                self.dir.all(),
            ),
            Some(users) => {
                let mut stored = BTreeMap::new();
                let mut current = Vec::new();
                for u in users {
                    stored.extend(
                        self.core
                            .store
                            .scan::<PeerRecord>(Cf::Peers, &keys::user_peers_prefix(u.as_str()))?,
                    );
                    current.extend(self.dir.records(u));
                }
                (stored, current)
            }
        };
        let mut changed = BTreeSet::new();
        for rec in current {
            let key = keys::peer(rec.peer.user.as_str(), rec.peer.device.as_str());
            match stored.get(&key) {
                Some(s) if s.peer == rec.peer && s.sealed_key == rec.sealed_key => continue,
                _ => {}
            }
            if let Err(e) = self.unprogram(&rec.peer) {
                tracing::error!(error = %e, device = %key, "cluster: cannot unprogram a removed device");
            }
            self.dir.remove(&rec.peer);
            self.policy.forget_online(std::slice::from_ref(&rec.peer));
            changed.insert(rec.peer.user.clone());
        }
        for (key, rec) in stored {
            if self.dir.record(&key).is_some() {
                continue;
            }
            if let Err(e) = self.program(&rec.peer) {
                tracing::error!(error = %e, device = %key, "cluster: cannot program a device");
                continue;
            }
            self.policy.forget_online(std::slice::from_ref(&rec.peer));
            changed.insert(rec.peer.user.clone());
            self.dir.insert(key, rec);
        }
        Ok(changed)
    }

    /// Makes a device record: allocates an id and addresses and generates its key pair.
    pub(super) fn new_peer(
        &self,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<(PeerRecord, [u8; 32]), ServiceError> {
        // A user's proxy identities appear under their protocol's name where devices do
        // (sessions, connections, stats, usage reports): no device may take that name.
        if matches!(
            Protocol::parse("device", device.as_str()),
            Ok(Protocol::Shadowsocks | Protocol::Vless)
        ) {
            return Err(ValidationError::Value {
                field: "device",
                reason: format!(
                    "`{device}` is the name a user's {device} access goes by; choose another \
                     device name"
                ),
            }
            .into());
        }
        let (id, ipv4, ipv6) = self.dir.allocate()?;
        let (private, public_key) = secrets::generate_keypair();
        let keep = &self.core.cfg.keep_client_keys;
        let peer = Peer {
            id,
            user: user.clone(),
            device: device.clone(),
            public_key,
            ipv4,
            ipv6,
            created_at: now(),
            key_kept: keep.is_some(),
        };
        let sealed_key = keep
            .as_ref()
            .map(|s| s.seal(&private, &keys::peer(user.as_str(), device.as_str())));
        Ok((PeerRecord { peer, sealed_key }, private))
    }

    /// Deletes what an add committed (the device, the user if it was new, the audit record)
    /// after programming the kernel or the tunnel failed: the change never took effect.
    fn undo_add(&self, seq: u64, peer: &Peer, added_user: bool) -> Result<(), ServiceError> {
        let mut batch = Batch::default();
        batch.delete(
            Cf::Peers,
            &keys::peer(peer.user.as_str(), peer.device.as_str()),
        );
        if added_user {
            batch.delete(Cf::Users, &keys::user(peer.user.as_str()));
            // A new user's proxy identities were in the same batch (`users::add_user_with`).
            for p in [Protocol::Shadowsocks, Protocol::Vless] {
                batch.delete(Cf::Proxies, &keys::proxy(peer.user.as_str(), p.as_str()));
            }
        }
        batch.delete(Cf::Audit, &keys::audit(seq));
        self.core.store.commit(batch)?;
        self.core.rewind_audit(seq);
        Ok(())
    }

    /// Programs a peer into the dataplane and the tunnel; on error nothing stays programmed.
    pub(super) fn program(&self, peer: &Peer) -> Result<(), ServiceError> {
        let allowed = allowed_ips(peer);
        let plane = &self.core.plane;
        plane.set_peer(peer.id, &allowed)?;
        // Admitted until its user's expiry (held as expired once it passed): the kernel
        // enforces the deadline from the device's first packet; the policy applied next adds
        // its own holds.
        if let Err(e) = plane.set_gate(peer.id, self.policy.first_gate(&peer.user)) {
            let _ = plane.remove_peer(peer.id);
            return Err(e.into());
        }
        if let Err(e) = self.core.tunnel.add_peer(peer.public_key, &allowed) {
            let _ = plane.remove_peer(peer.id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes a peer from the tunnel and the dataplane.
    pub(super) fn unprogram(&self, peer: &Peer) -> Result<(), ServiceError> {
        self.core.tunnel.remove_peer(&peer.public_key)?;
        match self.core.plane.remove_peer(peer.id) {
            Ok(()) | Err(DataplaneError::UnknownPeer { .. }) => Ok(()),
            Err(e) => {
                let _ = self
                    .core
                    .tunnel
                    .add_peer(peer.public_key, &allowed_ips(peer));
                Err(e.into())
            }
        }
    }

    fn config_for(&self, peer: &Peer, private: Option<&[u8; 32]>) -> ClientConfig {
        let cfg = &self.core.cfg;
        let private_key = private.map(encode_key);
        let mut wg = String::from("[Interface]\n");
        if let Some(k) = &private_key {
            wg.push_str(&format!("PrivateKey = {k}\n"));
        } else {
            wg.push_str("# PrivateKey = <shown once when the device was created>\n");
        }
        wg.push_str(&format!("Address = {}/32, {}/128\n", peer.ipv4, peer.ipv6));
        // The DNS of the configuration template applied last, else the agent's `--dns`.
        let dns = self.policy.client_dns();
        if !dns.is_empty() {
            wg.push_str(&format!("DNS = {}\n", dns.join(", ")));
        }
        wg.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
            cfg.server_public_key, cfg.endpoint
        ));
        ClientConfig {
            peer: peer.clone(),
            private_key,
            server_public_key: cfg.server_public_key,
            endpoint: cfg.endpoint.clone(),
            dns,
            wg_quick: wg,
        }
    }

    /// Adds a device to an existing user.
    pub fn add_device(
        &self,
        actor: &Actor,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<ClientConfig, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        let pkey = keys::peer(user.as_str(), device.as_str());
        if self.dir.record(&pkey).is_some() {
            return Err(ServiceError::AlreadyExists {
                what: "device",
                name: pkey,
            });
        }
        let (rec, private) = self.new_peer(user, device)?;
        let added_user = false;
        let mut batch = Batch::default();
        batch.put(Cf::Peers, &pkey, &rec)?;
        self.core.audit(
            &mut batch,
            actor,
            "peer.add",
            format!("peer:{pkey}"),
            None,
            to_json(&rec.peer),
        )?;
        self.commit_device(batch, pkey, rec, &private, added_user)
    }

    /// Commits `batch` (a new device `rec` under `pkey`, maybe its new user, the audit record),
    /// then programs the kernel and the tunnel; if that fails, the commit is undone. On success
    /// the device joins the directory and its client config (with `private`) is returned.
    pub(super) fn commit_device(
        &self,
        batch: Batch,
        pkey: String,
        rec: PeerRecord,
        private: &[u8; 32],
        added_user: bool,
    ) -> Result<ClientConfig, ServiceError> {
        let seq = self.core.next_audit_seq();
        let event = self.core.commit_unpublished(batch)?;
        if let Err(e) = self.program(&rec.peer) {
            self.undo_add(seq, &rec.peer, added_user)?;
            return Err(e);
        }
        self.core.publish(event);
        let cfg = self.config_for(&rec.peer, Some(private));
        let user = rec.peer.user.clone();
        // A new device is not online and has no gate decision yet, whatever a removed device
        // that had its id left behind.
        self.policy.forget_online(std::slice::from_ref(&rec.peer));
        self.dir.insert(pkey, rec);
        // The user's policy covers the new device before the reply (rates, flows, quota, gate).
        if let Err(e) = self.policy.apply(std::slice::from_ref(&user), false) {
            tracing::error!(error = %e, %user, "cannot apply the policy to a new device");
        }
        Ok(cfg)
    }

    /// Devices of `user`, or of everyone.
    pub fn list_peers(&self, user: Option<&UserName>) -> Result<Vec<Peer>, ServiceError> {
        match user {
            Some(u) => {
                self.dir.user(u)?;
                Ok(self.dir.user_peers(u))
            }
            None => Ok(self.dir.all().into_iter().map(|r| r.peer).collect()),
        }
    }

    /// One page of devices in `user/device` order (of `user` only when given): up to `size`
    /// after key `after`, with their keys, and whether more follow.
    pub fn list_peers_page(
        &self,
        user: Option<&UserName>,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<(String, Peer)>, bool), ServiceError> {
        if let Some(u) = user {
            self.dir.user(u)?;
        }
        Ok(self.dir.peers_page(user, after, size))
    }

    /// Removes one device.
    pub fn remove_device(
        &self,
        actor: &Actor,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<Peer, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let pkey = keys::peer(user.as_str(), device.as_str());
        let rec = self
            .dir
            .record(&pkey)
            .ok_or_else(|| ServiceError::NotFound {
                what: "device",
                name: pkey.clone(),
            })?;
        self.unprogram(&rec.peer)?;
        let mut batch = Batch::default();
        batch.delete(Cf::Peers, &pkey);
        self.core.audit(
            &mut batch,
            actor,
            "peer.remove",
            format!("peer:{pkey}"),
            to_json(&rec.peer),
            None,
        )?;
        if let Err(e) = self.core.commit(batch) {
            let _ = self.program(&rec.peer);
            return Err(e);
        }
        self.dir.remove(&rec.peer);
        // Its slot of the device limit is free: the user's other devices are decided again.
        self.policy.forget_online(std::slice::from_ref(&rec.peer));
        if let Err(e) = self.policy.apply(std::slice::from_ref(user), false) {
            tracing::error!(error = %e, %user, "cannot re-apply the policy after a device was removed");
        }
        Ok(rec.peer)
    }

    /// The wg-quick config of a device: from the kept key, or with a new key pair if `rotate`.
    pub fn user_config(
        &self,
        actor: &Actor,
        user: &UserName,
        device: Option<&DeviceName>,
        rotate: bool,
    ) -> Result<ClientConfig, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        let recs = self.dir.records(user);
        let rec = match device {
            Some(d) => recs
                .into_iter()
                .find(|r| r.peer.device == *d)
                .ok_or_else(|| ServiceError::NotFound {
                    what: "device",
                    name: keys::peer(user.as_str(), d.as_str()),
                })?,
            None if recs.len() == 1 => recs.into_iter().next().expect("one device"),
            None => {
                return Err(ServiceError::DeviceRequired {
                    user: user.to_string(),
                    count: recs.len(),
                });
            }
        };
        let pkey = keys::peer(user.as_str(), rec.peer.device.as_str());
        let keep = &self.core.cfg.keep_client_keys;
        if !rotate {
            let sealed = match (&rec.sealed_key, keep) {
                (Some(s), Some(sealer)) => sealer.open(s, &pkey)?,
                _ => {
                    return Err(ServiceError::KeyNotKept {
                        user: user.to_string(),
                        device: rec.peer.device.to_string(),
                    });
                }
            };
            // Who read a private key is in the audit trail (nothing else changes).
            let mut batch = Batch::default();
            self.core.audit(
                &mut batch,
                actor,
                "peer.config",
                format!("peer:{pkey}"),
                None,
                None,
            )?;
            self.core.commit(batch)?;
            return Ok(self.config_for(&rec.peer, Some(&sealed)));
        }
        // Rotate: the new key replaces the old one in the tunnel; id, addresses and counters stay.
        let (private, public_key) = secrets::generate_keypair();
        let mut new = rec.clone();
        new.peer.public_key = public_key;
        new.peer.key_kept = keep.is_some();
        new.sealed_key = keep.as_ref().map(|s| s.seal(&private, &pkey));
        let allowed = allowed_ips(&new.peer);
        let tunnel = &self.core.tunnel;
        tunnel.remove_peer(&rec.peer.public_key)?;
        if let Err(e) = tunnel.add_peer(public_key, &allowed) {
            let _ = tunnel.add_peer(rec.peer.public_key, &allowed);
            return Err(e.into());
        }
        let mut batch = Batch::default();
        batch.put(Cf::Peers, &pkey, &new)?;
        self.core.audit(
            &mut batch,
            actor,
            "peer.rotate",
            format!("peer:{pkey}"),
            to_json(&rec.peer),
            to_json(&new.peer),
        )?;
        if let Err(e) = self.core.commit(batch) {
            let _ = tunnel.remove_peer(&public_key);
            let _ = tunnel.add_peer(rec.peer.public_key, &allowed);
            return Err(e);
        }
        let cfg = self.config_for(&new.peer, Some(&private));
        self.dir.insert(pkey, new);
        Ok(cfg)
    }
}
