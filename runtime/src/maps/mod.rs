//! Shared-memory BPF maps with kernel semantics.
//!
//! One POSIX shm segment per loaded object (`/dev/shm/bpftime-rs.<object>.shm`) holds a header,
//! a table of the object's maps and one region per map. The loader creates it
//! ([`ShmObject::create`]); agents, the forwarder and the CLI open it ([`ShmObject::open`], or
//! [`ShmObject::open_expect`] against the loader's manifest) and get [`MapHandle`]s.
//!
//! Structure: `segment/` owns the shared segment (header, map table, the shm file and its
//! mappings) and hands out [`MapHandle`]s. Each map family has one file (`hash.rs`, `array.rs`
//! with PROG_ARRAY, `queue.rs`, `ring.rs` with PERF_EVENT_ARRAY) that checks definitions, lays
//! out its region, implements its operations and defines its typed view ([`HashMap`],
//! [`ArrayMap`], [`ProgArray`], [`QueueMap`], [`RingBuf`], [`PerfEventArray`]), which checks the
//! map's type once. [`MapHandle`] keeps the operations every family shares (lookup, update,
//! delete, listing, counters), dispatched through [`MapHandle::typed`].
//!
//! Cross-process rules kept throughout: only offsets are stored in shared memory; locks record
//! their holder's tid and are taken over when the holder is dead (`lock.rs`); lookups never lock;
//! value pointers stay valid while their entry lives (preallocated elements); every update,
//! delete and pointer-handing lookup leaves a change mark for the sync forwarder ([`Change`]).
//!
//! Layout (see `layout.rs`): a one-page header (magic, version, size, pid namespace, CPU count,
//! map table offset), the map table (name, definition, region offset and size per map), then
//! one page-aligned region per map: a control block (geometry, allocation state, dirty flag,
//! counters, the forwarder's sync status) followed by the map's data (hash: buckets, change
//! summary, element pool; array: marks, summary, values; ringbuf: the kernel's consumer page,
//! producer page and data).
//!
//! Trust: the segment holds map data only; programs live in the loader's manifest
//! (`crate::state`). Segments are created mode 0600 (the loader's user only); a non-root target
//! is given access explicitly with [`ShmObject::grant`] (a POSIX ACL entry for its user or
//! group). Opening checks the segment's owner on the descriptor, and every byte read from the
//! segment is treated as untrusted input (see `layout.rs`). Every process sharing a segment
//! must see the same /dev/shm and be in the same pid namespace (checked on open).

mod array;
mod bloom;
mod cgroup_array;
mod hash;
mod jhash;
mod layout;
pub(crate) mod lock;
mod lpm_trie;
mod map_of_maps;
mod queue;
mod ring;
mod segment;
mod stack_trace;
mod track;
mod typed;

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use layout::*;
use segment::file::RingMapping;
use segment::ObjInner;

pub use array::{ArrayMap, InlineArrayLayout, ProgArray};
pub use bloom::BloomFilter;
pub use cgroup_array::{cgroup_id_of_fd, CgroupArray, ENOTSUPP};
pub use hash::HashMap;
pub use lpm_trie::LpmTrie;
pub use map_of_maps::{inner_map, set_inner_map, InnerMapDef};
pub use queue::{QueueMap, QueuedPush};
pub use ring::{PerfEventArray, RingBuf, RingBufConsumer, RingRecord};
pub use segment::file::{euid, parent_pid, process_start_time, trusted_owners};
pub use segment::{
    list_segments, remove_object, segment_path, valid_object_name, MapSel, SegmentIdentity,
    SegmentInfo, ShmConfig, ShmObject,
};
pub use stack_trace::{StackTraceMap, PERF_MAX_STACK_DEPTH};
pub use track::{Change, ChangeCursor, ChangeKind, RawChange};
pub use typed::MapRef;

pub use bpftime_abi::flags::{
    BPF_ANY, BPF_EXIST, BPF_F_CURRENT_CPU, BPF_F_INDEX_MASK, BPF_F_LOCK, BPF_NOEXIST,
    BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
};
pub use bpftime_abi::{possible_cpus, MapType};

/// A map definition as the loader reads it from the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDef {
    /// The kernel map type (`bpf_map_type`) whose semantics the map follows.
    pub map_type: MapType,
    /// Key size in bytes (0 for queues, stacks and ringbufs).
    pub key_size: u32,
    /// Value size in bytes; for per-CPU maps the size of one CPU's slot.
    pub value_size: u32,
    /// Capacity in entries; for a ringbuf its data size in bytes (a power of 2 and a multiple
    /// of the page size, as in the kernel); 0 for a PERF_EVENT_ARRAY means one per CPU.
    pub max_entries: u32,
    /// `map_flags` as the object declares them (`BPF_F_RDONLY_PROG`, `BPF_F_MMAPABLE`, ...).
    pub flags: u32,
    /// `map_extra`: a BLOOM_FILTER's hash-function count in its low 4 bits (0: 5), else 0.
    pub map_extra: u64,
    /// The map's name, unique within its object (at most 63 bytes in the segment).
    pub name: String,
    /// A map of maps' inner-map template: the shape of every map it may hold.
    pub inner: Option<InnerMapDef>,
    /// The byte offset of the `struct bpf_spin_lock` in the value (from the value's BTF), for
    /// `bpf_spin_lock` and `BPF_F_LOCK`: updates never overwrite it, copies to user space read
    /// it as 0, as the kernel's `copy_map_value` and `check_and_init_map_value` do.
    pub spin_lock: Option<u32>,
}

impl MapDef {
    /// A definition without flags.
    pub fn new(
        map_type: MapType,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: impl Into<String>,
    ) -> Self {
        Self {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags: 0,
            map_extra: 0,
            name: name.into(),
            inner: None,
            spin_lock: None,
        }
    }
}

/// Every error names the object or map concerned; [`MapError::errno`] gives the kernel errno a
/// helper returns (negated) to the program.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A map operation failed the way the kernel's would (ENOENT, EEXIST, E2BIG, ...).
    #[error("map `{map}`: {op}: {}", errno_text(*errno))]
    Op {
        /// The map's name.
        map: Arc<str>,
        /// The operation (`lookup`, `update`, `delete`, `push`, ...).
        op: &'static str,
        /// The kernel errno for it, positive.
        errno: i32,
    },
    /// A typed operation on a map of another type.
    #[error("map `{map}`: is a {found}, not a {expected}")]
    WrongType {
        /// The map's name.
        map: Arc<str>,
        /// Its actual type.
        found: MapType,
        /// The family the operation needs (e.g. `hash map`).
        expected: &'static str,
    },
    /// A definition given to [`ShmObject::create`] that this runtime cannot lay out (an empty
    /// or too long name, sizes or entry counts its map family does not allow, a duplicate
    /// name).
    #[error("map `{map}`: invalid definition: {reason}")]
    InvalidDef {
        /// The map's name.
        map: String,
        /// What is wrong with the definition.
        reason: String,
    },
    /// The object's segment has no map of that name or index.
    #[error("object `{object}`: no map {map}")]
    NoSuchMap {
        /// The object's name.
        object: String,
        /// The map asked for, as the caller selected it.
        map: String,
    },
    /// A system call on the segment file failed (open, create, resize, map, unlink).
    #[error("object `{object}`: {path}: {source}")]
    Segment {
        /// The object's name.
        object: String,
        /// The segment file's path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The segment's header or map table is inconsistent, or the request cannot apply to it
    /// (invalid object name, an existing segment with other maps, ...).
    #[error("object `{object}`: {reason}")]
    Corrupt {
        /// The object's name.
        object: String,
        /// What is inconsistent.
        reason: String,
    },
    /// The segment file is not one this process may trust (wrong owner, type or mode, or not
    /// the file the loader's manifest names).
    #[error("object `{object}`: {path}: refusing to use it: {reason}")]
    Untrusted {
        /// The object's name.
        object: String,
        /// The segment file's path.
        path: String,
        /// Why it is refused.
        reason: String,
    },
}

impl MapError {
    /// The errno a BPF helper returns (as a negative value) for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Op { errno, .. } => *errno,
            Self::WrongType { .. } | Self::InvalidDef { .. } => libc::EINVAL,
            Self::NoSuchMap { .. } => libc::ENOENT,
            Self::Segment { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::Corrupt { .. } => libc::EINVAL,
            Self::Untrusted { .. } => libc::EPERM,
        }
    }
}

fn errno_text(e: i32) -> String {
    let name = match e {
        libc::E2BIG => "E2BIG",
        libc::EEXIST => "EEXIST",
        libc::ENOENT => "ENOENT",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EBUSY => "EBUSY",
        libc::ENOMEM => "ENOMEM",
        libc::EPERM => "EPERM",
        libc::ENOTSUP => "ENOTSUP",
        _ => "",
    };
    let text = io::Error::from_raw_os_error(e).to_string();
    if name.is_empty() {
        text
    } else {
        format!("{name} ({text})")
    }
}

/// The sync forwarder's status of one map, kept in the map's control block so `bpftime-rs
/// maps` in another process can show it. Written only by the forwarder; a target can overwrite
/// its own object's copy, which only changes what `maps` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Marked entries (and pushes) the forwarder looked at.
    pub changes_seen: u64,
    /// Records sent to the kernel.
    pub sent: u64,
    /// Records the kernel confirmed.
    pub confirmed: u64,
    /// Records the kernel refused (each logged with its errno).
    pub failed: u64,
    /// Records sent and not yet confirmed.
    pub pending: u64,
    /// Age in nanoseconds of the oldest unconfirmed record, 0 when none.
    pub oldest_pending_ns: u64,
    /// Unix time in nanoseconds of the forwarder's last pass (tells a dead forwarder).
    pub last_pass_unix_ns: u64,
    /// Pid of the forwarding process (0: never synced).
    pub forwarder_pid: u64,
    /// Full resyncs of this map (after the map lost track of deletions).
    pub resyncs: u64,
    /// Verification sweeps: whole-map comparisons with what the kernel was sent.
    pub sweeps: u64,
    /// Differences a sweep found that change tracking had not reported (then sent).
    pub sweep_fixes: u64,
    /// Entries known to differ from the kernel and not yet sent (e.g. refused by the kernel);
    /// 0 when the forwarder believes userspace and kernel agree.
    pub unsynced: u64,
    /// At the last pass the forwarder had nothing left to do for this map: no marked entry,
    /// nothing to read again, no sweep waiting, nothing unconfirmed.
    pub idle: bool,
}

/// Snapshot of a map's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapCounters {
    /// Live entries (hash maps), queued values (queue/stack).
    pub entries: u64,
    /// Deleted entries whose deletion the forwarder has not acknowledged yet.
    pub tombstones: u64,
    /// Successful deletes of hash-map entries.
    pub deletes: u64,
    /// Inserts refused because the map was full (E2BIG), ringbuf reserves refused (full).
    pub full: u64,
    /// Entries an LRU hash map evicted to make room for an insert.
    pub evictions: u64,
    /// Tombstones reclaimed before acknowledgment to make room (sets the resync flag).
    pub tombstones_dropped: u64,
    /// Ringbuf/perf records lost because the ring was full.
    pub lost: u64,
    /// Values pushed onto a queue or stack.
    pub pushes: u64,
    /// Values popped from a queue or stack.
    pub pops: u64,
    /// Locks taken over from dead holders.
    pub recoveries: u64,
    /// Ringbuf records of dead producers discarded by a consumer.
    pub dead_records: u64,
    /// Hash-map recounts after a writer died mid-update (see `repair_bookkeeping`).
    pub repairs: u64,
}

/// Value of an entry as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryValue {
    /// The value bytes of a map that is not per-CPU.
    Single(Vec<u8>),
    /// One value per CPU slot, in CPU order ([`ShmObject::ncpu`] of them).
    PerCpu(Vec<Vec<u8>>),
}

impl EntryValue {
    /// The value, or for per-CPU maps the per-CPU values as little-endian integers summed
    /// (when value_size is 1, 2, 4 or 8) — what tests and `maps --diff` compare.
    pub fn sum_u64(&self) -> Option<u64> {
        fn as_u64(v: &[u8]) -> Option<u64> {
            let mut b = [0u8; 8];
            if !matches!(v.len(), 1 | 2 | 4 | 8) {
                return None;
            }
            b[..v.len()].copy_from_slice(v);
            Some(u64::from_le_bytes(b))
        }
        match self {
            Self::Single(v) => as_u64(v),
            Self::PerCpu(vs) => vs
                .iter()
                .try_fold(0u64, |a, v| Some(a.wrapping_add(as_u64(v)?))),
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key bytes (empty for queue and stack values).
    pub key: Vec<u8>,
    /// The value, per CPU slot for per-CPU maps.
    pub value: EntryValue,
}

/// A pointer to a value in shared memory, valid while the handle lives and the entry is not
/// deleted (its element is then reused; BPF programs see the same with the kernel's prealloc
/// hash maps).
#[derive(Debug, Clone, Copy)]
pub struct ValuePtr<'a> {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    _h: std::marker::PhantomData<&'a MapHandle>,
}

impl<'a> ValuePtr<'a> {
    fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr: std::ptr::NonNull::new(ptr).expect("value pointer inside a mapping"),
            len,
            _h: std::marker::PhantomData,
        }
    }

    /// The raw pointer a helper returns to the program.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The value's size in bytes (the map's `value_size`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for a zero-sized value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy of the current bytes (may interleave with concurrent writers, as in the kernel).
    pub fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: ptr..ptr+len lies inside the live mapping held by the handle ('a).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), v.as_mut_ptr(), self.len) };
        v
    }

    /// Overwrite the value in place (no change mark: use [`MapHandle::update`] for tracked
    /// writes, or call [`MapHandle::mark_changed`]).
    pub fn write(&self, data: &[u8]) {
        let n = data.len().min(self.len);
        // SAFETY: bounded by len, inside the live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), n) };
    }

    /// The 8-byte aligned u64 at `off`, for atomic counters the way programs use them; `None`
    /// when out of bounds or misaligned.
    pub fn atomic_u64(&self, off: usize) -> Option<&'a AtomicU64> {
        let p = self.ptr.as_ptr().wrapping_add(off);
        if off.checked_add(8)? > self.len || (p as usize) & 7 != 0 {
            return None;
        }
        // SAFETY: aligned, in bounds, shared memory that lives as long as 'a.
        Some(unsafe { &*(p as *const AtomicU64) })
    }

    /// The 4-byte aligned u32 at `off`, as [`atomic_u64`](Self::atomic_u64); `None` when out
    /// of bounds or misaligned.
    pub fn atomic_u32(&self, off: usize) -> Option<&'a AtomicU32> {
        let p = self.ptr.as_ptr().wrapping_add(off);
        if off.checked_add(4)? > self.len || (p as usize) & 3 != 0 {
            return None;
        }
        // SAFETY: aligned, in bounds, shared memory that lives as long as 'a.
        Some(unsafe { &*(p as *const AtomicU32) })
    }
}

/// The CPU a helper call runs on, as an index into per-CPU slots.
#[inline]
pub fn current_cpu(ncpu: u32) -> u32 {
    // SAFETY: sched_getcpu has no preconditions (vDSO/rseq backed in glibc).
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 {
        0
    } else {
        (c as u32) % ncpu.max(1)
    }
}

/// A map of an opened object. Cheap to clone; keeps the segment mapped.
#[derive(Clone)]
pub struct MapHandle {
    ctl: *const MapCtl,
    base: *mut u8,
    /// This process's copy of the geometry (see [`MapMeta::geo`]).
    geo: Geometry,
    def: MapDef,
    name: Arc<str>,
    rings: Option<Arc<Vec<RingMapping>>>,
    ncpu: u32,
    _obj: Arc<ObjInner>,
}

// SAFETY: the raw pointers point into the mapping kept alive by `_obj`; everything reached
// through them is shared memory designed for concurrent use from many processes.
unsafe impl Send for MapHandle {}
// SAFETY: as above.
unsafe impl Sync for MapHandle {}

impl std::fmt::Debug for MapHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapHandle").field("def", &self.def).finish()
    }
}

impl MapHandle {
    #[inline]
    pub(crate) fn ctl(&self) -> &MapCtl {
        // SAFETY: ctl points at this map's control block inside the live mapping.
        unsafe { &*self.ctl }
    }

    #[inline]
    pub(crate) fn at(&self, off: u64) -> *mut u8 {
        // SAFETY: callers pass offsets computed from the validated geometry.
        unsafe { self.base.add(off as usize) }
    }

    #[inline]
    pub(crate) fn err(&self, op: &'static str, errno: i32) -> MapError {
        MapError::Op {
            map: self.name.clone(),
            op,
            errno,
        }
    }

    #[inline]
    pub(crate) fn count(&self, c: usize) {
        self.ctl().counters.c[c].fetch_add(1, Ordering::Relaxed);
    }

    /// The map's name, as in its definition.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address of the map's control block in this process's mapping: equal for handles of the
    /// same map through the same mapping (the JIT compares map sets by it).
    pub(crate) fn identity(&self) -> usize {
        self.ctl as usize
    }

    /// The map's definition as the segment records it (PERF_EVENT_ARRAY's `max_entries` 0
    /// already replaced by the CPU count).
    pub fn def(&self) -> &MapDef {
        &self.def
    }

    /// The byte range `[offset, offset + len)` of the segment file that `mmap` of this map's
    /// descriptor maps, laid out as the kernel's: a RINGBUF's consumer page, producer page and
    /// data (`ringbuf_map_mmap`, which maps the data twice), a `BPF_F_MMAPABLE` ARRAY's values
    /// (`array_map_mmap`). `None` for maps the kernel does not let user space map.
    pub fn mmap_range(&self) -> Option<(u64, u64)> {
        let pg = bpftime_abi::page_size() as u64;
        match self.def.map_type {
            MapType::Ringbuf | MapType::UserRingbuf => {
                Some((self.geo.data_off, 2 * pg + self.geo.data_size))
            }
            MapType::Array if self.def.flags & bpftime_abi::flags::BPF_F_MMAPABLE != 0 => {
                Some((self.geo.data_off, self.geo.data_size.div_ceil(pg) * pg))
            }
            _ => None,
        }
    }

    /// The map's type (`def().map_type`).
    pub fn map_type(&self) -> MapType {
        self.def.map_type
    }

    /// The segment's per-CPU slot count (see [`ShmObject::ncpu`]).
    pub fn ncpu(&self) -> u32 {
        self.ncpu
    }

    fn check_key(&self, op: &'static str, key: &[u8]) -> Result<(), MapError> {
        if key.len() != self.def.key_size as usize {
            return Err(self.err(op, libc::EINVAL));
        }
        Ok(())
    }

    /// Looks a key up and hands out a pointer to its value (for per-CPU maps: the slot of the
    /// current CPU). Marks the entry (the program may write through the pointer).
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Result<Option<ValuePtr<'_>>, MapError> {
        let cpu = if self.def.map_type.is_percpu() {
            current_cpu(self.ncpu)
        } else {
            0
        };
        self.lookup_inner(key, cpu)
    }

    /// As [`lookup`](Self::lookup) for a given CPU slot.
    pub fn lookup_cpu(&self, key: &[u8], cpu: u32) -> Result<Option<ValuePtr<'_>>, MapError> {
        if cpu >= self.geo.nslots {
            return Err(self.err("lookup", libc::EINVAL));
        }
        self.lookup_inner(key, cpu)
    }

    /// A value pointer without a change mark, for readers that will not write through it
    /// (CLI listings, the forwarder, benchmarks of the tracking cost).
    pub fn lookup_unmarked(&self, key: &[u8], cpu: u32) -> Result<Option<ValuePtr<'_>>, MapError> {
        self.check_key("lookup", key)?;
        if cpu >= self.geo.nslots {
            return Err(self.err("lookup", libc::EINVAL));
        }
        let p = match self.typed() {
            MapRef::Hash(_) => self.hash_find_slot(key).map(|s| self.hash_val_ptr(s, cpu)),
            MapRef::Array(_) => {
                let i = u32::from_le_bytes(key.try_into().expect("key_size 4"));
                (i < self.def.max_entries).then(|| self.array_ptr(i, cpu))
            }
            MapRef::LpmTrie(t) => t.find(key).map(|i| t.value_ptr(i)),
            _ => return Err(self.err("lookup", libc::ENOTSUP)),
        };
        Ok(p.map(|p| ValuePtr::new(p, self.def.value_size as usize)))
    }

    #[inline]
    fn lookup_inner(&self, key: &[u8], cpu: u32) -> Result<Option<ValuePtr<'_>>, MapError> {
        self.check_key("lookup", key)?;
        let p = match self.typed() {
            MapRef::Hash(_) => self.hash_lookup(key, cpu),
            MapRef::Array(_) => self.array_lookup(key, cpu),
            MapRef::LpmTrie(t) => t.find(key).map(|i| t.value_ptr(i)),
            // prog/perf arrays, queues, stacks and ringbufs hand out no value pointers.
            _ => return Err(self.err("lookup", libc::ENOTSUP)),
        };
        Ok(p.map(|p| ValuePtr::new(p, self.def.value_size as usize)))
    }

    /// Copy of the value (all CPU slots for per-CPU maps), without marking the entry.
    pub fn get(&self, key: &[u8]) -> Result<Option<EntryValue>, MapError> {
        self.check_key("lookup", key)?;
        match self.typed() {
            MapRef::Hash(_) => Ok(self.hash_get(key)),
            MapRef::Array(_) => Ok(self.array_get(key)),
            MapRef::ProgArray(p) => Ok(p
                .get(u32::from_le_bytes(key.try_into().expect("key_size 4")))
                .map(|v| EntryValue::Single(v.to_le_bytes().to_vec()))),
            MapRef::StackTrace(s) => Ok(s
                .get(u32::from_le_bytes(key.try_into().expect("key_size 4")))
                .map(EntryValue::Single)),
            MapRef::CgroupArray(_) => Err(self.err("lookup", ENOTSUPP)),
            MapRef::LpmTrie(t) => Ok(t.find(key).map(|i| {
                let mut v = vec![0u8; self.def.value_size as usize];
                // SAFETY: the slot's value holds value_size bytes.
                unsafe { std::ptr::copy_nonoverlapping(t.value_ptr(i), v.as_mut_ptr(), v.len()) };
                EntryValue::Single(v)
            })),
            _ => Err(self.err("lookup", libc::ENOTSUP)),
        }
    }

    /// Kernel `map_update_elem` as called by a program (per-CPU maps: the current CPU's slot;
    /// a new per-CPU entry has its other slots zeroed).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_key("update", key)?;
        if value.len() != self.def.value_size as usize {
            return Err(self.err("update", libc::EINVAL));
        }
        let cpu = if self.def.map_type.is_percpu() {
            Some(current_cpu(self.ncpu))
        } else {
            None
        };
        self.update_inner(key, value, flags, cpu)
    }

    /// Userspace-style update of a per-CPU map: `values` holds `ncpu` values, each padded to a
    /// multiple of 8 bytes (the kernel syscall's layout). Non-per-CPU maps take one value.
    pub fn update_percpu(&self, key: &[u8], values: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_key("update", key)?;
        let g = &self.geo;
        if values.len() != (g.value_stride * g.nslots) as usize
            && !(g.nslots == 1 && values.len() == g.value_size as usize)
        {
            return Err(self.err("update", libc::EINVAL));
        }
        if g.nslots == 1 {
            return self.update_inner(key, &values[..g.value_size as usize], flags, None);
        }
        self.update_inner(key, values, flags, None)
    }

    fn update_inner(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
    ) -> Result<(), MapError> {
        match self.typed() {
            MapRef::Hash(_) => self.hash_update(key, value, flags, cpu),
            MapRef::Array(_) => self.array_update(key, value, flags, cpu),
            MapRef::ProgArray(_) => self.prog_array_update(key, value, flags),
            MapRef::Queue(q) => q.push(value, flags),
            MapRef::BloomFilter(b) => b.push(value, flags),
            MapRef::LpmTrie(t) => t.update(key, value, flags),
            MapRef::CgroupArray(c) => c.update_fd(
                u32::from_le_bytes(key.try_into().expect("key_size 4")),
                i32::from_le_bytes(value.try_into().expect("value_size 4")),
                flags,
            ),
            // Kernel `stack_map_update_elem`: stacks come only from bpf_get_stackid.
            MapRef::StackTrace(_) => Err(self.err("update", libc::EINVAL)),
            MapRef::RingBuf(_) | MapRef::PerfEventArray(_) => {
                Err(self.err("update", libc::ENOTSUP))
            }
        }
    }

    /// Whether `flags` asks for `BPF_F_LOCK`; EINVAL when it does on a map whose value has no
    /// `struct bpf_spin_lock`, as the kernel answers.
    pub(crate) fn check_lock_flag(&self, op: &'static str, flags: u64) -> Result<bool, MapError> {
        let locked = flags & BPF_F_LOCK != 0;
        if locked && self.geo.spin_lock().is_none() {
            return Err(self.err(op, libc::EINVAL));
        }
        Ok(locked)
    }

    /// The syscall's `BPF_MAP_LOOKUP_ELEM` with its `flags`: a copy of the value (as
    /// [`get`](Self::get)), taken under the value's spin lock with `BPF_F_LOCK`; other flags,
    /// or `BPF_F_LOCK` on a map without a spin lock, are EINVAL.
    pub fn get_with_flags(&self, key: &[u8], flags: u64) -> Result<Option<EntryValue>, MapError> {
        if flags & !BPF_F_LOCK != 0 {
            return Err(self.err("lookup", libc::EINVAL));
        }
        if !self.check_lock_flag("lookup", flags)? {
            return self.get(key);
        }
        self.check_key("lookup", key)?;
        let Some(p) = self.lookup_unmarked(key, 0)? else {
            return Ok(None);
        };
        let vs = self.def.value_size as usize;
        let mut v = vec![0u8; vs];
        // SAFETY: a live value of this map (hash and array values stay mapped), which has a
        // spin lock; `vs` bytes are readable at it.
        unsafe {
            self.geo.with_value_locked(p.as_ptr(), || {
                std::ptr::copy_nonoverlapping(p.as_ptr(), v.as_mut_ptr(), vs)
            })
        };
        self.geo.clear_spin_lock(&mut v);
        Ok(Some(EntryValue::Single(v)))
    }

    /// Kernel `map_delete_elem`.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.check_key("delete", key)?;
        match self.typed() {
            MapRef::Hash(_) => self.hash_delete(key),
            MapRef::Array(_) => Err(self.err("delete", libc::EINVAL)),
            MapRef::ProgArray(_) => self.prog_array_delete(key),
            MapRef::StackTrace(s) => {
                s.delete(u32::from_le_bytes(key.try_into().expect("key_size 4")))
            }
            MapRef::CgroupArray(c) => {
                c.delete(u32::from_le_bytes(key.try_into().expect("key_size 4")))
            }
            MapRef::LpmTrie(t) => t.delete(key),
            MapRef::Queue(_)
            | MapRef::RingBuf(_)
            | MapRef::PerfEventArray(_)
            | MapRef::BloomFilter(_) => Err(self.err("delete", libc::ENOTSUP)),
        }
    }

    /// Kernel `BPF_MAP_GET_NEXT_KEY` from user space: the first key when `current` is `None`
    /// or not in the map, else the key after it (arrays and stack traces by index, hashes in
    /// the map's iteration order); `None` at the end. Maps without keys (queues, stacks,
    /// bloom filters, rings) fail with the kernel's errno.
    pub fn next_key(&self, current: Option<&[u8]>) -> Result<Option<Vec<u8>>, MapError> {
        let index = |k: &[u8]| {
            k.get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
        };
        match self.typed() {
            MapRef::Hash(_) => Ok(self.hash_next_key(current)),
            MapRef::Array(_)
            | MapRef::ProgArray(_)
            | MapRef::PerfEventArray(_)
            | MapRef::CgroupArray(_) => {
                let max = self.def.max_entries;
                let next = match current.and_then(index) {
                    Some(i) if i < max => i.checked_add(1),
                    _ => Some(0),
                };
                Ok(next.filter(|&n| n < max).map(|n| n.to_le_bytes().to_vec()))
            }
            MapRef::StackTrace(s) => Ok(s
                .next_id(current.and_then(index))
                .map(|n| n.to_le_bytes().to_vec())),
            MapRef::LpmTrie(t) => Ok(t.next_key(current)),
            MapRef::Queue(_) | MapRef::RingBuf(_) | MapRef::BloomFilter(_) => {
                Err(self.err("get_next_key", libc::ENOTSUP))
            }
        }
    }

    /// Every entry (hash: live entries; arrays: every index; queue/stack: queued values in
    /// pop order with empty keys; prog arrays: set slots). Does not mark anything.
    pub fn iter(&self) -> Vec<Entry> {
        match self.typed() {
            MapRef::Hash(_) => self.hash_entries(),
            MapRef::Array(_) => self.array_entries(),
            MapRef::ProgArray(_) => self.prog_array_entries(),
            MapRef::Queue(_) => self.queue_entries(),
            MapRef::StackTrace(s) => self.stack_trace_entries(s),
            MapRef::CgroupArray(c) => self.cgroup_array_entries(c),
            MapRef::LpmTrie(t) => self.lpm_entries(t),
            MapRef::RingBuf(_) | MapRef::PerfEventArray(_) | MapRef::BloomFilter(_) => Vec::new(),
        }
    }

    /// `bpf_for_each_map_elem`: calls `f(key_ptr, value_ptr)` for every entry (hash: live
    /// entries; arrays: every index) with the value slot of `cpu`, until `f` returns false;
    /// returns how many entries were visited. Each visited entry is marked as a handed-out
    /// pointer, since the callback may write through it.
    pub fn for_each_ptr(&self, cpu: u32, mut f: impl FnMut(*const u8, *mut u8) -> bool) -> u64 {
        if cpu >= self.geo.nslots {
            return 0;
        }
        match self.typed() {
            MapRef::Hash(_) => self.hash_for_each(cpu, &mut f),
            MapRef::Array(_) => {
                let mut n = 0;
                for i in 0..self.def.max_entries {
                    let key = i.to_le_bytes();
                    self.mark_soft(i, self.mark_word(i), layout::MARK_LOOKUP);
                    n += 1;
                    if !f(key.as_ptr(), self.array_ptr(i, cpu)) {
                        break;
                    }
                }
                n
            }
            _ => 0,
        }
    }

    /// Entry count: live entries of a hash map, queued values of a queue/stack, set slots of a
    /// prog array, max_entries of an array, 0 for rings.
    pub fn len(&self) -> usize {
        match self.typed() {
            MapRef::Hash(_) => self.ctl().alloc.count.load(Ordering::Relaxed) as usize,
            MapRef::Queue(_) => self.queue_len(),
            MapRef::Array(_) => self.def.max_entries as usize,
            MapRef::ProgArray(_) => self.prog_array_entries().len(),
            MapRef::StackTrace(s) => s.stacks(),
            MapRef::CgroupArray(c) => self.cgroup_array_entries(c).len(),
            MapRef::LpmTrie(t) => t.prefixes(),
            MapRef::RingBuf(_) | MapRef::PerfEventArray(_) | MapRef::BloomFilter(_) => 0,
        }
    }

    /// `true` when [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the map's counters from its control block (shared by every process).
    pub fn counters(&self) -> MapCounters {
        let c = &self.ctl().counters.c;
        let g = |i: usize| c[i].load(Ordering::Relaxed);
        let a = &self.ctl().alloc;
        MapCounters {
            entries: self.len() as u64,
            tombstones: u64::from(a.tombs.load(Ordering::Relaxed)),
            deletes: g(ctr::DELETES),
            full: g(ctr::FULL),
            evictions: g(ctr::EVICTIONS),
            tombstones_dropped: g(ctr::TOMBS_DROPPED),
            lost: g(ctr::LOST) + self.ring_lost(),
            pushes: g(ctr::PUSHES),
            pops: g(ctr::POPS),
            recoveries: g(ctr::RECOVERIES),
            dead_records: g(ctr::DEAD_RECORDS),
            repairs: g(ctr::REPAIRS),
        }
    }

    /// Publishes the sync forwarder's status of this map (see [`SyncReport`]).
    pub fn publish_sync(&self, r: &SyncReport) {
        let s = &self.ctl().counters.sync;
        let put = |slot: &AtomicU64, v: u64| slot.store(v, Ordering::Relaxed);
        put(&s.changes_seen, r.changes_seen);
        put(&s.sent, r.sent);
        put(&s.confirmed, r.confirmed);
        put(&s.failed, r.failed);
        put(&s.pending, r.pending);
        put(&s.oldest_pending_ns, r.oldest_pending_ns);
        put(&s.resyncs, r.resyncs);
        put(&s.sweeps, r.sweeps);
        put(&s.sweep_fixes, r.sweep_fixes);
        put(&s.unsynced, r.unsynced);
        put(&s.idle, u64::from(r.idle));
        put(&s.last_pass_unix_ns, r.last_pass_unix_ns);
        // Last: a reader that sees the pid sees a whole first report.
        s.forwarder_pid.store(r.forwarder_pid, Ordering::Release);
    }

    /// The forwarder's last published status, `None` if no forwarder ever synced this map.
    pub fn sync_report(&self) -> Option<SyncReport> {
        let s = &self.ctl().counters.sync;
        let forwarder_pid = s.forwarder_pid.load(Ordering::Acquire);
        if forwarder_pid == 0 {
            return None;
        }
        let get = |slot: &AtomicU64| slot.load(Ordering::Relaxed);
        Some(SyncReport {
            changes_seen: get(&s.changes_seen),
            sent: get(&s.sent),
            confirmed: get(&s.confirmed),
            failed: get(&s.failed),
            pending: get(&s.pending),
            oldest_pending_ns: get(&s.oldest_pending_ns),
            last_pass_unix_ns: get(&s.last_pass_unix_ns),
            forwarder_pid,
            resyncs: get(&s.resyncs),
            sweeps: get(&s.sweeps),
            sweep_fixes: get(&s.sweep_fixes),
            unsynced: get(&s.unsynced),
            idle: get(&s.idle) != 0,
        })
    }
}
