//! Flag values from the generated UAPI, typed as the syscalls and helpers take them.

use libbpf_sys as sys;

// `flags` of BPF_MAP_UPDATE_ELEM and bpf_map_update_elem (a u64 in both).
/// Create or update.
pub const BPF_ANY: u64 = sys::BPF_ANY as u64;
/// Create only.
pub const BPF_NOEXIST: u64 = sys::BPF_NOEXIST as u64;
/// Update only.
pub const BPF_EXIST: u64 = sys::BPF_EXIST as u64;
/// Take the value's bpf_spin_lock (only for maps whose value has one).
pub const BPF_F_LOCK: u64 = sys::BPF_F_LOCK as u64;

// `map_flags` of BPF_MAP_CREATE (a u32).
/// Hash maps allocate on insert instead of up front.
pub const BPF_F_NO_PREALLOC: u32 = sys::BPF_F_NO_PREALLOC;
/// LRU maps keep one LRU list per CPU.
pub const BPF_F_NO_COMMON_LRU: u32 = sys::BPF_F_NO_COMMON_LRU;
/// `numa_node` is valid.
pub const BPF_F_NUMA_NODE: u32 = sys::BPF_F_NUMA_NODE;
/// Programs may only read the map (how libbpf creates `.rodata`).
pub const BPF_F_RDONLY_PROG: u32 = sys::BPF_F_RDONLY_PROG;
/// The map can be mmap()ed (libbpf sets it on global-data arrays).
pub const BPF_F_MMAPABLE: u32 = sys::BPF_F_MMAPABLE;

// `flags` of bpf_ringbuf_submit / discard / output.
/// Do not wake the consumer.
pub const BPF_RB_NO_WAKEUP: u64 = sys::BPF_RB_NO_WAKEUP as u64;
/// Wake the consumer even if it would not be woken otherwise.
pub const BPF_RB_FORCE_WAKEUP: u64 = sys::BPF_RB_FORCE_WAKEUP as u64;

// `flags` of bpf_perf_event_output.
/// The perf array index is the current CPU.
pub const BPF_F_CURRENT_CPU: u64 = sys::BPF_F_CURRENT_CPU;
/// The bits of `flags` that hold a perf array index.
pub const BPF_F_INDEX_MASK: u64 = sys::BPF_F_INDEX_MASK;
