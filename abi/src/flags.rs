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
/// Syscalls may only read the map.
pub const BPF_F_RDONLY: u32 = sys::BPF_F_RDONLY;
/// Syscalls may only write the map.
pub const BPF_F_WRONLY: u32 = sys::BPF_F_WRONLY;
/// Programs may only write the map.
pub const BPF_F_WRONLY_PROG: u32 = sys::BPF_F_WRONLY_PROG;
/// An inner-map template whose arrays may differ in `max_entries`.
pub const BPF_F_INNER_MAP: u32 = sys::BPF_F_INNER_MAP;
/// A STACK_TRACE map stores build ids and offsets instead of addresses.
pub const BPF_F_STACK_BUILD_ID: u32 = sys::BPF_F_STACK_BUILD_ID;
/// Hash seeds are 0 instead of random (bloom filters, hashes; for tests).
pub const BPF_F_ZERO_SEED: u32 = sys::BPF_F_ZERO_SEED;

// `flags` of bpf_get_stackid / bpf_get_stack (a u64).
/// Frames to skip at the top of the stack.
pub const BPF_F_SKIP_FIELD_MASK: u64 = sys::BPF_F_SKIP_FIELD_MASK as u64;
/// The user stack instead of the kernel stack.
pub const BPF_F_USER_STACK: u64 = sys::BPF_F_USER_STACK as u64;
/// `bpf_get_stackid`: compare stacks by hash only.
pub const BPF_F_FAST_STACK_CMP: u64 = sys::BPF_F_FAST_STACK_CMP as u64;
/// `bpf_get_stackid`: a colliding stack replaces the stored one instead of failing.
pub const BPF_F_REUSE_STACKID: u64 = sys::BPF_F_REUSE_STACKID as u64;
/// `bpf_get_stack`: build ids and offsets instead of addresses.
pub const BPF_F_USER_BUILD_ID: u64 = sys::BPF_F_USER_BUILD_ID as u64;

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

// perf-event ioctl requests (linux/perf_event.h). Function-like `_IO`/`_IOW` macros, which the
// generated bindings cannot carry: computed here with the kernel's encoding
// (`dir << 30 | size << 16 | type << 8 | nr`, type `'$'`), and checked against the values the
// headers give in this module's tests.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | ((b'$' as u64) << 8) | nr
}
/// `PERF_EVENT_IOC_ENABLE` (`_IO('$', 0)`).
pub const PERF_EVENT_IOC_ENABLE: u64 = ioc(0, 0, 0);
/// `PERF_EVENT_IOC_DISABLE` (`_IO('$', 1)`).
pub const PERF_EVENT_IOC_DISABLE: u64 = ioc(0, 1, 0);
/// `PERF_EVENT_IOC_SET_BPF` (`_IOW('$', 8, __u32)`): attach a BPF program to the event.
pub const PERF_EVENT_IOC_SET_BPF: u64 = ioc(1, 8, 4);

#[cfg(test)]
mod tests {
    use super::*;

    /// The values linux/perf_event.h's macros expand to on x86-64.
    #[test]
    fn perf_ioctl_requests_match_the_header() {
        assert_eq!(PERF_EVENT_IOC_ENABLE, 0x2400);
        assert_eq!(PERF_EVENT_IOC_DISABLE, 0x2401);
        assert_eq!(PERF_EVENT_IOC_SET_BPF, 0x4004_2408);
    }
}
