//! The open proxied connections, by identity: listed for `connections`, cut by `kick`, a hold
//! or an identity's removal. An endpoint registers each authenticated connection
//! ([`Registry::open`]) and relays until its [`Conn::cut`] fires; dropping the [`Conn`]
//! unregisters it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use capybara_common::peer::PeerId;
use tokio_util::sync::CancellationToken;

use super::{Identity, Target};

/// A connection's id, unique for the agent's life.
pub type ConnId = u64;

/// What is known of an open connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Its id.
    pub conn: ConnId,
    /// Whose.
    pub identity: Identity,
    /// The client's address.
    pub source: SocketAddr,
    /// Where it goes.
    pub target: Target,
    /// When it was opened.
    pub opened_at: SystemTime,
}

struct Entry {
    info: ConnInfo,
    cut: CancellationToken,
}

/// What to do when an identity's last open connection unregisters.
pub type OnLastClose = Box<dyn Fn(PeerId) + Send + Sync>;

/// Why an identity's connections are cut ([`Registry::cut`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutCause {
    /// `kick` (of the user, or of the identity's session): its session ends as kicked, even
    /// with no connection open.
    Kick,
    /// The policy held the identity (expiry, a window, a limit): its session goes idle, as a
    /// held device's does.
    Hold,
    /// The identity was removed: its session ends as removed.
    Removed,
}

/// What to do when an identity's connections are cut, with why (called before they are).
pub type OnCut = Box<dyn Fn(PeerId, CutCause) + Send + Sync>;

/// The open connections of all endpoints.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    by_id: Mutex<HashMap<PeerId, HashMap<ConnId, Entry>>>,
    on_last_close: OnceLock<OnLastClose>,
    on_cut: OnceLock<OnCut>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A registered connection; unregistered when dropped.
pub struct Conn {
    registry: Arc<Registry>,
    id: PeerId,
    conn: ConnId,
    cut: CancellationToken,
}

impl Conn {
    /// Its id.
    pub fn id(&self) -> ConnId {
        self.conn
    }

    /// Fires when the connection is cut.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let last = {
            let mut by_id = self.registry.by_id.lock().expect("registry lock");
            let Some(conns) = by_id.get_mut(&self.id) else {
                return;
            };
            conns.remove(&self.conn);
            let last = conns.is_empty();
            if last {
                by_id.remove(&self.id);
            }
            last
        };
        if last && let Some(f) = self.registry.on_last_close.get() {
            f(self.id);
        }
    }
}

impl Registry {
    /// Sets what is called (outside the registry's lock) when an identity's last open
    /// connection unregisters; the first call wins (the service sets it once).
    pub fn on_last_close(&self, f: OnLastClose) {
        let _ = self.on_last_close.set(f);
    }

    /// Sets what is called when an identity's connections are cut ([`Registry::cut`]), before
    /// they are, whether or not any is open; the first call wins (the daemon sets it once, to
    /// end the identity's session in the history).
    pub fn on_cut(&self, f: OnCut) {
        let _ = self.on_cut.set(f);
    }

    /// Registers a connection of `identity`.
    pub fn open(
        self: &Arc<Self>,
        identity: Identity,
        source: SocketAddr,
        target: Target,
        opened_at: SystemTime,
    ) -> Conn {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let cut = CancellationToken::new();
        let id = identity.id;
        let info = ConnInfo {
            conn,
            identity,
            source,
            target,
            opened_at,
        };
        self.by_id
            .lock()
            .expect("registry lock")
            .entry(id)
            .or_default()
            .insert(
                conn,
                Entry {
                    info,
                    cut: cut.clone(),
                },
            );
        Conn {
            registry: Arc::clone(self),
            id,
            conn,
            cut,
        }
    }

    /// Cuts every open connection of identity `id` for `cause`; returns how many. The
    /// [`Registry::on_cut`] hook hears of it first (so what it reports comes before the
    /// connections' own ends).
    pub fn cut(&self, id: PeerId, cause: CutCause) -> usize {
        if let Some(f) = self.on_cut.get() {
            f(id, cause);
        }
        let by_id = self.by_id.lock().expect("registry lock");
        by_id.get(&id).map_or(0, |conns| {
            conns.values().for_each(|e| e.cut.cancel());
            conns.len()
        })
    }

    /// The identity whose id is `id`, while it has a connection open.
    pub fn identity(&self, id: PeerId) -> Option<Identity> {
        let by_id = self.by_id.lock().expect("registry lock");
        by_id
            .get(&id)
            .and_then(|conns| conns.values().next())
            .map(|e| e.info.identity.clone())
    }

    /// Cuts connection `conn`; whether it was open.
    pub fn cut_conn(&self, conn: ConnId) -> bool {
        let by_id = self.by_id.lock().expect("registry lock");
        by_id
            .values()
            .find_map(|conns| conns.get(&conn))
            .map(|e| e.cut.cancel())
            .is_some()
    }

    /// The open connections, by id.
    pub fn list(&self) -> Vec<ConnInfo> {
        let by_id = self.by_id.lock().expect("registry lock");
        let mut all: Vec<ConnInfo> = by_id
            .values()
            .flat_map(|conns| conns.values().map(|e| e.info.clone()))
            .collect();
        all.sort_by_key(|c| c.conn);
        all
    }

    /// How many connections identity `id` has open.
    pub fn open_count(&self, id: PeerId) -> usize {
        let by_id = self.by_id.lock().expect("registry lock");
        by_id.get(&id).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::domain::{Protocol, UserName};

    fn identity(id: PeerId) -> Identity {
        Identity {
            id,
            user: UserName::parse("user", "alice").unwrap(),
            protocol: Protocol::Shadowsocks,
        }
    }

    #[test]
    fn cut_fires_every_connection_of_the_identity_and_no_other() {
        let r = Arc::new(Registry::default());
        let src: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let t = Target::Addr("127.0.0.1:80".parse().unwrap());
        let a1 = r.open(identity(1), src, t.clone(), SystemTime::now());
        let a2 = r.open(identity(1), src, t.clone(), SystemTime::now());
        let b = r.open(identity(2), src, t, SystemTime::now());
        assert_eq!(r.open_count(1), 2);
        assert_eq!(r.identity(1), Some(identity(1)));
        let causes = Arc::new(Mutex::new(Vec::new()));
        let heard = causes.clone();
        r.on_cut(Box::new(move |id, cause| {
            heard.lock().unwrap().push((id, cause))
        }));
        assert_eq!(r.cut(1, CutCause::Kick), 2);
        assert_eq!(r.cut(9, CutCause::Removed), 0, "none open");
        assert_eq!(
            *causes.lock().unwrap(),
            [(1, CutCause::Kick), (9, CutCause::Removed)],
            "heard even with none open"
        );
        assert!(a1.cut().is_cancelled() && a2.cut().is_cancelled());
        assert!(!b.cut().is_cancelled());
        assert!(r.cut_conn(b.id()));
        assert!(b.cut().is_cancelled());
        let closed = Arc::new(Mutex::new(Vec::new()));
        let seen = closed.clone();
        r.on_last_close(Box::new(move |id| seen.lock().unwrap().push(id)));
        drop(a1);
        assert!(closed.lock().unwrap().is_empty(), "a2 is still open");
        drop(a2);
        assert_eq!(*closed.lock().unwrap(), [1]);
        assert_eq!(r.open_count(1), 0);
        assert_eq!(r.list().len(), 1);
        drop(b);
        assert!(r.list().is_empty());
        assert!(!r.cut_conn(3));
    }
}
