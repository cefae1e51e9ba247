//! The open sessions by device: which session (its [`SessionId`]) each connected device has
//! now. The history recorder writes it as it opens and closes sessions (`service::history`);
//! `monitor` reads it to give each live connection its id and to find the device a connection
//! id names when it is kicked.
//!
//! It also counts the sessions each device (by key) opened since the agent started
//! ([`LiveSessions::started`]): the usage rollups' "sessions started" (`service::usage`).
//!
//! A device gets its id a few milliseconds after its handshake (when the recorder has written
//! the session's record), so a connection listed in that moment has no id yet; a device known
//! to the tunnel that never completed a handshake (or whose session ended) has none.

use std::{collections::HashMap, sync::Mutex};

use capybara_common::peer::PeerId;

use super::domain::{PublicKey, SessionId};

/// The open session of each connected device, by dataplane peer id.
#[derive(Debug, Default)]
pub struct LiveSessions {
    /// The device's key; `None` for a proxy identity's session.
    open: Mutex<HashMap<PeerId, (SessionId, Option<PublicKey>)>>,
    /// Sessions opened since start, by device key (at most one entry per device ever seen).
    started: Mutex<HashMap<PublicKey, u64>>,
}

impl LiveSessions {
    /// A session of the device with `key` opened (`None`: of a proxy identity).
    pub fn opened(&self, id: SessionId, key: Option<PublicKey>) {
        self.open.lock().unwrap().insert(id.peer, (id, key));
        if let Some(key) = key {
            *self.started.lock().unwrap().entry(key).or_default() += 1;
        }
    }

    /// Counts a session opened by what `key` names (a proxy identity's usage key,
    /// `service::proxies::usage_key`; a device's are counted by [`LiveSessions::opened`]).
    pub fn count_started(&self, key: PublicKey) {
        *self.started.lock().unwrap().entry(key).or_default() += 1;
    }

    /// Sessions opened since the agent started, by device key.
    pub fn started(&self) -> HashMap<PublicKey, u64> {
        self.started.lock().unwrap().clone()
    }

    /// Session `id` closed (a later session of the same device is left alone).
    pub fn closed(&self, id: SessionId) {
        let mut open = self.open.lock().unwrap();
        if open.get(&id.peer).is_some_and(|(o, _)| *o == id) {
            open.remove(&id.peer);
        }
    }

    /// The open session of peer `peer`, if the device there has key `key`.
    pub fn of_peer(&self, peer: PeerId, key: &PublicKey) -> Option<SessionId> {
        self.open
            .lock()
            .unwrap()
            .get(&peer)
            .filter(|(_, k)| k.as_ref() == Some(key))
            .map(|(id, _)| *id)
    }

    /// The open session of proxy identity `id`.
    pub fn of_proxy(&self, id: PeerId) -> Option<SessionId> {
        self.open
            .lock()
            .unwrap()
            .get(&id)
            .filter(|(_, k)| k.is_none())
            .map(|(s, _)| *s)
    }

    /// Whose session `id` is, if it is open: `Some(Some(key))` a device's, `Some(None)` a proxy
    /// identity's (its id is `id.peer`); `None` if that session is not open.
    pub fn key_of(&self, id: SessionId) -> Option<Option<PublicKey>> {
        self.open
            .lock()
            .unwrap()
            .get(&id.peer)
            .filter(|(o, _)| *o == id)
            .map(|(_, k)| *k)
    }
}
