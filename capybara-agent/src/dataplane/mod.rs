//! The dataplane: the only code that touches aya and bpf(2).
//!
//! [`Dataplane::open`] loads the kernel object ([`object::OBJECT`]) with every map pinned by name
//! under the bpffs directory (default [`crate::paths::BPFFS_DIR`]). Pins that already exist are
//! **re-used**, so counters, peers and blocklists survive an agent restart; `CONFIG[0]
//! .layout_version` guards against re-using pins written with another layout
//! ([`DataplaneError::LayoutMismatch`] says how to reset), except pins of layout 7, which
//! [`migrate`] carries over.
//!
//! - [`attach`]: XDP guard on the uplink, TC ingress/egress (TCX links) on the tunnel device; links
//!   are pinned under `<bpffs>/links/` so the programs keep enforcing while the agent is down, and
//!   a restart swaps the new program into the existing link atomically (`BPF_LINK_UPDATE`).
//! - [`peers`]: peers' allowed IPs → dense peer ids; each peer's hot line (policy and traffic
//!   counters, mapped into the agent).
//! - [`stats`]: global verdict counters, per-list hits.
//! - [`lists`]: named blocklists compiled (see [`crate::blocklist`]) and written as generations.
//! - [`gate`]: the admission gate (per-peer admitted/held state, deadlines, the verification
//!   endpoint).
//! - [`quota`]: data-quota buckets shared by peers (limits, assignment, top-up, reset).
//! - [`flows`]: per-peer concurrent flow limits (limits, counts, the expiry sweeper).
//! - [`peer_limits`]: a peer's flow limit and quota bucket set in one policy write.
//! - [`events`]: the kernel's events ring buffer as an async stream of typed [`Event`]s.
//! - [`sockets`]: proxied (Shadowsocks, VLESS) connections' sockets bound to an identity's line,
//!   and the cgroup_skb programs that enforce its policy on them.
//! - [`sys`]: the raw syscalls aya lacks (batch map operations, mmap of the DIR tables, RCU grace
//!   period); every other `unsafe` in the agent's dataplane is in aya.
//!
//! A `Dataplane` is used from one task at a time (`&mut self` for every write); the service layer
//! puts it behind a mutex (`port`: the service's `Plane` and `PolicyPlane` for `Mutex<Dataplane>`).

pub mod attach;
pub mod events;
pub mod flows;
pub mod gate;
pub mod lists;
pub mod migrate;
pub(crate) mod netlink;
pub mod object;
pub mod peer_limits;
pub mod peers;
mod port;
pub mod quota;
pub mod shape;
pub mod sockets;
pub mod stats;
pub mod sys;

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, RingBuf},
    programs::ProgramError,
};
use capybara_common::{
    LAYOUT_VERSION, config::Config, drop::DropReason, gate::GateAllowKey, maps as names,
    peer::PeerId,
};

pub use attach::{AttachHow, Attachment};
pub use events::{Event, EventError, EventStream, PeerDirection, QuotaThreshold};
pub use flows::{FlowSweep, FlowTimeouts};
pub use gate::{EndpointAddr, Gate, L4Proto};
pub use lists::{ListUpdate, RestoreReport};
pub use quota::QuotaUsage;
pub use shape::PeerRates;
pub use sockets::{SocketAttachment, SocketBinder, own_cgroup};
pub use stats::GlobalCounters;

use crate::{blocklist::BlocklistError, net::Cidr, paths};

/// How to open the dataplane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// bpffs directory for the pinned maps and links (default [`paths::BPFFS_DIR`]).
    pub bpffs_dir: PathBuf,
    /// Layer-2 header length on the tunnel device: 0 on a TUN (the default); 14 when the TC
    /// programs are attached to an Ethernet device (tests on veth).
    pub tunnel_l2_hlen: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            bpffs_dir: PathBuf::from(paths::BPFFS_DIR),
            tunnel_l2_hlen: 0,
        }
    }
}

/// Errors of the dataplane. Each names the map, program, interface or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The agent was built with `AYA_BUILD_SKIP=1`: there is no kernel object to load.
    #[error("no kernel object embedded (built with AYA_BUILD_SKIP=1); rebuild without it")]
    NoObject,
    /// The bpffs directory (or its links subdirectory) cannot be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory is not on a bpffs mount.
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// The pinned maps were written by an agent with another map layout.
    #[error(
        "the maps pinned in {dir} have layout version {found}, this agent uses {expected}; to \
         reset the dataplane (this detaches the programs and zeroes every kernel counter), \
         remove the directory: rm -rf {dir}"
    )]
    LayoutMismatch {
        /// The bpffs directory.
        dir: PathBuf,
        /// The layout version found in the pinned `CAPY_CONFIG`.
        found: u32,
        /// [`LAYOUT_VERSION`].
        expected: u32,
    },
    /// Loading the object (creating or re-using maps) failed.
    #[error("cannot load the kernel object with maps pinned in {dir}: {source}")]
    Load {
        /// The bpffs directory.
        dir: PathBuf,
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A map the agent needs is missing from the object or has an unexpected type.
    #[error("map {map} is missing from the kernel object or has the wrong type")]
    MapMissing {
        /// The map's name.
        map: &'static str,
    },
    /// A map operation failed.
    #[error("{op} on map {map} failed: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        op: &'static str,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// A raw map syscall (batch operation, mmap) failed.
    #[error("{op} on map {map} failed: {source}")]
    Syscall {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A program is missing from the object or has an unexpected type.
    #[error("program {prog} is missing from the kernel object or has the wrong type")]
    ProgramMissing {
        /// The program's name.
        prog: &'static str,
    },
    /// Loading (verifying) a program or attaching it failed.
    #[error("{op} {prog} on {ifname:?} failed: {source}")]
    Program {
        /// The program's name.
        prog: &'static str,
        /// The interface ("" when not attaching).
        ifname: String,
        /// What was being done.
        op: &'static str,
        /// aya's error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Pinning, opening or removing a link pin failed.
    #[error("{op} link pin {path} failed: {source}")]
    LinkPin {
        /// The pin path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The interface does not exist (in the agent's network namespace).
    #[error("no network interface named {ifname:?}")]
    UnknownInterface {
        /// The name given.
        ifname: String,
    },
    /// A peer id beyond the peer table.
    #[error("peer id {id} is out of range (the peer table holds ids 0..{max})")]
    PeerIdOutOfRange {
        /// The id given.
        id: PeerId,
        /// The table size.
        max: u32,
    },
    /// No active peer with this id.
    #[error("no peer with id {id}")]
    UnknownPeer {
        /// The id given.
        id: PeerId,
    },
    /// The peer id is already in use (use update).
    #[error("peer id {id} is already in use")]
    PeerExists {
        /// The id given.
        id: PeerId,
    },
    /// An allowed IP is already another peer's.
    #[error("allowed IP {cidr} of peer {id} already belongs to peer {owner}")]
    AddressInUse {
        /// The conflicting allowed IP.
        cidr: Cidr,
        /// The peer being changed.
        id: PeerId,
        /// The peer that has it.
        owner: PeerId,
    },
    /// A blocklist operation was refused (bad input or capacity); nothing was written.
    #[error(transparent)]
    Blocklist(#[from] BlocklistError),
    /// A peer can only be held with a `Gate*` reason; nothing was written.
    #[error("hold reason {} is not an admission-gate reason (gate-*)", reason.name())]
    NotAGateReason {
        /// The reason given.
        reason: DropReason,
    },
    /// A verification endpoint port of 0; nothing was written.
    #[error("verification endpoint port {port} ({proto:?}) is invalid")]
    EndpointPort {
        /// The protocol given.
        proto: L4Proto,
        /// The port given.
        port: u16,
    },
    /// More verification endpoint entries (addresses × ports) than the map holds; nothing was
    /// written.
    #[error("verification endpoint has {entries} address/port combinations, at most {max}")]
    EndpointTooLarge {
        /// Addresses × ports requested.
        entries: usize,
        /// `GATE_ALLOW_MAX`.
        max: u32,
    },
    /// A quota bucket id outside `1..MAX_QUOTA_BUCKETS`; nothing was written.
    #[error("quota bucket {bucket} is out of range (bucket ids are 1..{max}; 0 means none)")]
    QuotaBucketOutOfRange {
        /// The id given.
        bucket: u32,
        /// `MAX_QUOTA_BUCKETS`.
        max: u32,
    },
    /// A quota `limit_bytes` (or top-up amount) of 0; nothing was written.
    #[error(
        "quota bucket {bucket}: limit_bytes must be greater than 0 (remove the bucket instead)"
    )]
    QuotaLimitZero {
        /// The bucket.
        bucket: u32,
    },
    /// The quota bucket has no limit configured (top-up and reset need one); nothing was
    /// written.
    #[error("quota bucket {bucket} is not configured")]
    UnknownQuotaBucket {
        /// The bucket.
        bucket: u32,
    },
    /// A flow limit of 0 was given to `set_flow_limit` (use `clear_flow_limit`); nothing was
    /// written.
    #[error("peer {peer}: flow_limit must be greater than 0 (clear the limit instead)")]
    FlowLimitZero {
        /// The peer.
        peer: PeerId,
    },
    /// A flow limit above the flow table's capacity; nothing was written.
    #[error("peer {peer}: flow_limit {limit} exceeds the flow table's capacity {max}")]
    FlowLimitTooLarge {
        /// The peer.
        peer: PeerId,
        /// The limit given.
        limit: u32,
        /// `MAX_FLOWS`.
        max: u32,
    },
    /// A flow timeout of 0 or beyond `u32::MAX` seconds; nothing was written.
    #[error("flow timeout {field} of {secs} s is out of range (1..=4294967295 s)")]
    FlowTimeout {
        /// The field: `udp`, `tcp` or `tcp_close`.
        field: &'static str,
        /// The value given, in seconds.
        secs: u64,
    },
    /// The IPv4 peer address pool is larger than the pool array.
    #[error("peer address pool {pool} has more than {max} addresses (at most a /12)")]
    PeerPoolTooLarge {
        /// The pool asked for.
        pool: ipnet::Ipv4Net,
        /// Addresses the pool array holds.
        max: u32,
    },
    /// A qdisc, class or device operation of the shaper failed.
    #[error("{op} on {device} failed: {source}")]
    Shape {
        /// The network device.
        device: String,
        /// What was attempted.
        op: &'static str,
        /// The OS error (with the kernel's explanation when it gave one).
        #[source]
        source: io::Error,
    },
    /// Rates were set before the TC programs were attached to a tunnel device.
    #[error("peer {peer}: cannot set rates before the tunnel device is attached")]
    ShapeNotAttached {
        /// The peer.
        peer: PeerId,
    },
    /// Every class id of a direction is in use.
    #[error("peer {peer}: no free shaping class (at most {max} shaped peers per direction)")]
    ShapeClassesExhausted {
        /// The peer.
        peer: PeerId,
        /// Classes per direction.
        max: u32,
    },
    /// The event stream was already taken from this dataplane.
    /// The cgroup v2 directory for the socket programs cannot be found or opened.
    #[error("cgroup {path}: {problem}{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Cgroup {
        /// The directory (or the file it was looked up in).
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
        /// The OS error, if any.
        #[source]
        source: Option<io::Error>,
    },
    #[error("the event stream of this dataplane is already taken (one consumer per ring buffer)")]
    EventStreamTaken,
    /// A ring-buffer record could not be decoded.
    #[error(transparent)]
    Event(#[from] EventError),
}

/// Result alias of this module.
pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        op,
        source: Box::new(e),
    }
}

fn sys_err(map: &'static str, op: &'static str) -> impl FnOnce(io::Error) -> DataplaneError {
    move |source| DataplaneError::Syscall { map, op, source }
}

/// A map taken out of the object with a duplicate of its fd for raw syscalls (shared with
/// background cleanup threads).
struct Owned<T> {
    map: T,
    fd: Arc<OwnedFd>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<Owned<T>>
where
    T: TryFrom<Map, Error = MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MapMissing { map: name })?;
    let data: &MapData = match &m {
        Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) | Map::LpmTrie(d) => d,
        _ => return Err(DataplaneError::MapMissing { map: name }),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(sys_err(name, "dup fd"))?;
    let fd = Arc::new(fd);
    let map = T::try_from(m).map_err(|_| DataplaneError::MapMissing { map: name })?;
    Ok(Owned { map, fd })
}

/// The loaded dataplane: the object, its pinned maps, and the agent's mirror of their contents.
pub struct Dataplane {
    /// How it was opened.
    config: DataplaneConfig,
    /// The loaded object (programs; maps have been taken out).
    ebpf: Ebpf,
    /// `CAPY_CONFIG`, and the agent's copy of its one entry (the only writer is this struct).
    config_map: Owned<Array<MapData, Config>>,
    cfg: Config,
    /// Peer maps and the mirror of peers' allowed IPs.
    peers: peers::PeerMaps,
    /// Counters.
    stats: stats::StatMaps,
    /// Blocklists of both directions.
    lists: lists::ListMaps,
    /// Guarded UDP ports.
    guard_ports: Owned<Array<MapData, u32>>,
    /// The admission gate's verification endpoint.
    gate_allow: Owned<HashMap<MapData, GateAllowKey, u32>>,
    /// Data-quota buckets.
    quota: quota::QuotaMaps,
    /// The flow table and the per-peer flow counts (mapped: the agent decrements atomically).
    flows: flows::FlowMaps,
    /// The events ring buffer, until [`Dataplane::event_stream`] takes it.
    events: Option<RingBuf<MapData>>,
    /// Links this process attached or took over.
    links: Vec<attach::HeldLink>,
    /// Bandwidth shaping on the tunnel device, from `attach_tc` on.
    shaper: Option<shape::Shaper>,
    /// Counters to catch up from layout-7 pins once `attach_tc` replaced the old programs
    /// ([`migrate`]).
    migration: Option<migrate::Pending>,
    /// The socket programs' maps ([`sockets`]).
    sockets: sockets::SockMaps,
    /// The socket programs' links, per cgroup (held, not pinned).
    sock_links: Vec<sockets::CgroupLinks>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("bpffs_dir", &self.config.bpffs_dir)
            .field("config", &self.cfg)
            .field("links", &self.links.len())
            .finish()
    }
}

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn ensure_bpffs_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    for p in [path.to_path_buf(), paths::links_dir(path)] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(paths::BPFFS_DIR_MODE)
            .create(&p)
            .map_err(|source| DataplaneError::CreateDir {
                path: p.clone(),
                source,
            })?;
    }
    match nix::sys::statfs::statfs(path) {
        Ok(s) if s.filesystem_type().0 == BPF_FS_MAGIC => Ok(()),
        _ => Err(DataplaneError::NotBpffs {
            path: path.to_path_buf(),
        }),
    }
}

/// Reads the layout version of an existing pinned `CAPY_CONFIG`, if there is one.
fn pinned_layout_version(dir: &Path) -> Result<Option<u32>> {
    let pin = paths::map_pin(dir, names::CONFIG);
    if !pin.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&pin).map_err(map_err(names::CONFIG, "open pin"))?;
    let value_size = data
        .info()
        .map_err(map_err(names::CONFIG, "read map info"))?
        .value_size() as usize;
    // `layout_version` sits at the same offset in every layout; the entry's size changed
    // (16 bytes up to layout 3, 24 up to layout 5, 40 in layout 6, 48 since), so read it as
    // the words it has.
    let word = capybara_common::config::CONFIG_LAYOUT_VERSION_OFFSET / 4;
    let version = match value_size {
        16 => read_words::<4>(data)?[word],
        24 => read_words::<6>(data)?[word],
        40 => read_words::<10>(data)?[word],
        48 => read_words::<12>(data)?[word],
        // Not a layout this agent knows: report it as an unknown (0 would mean "fresh").
        _ => u32::MAX,
    };
    Ok(Some(version))
}

fn read_words<const N: usize>(data: MapData) -> Result<[u32; N]> {
    let arr: Array<MapData, [u32; N]> =
        Array::try_from(Map::Array(data)).map_err(map_err(names::CONFIG, "open pin"))?;
    arr.get(&0, 0).map_err(map_err(names::CONFIG, "read"))
}

impl Dataplane {
    /// Loads the kernel object, creating or re-using the maps pinned in `config.bpffs_dir`.
    /// Programs are loaded (verified) when attached.
    pub fn open(config: DataplaneConfig) -> Result<Dataplane> {
        if object::OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let dir = config.bpffs_dir.clone();
        ensure_bpffs_dir(&dir)?;
        let mut layout7 = None;
        let reused = match pinned_layout_version(&dir)? {
            Some(migrate::FROM_LAYOUT) => {
                layout7 = Some(migrate::read(&dir)?);
                true
            }
            Some(v) if v != 0 && v != LAYOUT_VERSION => {
                return Err(DataplaneError::LayoutMismatch {
                    dir,
                    found: v,
                    expected: LAYOUT_VERSION,
                });
            }
            Some(_) => true,
            None => false,
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global("TUNNEL_L2_HLEN", &config.tunnel_l2_hlen, false)
            .load(object::OBJECT)
            .map_err(|e| DataplaneError::Load {
                dir: dir.clone(),
                source: Box::new(e),
            })?;

        let mut config_map: Owned<Array<MapData, Config>> = take(&mut ebpf, names::CONFIG)?;
        let mut cfg = config_map
            .map
            .get(&0, 0)
            .map_err(map_err(names::CONFIG, "read"))?;
        let migrated = layout7.as_ref().map_or(&[][..], |l| &l.lines[..]);
        let mut peers = peers::PeerMaps::open(&mut ebpf, migrated)?;
        // The version after the migrated lines are written (a crash before migrates again).
        if cfg.layout_version != LAYOUT_VERSION {
            cfg.layout_version = LAYOUT_VERSION;
            config_map
                .map
                .set(0, cfg, 0)
                .map_err(map_err(names::CONFIG, "write"))?;
        }
        let migration = layout7.map(|l| migrate::unpin(&dir, l)).transpose()?;
        peers.pool = (cfg.peer_pool_v4_base, cfg.peer_pool_v4_len);
        let stats = stats::StatMaps::open(&mut ebpf)?;
        let lists = lists::ListMaps::open(&mut ebpf)?;
        let guard_ports = take(&mut ebpf, names::GUARD_PORTS)?;
        let gate_allow = take(&mut ebpf, names::GATE_ALLOW)?;
        let quota = quota::QuotaMaps::open(&mut ebpf)?;
        let flows = flows::FlowMaps::open(&mut ebpf)?;
        let sockets = sockets::SockMaps::open(&mut ebpf)?;
        let events = ebpf
            .take_map(names::EVENTS)
            .and_then(|m| RingBuf::try_from(m).ok())
            .ok_or(DataplaneError::MapMissing { map: names::EVENTS })?;
        tracing::info!(
            dir = %dir.display(),
            reused,
            peers = peers.count(),
            src_generation = cfg.src_generation,
            dst_generation = cfg.dst_generation,
            "dataplane maps {}",
            if reused { "re-used from pins" } else { "created and pinned" }
        );
        Ok(Dataplane {
            config,
            ebpf,
            config_map,
            cfg,
            peers,
            stats,
            lists,
            guard_ports,
            gate_allow,
            quota,
            flows,
            events: Some(events),
            links: Vec::new(),
            shaper: None,
            migration,
            sockets,
            sock_links: Vec::new(),
        })
    }

    /// The bpffs directory of the pinned maps and links.
    pub fn bpffs_dir(&self) -> &Path {
        &self.config.bpffs_dir
    }

    /// The runtime configuration entry as last written.
    pub fn runtime_config(&self) -> Config {
        self.cfg
    }

    fn write_config(&mut self, cfg: Config) -> Result<()> {
        self.config_map
            .map
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG, "write"))?;
        self.cfg = cfg;
        Ok(())
    }

    /// Sets the minimum interval between two rate-limited events of one kind for one peer
    /// (default 1 s; `Duration::ZERO` restores the default).
    pub fn set_event_interval(&mut self, interval: std::time::Duration) -> Result<()> {
        let mut c = self.cfg;
        c.event_interval_ns = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.write_config(c)
    }

    /// The kernel events as an async stream. Call within a tokio runtime; once per dataplane.
    pub fn event_stream(&mut self) -> Result<EventStream> {
        let ring = self.events.take().ok_or(DataplaneError::EventStreamTaken)?;
        EventStream::new(ring).map_err(sys_err(names::EVENTS, "register with the reactor"))
    }

    /// Sets or clears `CONFIG_F_DROP_UNKNOWN_PEER`.
    pub fn set_drop_unknown_peer(&mut self, drop: bool) -> Result<()> {
        let mut c = self.cfg;
        if drop {
            c.flags |= capybara_common::config::CONFIG_F_DROP_UNKNOWN_PEER;
        } else {
            c.flags &= !capybara_common::config::CONFIG_F_DROP_UNKNOWN_PEER;
        }
        self.write_config(c)
    }

    /// Sets the ports the XDP guard inspects: `udp` (the WireGuard port) and `tcp` (the proxy
    /// endpoints'); every other port of either transport passes unguarded. One batch write of
    /// the whole 65 536-entry table.
    pub fn set_guard_ports(&mut self, udp: &[u16], tcp: &[u16]) -> Result<()> {
        use capybara_common::maps::{GUARD_TCP, GUARD_UDP};
        let keys: Vec<u32> = (0..65_536).collect();
        let mut values = vec![0u32; 65_536];
        for &p in udp {
            values[p as usize] |= GUARD_UDP;
        }
        for &p in tcp {
            values[p as usize] |= GUARD_TCP;
        }
        match sys::update_batch(self.guard_ports.fd.as_fd(), &keys, &values) {
            Ok(()) => {}
            Err((_, e)) if sys::is_unsupported(&e) => {
                for (k, v) in keys.iter().zip(&values) {
                    self.guard_ports
                        .map
                        .set(*k, v, 0)
                        .map_err(map_err(names::GUARD_PORTS, "write"))?;
                }
            }
            Err((_, e)) => return Err(sys_err(names::GUARD_PORTS, "batch update")(e)),
        }
        tracing::info!(?udp, ?tcp, "guard ports set");
        Ok(())
    }

    /// Leaves the programs enforcing (links stay pinned) or detaches them, then closes.
    pub fn shutdown(mut self, detach: bool) -> Result<()> {
        if detach {
            self.detach()?;
        } else {
            tracing::info!(dir = %self.config.bpffs_dir.display(), "leaving programs attached (pinned links)");
        }
        Ok(())
    }
}
