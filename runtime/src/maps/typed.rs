//! Typed maps over [`MapHandle`]: one view per map family, defined in the family's file, each
//! checking the map's type once (when made, aya's `TryFrom<Map>` pattern) so its operations
//! cannot be called on a map of another type. [`MapHandle::typed`] is the one place that maps
//! a map to its view; the common operations of [`MapHandle`], definition checks and region
//! layouts dispatch on the family.

use super::{ArrayMap, HashMap, MapError, MapHandle, MapType, PerfEventArray, ProgArray};
use super::{BloomFilter, CgroupArray, LpmTrie, QueueMap, RingBuf, StackTraceMap};

/// The map families, one file each. [`Family::of`] is the one match from [`MapType`] to
/// family: a new map type is added there (the compiler asks), then in its family's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Hash,
    Array,
    ProgArray,
    Queue,
    RingBuf,
    PerfEventArray,
    StackTrace,
    BloomFilter,
    CgroupArray,
    LpmTrie,
}

impl Family {
    pub(super) fn of(t: MapType) -> Self {
        match t {
            MapType::Hash
            | MapType::PercpuHash
            | MapType::LruHash
            | MapType::LruPercpuHash
            | MapType::HashOfMaps => Family::Hash,
            MapType::Array | MapType::PercpuArray => Family::Array,
            // The kernel's fd arrays of references to the object's programs or maps.
            MapType::ProgArray | MapType::ArrayOfMaps => Family::ProgArray,
            MapType::Queue | MapType::Stack => Family::Queue,
            MapType::Ringbuf | MapType::UserRingbuf => Family::RingBuf,
            MapType::PerfEventArray => Family::PerfEventArray,
            MapType::StackTrace => Family::StackTrace,
            MapType::BloomFilter => Family::BloomFilter,
            MapType::CgroupArray => Family::CgroupArray,
            MapType::LpmTrie => Family::LpmTrie,
        }
    }
}

/// A map seen through its family's view.
#[derive(Debug, Clone, Copy)]
pub enum MapRef<'a> {
    /// HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH, HASH_OF_MAPS (values: map indices).
    Hash(&'a HashMap),
    /// ARRAY, PERCPU_ARRAY.
    Array(&'a ArrayMap),
    /// PROG_ARRAY (program indices for tail calls) and ARRAY_OF_MAPS (map indices).
    ProgArray(&'a ProgArray),
    /// QUEUE (FIFO) and STACK (LIFO).
    Queue(&'a QueueMap),
    /// RINGBUF and USER_RINGBUF.
    RingBuf(&'a RingBuf),
    /// PERF_EVENT_ARRAY: one ring per CPU.
    PerfEventArray(&'a PerfEventArray),
    /// STACK_TRACE: stacks by id.
    StackTrace(&'a StackTraceMap),
    /// BLOOM_FILTER.
    BloomFilter(&'a BloomFilter),
    /// CGROUP_ARRAY.
    CgroupArray(&'a CgroupArray),
    /// LPM_TRIE.
    LpmTrie(&'a LpmTrie),
}

/// Defines a typed view: `repr(transparent)` over [`MapHandle`] (so `&MapHandle` converts to
/// `&View` without a copy), `Deref` to the handle for the common operations, and `TryFrom`
/// from owned and borrowed handles that checks the type through [`MapHandle::typed`].
macro_rules! typed_map {
    ($(#[$doc:meta])* $view:ident, $variant:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        #[repr(transparent)]
        pub struct $view(super::MapHandle);

        impl $view {
            /// # Safety
            /// `m`'s type belongs to this family (only [`MapHandle::typed`] calls it).
            pub(super) unsafe fn from_handle_unchecked(m: &super::MapHandle) -> &Self {
                // SAFETY: `Self` is repr(transparent) over MapHandle, so the layouts are equal
                // and the reference keeps its lifetime; the caller checked the type.
                unsafe { &*(m as *const super::MapHandle as *const Self) }
            }

            /// The untyped handle.
            pub fn handle(&self) -> &super::MapHandle {
                &self.0
            }

            /// The family's name in errors.
            pub const FAMILY: &'static str = $what;
        }

        impl std::ops::Deref for $view {
            type Target = super::MapHandle;

            fn deref(&self) -> &super::MapHandle {
                &self.0
            }
        }

        impl<'a> TryFrom<&'a super::MapHandle> for &'a $view {
            type Error = super::MapError;

            fn try_from(m: &'a super::MapHandle) -> Result<Self, super::MapError> {
                match m.typed() {
                    super::MapRef::$variant(v) => Ok(v),
                    _ => Err(m.wrong_type($what)),
                }
            }
        }

        impl TryFrom<super::MapHandle> for $view {
            type Error = super::MapError;

            fn try_from(m: super::MapHandle) -> Result<Self, super::MapError> {
                <&$view>::try_from(&m)?;
                Ok($view(m))
            }
        }
    };
}
pub(super) use typed_map;

impl MapHandle {
    /// This map through its family's view.
    #[inline]
    pub fn typed(&self) -> MapRef<'_> {
        // SAFETY: in every arm the view is the family of the map's own type.
        unsafe {
            match Family::of(self.def.map_type) {
                Family::Hash => MapRef::Hash(HashMap::from_handle_unchecked(self)),
                Family::Array => MapRef::Array(ArrayMap::from_handle_unchecked(self)),
                Family::ProgArray => MapRef::ProgArray(ProgArray::from_handle_unchecked(self)),
                Family::Queue => MapRef::Queue(QueueMap::from_handle_unchecked(self)),
                Family::RingBuf => MapRef::RingBuf(RingBuf::from_handle_unchecked(self)),
                Family::PerfEventArray => {
                    MapRef::PerfEventArray(PerfEventArray::from_handle_unchecked(self))
                }
                Family::StackTrace => {
                    MapRef::StackTrace(StackTraceMap::from_handle_unchecked(self))
                }
                Family::BloomFilter => {
                    MapRef::BloomFilter(BloomFilter::from_handle_unchecked(self))
                }
                Family::CgroupArray => {
                    MapRef::CgroupArray(CgroupArray::from_handle_unchecked(self))
                }
                Family::LpmTrie => MapRef::LpmTrie(LpmTrie::from_handle_unchecked(self)),
            }
        }
    }

    /// This map as a queue or stack, `None` for other types.
    pub fn as_queue(&self) -> Option<&QueueMap> {
        match self.typed() {
            MapRef::Queue(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a hash map (any variant), `None` for other types.
    pub fn as_hash(&self) -> Option<&HashMap> {
        match self.typed() {
            MapRef::Hash(v) => Some(v),
            _ => None,
        }
    }

    /// This map as an array (plain or per-CPU), `None` for other types.
    pub fn as_array(&self) -> Option<&ArrayMap> {
        match self.typed() {
            MapRef::Array(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a RINGBUF, `None` for other types.
    pub fn as_ringbuf(&self) -> Option<&RingBuf> {
        match self.typed() {
            MapRef::RingBuf(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a PERF_EVENT_ARRAY, `None` for other types.
    pub fn as_perf_event_array(&self) -> Option<&PerfEventArray> {
        match self.typed() {
            MapRef::PerfEventArray(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a STACK_TRACE, `None` for other types.
    pub fn as_stack_trace(&self) -> Option<&StackTraceMap> {
        match self.typed() {
            MapRef::StackTrace(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a BLOOM_FILTER, `None` for other types.
    pub fn as_bloom_filter(&self) -> Option<&BloomFilter> {
        match self.typed() {
            MapRef::BloomFilter(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a CGROUP_ARRAY, `None` for other types.
    pub fn as_cgroup_array(&self) -> Option<&CgroupArray> {
        match self.typed() {
            MapRef::CgroupArray(v) => Some(v),
            _ => None,
        }
    }

    /// This map as an LPM_TRIE, `None` for other types.
    pub fn as_lpm_trie(&self) -> Option<&LpmTrie> {
        match self.typed() {
            MapRef::LpmTrie(v) => Some(v),
            _ => None,
        }
    }

    /// This map as a PROG_ARRAY, `None` for other types.
    pub fn as_prog_array(&self) -> Option<&ProgArray> {
        match self.typed() {
            MapRef::ProgArray(v) => Some(v),
            _ => None,
        }
    }

    pub(super) fn wrong_type(&self, expected: &'static str) -> MapError {
        MapError::WrongType {
            map: self.name.clone(),
            found: self.def.map_type,
            expected,
        }
    }
}
