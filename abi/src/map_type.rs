//! `enum bpf_map_type` for the types bpftime-rs implements, with bpftool's names.

use std::fmt;

macro_rules! map_types {
    ($($(#[$doc:meta])* $variant:ident = $sys:ident, $name:literal;)*) => {
        /// A kernel `BPF_MAP_TYPE_*` that bpftime-rs implements; the discriminants are the
        /// generated UAPI values. Adding a type is one line here.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum MapType {
            $($(#[$doc])*
            #[doc = concat!("`", stringify!($sys), "` (bpftool: `", $name, "`).")]
            $variant = libbpf_sys::$sys,)*
        }

        impl MapType {
            /// Every implemented type, in UAPI order.
            pub const ALL: &'static [MapType] = &[$(MapType::$variant),*];

            /// bpftool's name for the type (`libbpf_bpf_map_type_str`).
            pub fn name(self) -> &'static str {
                match self {
                    $(MapType::$variant => $name,)*
                }
            }
        }

        impl TryFrom<u32> for MapType {
            type Error = UnknownMapType;

            fn try_from(raw: u32) -> Result<Self, UnknownMapType> {
                $(if raw == libbpf_sys::$sys {
                    return Ok(MapType::$variant);
                })*
                Err(UnknownMapType(raw))
            }
        }
    };
}

map_types! {
    Hash = BPF_MAP_TYPE_HASH, "hash";
    Array = BPF_MAP_TYPE_ARRAY, "array";
    /// Tail-call targets.
    ProgArray = BPF_MAP_TYPE_PROG_ARRAY, "prog_array";
    PerfEventArray = BPF_MAP_TYPE_PERF_EVENT_ARRAY, "perf_event_array";
    PercpuHash = BPF_MAP_TYPE_PERCPU_HASH, "percpu_hash";
    PercpuArray = BPF_MAP_TYPE_PERCPU_ARRAY, "percpu_array";
    /// Call stacks by id (`bpf_get_stackid`).
    StackTrace = BPF_MAP_TYPE_STACK_TRACE, "stack_trace";
    /// Cgroups by index (`bpf_current_task_under_cgroup`).
    CgroupArray = BPF_MAP_TYPE_CGROUP_ARRAY, "cgroup_array";
    LruHash = BPF_MAP_TYPE_LRU_HASH, "lru_hash";
    LruPercpuHash = BPF_MAP_TYPE_LRU_PERCPU_HASH, "lru_percpu_hash";
    /// Longest-prefix-match trie.
    LpmTrie = BPF_MAP_TYPE_LPM_TRIE, "lpm_trie";
    Queue = BPF_MAP_TYPE_QUEUE, "queue";
    Stack = BPF_MAP_TYPE_STACK, "stack";
    Ringbuf = BPF_MAP_TYPE_RINGBUF, "ringbuf";
    /// A ring user space produces into and programs drain (`bpf_user_ringbuf_drain`).
    UserRingbuf = BPF_MAP_TYPE_USER_RINGBUF, "user_ringbuf";
    /// Bloom filter: pushes set bits, peeks test them.
    BloomFilter = BPF_MAP_TYPE_BLOOM_FILTER, "bloom_filter";
    /// Maps by index: a program's lookup yields the inner map.
    ArrayOfMaps = BPF_MAP_TYPE_ARRAY_OF_MAPS, "array_of_maps";
    /// Maps by key: a program's lookup yields the inner map.
    HashOfMaps = BPF_MAP_TYPE_HASH_OF_MAPS, "hash_of_maps";
}

impl MapType {
    /// `None` for a type bpftime-rs does not implement.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::try_from(raw).ok()
    }

    /// The kernel's number.
    pub fn as_raw(self) -> u32 {
        self as u32
    }

    /// The hash tables: HASH, its per-CPU and LRU variants, and HASH_OF_MAPS (whose 4-byte
    /// values are references to maps).
    pub fn is_hash(self) -> bool {
        matches!(
            self,
            Self::Hash | Self::PercpuHash | Self::LruHash | Self::LruPercpuHash | Self::HashOfMaps
        )
    }

    /// The LRU hashes: inserts into a full map evict instead of failing.
    pub fn is_lru(self) -> bool {
        matches!(self, Self::LruHash | Self::LruPercpuHash)
    }

    /// Values hold one 8-byte-aligned slot per possible CPU.
    pub fn is_percpu(self) -> bool {
        matches!(
            self,
            Self::PercpuHash | Self::PercpuArray | Self::LruPercpuHash
        )
    }

    /// ARRAY and PERCPU_ARRAY (not the program and perf arrays).
    pub fn is_array(self) -> bool {
        matches!(self, Self::Array | Self::PercpuArray)
    }

    /// ARRAY_OF_MAPS and HASH_OF_MAPS: values are references to other maps, each of the shape
    /// the outer map's inner-map template declares.
    pub fn is_map_of_maps(self) -> bool {
        matches!(self, Self::ArrayOfMaps | Self::HashOfMaps)
    }

    /// Queues and stacks have no key: updates push values.
    pub fn is_keyless(self) -> bool {
        matches!(self, Self::Queue | Self::Stack)
    }

    /// Whether a kernel map of this type can hold the same state, reproduced with
    /// `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM`. Rings, perf arrays and program arrays
    /// carry events or program references, not state, and have no mirror.
    /// Stack traces are written only by `bpf_get_stackid` (the kernel refuses updates from
    /// user space), a bloom filter's bits depend on its random seed and cannot be listed, and
    /// a cgroup array holds cgroup references (descriptors), so none of them has a mirror.
    /// An LPM trie's changes are not tracked for the forwarder yet, so it has none either.
    /// Maps of maps hold references to other maps of the object (which are mirrored
    /// themselves), not state.
    pub fn is_mirrorable(self) -> bool {
        !matches!(
            self,
            Self::ProgArray
                | Self::PerfEventArray
                | Self::Ringbuf
                | Self::UserRingbuf
                | Self::StackTrace
                | Self::CgroupArray
                | Self::LpmTrie
                | Self::BloomFilter
                | Self::ArrayOfMaps
                | Self::HashOfMaps
        )
    }
}

impl fmt::Display for MapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialized as bpftool's name, as `bpftool map show --json` prints `"type"`.
impl serde::Serialize for MapType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A `BPF_MAP_TYPE_*` number bpftime-rs does not implement; displays libbpf's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownMapType(pub u32);

impl fmt::Display for UnknownMapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match kernel_name(self.0) {
            Some(name) => write!(f, "map type {} ({name})", self.0),
            None => write!(f, "map type {} (unknown to libbpf)", self.0),
        }
    }
}

impl std::error::Error for UnknownMapType {}

/// libbpf's name for any `BPF_MAP_TYPE_*` number, implemented here or not.
pub fn kernel_name(raw: u32) -> Option<&'static str> {
    // SAFETY: libbpf_bpf_map_type_str takes any value and returns NULL or a pointer into a
    // static table of NUL-terminated strings.
    let ptr = unsafe { libbpf_sys::libbpf_bpf_map_type_str(raw) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL pointers from libbpf's table are 'static C strings.
    unsafe { std::ffi::CStr::from_ptr(ptr) }.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_libbpfs_and_numbers_round_trip() {
        for &t in MapType::ALL {
            assert_eq!(Some(t.name()), kernel_name(t.as_raw()), "{t:?}");
            assert_eq!(MapType::try_from(t.as_raw()), Ok(t));
        }
        assert_eq!(MapType::from_raw(27), Some(MapType::Ringbuf));
        assert_eq!(MapType::try_from(14), Err(UnknownMapType(14)));
        assert_eq!(UnknownMapType(14).to_string(), "map type 14 (devmap)");
        assert_eq!(
            UnknownMapType(9999).to_string(),
            "map type 9999 (unknown to libbpf)"
        );
    }

    #[test]
    fn mirrorable_types_are_the_state_holding_ones() {
        let mirrorable: Vec<_> = MapType::ALL
            .iter()
            .filter(|t| t.is_mirrorable())
            .map(|t| t.name())
            .collect();
        assert_eq!(
            mirrorable,
            [
                "hash",
                "array",
                "percpu_hash",
                "percpu_array",
                "lru_hash",
                "lru_percpu_hash",
                "queue",
                "stack"
            ]
        );
    }
}
