//! Memory model of the checked interpreter: a set of registered regions.
//!
//! Every load, store and atomic of the interpreter must fall entirely inside one registered
//! region (and a writable one for stores). Regions can be added before a run (context, packet,
//! `-- mem` of the conformance suite) and during a run by helpers (e.g. a map value pointer
//! returned by `bpf_map_lookup_elem`).

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

/// One registered address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether stores (and atomics) may touch it; loads always may.
    pub writable: bool,
}

impl Region {
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.start + self.len)
    }
}

/// Objects that keep memory behind registered raw regions alive (e.g. the shared-memory
/// mapping of an object's maps) for as long as the [`MemoryMap`] lives.
#[derive(Default)]
struct Owners(Vec<Arc<dyn Any + Send + Sync>>);

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} owners", self.0.len())
    }
}

/// The set of regions a program may touch. `'a` is the lifetime of borrowed slices.
#[derive(Debug, Default)]
pub struct MemoryMap<'a> {
    regions: Vec<Region>,
    owners: Owners,
    /// The running interpreter's stack (checked first; not in `regions`).
    stack: Option<(u64, u64)>,
    last_hit: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// The heap storage of a [`MemoryMap`], kept between runs so that a run that registers
/// regions allocates nothing ([`MemoryMap::from_buffers`], [`MemoryMap::into_buffers`]).
/// Holds no regions or owners: only capacity.
#[derive(Debug, Default)]
pub struct MemoryBuffers {
    regions: Vec<Region>,
    owners: Owners,
}

impl<'a> MemoryMap<'a> {
    /// An empty map: no region is accessible.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map that reuses `buffers`' storage.
    pub fn from_buffers(buffers: MemoryBuffers) -> Self {
        let MemoryBuffers {
            mut regions,
            mut owners,
        } = buffers;
        regions.clear();
        owners.0.clear();
        Self {
            regions,
            owners,
            ..Self::default()
        }
    }

    /// Drops the map; inline and without a call when it never allocated (the JIT's map of a
    /// run whose helpers registered nothing, i.e. nearly every run).
    #[inline]
    pub fn release(self) {
        if self.regions.capacity() == 0 && self.owners.0.capacity() == 0 {
            // Nothing on the heap and nothing else to drop: skipping the destructor is exact.
            std::mem::forget(self);
        }
    }

    /// Ends the map, keeping its storage (emptied: every region unregistered, every owner
    /// released) for [`from_buffers`](Self::from_buffers).
    pub fn into_buffers(mut self) -> MemoryBuffers {
        let mut regions = std::mem::take(&mut self.regions);
        let mut owners = std::mem::take(&mut self.owners);
        regions.clear();
        owners.0.clear();
        MemoryBuffers { regions, owners }
    }

    /// Register a read-only slice.
    pub fn add_slice(&mut self, s: &'a [u8]) {
        self.push(Region {
            start: s.as_ptr() as u64,
            len: s.len() as u64,
            writable: false,
        });
    }

    /// Register a writable slice.
    pub fn add_mut_slice(&mut self, s: &'a mut [u8]) {
        self.push(Region {
            start: s.as_mut_ptr() as u64,
            len: s.len() as u64,
            writable: true,
        });
    }

    /// Register a raw address range.
    ///
    /// # Safety
    /// `[start, start+len)` must stay valid for reads (and writes when `writable`) for as long as
    /// it is registered in this map (typically: for the rest of the run). Memory owned by a map
    /// that outlives the run (map values) satisfies this.
    pub unsafe fn add_raw(&mut self, start: u64, len: u64, writable: bool) {
        self.push(Region {
            start,
            len,
            writable,
        });
    }

    /// Keep `owner` alive as long as this map: registering raw regions inside memory that
    /// `owner` keeps valid (a shared-memory mapping) then satisfies [`add_raw`](Self::add_raw)'s
    /// contract. Adding the same `Arc` twice keeps one clone.
    pub fn keep_alive<T: Any + Send + Sync>(&mut self, owner: &Arc<T>) {
        let p = Arc::as_ptr(owner) as *const ();
        if !self
            .owners
            .0
            .iter()
            .any(|o| Arc::as_ptr(o) as *const () == p)
        {
            self.owners.0.push(owner.clone());
        }
    }

    fn push(&mut self, r: Region) {
        if r.len == 0 || self.regions.contains(&r) {
            return;
        }
        self.regions.push(r);
    }

    /// Remove a region previously registered with exactly these bounds.
    pub fn remove(&mut self, start: u64, len: u64) {
        self.regions.retain(|r| !(r.start == start && r.len == len));
        self.last_hit = 0;
    }

    /// Registered regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Set the interpreter stack range, returning the previous one.
    ///
    /// # Safety
    /// The range must stay valid for reads and writes until it is replaced.
    pub(crate) unsafe fn set_stack(&mut self, stack: Option<(u64, u64)>) -> Option<(u64, u64)> {
        std::mem::replace(&mut self.stack, stack)
    }

    /// Whether `[addr, addr+len)` lies inside one region (writable if `write`).
    pub fn check(&mut self, addr: u64, len: u64, write: bool) -> bool {
        if let Some((start, slen)) = self.stack {
            let r = Region {
                start,
                len: slen,
                writable: true,
            };
            if r.contains(addr, len) {
                return true;
            }
        }
        if let Some(r) = self.regions.get(self.last_hit) {
            if r.contains(addr, len) && (!write || r.writable) {
                return true;
            }
        }
        for (i, r) in self.regions.iter().enumerate() {
            if r.contains(addr, len) && (!write || r.writable) {
                self.last_hit = i;
                return true;
            }
        }
        false
    }

    /// Borrow `len` bytes at `addr` if they are inside a registered region (for helpers reading
    /// program memory, e.g. a key pointer).
    pub fn read_bytes(&mut self, addr: u64, len: usize) -> Option<&[u8]> {
        if !self.check(addr, len as u64, false) {
            return None;
        }
        if len == 0 {
            return Some(&[]);
        }
        // SAFETY: the range lies inside a registered region, which by the contract of
        // `add_slice`/`add_raw` is valid for reads while registered; the borrow is tied to `self`.
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
    }

    /// Mutably borrow `len` bytes at `addr` if they are inside a writable registered region.
    pub fn write_bytes(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        if !self.check(addr, len as u64, true) {
            return None;
        }
        if len == 0 {
            return Some(&mut []);
        }
        // SAFETY: the range lies inside a writable registered region, valid for writes while
        // registered; the borrow is tied to `&mut self`.
        Some(unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) })
    }
}
