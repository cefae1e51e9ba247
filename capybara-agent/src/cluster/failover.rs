//! Failover and fencing (issue 25): the nodes of a failover group share one **service
//! address** (`--failover-address 10.0.0.100/24 --failover-interface eth0`) and one server key
//! (the same `server.key` in each data directory), so a client's config names the address and
//! never changes. While failover is enabled (`cluster failover enable`: the cluster-wide key
//! `failover/enabled`), each node of the group campaigns with etcd's **election API** (election
//! `failover/election`, with the node's lease); the elected node adds the address to its
//! interface and announces it with three gratuitous ARPs (at once, 1 s and 2 s later: a
//! neighbour entry updated less than `locktime`, 1 s, ago ignores an update). When its lease
//! ends, etcd deletes its election key and the next candidate's campaign returns: it takes the
//! address. Detection is the lease's TTL (`--cluster-ttl`, 10 s by default). A node that takes
//! the address over from another primary (the one it last saw elected) raises `server-down`
//! for it (`data.component` `cluster`, `data.node` the lost primary), which reaches webhooks.
//!
//! ## Fencing by lease: no split brain
//! Every [`CHECK`] a node judges its lease by its own clock (`Node::lease_left`, counted from
//! when each renewal was *sent*, so it never outlives etcd's view, which starts when etcd
//! received it). With less than [`FENCE_MARGIN`] left, the node **releases the address** and
//! **admits no new sessions** (its tunnel answers only rekeys of live sessions), before etcd can
//! expire the lease and elect another node: the margin in the old primary's favour is
//! `FENCE_MARGIN - CHECK` (0.9 s) less the time to delete an address (below a millisecond),
//! assuming the two clocks run at the same rate over one TTL. A node admits again, and may
//! campaign again, once a renewal got through. This holds for every node, in a failover group
//! or not: a node cut off from etcd stops admitting within its TTL.
//!
//! IPv4 service addresses only: an IPv6 one would need unsolicited neighbour advertisements.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{LeaderKey, ResignOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{ClusterError, Node};
use crate::dataplane::netlink::{Msg, NLM_F_CREATE, NLM_F_EXCL, Netlink};

/// How often a node judges its lease.
pub const CHECK: Duration = Duration::from_millis(100);
/// A node with less than this left of its lease fences itself.
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

/// A failover group's service address on this node (`--failover-address`,
/// `--failover-interface`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverConfig {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length on the interface.
    pub prefix_len: u8,
    /// The interface that holds it while this node is the primary.
    pub interface: String,
}

/// What a node is in its failover group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No failover address configured, or failover disabled.
    #[default]
    None,
    /// Campaigning.
    Standby,
    /// Elected: holds the address.
    Primary,
    /// Its lease is (about to be) lost: holds nothing, admits no new sessions.
    Fenced,
}

impl Role {
    /// `none`, `standby`, `primary`, `fenced`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Standby => "standby",
            Role::Primary => "primary",
            Role::Fenced => "fenced",
        }
    }
}

/// The failover state a node shares with its status.
#[derive(Debug, Default)]
pub struct FailoverState {
    role: Mutex<Role>,
}

impl FailoverState {
    /// This node's role now.
    pub fn role(&self) -> Role {
        *self.role.lock().unwrap()
    }

    fn set(&self, role: Role) {
        let mut r = self.role.lock().unwrap();
        if *r != role {
            tracing::info!(
                from = r.as_str(),
                to = role.as_str(),
                "cluster: failover role"
            );
            *r = role;
        }
    }
}

impl Node {
    pub(super) fn failover_key(&self) -> String {
        format!("{}/failover/enabled", self.config.prefix)
    }

    pub(super) fn election_name(&self) -> String {
        format!("{}/failover/election", self.config.prefix)
    }

    /// Whether failover is enabled in the cluster (`cluster failover enable|disable`).
    pub async fn failover_enabled(&self) -> Result<bool, ClusterError> {
        let key = self.failover_key();
        let r = self
            .members
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(r.kvs().first().is_some_and(|kv| kv.value() == b"true"))
    }

    /// Enables or disables failover for the whole cluster.
    pub async fn set_failover(&self, enabled: bool) -> Result<(), ClusterError> {
        let key = self.failover_key();
        let value = if enabled { "true" } else { "false" };
        self.members
            .call(|mut c| {
                let key = key.clone();
                async move { c.put(key, value, None).await }
            })
            .await?;
        Ok(())
    }

    /// The elected primary's name, if there is one.
    pub async fn primary(&self) -> Result<Option<String>, ClusterError> {
        let name = self.election_name();
        let r = self
            .members
            .call(|mut c| {
                let name = name.clone();
                async move { c.leader(name).await }
            })
            .await;
        match r {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // "election: no leader"
            Err(ClusterError::Etcd(etcd_client::Error::GRpcStatus(s)))
                if s.message().contains("no leader") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Adds (`add`) or deletes this node's hold of the service address.
fn address(cfg: &FailoverConfig, add: bool) -> std::io::Result<()> {
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    let name = std::ffi::CString::new(cfg.interface.as_str())
        .map_err(|_| std::io::Error::other("interface name with a NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // struct ifaddrmsg: family, prefix length, flags, scope (universe), index.
    let mut body = vec![libc::AF_INET as u8, cfg.prefix_len, 0, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    let (ty, flags) = if add {
        (RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (RTM_DELADDR, 0)
    };
    let mut msg = Msg::new(ty, flags, &body);
    msg.attr(IFA_LOCAL, &cfg.address.octets())
        .attr(IFA_ADDRESS, &cfg.address.octets());
    match Netlink::open()?.request(msg) {
        Ok(_) => Ok(()),
        // Held already / not held: the wanted state.
        Err(e)
            if (add && e.kind() == std::io::ErrorKind::AlreadyExists)
                || (!add && e.kind() == std::io::ErrorKind::AddrNotAvailable) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Sends one gratuitous ARP for `cfg.address` on its interface: an ARP request whose sender
/// and target are the address, from the interface's MAC, to the broadcast address.
fn gratuitous_arp(cfg: &FailoverConfig) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(cfg.interface.as_str())
        .map_err(|_| std::io::Error::other("interface name with a NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(0x0806u16.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The interface's MAC (SIOCGIFHWADDR: sysfs shows the host's devices, not this
    // namespace's).
    // SAFETY: a zeroed ifreq is valid; its name is set below, within its 16 bytes.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(cfg.interface.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the live `ifr` it is given.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR answered in the `ifru_hwaddr` member.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mac: [u8; 6] = std::array::from_fn(|i| hw.sa_data[i] as u8);
    let ip = cfg.address.octets();
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip);
    // SAFETY: a zeroed sockaddr_ll is valid; its fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = 0x0806u16.to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: sends `frame`, a live buffer, to a live sockaddr_ll of the size given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the address and announces it (three gratuitous ARPs, 1 s apart, in the background: an
/// announcement that fails is logged, the address is held).
fn take(cfg: &FailoverConfig) -> std::io::Result<()> {
    address(cfg, true)?;
    let cfg = cfg.clone();
    tokio::spawn(async move {
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if let Err(e) = gratuitous_arp(&cfg) {
                tracing::error!(error = %e, "cluster: cannot send a gratuitous ARP");
            }
        }
    });
    Ok(())
}

/// What [`run`] tells the agent.
pub struct Hooks {
    /// Admit new sessions, or not (the tunnel's admission).
    pub admit: Box<dyn Fn(bool) + Send + Sync>,
    /// This node took the service address over from the named primary (its lease ended):
    /// the agent raises `server-down` for it.
    pub took_over_from: Box<dyn Fn(&str) + Send + Sync>,
}

/// Judges the lease every [`CHECK`]: fences the node (admission off, the address released) when
/// it is about to be lost, and, with a failover address and failover enabled, campaigns and
/// holds the address while elected. Until `stop`; the address is released then.
pub async fn run(
    node: Arc<Node>,
    failover: Option<FailoverConfig>,
    state: Arc<FailoverState>,
    hooks: Hooks,
    stop: CancellationToken,
) {
    let Hooks {
        admit,
        took_over_from,
    } = hooks;
    // The primary last seen while this node was a standby.
    let mut seen_primary: Option<String> = None;
    let mut admitting = None;
    let mut enabled = false;
    let mut last_flag_read: Option<tokio::time::Instant> = None;
    let mut campaign: Option<tokio::task::JoinHandle<Result<LeaderKey, ClusterError>>> = None;
    let mut leader: Option<LeaderKey> = None;
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A node starts holding nothing: an address left by a killed agent goes.
    if let Some(cfg) = &failover
        && let Err(e) = address(cfg, false)
    {
        tracing::warn!(error = %e, "cluster: cannot remove a leftover service address");
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let lease = node.lease_id();
        let live = node.lease_left().is_some_and(|l| l > FENCE_MARGIN);
        if admitting != Some(live) {
            admit(live);
            if !live {
                tracing::warn!(
                    "cluster: the lease is (about to be) lost: admitting no new sessions"
                );
            } else if admitting.is_some() {
                tracing::info!("cluster: lease held: admitting new sessions again");
            }
            admitting = Some(live);
        }
        let Some(cfg) = &failover else { continue };
        // The flag, once a second while the lease lives.
        if live && last_flag_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_flag_read = Some(tokio::time::Instant::now());
            match tokio::time::timeout(CHECK * 5, node.failover_enabled()).await {
                Ok(Ok(e)) => enabled = e,
                Ok(Err(e)) => tracing::debug!(error = %e, "cluster: failover flag unread"),
                Err(_) => {}
            }
            if enabled
                && leader.is_none()
                && let Ok(Ok(Some(p))) = tokio::time::timeout(CHECK * 5, node.primary()).await
                && p != node.config.node
            {
                seen_primary = Some(p);
            }
        }
        let keep = live && enabled && leader.as_ref().is_some_and(|k| Some(k.lease()) == lease);
        if leader.is_some() && !keep {
            // Fence first: the address goes before anything else is tried.
            if let Err(e) = address(cfg, false) {
                tracing::error!(error = %e, "cluster: cannot release the service address");
            }
            tracing::warn!(address = %cfg.address, live, enabled, "cluster: service address released");
            let key = leader.take().expect("checked");
            if live {
                // Disabled: give the election up now rather than at the lease's end.
                let n = node.clone();
                tokio::spawn(async move {
                    let _ =
                        n.members
                            .call(|mut c| {
                                let key = key.clone();
                                async move {
                                    c.resign(Some(ResignOptions::new().with_leader(key))).await
                                }
                            })
                            .await;
                });
            }
        }
        if let Some(task) = &campaign
            && task.is_finished()
        {
            let task = campaign.take().expect("checked");
            match task.await {
                Ok(Ok(key)) if live && enabled && Some(key.lease()) == lease => match take(cfg) {
                    Ok(()) => {
                        tracing::info!(address = %cfg.address, interface = %cfg.interface, "cluster: elected primary: service address taken");
                        leader = Some(key);
                        if let Some(old) = seen_primary.take() {
                            took_over_from(&old);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cluster: cannot take the service address")
                    }
                },
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "cluster: campaign"),
                Err(e) => tracing::warn!(error = %e, "cluster: campaign task"),
            }
        }
        if live
            && enabled
            && leader.is_none()
            && campaign.is_none()
            && let Some(lease) = lease
        {
            let n = node.clone();
            campaign = Some(tokio::spawn(async move { n.campaign(lease).await }));
        }
        state.set(match (live, leader.is_some(), enabled) {
            (false, _, _) => Role::Fenced,
            (true, true, _) => Role::Primary,
            (true, false, true) => Role::Standby,
            (true, false, false) => Role::None,
        });
    }
    if leader.is_some()
        && let Some(cfg) = &failover
    {
        let _ = address(cfg, false);
    }
    if let Some(c) = campaign {
        c.abort();
    }
}

impl Node {
    /// One campaign with lease `lease`, each call waiting at most `CALL_TIMEOUT` (etcd keeps
    /// the candidacy: the next call with the same lease takes the same place in line).
    async fn campaign(&self, lease: i64) -> Result<LeaderKey, ClusterError> {
        let name = self.election_name();
        let value = self.config.node.clone();
        let r = self
            .members
            .call(|mut c| {
                let (name, value) = (name.clone(), value.clone());
                async move { c.campaign(name, value, lease).await }
            })
            .await?;
        r.leader()
            .cloned()
            .ok_or(ClusterError::Etcd(etcd_client::Error::InvalidArgs(
                "campaign answered no leader key".into(),
            )))
    }
}
