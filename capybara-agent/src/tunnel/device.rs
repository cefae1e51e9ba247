//! The TUN device: raw IPv4/IPv6 packets, no Ethernet header, no packet-information prefix.
//! With more than one worker it is a multi-queue device (`IFF_MULTI_QUEUE`): one open queue
//! per worker, each read by that worker's `wg-tun` thread and written by its `wg-udp` thread.

use std::net::{Ipv4Addr, Ipv6Addr};

/// How to create the tunnel device.
#[derive(Clone, Debug)]
pub struct TunnelDeviceConfig {
    /// Interface name (at most 15 bytes), e.g. `capy0`.
    pub name: String,
    /// The server's own inner IPv4 address and prefix length (e.g. 10.99.0.1/24).
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// The server's own inner IPv6 address and prefix length (e.g. fd99::1/64).
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// MTU; WireGuard's default 1420 leaves room for its 80-byte overhead on IPv6 uplinks.
    /// At most [`MAX_MTU`].
    pub mtu: u16,
    /// Linux offloads (`IFF_VNET_HDR`, TSO/GRO): the kernel hands the tunnel TCP super-segments
    /// that it splits itself, and the tunnel writes coalesced segments back. See `threads/`.
    pub offload: bool,
}

/// Whether the agent opens its TUN device with offloads: **on**. Measured on the 2-core
/// development machine (iperf3 TCP from a wireguard-go client, `capybara-bench --filter tunnel
/// --iperf-seconds 8`, two runs each way, before offloads became the default):
///
/// | offloads | agent | boringtun-cli | wireguard-go | vs boringtun-cli | vs wireguard-go |
/// |---|---|---|---|---|---|
/// | off | 607, 717 Mbit/s | 266, 471 | 294, 417 | 2.28, 1.52 | 2.06, 1.72 |
/// | on  | 741, 711 Mbit/s | 319, 436 | 338, 371 | 2.32, 1.63 | 2.19, 1.92 |
///
/// Offloads gain little there because the client, not the server, is the bottleneck; they
/// are what takes a tunnel past 10 Gbit/s where the server is. With them the kernel hands the
/// tunnel TSO super-segments and the tunnel writes decrypted packets coalesced (GRO, TCP and
/// UDP), so the TC programs on the device see one skb per super-packet: 200 UDP datagrams in
/// bursts of 20 entered as 63 skbs (16 over IPv6), a 4 MB TCP upload's 3286 packets as 493.
/// The programs count each super-packet as the segments that crossed (`gso_segs` at egress;
/// at ingress, where the virtio-net header leaves `gso_segs` 0, the payload over `gso_size`:
/// measured, see `capybara-ebpf/src/pipeline.rs`), so per-peer counters stay exact with
/// offloads on (`e2e_wg_dataplane`, `prog_test_run::gso_skbs_count_the_segments_that_crossed`);
/// quotas can be overrun by one super-packet (≤ 64 KiB) per CPU instead of one packet
/// (`capybara-ebpf/src/quota.rs`). `offload: false` remains for a kernel without
/// `IFF_VNET_HDR` support or a deployment that wants per-packet decisions.
pub const DEFAULT_OFFLOAD: bool = true;

/// Largest MTU the tunnel's packet buffers hold (with WireGuard's 32-byte overhead they stay in
/// one 2 KiB slot).
pub const MAX_MTU: u16 = 1920;

/// Errors creating the tunnel device.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The interface name is empty, too long or has characters the kernel refuses.
    #[error("tunnel name {name:?} is invalid: 1–15 characters of [A-Za-z0-9_.-]")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The MTU is 0 or above [`MAX_MTU`].
    #[error("tunnel mtu {mtu} is invalid: 576–{MAX_MTU}")]
    InvalidMtu {
        /// The MTU given.
        mtu: u16,
    },
    /// The kernel refused to create or configure the device.
    #[error("cannot create tunnel device {name}")]
    Create {
        /// The interface name.
        name: String,
        /// The error from the TUN driver or netlink.
        #[source]
        source: std::io::Error,
    },
}

/// An open TUN device; the device exists as long as this value does.
pub struct TunnelDevice {
    name: String,
    /// The open queues (non-blocking), one per worker: a TUN that is not persistent exists
    /// exactly as long as its queues are open. Worker `i`'s `wg-tun` reads `queues[i]` (the
    /// kernel picks the queue of a packet by its flow: the queue that last wrote that flow,
    /// else the flow hash) and its `wg-udp` writes decrypted packets to the same queue.
    pub(super) queues: Vec<tun_rs::SyncDevice>,
    /// Whether the device was opened with `IFF_VNET_HDR` (offloads).
    pub(super) offload: bool,
}

impl std::fmt::Debug for TunnelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Whether `name` is an interface name the kernel accepts.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl TunnelDevice {
    /// Creates the device with `queues` queues (at least 1; a multi-queue device when more),
    /// assigns its addresses and brings it up (non-blocking mode).
    pub fn create(cfg: &TunnelDeviceConfig, queues: usize) -> Result<TunnelDevice, TunnelError> {
        if !valid_ifname(&cfg.name) {
            return Err(TunnelError::InvalidName {
                name: cfg.name.clone(),
            });
        }
        if !(576..=MAX_MTU).contains(&cfg.mtu) {
            return Err(TunnelError::InvalidMtu { mtu: cfg.mtu });
        }
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&cfg.name)
            .mtu(cfg.mtu)
            .offload(cfg.offload)
            .multi_queue(queues > 1);
        if let Some((addr, len)) = cfg.ipv4 {
            builder = builder.ipv4(addr, len, None);
        }
        if let Some((addr, len)) = cfg.ipv6 {
            builder = builder.ipv6(addr, len);
        }
        let create = |source| TunnelError::Create {
            name: cfg.name.clone(),
            source,
        };
        let device = builder.build_sync().map_err(create)?;
        device.set_nonblocking(true).map_err(create)?;
        let offload = device.tcp_gso();
        let mut all = Vec::with_capacity(queues.max(1));
        for _ in 1..queues {
            let queue = device.try_clone().map_err(create)?;
            queue.set_nonblocking(true).map_err(create)?;
            all.push(queue);
        }
        all.insert(0, device);
        Ok(TunnelDevice {
            name: cfg.name.clone(),
            queues: all,
            offload,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::valid_ifname;

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert!(valid_ifname("capy0"));
        assert!(valid_ifname("a.b-c_d"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("sixteen-chars-xx"));
        assert!(!valid_ifname("has space"));
        assert!(!valid_ifname("slash/no"));
    }
}
