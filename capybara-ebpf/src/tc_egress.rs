//! `tc_egress`, on the tunnel device's egress: packets *to* peers (the kernel routed them into
//! the TUN for boringtun to encrypt). The peer is the packet's **destination**; the source (the
//! other end, e.g. a site replying) is checked against the destination blocklists; passed
//! packets are counted in the peer's `tx_*`. The pipeline itself is shared with `tc_ingress`:
//! see [`crate::pipeline`].

use aya_ebpf::{macros::classifier, programs::TcContext};
use capybara_common::counters::{
    TC_OUT_DROP_BLOCKLIST, TC_OUT_DROP_FLOWS, TC_OUT_DROP_GATE, TC_OUT_DROP_QUOTA,
    TC_OUT_DROP_UNKNOWN, TC_OUT_DROP_UNPARSEABLE, TC_OUT_MALFORMED, TC_OUT_PASS, TC_OUT_SHAPED,
    TC_OUT_UNKNOWN_PEER,
};

use crate::pipeline::{self, Direction};

const EGRESS: Direction = Direction {
    peer_is_source: false,
    pass: TC_OUT_PASS,
    unknown_peer: TC_OUT_UNKNOWN_PEER,
    drop_blocklist: TC_OUT_DROP_BLOCKLIST,
    malformed: TC_OUT_MALFORMED,
    drop_unknown: TC_OUT_DROP_UNKNOWN,
    drop_gate: TC_OUT_DROP_GATE,
    drop_quota: TC_OUT_DROP_QUOTA,
    drop_flows: TC_OUT_DROP_FLOWS,
    drop_unparseable: TC_OUT_DROP_UNPARSEABLE,
    shaped: TC_OUT_SHAPED,
};

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    pipeline::run(&ctx, &EGRESS)
}
