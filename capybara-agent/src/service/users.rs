//! Users: adding a user with its first device (and proxy identities, `service::proxies`),
//! removing a user with every device, proxy identity and policy record, reading users with
//! their devices and proxy identities, and account expiry.
//!
//! ## Protocols
//! `user add --protocol wireguard,shadowsocks,vless` ([`Users::add_user_with`]) creates the user,
//! its first WireGuard device only when `wireguard` is listed, and a proxy identity per other
//! protocol, in one synced batch with one audit record (`user.add`, the user with its devices and
//! identities, never a credential). The proxy identities' kernel lines are programmed first,
//! then the batch committed, then the device programmed (as devices are added); a failure at
//! any step undoes the others and changes nothing. An unknown protocol, one listed twice, none,
//! or a proxy protocol whose endpoint this agent does not run is refused before anything
//! happens (`protocol` named, `INVALID_ARGUMENT`).
//!
//! ## Account expiry
//! A user's expiry (`add --expires`, `expire`, `renew`) is the admission deadline of each of its
//! devices in the kernel (`policy::engine::decide`): a device is programmed with it, the agent
//! start reconciles it, every change of it reaches the kernel before the reply, so the kernel
//! cuts the devices at that instant by itself (CLOCK_BOOTTIME deadline), with no agent timer and
//! with the agent down. A user whose expiry has passed has its devices held as `expired`.
//! - `expire`: sets the expiry; a time in the past is allowed and cuts at once; at most
//!   [`MAX_EXPIRY_AHEAD`] ahead.
//! - `renew`: clears the expiry, or sets a new one, which must be ahead (and at most
//!   [`MAX_EXPIRY_AHEAD`]).
//! - `cleanup-expired`: removes the users whose expiry passed more than the grace ago
//!   ([`DEFAULT_CLEANUP_GRACE`], 7 days, unless given) with their devices and kernel peers, one
//!   user per store batch (each removal whole, audited as `user.cleanup`); a dry run lists them
//!   and changes nothing.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    devices::Devices,
    directory::Directory,
    domain::{
        Actor, ClientConfig, DeviceName, MAX_EXPIRY_AHEAD, Protocol, User, UserDetail, UserName,
        ValidationError, expiry, from_unix_secs, unix_secs,
    },
    policy::Policy,
    proxies::{Proxies, ProxyClientConfig},
};
use crate::store::{Batch, Cf, keys};

/// Input of [`Users::add_user`].
#[derive(Clone, Debug)]
pub struct NewUser {
    /// The user.
    pub name: UserName,
    /// Its first device.
    pub device: DeviceName,
    /// Account expiry.
    pub expires_at: Option<SystemTime>,
}

/// How long after its expiry `cleanup-expired` removes a user when no grace is given: a user
/// renewed within a week (a late payment) keeps its devices and keys.
pub const DEFAULT_CLEANUP_GRACE: Duration = Duration::from_secs(7 * 86_400);

/// The users feature.
#[derive(Debug)]
pub struct Users {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    devices: Arc<Devices>,
    proxies: Arc<Proxies>,
}

/// What [`Users::add_user_with`] made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AddedUser {
    /// The user.
    pub user: User,
    /// The first device's config (with its private key, shown this once), when `wireguard`
    /// was listed.
    pub config: Option<ClientConfig>,
    /// The proxy identities made, with their client configs (the credentials, to the caller
    /// that made them, as a new device's private key is).
    pub proxies: Vec<ProxyClientConfig>,
}

/// The protocols of `user add --protocol`, checked: at least one, none twice.
pub fn check_protocols(protocols: &[Protocol]) -> Result<(), ValidationError> {
    if protocols.is_empty() {
        return Err(ValidationError::Missing { field: "protocol" });
    }
    for (i, p) in protocols.iter().enumerate() {
        if protocols[..i].contains(p) {
            return Err(ValidationError::Value {
                field: "protocol",
                reason: format!("{p} is listed twice"),
            });
        }
    }
    Ok(())
}

impl Users {
    /// The feature over the shared core, directory, policy and devices.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
        devices: Arc<Devices>,
        proxies: Arc<Proxies>,
    ) -> Users {
        Users {
            core,
            dir,
            policy,
            devices,
            proxies,
        }
    }

    /// Creates a user and its first device in one write; the config carries the device's
    /// private key, shown this once.
    pub fn add_user(
        &self,
        actor: &Actor,
        new: NewUser,
    ) -> Result<(User, ClientConfig), ServiceError> {
        let added = self.add_user_with(actor, new, &[Protocol::Wireguard])?;
        Ok((added.user, added.config.expect("wireguard listed")))
    }

    /// Creates a user with access by `protocols` in one write (see the module docs): its first
    /// device `new.device` when `wireguard` is listed, a proxy identity per other protocol.
    pub fn add_user_with(
        &self,
        actor: &Actor,
        new: NewUser,
        protocols: &[Protocol],
    ) -> Result<AddedUser, ServiceError> {
        check_protocols(protocols)?;
        let wireguard = protocols.contains(&Protocol::Wireguard);
        let proxied: Vec<Protocol> = protocols
            .iter()
            .copied()
            .filter(|p| *p != Protocol::Wireguard)
            .collect();
        for p in &proxied {
            self.proxies.check_protocol(*p)?;
        }
        let _w = self.core.writer.lock().unwrap();
        let expires_at = expiry("expires_at", new.expires_at)?;
        if self.dir.user_exists(&new.name)? {
            return Err(ServiceError::AlreadyExists {
                what: "user",
                name: new.name.to_string(),
            });
        }
        let user = User {
            name: new.name.clone(),
            created_at: now(),
            expires_at,
        };
        let device = if wireguard {
            Some(self.devices.new_peer(&new.name, &new.device)?)
        } else {
            None
        };
        let taken: Vec<_> = device.iter().map(|(r, _)| r.peer.id).collect();
        let proxies = self.proxies.new_records(&new.name, &proxied, &taken)?;
        // The gates read the expiry from the policy: known before anything is programmed.
        self.policy
            .set_expiry(&new.name, expires_at.map(from_unix_secs));
        let mut batch = Batch::default();
        batch.put(Cf::Users, &keys::user(new.name.as_str()), &user)?;
        let pkey = keys::peer(new.name.as_str(), new.device.as_str());
        if let Some((rec, _)) = &device {
            batch.put(Cf::Peers, &pkey, rec)?;
        }
        for r in &proxies {
            batch.put(
                Cf::Proxies,
                &keys::proxy(new.name.as_str(), r.access.protocol.as_str()),
                r,
            )?;
        }
        let detail = UserDetail {
            user: user.clone(),
            peers: device.iter().map(|(r, _)| r.peer.clone()).collect(),
            proxies: proxies.iter().map(|r| r.access.clone()).collect(),
        };
        self.core.audit(
            &mut batch,
            actor,
            "user.add",
            format!("user:{}", new.name),
            None,
            to_json(&detail),
        )?;
        if let Err(e) = self.proxies.program(&proxies) {
            self.policy.set_expiry(&new.name, None);
            return Err(e);
        }
        let config = match device {
            Some((rec, private)) => {
                // Commits the batch, programs the device; undoes both on a failure.
                match self.devices.commit_device(batch, pkey, rec, &private, true) {
                    Ok(cfg) => Some(cfg),
                    Err(e) => {
                        let _ = self.proxies.unprogram(&proxies);
                        self.policy.set_expiry(&new.name, None);
                        return Err(e);
                    }
                }
            }
            None => {
                if let Err(e) = self.core.commit(batch) {
                    let _ = self.proxies.unprogram(&proxies);
                    self.policy.set_expiry(&new.name, None);
                    return Err(e);
                }
                None
            }
        };
        let proxy_configs = proxies
            .iter()
            .map(|r| self.proxies.config_for(r))
            .collect::<Result<Vec<_>, _>>();
        self.proxies.joined(&new.name, proxies);
        tracing::info!(%actor, user = %new.name, ?protocols, "user added");
        Ok(AddedUser {
            user,
            config,
            proxies: proxy_configs?,
        })
    }

    /// Every user with its devices and proxy identities, by name.
    pub fn list_users(&self) -> Result<Vec<UserDetail>, ServiceError> {
        self.dir.user_details()
    }

    /// One page of users by name with their devices: up to `size` after the name `after`, and
    /// whether more follow.
    pub fn list_users_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<UserDetail>, bool), ServiceError> {
        self.dir.users_page(after, size)
    }

    /// One user with its devices and proxy identities.
    pub fn get_user(&self, name: &UserName) -> Result<UserDetail, ServiceError> {
        self.dir.user_detail(name)
    }

    /// Removes a user and all its devices (tunnel, dataplane, then one store batch).
    pub fn remove_user(&self, actor: &Actor, name: &UserName) -> Result<UserDetail, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.remove_locked(actor, name, "user.remove")
    }

    /// [`Users::remove_user`] under the writer lock, audited as `action`.
    fn remove_locked(
        &self,
        actor: &Actor,
        name: &UserName,
        action: &str,
    ) -> Result<UserDetail, ServiceError> {
        let user = self.dir.user(name)?;
        let recs = self.dir.records(name);
        let proxies = self.dir.proxy_records(name);
        let detail = UserDetail {
            user,
            peers: recs.iter().map(|r| r.peer.clone()).collect(),
            proxies: proxies.iter().map(|r| r.access.clone()).collect(),
        };
        for (i, r) in recs.iter().enumerate() {
            if let Err(e) = self.devices.unprogram(&r.peer) {
                for undo in &recs[..i] {
                    let _ = self.devices.program(&undo.peer);
                }
                return Err(e);
            }
        }
        if let Err(e) = self.proxies.unprogram(&proxies) {
            for r in &recs {
                let _ = self.devices.program(&r.peer);
            }
            let _ = self.proxies.program(&proxies);
            return Err(e);
        }
        let mut batch = Batch::default();
        batch.delete(Cf::Users, &keys::user(name.as_str()));
        for r in &recs {
            batch.delete(
                Cf::Peers,
                &keys::peer(name.as_str(), r.peer.device.as_str()),
            );
        }
        for r in &proxies {
            batch.delete(
                Cf::Proxies,
                &keys::proxy(name.as_str(), r.access.protocol.as_str()),
            );
        }
        // Its own limits and group memberships go with it (same batch).
        let policy = self.policy.forget_user(&mut batch, name)?;
        self.core.audit(
            &mut batch,
            actor,
            action,
            format!("user:{name}"),
            to_json(&detail),
            None,
        )?;
        if let Err(e) = self.core.commit(batch) {
            for r in &recs {
                let _ = self.devices.program(&r.peer);
            }
            let _ = self.proxies.program(&proxies);
            return Err(e);
        }
        for r in &recs {
            self.dir.remove(&r.peer);
        }
        self.proxies.left(&proxies);
        self.policy.forgotten(policy);
        tracing::info!(%actor, user = %name, action, "user removed");
        Ok(detail)
    }

    /// Sets a user's expiry to `at`; a time in the past is allowed and holds its devices at
    /// once (see the module docs).
    pub fn expire_user(
        &self,
        actor: &Actor,
        name: &UserName,
        at: SystemTime,
    ) -> Result<UserDetail, ServiceError> {
        if at
            .duration_since(SystemTime::now())
            .is_ok_and(|d| d > MAX_EXPIRY_AHEAD)
        {
            return Err(ValidationError::Time {
                field: "at",
                reason: "too far in the future",
            }
            .into());
        }
        self.set_expiry(actor, name, Some(unix_secs(at)), "user.expire")
    }

    /// Clears a user's expiry, or with `at` sets a new one (ahead of now); its held-as-expired
    /// devices are admitted again.
    pub fn renew_user(
        &self,
        actor: &Actor,
        name: &UserName,
        at: Option<SystemTime>,
    ) -> Result<UserDetail, ServiceError> {
        let at = expiry("at", at)?;
        self.set_expiry(actor, name, at, "user.renew")
    }

    /// Stores a user's new expiry with its audit record, then reaches the kernel (the devices'
    /// gates) before it returns; if the kernel refuses, the old expiry is put back.
    fn set_expiry(
        &self,
        actor: &Actor,
        name: &UserName,
        at: Option<u64>,
        action: &str,
    ) -> Result<UserDetail, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.dir.user(name)?;
        let after = User {
            expires_at: at,
            ..before.clone()
        };
        let mut batch = Batch::default();
        batch.put(Cf::Users, &keys::user(name.as_str()), &after)?;
        let seq = self.core.next_audit_seq();
        self.core.audit(
            &mut batch,
            actor,
            action,
            format!("user:{name}"),
            to_json(&before),
            to_json(&after),
        )?;
        let event = self.core.commit_unpublished(batch)?;
        self.policy.set_expiry(name, at.map(from_unix_secs));
        if let Err(e) = self.policy.apply(std::slice::from_ref(name), false) {
            tracing::error!(error = %e, user = %name, action, "the kernel refused an expiry; undoing it");
            let mut undo = Batch::default();
            undo.put(Cf::Users, &keys::user(name.as_str()), &before)?;
            undo.delete(Cf::Audit, &keys::audit(seq));
            self.core.store.commit(undo)?;
            self.core.rewind_audit(seq);
            self.policy
                .set_expiry(name, before.expires_at.map(from_unix_secs));
            if let Err(r) = self.policy.apply(std::slice::from_ref(name), false) {
                tracing::error!(error = %r, user = %name, "cannot re-apply the old expiry");
            }
            return Err(e);
        }
        self.core.publish(event);
        tracing::info!(%actor, user = %name, action, expires_at = ?at, "user expiry changed");
        Ok(UserDetail {
            peers: self.dir.user_peers(name),
            proxies: self
                .dir
                .proxy_records(name)
                .into_iter()
                .map(|r| r.access)
                .collect(),
            user: after,
        })
    }

    /// The users whose expiry passed more than `grace` ago (at `now`), by name.
    fn expired_before(
        &self,
        grace: Duration,
        now: SystemTime,
    ) -> Result<Vec<UserName>, ServiceError> {
        let cutoff = unix_secs(now).saturating_sub(grace.as_secs());
        Ok(self
            .dir
            .users()?
            .into_iter()
            .filter(|u| u.expires_at.is_some_and(|t| t < cutoff))
            .map(|u| u.name)
            .collect())
    }

    /// Removes every user whose expiry passed more than `grace` ago, with its devices and
    /// kernel peers (one batch per user, audited as `user.cleanup`); with `dry_run`, only lists
    /// them. Returns the users removed (or that would be).
    pub fn cleanup_expired(
        &self,
        actor: &Actor,
        grace: Duration,
        dry_run: bool,
    ) -> Result<Vec<UserDetail>, ServiceError> {
        if grace > MAX_EXPIRY_AHEAD {
            return Err(ValidationError::Time {
                field: "grace",
                reason: "too long",
            }
            .into());
        }
        let _w = self.core.writer.lock().unwrap();
        let names = self.expired_before(grace, SystemTime::now())?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if dry_run {
                out.push(self.get_user(&name)?);
            } else {
                out.push(self.remove_locked(actor, &name, "user.cleanup")?);
            }
        }
        if !dry_run && !out.is_empty() {
            tracing::info!(%actor, users = out.len(), "expired users removed");
        }
        Ok(out)
    }
}
