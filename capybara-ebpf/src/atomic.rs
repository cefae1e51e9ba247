//! Atomic read-modify-write on shared (not per-CPU) map memory: quota buckets, flow counts,
//! the per-peer event rate limit, the per-peer traffic counters of the hot line.
//!
//! BPF's atomic instructions (`BPF_ATOMIC | BPF_DW` with `BPF_ADD | BPF_FETCH`, `BPF_OR |
//! BPF_FETCH`, `BPF_AND | BPF_FETCH`, `BPF_CMPXCHG`; kernel ≥ 5.12, accepted on array map
//! values). Rust cannot reach them otherwise here: the `bpfel-unknown-none` target declares
//! `atomic-cas: false` (no `AtomicU64::fetch_add`) and `min-atomic-width: 64` (no `AtomicU32`);
//! the `core::intrinsics` atomics compile, but bpf-linker runs LLVM with `--cpu generic` (v1),
//! which only has the result-less `lock xadd` and fails with "Invalid usage of the XADD return
//! value" (aya-build sets the rustflags, so `-C target-cpu=v3` cannot be passed). Hence
//! one-instruction inline-assembly helpers. The prog-test-run fixture loads both TC programs on
//! this kernel (6.18), and the quota, flow and event cases exercise every helper.

use core::arch::asm;

/// `*p += v`, atomically; returns the old value (`BPF_ATOMIC | BPF_DW`, `BPF_ADD | BPF_FETCH`).
///
/// # Safety
/// `p` must point at an 8-byte aligned `u64` in map memory, valid for this program run.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: the caller guarantees `p`; the instruction reads and writes only `*p` and `r`.
    unsafe {
        asm!("{r} = atomic_fetch_add((u64 *)({p} + 0), {r})", p = in(reg) p, r = inout(reg) r)
    };
    r
}

/// `*p |= v`, atomically; returns the old value.
///
/// # Safety
/// As [`fetch_add`].
#[inline(always)]
pub unsafe fn fetch_or(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: as in `fetch_add`.
    unsafe {
        asm!("{r} = atomic_fetch_or((u64 *)({p} + 0), {r})", p = in(reg) p, r = inout(reg) r)
    };
    r
}

/// `*p &= v`, atomically; returns the old value.
///
/// # Safety
/// As [`fetch_add`].
#[inline(always)]
pub unsafe fn fetch_and(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: as in `fetch_add`.
    unsafe {
        asm!("{r} = atomic_fetch_and((u64 *)({p} + 0), {r})", p = in(reg) p, r = inout(reg) r)
    };
    r
}

/// `if *p == old { *p = new }`, atomically; returns the value `*p` had (`== old`: swapped).
///
/// # Safety
/// As [`fetch_add`].
#[inline(always)]
pub unsafe fn compare_exchange(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: as in `fetch_add`; the instruction compares with and returns through r0.
    unsafe {
        asm!("r0 = cmpxchg_64({p} + 0, r0, {new})", p = in(reg) p, new = in(reg) new, inout("r0") r0)
    };
    r0
}
