//! Bandwidth shaping: per-peer HTB classes that the tunnel-device programs select.
//!
//! The kernel programs do not time packets themselves (why: `capybara-agent`'s
//! `dataplane::shape` docs, with the measurements). For a peer with a rate, `PeerInfo::shape_tx`
//! / `shape_rx` hold the full HTB class id (`major:minor`) of its class in each direction:
//!
//! - **to the peer** (TC egress of the tunnel device): the program sets `skb->priority` to
//!   `shape_tx`; the HTB qdisc at the root of the tunnel device finds the class by it (HTB
//!   looks `skb->priority` up as a class id before any filter), and queues and paces the packet.
//! - **from the peer** (TC ingress): the program sets `skb->priority` to `shape_rx` and
//!   redirects the packet to the egress of the IFB device `Config::shape_ifindex`, whose root HTB
//!   qdisc shapes it; IFB then re-injects it into the tunnel device's receive path (skipping TC
//!   ingress, which already ran).
//!
//! Unshaped traffic carries no class: on the tunnel device it goes through HTB's direct queue
//! (no `default` class), unpaced.

/// Major number of the HTB qdiscs the agent installs (on the tunnel device and on the IFB
/// device): handle `0xca:`.
pub const SHAPE_QDISC_MAJOR: u32 = 0xca;

/// Largest class minor (minors are `1..=MAX_SHAPE_MINOR`, one per shaped peer and direction).
pub const MAX_SHAPE_MINOR: u32 = 0xfffe;

/// The full class id (`major << 16 | minor`) of minor `minor` in the agent's HTB qdiscs.
pub const fn class_id(minor: u16) -> u32 {
    SHAPE_QDISC_MAJOR << 16 | minor as u32
}

/// The qdisc handle (`major:0`) of the agent's HTB qdiscs.
pub const QDISC_HANDLE: u32 = SHAPE_QDISC_MAJOR << 16;
