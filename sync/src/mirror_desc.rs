//! Which userspace maps get kernel mirrors, and of what shape.

use bpftime_abi::flags::BPF_F_NO_COMMON_LRU;
use bpftime_kernel_bridge::MirrorDesc;
use bpftime_runtime::maps::{MapDef, MapType};

/// The kernel LRU's per-CPU free-list batch (`LOCAL_FREE_TARGET` in kernel/bpf/bpf_lru_list.h).
const KERNEL_LRU_LOCAL_FREE: u32 = 128;

/// The kernel mirror of a userspace map, if its type has one.
///
/// LRU mirrors get spare capacity: userspace decides evictions (they reach the mirror as
/// deletes), so the kernel's LRU must never evict on its own. It could otherwise: its per-CPU
/// free lists can run dry before the map is full, and an insert can reach it before the delete
/// of the entry it replaced. Twice the entries plus one free-list batch per CPU is room for
/// every live entry and every tombstone userspace can hold at once. `BPF_F_NO_COMMON_LRU` is
/// dropped for the same reason (it splits the kernel map per CPU).
pub fn mirror_desc(def: &MapDef, object: &str) -> Option<MirrorDesc> {
    if !def.map_type.is_mirrorable() {
        return None;
    }
    let (max_entries, flags) = if def.map_type.is_lru() {
        let cpus = bpftime_abi::possible_cpus();
        (
            def.max_entries
                .saturating_mul(2)
                .saturating_add(cpus.saturating_mul(KERNEL_LRU_LOCAL_FREE)),
            def.flags & !BPF_F_NO_COMMON_LRU,
        )
    } else {
        (def.max_entries, def.flags)
    };
    Some(MirrorDesc {
        kind: def.map_type,
        key_size: def.key_size,
        value_size: def.value_size,
        max_entries,
        flags,
        name: def.name.clone(),
        object: object.to_string(),
    })
}

/// A map the selection skipped because it cannot be mirrored, for `load` to report.
#[derive(Debug, Clone)]
pub struct Unmirrorable {
    /// The map's name.
    pub name: String,
    /// bpftool's name of its type.
    pub map_type: &'static str,
}

/// Global data: written by plain stores, so it is compared with what was sent on every pass.
pub(crate) fn is_global_data(def: &MapDef) -> bool {
    def.map_type == MapType::Array && def.name.starts_with('.')
}
