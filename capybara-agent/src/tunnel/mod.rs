//! The tunnel: the agent's WireGuard interface. This module is the only code that touches
//! boringtun and the TUN device.
//!
//! Today it owns the TUN device (created with `tun-rs`, Linux offloads available for the
//! WireGuard data path that drives it); the WireGuard state machine on top of it is the agent
//! issue's work. The device is not persistent: it goes away with the agent, and so do the TC
//! programs attached to it — while the agent is down there is no tunnel and so no tunnel traffic
//! to enforce on; the uplink's XDP guard stays attached through its pinned link, and every
//! counter lives in pinned maps. The agent re-attaches the TC programs to the new device.

mod device;

pub use device::{TunnelDevice, TunnelDeviceConfig, TunnelError};
