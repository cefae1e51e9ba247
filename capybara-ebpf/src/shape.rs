//! Step 7 of the tunnel pipeline: the bandwidth-shaping decision for a known peer that passed.
//! Layout and the shaping path: `capybara_common::shape`.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_skb_change_head},
    programs::sk_buff::SkBuff,
};
use capybara_common::peer::PeerInfo;

/// The peer's (table entry `info`) HTB class in the direction of the packet (`from_peer`: ingress); 0 = unshaped,
/// also for an ingress packet while there is no shaping device (`ifindex` 0) to redirect it to.
#[inline(always)]
pub fn class(info: *const PeerInfo, from_peer: bool, ifindex: u32) -> u32 {
    if from_peer && ifindex == 0 {
        return 0;
    }
    // SAFETY: the policy in the peer's `PEER_HOT` line the pipeline looked up, valid for this program run; a
    // racing agent update is seen old or new per field (documented on `PeerHot`).
    unsafe {
        if from_peer {
            (*info).shape_rx
        } else {
            (*info).shape_tx
        }
    }
}

/// Length of the Ethernet header pushed in front of a TUN packet before the redirect.
const ETH_HLEN: u32 = 14;

/// Queues the packet in HTB class `class` (non-zero): egress, by `skb->priority` (the tunnel
/// device's HTB reads it); ingress, by `skb->priority` and a redirect to the shaping device
/// `ifindex` (non-zero).
///
/// The shaping device (IFB) is an Ethernet device, and the kernel drops a packet redirected to
/// one without a link-layer header (`__bpf_redirect_common`: -ERANGE). A TUN packet has none
/// (`l2 == 0`), so an all-zero Ethernet header carrying the packet's protocol is pushed first;
/// IFB strips it again (`mac_len`) when it hands the packet back to the tunnel device.
#[inline(always)]
pub fn apply(ctx: &SkBuff, class: u32, from_peer: bool, ifindex: u32, l2: usize) -> i32 {
    // SAFETY: `ctx.skb` is the `__sk_buff` context pointer of this run; `priority` is a
    // field `sched_cls` programs may write.
    unsafe { (*ctx.skb).priority = class };
    if !from_peer {
        return TC_ACT_OK;
    }
    if l2 == 0 {
        // SAFETY: the context pointer of this run, and a read of its `protocol` field.
        let proto = unsafe { (*ctx.skb).protocol } as u16;
        // SAFETY: the helper grows the packet's head by `ETH_HLEN` zeroed bytes (and resets
        // the MAC header to them) or fails without changing it.
        if unsafe { bpf_skb_change_head(ctx.skb, ETH_HLEN, 0) } != 0 {
            // Cannot shape this one: let it through rather than lose it.
            return TC_ACT_OK;
        }
        // The EtherType, for anyone who looks (IFB and the stack go by `skb->protocol`).
        let _ = ctx.store(12, &proto, 0);
    }
    // SAFETY: the helper only records the target (an interface index; flags 0: the device's
    // egress) for the kernel to act on after the program returns. The kernel drops the packet
    // if the index names no device, so the agent clears every peer's `shape_rx` before it
    // removes the shaping device.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
