//! Glue from a parsed object ([`BpfObject`]) to its shared-memory maps, in the map order that
//! the loader's `BPF_PSEUDO_MAP_IDX` relocations use (map index i = `BpfObject::maps[i]`).

use thiserror::Error;

use crate::maps::{set_inner_map, InnerMapDef, MapDef, MapError, MapType, ShmObject, BPF_ANY};
use crate::object::BpfObject;

use super::trace_map_def;

/// An object map that the shared-memory maps cannot hold.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error(
    "object `{object}`: map `{map}` has type {}, which user space does not support",
    bpftime_abi::UnknownMapType(*map_type)
)]
pub struct UnsupportedMap {
    /// The object's name.
    pub object: String,
    /// The map's name.
    pub map: String,
    /// Its `bpf_map_type` number.
    pub map_type: u32,
}

/// The [`MapDef`]s of `obj`'s maps in index order, followed by the trace ring
/// ([`trace_map_def`]) when `with_trace` (its index is then `obj.maps.len()`); the first map
/// user space cannot hold is an error.
pub fn map_defs(obj: &BpfObject, with_trace: bool) -> Result<Vec<MapDef>, UnsupportedMap> {
    let (defs, unsupported) = map_defs_with_placeholders(obj, with_trace);
    match unsupported.into_iter().next() {
        Some((_, m)) => Err(m),
        None => Ok(defs),
    }
}

/// [`map_defs`] that does not stop at a map user space cannot hold: such a map is laid out
/// as an empty one-slot PROG_ARRAY of its name (a placeholder that keeps the other maps'
/// indices, holds nothing and is never mirrored) and returned among the unsupported maps, so
/// that only the programs that use it are refused.
pub fn map_defs_with_placeholders(
    obj: &BpfObject,
    with_trace: bool,
) -> (Vec<MapDef>, Vec<(usize, UnsupportedMap)>) {
    let mut unsupported = Vec::new();
    let mut defs: Vec<MapDef> = obj
        .maps
        .iter()
        .enumerate()
        .map(|(i, m)| match MapType::from_raw(m.map_type) {
            Some(map_type) => MapDef {
                map_type,
                key_size: m.key_size,
                value_size: m.value_size,
                max_entries: m.max_entries,
                flags: m.flags,
                map_extra: m.map_extra,
                name: m.name.clone(),
                inner: m.inner.as_deref().and_then(|t| {
                    Some(InnerMapDef {
                        map_type: MapType::from_raw(t.map_type)?,
                        key_size: t.key_size,
                        value_size: t.value_size,
                        max_entries: t.max_entries,
                        flags: t.flags,
                    })
                }),
                spin_lock: obj
                    .btf
                    .as_deref()
                    .zip(m.btf_value_type_id)
                    .and_then(|(btf, value)| btf.spin_lock_offset(value)),
            },
            None => {
                unsupported.push((
                    i,
                    UnsupportedMap {
                        object: obj.name.clone(),
                        map: m.name.clone(),
                        map_type: m.map_type,
                    },
                ));
                MapDef::new(MapType::ProgArray, 4, 4, 1, m.name.clone())
            }
        })
        .collect();
    if with_trace {
        defs.push(trace_map_def());
    }
    (defs, unsupported)
}

/// Write the initial bytes of `obj`'s global-data maps (`.data`, `.rodata`) and the initial
/// slots of its maps of maps (`.values = { [i] = &map }`) into `shm` (call once, after
/// creating the segment).
pub fn init_global_data(obj: &BpfObject, shm: &ShmObject) -> Result<(), MapError> {
    let maps = shm.maps();
    for (i, m) in obj.maps.iter().enumerate() {
        if let Some(data) = &m.initial_data {
            maps[i].update(&0u32.to_le_bytes(), data, BPF_ANY)?;
        }
        for &(slot, inner) in &m.init_slots {
            set_inner_map(&maps, &maps[i], &slot.to_le_bytes(), inner, BPF_ANY)?;
        }
    }
    Ok(())
}
