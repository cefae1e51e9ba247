//! The tunnel: the agent's WireGuard interface. This module is the only code that touches
//! boringtun and the TUN device.
//!
//! - `device`: the TUN device (`tun-rs`, optional Linux offloads).
//! - [`wg`]: [`WgTunnel`], the public API — start, peer operations, status, events.
//! - `peers`: the peer table ([`PeerConfig`], [`PeerStatus`], the data path's peers, the
//!   immutable snapshot).
//! - `events`: [`TunnelEvent`] and its reasons.
//! - `shared`: what the threads share and the steps every thread takes on a peer.
//! - `sockets`: the UDP sockets (one per worker, `SO_REUSEPORT`, steered by peer) and their
//!   segmentation offload (`UDP_SEGMENT`, `UDP_GRO`).
//! - `threads`: `rx` (`wg-udp-<i>`), `tx` (`wg-tun-<i>`), `timers` (`wg-timers`), and their batch
//!   sizes.
//! - [`allowed_ips`]: cryptokey routing (longest prefix match, IPv4 and IPv6).
//! - [`liveness`]: connect/disconnect, pure (time is an argument).
//! - [`auth_table`]: failed handshakes counted per /24 or /64 in a fixed table, O(1) per packet.
//! - [`reputation`]: the hook the reputation engine hangs on the `wg-udp` path (each failed
//!   handshake's source and reason).
//! - [`uapi`]: the `wg` control socket (`wg show <iface>`).
//! - [`keys`], [`config`]: x25519 keys in base64, the server key file, wg-quick client configs.
//!
//! # Decision: `boringtun::noise::Tunn` driven by our own threads, not boringtun's `device`
//!
//! boringtun's `device` is a complete server, but it hides what the agent needs:
//! - **events**: it has no hook for "handshake completed" or "peer went away"; the agent would
//!   have to poll its UAPI or scrape logs. Driving `Tunn` ourselves, the dispatcher sees each
//!   handshake message and its result, and the initiator's first packet on the new session
//!   (which is when a responder's handshake is complete, as the kernel counts it: a client with
//!   the wrong preshared key never gets there), and emits `Connected` at once (well within the
//!   1 s required); the timer thread sees the silence that makes a `Disconnected`.
//! - **kick**: a session is torn down by replacing the peer's `Tunn` (keys forgotten, index
//!   kept); `device` can only remove the peer.
//! - **latest handshake**: its UAPI writes the time *since* the handshake where `wg` expects a
//!   timestamp; we record the wall-clock time when the handshake completes.
//! - **throughput**: `device` does one syscall per packet each way. Ours reads the UDP socket with
//!   `recvmmsg` and writes with `sendmmsg` (`threads::BATCH` datagrams per call) and drains up to
//!   a batch of TUN packets per wake-up; with `UDP_SEGMENT` a run of equal datagrams to one peer
//!   is one message the kernel segments after routing, and with `UDP_GRO` a receive may return
//!   a sender's coalesced run, split here (see `sockets`; [`WgTunnel::udp_offload`] counts
//!   both). It can open the TUN with `IFF_VNET_HDR` offloads (one TUN read returns a TCP
//!   super-segment of up to 64 KiB, split in userspace; decrypted segments are coalesced by GRO
//!   before one TUN write — the changes that took wireguard-go past 10 Gbit/s), on by default,
//!   the kernel programs counting each super-packet as its segments: see [`DEFAULT_OFFLOAD`]
//!   for the numbers. No allocation per packet: every buffer is per thread
//!   and reused.
//!
//! # Threads and workers
//!
//! Per worker `i` (`WgConfig::workers`, the agent's `--tunnel-workers`, default one per CPU):
//! a UDP socket on the listen port (`SO_REUSEPORT` when there are several), a queue of the
//! TUN device (`IFF_MULTI_QUEUE`), `wg-udp-<i>` (socket → decrypt → its TUN queue) and
//! `wg-tun-<i>` (its TUN queue → encrypt → socket). Then `wg-timers` (every 250 ms: boringtun's
//! timers, persistent keepalive, disconnect timeout) and `wg-uapi`, one each.
//!
//! - **Which worker sees a datagram**: a classic BPF program on the reuseport group sends a
//!   data packet, handshake response or cookie reply of peer `p` to socket `p mod N` (the peer
//!   index is in the receiver index, see `sockets`); initiations go by the 4-tuple hash. Peer
//!   indices are consecutive, so peers spread evenly (by the hash alone, 16 peers on 2 workers
//!   would be 11/5 or worse one time in five).
//! - **Which worker sees a TUN packet**: the kernel picks the queue of a flow as the queue that
//!   last wrote that flow (its flow table, symmetric hash), so the replies to a peer's traffic
//!   are read by the worker that decrypted it, and a peer's both directions usually stay on one
//!   worker and one socket. A peer's packets may still be encrypted by any `wg-tun-<i>` (a new
//!   flow is hashed): that is correct, since the peer's state is behind its own lock and any
//!   of the sockets sends from the same local port.
//! - **No global lock on the fast path**: the peer table is an immutable snapshot (`Arc`)
//!   swapped by control operations; the data path threads re-read it only when a generation
//!   counter moved, so adding or removing a peer never touches another peer's state or
//!   session. The one lock a packet takes is its peer's `Mutex` (held across consecutive
//!   packets of one peer). Counters are relaxed atomics: per peer (bytes), per worker (one
//!   cache line each) and the offload totals, added once per batch; the drop counters only on
//!   drops.
//!
//! boringtun 0.7.1's `Tunn` takes `&mut self` both ways, so one peer's packets are serialised
//! by its lock however many workers there are: workers scale with peers, not with one peer's
//! flow (the `tunnel_throughput_*` figures are one iperf3 flow, one peer).
//!
//! # Design for 32 cores
//!
//! What is shared, and how often it is written, per worker and per second at line rate:
//!
//! | shared | written by | rate | contention |
//! |---|---|---|---|
//! | peer table snapshot (`RwLock<Arc<Table>>`, generation) | control operations | per change | data path reads the generation (one shared, read-mostly line) per batch and takes the read lock only when it moved |
//! | a peer's `Mutex<PeerState>` (its `Tunn`) | the workers that carry that peer, `wg-timers`, status calls | per packet, per peer | none while a peer stays on one worker (steering); two workers serialise on a peer only when its flows hash to two TUN queues |
//! | a peer's `rx_bytes`/`tx_bytes` | the same | per packet | as the lock: one peer, one line |
//! | per-worker counters | their worker | per batch | none (a cache line each) |
//! | UDP offload totals, drop counters, handshake counters | every worker | per batch; per drop; per handshake | one line bounced per batch of up to 64 datagrams: ≈ 20 k writes/s per worker at 10 Gbit/s, cheap |
//! | the handshake rate limiter, the auth table | every worker | per handshake, per failed handshake | a `Mutex`/atomics, on the handshake path only |
//! | `wg-timers` | one thread | every 250 ms, every awake peer | locks each awake peer briefly: at 100 k awake peers ≈ 400 k lock/unlock per second, which contends with the data path on the peers it touches |
//! | UAPI, status, `connected_peers` | API calls | per call | lock each peer once |
//!
//! What would change for 32 cores: (1) per-worker timer wheels — each worker runs the timers
//! of the peers steered to it, so `wg-timers` no longer locks every awake peer from one thread
//! and no lock is ever taken across workers for timers; (2) the shared totals as per-worker
//! lines summed on read, like the per-worker counters; (3) RSS on the NIC spreading by the
//! same key as our reuseport program (the peer index is in the datagram: an XDP program can
//! steer to the CPU of the peer's worker with a CPU map), so the softirq work of a peer lands
//! on its worker's core; (4) pinning `wg-udp-<i>`/`wg-tun-<i>` to CPU `i` and setting
//! `SO_INCOMING_CPU`, once the steering above keeps a peer on one core end to end; (5) a
//! `Tunn` split in two (encrypt and decrypt halves with their own state, as the kernel's
//! WireGuard does), so one peer's two directions stop sharing a lock — that needs a
//! boringtun change. Not measured here: this machine has 2 cores, shared with the load
//! generator.

//! # Numbers
//!
//! `tests/src/bench/tunnel.rs` (`cargo xtask bench --filter tunnel`): iperf3 TCP from a
//! `wireguard-go` client through this tunnel (TC programs attached), through `boringtun-cli` and
//! through a server-side `wireguard-go`, on the same machine in the same run. On the 2-core
//! development machine, 8 s runs, offloads off (the default then): 607 and 717 Mbit/s against
//! boringtun-cli's 266 and 471 and wireguard-go's 294 and 417 — `tunnel_throughput_vs_boringtun_cli`
//! 2.28 and 1.52, `…_vs_wireguard_go` 2.06 and 1.72 (target ≥ 1.0). Both cores are shared by
//! the client, the server and iperf3's two ends (and by other builds), so absolute figures move
//! by tens of percent between runs; the ratios are same-run. [`DEFAULT_OFFLOAD`] has the
//! figures with offloads.

//! # Many peers (`agent_load` benchmark, 100 000 stored devices)
//!
//! - **A `Tunn` only once needed.** boringtun's `Tunn` is built whole up front: eight session
//!   slots (two AEAD keys and a 1024-packet replay window each), the handshake state, the
//!   packet queue, timers — 11 040 bytes — and `Tunn::new` computes the static-static X25519
//!   product: ≈ 170 µs on this 2-core machine (measured with boringtun 0.7.1 alone, 2 000
//!   `Tunn`s), so 1.05 GiB and ≈ 17 s of CPU for 100 000 peers that mostly never connect. A peer
//!   gets one at its first handshake initiation (or the first packet the server must encrypt
//!   for it, after a preshared-key change); a kick or a new preshared key drops it, and the
//!   next handshake makes a fresh one (as replacing it did). A datagram naming a peer without
//!   one is refused as a fresh `Tunn` would refuse it (no session, no handshake in flight). The
//!   timer thread skips peers that never had one (`Peer::awake`) without locking them.
//! - **One table for a batch.** Peers live in an immutable snapshot that every change copies
//!   (see Threads); adding 100 000 peers one by one copied it 100 000 times, quadratic.
//!   [`WgTunnel::add_peers`] copies it once for the whole batch (the agent's start-up) and
//!   publishes it once, all or nothing.
//!
//! Before both, the agent with 100 000 stored devices was not ready after 120 s (810 MiB
//! resident then, growing; a prototype with the batch alone was ready after 52 s at 1.6 GiB).
//! With both, the tunnel's part of the start-up is ≈ 0.1 s (`tunnel_ms` in the agent's
//! `devices restored from the store` log line: 107 ms) and ≈ 45 MiB (heaptrack: 28 MiB of
//! `Peer`s, ≈ 280 B each, the rest the three lookup tables). Adding or removing one peer at
//! run time still copies the snapshot: ≈ 10 ms at 100 000 peers, not addressed here.

//! # Lifetime
//!
//! The device is not persistent: it goes away with the agent, and so do the TC programs attached
//! to it — while the agent is down there is no tunnel and so no tunnel traffic to enforce on; the
//! uplink's XDP guard stays attached through its pinned link, and every counter lives in pinned
//! maps. The agent re-attaches the TC programs to the new device.

pub mod allowed_ips;
pub mod auth_table;
pub mod config;
mod device;
mod events;
pub mod keys;
pub mod liveness;
mod peers;
mod port;
pub mod reputation;
mod shared;
mod sockets;
mod threads;
pub mod uapi;
pub mod wg;

pub use config::ClientConfig;
pub use device::{DEFAULT_OFFLOAD, MAX_MTU, TunnelDevice, TunnelDeviceConfig, TunnelError};
pub use events::{AuthFailure, AuthReport, DisconnectReason, TunnelEvent};
pub use keys::{KeyError, PresharedKey, PrivateKey, PublicKey};
pub use peers::{PeerConfig, PeerStatus};
pub use wg::{
    DropCounters, HandshakeCounters, MAX_WORKERS, UdpOffloadCounters, WgConfig, WgError, WgTunnel,
    default_workers,
};
