//! ARRAY, PERCPU_ARRAY and PROG_ARRAY: fixed slots, so lookups are pure index arithmetic.

use std::sync::atomic::{AtomicU32, Ordering};

use super::layout::*;
use super::typed::typed_map;
use super::{
    Entry, EntryValue, MapError, MapHandle, MapType, BPF_ANY, BPF_EXIST, BPF_F_LOCK, BPF_NOEXIST,
};

typed_map!(
    /// An ARRAY or PERCPU_ARRAY: every index exists, lookups are index arithmetic.
    ArrayMap,
    Array,
    "array"
);

typed_map!(
    /// A PROG_ARRAY: program indices for `bpf_tail_call`.
    ProgArray,
    ProgArray,
    "prog_array"
);

/// What the JIT needs to inline an ARRAY lookup (see [`ArrayMap::inline_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlineArrayLayout {
    /// Address of value 0.
    pub values: *mut u8,
    /// Bytes from one value to the next (value_size rounded up to 8).
    pub stride: u32,
    /// One `u32` mark word per index.
    pub marks: *const u32,
    /// The bit a lookup sets in the mark word.
    pub mark_bit: u32,
}

/// ARRAY / PERCPU_ARRAY definitions: 4-byte keys (the index).
pub(super) fn validate_array(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 4 || def.value_size == 0 || def.max_entries == 0 {
        return Err("arrays need key_size 4, value_size > 0, max_entries > 0".into());
    }
    Ok(())
}

/// PROG_ARRAY definitions: 4-byte keys and values (program indices).
pub(super) fn validate_prog_array(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 4 || def.value_size != 4 {
        return Err("prog_array needs key_size 4 and value_size 4".into());
    }
    if def.max_entries == 0 {
        return Err("max_entries must be > 0".into());
    }
    Ok(())
}

/// Region layout after the control block at `cur`: mark words, change summary, values. The
/// values of a `BPF_F_MMAPABLE` array start on a page, so a loader can `mmap` them as it does
/// the kernel's (`array_map_mmap`; skeletons map `.bss` and `.data` so).
pub(super) fn plan_array(g: &mut Geometry, def: &super::MapDef, mut cur: u64, pg: u64) {
    let m = u64::from(def.max_entries);
    g.marks_off = cur;
    cur += m * 4;
    cur = round_up(cur, 64);
    g.summary_off = cur;
    g.summary_words = summary_words(m) as u32;
    cur += u64::from(g.summary_words) * 8;
    cur = round_up(cur, 64);
    if def.flags & bpftime_abi::flags::BPF_F_MMAPABLE != 0 {
        cur = round_up(cur, pg);
    }
    g.data_off = cur;
    g.data_size = m * u64::from(g.value_stride) * u64::from(g.nslots);
}

/// Region layout: one `u32` program slot per entry.
pub(super) fn plan_prog_array(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    g.data_off = cur;
    g.data_size = u64::from(def.max_entries) * 4;
}

impl ArrayMap {
    /// For the JIT's inline ARRAY lookups (`vm::jit::InlineArray`): inline code must keep
    /// [`MapHandle::lookup`]'s semantics: bounds check, then the mark test (a plain load of
    /// the index's mark word; when `mark_bit` is missing it must call the real lookup, which
    /// sets the mark and the summary bits). `None` for per-CPU arrays.
    pub fn inline_layout(&self) -> Option<InlineArrayLayout> {
        if self.def.map_type != MapType::Array {
            return None;
        }
        let g = &self.geo;
        if g.nslots != 1 {
            return None;
        }
        Some(InlineArrayLayout {
            values: self.array_slot_ptr(0, 0),
            stride: g.value_stride,
            marks: self.at(g.marks_off) as *const u32,
            mark_bit: MARK_LOOKUP,
        })
    }
}

impl ProgArray {
    /// The program index stored at `idx` (what `bpf_tail_call` jumps to).
    #[inline]
    pub fn get(&self, idx: u32) -> Option<u32> {
        self.prog_array_value(idx)
    }
}

impl MapHandle {
    #[inline]
    fn array_slot_ptr(&self, idx: u32, cpu: u32) -> *mut u8 {
        let g = &self.geo;
        self.at(g.data_off
            + (u64::from(idx) * u64::from(g.nslots) + u64::from(cpu)) * u64::from(g.value_stride))
    }

    #[inline]
    pub(super) fn array_ptr(&self, idx: u32, cpu: u32) -> *mut u8 {
        self.array_slot_ptr(idx, cpu)
    }

    #[inline]
    fn index_of(key: &[u8]) -> u32 {
        u32::from_le_bytes(key.try_into().expect("array keys are 4 bytes"))
    }

    #[inline]
    pub(super) fn array_lookup(&self, key: &[u8], cpu: u32) -> Option<*mut u8> {
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return None;
        }
        self.mark_soft(idx, self.mark_word(idx), MARK_LOOKUP);
        Some(self.array_slot_ptr(idx, cpu))
    }

    pub(super) fn array_value_at(&self, idx: u32) -> EntryValue {
        let g = &self.geo;
        let vs = g.value_size as usize;
        let read = |c: u32| {
            let mut v = vec![0u8; vs];
            // SAFETY: idx < max_entries, c < nslots: inside the data area.
            unsafe {
                std::ptr::copy_nonoverlapping(self.array_slot_ptr(idx, c), v.as_mut_ptr(), vs)
            };
            g.clear_spin_lock(&mut v);
            v
        };
        if self.def.map_type.is_percpu() {
            EntryValue::PerCpu((0..g.nslots).map(read).collect())
        } else {
            EntryValue::Single(read(0))
        }
    }

    pub(super) fn array_get(&self, key: &[u8]) -> Option<EntryValue> {
        let idx = Self::index_of(key);
        (idx < self.def.max_entries).then(|| self.array_value_at(idx))
    }

    pub(super) fn array_update(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
    ) -> Result<(), MapError> {
        let locked = self.check_lock_flag("update", flags)?;
        let flags = flags & !BPF_F_LOCK;
        if flags > BPF_EXIST {
            return Err(self.err("update", libc::EINVAL));
        }
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return Err(self.err("update", libc::E2BIG));
        }
        // Every index of an array exists.
        if flags == BPF_NOEXIST {
            return Err(self.err("update", libc::EEXIST));
        }
        // SAFETY: idx in range, and every slot of an index is a value of value_size bytes;
        // the callers checked cpu and value's length.
        let store =
            || unsafe { store_slots(&self.geo, value, cpu, |c| self.array_slot_ptr(idx, c)) };
        if locked {
            // SAFETY: a live value of this map, which has a spin lock.
            unsafe {
                self.geo
                    .with_value_locked(self.array_slot_ptr(idx, 0), store)
            };
        } else {
            store();
        }
        self.mark_hard(idx, self.mark_word(idx), MARK_CHANGED);
        Ok(())
    }

    pub(super) fn array_entries(&self) -> Vec<Entry> {
        (0..self.def.max_entries)
            .map(|i| Entry {
                key: i.to_le_bytes().to_vec(),
                value: self.array_value_at(i),
            })
            .collect()
    }

    /// The program index at `idx` of a PROG_ARRAY's data, `None` beyond it or when unset.
    pub(super) fn prog_array_value(&self, idx: u32) -> Option<u32> {
        if idx >= self.def.max_entries {
            return None;
        }
        match self.prog_slot(idx).load(Ordering::Acquire) {
            0 => None,
            v => Some(v - 1),
        }
    }

    #[inline]
    fn prog_slot(&self, idx: u32) -> &AtomicU32 {
        // SAFETY: callers check idx < max_entries; data area holds max_entries u32s.
        unsafe { &*(self.at(self.geo.data_off) as *const AtomicU32).add(idx as usize) }
    }

    pub(super) fn prog_array_update(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
    ) -> Result<(), MapError> {
        // The kernel's fd arrays accept only BPF_ANY.
        if flags != BPF_ANY {
            return Err(self.err("update", libc::EINVAL));
        }
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return Err(self.err("update", libc::E2BIG));
        }
        let prog = u32::from_le_bytes(
            value
                .try_into()
                .map_err(|_| self.err("update", libc::EINVAL))?,
        );
        if prog == u32::MAX {
            return Err(self.err("update", libc::EINVAL));
        }
        self.prog_slot(idx).store(prog + 1, Ordering::Release);
        Ok(())
    }

    pub(super) fn prog_array_delete(&self, key: &[u8]) -> Result<(), MapError> {
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return Err(self.err("delete", libc::EINVAL));
        }
        if self.prog_slot(idx).swap(0, Ordering::AcqRel) == 0 {
            return Err(self.err("delete", libc::ENOENT));
        }
        Ok(())
    }

    pub(super) fn prog_array_entries(&self) -> Vec<Entry> {
        (0..self.def.max_entries)
            .filter_map(|i| {
                self.prog_array_value(i).map(|p| Entry {
                    key: i.to_le_bytes().to_vec(),
                    value: EntryValue::Single(p.to_le_bytes().to_vec()),
                })
            })
            .collect()
    }
}
