//! Raw bpf(2), mmap(2) and membarrier(2) calls that aya 0.14 does not offer: batch updates,
//! deletes and lookups, the memory mapping of `BPF_F_MMAPABLE` arrays, an RCU grace period, and
//! the CLOCK_BOOTTIME the kernel programs read.
//! Every `unsafe` block of the agent's dataplane that is not in aya lives here.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Elements per batch syscall: large enough to amortise the call, small enough that an error
/// report (`count` = elements done) stays cheap to act on.
const BATCH_CHUNK: usize = 65_536;

/// The `batch` member of `union bpf_attr` (uapi `linux/bpf.h`), the only one these calls use.
/// The kernel zero-fills the rest of the union when given this smaller size.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Issues one batch command; returns the number of elements processed (also on error, as the
/// kernel reports it) and the error, if any.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> (u32, Option<io::Error>) {
    // SAFETY: `attr` is a valid, initialised `BatchAttr` whose pointers (set by the callers)
    // reference live buffers of at least `count` keys/values of the map's sizes; the kernel reads
    // at most `size_of::<BatchAttr>()` bytes of it and writes back `count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        (attr.count, Some(io::Error::last_os_error()))
    } else {
        (attr.count, None)
    }
}

/// The element member of `union bpf_attr` (`BPF_MAP_*_ELEM`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_call(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `ElemAttr` whose `key` and `value` (set by the
    // callers) point at live values of the map's key and value sizes; the kernel reads at most
    // `size_of::<ElemAttr>()` bytes of it and reads the key, reads (update) or writes (lookup)
    // the value.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `BPF_MAP_UPDATE_ELEM` of one element, through `&` (no lock: the kernel serialises). Used for
/// the socket storage map, whose key is a socket's fd (`i32`).
pub fn update_elem<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags,
        ..Default::default()
    };
    elem_call(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// `BPF_MAP_LOOKUP_ELEM` of one element; `None` when the key has no value (`ENOENT`).
pub fn lookup_elem<K: Copy, V: Copy + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..Default::default()
    };
    match elem_call(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_DELETE_ELEM` of one element; `false` when the key had no value (`ENOENT`).
pub fn delete_elem<K: Copy>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        ..Default::default()
    };
    match elem_call(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// True if `e` means "this map type has no batch operation" (fall back to single elements).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */)
    )
}

/// `BPF_MAP_UPDATE_BATCH`: writes `keys[i] → values[i]` for all `i`. On error, returns the
/// number of elements written before it.
pub fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let chunks = values.chunks(BATCH_CHUNK);
    let mut values = chunks.map(|v| v.as_ptr() as u64);
    chunked(BPF_MAP_UPDATE_BATCH, map, keys, BATCH_CHUNK, || {
        values.next().unwrap_or_default()
    })
}

/// `BPF_MAP_UPDATE_BATCH` writing the same `value` (the map's whole value: for a per-CPU map,
/// every CPU's copy, each rounded up to 8 bytes) to every key of `keys`. The value buffer is
/// built once per chunk of 4096 keys, so the memory it takes does not grow with `keys`. On
/// error, returns the number of elements written before it.
pub fn update_batch_same<K: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    value: &[u8],
) -> Result<(), (usize, io::Error)> {
    const CHUNK: usize = 4096;
    let values = value.repeat(CHUNK.min(keys.len()));
    chunked(BPF_MAP_UPDATE_BATCH, map, keys, CHUNK, || {
        values.as_ptr() as u64
    })
}

/// `BPF_MAP_DELETE_BATCH`: deletes `keys`. On error, returns the number deleted before it.
pub fn delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    chunked(BPF_MAP_DELETE_BATCH, map, keys, BATCH_CHUNK, || 0)
}

/// Runs batch command `cmd` over `keys` in chunks of `chunk`, `values` giving each chunk's value
/// buffer in turn (0 for none). On error, returns the number of elements done before it.
fn chunked<K: Copy>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: &[K],
    chunk: usize,
    mut values: impl FnMut() -> u64,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    for k in keys.chunks(chunk) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: values(),
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match batch_call(cmd, &mut attr) {
            (_, None) => done += k.len(),
            (n, Some(e)) => return Err((done + n as usize, e)),
        }
    }
    Ok(())
}

/// Threads for the parallel batch operations: the kernel's hash maps lock per bucket, so
/// disjoint slices of keys update in parallel. Bounded by the CPUs and by 4.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// [`update_batch`] split over up to 4 threads. On error, the caller must assume any subset
/// of `keys` was written.
pub fn update_batch_par<K: Copy + Sync, V: Copy + Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let n = threads();
    if n < 2 || keys.len() < 2 * BATCH_CHUNK {
        return update_batch(map, keys, values).map_err(|(_, e)| e);
    }
    let per = keys.len().div_ceil(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(per)
            .zip(values.chunks(per))
            .map(|(k, v)| s.spawn(move || update_batch(map, k, v).map_err(|(_, e)| e)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("batch thread panicked")))
        })
    })
}

/// [`delete_batch`] split over up to 4 threads. On error, the caller must assume any subset
/// of `keys` was deleted.
pub fn delete_batch_par<K: Copy + Sync>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let n = threads();
    if n < 2 || keys.len() < 2 * BATCH_CHUNK {
        return delete_batch(map, keys).map_err(|(_, e)| e);
    }
    let per = keys.len().div_ceil(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .chunks(per)
            .map(|k| s.spawn(move || delete_batch(map, k).map_err(|(_, e)| e)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("batch thread panicked")))
        })
    })
}

/// `BPF_MAP_LOOKUP_BATCH` over a whole hash map: every key and value. `K` and `V` must be the
/// map's key and value types (plain old data).
pub fn dump_hash<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    const CHUNK: usize = 8192;
    let mut out = Vec::new();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    // Batch tokens: a u32 bucket index for hash maps; 64 bytes leave room for any token.
    let mut token_in = [0u8; 64];
    let mut token_out = [0u8; 64];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let (n, err) = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        out.extend(
            keys[..n as usize]
                .iter()
                .copied()
                .zip(values[..n as usize].iter().copied()),
        );
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// A shared read-write mapping of a `BPF_F_MMAPABLE` array map's values.
#[derive(Debug)]
pub struct MmapArray {
    ptr: NonNull<u32>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through `&self` /
// `&mut self` like a `Vec<u32>` (the kernel programs read it concurrently, which is the point:
// the agent only ever writes the generation they are not reading).
unsafe impl Send for MmapArray {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for MmapArray {}

impl MmapArray {
    /// Maps `entries` `u32` values of the array map `map` (which must be `BPF_F_MMAPABLE`).
    ///
    /// The kernel inserts every page of the mapping when it is made (`remap_vmalloc_range`),
    /// so all of it counts in the process's resident memory (`RssFile`) from then on, touched
    /// or not.
    pub fn new(map: BorrowedFd<'_>, entries: usize) -> io::Result<MmapArray> {
        MmapArray::new_at(map, 0, entries)
    }

    /// Maps `entries` `u32` values of the array map `map` from value `first` on (the byte
    /// offset `first * 4` must be a multiple of the page size).
    pub fn new_at(map: BorrowedFd<'_>, first: usize, entries: usize) -> io::Result<MmapArray> {
        let len = entries * std::mem::size_of::<u32>();
        let offset = libc::off_t::try_from(first * std::mem::size_of::<u32>())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of a file descriptor we borrow for the call; the kernel
        // checks the offset and length against the map's size and its mmapable flag.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u32>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(MmapArray { ptr, len: entries })
    }

    /// The mapped values.
    pub fn as_slice(&self) -> &[u32] {
        // SAFETY: `ptr` is a live mapping of `len` u32s (page-aligned) for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped values as `u64` atomics (for arrays of `u64` the kernel changes with atomic
    /// instructions: mapped with twice as many `u32` entries as it has `u64` values).
    pub fn as_atomic_u64(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is page-aligned (so 8-byte aligned) and `len` u32s long, i.e.
        // `len / 2` u64s; `AtomicU64` has the layout of `u64`, and every access through it is
        // atomic, like the kernel's (BPF atomic instructions on the same memory).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len / 2) }
    }

    /// The mapped values as `u32` atomics (for arrays the kernel reads while the agent changes
    /// single fields in place).
    pub fn as_atomic_u32(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: the mapping is page-aligned and `len` u32s long; `AtomicU32` has the layout of
        // `u32`, and every access through it is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.len) }
    }

    /// The mapped values, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only userspace reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `new` mapped; no slice borrowed from it outlives
        // `self`.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 4) };
    }
}

/// Waits for an RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()`):
/// afterwards, no XDP/TC program run that started before the call is still running. Used between
/// flipping a generation and deleting the old one's entries. Falls back to a 10 ms sleep where
/// the command is unavailable (`nohz_full` kernels).
pub fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; it only blocks until the grace period ends.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// CLOCK_BOOTTIME now: the clock `bpf_ktime_get_boot_ns()` reads in the kernel programs.
pub fn boottime_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every kernel this
    // agent supports, so the call cannot fail (a failure would leave `ts` zero).
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
