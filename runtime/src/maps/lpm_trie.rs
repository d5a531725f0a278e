//! LPM_TRIE: longest-prefix match over `{u32 prefixlen; u8 data[]}` keys, with the kernel's
//! answers (`kernel/bpf/lpm_trie.c`, 6.13 and later).
//!
//! Entries live in a preallocated pool of `max_entries` slots (the kernel allocates nodes;
//! its `BPF_F_NO_PREALLOC` is required and only checked). A lookup scans the pool for the
//! longest stored prefix that covers the key, up to the key's own prefix length: linear in
//! `max_entries`, where the kernel walks a trie (tools keep these maps small: address and
//! port filters). Key iteration follows the kernel's post-order (a prefix's longer prefixes
//! first, 0 bits before 1 bits), so `GET_NEXT_KEY` walks the entries as on the kernel.
//!
//! Writers (update, delete) serialise on the map's lock; each slot's state word carries a
//! generation and is published last, so lookups take no lock: a reader that sees the same
//! live state before and after reading a slot's key read a consistent one. A writer killed
//! mid-write leaves its slot busy: the next holder of the lock frees it.

use std::cmp::Ordering as Cmp;
use std::sync::atomic::{AtomicU32, Ordering};

use bpftime_abi::flags::{
    BPF_F_NO_PREALLOC, BPF_F_NUMA_NODE, BPF_F_RDONLY, BPF_F_RDONLY_PROG, BPF_F_WRONLY,
    BPF_F_WRONLY_PROG,
};

use super::layout::*;
use super::lock::LockGuard;
use super::typed::typed_map;
use super::{Entry, EntryValue, MapError, MapHandle, BPF_EXIST, BPF_NOEXIST};

typed_map!(
    /// An LPM_TRIE: values by longest matching prefix.
    LpmTrie,
    LpmTrie,
    "lpm_trie"
);

const FREE: u32 = 0;
const LIVE: u32 = 1;
const BUSY: u32 = 2;
const STATE: u32 = 3;
const GEN: u32 = 4;

/// Slot header; the key's data bytes (padded to 8) and the value follow.
#[repr(C)]
struct SlotHdr {
    /// Low 2 bits FREE/LIVE/BUSY; the rest a generation bumped on every write.
    state: AtomicU32,
    prefixlen: AtomicU32,
}

const HDR: u64 = std::mem::size_of::<SlotHdr>() as u64;

/// A slot's state word after `s`, in state `to`, with the generation bumped.
fn next_state(s: u32, to: u32) -> u32 {
    (s & !STATE).wrapping_add(GEN) | to
}

/// Flags `trie_alloc` accepts.
const CREATE_FLAGS: u32 = BPF_F_NO_PREALLOC
    | BPF_F_NUMA_NODE
    | BPF_F_RDONLY
    | BPF_F_WRONLY
    | BPF_F_RDONLY_PROG
    | BPF_F_WRONLY_PROG;

/// LPM_TRIE definitions, checked as `trie_alloc` does (EINVAL).
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    if def.flags & BPF_F_NO_PREALLOC == 0 || def.flags & !CREATE_FLAGS != 0 {
        return Err(format!(
            "lpm_trie needs BPF_F_NO_PREALLOC and no other flags but NUMA and access flags \
             (flags {:#x})",
            def.flags
        ));
    }
    if !(5..=260).contains(&def.key_size) || def.value_size == 0 || def.max_entries == 0 {
        return Err(
            "lpm_trie needs key_size 5..=260 (a u32 prefix length and 1..=256 data \
                    bytes), value_size > 0, max_entries > 0"
                .into(),
        );
    }
    if def.max_entries > 1 << 20 {
        return Err(format!(
            "lpm_trie of {} entries: user space scans its entries on every lookup and \
             holds at most 2^20",
            def.max_entries
        ));
    }
    Ok(())
}

/// Region layout: `max_entries` slots of header + data + value.
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    let data = round_up(u64::from(def.key_size - 4), 8);
    g.pool = def.max_entries;
    g.elem_size = (HDR + data + u64::from(g.value_stride)) as u32;
    g.data_off = round_up(cur, 64);
    g.data_size = u64::from(g.pool) * u64::from(g.elem_size);
}

/// Bit `i` of `data`, most significant first (the kernel's `extract_bit`).
fn bit(data: &[u8], i: u32) -> u8 {
    (data[(i / 8) as usize] >> (7 - i % 8)) & 1
}

/// Whether the first `len` bits of `a` and `b` agree.
fn same_prefix(a: &[u8], b: &[u8], len: u32) -> bool {
    let whole = (len / 8) as usize;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = len % 8;
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// The kernel's post-order of trie nodes: a prefix's longer prefixes first; else by the first
/// differing bit, 0 first.
fn post_order(a: (u32, &[u8]), b: (u32, &[u8])) -> Cmp {
    let common = a.0.min(b.0);
    for i in 0..common {
        match bit(a.1, i).cmp(&bit(b.1, i)) {
            Cmp::Equal => continue,
            other => return other,
        }
    }
    b.0.cmp(&a.0)
}

/// A live entry: slot index, prefix length and data bytes.
type Stored = (u32, u32, Vec<u8>);

impl LpmTrie {
    fn data_len(&self) -> usize {
        (self.def.key_size - 4) as usize
    }

    fn max_prefixlen(&self) -> u32 {
        (self.def.key_size - 4) * 8
    }

    fn slot(&self, i: u32) -> (&SlotHdr, *mut u8, *mut u8) {
        let off = self.geo.data_off + u64::from(i) * u64::from(self.geo.elem_size);
        let p = self.at(off);
        let data = round_up(u64::from(self.def.key_size - 4), 8) as usize;
        // SAFETY: i < pool (callers iterate 0..pool), so the slot lies inside the region;
        // slots are 8-byte aligned.
        unsafe {
            (
                &*(p as *const SlotHdr),
                p.add(HDR as usize),
                p.add(HDR as usize + data),
            )
        }
    }

    /// The key of slot `i` when it is live, was read consistently and has a prefix length
    /// the key can hold: the segment is writable by targets, and ordering and matching index
    /// the key's bits up to that length, so a slot claiming more is not an entry.
    fn read_key(&self, i: u32) -> Option<(u32, Vec<u8>)> {
        let (h, data, _) = self.slot(i);
        let s1 = h.state.load(Ordering::Acquire);
        if s1 & STATE != LIVE {
            return None;
        }
        let len = h.prefixlen.load(Ordering::Relaxed);
        if len > self.max_prefixlen() {
            return None;
        }
        let mut bytes = vec![0u8; self.data_len()];
        for (j, b) in bytes.iter_mut().enumerate() {
            // SAFETY: j < data_len: inside the slot's key bytes.
            *b = unsafe { std::ptr::read_volatile(data.add(j)) };
        }
        std::sync::atomic::fence(Ordering::Acquire);
        (h.state.load(Ordering::Relaxed) == s1).then_some((len, bytes))
    }

    fn live(&self) -> Vec<Stored> {
        (0..self.geo.pool)
            .filter_map(|i| self.read_key(i).map(|(l, d)| (i, l, d)))
            .collect()
    }

    fn split(&self, key: &[u8]) -> (u32, Vec<u8>) {
        let len = u32::from_le_bytes(key[..4].try_into().expect("key_size >= 5"));
        (len, key[4..].to_vec())
    }

    fn exact(&self, len: u32, data: &[u8]) -> Option<u32> {
        self.live()
            .into_iter()
            .find(|(_, l, d)| *l == len && same_prefix(d, data, len))
            .map(|(i, _, _)| i)
    }

    /// Kernel `trie_lookup_elem`: the slot of the longest stored prefix covering `key`
    /// (at most the key's own prefix length); `None` when none does.
    pub(super) fn find(&self, key: &[u8]) -> Option<u32> {
        let (len, data) = self.split(key);
        if len > self.max_prefixlen() {
            return None;
        }
        self.live()
            .into_iter()
            .filter(|(_, l, d)| *l <= len && same_prefix(d, &data, *l))
            .max_by_key(|(_, l, _)| *l)
            .map(|(i, _, _)| i)
    }

    /// The value pointer of slot `i`.
    pub(super) fn value_ptr(&self, i: u32) -> *mut u8 {
        self.slot(i).2
    }

    fn lock(&self, op: &'static str) -> Result<LockGuard<'_>, MapError> {
        self.map_lock(op, |_| self.repair())
    }

    /// After a writer died holding the lock: free the slot it was writing and recount.
    fn repair(&self) {
        let mut count = 0;
        for i in 0..self.geo.pool {
            let (h, _, _) = self.slot(i);
            let s = h.state.load(Ordering::Relaxed);
            match s & STATE {
                BUSY => {
                    h.state.store(next_state(s, FREE), Ordering::Release);
                    self.count(ctr::REPAIRS);
                }
                LIVE => count += 1,
                _ => {}
            }
        }
        self.ctl().alloc.count.store(count, Ordering::Relaxed);
    }

    /// Kernel `trie_update_elem`: replaces the value of the same prefix (`EEXIST` with
    /// `BPF_NOEXIST`), or adds the prefix (`ENOENT` with `BPF_EXIST`, `ENOSPC` when full);
    /// `EINVAL` for other flags or a prefix longer than the data.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        if flags > BPF_EXIST {
            return Err(self.err("update", libc::EINVAL));
        }
        let (len, data) = self.split(key);
        if len > self.max_prefixlen() {
            return Err(self.err("update", libc::EINVAL));
        }
        let _g = self.lock("update")?;
        let a = &self.ctl().alloc;
        let slot = match self.exact(len, &data) {
            Some(_) if flags == BPF_NOEXIST => return Err(self.err("update", libc::EEXIST)),
            Some(i) => i,
            None if flags == BPF_EXIST => return Err(self.err("update", libc::ENOENT)),
            None => {
                if a.count.load(Ordering::Relaxed) >= self.def.max_entries {
                    self.count(ctr::FULL);
                    return Err(self.err("update", libc::ENOSPC));
                }
                let free = (0..self.geo.pool)
                    .find(|&i| self.slot(i).0.state.load(Ordering::Relaxed) & STATE == FREE);
                let Some(i) = free else {
                    return Err(self.err("update", libc::ENOSPC));
                };
                a.count.fetch_add(1, Ordering::Relaxed);
                i
            }
        };
        let (h, dst_key, dst_value) = self.slot(slot);
        let s = h.state.load(Ordering::Relaxed);
        let busy = next_state(s, BUSY);
        h.state.store(busy, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        h.prefixlen.store(len, Ordering::Relaxed);
        // SAFETY: the slot's key bytes hold data_len bytes and its value value_size bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst_key, data.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), dst_value, value.len());
        }
        h.state.store(next_state(busy, LIVE), Ordering::Release);
        Ok(())
    }

    /// Kernel `trie_delete_elem`: removes exactly this prefix; `ENOENT` when it is not
    /// stored, `EINVAL` for a prefix longer than the data.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        let (len, data) = self.split(key);
        if len > self.max_prefixlen() {
            return Err(self.err("delete", libc::EINVAL));
        }
        let _g = self.lock("delete")?;
        let Some(i) = self.exact(len, &data) else {
            return Err(self.err("delete", libc::ENOENT));
        };
        let h = self.slot(i).0;
        let s = h.state.load(Ordering::Relaxed);
        h.state.store(next_state(s, FREE), Ordering::Release);
        self.ctl().alloc.count.fetch_sub(1, Ordering::Relaxed);
        self.count(ctr::DELETES);
        Ok(())
    }

    /// Live entries in the kernel's iteration (post-)order.
    fn ordered(&self) -> Vec<Stored> {
        let mut live = self.live();
        live.sort_by(|a, b| post_order((a.1, &a.2), (b.1, &b.2)));
        live
    }

    fn key_bytes(len: u32, data: &[u8]) -> Vec<u8> {
        let mut k = len.to_le_bytes().to_vec();
        k.extend_from_slice(data);
        k
    }

    /// Kernel `trie_get_next_key`: the first entry without a key, for a key that is not
    /// stored exactly, or with a prefix length beyond the data; else the entry after it;
    /// `None` at the end (or when empty).
    pub fn next_key(&self, key: Option<&[u8]>) -> Option<Vec<u8>> {
        let ordered = self.ordered();
        let at = key.and_then(|k| {
            let (len, data) = self.split(k);
            (len <= self.max_prefixlen())
                .then(|| {
                    ordered
                        .iter()
                        .position(|(_, l, d)| *l == len && same_prefix(d, &data, len))
                })
                .flatten()
        });
        let next = match at {
            Some(i) => ordered.get(i + 1),
            None => ordered.first(),
        };
        next.map(|(_, l, d)| Self::key_bytes(*l, d))
    }

    /// Test hook: a writer killed mid-update: takes the map's lock, claims a free slot for
    /// `key` (counted) and leaves it busy, returning with the lock held.
    #[doc(hidden)]
    pub fn debug_stop_mid_update(&self, key: &[u8]) {
        let _ = self.ctl().alloc.lock.lock();
        let Some(i) = (0..self.geo.pool)
            .find(|&i| self.slot(i).0.state.load(Ordering::Relaxed) & STATE == FREE)
        else {
            return;
        };
        self.ctl().alloc.count.fetch_add(1, Ordering::Relaxed);
        let (h, _, _) = self.slot(i);
        let s = h.state.load(Ordering::Relaxed);
        h.state.store(next_state(s, BUSY), Ordering::Relaxed);
        h.prefixlen.store(self.split(key).0, Ordering::Relaxed);
    }

    /// Test hook: what a hostile target with the segment mapped can do: overwrite the prefix
    /// length of the live entry stored for `key`.
    #[doc(hidden)]
    pub fn debug_overwrite_prefixlen(&self, key: &[u8], prefixlen: u32) {
        let (len, data) = self.split(key);
        if let Some(i) = self.exact(len, &data) {
            self.slot(i).0.prefixlen.store(prefixlen, Ordering::Relaxed);
        }
    }

    /// Stored prefixes.
    pub fn prefixes(&self) -> usize {
        self.ctl().alloc.count.load(Ordering::Relaxed) as usize
    }
}

impl MapHandle {
    pub(super) fn lpm_entries(&self, m: &LpmTrie) -> Vec<Entry> {
        let vs = self.def.value_size as usize;
        m.ordered()
            .into_iter()
            .map(|(i, l, d)| {
                let mut v = vec![0u8; vs];
                // SAFETY: the slot's value holds value_size bytes.
                unsafe { std::ptr::copy_nonoverlapping(m.value_ptr(i), v.as_mut_ptr(), vs) };
                Entry {
                    key: LpmTrie::key_bytes(l, &d),
                    value: EntryValue::Single(v),
                }
            })
            .collect()
    }
}
