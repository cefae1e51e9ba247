//! Users: adding a user with its first device, removing a user with every device and its
//! policy records, and reading users with their devices.

use std::{sync::Arc, time::SystemTime};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    devices::Devices,
    directory::Directory,
    domain::{Actor, ClientConfig, DeviceName, User, UserDetail, UserName, expiry},
    policy::Policy,
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

/// The users feature.
#[derive(Debug)]
pub struct Users {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    devices: Arc<Devices>,
}

impl Users {
    /// The feature over the shared core, directory, policy and devices.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
        devices: Arc<Devices>,
    ) -> Users {
        Users {
            core,
            dir,
            policy,
            devices,
        }
    }

    /// Creates a user and its first device in one write; the config carries the device's
    /// private key, shown this once.
    pub fn add_user(
        &self,
        actor: &Actor,
        new: NewUser,
    ) -> Result<(User, ClientConfig), ServiceError> {
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
        let (rec, private) = self.devices.new_peer(&new.name, &new.device)?;
        let added_user = true;
        let pkey = keys::peer(new.name.as_str(), new.device.as_str());
        let mut batch = Batch::default();
        batch.put(Cf::Users, &keys::user(new.name.as_str()), &user)?;
        batch.put(Cf::Peers, &pkey, &rec)?;
        let detail = UserDetail {
            user: user.clone(),
            peers: vec![rec.peer.clone()],
        };
        self.core.audit(
            &mut batch,
            actor,
            "user.add",
            format!("user:{}", new.name),
            None,
            to_json(&detail),
        )?;
        let cfg = self
            .devices
            .commit_device(batch, pkey, rec, &private, added_user)?;
        tracing::info!(%actor, user = %new.name, "user added");
        Ok((user, cfg))
    }

    /// Every user with its devices, by name.
    pub fn list_users(&self) -> Result<Vec<UserDetail>, ServiceError> {
        Ok(self
            .dir
            .users_with_peers()?
            .into_iter()
            .map(|(user, peers)| UserDetail { user, peers })
            .collect())
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

    /// One user with its devices.
    pub fn get_user(&self, name: &UserName) -> Result<UserDetail, ServiceError> {
        let user = self.dir.user(name)?;
        Ok(UserDetail {
            user,
            peers: self.dir.user_peers(name),
        })
    }

    /// Removes a user and all its devices (tunnel, dataplane, then one store batch).
    pub fn remove_user(&self, actor: &Actor, name: &UserName) -> Result<UserDetail, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let user = self.dir.user(name)?;
        let recs = self.dir.records(name);
        let detail = UserDetail {
            user,
            peers: recs.iter().map(|r| r.peer.clone()).collect(),
        };
        for (i, r) in recs.iter().enumerate() {
            if let Err(e) = self.devices.unprogram(&r.peer) {
                for undo in &recs[..i] {
                    let _ = self.devices.program(&undo.peer);
                }
                return Err(e);
            }
        }
        let mut batch = Batch::default();
        batch.delete(Cf::Users, &keys::user(name.as_str()));
        for r in &recs {
            batch.delete(
                Cf::Peers,
                &keys::peer(name.as_str(), r.peer.device.as_str()),
            );
        }
        // Its own limits and group memberships go with it (same batch).
        let policy = self.policy.forget_user(&mut batch, name)?;
        self.core.audit(
            &mut batch,
            actor,
            "user.remove",
            format!("user:{name}"),
            to_json(&detail),
            None,
        )?;
        if let Err(e) = self.core.commit(batch) {
            for r in &recs {
                let _ = self.devices.program(&r.peer);
            }
            return Err(e);
        }
        for r in &recs {
            self.dir.remove(&r.peer);
        }
        self.policy.forgotten(policy);
        tracing::info!(%actor, user = %name, "user removed");
        Ok(detail)
    }
}
