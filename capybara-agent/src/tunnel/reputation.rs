//! The hook the reputation engine (`service::reputation`) hangs on the `wg-udp` path: every
//! failed handshake is handed to it with its source address and reason, on the thread that
//! saw it. The hook must be O(1) and never wait (the engine's is one lock and at most four
//! table slots; a source over its threshold goes to the engine's own thread over a bounded
//! queue), since a flood of forged handshakes runs through it at line rate.

use std::{net::IpAddr, sync::OnceLock};

use super::events::AuthFailure;

/// What is called per failed handshake: the source's address, why it failed.
pub type FailureHook = Box<dyn Fn(IpAddr, AuthFailure) + Send + Sync>;

/// The tunnel's slot for the hook: set once (at the agent's start), read per failure without
/// a lock.
#[derive(Default)]
pub(super) struct HookSlot(OnceLock<FailureHook>);

impl HookSlot {
    /// Sets the hook; false if one was set already (it stays).
    pub(super) fn set(&self, hook: FailureHook) -> bool {
        self.0.set(hook).is_ok()
    }

    /// Calls the hook, if any.
    pub(super) fn call(&self, ip: IpAddr, reason: AuthFailure) {
        if let Some(h) = self.0.get() {
            h(ip, reason);
        }
    }
}
