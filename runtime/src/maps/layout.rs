//! The on-disk (in-shm) layout. Every struct here is `repr(C)` and addressed by byte offset from
//! the segment start, so processes that map the segment at different addresses agree.
//!
//! ```text
//! 0                 SegHeader (one page)
//! maps_off          MapRecord x map_count
//! map regions       one page-aligned region per map, starting with MapCtl
//! ```
//!
//! Everything here can be written by any process that maps the segment (targets run programs
//! there), so nothing read from it is trusted: the header and map table are checked against the
//! loader's definitions on open, each process keeps its own copy of every map's [`Geometry`],
//! and indices read from shared memory are bounds-checked before use. Programs are not in the
//! segment at all (see `crate::state::manifest`).

use std::sync::atomic::{AtomicU32, AtomicU64};

use super::lock::ShmLock;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"BPFTRSM\0");
/// 2: programs moved out to the loader's manifest; creator fields dropped.
pub(crate) const VERSION: u32 = 2;
pub(crate) const STATE_READY: u32 = 1;

pub(crate) const NAME_LEN: usize = 64;
pub(crate) const OBJECT_LEN: usize = 128;

#[repr(C)]
pub(crate) struct SegHeader {
    pub magic: u64,
    pub version: u32,
    pub state: AtomicU32,
    pub total_size: u64,
    pub ncpu: u32,
    pub map_count: u32,
    pub created_unix_ns: u64,
    pub maps_off: u64,
    /// Inode of the creator's pid namespace: lock owners are recorded as tids, which only
    /// mean the same thing inside one namespace.
    pub pidns: u64,
    pub object: [u8; OBJECT_LEN],
}

#[repr(C)]
pub(crate) struct MapRecord {
    pub name: [u8; NAME_LEN],
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub _pad: u32,
    pub region_off: u64,
    pub region_size: u64,
    /// `map_extra` of the definition (a bloom filter's hash count).
    pub map_extra: u64,
    /// A map of maps' inner-map template: type, key size, value size, max_entries, flags
    /// (all 0 for other maps; type 0 is UNSPEC, never a template).
    pub inner: [u32; 5],
    /// [`MapDef::spin_lock`](super::MapDef::spin_lock) plus one (0: none).
    pub spin_lock: u32,
}

/// Per-map geometry, written once by the creator. Every process checks the copy in the segment
/// against what the map's definition plans when it opens the segment, and from then on uses its
/// own copy: a target rewriting this block cannot move any offset another process follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct Geometry {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub key_stride: u32,
    pub value_stride: u32,
    /// Value slots per entry: the CPU count for per-CPU maps, 1 otherwise.
    pub nslots: u32,
    pub n_buckets: u32,
    pub pool: u32,
    pub elem_size: u32,
    pub summary_words: u32,
    pub rings: u32,
    /// The value's `struct bpf_spin_lock` offset plus one (0: none; see [`Geometry::spin_lock`]).
    pub spin_lock: u32,
    pub buckets_off: u64,
    pub elems_off: u64,
    pub marks_off: u64,
    pub summary_off: u64,
    pub data_off: u64,
    pub data_size: u64,
}

impl Geometry {
    /// The byte offset of the value's `struct bpf_spin_lock`, if it has one.
    #[inline]
    pub fn spin_lock(&self) -> Option<usize> {
        self.spin_lock.checked_sub(1).map(|o| o as usize)
    }

    /// A value copied out for user space: its lock reads 0 (`check_and_init_map_value`).
    pub fn clear_spin_lock(&self, value: &mut [u8]) {
        if let Some(off) = self.spin_lock() {
            value[off..off + 4].fill(0);
        }
    }

    /// Runs `f` holding the spin lock of the value at `value` (`copy_map_value_locked`): the
    /// lock `bpf_spin_lock` takes. A lock held past the maps' lock timeout is not waited for
    /// any longer (as the helper does): the copy goes on without it.
    ///
    /// # Safety
    /// `value` points at a live value of this map, which has a spin lock.
    pub unsafe fn with_value_locked<R>(&self, value: *mut u8, f: impl FnOnce() -> R) -> R {
        let off = self.spin_lock().expect("a map with a spin lock");
        // SAFETY: the caller's contract; values are 8-aligned and `off` 4-aligned.
        let lock = unsafe { super::lock::ShmLock::at(value.add(off) as *mut u32) };
        let _held = super::lock::LockGuard::new(lock);
        f()
    }
}

/// Allocation state of hash maps and queue/stack positions. Written under locks or by CAS.
#[repr(C, align(64))]
pub(crate) struct AllocState {
    pub count: AtomicU32,
    pub tombs: AtomicU32,
    pub next_fresh: AtomicU32,
    pub clock: AtomicU32,
    /// Tagged Treiber-stack head: high 32 bits an ABA tag, low 32 bits element index + 1.
    pub free_head: AtomicU64,
    pub lock: ShmLock,
    pub qhead: AtomicU32,
    pub qtail: AtomicU32,
    pub track_deletes: AtomicU32,
    /// Hand of the tombstone-reclaiming sweep, apart from the LRU clock: sharing one hand made
    /// each sweep skip the whole region the other had just produced (tombstones trail the
    /// eviction hand, live elements trail the reclaim hand), 65k slots per insert.
    pub reclaim_hand: AtomicU32,
    /// Set when a hash bucket's lock was taken over from a dead writer: its half-done insert or
    /// delete may have left `count`, `tombs` or the free list off by an element, which the next
    /// writer recounts from the chains (`MapHandle::repair_bookkeeping`).
    pub repair: AtomicU32,
}

/// Written by every first mark after a forwarder pass; alone on its line so the hot readers
/// of Geometry never see it bounce.
#[repr(C, align(64))]
pub(crate) struct DirtyLine {
    pub dirty: AtomicU32,
    pub resync: AtomicU32,
    pub epoch: AtomicU64,
}

pub(crate) const COUNTERS: usize = 16;

#[repr(C, align(64))]
pub(crate) struct Counters {
    pub c: [AtomicU64; COUNTERS],
    pub sync: SyncSlots,
}

/// The sync forwarder's status of one map, published for `bpftime-rs maps` in other processes
/// (see [`super::SyncReport`] for the meaning of each field).
#[repr(C)]
pub(crate) struct SyncSlots {
    pub changes_seen: AtomicU64,
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub failed: AtomicU64,
    pub pending: AtomicU64,
    pub oldest_pending_ns: AtomicU64,
    pub kernel_entries: AtomicU64,
    pub last_pass_unix_ns: AtomicU64,
    pub forwarder_pid: AtomicU64,
    pub resyncs: AtomicU64,
    pub sweeps: AtomicU64,
    pub sweep_fixes: AtomicU64,
    pub unsynced: AtomicU64,
    pub idle: AtomicU64,
    pub _reserved: [AtomicU64; 2],
}

#[repr(C)]
pub(crate) struct MapCtl {
    pub geo: Geometry,
    pub alloc: AllocState,
    pub dirty: DirtyLine,
    pub counters: Counters,
}

/// Counter indices in `Counters::c`.
pub(crate) mod ctr {
    pub const DELETES: usize = 0;
    pub const FULL: usize = 1;
    pub const EVICTIONS: usize = 2;
    pub const TOMBS_DROPPED: usize = 3;
    pub const LOST: usize = 4;
    pub const PUSHES: usize = 5;
    pub const POPS: usize = 6;
    pub const RECOVERIES: usize = 8;
    pub const DEAD_RECORDS: usize = 9;
    pub const REPAIRS: usize = 10;
}

/// Hash bucket: writers serialise on `lock`; readers validate with `seq` (odd while a writer
/// links or unlinks an element), so lookups never take the lock.
#[repr(C)]
pub(crate) struct Bucket {
    pub lock: ShmLock,
    pub seq: AtomicU32,
    pub head: AtomicU32,
    pub _pad: u32,
}

/// Element header, followed by the key (padded to 8) and the value slot(s) (each padded to 8).
#[repr(C)]
pub(crate) struct ElemHdr {
    /// Chain link (index + 1, 0 = end); the free-list link while the element is free.
    pub next: AtomicU32,
    pub hash: AtomicU32,
    /// Low 2 bits: ELEM_FREE/LIVE/TOMB; the rest a generation bumped on every reuse.
    pub state: AtomicU32,
    /// Change marks (MARK_*) and the LRU reference bit.
    pub mark: AtomicU32,
}

pub(crate) const ELEM_FREE: u32 = 0;
pub(crate) const ELEM_LIVE: u32 = 1;
pub(crate) const ELEM_TOMB: u32 = 2;
pub(crate) const STATE_MASK: u32 = 3;
pub(crate) const GEN_ONE: u32 = 4;

pub(crate) const MARK_CHANGED: u32 = 1;
pub(crate) const MARK_LOOKUP: u32 = 2;
pub(crate) const MARKS: u32 = MARK_CHANGED | MARK_LOOKUP;
pub(crate) const LRU_REF: u32 = 0x100;

/// Ring page layout: consumer_pos at offset 0 of page 0, producer_pos at offset 0 of page 1
/// (the kernel's). Our producer lock and lost-record counter live further into the producer
/// page, where kernel-compatible consumers do not look.
pub(crate) const RING_LOCK_OFF: usize = 64;
pub(crate) const RING_LOST_OFF: usize = 128;
/// Set by a consumer about to sleep until records arrive (in ring 0's producer page of the map:
/// one for all the CPU rings of a PERF_EVENT_ARRAY). See `MapHandle::wait_for_records`.
pub(crate) const RING_WAITING_OFF: usize = 192;
/// The futex word that consumer sleeps on; a commit that finds it waiting bumps and wakes it.
pub(crate) const RING_WAKE_OFF: usize = 196;
/// Data bytes per CPU ring of a PERF_EVENT_ARRAY.
pub(crate) const PERF_RING_DATA: usize = 64 * 1024;

/// Words of the change summary of `n` slots: one bit per 64 slots (see `track.rs`).
pub(crate) const fn summary_words(n: u64) -> u64 {
    n.div_ceil(4096)
}

pub(crate) const fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

pub(crate) fn put_str(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    dst[n..].fill(0);
}

pub(crate) fn get_str(src: &[u8]) -> String {
    let n = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..n]).into_owned()
}

const _: () = assert!(std::mem::size_of::<SegHeader>() <= 4096);
const _: () = assert!(std::mem::size_of::<SyncSlots>() == 16 * 8);
const _: () = assert!(std::mem::size_of::<ElemHdr>() == 16);
const _: () = assert!(std::mem::size_of::<Bucket>() == 16);

/// Copies a value; 4- and 8-byte values (most counters) without a memcpy call.
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes, not overlapping.
#[inline(always)]
pub(crate) unsafe fn copy_value(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: guaranteed by the caller; unaligned accesses are allowed on every target we run.
    unsafe {
        match n {
            8 => std::ptr::write_unaligned(
                dst as *mut u64,
                std::ptr::read_unaligned(src as *const u64),
            ),
            4 => std::ptr::write_unaligned(
                dst as *mut u32,
                std::ptr::read_unaligned(src as *const u32),
            ),
            _ => std::ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

/// Stores `value` into an element's CPU slots, `slot_ptr(c)` being slot `c`'s value: only
/// slot `c` for `cpu = Some(c)` (a program's update of a per-CPU map; `value` is one value), or
/// every slot for `None` (a whole value: one value, or `nslots` stride-padded values for a
/// per-CPU map).
///
/// # Safety
/// `slot_ptr(c)` is writable for `value_size` bytes for every `c < nslots`, `cpu < nslots`,
/// and `value` holds what `cpu` says (checked by the callers).
#[inline(always)]
pub(crate) unsafe fn store_slots(
    geo: &Geometry,
    value: &[u8],
    cpu: Option<u32>,
    slot_ptr: impl Fn(u32) -> *mut u8,
) {
    let vs = geo.value_size as usize;
    let stride = geo.value_stride as usize;
    if let Some(off) = geo.spin_lock() {
        // The kernel's copy_map_value: every byte but the lock's (a lock a program or a
        // BPF_F_LOCK copy holds stays held); only non-per-CPU values have one.
        let dst = slot_ptr(0);
        // SAFETY: the caller's contract; `off + 4 <= value_size` (validated at creation).
        unsafe {
            std::ptr::copy_nonoverlapping(value.as_ptr(), dst, off);
            std::ptr::copy_nonoverlapping(
                value.as_ptr().add(off + 4),
                dst.add(off + 4),
                vs - off - 4,
            );
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        match cpu {
            Some(c) => copy_value(value.as_ptr(), slot_ptr(c), vs),
            None if geo.nslots == 1 => copy_value(value.as_ptr(), slot_ptr(0), vs),
            None => {
                for c in 0..geo.nslots {
                    let src = &value[c as usize * stride..c as usize * stride + vs];
                    copy_value(src.as_ptr(), slot_ptr(c), vs);
                }
            }
        }
    }
}
