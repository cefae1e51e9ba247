//! Shared setup of the end-to-end tests (a module of each `e2e_*` test binary, not a test
//! target itself): open the dataplane on a private pin dir, attach it inside a namespace.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::time::Duration;

use capybara_agent::{
    blocklist::{Direction, ListName},
    dataplane::{Dataplane, DataplaneConfig},
    net::Cidr,
};
use capybara_tests::netns::{BpffsDir, NetNs};

/// How long a test waits for traffic that should arrive.
pub const WAIT: Duration = Duration::from_secs(5);

/// Opens the dataplane with its maps pinned in `pins` (fresh maps, or the ones pinned there by
/// an earlier open: that is how a restart re-uses them). `tunnel_l2_hlen` is 0 for a TUN device.
pub fn open_dataplane(pins: &BpffsDir) -> Dataplane {
    Dataplane::open(DataplaneConfig {
        bpffs_dir: pins.path().to_owned(),
        tunnel_l2_hlen: 0,
    })
    .unwrap_or_else(|e| panic!("Dataplane::open on {}: {e}", pins.path().display()))
}

/// Attaches the TC programs to the tunnel device `ifname` of namespace `ns` (attaching resolves
/// the interface in the calling thread's namespace, so it runs on a thread inside `ns`).
pub fn attach_tc(dp: &mut Dataplane, ns: &NetNs, ifname: &str) {
    ns.run(|| dp.attach_tc(ifname))
        .unwrap_or_else(|e| panic!("attach TC to {ifname} in {}: {e}", ns.name()));
}

/// Attaches the XDP guard to `ifname` of namespace `ns`.
pub fn attach_xdp(dp: &mut Dataplane, ns: &NetNs, ifname: &str) {
    ns.run(|| dp.attach_xdp(ifname))
        .unwrap_or_else(|e| panic!("attach XDP to {ifname} in {}: {e}", ns.name()));
}

/// Parses a CIDR (test constants; panics on a typo).
pub fn cidr(s: &str) -> Cidr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad CIDR {s:?} in a test: {e}"))
}

/// A list name (test constants).
pub fn list(name: &str) -> ListName {
    ListName::parse(name).unwrap_or_else(|e| panic!("bad list name {name:?}: {e}"))
}

/// The id the dataplane gave list `name` of `direction`.
pub fn list_id(dp: &Dataplane, direction: Direction, name: &ListName) -> u32 {
    dp.list_id(direction, name)
        .unwrap_or_else(|| panic!("no {direction} list {name} in the dataplane"))
}
