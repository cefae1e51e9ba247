//! `tc_ingress`, on the tunnel device's ingress: packets *from* peers (boringtun decrypted them
//! and wrote them into the TUN). The peer is the packet's **source**; the destination is checked
//! against the destination blocklists; passed packets are counted in the peer's `rx_*`.
//! The pipeline itself is shared with `tc_egress`: see [`crate::pipeline`].

use aya_ebpf::{macros::classifier, programs::TcContext};
use capybara_common::counters::{
    TC_IN_DROP_BLOCKLIST, TC_IN_DROP_FLOWS, TC_IN_DROP_GATE, TC_IN_DROP_QUOTA, TC_IN_DROP_UNKNOWN,
    TC_IN_DROP_UNPARSEABLE, TC_IN_MALFORMED, TC_IN_PASS, TC_IN_SHAPED, TC_IN_UNKNOWN_PEER,
};

use crate::pipeline::{self, Direction};

const INGRESS: Direction = Direction {
    peer_is_source: true,
    pass: TC_IN_PASS,
    unknown_peer: TC_IN_UNKNOWN_PEER,
    drop_blocklist: TC_IN_DROP_BLOCKLIST,
    malformed: TC_IN_MALFORMED,
    drop_unknown: TC_IN_DROP_UNKNOWN,
    drop_gate: TC_IN_DROP_GATE,
    drop_quota: TC_IN_DROP_QUOTA,
    drop_flows: TC_IN_DROP_FLOWS,
    drop_unparseable: TC_IN_DROP_UNPARSEABLE,
    shaped: TC_IN_SHAPED,
};

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    pipeline::run(&ctx, &INGRESS)
}
