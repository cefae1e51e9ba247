//! The memory floor of the per-peer pipeline: minimal `sched_cls` programs that do nothing but
//! the random memory accesses any per-peer pipeline must make, run on the same probes as
//! [`super::pipeline`] in the same rounds. They show how much of `tc_pipeline_ns_100k_peers`
//! is the cost of touching 100 000 peers' state at all, whatever the layout.
//!
//! Each program reads the probe's IPv4 source, turns it into an index by its offset from the
//! first peer address (the cheapest attribution there is: no table), and then makes `accesses`
//! of these, each a `bpf_map_lookup_elem` plus a write to the value:
//!
//! 1. the peer's own 64-byte line in an array of [`MAX_PEERS`] (atomic add): the state every
//!    per-peer counter, limit and gate decision needs, packed into one cache line;
//! 2. a 64-byte quota bucket shared by ten peers, in an array of [`MAX_QUOTA_BUCKETS`] (atomic
//!    add): a shared budget cannot live in the peer's line;
//! 3. the probe's flow entry in a hash of [`MAX_FLOWS`] (`BPF_F_NO_PREALLOC`, 4-byte key,
//!    64-byte value; a plain store into it, as a refresh of its last-seen time would be): an
//!    established flow must be found to be refreshed.
//!
//! With 0 accesses the program only parses: the cost of the test run itself. Each program has
//! maps of its own (one program's pass must not warm the cache for the next), the same size at
//! 10 and at 100 000 peers; only how many of their entries the probes touch differs.
//! The programs are a dozen raw BPF instructions loaded with `BPF_PROG_LOAD` (they are a
//! measuring instrument, not part of the agent's object).

use std::{
    ffi::c_void,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use capybara_common::{flow::MAX_FLOWS, peer::MAX_PEERS, quota::MAX_QUOTA_BUCKETS};

/// Bytes of each value: one cache line.
const LINE: u32 = 64;
/// `BPF_PROG_TEST_RUN` puts a 14-byte Ethernet header before the IP packet.
const IP_OFF: i16 = 14;
/// Offset of `__sk_buff.data` and `__sk_buff.data_end`.
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
/// Peers per shared quota bucket (as in the pipeline benchmark).
const PEERS_PER_BUCKET: i32 = 10;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The floor program with `accesses` (0..=3) over `maps` = [peers, buckets, flows], for peers
/// whose addresses start at `base` (host order) and number `n`.
fn program(maps: &[i32; 3], accesses: usize, base: u32, n: u32) -> Vec<Insn> {
    let mut p = vec![
        insn(0x61, 6, 1, SKB_DATA, 0),               // r6 = skb->data
        insn(0x61, 7, 1, SKB_DATA_END, 0),           // r7 = skb->data_end
        insn(0xbf, 2, 6, 0, 0),                      // r2 = r6
        insn(0x07, 2, 0, 0, i32::from(IP_OFF) + 20), // r2 += eth + ip header
    ];
    // Jumps to the exit, patched once its index is known.
    let mut to_out = vec![p.len()];
    p.push(insn(0x2d, 2, 7, 0, 0)); // if r2 > r7 goto out
    p.extend([
        insn(0x61, 8, 6, IP_OFF + 12, 0), // r8 = ip source (network order)
        insn(0xdc, 8, 0, 0, 32),          // r8 = be32(r8)
        insn(0x17, 8, 0, 0, base as i32), // r8 -= first peer address
    ]);
    to_out.push(p.len());
    p.push(insn(0x35, 8, 0, 0, n as i32)); // if r8 >= n goto out
    p.extend([
        insn(0x63, 10, 8, -4, 0),              // key0 = r8 (peer, flow)
        insn(0xbf, 9, 8, 0, 0),                // r9 = r8
        insn(0x37, 9, 0, 0, PEERS_PER_BUCKET), // r9 /= 10
        insn(0x63, 10, 9, -8, 0),              // key1 = bucket
    ]);
    for (k, &fd) in maps.iter().enumerate().take(accesses) {
        let key: i32 = if k == 1 { -8 } else { -4 };
        p.extend([
            insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, fd), // r1 = map (ld_imm64, two slots)
            insn(0, 0, 0, 0, 0),
            insn(0xbf, 2, 10, 0, 0),  // r2 = r10
            insn(0x07, 2, 0, 0, key), // r2 += key
            insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        ]);
        to_out.push(p.len());
        p.push(insn(0x15, 0, 0, 0, 0)); // if r0 == 0 goto out
        if k == 2 {
            p.push(insn(0x7b, 0, 8, 8, 0)); // *(u64 *)(r0 + 8) = r8 (the flow's "last seen")
        } else {
            p.extend([
                insn(0xb7, 1, 0, 0, 1), // r1 = 1
                insn(0xdb, 0, 1, 0, 0), // lock *(u64 *)(r0 + 0) += r1
            ]);
        }
    }
    // Every access made: TC_ACT_OK. Otherwise (short packet, not a peer, a failed lookup):
    // TC_ACT_SHOT, which the benchmark refuses.
    p.extend([insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)]);
    let out = p.len();
    for j in to_out {
        p[j].off = (out - j - 1) as i16;
    }
    p.extend([insn(0xb7, 0, 0, 0, 2), insn(0x95, 0, 0, 0, 0)]);
    p
}

fn sys_bpf(cmd: libc::c_long, attr: *mut c_void, size: usize) -> std::io::Result<i64> {
    // SAFETY: `attr` points to a live, initialised `size`-byte attribute struct for `cmd`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A map created for the floor, closed on drop.
fn create_map(kind: u32, key: u32, max: u32, flags: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut a = Attr {
        map_type: kind,
        key_size: key,
        value_size: LINE,
        max_entries: max,
        map_flags: flags,
    };
    let fd = sys_bpf(BPF_MAP_CREATE, (&raw mut a).cast(), size_of::<Attr>())
        .context("BPF_MAP_CREATE for the floor")?;
    // SAFETY: a new file descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn update(map: &OwnedFd, key: u32) -> Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let value = [0u8; LINE as usize];
    let mut a = Attr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: (&raw const key) as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, (&raw mut a).cast(), size_of::<Attr>())
        .context("BPF_MAP_UPDATE_ELEM for the floor")?;
    Ok(())
}

/// The floor programs for one peer count, each with maps of its own (so that one program's
/// pass does not warm the cache for the next).
pub struct Floor {
    /// Per entry of [`ACCESSES`]: the program and the maps it uses.
    progs: Vec<(OwnedFd, [OwnedFd; 3])>,
}

/// Accesses of the floor programs: parse only, the peer's line, all three.
pub const ACCESSES: [usize; 3] = [0, 1, 3];

impl Floor {
    /// Maps and programs for `n` peers whose addresses start at `base`; every peer has its
    /// flow entry (as after the pipeline's warm-up).
    pub fn new(base: u32, n: u32) -> Result<Self> {
        let mut progs = Vec::new();
        for accesses in ACCESSES {
            let maps = [
                create_map(BPF_MAP_TYPE_ARRAY, 4, MAX_PEERS, 0)?,
                create_map(BPF_MAP_TYPE_ARRAY, 4, MAX_QUOTA_BUCKETS, 0)?,
                create_map(BPF_MAP_TYPE_HASH, 4, MAX_FLOWS, BPF_F_NO_PREALLOC)?,
            ];
            if accesses >= 3 {
                for i in 0..n {
                    update(&maps[2], i)?;
                }
            }
            let fds = maps.each_ref().map(|m| m.as_raw_fd());
            progs.push((load(&program(&fds, accesses, base, n))?, maps));
        }
        Ok(Self { progs })
    }

    /// Runs every probe frame once through each program; returns mean ns per packet for each
    /// entry of [`ACCESSES`].
    pub fn round(&self, frames: &[Vec<u8>]) -> Result<Vec<f64>> {
        self.progs
            .iter()
            .map(|(prog, _)| {
                let mut total = Duration::ZERO;
                for f in frames {
                    total += test_run(prog, f)?;
                }
                Ok(total.as_nanos() as f64 / frames.len().max(1) as f64)
            })
            .collect()
    }
}

fn load(insns: &[Insn]) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
    }
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
    };
    match sys_bpf(BPF_PROG_LOAD, (&raw mut a).cast(), size_of::<Attr>()) {
        // SAFETY: a new file descriptor the kernel just returned, owned by nothing else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD of a floor program: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

fn test_run(prog: &OwnedFd, frame: &[u8]) -> Result<Duration> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }
    let mut a = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        retval: u32::MAX,
        data_size_in: frame.len() as u32,
        data_size_out: 0,
        data_in: frame.as_ptr() as u64,
        data_out: 0,
        repeat: 1,
        duration: 0,
    };
    sys_bpf(BPF_PROG_TEST_RUN, (&raw mut a).cast(), size_of::<Attr>())
        .context("BPF_PROG_TEST_RUN of a floor program")?;
    ensure!(
        a.retval == 0,
        "a floor program returned {} (not every access was made)",
        a.retval
    );
    Ok(Duration::from_nanos(u64::from(a.duration)))
}
