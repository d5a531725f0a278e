//! ARRAY, PERCPU_ARRAY and PROG_ARRAY: fixed slots, so lookups are pure index arithmetic.

use std::sync::atomic::{AtomicU32, Ordering};

use super::layout::*;
use super::{Entry, EntryValue, MapError, MapHandle, BPF_ANY, BPF_EXIST, BPF_NOEXIST};

impl MapHandle {
    #[inline]
    fn array_slot_ptr(&self, idx: u32, cpu: u32) -> *mut u8 {
        let g = &self.geo;
        self.at(g.data_off
            + (u64::from(idx) * u64::from(g.nslots) + u64::from(cpu)) * u64::from(g.value_stride))
    }

    #[inline]
    pub(crate) fn array_ptr(&self, idx: u32, cpu: u32) -> *mut u8 {
        self.array_slot_ptr(idx, cpu)
    }

    #[inline]
    fn index_of(key: &[u8]) -> u32 {
        u32::from_le_bytes(key.try_into().expect("array keys are 4 bytes"))
    }

    /// For the JIT's inline ARRAY lookups (`crate::helpers`, `vm::jit::InlineArray`): the
    /// address of value 0, the value stride, and the mark words (`u32` per index). Inline code
    /// must keep [`array_lookup`](Self::array_lookup)'s semantics: bounds check, then the
    /// `mark_soft` test (a plain load of the index's mark word; when `MARK_LOOKUP` is missing it
    /// must call the real lookup, which sets the mark and the summary bits). `None` for per-CPU
    /// and non-array maps.
    pub(crate) fn inline_array_layout(&self) -> Option<(*mut u8, u32, *const u32, u32)> {
        if self.def.map_type != super::MapType::Array {
            return None;
        }
        let g = &self.geo;
        if g.nslots != 1 {
            return None;
        }
        Some((
            self.array_slot_ptr(0, 0),
            g.value_stride,
            self.at(g.marks_off) as *const u32,
            MARK_LOOKUP,
        ))
    }

    #[inline]
    pub(crate) fn array_lookup(&self, key: &[u8], cpu: u32) -> Option<*mut u8> {
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return None;
        }
        self.mark_soft(idx, self.mark_word(idx), MARK_LOOKUP);
        Some(self.array_slot_ptr(idx, cpu))
    }

    pub(crate) fn array_value_at(&self, idx: u32) -> EntryValue {
        let g = &self.geo;
        let vs = g.value_size as usize;
        let read = |c: u32| {
            let mut v = vec![0u8; vs];
            // SAFETY: idx < max_entries, c < nslots: inside the data area.
            unsafe {
                std::ptr::copy_nonoverlapping(self.array_slot_ptr(idx, c), v.as_mut_ptr(), vs)
            };
            v
        };
        if self.def.map_type.is_percpu() {
            EntryValue::PerCpu((0..g.nslots).map(read).collect())
        } else {
            EntryValue::Single(read(0))
        }
    }

    pub(crate) fn array_get(&self, key: &[u8]) -> Option<EntryValue> {
        let idx = Self::index_of(key);
        (idx < self.def.max_entries).then(|| self.array_value_at(idx))
    }

    pub(crate) fn array_update(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
    ) -> Result<(), MapError> {
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
        unsafe { store_slots(&self.geo, value, cpu, |c| self.array_slot_ptr(idx, c)) };
        self.mark_hard(idx, self.mark_word(idx), MARK_CHANGED);
        Ok(())
    }

    pub(crate) fn array_entries(&self) -> Vec<Entry> {
        (0..self.def.max_entries)
            .map(|i| Entry {
                key: i.to_le_bytes().to_vec(),
                value: self.array_value_at(i),
            })
            .collect()
    }

    #[inline]
    fn prog_slot(&self, idx: u32) -> &AtomicU32 {
        // SAFETY: callers check idx < max_entries; data area holds max_entries u32s.
        unsafe { &*(self.at(self.geo.data_off) as *const AtomicU32).add(idx as usize) }
    }

    /// The program index stored at `idx` of a PROG_ARRAY (what `bpf_tail_call` jumps to).
    #[inline]
    pub fn prog_array_get(&self, idx: u32) -> Option<u32> {
        if self.def.map_type != super::MapType::ProgArray || idx >= self.def.max_entries {
            return None;
        }
        match self.prog_slot(idx).load(Ordering::Acquire) {
            0 => None,
            v => Some(v - 1),
        }
    }

    pub(crate) fn prog_array_update(
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

    pub(crate) fn prog_array_delete(&self, key: &[u8]) -> Result<(), MapError> {
        let idx = Self::index_of(key);
        if idx >= self.def.max_entries {
            return Err(self.err("delete", libc::EINVAL));
        }
        if self.prog_slot(idx).swap(0, Ordering::AcqRel) == 0 {
            return Err(self.err("delete", libc::ENOENT));
        }
        Ok(())
    }

    pub(crate) fn prog_array_entries(&self) -> Vec<Entry> {
        (0..self.def.max_entries)
            .filter_map(|i| {
                self.prog_array_get(i).map(|p| Entry {
                    key: i.to_le_bytes().to_vec(),
                    value: EntryValue::Single(p.to_le_bytes().to_vec()),
                })
            })
            .collect()
    }
}
