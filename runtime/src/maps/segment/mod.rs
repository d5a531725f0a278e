//! The shared segment of one loaded object: a one-page header, the map table, and one region
//! per map (see `layout.rs`), in a POSIX shm file ([`file`]). [`ShmObject`] creates, opens,
//! lists and removes segments and hands out the maps of one as [`MapHandle`]s; each map
//! family's file checks definitions and lays out its region.

pub(super) mod file;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::layout::*;
use super::typed::Family;
use super::InnerMapDef;
use super::{array, bloom, cgroup_array, hash, lpm_trie, map_of_maps, queue, ring, stack_trace};
use super::{MapDef, MapError, MapHandle, MapType};
use bpftime_abi::possible_cpus;
use file::{trusted_owners, Mapping, RingMapping};

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
    /// `st_dev` of the file (the /dev/shm filesystem).
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
    /// `st_uid`: the user who created it.
    pub uid: u32,
}

/// A bpftime-rs segment file found in /dev/shm (whose it is, not whether to trust it).
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// The object name the file name encodes.
    pub object: String,
    /// The file's path in /dev/shm.
    pub path: String,
    /// The file's size in bytes.
    pub size: u64,
    /// The file's owner.
    pub owner_uid: u32,
    /// Device, inode and owner; `None` when the entry is not a regular file.
    pub identity: Option<SegmentIdentity>,
    /// Processes (other than this one) that have the segment mapped.
    pub mapped_by: Vec<u32>,
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
    /// The index of the selected map in `obj`, `None` if it has no such map.
    fn index_in(&self, obj: &ShmObject) -> Option<usize>;
    /// How errors name the selection (`#3`, `` `counts` ``).
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

fn validate(def: &MapDef, pg: u64) -> Result<(), String> {
    if def.name.is_empty() || def.name.len() >= NAME_LEN {
        return Err(format!("name must be 1..{} bytes", NAME_LEN - 1));
    }
    let t = def.map_type;
    let (k, v) = (def.key_size, def.value_size);
    if k > 512 || v > (1 << 20) {
        return Err(format!("key size {k} or value size {v} too large"));
    }
    match Family::of(t) {
        Family::Hash => hash::validate(def)?,
        Family::Array => array::validate_array(def)?,
        Family::ProgArray => array::validate_prog_array(def)?,
        Family::Queue => queue::validate(def)?,
        Family::RingBuf => ring::validate_ringbuf(def, pg)?,
        Family::PerfEventArray => ring::validate_perf_event_array(def)?,
        Family::StackTrace => stack_trace::validate(def)?,
        Family::BloomFilter => bloom::validate(def)?,
        Family::CgroupArray => cgroup_array::validate(def)?,
        Family::LpmTrie => lpm_trie::validate(def)?,
    }
    map_of_maps::validate(def)?;
    if let Some(off) = def.spin_lock {
        // The kernel's map_check_btf: a spin lock in hash and array values only, aligned.
        if !matches!(t, MapType::Hash | MapType::Array) {
            return Err(format!(
                "a struct bpf_spin_lock in a {} value (hash and array maps only)",
                t.name()
            ));
        }
        if off % 4 != 0 || u64::from(off) + 4 > u64::from(v) {
            return Err(format!(
                "struct bpf_spin_lock at byte {off} of a {v}-byte value (4 aligned bytes inside it)"
            ));
        }
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
        spin_lock: def.spin_lock.map_or(0, |o| o + 1),
        buckets_off: 0,
        elems_off: 0,
        marks_off: 0,
        summary_off: 0,
        data_off: 0,
        data_size: 0,
    };
    let cur = off + ctl;
    match Family::of(t) {
        Family::Hash => hash::plan(&mut g, def, cur),
        Family::Array => array::plan_array(&mut g, def, cur, pg),
        Family::ProgArray => array::plan_prog_array(&mut g, def, cur),
        Family::Queue => queue::plan(&mut g, def, cur),
        Family::RingBuf => ring::plan_ringbuf(&mut g, def, cur, pg),
        Family::PerfEventArray => ring::plan_perf_event_array(&mut g, ncpu, cur, pg),
        Family::StackTrace => stack_trace::plan(&mut g, def, cur),
        Family::BloomFilter => bloom::plan(&mut g, def, cur),
        Family::CgroupArray => cgroup_array::plan(&mut g, def, cur),
        Family::LpmTrie => lpm_trie::plan(&mut g, def, cur),
    }
    g
}

fn region_end(g: &Geometry, off: u64, pg: u64) -> u64 {
    let t = MapType::from_raw(g.map_type).expect("validated");
    let end = match t {
        _ if t.is_hash() => g.elems_off + u64::from(g.pool) * u64::from(g.elem_size),
        MapType::Ringbuf | MapType::UserRingbuf | MapType::PerfEventArray => {
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

    /// As [`create`](Self::create), with the file mode and memory reservation of `cfg`.
    pub fn create_with(object: &str, defs: &[MapDef], cfg: &ShmConfig) -> Result<Self, MapError> {
        let oerr = |reason: String| MapError::Corrupt {
            object: object.to_string(),
            reason,
        };
        if !file::valid_object_name(object) {
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
        let pg = file::page_size() as u64;
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
        let path = file::shm_path(object);
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
            h.pidns = file::pid_namespace();
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
                r.map_extra = d.map_extra;
                r.inner = d.inner.map(InnerMapDef::to_raw).unwrap_or_default();
                r.spin_lock = d.spin_lock.map_or(0, |o| o + 1);
                r.region_off = off;
                r.region_size = size;
                let ctl = &mut *(base.add(off as usize) as *mut MapCtl);
                ctl.geo = g;
            }
            h.state.store(STATE_READY, Ordering::Release);
        }
        let inner = Self::build_inner(object, mapping, Some(&defs)).inspect_err(|_| {
            let _ = file::unlink(object);
        })?;
        tracing::debug!(
            object,
            bytes = total,
            maps = defs.len(),
            "created shared-memory segment"
        );
        let obj = Self {
            inner: Arc::new(inner),
            creator: true,
        };
        for m in obj.maps() {
            if m.map_type() == MapType::BloomFilter {
                m.bloom_init();
            }
        }
        Ok(obj)
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
                path: file::shm_path(object),
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
        if !file::valid_object_name(object) {
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
                Err(file::OpenError::Untrusted(reason)) => {
                    return Err(MapError::Untrusted {
                        object: object.to_string(),
                        path: file::shm_path(object),
                        reason,
                    })
                }
                Err(file::OpenError::Io(source)) => {
                    return Err(MapError::Segment {
                        object: object.to_string(),
                        path: file::shm_path(object),
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
        let ns = file::pid_namespace();
        if pidns != 0 && ns != 0 && pidns != ns {
            return Err(corrupt(
                "segment was created in another pid namespace; its lock owners (thread ids) \
                 cannot be checked from here, so it cannot be shared safely"
                    .into(),
            ));
        }
        let rec_size = std::mem::size_of::<MapRecord>() as u64;
        let pg = file::page_size() as u64;
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
                map_extra: r.map_extra,
                name: name.clone(),
                inner: match InnerMapDef::from_raw(r.inner) {
                    Ok(inner) => inner,
                    Err(why) => return Err(corrupt(format!("map {name}: {why}"))),
                },
                spin_lock: r.spin_lock.checked_sub(1),
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
                                path: file::shm_path(object),
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

    /// The object's name (the segment's name).
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
                    file::shm_path(&self.inner.object)
                ),
                source,
            })
    }

    /// Per-CPU slot count recorded by the creator (all processes index by it).
    pub fn ncpu(&self) -> u32 {
        self.inner.ncpu
    }

    /// Number of maps in the segment's map table.
    pub fn map_count(&self) -> usize {
        self.inner.maps.len()
    }

    /// Every map's definition as stored, in index order.
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

    /// The segment's file, for mapping a map's range ([`MapHandle::mmap_range`]) where a
    /// loader asks for it (the shim's `mmap` of a map descriptor).
    pub fn segment_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.mapping.fd()
    }

    /// Handles on every map, in index order.
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
    for object in file::list_object_names()? {
        let path = file::shm_path(&object);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mapped_by = file::pids_mapping(&path);
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
    file::valid_object_name(name)
}

/// Path of `object`'s segment.
pub fn segment_path(object: &str) -> String {
    file::shm_path(object)
}

/// Unlinks the segment of `object`.
pub fn remove_object(object: &str) -> Result<(), MapError> {
    if !file::valid_object_name(object) {
        return Err(MapError::Corrupt {
            object: object.to_string(),
            reason: "invalid object name".into(),
        });
    }
    file::unlink(object).map_err(|source| MapError::Segment {
        object: object.to_string(),
        path: file::shm_path(object),
        source,
    })
}
