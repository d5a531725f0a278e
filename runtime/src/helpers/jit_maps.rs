//! The JIT's map fast paths for a helper set's maps ([`JitMaps`], a [`JitMapResolver`]), and
//! the interning of map sets they are compiled against ([`map_set_id`]).

use std::sync::{Arc, Mutex};

use bpftime_abi::HelperId;

use super::{map_index, neg_map};
use crate::maps::{HashMap, MapError, MapHandle, MapRef};
use crate::vm::jit::{InlineArray, JitCall, JitMap, JitMapResolver};
use crate::vm::{HelperError, HelperFault};

/// Identity of a map set for [`Helpers::map_set_id`](crate::vm::Helpers::map_set_id): equal exactly when the handles name the
/// same maps through the same mappings, in the same order. Ids come from a counter and are
/// never reused; the table is emptied when it grows large (a set interned again then gets a
/// new id, so images compiled against the old one only lose their fast paths).
pub(super) fn map_set_id(maps: &[MapHandle]) -> u64 {
    use std::collections::HashMap;
    struct Table {
        ids: HashMap<Vec<usize>, u64>,
        next: u64,
    }
    static TABLE: Mutex<Option<Table>> = Mutex::new(None);
    let key: Vec<usize> = maps.iter().map(MapHandle::identity).collect();
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let t = guard.get_or_insert_with(|| Table {
        ids: HashMap::new(),
        next: 1,
    });
    if let Some(&id) = t.ids.get(&key) {
        return id;
    }
    if t.ids.len() >= 4096 {
        t.ids.clear();
    }
    let id = t.next;
    t.next += 1;
    t.ids.insert(key, id);
    id
}

/// The JIT's direct entry points into a helper set's maps ([`JitMapResolver`]): lookups,
/// updates and deletes on HASH/ARRAY maps (all variants) skip the helper trampoline, the
/// `dyn Helpers` dispatch and the `CallContext`, and ARRAY lookups are inlined. They do what
/// [`RuntimeHelpers`](super::RuntimeHelpers)'s `bpf_map_*_elem` do on the JIT (the JIT registers no regions and
/// trusts verified pointers; a NULL or wrapping argument fails the same way).
pub struct JitMaps {
    pub(super) maps: Arc<Vec<MapHandle>>,
    pub(super) id: u64,
}

impl JitMapResolver for JitMaps {
    fn map_set_id(&self) -> u64 {
        self.id
    }

    fn resolve(&self, token: u64) -> Option<JitMap> {
        let m = self.maps.get(map_index(token)?)?;
        if m.map_type().is_map_of_maps() {
            // Lookups yield a map, not a value: the generic helper answers.
            return None;
        }
        let (plain_hash, inline_array) = match m.typed() {
            // Plain (not per-CPU) hash maps, the common case, go straight to the hash code
            // (`HashMap::lookup_ptr` / `update_plain`): no CPU lookup, no type dispatch.
            MapRef::Hash(_) => (!m.map_type().is_percpu(), None),
            MapRef::Array(array) => (
                false,
                array.inline_layout().map(|l| InlineArray {
                    values: l.values,
                    stride: l.stride,
                    max_entries: m.def().max_entries,
                    marks: l.marks,
                    mark_bit: l.mark_bit,
                }),
            ),
            // Other types: the generic helper (errors, queue/stack semantics).
            _ => return None,
        };
        Some(JitMap {
            // Points into `self.maps`, which the JIT image keeps alive with this resolver. A
            // hash map's view is the same address (`HashMap` is a transparent `MapHandle`).
            handle: m as *const MapHandle as *const (),
            lookup: Some(if plain_hash {
                jit_hash_lookup
            } else {
                jit_map_lookup
            }),
            update: Some(if plain_hash {
                jit_hash_update
            } else {
                jit_map_update
            }),
            delete: Some(jit_map_delete),
            inline_array,
        })
    }
}

/// `len` bytes of a verified program's memory at `addr` (as `CallContext::read_mem` on the
/// JIT), or the fault the generic helper would report.
///
/// # Safety
/// The program passed the kernel verifier, which checked `[addr, addr+len)` for the call.
unsafe fn jit_arg<'a>(
    helper: HelperId,
    arg: u8,
    addr: u64,
    len: usize,
) -> Result<&'a [u8], HelperFault> {
    if addr == 0 || addr.checked_add(len as u64).is_none() {
        return Err(HelperFault::BadPointer {
            helper,
            arg,
            addr,
            len,
        });
    }
    // SAFETY: see the function contract.
    Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
}

/// Runs a fast map helper on the map handle `map`: panics and faults abort the program as
/// through the trampoline.
///
/// # Safety
/// `map` is a handle from `JitMaps::resolve` (kept alive by the JIT image) and `call` the
/// [`JitCall`] the JIT passed; the JIT only runs verified programs.
#[inline(always)]
unsafe fn jit_map_op<M>(
    call: *mut JitCall,
    map: *const (),
    id: u32,
    f: impl FnOnce(&M) -> Result<u64, HelperFault>,
) -> u64 {
    // SAFETY: the caller's contract: `map` is a handle from `JitMaps::resolve`, and `M` its
    // type or a view of it (views are transparent `MapHandle`s whose type the caller knows).
    let m = unsafe { &*(map as *const M) };
    let error = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(m))) {
        Ok(Ok(v)) => return v,
        Ok(Err(fault)) => fault.into(),
        Err(_) => HelperError::Panicked,
    };
    // SAFETY: the caller's contract.
    unsafe { JitCall::fail(call, id, error) };
    0
}

/// The key argument (r2) of a map helper called from JIT code.
///
/// # Safety
/// As [`jit_arg`].
#[inline(always)]
unsafe fn jit_key<'a>(helper: HelperId, m: &MapHandle, key: u64) -> Result<&'a [u8], HelperFault> {
    // SAFETY: the caller's contract.
    unsafe { jit_arg(helper, 2, key, m.def().key_size as usize) }
}

/// The key and value arguments (r2, r3) of `bpf_map_update_elem` called from JIT code.
///
/// # Safety
/// As [`jit_arg`].
#[inline(always)]
unsafe fn jit_update_args<'a>(
    m: &MapHandle,
    key: u64,
    value: u64,
) -> Result<(&'a [u8], &'a [u8]), HelperFault> {
    const N: HelperId = HelperId::MAP_UPDATE_ELEM;
    // SAFETY: the caller's contract.
    unsafe {
        Ok((
            jit_key(N, m, key)?,
            jit_arg(N, 3, value, m.def().value_size as usize)?,
        ))
    }
}

/// r0 of an update or delete: 0, or the negative errno.
fn status(r: Result<(), MapError>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    }
}

/// `bpf_map_lookup_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_lookup(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: the JIT's call of a fast path (see `jit_map_op`).
    unsafe {
        jit_map_op(call, map, HelperId::MAP_LOOKUP_ELEM.0, |m: &MapHandle| {
            let key = jit_key(HelperId::MAP_LOOKUP_ELEM, m, key)?;
            Ok(match m.lookup(key) {
                Ok(Some(v)) => v.as_ptr() as u64,
                _ => 0,
            })
        })
    }
}

/// [`jit_map_lookup`] for a HASH or LRU_HASH map (`map` is its [`HashMap`] view).
unsafe extern "C" fn jit_hash_lookup(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_LOOKUP_ELEM.0, |m: &HashMap| {
            let key = jit_key(HelperId::MAP_LOOKUP_ELEM, m, key)?;
            Ok(m.lookup_ptr(key).map_or(0, |p| p as u64))
        })
    }
}

/// [`jit_map_update`] for a HASH or LRU_HASH map (`map` is its [`HashMap`] view).
unsafe extern "C" fn jit_hash_update(
    map: *const (),
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_UPDATE_ELEM.0, |m: &HashMap| {
            let (key, value) = jit_update_args(m, key, value)?;
            Ok(status(m.update_plain(key, value, flags)))
        })
    }
}

/// `bpf_map_update_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_update(
    map: *const (),
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_UPDATE_ELEM.0, |m: &MapHandle| {
            let (key, value) = jit_update_args(m, key, value)?;
            Ok(status(m.update(key, value, flags)))
        })
    }
}

/// `bpf_map_delete_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_delete(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_DELETE_ELEM.0, |m: &MapHandle| {
            Ok(status(m.delete(jit_key(
                HelperId::MAP_DELETE_ELEM,
                m,
                key,
            )?)))
        })
    }
}
