//! BLOOM_FILTER: a bit array set by pushes and tested by peeks, as `kernel/bpf/bloom_filter.c`
//! sizes and hashes it, so a filter answers (false positives included) as the kernel's with
//! the same seed.
//!
//! Bits: `max_entries * nr_hash_funcs / 5 * 7` (7/5 for 1/ln 2) rounded up to a power of two,
//! at least 64; hash `i` of a value is `jhash2` (value_size a multiple of 4) or `jhash` with
//! initval `seed + i`, masked to the bit count. The seed is random per map unless
//! `BPF_F_ZERO_SEED`; it is drawn when the segment is created and kept in the map's control
//! block. Bits are set with atomic ORs: no lock, nothing to repair after a kill.

use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_abi::flags::{
    BPF_F_NUMA_NODE, BPF_F_RDONLY, BPF_F_RDONLY_PROG, BPF_F_WRONLY, BPF_F_WRONLY_PROG,
    BPF_F_ZERO_SEED,
};

use super::layout::*;
use super::typed::typed_map;
use super::{MapError, MapHandle, BPF_ANY};

typed_map!(
    /// A BLOOM_FILTER: `push` adds a value, `peek` tells whether it may have been added.
    BloomFilter,
    BloomFilter,
    "bloom_filter"
);

/// Flags `bloom_map_alloc` accepts.
const CREATE_FLAGS: u32 = BPF_F_NUMA_NODE
    | BPF_F_ZERO_SEED
    | BPF_F_RDONLY
    | BPF_F_WRONLY
    | BPF_F_RDONLY_PROG
    | BPF_F_WRONLY_PROG;

/// The kernel's largest bit array (2^32 bits, when the computed size passes 2^31).
const MAX_BITS: u64 = 1 << 32;
/// The largest bit array laid out in shared memory (128 MiB).
const MAX_SHM_BITS: u64 = 1 << 30;

/// Hash functions (map_extra's low 4 bits; 0 means 5).
fn hash_funcs(def: &super::MapDef) -> u32 {
    match (def.map_extra & 0xf) as u32 {
        0 => 5,
        n => n,
    }
}

/// Bit count of a filter, as `bloom_map_alloc` computes it.
fn bits(def: &super::MapDef) -> u64 {
    let n = def.max_entries.checked_mul(hash_funcs(def));
    match n.and_then(|n| (n / 5).checked_mul(7)) {
        Some(b) if u64::from(b) <= 1 << 31 => u64::from(b).max(64).next_power_of_two(),
        _ => MAX_BITS,
    }
}

/// BLOOM_FILTER definitions, checked as `bloom_map_alloc` does (EINVAL).
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 0 || def.value_size == 0 || def.max_entries == 0 {
        return Err("bloom_filter needs key_size 0, value_size > 0, max_entries > 0".into());
    }
    if def.flags & !CREATE_FLAGS != 0 {
        return Err(format!("bloom_filter flags {:#x} not allowed", def.flags));
    }
    if def.map_extra & !0xf != 0 {
        return Err(format!(
            "bloom_filter map_extra {:#x}: only the low 4 bits (the hash count) may be set",
            def.map_extra
        ));
    }
    if bits(def) > MAX_SHM_BITS {
        return Err(format!(
            "bloom_filter of {} bits ({} entries x {} hashes) is larger than the {} MiB user \
             space lays out",
            bits(def),
            def.max_entries,
            hash_funcs(def),
            (MAX_SHM_BITS / 8) >> 20
        ));
    }
    Ok(())
}

/// Region layout: the bit array, in u64 words. `n_buckets` records the hash count.
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    g.n_buckets = hash_funcs(def);
    g.data_off = round_up(cur, 64);
    g.data_size = bits(def) / 8;
}

/// Seed for a new filter's control block.
pub(super) fn new_seed(def: &super::MapDef) -> u32 {
    if def.flags & BPF_F_ZERO_SEED != 0 {
        return 0;
    }
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id() ^ t
    }
}

impl BloomFilter {
    fn word(&self, bit: u64) -> (&AtomicU64, u64) {
        let off = self.geo.data_off + (bit / 64) * 8;
        // SAFETY: bit <= mask < data_size * 8, so the word lies inside the bit array, which
        // starts 64-byte aligned.
        (
            unsafe { &*(self.at(off) as *const AtomicU64) },
            1 << (bit % 64),
        )
    }

    fn bit_of(&self, value: &[u8], i: u32) -> u64 {
        let seed = self
            .ctl()
            .alloc
            .clock
            .load(Ordering::Relaxed)
            .wrapping_add(i);
        let h = if value.len().is_multiple_of(4) {
            super::jhash::jhash2_bytes(value, seed)
        } else {
            super::jhash::jhash(value, seed)
        };
        u64::from(h) & (self.geo.data_size * 8 - 1)
    }

    /// Kernel `bloom_map_push_elem`: sets the value's bits; `EINVAL` unless `flags` is
    /// `BPF_ANY`.
    pub fn push(&self, value: &[u8], flags: u64) -> Result<(), MapError> {
        if flags != BPF_ANY || value.len() != self.def.value_size as usize {
            return Err(self.err("push", libc::EINVAL));
        }
        for i in 0..self.geo.n_buckets {
            let (w, m) = self.word(self.bit_of(value, i));
            w.fetch_or(m, Ordering::Relaxed);
        }
        self.count(ctr::PUSHES);
        Ok(())
    }

    /// Kernel `bloom_map_peek_elem`: `Ok` when every bit of the value is set (it may have
    /// been pushed), `ENOENT` when one is clear (it was not).
    pub fn peek(&self, value: &[u8]) -> Result<(), MapError> {
        if value.len() != self.def.value_size as usize {
            return Err(self.err("peek", libc::EINVAL));
        }
        for i in 0..self.geo.n_buckets {
            let (w, m) = self.word(self.bit_of(value, i));
            if w.load(Ordering::Relaxed) & m == 0 {
                return Err(self.err("peek", libc::ENOENT));
            }
        }
        Ok(())
    }

    /// Bits set, for listings (`maps` shows a filter by its fill).
    pub fn bits_set(&self) -> u64 {
        (0..self.geo.data_size / 8)
            .map(|i| u64::from(self.word(i * 64).0.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

impl MapHandle {
    /// A bloom filter's seed is drawn once, when its segment is created.
    pub(super) fn bloom_init(&self) {
        self.ctl()
            .alloc
            .clock
            .store(new_seed(&self.def), Ordering::Relaxed);
    }
}
