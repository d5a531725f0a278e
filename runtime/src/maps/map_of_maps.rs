//! ARRAY_OF_MAPS and HASH_OF_MAPS: maps whose values are other maps of the same object.
//!
//! The storage is the family's own (an ARRAY_OF_MAPS is an fd array like PROG_ARRAY, a
//! HASH_OF_MAPS a hash with 4-byte values); a value is the index of the stored map in the
//! object's map table, as the kernel's is a `struct bpf_map *` (user space reads a map id).
//! The kernel checks an inserted map against the outer map's template once, at update
//! (`bpf_map_meta_equal`); here the segment is writable by every target, so the check is
//! repeated where a program gets the inner map ([`inner_map`]): a program verified against
//! the template only ever sees a map of that shape.

use bpftime_abi::flags::BPF_F_INNER_MAP;

use super::{MapDef, MapError, MapHandle, MapRef, MapType, BPF_ANY};

/// The shape every map stored in a map of maps has (the kernel's inner-map template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerMapDef {
    /// The inner maps' type.
    pub map_type: MapType,
    /// Their key size.
    pub key_size: u32,
    /// Their value size.
    pub value_size: u32,
    /// Their capacity (compared for arrays only, and not with `BPF_F_INNER_MAP`).
    pub max_entries: u32,
    /// Their `map_flags`.
    pub flags: u32,
}

impl InnerMapDef {
    /// The template of `def`'s shape.
    pub fn of(def: &MapDef) -> Self {
        Self {
            map_type: def.map_type,
            key_size: def.key_size,
            value_size: def.value_size,
            max_entries: def.max_entries,
            flags: def.flags,
        }
    }

    /// Kernel `bpf_map_meta_equal` (and `array_map_meta_equal` for arrays): whether `def` may
    /// be stored in a map of maps with this template.
    pub fn admits(&self, def: &MapDef) -> bool {
        let sized_array = self.map_type.is_array() && self.flags & BPF_F_INNER_MAP == 0;
        def.map_type == self.map_type
            && def.key_size == self.key_size
            && def.value_size == self.value_size
            && def.flags == self.flags
            && (!sized_array || def.max_entries == self.max_entries)
    }

    /// As the segment's map record and the manifest store it: type, key size, value size,
    /// max_entries, flags.
    pub fn to_raw(self) -> [u32; 5] {
        [
            self.map_type.as_raw(),
            self.key_size,
            self.value_size,
            self.max_entries,
            self.flags,
        ]
    }

    /// The template [`to_raw`](Self::to_raw) stored (`None`: all zero, not a map of maps).
    pub fn from_raw(r: [u32; 5]) -> Result<Option<Self>, String> {
        if r == [0; 5] {
            return Ok(None);
        }
        let map_type = MapType::from_raw(r[0])
            .filter(|t| !t.is_map_of_maps())
            .ok_or_else(|| format!("inner-map template of unknown type {}", r[0]))?;
        Ok(Some(Self {
            map_type,
            key_size: r[1],
            value_size: r[2],
            max_entries: r[3],
            flags: r[4],
        }))
    }
}

/// Definition rules beyond the storage family's: a map of maps has a template (of a type
/// that is not a map of maps itself), other maps have none.
pub(super) fn validate(def: &MapDef) -> Result<(), String> {
    match (def.map_type.is_map_of_maps(), def.inner) {
        (true, None) => Err("a map of maps needs an inner-map template".into()),
        (true, Some(t)) if t.map_type.is_map_of_maps() => {
            Err("an inner-map template cannot be a map of maps".into())
        }
        (true, Some(_)) if def.value_size != 4 => {
            Err("a map of maps has 4-byte values (map references)".into())
        }
        (false, Some(_)) => Err(format!(
            "an inner-map template on a {}, which is not a map of maps",
            def.map_type
        )),
        _ => Ok(()),
    }
}

/// The index in `maps` of the map `outer` holds at `key`, as a program's
/// `bpf_map_lookup_elem` on it answers: `None` when the slot is empty, or when what it holds
/// is not a map of the template's shape (a target may write any value into the segment).
pub fn inner_map(maps: &[MapHandle], outer: &MapHandle, key: &[u8]) -> Option<usize> {
    let template = outer.def().inner?;
    if key.len() != outer.def().key_size as usize {
        return None;
    }
    let stored = match outer.typed() {
        MapRef::ProgArray(slots) if outer.map_type() == MapType::ArrayOfMaps => {
            slots.get(u32::from_le_bytes(key.try_into().ok()?))?
        }
        MapRef::Hash(_) if outer.map_type() == MapType::HashOfMaps => {
            let v = outer.lookup_unmarked(key, 0).ok()??;
            // SAFETY: the value is 4 bytes (validated definition) inside the live mapping.
            let bytes = unsafe { std::ptr::read_volatile(v.as_ptr() as *const [u8; 4]) };
            u32::from_le_bytes(bytes)
        }
        _ => return None,
    };
    let index = usize::try_from(stored).ok()?;
    maps.get(index)
        .filter(|m| template.admits(m.def()))
        .map(|_| index)
}

/// Stores map `inner` (an index in `maps`) in `outer` at `key`, as `BPF_MAP_UPDATE_ELEM`
/// with an inner map's descriptor does: `EINVAL` when it is not a map of the template's
/// shape (or `outer` is not a map of maps), the family's errnos otherwise.
pub fn set_inner_map(
    maps: &[MapHandle],
    outer: &MapHandle,
    key: &[u8],
    inner: usize,
    flags: u64,
) -> Result<(), MapError> {
    let fits = outer
        .def()
        .inner
        .zip(maps.get(inner))
        .is_some_and(|(t, m)| t.admits(m.def()));
    let Ok(index) = u32::try_from(inner) else {
        return Err(outer.err("update", libc::EINVAL));
    };
    if !fits || (outer.map_type() == MapType::ArrayOfMaps && flags != BPF_ANY) {
        return Err(outer.err("update", libc::EINVAL));
    }
    outer.update(key, &index.to_le_bytes(), flags)
}
