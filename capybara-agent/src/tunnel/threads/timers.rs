//! `wg-timers`: every [`TICK`], boringtun's timers (handshake retries, rekeys, session expiry),
//! the server's persistent keepalives, the disconnect timeout of connected peers and the reset
//! of the handshake rate limiter, and every 10 s the failed handshakes counted per prefix
//! (`auth_table`).

use std::{
    os::fd::AsFd as _,
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use boringtun::noise::TunnResult;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{SLOT, View};
use crate::tunnel::{
    events::{DisconnectReason, TunnelEvent},
    shared::Inner,
};

/// Period of the timer thread (boringtun's `update_timers`, keepalives, disconnect checks).
const TICK: Duration = Duration::from_millis(250);

/// boringtun's timers, our persistent keepalive, the disconnect timeout and the handshake rate
/// limiter's reset, every [`TICK`].
pub(in crate::tunnel) fn timer_loop(inner: &Inner, stop: &std::io::PipeReader) {
    let mut buf = vec![0u8; SLOT];
    let mut view = View::new(inner);
    loop {
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        let tick = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::NONE);
        if matches!(poll(&mut fds, tick), Ok(n) if n > 0) {
            return;
        }
        inner.rate_limiter.reset_count();
        view.refresh(inner);
        let now = Instant::now();
        inner.flush_auth(now);
        for peer in view.table.by_key.values() {
            if !peer.awake.load(Ordering::Relaxed) {
                continue;
            }
            let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
            let endpoint = st.endpoint;
            // Without a `Tunn` there is no session or handshake whose timers could fire.
            if let Some(tunn) = st.tunn.as_mut()
                && let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut buf)
                && let Some(to) = endpoint
            {
                inner.send_to(Some(peer), p, to);
                st.last_tx = now;
            }
            if let (Some(k), Some(to)) = (st.config.persistent_keepalive, endpoint)
                && k > 0
                && now.saturating_duration_since(st.last_tx) >= Duration::from_secs(k.into())
            {
                if let TunnResult::WriteToNetwork(p) =
                    inner.tunn(peer, &mut st).encapsulate(&[], &mut buf)
                {
                    inner.send_to(Some(peer), p, to);
                }
                st.last_tx = now;
            }
            if st.liveness.poll(now, inner.disconnect_after) {
                drop(st);
                inner.emit(TunnelEvent::Disconnected {
                    public_key: peer.public_key,
                    reason: DisconnectReason::Timeout,
                    at: SystemTime::now(),
                });
            }
        }
    }
}
