//! Shared-memory BPF maps with kernel semantics.
//!
//! One POSIX shm segment per loaded object (`/dev/shm/bpftime-rs.<object>.shm`) holds a header,
//! a table of the object's maps and one region per map. The loader creates it
//! ([`ShmObject::create`]); agents, the forwarder and the CLI open it ([`ShmObject::open`], or
//! [`ShmObject::open_expect`] against the loader's manifest) and get [`MapHandle`]s.
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
mod hash;
mod layout;
pub(crate) mod lock;
mod queue;
mod ring;
mod segment;
mod track;

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use layout::*;
use segment::{Mapping, RingMapping};

pub use queue::QueuedPush;
pub use ring::{RingBufConsumer, RingRecord};
pub use segment::{euid, process_start_time, trusted_owners};
pub use track::{Change, ChangeCursor, ChangeKind, RawChange};

pub use bpftime_abi::flags::{
    BPF_ANY, BPF_EXIST, BPF_F_CURRENT_CPU, BPF_F_INDEX_MASK, BPF_F_LOCK, BPF_NOEXIST,
    BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
};
pub use bpftime_abi::{possible_cpus, MapType};

/// A map definition as the loader reads it from the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub name: String,
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
            name: name.into(),
        }
    }
}

/// Every error names the object or map concerned; [`MapError::errno`] gives the kernel errno a
/// helper returns (negated) to the program.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map `{map}`: {op}: {}", errno_text(*errno))]
    Op {
        map: Arc<str>,
        op: &'static str,
        errno: i32,
    },
    #[error("map `{map}`: invalid definition: {reason}")]
    InvalidDef { map: String, reason: String },
    #[error("object `{object}`: no map {map}")]
    NoSuchMap { object: String, map: String },
    #[error("object `{object}`: {path}: {source}")]
    Segment {
        object: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("object `{object}`: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("object `{object}`: {path}: refusing to use it: {reason}")]
    Untrusted {
        object: String,
        path: String,
        reason: String,
    },
}

impl MapError {
    /// The errno a BPF helper returns (as a negative value) for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Op { errno, .. } => *errno,
            Self::InvalidDef { .. } => libc::EINVAL,
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

/// Creation options.
#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// File mode of the segment: 0600 by default (the loader's user only; grant others with
    /// [`ShmObject::grant`]). Never world-writable.
    pub mode: u32,
    /// Commit the segment's memory at creation (fail early with ENOSPC rather than SIGBUS
    /// in a target when /dev/shm fills up). Hash pools are 2 x max_entries elements.
    pub reserve_memory: bool,
}

impl Default for ShmConfig {
    fn default() -> Self {
        Self {
            mode: 0o600,
            reserve_memory: true,
        }
    }
}

/// Which file is an object's shared-memory segment: device, inode and owner, from `fstat` of
/// the descriptor. The loader's manifest records it; agents check the segment they map is it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentIdentity {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
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

/// A bpftime-rs segment file found in /dev/shm (whose it is, not whether to trust it).
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    pub object: String,
    pub path: String,
    pub size: u64,
    pub owner_uid: u32,
    pub identity: Option<SegmentIdentity>,
    /// Processes (other than this one) that have the segment mapped.
    pub mapped_by: Vec<u32>,
}

/// Snapshot of a map's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapCounters {
    /// Live entries (hash maps), queued values (queue/stack).
    pub entries: u64,
    /// Deleted entries whose deletion the forwarder has not acknowledged yet.
    pub tombstones: u64,
    pub deletes: u64,
    /// Inserts refused because the map was full (E2BIG), ringbuf reserves refused (full).
    pub full: u64,
    pub evictions: u64,
    /// Tombstones reclaimed before acknowledgment to make room (sets the resync flag).
    pub tombstones_dropped: u64,
    /// Ringbuf/perf records lost because the ring was full.
    pub lost: u64,
    pub pushes: u64,
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
    Single(Vec<u8>),
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
    pub key: Vec<u8>,
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

    pub fn len(&self) -> usize {
        self.len
    }

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

    /// The 8-byte aligned u64 at `off`, for atomic counters the way programs use them.
    pub fn atomic_u64(&self, off: usize) -> Option<&'a AtomicU64> {
        let p = self.ptr.as_ptr().wrapping_add(off);
        if off.checked_add(8)? > self.len || (p as usize) & 7 != 0 {
            return None;
        }
        // SAFETY: aligned, in bounds, shared memory that lives as long as 'a.
        Some(unsafe { &*(p as *const AtomicU64) })
    }

    pub fn atomic_u32(&self, off: usize) -> Option<&'a AtomicU32> {
        let p = self.ptr.as_ptr().wrapping_add(off);
        if off.checked_add(4)? > self.len || (p as usize) & 3 != 0 {
            return None;
        }
        // SAFETY: aligned, in bounds, shared memory that lives as long as 'a.
        Some(unsafe { &*(p as *const AtomicU32) })
    }
}

pub(crate) struct MapMeta {
    name: Arc<str>,
    def: MapDef,
    /// This process's copy, checked against `def` on open (never re-read from the segment).
    geo: Geometry,
    region_off: u64,
    rings: Option<Arc<Vec<RingMapping>>>,
}

pub(crate) struct ObjInner {
    mapping: Mapping,
    object: String,
    maps: Vec<MapMeta>,
    ncpu: u32,
}

/// An opened (or created) object segment.
#[derive(Clone)]
pub struct ShmObject {
    inner: Arc<ObjInner>,
    creator: bool,
}

/// Selects a map by index or by name.
pub trait MapSel {
    fn index_in(&self, obj: &ShmObject) -> Option<usize>;
    fn describe(&self) -> String;
}

impl MapSel for usize {
    fn index_in(&self, obj: &ShmObject) -> Option<usize> {
        (*self < obj.inner.maps.len()).then_some(*self)
    }
    fn describe(&self) -> String {
        format!("#{self}")
    }
}

impl MapSel for &str {
    fn index_in(&self, obj: &ShmObject) -> Option<usize> {
        obj.inner.maps.iter().position(|m| &*m.name == *self)
    }
    fn describe(&self) -> String {
        format!("`{self}`")
    }
}

impl MapSel for &String {
    fn index_in(&self, obj: &ShmObject) -> Option<usize> {
        self.as_str().index_in(obj)
    }
    fn describe(&self) -> String {
        format!("`{self}`")
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

fn validate(def: &MapDef, pg: u64) -> Result<(), String> {
    if def.name.is_empty() || def.name.len() >= NAME_LEN {
        return Err(format!("name must be 1..{} bytes", NAME_LEN - 1));
    }
    let t = def.map_type;
    let (k, v, m) = (def.key_size, def.value_size, def.max_entries);
    if k > 512 || v > (1 << 20) {
        return Err(format!("key size {k} or value size {v} too large"));
    }
    match t {
        _ if t.is_hash() => {
            if k == 0 || v == 0 || m == 0 {
                return Err("hash maps need key_size, value_size and max_entries > 0".into());
            }
            if m > (1 << 28) {
                return Err(format!("max_entries {m} too large"));
            }
        }
        MapType::Array | MapType::PercpuArray => {
            if k != 4 || v == 0 || m == 0 {
                return Err("arrays need key_size 4, value_size > 0, max_entries > 0".into());
            }
        }
        MapType::ProgArray | MapType::PerfEventArray => {
            if k != 4 || v != 4 {
                return Err(format!("{} needs key_size 4 and value_size 4", t.name()));
            }
            if t == MapType::ProgArray && m == 0 {
                return Err("max_entries must be > 0".into());
            }
        }
        MapType::Ringbuf => {
            if k != 0 || v != 0 {
                return Err("ringbuf needs key_size 0 and value_size 0".into());
            }
            if !m.is_power_of_two() || u64::from(m) % pg != 0 {
                return Err(format!(
                    "ringbuf max_entries {m} must be a power of 2 and a multiple of the page size"
                ));
            }
        }
        MapType::Queue | MapType::Stack => {
            if k != 0 || v == 0 || m == 0 {
                return Err("queue/stack need key_size 0, value_size > 0, max_entries > 0".into());
            }
        }
        _ => unreachable!("all map types covered"),
    }
    Ok(())
}

/// The geometry of a map whose region starts at `off` (its end is [`region_end`]).
fn plan_region(def: &MapDef, ncpu: u32, off: u64, pg: u64) -> Geometry {
    let t = def.map_type;
    let nslots = if t.is_percpu() { ncpu } else { 1 };
    let key_stride = round_up(u64::from(def.key_size), 8) as u32;
    let value_stride = round_up(u64::from(def.value_size), 8) as u32;
    let ctl = round_up(std::mem::size_of::<MapCtl>() as u64, 64);
    let mut g = Geometry {
        map_type: t.as_raw(),
        key_size: def.key_size,
        value_size: def.value_size,
        max_entries: def.max_entries,
        flags: def.flags,
        key_stride,
        value_stride,
        nslots,
        n_buckets: 0,
        pool: 0,
        elem_size: 0,
        summary_words: 0,
        rings: 0,
        _pad: 0,
        buckets_off: 0,
        elems_off: 0,
        marks_off: 0,
        summary_off: 0,
        data_off: 0,
        data_size: 0,
    };
    let mut cur = off + ctl;
    let summary = |n: u64| n.div_ceil(4096);
    match t {
        _ if t.is_hash() => {
            let m = u64::from(def.max_entries);
            g.n_buckets = m.next_power_of_two() as u32;
            // Twice max_entries: room for as many tombstones as live entries before a
            // forwarder acknowledges them (see hash.rs for what happens beyond).
            g.pool = (2 * m) as u32;
            g.elem_size =
                (16 + u64::from(key_stride) + u64::from(value_stride) * u64::from(nslots)) as u32;
            g.buckets_off = cur;
            cur += u64::from(g.n_buckets) * 16;
            cur = round_up(cur, 64);
            g.summary_off = cur;
            g.summary_words = summary(u64::from(g.pool)) as u32;
            cur += u64::from(g.summary_words) * 8;
            cur = round_up(cur, 64);
            g.elems_off = cur;
        }
        MapType::Array | MapType::PercpuArray => {
            let m = u64::from(def.max_entries);
            g.marks_off = cur;
            cur += m * 4;
            cur = round_up(cur, 64);
            g.summary_off = cur;
            g.summary_words = summary(m) as u32;
            cur += u64::from(g.summary_words) * 8;
            cur = round_up(cur, 64);
            g.data_off = cur;
            g.data_size = m * u64::from(value_stride) * u64::from(nslots);
        }
        MapType::ProgArray => {
            g.data_off = cur;
            g.data_size = u64::from(def.max_entries) * 4;
        }
        MapType::Queue | MapType::Stack => {
            // Push sequence number of each slot, for the forwarder's pushes_since.
            g.marks_off = cur;
            cur = round_up(cur + (u64::from(def.max_entries) + 1) * 8, 64);
            g.data_off = cur;
            g.data_size = (u64::from(def.max_entries) + 1) * u64::from(value_stride);
        }
        MapType::Ringbuf | MapType::PerfEventArray => {
            let (rings, data) = if t == MapType::Ringbuf {
                (1u64, u64::from(def.max_entries))
            } else {
                (u64::from(ncpu), PERF_RING_DATA as u64)
            };
            g.rings = rings as u32;
            g.data_size = data;
            g.data_off = round_up(cur, pg);
        }
        _ => unreachable!(),
    }
    g
}

fn region_end(g: &Geometry, off: u64, pg: u64) -> u64 {
    let t = MapType::from_raw(g.map_type).expect("validated");
    let end = match t {
        _ if t.is_hash() => g.elems_off + u64::from(g.pool) * u64::from(g.elem_size),
        MapType::Ringbuf | MapType::PerfEventArray => {
            g.data_off + u64::from(g.rings) * (2 * pg + g.data_size)
        }
        _ => g.data_off + g.data_size,
    };
    round_up(end.max(off + 1), pg)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl ShmObject {
    /// Creates the segment of `object` with these maps (fails with EEXIST if it exists).
    pub fn create(object: &str, defs: &[MapDef]) -> Result<Self, MapError> {
        Self::create_with(object, defs, &ShmConfig::default())
    }

    pub fn create_with(object: &str, defs: &[MapDef], cfg: &ShmConfig) -> Result<Self, MapError> {
        let oerr = |reason: String| MapError::Corrupt {
            object: object.to_string(),
            reason,
        };
        if !segment::valid_object_name(object) {
            return Err(oerr(format!(
                "invalid object name {object:?} (use [A-Za-z0-9_.+-], at most 200 bytes)"
            )));
        }
        if cfg.mode & 0o002 != 0 {
            return Err(oerr(format!(
                "mode {:o} would let every user write the maps; grant users instead",
                cfg.mode
            )));
        }
        let pg = segment::page_size() as u64;
        let ncpu = possible_cpus();
        for (i, d) in defs.iter().enumerate() {
            validate(d, pg).map_err(|reason| MapError::InvalidDef {
                map: d.name.clone(),
                reason,
            })?;
            if defs[..i].iter().any(|o| o.name == d.name) {
                return Err(MapError::InvalidDef {
                    map: d.name.clone(),
                    reason: "duplicate map name".into(),
                });
            }
        }
        let defs: Vec<MapDef> = defs.iter().map(|d| normalized(d, ncpu)).collect();
        let maps_off = pg;
        let mut cur = round_up(
            maps_off + defs.len() as u64 * std::mem::size_of::<MapRecord>() as u64,
            pg,
        );
        let mut geos = Vec::with_capacity(defs.len());
        for d in &defs {
            let g = plan_region(d, ncpu, cur, pg);
            let end = region_end(&g, cur, pg);
            geos.push((cur, end - cur, g));
            cur = end;
        }
        let total = cur;
        let path = segment::shm_path(object);
        let mapping = Mapping::create(object, total as usize, cfg.mode, cfg.reserve_memory)
            .map_err(|source| MapError::Segment {
                object: object.to_string(),
                path: path.clone(),
                source,
            })?;
        let base = mapping.base();
        // SAFETY: the segment is freshly created (O_EXCL, mode without other users' access) and
        // sized `total`; nobody else can observe it before STATE_READY is stored; all offsets
        // below were computed within `total`.
        unsafe {
            let h = &mut *(base as *mut SegHeader);
            h.magic = MAGIC;
            h.version = VERSION;
            h.total_size = total;
            h.ncpu = ncpu;
            h.created_unix_ns = unix_ns();
            h.map_count = defs.len() as u32;
            h.maps_off = maps_off;
            h.pidns = segment::pid_namespace();
            put_str(&mut h.object, object);
            for (i, (d, (off, size, g))) in defs.iter().zip(geos).enumerate() {
                let r = &mut *(base.add(maps_off as usize + i * std::mem::size_of::<MapRecord>())
                    as *mut MapRecord);
                put_str(&mut r.name, &d.name);
                r.map_type = d.map_type.as_raw();
                r.key_size = d.key_size;
                r.value_size = d.value_size;
                r.max_entries = d.max_entries;
                r.flags = d.flags;
                r.region_off = off;
                r.region_size = size;
                let ctl = &mut *(base.add(off as usize) as *mut MapCtl);
                ctl.geo = g;
            }
            h.state.store(STATE_READY, Ordering::Release);
        }
        let inner = Self::build_inner(object, mapping, Some(&defs)).inspect_err(|_| {
            let _ = segment::unlink(object);
        })?;
        tracing::debug!(
            object,
            bytes = total,
            maps = defs.len(),
            "created shared-memory segment"
        );
        Ok(Self {
            inner: Arc::new(inner),
            creator: true,
        })
    }

    /// Opens an existing segment owned by root or by this process's user (checked on the
    /// descriptor). Its header and map table are validated; nothing else about it is trusted.
    pub fn open(object: &str) -> Result<Self, MapError> {
        let mapping = Self::open_mapping(object, &trusted_owners())?;
        Ok(Self {
            inner: Arc::new(Self::build_inner(object, mapping, None)?),
            creator: false,
        })
    }

    /// Opens the segment a loader's manifest names: the same file (device, inode, owner) and
    /// exactly these maps, or an error saying what differs.
    pub fn open_expect(
        object: &str,
        identity: &SegmentIdentity,
        defs: &[MapDef],
    ) -> Result<Self, MapError> {
        let mapping = Self::open_mapping(object, &[identity.uid])?;
        let got = mapping.identity();
        if got != *identity {
            return Err(MapError::Untrusted {
                object: object.to_string(),
                path: segment::shm_path(object),
                reason: format!(
                    "it is not the segment the loader created (device {}, inode {}, uid {}; \
                     the loader's: device {}, inode {}, uid {})",
                    got.dev, got.ino, got.uid, identity.dev, identity.ino, identity.uid
                ),
            });
        }
        Ok(Self {
            inner: Arc::new(Self::build_inner(object, mapping, Some(defs))?),
            creator: false,
        })
    }

    fn open_mapping(object: &str, trusted: &[u32]) -> Result<Mapping, MapError> {
        if !segment::valid_object_name(object) {
            return Err(MapError::Corrupt {
                object: object.to_string(),
                reason: "invalid object name".into(),
            });
        }
        let mut tries = 0;
        loop {
            match Mapping::open(object, trusted) {
                Ok(m) if m.len() >= 4096 => return Ok(m),
                // A creator between shm_open and ftruncate: give it a moment.
                Ok(_) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(_) => {
                    return Err(MapError::Corrupt {
                        object: object.to_string(),
                        reason: "segment smaller than its header".into(),
                    })
                }
                Err(segment::OpenError::Untrusted(reason)) => {
                    return Err(MapError::Untrusted {
                        object: object.to_string(),
                        path: segment::shm_path(object),
                        reason,
                    })
                }
                Err(segment::OpenError::Io(source)) => {
                    return Err(MapError::Segment {
                        object: object.to_string(),
                        path: segment::shm_path(object),
                        source,
                    })
                }
            }
        }
    }

    /// Opens the segment if it exists with the same map definitions (a restarted loader keeps
    /// the maps the targets are using), otherwise creates it.
    pub fn open_or_create(object: &str, defs: &[MapDef]) -> Result<Self, MapError> {
        match Self::open(object) {
            Ok(o) => {
                let ncpu = o.inner.ncpu;
                let same = o.inner.maps.len() == defs.len()
                    && o.inner
                        .maps
                        .iter()
                        .zip(defs)
                        .all(|(m, d)| m.def == normalized(d, ncpu));
                if same {
                    Ok(o)
                } else {
                    Err(MapError::Corrupt {
                        object: object.to_string(),
                        reason: "an existing segment has different maps; unload it first".into(),
                    })
                }
            }
            Err(e) if e.errno() == libc::ENOENT => match Self::create(object, defs) {
                // Another loader won the race: use its segment if it matches.
                Err(e) if e.errno() == libc::EEXIST => Self::open_or_create(object, defs),
                r => r,
            },
            Err(e) => Err(e),
        }
    }

    /// Validates the header and the map table of a freshly opened mapping (against `expect`,
    /// the loader's definitions, when given) and takes this process's copy of every map's
    /// geometry. Every check reads the segment once; nothing read here is read again later.
    fn build_inner(
        object: &str,
        mapping: Mapping,
        expect: Option<&[MapDef]>,
    ) -> Result<ObjInner, MapError> {
        let corrupt = |reason: String| MapError::Corrupt {
            object: object.to_string(),
            reason,
        };
        let len = mapping.len() as u64;
        if len < 4096 {
            return Err(corrupt("segment smaller than its header".into()));
        }
        let base = mapping.base();
        // SAFETY: the mapping is at least one header long; SegHeader is plain data + atomics.
        let h = unsafe { &*(base as *const SegHeader) };
        // A creator that has just made the file may still be writing the header.
        let mut waited = 0;
        while h.state.load(Ordering::Acquire) != STATE_READY {
            if waited > 200 {
                return Err(corrupt("segment never finished initialising".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        // Volatile reads: another process may be rewriting the header right now; each field is
        // read once into a local and only the local is used.
        // SAFETY: the header lies in the mapping; plain integer fields.
        let (magic, version, total_size, ncpu, map_count, maps_off, pidns) = unsafe {
            (
                std::ptr::read_volatile(&h.magic),
                std::ptr::read_volatile(&h.version),
                std::ptr::read_volatile(&h.total_size),
                std::ptr::read_volatile(&h.ncpu),
                std::ptr::read_volatile(&h.map_count),
                std::ptr::read_volatile(&h.maps_off),
                std::ptr::read_volatile(&h.pidns),
            )
        };
        if magic != MAGIC || version != VERSION {
            return Err(corrupt(format!(
                "bad magic/version ({magic:#x}/{version}) — not a bpftime-rs v{VERSION} segment \
                 (an older bpftime-rs made it? unload it)"
            )));
        }
        if total_size != len {
            return Err(corrupt(format!(
                "size {len} differs from header {total_size}"
            )));
        }
        let ns = segment::pid_namespace();
        if pidns != 0 && ns != 0 && pidns != ns {
            return Err(corrupt(
                "segment was created in another pid namespace; its lock owners (thread ids) \
                 cannot be checked from here, so it cannot be shared safely"
                    .into(),
            ));
        }
        let rec_size = std::mem::size_of::<MapRecord>() as u64;
        let pg = segment::page_size() as u64;
        if ncpu == 0
            || ncpu > 65536
            || map_count > 4096
            || maps_off < pg
            || maps_off
                .checked_add(u64::from(map_count) * rec_size)
                .is_none_or(|end| end > len)
        {
            return Err(corrupt("header fields out of bounds".into()));
        }
        if let Some(expect) = expect {
            if expect.len() != map_count as usize {
                return Err(corrupt(format!(
                    "the segment has {map_count} maps, the loader defined {}",
                    expect.len()
                )));
            }
        }
        let mut maps: Vec<MapMeta> = Vec::with_capacity(map_count as usize);
        let mut prev_end = maps_off + u64::from(map_count) * rec_size;
        for i in 0..u64::from(map_count) {
            // SAFETY: the record lies inside the mapping (bounds checked above); read once, by
            // value, so later writes by other processes cannot change what is validated.
            let r = unsafe {
                std::ptr::read_volatile(
                    base.add((maps_off + i * rec_size) as usize) as *const MapRecord
                )
            };
            let name = get_str(&r.name);
            let Some(map_type) = MapType::from_raw(r.map_type) else {
                return Err(corrupt(format!("map {name}: unknown type {}", r.map_type)));
            };
            let def = MapDef {
                map_type,
                key_size: r.key_size,
                value_size: r.value_size,
                max_entries: r.max_entries,
                flags: r.flags,
                name: name.clone(),
            };
            if let Some(expect) = expect {
                let want = normalized(&expect[i as usize], ncpu);
                if def != want {
                    return Err(corrupt(format!(
                        "map #{i} is {} {name} (key {}, value {}, max {}, flags {:#x}) in the \
                         segment but {} {} (key {}, value {}, max {}, flags {:#x}) in the loader's \
                         definition",
                        def.map_type.name(),
                        def.key_size,
                        def.value_size,
                        def.max_entries,
                        def.flags,
                        want.map_type.name(),
                        want.name,
                        want.key_size,
                        want.value_size,
                        want.max_entries,
                        want.flags
                    )));
                }
            }
            if maps.iter().any(|m| *m.name == *name) {
                return Err(corrupt(format!("map {name}: duplicate name")));
            }
            validate(&def, pg).map_err(|reason| corrupt(format!("map {name}: {reason}")))?;
            let region_end_off = r.region_off.checked_add(r.region_size);
            if region_end_off.is_none_or(|end| end > len)
                || r.region_off % pg != 0
                || r.region_off < prev_end
            {
                return Err(corrupt(format!("map {name}: region out of bounds")));
            }
            if r.region_size < std::mem::size_of::<MapCtl>() as u64 {
                return Err(corrupt(format!("map {name}: region too small")));
            }
            prev_end = r.region_off + r.region_size;
            // Every offset this process will ever follow derives from its own geometry, planned
            // from the definition; the segment's copy must agree, inside the region.
            let geo = plan_region(&def, ncpu, r.region_off, pg);
            // SAFETY: region bounds checked; Geometry is plain integers, read once by value.
            let stored = unsafe {
                std::ptr::read_volatile(&(*(base.add(r.region_off as usize) as *const MapCtl)).geo)
            };
            if stored != geo || region_end(&geo, r.region_off, pg) > r.region_off + r.region_size {
                return Err(corrupt(format!(
                    "map {name}: geometry does not match its definition"
                )));
            }
            let rings = if geo.rings > 0 {
                let mut v = Vec::with_capacity(geo.rings as usize);
                for ri in 0..u64::from(geo.rings) {
                    let off = geo.data_off + ri * (2 * pg + geo.data_size);
                    v.push(
                        mapping
                            .map_ring(off as usize, geo.data_size as usize)
                            .map_err(|source| MapError::Segment {
                                object: object.to_string(),
                                path: segment::shm_path(object),
                                source,
                            })?,
                    );
                }
                Some(Arc::new(v))
            } else {
                None
            };
            maps.push(MapMeta {
                name: name.into(),
                def,
                geo,
                region_off: r.region_off,
                rings,
            });
        }
        Ok(ObjInner {
            ncpu,
            mapping,
            object: object.to_string(),
            maps,
        })
    }

    pub fn object_name(&self) -> &str {
        &self.inner.object
    }

    /// Whether this handle created the segment.
    pub fn is_creator(&self) -> bool {
        self.creator
    }

    /// The segment file's device, inode and owner (what a manifest records).
    pub fn identity(&self) -> SegmentIdentity {
        self.inner.mapping.identity()
    }

    /// Gives `uids` and `gids` read-write access to this segment (POSIX ACL entries on the
    /// file): the explicit grant a non-root target needs to map a root loader's maps. The
    /// segment stays closed to everyone else.
    pub fn grant(&self, uids: &[u32], gids: &[u32]) -> Result<(), MapError> {
        self.inner
            .mapping
            .grant(uids, gids)
            .map_err(|source| MapError::Segment {
                object: self.inner.object.clone(),
                path: format!(
                    "{} (granting access with a POSIX ACL)",
                    segment::shm_path(&self.inner.object)
                ),
                source,
            })
    }

    /// Per-CPU slot count recorded by the creator (all processes index by it).
    pub fn ncpu(&self) -> u32 {
        self.inner.ncpu
    }

    pub fn map_count(&self) -> usize {
        self.inner.maps.len()
    }

    pub fn map_defs(&self) -> Vec<MapDef> {
        self.inner.maps.iter().map(|m| m.def.clone()).collect()
    }

    /// A handle on a map by index or name.
    pub fn map(&self, sel: impl MapSel) -> Result<MapHandle, MapError> {
        let idx = sel.index_in(self).ok_or_else(|| MapError::NoSuchMap {
            object: self.inner.object.clone(),
            map: sel.describe(),
        })?;
        let m = &self.inner.maps[idx];
        let base = self.inner.mapping.base();
        Ok(MapHandle {
            // SAFETY: region bounds validated in build_inner.
            ctl: unsafe { base.add(m.region_off as usize) } as *const MapCtl,
            base,
            geo: m.geo,
            def: m.def.clone(),
            name: m.name.clone(),
            rings: m.rings.clone(),
            ncpu: self.inner.ncpu,
            _obj: self.inner.clone(),
        })
    }

    pub fn maps(&self) -> Vec<MapHandle> {
        (0..self.map_count())
            .filter_map(|i| self.map(i).ok())
            .collect()
    }

    /// Unlinks this object's segment (mappings stay valid until every process drops them).
    pub fn remove(&self) -> Result<(), MapError> {
        remove_object(&self.inner.object)
    }
}

/// A definition as the segment stores it (a PERF_EVENT_ARRAY without max_entries gets one ring
/// per CPU, as the kernel does).
fn normalized(def: &MapDef, ncpu: u32) -> MapDef {
    let mut d = def.clone();
    if d.map_type == MapType::PerfEventArray && d.max_entries == 0 {
        d.max_entries = ncpu;
    }
    d
}

/// Every bpftime-rs segment file in /dev/shm, with its owner; none is opened.
pub fn list_segments() -> io::Result<Vec<SegmentInfo>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for object in segment::list_object_names()? {
        let path = segment::shm_path(&object);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mapped_by = segment::pids_mapping(&path);
        out.push(SegmentInfo {
            object,
            size: meta.len(),
            owner_uid: meta.uid(),
            identity: meta.is_file().then(|| SegmentIdentity {
                dev: meta.dev(),
                ino: meta.ino(),
                uid: meta.uid(),
            }),
            mapped_by,
            path,
        });
    }
    Ok(out)
}

/// Whether `name` can name an object (it becomes part of file names).
pub fn valid_object_name(name: &str) -> bool {
    segment::valid_object_name(name)
}

/// Path of `object`'s segment.
pub fn segment_path(object: &str) -> String {
    segment::shm_path(object)
}

/// Unlinks the segment of `object`.
pub fn remove_object(object: &str) -> Result<(), MapError> {
    if !segment::valid_object_name(object) {
        return Err(MapError::Corrupt {
            object: object.to_string(),
            reason: "invalid object name".into(),
        });
    }
    segment::unlink(object).map_err(|source| MapError::Segment {
        object: object.to_string(),
        path: segment::shm_path(object),
        source,
    })
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

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address of the map's control block in this process's mapping: equal for handles of the
    /// same map through the same mapping (the JIT compares map sets by it).
    pub(crate) fn identity(&self) -> usize {
        self.ctl as usize
    }

    pub fn def(&self) -> &MapDef {
        &self.def
    }

    pub fn map_type(&self) -> MapType {
        self.def.map_type
    }

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
        let t = self.def.map_type;
        let p = if t.is_hash() {
            self.hash_find_slot(key).map(|s| self.hash_val_ptr(s, cpu))
        } else if t.is_array() {
            let i = u32::from_le_bytes(key.try_into().expect("key_size 4"));
            (i < self.def.max_entries).then(|| self.array_ptr(i, cpu))
        } else {
            return Err(self.err("lookup", libc::ENOTSUP));
        };
        Ok(p.map(|p| ValuePtr::new(p, self.def.value_size as usize)))
    }

    #[inline]
    fn lookup_inner(&self, key: &[u8], cpu: u32) -> Result<Option<ValuePtr<'_>>, MapError> {
        self.check_key("lookup", key)?;
        let t = self.def.map_type;
        let p = if t.is_hash() {
            self.hash_lookup(key, cpu)
        } else if t.is_array() {
            self.array_lookup(key, cpu)
        } else {
            // prog/perf arrays, queues, stacks and ringbufs hand out no value pointers.
            return Err(self.err("lookup", libc::ENOTSUP));
        };
        Ok(p.map(|p| ValuePtr::new(p, self.def.value_size as usize)))
    }

    /// Copy of the value (all CPU slots for per-CPU maps), without marking the entry.
    pub fn get(&self, key: &[u8]) -> Result<Option<EntryValue>, MapError> {
        self.check_key("lookup", key)?;
        let t = self.def.map_type;
        if t.is_hash() {
            Ok(self.hash_get(key))
        } else if t.is_array() {
            Ok(self.array_get(key))
        } else if t == MapType::ProgArray {
            Ok(self
                .prog_array_get(u32::from_le_bytes(key.try_into().expect("key_size 4")))
                .map(|v| EntryValue::Single(v.to_le_bytes().to_vec())))
        } else {
            Err(self.err("lookup", libc::ENOTSUP))
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
        let t = self.def.map_type;
        if t.is_hash() {
            self.hash_update(key, value, flags, cpu)
        } else if t.is_array() {
            self.array_update(key, value, flags, cpu)
        } else if t == MapType::ProgArray {
            self.prog_array_update(key, value, flags)
        } else if matches!(t, MapType::Queue | MapType::Stack) {
            self.push(value, flags)
        } else {
            Err(self.err("update", libc::ENOTSUP))
        }
    }

    /// Kernel `map_delete_elem`.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.check_key("delete", key)?;
        let t = self.def.map_type;
        if t.is_hash() {
            self.hash_delete(key)
        } else if t.is_array() {
            Err(self.err("delete", libc::EINVAL))
        } else if t == MapType::ProgArray {
            self.prog_array_delete(key)
        } else {
            Err(self.err("delete", libc::ENOTSUP))
        }
    }

    /// Every entry (hash: live entries; arrays: every index; queue/stack: queued values in
    /// pop order with empty keys; prog arrays: set slots). Does not mark anything.
    pub fn iter(&self) -> Vec<Entry> {
        let t = self.def.map_type;
        if t.is_hash() {
            self.hash_entries()
        } else if t.is_array() {
            self.array_entries()
        } else if t == MapType::ProgArray {
            self.prog_array_entries()
        } else if matches!(t, MapType::Queue | MapType::Stack) {
            self.queue_entries()
        } else {
            Vec::new()
        }
    }

    /// `bpf_for_each_map_elem`: calls `f(key_ptr, value_ptr)` for every entry (hash: live
    /// entries; arrays: every index) with the value slot of `cpu`, until `f` returns false;
    /// returns how many entries were visited. Each visited entry is marked as a handed-out
    /// pointer, since the callback may write through it.
    pub fn for_each_ptr(&self, cpu: u32, mut f: impl FnMut(*const u8, *mut u8) -> bool) -> u64 {
        let t = self.def.map_type;
        if cpu >= self.geo.nslots {
            return 0;
        }
        let mut n = 0;
        if t.is_hash() {
            n = self.hash_for_each(cpu, &mut f);
        } else if t.is_array() {
            for i in 0..self.def.max_entries {
                let key = i.to_le_bytes();
                self.mark_soft(i, self.mark_word(i), layout::MARK_LOOKUP);
                n += 1;
                if !f(key.as_ptr(), self.array_ptr(i, cpu)) {
                    break;
                }
            }
        }
        n
    }

    /// Entry count: live entries of a hash map, queued values of a queue/stack, set slots of a
    /// prog array, max_entries of an array, 0 for rings.
    pub fn len(&self) -> usize {
        let t = self.def.map_type;
        if t.is_hash() {
            self.ctl().alloc.count.load(Ordering::Relaxed) as usize
        } else if matches!(t, MapType::Queue | MapType::Stack) {
            self.queue_len()
        } else if t.is_array() {
            self.def.max_entries as usize
        } else if t == MapType::ProgArray {
            self.prog_array_entries().len()
        } else {
            0
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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
