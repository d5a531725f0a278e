//! Change tracking for the sync forwarder.
//!
//! Every entry has a mark word. Marks are set by update and delete (`MARK_CHANGED`, one
//! `fetch_or`) and by every lookup that hands out a value pointer (`MARK_LOOKUP`, a relaxed load
//! and, only when the bit is not yet set, a `fetch_or`): no waiting, no allocation, and in the
//! steady state (entry already marked, forwarder not yet there) just one load of a cache line
//! the lookup touches anyway. A two-level summary (one bit per 64 entries, then a map-wide dirty
//! flag) lets the forwarder skip unchanged parts without scanning every entry.
//!
//! Protocol for the forwarder: [`MapHandle::drain_changes`] clears each mark *before* reading
//! the entry's current key and value, so a write that lands after the read marks again. A
//! lookup mark is set before the program writes through the pointer, so an entry reported
//! with [`ChangeKind::pointer_handed_out`] should be read once more on a later pass
//! ([`MapHandle::read_slot`]) after the programs' run time has passed. Deleted hash entries stay
//! as tombstones (invisible to lookups) until [`MapHandle::ack_deleted`]; enable that with
//! [`MapHandle::set_track_deletes`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::layout::*;
use super::{EntryValue, MapHandle, MapType};

/// What the marks said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeKind(pub u32);

impl ChangeKind {
    /// Updated or deleted through the map API.
    pub fn changed(self) -> bool {
        self.0 & MARK_CHANGED != 0
    }

    /// A lookup handed out a value pointer: the value may still change without a new mark.
    pub fn pointer_handed_out(self) -> bool {
        self.0 & MARK_LOOKUP != 0
    }
}

/// A marked entry as the forwarder reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Element slot (hash) or index (array): pass back to `read_slot` / `ack_deleted`.
    pub slot: u32,
    /// Element generation, to acknowledge exactly this tombstone.
    pub generation: u32,
    /// Which marks the entry had (update/delete, handed-out pointer).
    pub kind: ChangeKind,
    /// The entry's key (for arrays the index, little-endian).
    pub key: Vec<u8>,
    /// Current value; `None` when the entry is deleted (a tombstone).
    pub value: Option<EntryValue>,
}

/// A marked entry, borrowed from the caller's buffer (see
/// [`MapHandle::drain_changes_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawChange<'a> {
    /// Element slot (hash) or index (array), as [`Change::slot`].
    pub slot: u32,
    /// Element generation, as [`Change::generation`].
    pub generation: u32,
    /// Which marks the entry had.
    pub kind: ChangeKind,
    /// The entry's key (for arrays the index, little-endian).
    pub key: &'a [u8],
    /// The current value, [`MapHandle::raw_value_len`] bytes: per-CPU maps give every CPU's
    /// value, each padded to 8 bytes (the layout of BPF_MAP_UPDATE_ELEM for per-CPU maps).
    /// `None` for a deleted entry (a tombstone).
    pub value: Option<&'a [u8]>,
}

impl MapHandle {
    /// Length of a [`RawChange`] value.
    pub fn raw_value_len(&self) -> usize {
        let g = &self.geo;
        if self.def.map_type.is_percpu() {
            g.value_stride as usize * g.nslots as usize
        } else {
            g.value_size as usize
        }
    }

    /// The current state of one slot, read into `buf` (`None` for a free hash element, or one
    /// that writers kept changing while it was read).
    pub fn read_slot_raw<'b>(&self, slot: u32, buf: &'b mut Vec<u8>) -> Option<RawChange<'b>> {
        let t = self.def.map_type;
        let ks = self.def.key_size as usize;
        let vlen = self.raw_value_len();
        buf.clear();
        buf.reserve(ks + vlen);
        // Appends `n` bytes read from shared memory at `src` (writers may change them meanwhile:
        // the hash path validates with the element state; arrays give a racy copy, as the
        // kernel's syscall lookup does).
        let append = |buf: &mut Vec<u8>, src: *const u8, n: usize| {
            let len = buf.len();
            // SAFETY: capacity for ks + vlen was reserved above and len + n stays within it
            // (key then value); `src` points at n readable bytes of the live mapping (callers
            // pass key/value areas of a slot below the pool or max_entries).
            unsafe {
                std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr().add(len), n);
                buf.set_len(len + n);
            }
        };
        let generation;
        let live;
        if t.is_hash() {
            if slot >= self.geo.pool {
                return None;
            }
            let e = self.elem(slot);
            let mut read = None;
            for _ in 0..16 {
                let st = e.state.load(Ordering::Acquire);
                let is_live = match st & STATE_MASK {
                    ELEM_LIVE => true,
                    ELEM_TOMB => false,
                    _ => return None,
                };
                buf.clear();
                append(buf, self.elem_ptr(slot).wrapping_add(16), ks);
                if is_live {
                    append(buf, self.hash_val_ptr(slot, 0), vlen);
                }
                std::sync::atomic::fence(Ordering::Acquire);
                if e.state.load(Ordering::Relaxed) == st {
                    read = Some((st >> 2, is_live));
                    break;
                }
            }
            (generation, live) = read?;
        } else if t.is_array() {
            if slot >= self.def.max_entries {
                return None;
            }
            buf.extend_from_slice(&slot.to_le_bytes());
            append(buf, self.array_ptr(slot, 0), vlen);
            (generation, live) = (0, true);
        } else {
            return None;
        }
        let (key, value) = buf.split_at(ks);
        Some(RawChange {
            slot,
            generation,
            kind: ChangeKind(0),
            key,
            value: live.then_some(value),
        })
    }

    /// Slots a full scan must visit ([`read_slot_raw`](Self::read_slot_raw) of each gives
    /// every entry): the allocated part of a hash pool, every index of an array.
    pub fn scan_bound(&self) -> u32 {
        self.slot_count()
    }

    #[inline]
    pub(crate) fn summary_word(&self, slot: u32) -> &AtomicU64 {
        let g = &self.geo;
        let w = (slot / 4096) as usize;
        debug_assert!(w < g.summary_words as usize);
        // SAFETY: summary_off..+summary_words*8 lies in this map's region; w is in range for
        // any valid slot.
        unsafe { &*(self.at(g.summary_off) as *const AtomicU64).add(w) }
    }

    #[inline]
    pub(crate) fn mark_word(&self, slot: u32) -> &AtomicU32 {
        let g = &self.geo;
        if MapType::from_raw(g.map_type).is_some_and(|t| t.is_hash()) {
            &self.elem(slot).mark
        } else {
            // SAFETY: marks_off..+max_entries*4 lies in this map's region; callers pass
            // slot < max_entries.
            unsafe { &*(self.at(g.marks_off) as *const AtomicU32).add(slot as usize) }
        }
    }

    /// Sets `bits` on a mark word; cheap when they are already set. SeqCst load (a plain
    /// load on x86): after a write made visible by a full barrier (update's unlock), seeing
    /// the mark still set means the forwarder's clear comes later and its read sees the write.
    #[inline]
    pub(crate) fn mark_soft(&self, slot: u32, w: &AtomicU32, bits: u32) {
        if w.load(Ordering::SeqCst) & bits != bits {
            self.mark_slow(slot, w, bits);
        }
    }

    /// Always publishes (used after a write, where the forwarder must see the new value).
    #[inline]
    pub(crate) fn mark_hard(&self, slot: u32, w: &AtomicU32, bits: u32) {
        self.mark_slow(slot, w, bits);
    }

    #[cold]
    fn mark_slow(&self, slot: u32, w: &AtomicU32, bits: u32) {
        // SeqCst RMWs on both levels: with the forwarder's swaps in the other order, one of the
        // two sides always sees the other's write (no mark is ever stranded below a clear
        // summary bit).
        w.fetch_or(bits, Ordering::SeqCst);
        if bits & MARKS == 0 {
            return;
        }
        let s = self.summary_word(slot);
        let bit = 1u64 << ((slot / 64) % 64);
        if s.load(Ordering::SeqCst) & bit == 0 {
            s.fetch_or(bit, Ordering::SeqCst);
        }
        let d = &self.ctl().dirty.dirty;
        if d.load(Ordering::SeqCst) == 0 {
            d.fetch_or(1, Ordering::SeqCst);
        }
    }

    /// Explicitly marks an entry changed (e.g. after a CLI write through a [`super::ValuePtr`]).
    pub fn mark_changed(&self, key: &[u8]) -> bool {
        let t = self.def.map_type;
        let slot = if t.is_hash() {
            self.hash_find_slot(key)
        } else if t.is_array() && key.len() == 4 {
            let i = u32::from_le_bytes(key.try_into().expect("len 4"));
            (i < self.def.max_entries).then_some(i)
        } else {
            None
        };
        match slot {
            Some(s) => {
                self.mark_hard(s, self.mark_word(s), MARK_CHANGED);
                true
            }
            None => false,
        }
    }

    /// Whether `slot` carries a change mark now (the next drain reports it).
    pub fn is_marked(&self, slot: u32) -> bool {
        slot < self.mark_capacity() && self.mark_word(slot).load(Ordering::Acquire) & MARKS != 0
    }

    /// Whether any entry was marked since the last drain (cheap poll for the forwarder).
    pub fn has_changes(&self) -> bool {
        self.ctl().dirty.dirty.load(Ordering::Acquire) != 0
    }

    /// Number of drain passes so far (lets a forwarder age its re-read list).
    pub fn drain_epoch(&self) -> u64 {
        self.ctl().dirty.epoch.load(Ordering::Relaxed)
    }

    /// Slots allocated so far (hash: the fresh-slot bound; arrays: every index).
    fn slot_count(&self) -> u32 {
        let g = &self.geo;
        if self.def.map_type.is_hash() {
            g.next_fresh_bound(self)
        } else {
            g.max_entries
        }
    }

    /// Every slot a mark can be on: the whole element pool of a hash, every index of an array.
    fn mark_capacity(&self) -> u32 {
        if self.def.map_type.is_hash() {
            self.geo.pool
        } else {
            self.geo.max_entries
        }
    }

    /// Calls `f` for each marked entry with its current state, clearing the marks first.
    /// Returns how many changes were reported. Only hash and array maps carry marks.
    ///
    /// Pairs with [`mark_slow`](Self::mark_slow): a marker sets the entry's mark, then the
    /// summary bit, then the dirty flag (SeqCst read-modify-writes); this pass swaps the dirty
    /// flag, then each summary word, then clears each mark, and only then reads the entry. So a
    /// marker whose summary bit was already set when it looked (and therefore did not set it
    /// again) has its mark seen by this pass, and a mark set after this pass cleared the summary
    /// bit sets that bit again for the next pass. A summary bit stands for 64 slots, and all 64
    /// are visited, whatever the map's allocation bound is now: bounding the visit by the
    /// number of slots allocated when the pass began would clear the bit of a slot allocated
    /// during the pass while leaving its mark set, and a set mark is never published again.
    pub fn drain_changes(&self, mut f: impl FnMut(Change)) -> usize {
        self.drain_marked(|slot, kind| match self.read_slot(slot) {
            Some(mut c) => {
                c.kind = kind;
                f(c);
                true
            }
            None => false,
        })
    }

    /// [`drain_changes`](Self::drain_changes) without allocating: each change is read into
    /// `buf` and reported borrowed (what the forwarder uses on every pass).
    pub fn drain_changes_raw(&self, buf: &mut Vec<u8>, mut f: impl FnMut(RawChange<'_>)) -> usize {
        self.drain_marked(|slot, kind| match self.read_slot_raw(slot, buf) {
            Some(mut c) => {
                c.kind = kind;
                f(c);
                true
            }
            None => false,
        })
    }

    /// The marks protocol of [`drain_changes`](Self::drain_changes): `visit(slot, kind)` reads
    /// and reports one entry whose mark was just cleared, and returns false if it could not read
    /// it (then the mark is set again, unless the element is free).
    fn drain_marked(&self, mut visit: impl FnMut(u32, ChangeKind) -> bool) -> usize {
        let t = self.def.map_type;
        if !(t.is_hash() || t.is_array()) {
            return 0;
        }
        let d = &self.ctl().dirty;
        if d.dirty.swap(0, Ordering::SeqCst) == 0 {
            return 0;
        }
        d.epoch.fetch_add(1, Ordering::Relaxed);
        let g = &self.geo;
        let capacity = self.mark_capacity();
        let mut n = 0;
        for w in 0..g.summary_words {
            let s = self.summary_word(w * 4096);
            let mut bits = s.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let first = w * 4096 + b * 64;
                for slot in first..(first + 64).min(capacity) {
                    let word = self.mark_word(slot);
                    // SeqCst load: ordered after the summary swap above (see the doc).
                    if word.load(Ordering::SeqCst) & MARKS == 0 {
                        continue;
                    }
                    let m = word.fetch_and(!MARKS, Ordering::SeqCst);
                    if m & MARKS == 0 {
                        continue;
                    }
                    if visit(slot, ChangeKind(m & MARKS)) {
                        n += 1;
                    } else if !self.slot_is_free(slot) {
                        // Writers kept changing it while it was read: the next pass reads it.
                        // (A hash element freed since it was marked took its key's change with
                        // it: a forwarded delete, or a dropped tombstone, which sets the resync
                        // flag.)
                        self.mark_hard(slot, word, m & MARKS);
                    }
                }
            }
        }
        n
    }

    /// Every live entry as a change (a full resync, e.g. after a loader restart or after
    /// [`take_resync_needed`](Self::take_resync_needed) says tombstones were dropped).
    pub fn snapshot_changes(&self, mut f: impl FnMut(Change)) -> usize {
        let t = self.def.map_type;
        if !(t.is_hash() || t.is_array()) {
            return 0;
        }
        let mut n = 0;
        for slot in 0..self.slot_count() {
            if let Some(c) = self.read_slot(slot) {
                if c.value.is_some() {
                    f(c);
                    n += 1;
                }
            }
        }
        n
    }

    /// The current state of one slot (`None` for a free hash element).
    pub fn read_slot(&self, slot: u32) -> Option<Change> {
        let t = self.def.map_type;
        if t.is_hash() {
            if slot >= self.geo.pool {
                return None;
            }
            self.hash_read_slot(slot)
        } else if t.is_array() {
            if slot >= self.def.max_entries {
                return None;
            }
            Some(Change {
                slot,
                generation: 0,
                kind: ChangeKind(0),
                key: slot.to_le_bytes().to_vec(),
                value: Some(self.array_value_at(slot)),
            })
        } else {
            None
        }
    }

    /// Whether tombstones were dropped unacknowledged (then a full resync is needed); clears
    /// the flag.
    pub fn take_resync_needed(&self) -> bool {
        self.ctl().dirty.resync.swap(0, Ordering::AcqRel) != 0
    }
}

impl Geometry {
    fn next_fresh_bound(&self, h: &MapHandle) -> u32 {
        h.ctl()
            .alloc
            .next_fresh
            .load(Ordering::Acquire)
            .min(self.pool)
    }
}

/// A forwarder's process-local cursor over one map that closes the gap left by lookup marks:
/// a program writes through the pointer *after* the lookup marked the entry, possibly after
/// the forwarder has read it. Entries reported with a lookup mark are therefore re-read on
/// the next `grace_passes` passes (each pass is one [`ChangeCursor::pass`]), and again for as
/// long as lookups keep marking them. Choose the pass interval well above a program's run
/// time; then, once targets go idle, the last value written through a pointer is always read.
#[derive(Debug)]
pub struct ChangeCursor {
    grace_passes: u32,
    /// slot -> (generation when handed out, passes left)
    recheck: std::collections::HashMap<u32, (u32, u32)>,
}

impl Default for ChangeCursor {
    fn default() -> Self {
        Self::new(2)
    }
}

impl ChangeCursor {
    /// A cursor that re-reads lookup-marked entries on the next `grace_passes` passes (at
    /// least 1).
    pub fn new(grace_passes: u32) -> Self {
        Self {
            grace_passes: grace_passes.max(1),
            recheck: std::collections::HashMap::new(),
        }
    }

    /// Entries still being re-read.
    pub fn pending_rechecks(&self) -> usize {
        self.recheck.len()
    }

    /// Reports every marked entry once, then every entry under recheck that was not marked
    /// again (with `kind` 0), each with its current state. Returns the number reported.
    pub fn pass(&mut self, map: &MapHandle, mut f: impl FnMut(Change)) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        let grace = self.grace_passes;
        let recheck = &mut self.recheck;
        map.drain_changes(|c| {
            seen.insert(c.slot);
            if c.kind.pointer_handed_out() {
                recheck.insert(c.slot, (c.generation, grace + 1));
            }
            f(c);
            n += 1;
        });
        let mut done = Vec::new();
        for (&slot, (gen, left)) in recheck.iter_mut() {
            *left -= 1;
            if *left == 0 {
                done.push(slot);
            }
            if seen.contains(&slot) {
                continue;
            }
            match map.read_slot(slot) {
                // Same element still holding the same entry: report its current value.
                Some(c) if c.generation == *gen => {
                    f(c);
                    n += 1;
                }
                // Deleted or reused since: that change carried its own mark.
                _ => done.push(slot),
            }
        }
        for s in done {
            self.recheck.remove(&s);
        }
        n
    }
}
