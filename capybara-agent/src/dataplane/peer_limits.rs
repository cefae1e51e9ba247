//! One policy write for what the policy layer sets per peer besides rates and the gate:
//! the flow limit and the quota bucket ([`Dataplane::set_peer_limits`]).
//!
//! Why a method of its own: a group policy change re-applies every member's peer. With
//! `set_flow_limit` + `assign_quota` (each reading and writing `PeerInfo`) and their read-backs,
//! a peer cost six `bpf(2)` calls; this reads `PeerInfo` once and writes it once, only when
//! something differs (since the hot line is mapped, reads and writes are no syscalls at all). Measured by `group_policy_fanout_10k_ms` (`cargo xtask bench`): see
//! `tests/src/bench/policy.rs` for the figures.

use capybara_common::{
    flow::MAX_FLOWS,
    peer::{MAX_PEERS, PeerId},
    quota::BucketId,
};

use super::{Dataplane, DataplaneError, Result, quota::check_bucket};

impl Dataplane {
    /// Sets active peer `id`'s flow limit (`None`: unlimited) and quota bucket (`None`: no
    /// quota) in one policy write (gate, rates and flags kept); nothing is written when
    /// both are already so. Returns whether it wrote. Clearing a flow limit also forgets the
    /// peer's tracked flows (as [`Dataplane::clear_flow_limit`]). Validates first: on error no
    /// map is touched.
    pub fn set_peer_limits(
        &mut self,
        id: PeerId,
        flow_limit: Option<u32>,
        bucket: Option<BucketId>,
    ) -> Result<bool> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        match flow_limit {
            Some(0) => return Err(DataplaneError::FlowLimitZero { peer: id }),
            Some(limit) if limit > MAX_FLOWS => {
                return Err(DataplaneError::FlowLimitTooLarge {
                    peer: id,
                    limit,
                    max: MAX_FLOWS,
                });
            }
            _ => {}
        }
        if let Some(b) = bucket {
            check_bucket(b)?;
        }
        let mut info = self.active_peer_info(id)?;
        let (flows, quota) = (flow_limit.unwrap_or(0), bucket.unwrap_or(0));
        if info.flow_limit == flows && info.quota_bucket == quota {
            return Ok(false);
        }
        let clearing = info.flow_limit != 0 && flows == 0;
        info.flow_limit = flows;
        info.quota_bucket = quota;
        self.write_peer_info(id, info, "write limits")?;
        if clearing {
            self.clear_flow_limit(id)?;
        }
        tracing::debug!(id, ?flow_limit, ?bucket, "peer limits set");
        Ok(true)
    }
}
