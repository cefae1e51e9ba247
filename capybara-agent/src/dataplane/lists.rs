//! Blocklists in the kernel: every operation compiles **all** lists of its direction and writes
//! them as a new generation, then flips one `u32`.
//!
//! ## Write path (one list operation)
//! 1. Validate and plan the change ([`crate::blocklist::Registry::plan`]); compile every list of
//!    the direction ([`crate::blocklist::compile`]); check the result fits the maps. Any error
//!    here returns before a single byte is written.
//! 2. Into the **inactive** generation `g' = 1 - g`: copy the 2^24-entry DIR table through the
//!    `mmap` of the `BPF_F_MMAPABLE` array (one 64 MiB `memcpy`, no syscall per entry); insert the
//!    long prefixes `(addr, len, g')` with `BPF_MAP_UPDATE_BATCH`; insert the IPv6 prefixes
//!    `[g', addr]/8+len` (batch, or one by one where the trie has no batch op).
//! 3. Flip `CONFIG[0].{src,dst}_generation` to `g'` with one map update. A packet reads the
//!    generation once, so it sees the old lists or the new ones, never a mix.
//! 4. Start the cleanup in a background thread and return — the new lists are live. The thread
//!    waits one RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`, i.e. `synchronize_rcu()`:
//!    no program run that read `g` is still running), then deletes generation `g`'s long and
//!    IPv6 entries (`BPF_MAP_DELETE_BATCH`, split over 2 threads). The next write of the direction
//!    first joins it ([`Timings::cleanup_ms`]), so writes never overlap. What the thread could not
//!    delete — or what a killed agent left behind (the agent dumps both generations at open) — is
//!    deleted by the next write's pre-clean before it writes that generation.
//!
//! The DIR table of a generation is never cleared: step 2 overwrites all of it.
//!
//! ## Numbers (`list_replace_1m` in tests/it/dataplane.rs, release build, this 2-core machine)
//! Replacing a source list of 1 000 000 random prefixes ([`crate::blocklist::sample`]: 95 % /20–/32,
//! 5 % /16–/19 over the whole IPv4 space; 354 898 entries longer than /24 after compiling) by
//! another such list. Two runs: one while other builds kept the machine at load average ≈ 9, one
//! with the CPUs mostly free:
//!
//! | step | loaded, ms | quiet, ms |
//! |---|---|---|
//! | plan (validate, sort the 1M CIDRs) | 80 | 29 |
//! | compile (radix sort, stack pass, DIR paint) | 351 | 133 |
//! | DIR copy through the mmap (64 MiB) | 37 | 16 |
//! | long prefixes, `BPF_MAP_UPDATE_BATCH` ×2 threads | 656 | 151 |
//! | flip | 0.01 | 0.02 |
//! | **new lists live (`list_replace_1m_ms`)** | **1 156** | **342** |
//! | background: grace period + delete of the old generation | 520 | 117 |
//! | everything done | 1 677 | 460 |
//!
//! These figures are with preallocated hashes. The long-prefix hashes are now created with
//! `BPF_F_NO_PREALLOC` (168 MiB each before any entry existed; see `capybara_common::maps`), which
//! moves the allocation into the insert: `list_replace_1m_ms` measured 488 ms on a quiet machine
//! (719–965 ms over 3 runs while a CI build shared the CPUs; the long-prefix step ≈ 450 ms then).
//!
//! Target < 2000 ms. Back-to-back replacements pay the previous cleanup at their start (the
//! xtask bench measures that case). The 2^24-entry DIR table is what makes the design
//! affordable only because of the mmap: one `BPF_MAP_UPDATE_ELEM` per entry (≈ 1 µs) would take
//! ≈ 16 s. The first version deleted the old generation synchronously and took 2 255 ms.
//!
//! Known cost: every operation recompiles and rewrites the whole direction, so adding one CIDR
//! next to a 1M list costs about as much as replacing it. Writing the inactive generation as a
//! diff against what it still holds (instead of cleaning it right after the flip) would make
//! small changes cheap; not done yet.
//!
//! ## Memory: the DIR tables are mapped only while used
//! A mapping of a `BPF_F_MMAPABLE` array has every page inserted when it is made
//! (`remap_vmalloc_range`), so it is resident in the agent from `mmap` on, touched or not. The
//! agent used to keep both tables (2 × 128 MiB) mapped for its lifetime: 256 MiB of its 296 MiB
//! resident set with no list at all. Now a write or a comparison maps the one generation it
//! needs (64 MiB, `DirMaps::map_generation`) and unmaps it when done, and
//! [`Dataplane::lookup_v4`] reads one element with a syscall. Measured (`agent_load`): the
//! empty agent's resident set 296 → 42 MiB; the kernel memory of the maps is unchanged.
//!
//! ## Restart
//! The store persists [`RegistrySnapshot`]; [`Dataplane::restore_lists`] compiles it and compares
//! the result with the *active* generation in the kernel (DIR bytes, long entries, IPv6 entries):
//! equal → nothing is written (counters and enforcement untouched); different → a normal write.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use capybara_common::{
    blocklist::{
        DirSlot, ListId, V4_DIR_ENTRIES_PER_GEN, V4_LONG_MAX, V4LongKey, V6_MAX, V6KeyData,
        dir_index, dir_list, dir_long_mask, dir_slot,
    },
    config::{
        CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS, CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS,
        Config,
    },
    counters::Counter,
    maps as names,
};

use super::{Dataplane, Owned, Result, map_err, stats::zero_slot, sys, sys_err, take};
use crate::{
    blocklist::{
        BlocklistError, CompiledV4, CompiledV6, Direction, ListName, Registry, RegistrySnapshot,
        compile_v4, compile_v6,
        registry::{ListChange, ListOp, ListSummary},
    },
    net::Cidr,
};

/// An IPv6 trie key as the kernel lays it out: `prefix_len` (native-endian `u32`) followed by
/// the 17 data octets `[generation, address…]` — 21 bytes, no padding, so a slice of them is the
/// key array a batch syscall expects.
pub type V6TrieKey = [u8; 21];

fn v6_key(generation: u8, addr: u128, len: u8) -> V6TrieKey {
    let mut k = [0u8; 21];
    k[..4].copy_from_slice(&(8 + u32::from(len)).to_ne_bytes());
    k[4] = generation;
    k[5..].copy_from_slice(&addr.to_be_bytes());
    k
}

fn v6_key_generation(k: &V6TrieKey) -> u8 {
    k[4]
}

/// One direction's maps and what each generation holds.
pub(super) struct DirMaps {
    names: [&'static str; 3],
    /// The DIR table, mapped only while a generation is written or compared
    /// ([`DirMaps::map_generation`]; see "Memory" in the module docs).
    dir: Owned<Array<MapData, DirSlot>>,
    long: Owned<HashMap<MapData, V4LongKey, ListId>>,
    v6: Owned<LpmTrie<MapData, V6KeyData, ListId>>,
    /// Long-prefix entries per generation, sorted by (addr, len).
    long_gen: [Vec<(V4LongKey, ListId)>; 2],
    /// IPv6 entries per generation, sorted.
    v6_gen: [Vec<(V6TrieKey, ListId)>; 2],
    /// The background deletion of the previous generation's entries, if one is running.
    cleanup: Option<std::thread::JoinHandle<Leftover>>,
    /// How long the last finished cleanup took (grace period + deletes), in ms.
    last_cleanup_ms: f64,
}

/// What a background cleanup could not delete (everything, if a batch failed: the synchronous
/// pre-clean of the next write retries element by element).
struct Leftover {
    generation: usize,
    long: Vec<V4LongKey>,
    v6: Vec<V6TrieKey>,
    error: Option<std::io::Error>,
    ms: f64,
}

fn long_sort_key(k: &V4LongKey) -> (u32, u8) {
    (k.addr, k.prefix_len)
}

impl DirMaps {
    fn open(ebpf: &mut Ebpf, direction: Direction) -> Result<DirMaps> {
        let names = match direction {
            Direction::Source => [names::SRC_V4_DIR, names::SRC_V4_LONG, names::SRC_V6],
            Direction::Destination => [names::DST_V4_DIR, names::DST_V4_LONG, names::DST_V6],
        };
        let dir: Owned<Array<MapData, DirSlot>> = take(ebpf, names[0])?;
        let mut d = DirMaps {
            names,
            dir,
            long: take(ebpf, names[1])?,
            v6: take(ebpf, names[2])?,
            long_gen: [Vec::new(), Vec::new()],
            v6_gen: [Vec::new(), Vec::new()],
            cleanup: None,
            last_cleanup_ms: 0.0,
        };
        d.scan()?;
        Ok(d)
    }

    /// Maps generation `g`'s half of the DIR table (64 MiB) until the mapping is dropped.
    fn map_generation(&self, g: usize) -> Result<sys::MmapArray> {
        sys::MmapArray::new_at(
            self.dir.fd.as_fd(),
            g * V4_DIR_ENTRIES_PER_GEN as usize,
            V4_DIR_ENTRIES_PER_GEN as usize,
        )
        .map_err(sys_err(self.names[0], "mmap"))
    }

    /// Reads what both generations hold in the long hash and the IPv6 trie.
    fn scan(&mut self) -> Result<()> {
        let long: Vec<(V4LongKey, ListId)> =
            sys::dump_hash(self.long.fd.as_fd()).map_err(sys_err(self.names[1], "batch lookup"))?;
        let mut gens = [Vec::new(), Vec::new()];
        for (k, v) in long {
            gens[(k.generation & 1) as usize].push((k, v));
        }
        for g in &mut gens {
            g.sort_unstable_by_key(|(k, _)| long_sort_key(k));
        }
        self.long_gen = gens;
        let mut gens = [Vec::new(), Vec::new()];
        for (k, v) in self.dump_v6()? {
            gens[(v6_key_generation(&k) & 1) as usize].push((k, v));
        }
        for g in &mut gens {
            g.sort_unstable();
        }
        self.v6_gen = gens;
        Ok(())
    }

    fn dump_v6(&self) -> Result<Vec<(V6TrieKey, ListId)>> {
        match sys::dump_hash::<V6TrieKey, ListId>(self.v6.fd.as_fd()) {
            Ok(v) => Ok(v),
            Err(e) if sys::is_unsupported(&e) => {
                let mut out = Vec::new();
                for k in self.v6.map.keys() {
                    let k = k.map_err(map_err(self.names[2], "iterate"))?;
                    let v = self
                        .v6
                        .map
                        .get(&k, 0)
                        .map_err(map_err(self.names[2], "read"))?;
                    let d = k.data();
                    let mut key = [0u8; 21];
                    key[..4].copy_from_slice(&k.prefix_len().to_ne_bytes());
                    key[4..].copy_from_slice(&d);
                    out.push((key, v));
                }
                Ok(out)
            }
            Err(e) => Err(sys_err(self.names[2], "batch lookup")(e)),
        }
    }

    /// Deletes every long and IPv6 entry of generation `g`.
    fn clear_gen(&mut self, g: usize) -> Result<()> {
        if !self.long_gen[g].is_empty() {
            let keys: Vec<V4LongKey> = self.long_gen[g].iter().map(|(k, _)| *k).collect();
            if sys::delete_batch_par(self.long.fd.as_fd(), &keys).is_err() {
                for k in &keys {
                    match self.long.map.remove(k) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err(self.names[1], "delete")(e)),
                    }
                }
            }
            self.long_gen[g].clear();
        }
        if !self.v6_gen[g].is_empty() {
            let keys: Vec<V6TrieKey> = self.v6_gen[g].iter().map(|(k, _)| *k).collect();
            if sys::delete_batch(self.v6.fd.as_fd(), &keys).is_err() {
                for k in &keys {
                    let key = trie_key(k);
                    match self.v6.map.remove(&key) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err(self.names[2], "delete")(e)),
                    }
                }
            }
            self.v6_gen[g].clear();
        }
        Ok(())
    }

    /// Writes `v4`/`v6` into generation `g` (which must be empty of long/IPv6 entries).
    fn write_gen(
        &mut self,
        g: usize,
        v4: &CompiledV4,
        v6: &CompiledV6,
        t: &mut Timings,
    ) -> Result<()> {
        let start = Instant::now();
        self.map_generation(g)?
            .as_mut_slice()
            .copy_from_slice(&v4.dir);
        t.dir_ms = ms(start);

        let start = Instant::now();
        let long: Vec<(V4LongKey, ListId)> = v4
            .long
            .iter()
            .map(|&(a, l, id)| (V4LongKey::new(a, l, g as u8), id))
            .collect();
        let keys: Vec<V4LongKey> = long.iter().map(|e| e.0).collect();
        let values: Vec<ListId> = long.iter().map(|e| e.1).collect();
        if let Err(e) = sys::update_batch_par(self.long.fd.as_fd(), &keys, &values) {
            // Any of them may be in: the next write's pre-clean deletes them (missing ones are
            // skipped).
            self.long_gen[g] = long;
            return Err(sys_err(self.names[1], "batch update")(e));
        }
        self.long_gen[g] = long;
        t.long_ms = ms(start);

        let start = Instant::now();
        let v6e: Vec<(V6TrieKey, ListId)> = v6
            .prefixes
            .iter()
            .map(|&(a, l, id)| (v6_key(g as u8, a, l), id))
            .collect();
        let keys: Vec<V6TrieKey> = v6e.iter().map(|e| e.0).collect();
        let values: Vec<ListId> = v6e.iter().map(|e| e.1).collect();
        match sys::update_batch(self.v6.fd.as_fd(), &keys, &values) {
            Ok(()) => {}
            Err((0, e)) if sys::is_unsupported(&e) => {
                for (i, (k, v)) in v6e.iter().enumerate() {
                    if let Err(e) = self.v6.map.insert(&trie_key(k), v, 0) {
                        self.v6_gen[g] = v6e[..i].to_vec();
                        return Err(map_err(self.names[2], "insert")(e));
                    }
                }
            }
            Err((n, e)) => {
                self.v6_gen[g] = v6e[..n.min(v6e.len())].to_vec();
                return Err(sys_err(self.names[2], "batch update")(e));
            }
        }
        self.v6_gen[g] = v6e;
        t.v6_ms = ms(start);
        Ok(())
    }

    /// Starts deleting generation `g`'s long and IPv6 entries in the background, after an RCU
    /// grace period (no program run that read `g` is still running then).
    fn start_cleanup(&mut self, g: usize) {
        self.settle();
        let long: Vec<V4LongKey> = std::mem::take(&mut self.long_gen[g])
            .into_iter()
            .map(|e| e.0)
            .collect();
        let v6: Vec<V6TrieKey> = std::mem::take(&mut self.v6_gen[g])
            .into_iter()
            .map(|e| e.0)
            .collect();
        if long.is_empty() && v6.is_empty() {
            return;
        }
        let (long_fd, v6_fd) = (
            std::sync::Arc::clone(&self.long.fd),
            std::sync::Arc::clone(&self.v6.fd),
        );
        self.cleanup = Some(std::thread::spawn(move || {
            let start = Instant::now();
            sys::rcu_grace_period();
            let mut left = Leftover {
                generation: g,
                long: Vec::new(),
                v6: Vec::new(),
                error: None,
                ms: 0.0,
            };
            if let Err(e) = sys::delete_batch_par(long_fd.as_fd(), &long) {
                left.long = long;
                left.error = Some(e);
            }
            if let Err(e) = sys::delete_batch_par(v6_fd.as_fd(), &v6) {
                left.v6 = v6;
                left.error.get_or_insert(e);
            }
            left.ms = ms(start);
            left
        }));
    }

    /// Waits for a background cleanup; what it could not delete is remembered for the next
    /// write's pre-clean.
    fn settle(&mut self) {
        let Some(h) = self.cleanup.take() else { return };
        match h.join() {
            Ok(left) => {
                self.last_cleanup_ms = left.ms;
                if let Some(e) = &left.error {
                    tracing::debug!(map = self.names[1], error = %e, "batch delete of the old generation incomplete; retrying before the next write");
                }
                let g = left.generation;
                self.long_gen[g].extend(left.long.into_iter().map(|k| (k, 0)));
                self.v6_gen[g].extend(left.v6.into_iter().map(|k| (k, 0)));
            }
            Err(_) => tracing::error!(map = self.names[1], "blocklist cleanup thread panicked"),
        }
    }

    /// True if generation `g` holds exactly `v4`/`v6`.
    fn holds(&self, g: usize, v4: &CompiledV4, v6: &CompiledV6) -> Result<bool> {
        Ok(self.map_generation(g)?.as_slice() == &v4.dir[..]
            && self.long_gen[g].len() == v4.long.len()
            && self.long_gen[g]
                .iter()
                .zip(&v4.long)
                .all(|((k, v), &(a, l, id))| k.addr == a && k.prefix_len == l && *v == id)
            && self.v6_gen[g].len() == v6.prefixes.len()
            && self.v6_gen[g]
                .iter()
                .zip(&v6.prefixes)
                .all(|((k, v), &(a, l, id))| *k == v6_key(g as u8, a, l) && *v == id))
    }
}

fn trie_key(k: &V6TrieKey) -> Key<V6KeyData> {
    let len = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
    let mut d = [0u8; 17];
    d.copy_from_slice(&k[4..]);
    Key::new(len, d)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Both directions' maps and the list registry.
pub(super) struct ListMaps {
    registry: Registry,
    dirs: [DirMaps; 2],
}

impl Drop for ListMaps {
    fn drop(&mut self) {
        for d in &mut self.dirs {
            d.settle();
        }
    }
}

impl ListMaps {
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<ListMaps> {
        Ok(ListMaps {
            registry: Registry::new(),
            dirs: [
                DirMaps::open(ebpf, Direction::Source)?,
                DirMaps::open(ebpf, Direction::Destination)?,
            ],
        })
    }
}

/// Where the time of one list write went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Validating the operation and computing the list's new contents.
    pub plan_ms: f64,
    /// Compiling every list of the direction.
    pub compile_ms: f64,
    /// Deleting leftovers of the inactive generation (normally nothing).
    pub pre_clean_ms: f64,
    /// Copying the DIR table through the mmap.
    pub dir_ms: f64,
    /// Batch-inserting the long prefixes.
    pub long_ms: f64,
    /// Inserting the IPv6 prefixes.
    pub v6_ms: f64,
    /// Flipping the generation.
    pub flip_ms: f64,
    /// Waiting for the previous write's background cleanup (grace period + deleting the
    /// generation before it) to finish, at the start of this write; 0 when it already had.
    pub cleanup_ms: f64,
    /// End to end.
    pub total_ms: f64,
}

/// The outcome of a list operation.
#[derive(Debug, Clone, PartialEq)]
pub struct ListUpdate {
    /// The direction written.
    pub direction: Direction,
    /// The list's id.
    pub id: ListId,
    /// The generation now active.
    pub generation: u32,
    /// Compiled entries longer than /24 now in the kernel.
    pub v4_long: usize,
    /// Compiled IPv6 prefixes now in the kernel.
    pub v6: usize,
    /// Where the time went.
    pub timings: Timings,
}

/// What [`Dataplane::restore_lists`] did per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The active generation already held exactly the snapshot's lists: nothing written.
    Unchanged,
    /// The lists were written as a new generation.
    Rewritten,
}

/// The outcome of [`Dataplane::restore_lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    /// Source lists.
    pub source: Restored,
    /// Destination lists.
    pub destination: Restored,
}

/// A fresh read of one direction's blocklist maps from the kernel (diagnostics and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLists {
    /// The configuration entry.
    pub config: Config,
    /// Both generations of the DIR table (`2 × 2^24` entries).
    pub dir: Vec<u32>,
    /// Every long-prefix entry, sorted by (generation, addr, len).
    pub long: Vec<(u8, u32, u8, ListId)>,
    /// Every IPv6 entry, sorted.
    pub v6: Vec<(V6TrieKey, ListId)>,
}

fn generation_of(c: &Config, d: Direction) -> usize {
    (match d {
        Direction::Source => c.src_generation,
        Direction::Destination => c.dst_generation,
    } & 1) as usize
}

fn check_capacity(
    direction: Direction,
    v4: &CompiledV4,
    v6: &CompiledV6,
) -> Result<(), BlocklistError> {
    let max = (V4_LONG_MAX / 2) as usize;
    if v4.long.len() > max {
        return Err(BlocklistError::TooManyV4LongPrefixes {
            direction,
            needed: v4.long.len(),
            max,
        });
    }
    let max = (V6_MAX / 2) as usize;
    if v6.prefixes.len() > max {
        return Err(BlocklistError::TooManyV6Prefixes {
            direction,
            needed: v6.prefixes.len(),
            max,
        });
    }
    Ok(())
}

impl Dataplane {
    /// Adds `cidrs` to list `name` of `direction` (creating it).
    pub fn list_add(
        &mut self,
        direction: Direction,
        name: &ListName,
        cidrs: &[Cidr],
    ) -> Result<ListUpdate> {
        self.list_op(direction, name, ListOp::Add(cidrs))
    }

    /// Removes `cidrs` from list `name` of `direction` (absent ones are ignored).
    pub fn list_remove(
        &mut self,
        direction: Direction,
        name: &ListName,
        cidrs: &[Cidr],
    ) -> Result<ListUpdate> {
        self.list_op(direction, name, ListOp::Remove(cidrs))
    }

    /// Replaces the contents of list `name` of `direction` (creating it), atomically.
    pub fn list_replace(
        &mut self,
        direction: Direction,
        name: &ListName,
        cidrs: &[Cidr],
    ) -> Result<ListUpdate> {
        self.list_op(direction, name, ListOp::Replace(cidrs))
    }

    /// Deletes list `name` of `direction`; its id becomes free.
    pub fn list_delete(&mut self, direction: Direction, name: &ListName) -> Result<ListUpdate> {
        self.list_op(direction, name, ListOp::Delete)
    }

    fn list_op(
        &mut self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<ListUpdate> {
        let start = Instant::now();
        let change = self.lists.registry.plan(direction, name, op)?;
        let plan_ms = ms(start);
        let (v4, v6, compile_ms) = self.compile(direction, Some(&change))?;
        let created: &[ListId] = if change.created { &[change.id] } else { &[] };
        let mut update = self.write_lists(direction, &v4, &v6, created)?;
        update.id = change.id;
        update.timings.plan_ms = plan_ms;
        update.timings.compile_ms = compile_ms;
        update.timings.total_ms = ms(start);
        tracing::info!(
            %direction,
            list = %name,
            id = change.id,
            op = op_name(&op),
            generation = update.generation,
            v4_long = update.v4_long,
            v6 = update.v6,
            total_ms = update.timings.total_ms,
            "blocklist written"
        );
        self.lists.registry.commit(change);
        Ok(update)
    }

    /// Applies several list operations of one direction as **one** generation: either all of
    /// them are live after the flip, or (on any error, e.g. bad input or capacity) none is and
    /// the maps are untouched. Geo policies use it: `geo block CN RU` is two lists, one flip.
    pub fn list_batch(
        &mut self,
        direction: Direction,
        ops: &[(ListName, ListOp<'_>)],
    ) -> Result<ListUpdate> {
        let start = Instant::now();
        let mut next = self.lists.registry.clone();
        let mut created = Vec::new();
        for (name, op) in ops {
            let change = next.plan(direction, name, *op)?;
            if change.created {
                created.push(change.id);
            }
            next.commit(change);
        }
        let plan_ms = ms(start);
        let (v4, v6, compile_ms) = compile_registry(&next, direction, None)?;
        let mut update = self.write_lists(direction, &v4, &v6, &created)?;
        update.timings.plan_ms = plan_ms;
        update.timings.compile_ms = compile_ms;
        update.timings.total_ms = ms(start);
        tracing::info!(
            %direction,
            ops = ops.len(),
            generation = update.generation,
            v4_long = update.v4_long,
            v6 = update.v6,
            total_ms = update.timings.total_ms,
            "blocklists written in one generation"
        );
        self.lists.registry = next;
        Ok(update)
    }

    fn compile(
        &self,
        direction: Direction,
        change: Option<&ListChange>,
    ) -> Result<(CompiledV4, CompiledV6, f64)> {
        compile_registry(&self.lists.registry, direction, change)
    }
}

/// Compiles every list of `direction` in `registry`, with `change` applied.
fn compile_registry(
    registry: &Registry,
    direction: Direction,
    change: Option<&ListChange>,
) -> Result<(CompiledV4, CompiledV6, f64)> {
    let start = Instant::now();
    let inputs = registry.inputs(direction, change);
    let v4 = compile_v4(&inputs);
    let v6 = compile_v6(&inputs);
    check_capacity(direction, &v4, &v6)?;
    Ok((v4, v6, ms(start)))
}

impl Dataplane {
    /// Writes a compiled direction as a new generation, flips, cleans the old one.
    /// `created` lists get their hit counters zeroed once no generation that may still be read
    /// refers to their ids: after the previous write's cleanup (which waits an RCU grace period)
    /// and before the flip. Zeroing earlier let packets dropped by the old generation under a
    /// just-freed id count as hits of the new list that re-used it.
    fn write_lists(
        &mut self,
        direction: Direction,
        v4: &CompiledV4,
        v6: &CompiledV6,
        created: &[ListId],
    ) -> Result<ListUpdate> {
        let mut t = Timings::default();
        let active = generation_of(&self.cfg, direction);
        let next = active ^ 1;
        let d = &mut self.lists.dirs[direction.index()];

        let start = Instant::now();
        d.settle();
        t.cleanup_ms = ms(start);
        for &id in created {
            zero_slot(&mut self.stats.list_hits.map, names::LIST_HITS, id)?;
        }
        let d = &mut self.lists.dirs[direction.index()];
        let start = Instant::now();
        d.clear_gen(next)?;
        t.pre_clean_ms = ms(start);
        d.write_gen(next, v4, v6, &mut t)?;

        let start = Instant::now();
        // The generation and the "has entries" bits describing it change in one write.
        let mut c = self.cfg;
        let (v4_flag, v6_flag) = match direction {
            Direction::Source => {
                c.src_generation = next as u32;
                (CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS)
            }
            Direction::Destination => {
                c.dst_generation = next as u32;
                (CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS)
            }
        };
        c.flags &= !(v4_flag | v6_flag);
        if !v4.long.is_empty() || v4.dir.iter().any(|e| *e != 0) {
            c.flags |= v4_flag;
        }
        if !v6.prefixes.is_empty() {
            c.flags |= v6_flag;
        }
        self.write_config(c)?;
        t.flip_ms = ms(start);

        self.lists.dirs[direction.index()].start_cleanup(active);
        Ok(ListUpdate {
            direction,
            id: 0,
            generation: next as u32,
            v4_long: v4.long.len(),
            v6: v6.prefixes.len(),
            timings: t,
        })
    }

    /// Every list (direction, name, id, sizes).
    pub fn lists(&self) -> Vec<ListSummary> {
        self.lists.registry.summaries()
    }

    /// The CIDRs of list `name` of `direction`.
    pub fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>> {
        self.lists.registry.get(direction, name).map(|l| l.cidrs())
    }

    /// The registry state for the store to persist.
    pub fn list_snapshot(&self) -> RegistrySnapshot {
        self.lists.registry.snapshot()
    }

    /// Restores lists after a restart. Validates and compiles both directions first (errors
    /// leave everything as it was); a direction whose active generation already holds exactly the
    /// snapshot's lists is not written at all. Hit counters are never reset here.
    pub fn restore_lists(&mut self, snapshot: &RegistrySnapshot) -> Result<RestoreReport> {
        let registry = Registry::from_snapshot(snapshot)?;
        let old = std::mem::replace(&mut self.lists.registry, registry);
        let compiled = Direction::ALL.map(|d| self.compile(d, None));
        let compiled = match compiled {
            [Ok(s), Ok(d)] => [s, d],
            [Err(e), _] | [_, Err(e)] => {
                self.lists.registry = old;
                return Err(e);
            }
        };
        let mut out = [Restored::Unchanged; 2];
        for (d, (v4, v6, _)) in Direction::ALL.into_iter().zip(&compiled) {
            let g = generation_of(&self.cfg, d);
            let maps = &mut self.lists.dirs[d.index()];
            maps.settle();
            if maps.holds(g, v4, v6)? {
                // Leftovers of an interrupted write in the inactive generation.
                maps.clear_gen(g ^ 1)?;
            } else {
                self.write_lists(d, v4, v6, &[])?;
                out[d.index()] = Restored::Rewritten;
            }
        }
        let report = RestoreReport {
            source: out[0],
            destination: out[1],
        };
        tracing::info!(?report, lists = snapshot.lists.len(), "blocklists restored");
        Ok(report)
    }

    /// The list the kernel's lookup gives IPv4 `addr` in `direction`'s active generation
    /// (0 = none), read from the maps themselves.
    pub fn lookup_v4(&self, direction: Direction, addr: Ipv4Addr) -> Result<ListId> {
        let d = &self.lists.dirs[direction.index()];
        let g = generation_of(&self.cfg, direction);
        let a = u32::from(addr);
        let (slot, half) = dir_slot(dir_index(g as u32, a));
        let e = d
            .dir
            .map
            .get(&slot, 0)
            .map_err(map_err(d.names[0], "lookup"))?[half as usize];
        let mask = dir_long_mask(e);
        for len in (25..=32u8).rev() {
            if mask & (1 << (len - 25)) != 0 {
                match d.long.map.get(&V4LongKey::new(a, len, g as u8), 0) {
                    Ok(id) => return Ok(id),
                    Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(d.names[1], "lookup")(e)),
                }
            }
        }
        Ok(dir_list(e))
    }

    /// The list the kernel's lookup gives IPv6 `addr` in `direction`'s active generation.
    pub fn lookup_v6(&self, direction: Direction, addr: Ipv6Addr) -> Result<ListId> {
        let d = &self.lists.dirs[direction.index()];
        let g = generation_of(&self.cfg, direction) as u8;
        let mut data = [0u8; 17];
        data[0] = g;
        data[1..].copy_from_slice(&addr.octets());
        match d.v6.map.get(&Key::new(8 + 128, data), 0) {
            Ok(id) => Ok(id),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(map_err(d.names[2], "lookup")(e)),
        }
    }

    /// Reads `direction`'s blocklist maps afresh from the kernel.
    pub fn read_kernel_lists(&mut self, direction: Direction) -> Result<KernelLists> {
        self.lists.dirs[direction.index()].settle();
        let d = &self.lists.dirs[direction.index()];
        let config = self
            .config_map
            .map
            .get(&0, 0)
            .map_err(map_err(names::CONFIG, "read"))?;
        let long: Vec<(V4LongKey, ListId)> =
            sys::dump_hash(d.long.fd.as_fd()).map_err(sys_err(d.names[1], "batch lookup"))?;
        let mut long: Vec<_> = long
            .into_iter()
            .map(|(k, v)| (k.generation, k.addr, k.prefix_len, v))
            .collect();
        long.sort_unstable();
        let mut v6 = d.dump_v6()?;
        v6.sort_unstable();
        Ok(KernelLists {
            config,
            dir: [d.map_generation(0)?, d.map_generation(1)?]
                .iter()
                .flat_map(|m| m.as_slice().iter().copied())
                .collect(),
            long,
            v6,
        })
    }

    /// Waits until the previous generations' entries are deleted (done in the background after
    /// each write); returns how long the last cleanup of each direction took, in ms.
    pub fn wait_list_cleanup(&mut self) -> [f64; 2] {
        self.lists.dirs.iter_mut().for_each(DirMaps::settle);
        [
            self.lists.dirs[0].last_cleanup_ms,
            self.lists.dirs[1].last_cleanup_ms,
        ]
    }

    /// Hits of every list, by direction and name.
    pub fn list_hits_all(&self) -> Result<Vec<(ListSummary, Counter)>> {
        self.lists()
            .into_iter()
            .map(|l| Ok((l.clone(), self.list_hits(l.id)?)))
            .collect()
    }

    /// The id of list `name` of `direction`.
    pub fn list_id(&self, direction: Direction, name: &ListName) -> Option<ListId> {
        self.lists.registry.get(direction, name).map(|l| l.id)
    }
}

fn op_name(op: &ListOp<'_>) -> &'static str {
    match op {
        ListOp::Add(_) => "add",
        ListOp::Remove(_) => "remove",
        ListOp::Replace(_) => "replace",
        ListOp::Delete => "delete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v6_keys_are_laid_out_as_the_kernel_expects() {
        let k = v6_key(1, 0x2001_0db8 << 96, 32);
        assert_eq!(u32::from_ne_bytes([k[0], k[1], k[2], k[3]]), 40);
        assert_eq!(k[4], 1);
        assert_eq!(&k[5..9], &[0x20, 0x01, 0x0d, 0xb8]);
        let t = trie_key(&k);
        assert_eq!(t.prefix_len(), 40);
        assert_eq!(t.data()[0], 1);
        assert_eq!(
            std::mem::size_of::<V6TrieKey>(),
            4 + std::mem::size_of::<V6KeyData>()
        );
    }
}
