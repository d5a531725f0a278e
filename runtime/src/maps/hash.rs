//! HASH, PERCPU_HASH, LRU_HASH and LRU_PERCPU_HASH.
//!
//! Buckets chain preallocated elements by index. Writers take the bucket's [`ShmLock`];
//! readers take no lock: they walk the chain and validate with the bucket's sequence counter,
//! which writers make odd around every unlink (linking at the head is a single release store of
//! a fully initialised element and needs no validation). Values are updated in place, so a
//! pointer handed out by a lookup stays valid while the entry lives; elements come from a pool
//! of 2 x max_entries (a Treiber free list with an ABA tag plus a bump index), the extra half
//! holding tombstones of deletes the forwarder has not acknowledged. Should tombstones fill the
//! spare half, the oldest are dropped and the map's resync flag set, so inserts never fail for
//! want of an acknowledgment.

use std::sync::atomic::{fence, Ordering};

use super::layout::*;
use super::lock::{Acquired, LockGuard};
use super::track::{Change, ChangeKind};
use super::typed::typed_map;
use super::{Entry, EntryValue, MapError, MapHandle, BPF_EXIST, BPF_F_LOCK, BPF_NOEXIST};

typed_map!(
    /// A HASH, PERCPU_HASH, LRU_HASH or LRU_PERCPU_HASH.
    HashMap,
    Hash,
    "hash map"
);

impl HashMap {
    /// A program lookup as the JIT makes it: a pointer to the value (CPU slot 0), marked like
    /// [`MapHandle::lookup`]. A key of the wrong length finds nothing.
    #[inline]
    pub fn lookup_ptr(&self, key: &[u8]) -> Option<*mut u8> {
        self.hash_lookup(key, 0)
    }

    /// A program update as the JIT makes it on a plain (not per-CPU) map; other shapes take
    /// [`MapHandle::update`]'s checked path.
    #[inline]
    pub fn update_plain(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        let d = &self.def;
        if self.geo.nslots != 1
            || key.len() != d.key_size as usize
            || value.len() != d.value_size as usize
        {
            return self.0.update(key, value, flags);
        }
        self.hash_update(key, value, flags, None)
    }
}

/// HASH family definitions: key, value and entries all non-zero.
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    let (k, v, m) = (def.key_size, def.value_size, def.max_entries);
    if k == 0 || v == 0 || m == 0 {
        return Err("hash maps need key_size, value_size and max_entries > 0".into());
    }
    if m > (1 << 28) {
        return Err(format!("max_entries {m} too large"));
    }
    Ok(())
}

/// Region layout after the control block at `cur`: buckets, change summary, element pool.
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, mut cur: u64) {
    let m = u64::from(def.max_entries);
    g.n_buckets = m.next_power_of_two() as u32;
    // Twice max_entries: room for as many tombstones as live entries before a forwarder
    // acknowledges them (see the module docs for what happens beyond).
    g.pool = (2 * m) as u32;
    g.elem_size =
        (16 + u64::from(g.key_stride) + u64::from(g.value_stride) * u64::from(g.nslots)) as u32;
    g.buckets_off = cur;
    cur += u64::from(g.n_buckets) * 16;
    cur = round_up(cur, 64);
    g.summary_off = cur;
    g.summary_words = summary_words(u64::from(g.pool)) as u32;
    cur += u64::from(g.summary_words) * 8;
    cur = round_up(cur, 64);
    g.elems_off = cur;
}

/// 64-bit multiply/rotate mixing over 8-byte words, finished with murmur3's fmix64. No seed:
/// every process must place a key in the same bucket.
#[inline]
pub(super) fn hash_key(key: &[u8]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0x243F_6A88_85A3_08D3 ^ (key.len() as u64).wrapping_mul(K);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
        h = (h ^ w).wrapping_mul(K).rotate_left(31);
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        h = (h ^ load_tail(rem)).wrapping_mul(K).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h ^ (h >> 32)) as u32
}

/// 1..=7 trailing key bytes as a zero-padded little-endian word, without a memcpy call (the
/// common 4-byte key is a single load).
#[inline(always)]
fn load_tail(rem: &[u8]) -> u64 {
    let n = rem.len();
    if n >= 4 {
        let lo = u32::from_le_bytes(rem[..4].try_into().expect("4 bytes")) as u64;
        let mut hi = 0u64;
        for (i, &b) in rem[4..].iter().enumerate() {
            hi |= (b as u64) << (8 * i);
        }
        lo | (hi << 32)
    } else {
        let mut v = 0u64;
        for (i, &b) in rem.iter().enumerate() {
            v |= (b as u64) << (8 * i);
        }
        v
    }
}

/// Where a key sits in its chain (under the bucket lock).
struct Found {
    slot: u32,
    /// Slot of the predecessor, None when the element is the chain head.
    prev: Option<u32>,
    live: bool,
}

/// Room an insert made before taking its bucket lock: a unit of capacity and a free element,
/// handed back by the update if it did not need them.
#[derive(Default)]
struct Room {
    unit: bool,
    slot: Option<u32>,
}

/// Rounds an LRU update makes room in before answering ENOMEM; each round evicts an element
/// (or finds one free), so only writers racing for every freed unit could exhaust them.
const LRU_ROOM_ROUNDS: u32 = 64;

/// An update refused for want of a unit of capacity or an element.
fn is_full(r: &Result<u32, MapError>) -> bool {
    matches!(
        r,
        Err(MapError::Op {
            errno: libc::E2BIG,
            ..
        })
    )
}

impl MapHandle {
    #[inline]
    pub(super) fn elem_ptr(&self, slot: u32) -> *mut u8 {
        let g = &self.geo;
        debug_assert!(slot < g.pool);
        self.at(g.elems_off + u64::from(slot) * u64::from(g.elem_size))
    }

    #[inline]
    pub(super) fn elem(&self, slot: u32) -> &ElemHdr {
        // SAFETY: slot < pool (all callers derive it from bounded indices), so the header lies
        // inside the element area of this map's region.
        unsafe { &*(self.elem_ptr(slot) as *const ElemHdr) }
    }

    #[inline]
    pub(super) fn hash_val_ptr(&self, slot: u32, cpu: u32) -> *mut u8 {
        self.val_ptr(slot, cpu)
    }

    #[inline]
    fn val_ptr(&self, slot: u32, cpu: u32) -> *mut u8 {
        let g = &self.geo;
        self.elem_ptr(slot)
            .wrapping_add(16 + g.key_stride as usize + (cpu * g.value_stride) as usize)
    }

    #[inline]
    fn bucket(&self, h: u32) -> &Bucket {
        let g = &self.geo;
        let i = h & (g.n_buckets - 1);
        // SAFETY: i < n_buckets; the bucket array lies in this map's region.
        unsafe { &*(self.at(g.buckets_off) as *const Bucket).add(i as usize) }
    }

    /// Compares the stored (8-aligned, zero-padded) key with `key`. Volatile reads because a
    /// writer may be reusing the element; the caller validates with the bucket sequence.
    #[inline]
    fn key_eq(&self, slot: u32, key: &[u8]) -> bool {
        let p = self.elem_ptr(slot).wrapping_add(16) as *const u64;
        let mut chunks = key.chunks_exact(8);
        let mut i = 0;
        for c in &mut chunks {
            // SAFETY: p + i is within key_stride (8-aligned, >= key.len()).
            let s = unsafe { std::ptr::read_volatile(p.add(i)) };
            if s != u64::from_le_bytes(c.try_into().expect("8-byte chunk")) {
                return false;
            }
            i += 1;
        }
        let rem = chunks.remainder();
        if !rem.is_empty() {
            // SAFETY: as above; padding bytes are kept zero.
            let s = unsafe { std::ptr::read_volatile(p.add(i)) };
            if s != load_tail(rem) {
                return false;
            }
        }
        true
    }

    /// Lock-free search for a live element.
    #[inline]
    fn find_live(&self, h: u32, key: &[u8]) -> Option<u32> {
        let b = self.bucket(h);
        let pool = self.geo.pool;
        let mut tries = 0u32;
        loop {
            let s1 = b.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                tries += 1;
                self.wait_unlink(b, tries);
                continue;
            }
            let mut idx = b.head.load(Ordering::Acquire);
            let mut found = None;
            let mut steps = 0;
            while idx != 0 && idx <= pool && steps <= pool {
                let slot = idx - 1;
                let e = self.elem(slot);
                if e.hash.load(Ordering::Relaxed) == h
                    && e.state.load(Ordering::Acquire) & STATE_MASK == ELEM_LIVE
                    && self.key_eq(slot, key)
                {
                    found = Some(slot);
                    break;
                }
                idx = e.next.load(Ordering::Acquire);
                steps += 1;
            }
            fence(Ordering::Acquire);
            if b.seq.load(Ordering::Relaxed) == s1 {
                return found;
            }
        }
    }

    #[cold]
    fn wait_unlink(&self, b: &Bucket, tries: u32) {
        if tries < 1000 {
            std::hint::spin_loop();
        } else {
            // A writer that stays mid-unlink this long may be dead: taking the lock recovers
            // it (and repairs the sequence) if so.
            if let Some(g) = self.lock_bucket(b) {
                // Writers make the sequence odd only while they hold the lock: odd with the
                // lock ours means nobody is unlinking (a corrupted word); make it even, or
                // readers would wait for ever.
                let s = b.seq.load(Ordering::Relaxed);
                if s & 1 != 0 {
                    b.seq.store(s.wrapping_add(1), Ordering::Release);
                }
                drop(g);
            }
            std::thread::yield_now();
        }
    }

    /// The bucket's lock, or `None` when a live holder kept it past the lock timeout.
    fn lock_bucket<'b>(&self, b: &'b Bucket) -> Option<LockGuard<'b>> {
        let g = LockGuard::new(&b.lock)?;
        self.after_lock(b, &g);
        Some(g)
    }

    /// Locks the bucket of an element to evict or reclaim while the caller may hold `held`:
    /// never waits while holding a bucket (two writers evicting from each other's buckets
    /// would deadlock), waits otherwise. `Some(None)`: the element is in `held` itself.
    fn lock_victim<'b>(
        &self,
        b: &'b Bucket,
        held: Option<&Bucket>,
    ) -> Option<Option<LockGuard<'b>>> {
        match held {
            Some(h) if std::ptr::eq(b, h) => Some(None),
            Some(_) => {
                let g = LockGuard::try_new(&b.lock)?;
                self.after_lock(b, &g);
                Some(Some(g))
            }
            None => self.lock_bucket(b).map(Some),
        }
    }

    /// What taking over a dead writer's bucket lock must mend before the chain is used.
    fn after_lock(&self, b: &Bucket, g: &LockGuard<'_>) {
        if g.acquired == Acquired::Recovered {
            // Every mutation of a chain is a single store; only the sequence can be left odd.
            let s = b.seq.load(Ordering::Relaxed);
            if s & 1 != 0 {
                b.seq.store(s.wrapping_add(1), Ordering::Release);
            }
            self.count(ctr::RECOVERIES);
            // The dead writer may have taken a unit of capacity or an element without linking
            // it, or unlinked one without freeing it; that is not visible from this bucket.
            self.ctl().alloc.repair.store(1, Ordering::Release);
        }
    }

    /// Recounts the map's bookkeeping if a writer died mid-update; called by writers once
    /// they hold no bucket lock (one relaxed load on the fast path).
    #[inline]
    fn repair_if_needed(&self) {
        if self.ctl().alloc.repair.load(Ordering::Relaxed) != 0 {
            self.repair_bookkeeping();
        }
    }

    /// Makes `count`, `tombs` and the free list agree with the chains again after a writer
    /// died holding a bucket lock. The global counters and the free list change outside any one
    /// bucket's critical section, so the only exact view is with every bucket locked: no
    /// writer is then between reserving and linking (all of them reserve, allocate, link,
    /// unlink and free under their bucket's lock). Lock-free readers are unaffected: linked
    /// chains change only by the ordinary unlink. Costs one pass over the buckets and the
    /// pool, after a kill only. If a live thread holds a bucket past the lock timeout the
    /// repair stays pending for the next writer.
    #[cold]
    #[inline(never)]
    fn repair_bookkeeping(&self) {
        let a = &self.ctl().alloc;
        // For hash maps `alloc.lock` serves only this: one repairer at a time.
        let Some(_serial) = LockGuard::new(&a.lock) else {
            return;
        };
        if a.repair.load(Ordering::Acquire) == 0 {
            return;
        }
        let started = std::time::Instant::now();
        let g = &self.geo;
        let mut held = Vec::with_capacity(g.n_buckets as usize);
        for i in 0..g.n_buckets {
            let b = self.bucket(i);
            let Some(guard) = LockGuard::new(&b.lock) else {
                tracing::warn!(
                    map = self.name(),
                    "a live thread holds a bucket past the lock timeout: recount postponed"
                );
                return;
            };
            if guard.acquired == Acquired::Recovered {
                let s = b.seq.load(Ordering::Relaxed);
                if s & 1 != 0 {
                    b.seq.store(s.wrapping_add(1), Ordering::Release);
                }
                self.count(ctr::RECOVERIES);
            }
            held.push(guard);
        }
        let fresh = a.next_fresh.load(Ordering::Acquire).min(g.pool);
        let mut linked = vec![false; fresh as usize];
        let (mut live, mut tombs) = (0u32, 0u32);
        for i in 0..g.n_buckets {
            let b = self.bucket(i);
            let mut prev = None;
            let mut idx = b.head.load(Ordering::Acquire);
            while idx != 0 && idx <= fresh && !linked[(idx - 1) as usize] {
                let slot = idx - 1;
                let e = self.elem(slot);
                let next = e.next.load(Ordering::Acquire);
                match e.state.load(Ordering::Acquire) & STATE_MASK {
                    ELEM_LIVE => live += 1,
                    ELEM_TOMB => tombs += 1,
                    // Not reachable by the ordinary paths (they unlink before freeing); a
                    // free element in a chain would be handed out twice.
                    _ => {
                        self.unlink_locked(b, slot, prev);
                        idx = next;
                        continue;
                    }
                }
                linked[slot as usize] = true;
                prev = Some(slot);
                idx = next;
            }
        }
        // Every allocated element outside the chains is free: rebuild the list from them (the
        // dead writer's popped-but-unlinked or unlinked-but-unfreed element among them).
        let mut head = 0u32;
        let mut free = 0u32;
        for slot in (0..fresh).rev() {
            if linked[slot as usize] {
                continue;
            }
            let e = self.elem(slot);
            let st = e.state.load(Ordering::Relaxed);
            if st & STATE_MASK != ELEM_FREE {
                e.state.store(
                    (st & !STATE_MASK).wrapping_add(GEN_ONE) | ELEM_FREE,
                    Ordering::Release,
                );
            }
            e.mark.fetch_and(!(MARKS | LRU_REF), Ordering::Relaxed);
            e.next.store(head, Ordering::Relaxed);
            head = slot + 1;
            free += 1;
        }
        let old = a.free_head.load(Ordering::Acquire);
        a.free_head.store(
            (((old >> 32) + 1) << 32) | u64::from(head),
            Ordering::Release,
        );
        let (was_live, was_tombs) = (
            a.count.swap(live, Ordering::AcqRel),
            a.tombs.swap(tombs, Ordering::AcqRel),
        );
        a.repair.store(0, Ordering::Release);
        // What the dead writer changed may not be marked: the forwarder compares everything.
        self.ctl().dirty.resync.store(1, Ordering::Release);
        self.count(ctr::REPAIRS);
        drop(held);
        tracing::warn!(
            map = self.name(),
            live,
            was_live,
            tombs,
            was_tombs,
            free,
            elapsed = ?started.elapsed(),
            "recounted the map after a writer died mid-update"
        );
    }

    /// Chain search under the bucket lock, also finding tombstones of the key.
    fn find_locked(&self, b: &Bucket, h: u32, key: &[u8]) -> Option<Found> {
        let mut prev = None;
        let mut idx = b.head.load(Ordering::Acquire);
        let pool = self.geo.pool;
        let mut steps = 0;
        while idx != 0 && idx <= pool && steps <= pool {
            let slot = idx - 1;
            let e = self.elem(slot);
            let st = e.state.load(Ordering::Acquire) & STATE_MASK;
            if e.hash.load(Ordering::Relaxed) == h && st != ELEM_FREE && self.key_eq(slot, key) {
                return Some(Found {
                    slot,
                    prev,
                    live: st == ELEM_LIVE,
                });
            }
            prev = Some(slot);
            idx = e.next.load(Ordering::Acquire);
            steps += 1;
        }
        None
    }

    fn find_prev_locked(&self, b: &Bucket, slot: u32) -> Option<Option<u32>> {
        let mut prev = None;
        let mut idx = b.head.load(Ordering::Acquire);
        let pool = self.geo.pool;
        let mut steps = 0;
        while idx != 0 && idx <= pool && steps <= pool {
            if idx - 1 == slot {
                return Some(prev);
            }
            prev = Some(idx - 1);
            idx = self.elem(idx - 1).next.load(Ordering::Acquire);
            steps += 1;
        }
        None
    }

    /// Removes `slot` from its chain; readers inside the bucket retry.
    fn unlink_locked(&self, b: &Bucket, slot: u32, prev: Option<u32>) {
        let next = self.elem(slot).next.load(Ordering::Relaxed);
        let s = b.seq.load(Ordering::Relaxed);
        b.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        match prev {
            Some(p) => self.elem(p).next.store(next, Ordering::Release),
            None => b.head.store(next, Ordering::Release),
        }
        b.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    fn free_elem(&self, slot: u32) {
        let e = self.elem(slot);
        let st = e.state.load(Ordering::Relaxed);
        e.state.store(
            (st & !STATE_MASK).wrapping_add(GEN_ONE) | ELEM_FREE,
            Ordering::Release,
        );
        e.mark.fetch_and(!(MARKS | LRU_REF), Ordering::Relaxed);
        let a = &self.ctl().alloc;
        let mut head = a.free_head.load(Ordering::Acquire);
        loop {
            e.next.store(head as u32, Ordering::Relaxed);
            let new = (((head >> 32) + 1) << 32) | u64::from(slot + 1);
            match a
                .free_head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Takes a free element: the free list, then the never-used part of the pool, then an
    /// unacknowledged tombstone (`held`: the bucket the caller has locked, if any).
    fn alloc_elem(&self, held: Option<&Bucket>) -> Option<u32> {
        let a = &self.ctl().alloc;
        let pool = self.geo.pool;
        let mut head = a.free_head.load(Ordering::Acquire);
        loop {
            let idx = head as u32;
            if idx == 0 || idx > pool {
                break;
            }
            let next = self.elem(idx - 1).next.load(Ordering::Acquire);
            let new = (((head >> 32) + 1) << 32) | u64::from(next);
            match a
                .free_head
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(idx - 1),
                Err(h) => head = h,
            }
        }
        let mut f = a.next_fresh.load(Ordering::Relaxed);
        while f < pool {
            match a
                .next_fresh
                .compare_exchange_weak(f, f + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(f),
                Err(x) => f = x,
            }
        }
        self.reclaim_tombstone(held)
    }

    /// Reuses an unacknowledged tombstone when the spare half of the pool is exhausted.
    #[cold]
    fn reclaim_tombstone(&self, held: Option<&Bucket>) -> Option<u32> {
        let pool = self.geo.pool;
        let a = &self.ctl().alloc;
        for _ in 0..2 * pool {
            let slot = a.reclaim_hand.fetch_add(1, Ordering::Relaxed) % pool;
            let e = self.elem(slot);
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_TOMB {
                continue;
            }
            let b = self.bucket(e.hash.load(Ordering::Relaxed));
            let Some(_g) = self.lock_victim(b, held) else {
                continue;
            };
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_TOMB {
                continue;
            }
            let Some(prev) = self.find_prev_locked(b, slot) else {
                continue;
            };
            self.unlink_locked(b, slot, prev);
            let st = e.state.load(Ordering::Relaxed);
            e.state.store(
                (st & !STATE_MASK).wrapping_add(GEN_ONE) | ELEM_FREE,
                Ordering::Release,
            );
            e.mark.fetch_and(!(MARKS | LRU_REF), Ordering::Relaxed);
            a.tombs.fetch_sub(1, Ordering::Relaxed);
            self.count(ctr::TOMBS_DROPPED);
            self.ctl().dirty.resync.store(1, Ordering::Release);
            return Some(slot);
        }
        None
    }

    /// Turns a live element into a tombstone (tracking on) or frees it.
    fn remove_locked(&self, b: &Bucket, slot: u32, prev: Option<u32>) {
        self.ctl().alloc.count.fetch_sub(1, Ordering::Relaxed);
        self.retire_locked(b, slot, prev);
    }

    /// [`Self::remove_locked`] without giving back the element's unit of capacity.
    fn retire_locked(&self, b: &Bucket, slot: u32, prev: Option<u32>) {
        let a = &self.ctl().alloc;
        if a.track_deletes.load(Ordering::Relaxed) != 0 {
            let e = self.elem(slot);
            let st = e.state.load(Ordering::Relaxed);
            e.state
                .store((st & !STATE_MASK) | ELEM_TOMB, Ordering::Release);
            a.tombs.fetch_add(1, Ordering::Relaxed);
            self.mark_hard(slot, &e.mark, MARK_CHANGED);
        } else {
            self.unlink_locked(b, slot, prev);
            self.free_elem(slot);
        }
    }

    /// Clock sweep over the pool: the first live element without its reference bit goes, and
    /// its unit of capacity passes to the caller (no other writer can take it in between).
    /// `held`: the bucket the caller has locked, if any.
    fn lru_evict(&self, held: Option<&Bucket>) -> bool {
        let a = &self.ctl().alloc;
        let limit = a.next_fresh.load(Ordering::Acquire).min(self.geo.pool);
        if limit == 0 {
            return false;
        }
        for _ in 0..3 * limit {
            let slot = a.clock.fetch_add(1, Ordering::Relaxed) % limit;
            let e = self.elem(slot);
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_LIVE {
                continue;
            }
            if e.mark.load(Ordering::Relaxed) & LRU_REF != 0 {
                e.mark.fetch_and(!LRU_REF, Ordering::Relaxed);
                continue;
            }
            let b = self.bucket(e.hash.load(Ordering::Relaxed));
            let Some(_g) = self.lock_victim(b, held) else {
                continue;
            };
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_LIVE {
                continue;
            }
            let Some(prev) = self.find_prev_locked(b, slot) else {
                continue;
            };
            self.retire_locked(b, slot, prev);
            self.count(ctr::EVICTIONS);
            return true;
        }
        false
    }

    /// Takes one unit of capacity (E2BIG when none; LRU maps evict for it). `held`: the
    /// bucket the caller has locked, if any; holding none, an LRU map can wait for a victim's
    /// bucket and so always finds one while any entry is live.
    fn reserve_entry(&self, held: Option<&Bucket>) -> bool {
        let a = &self.ctl().alloc;
        let max = self.def.max_entries;
        let mut attempts = 0;
        loop {
            let c = a.count.load(Ordering::Relaxed);
            if c < max {
                if a.count
                    .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if !self.def.map_type.is_lru() || attempts > 8 {
                return false;
            }
            if self.lru_evict(held) {
                return true;
            }
            attempts += 1;
        }
    }

    /// Writes a value: `cpu` = Some for a program's update of a per-CPU map (its slot only),
    /// None for a whole value (all slots, stride-padded, for per-CPU maps).
    fn write_value(&self, slot: u32, value: &[u8], cpu: Option<u32>, fresh: bool) {
        let g = &self.geo;
        let stride = g.value_stride as usize;
        if fresh {
            // SAFETY: the value area of this element: nslots * value_stride bytes.
            unsafe { std::ptr::write_bytes(self.val_ptr(slot, 0), 0, stride * g.nslots as usize) };
        }
        // SAFETY: every slot of the element holds a value of value_size bytes; the callers
        // checked cpu and value's length.
        unsafe { store_slots(g, value, cpu, |c| self.val_ptr(slot, c)) };
    }

    #[inline]
    pub(super) fn hash_lookup(&self, key: &[u8], cpu: u32) -> Option<*mut u8> {
        let slot = self.find_live(hash_key(key), key)?;
        let e = self.elem(slot);
        let bits = if self.def.map_type.is_lru() {
            MARK_LOOKUP | LRU_REF
        } else {
            MARK_LOOKUP
        };
        self.mark_soft(slot, &e.mark, bits);
        Some(self.val_ptr(slot, cpu))
    }

    pub(super) fn hash_find_slot(&self, key: &[u8]) -> Option<u32> {
        if key.len() != self.def.key_size as usize {
            return None;
        }
        self.find_live(hash_key(key), key)
    }

    fn read_value(&self, slot: u32) -> EntryValue {
        let g = &self.geo;
        let vs = g.value_size as usize;
        let read = |c: u32| {
            let mut v = vec![0u8; vs];
            // SAFETY: value slot c of a pooled element.
            unsafe { std::ptr::copy_nonoverlapping(self.val_ptr(slot, c), v.as_mut_ptr(), vs) };
            g.clear_spin_lock(&mut v);
            v
        };
        if self.def.map_type.is_percpu() {
            EntryValue::PerCpu((0..g.nslots).map(read).collect())
        } else {
            EntryValue::Single(read(0))
        }
    }

    fn read_key(&self, slot: u32) -> Vec<u8> {
        let ks = self.def.key_size as usize;
        let mut k = vec![0u8; ks];
        // SAFETY: key area of a pooled element.
        unsafe { std::ptr::copy_nonoverlapping(self.elem_ptr(slot).add(16), k.as_mut_ptr(), ks) };
        k
    }

    pub(super) fn hash_get(&self, key: &[u8]) -> Option<EntryValue> {
        let slot = self.find_live(hash_key(key), key)?;
        Some(self.read_value(slot))
    }

    pub(super) fn hash_update(
        &self,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
    ) -> Result<(), MapError> {
        self.check_lock_flag("update", flags)?;
        if flags & !BPF_F_LOCK > BPF_EXIST {
            return Err(self.err("update", libc::EINVAL));
        }
        let h = hash_key(key);
        let b = self.bucket(h);
        let mut updated = self.update_in_bucket(b, h, key, value, flags, cpu, Room::default());
        if self.ctl().alloc.repair.load(Ordering::Relaxed) != 0 {
            self.repair_bookkeeping();
            // Capacity a dead writer had reserved is back: a refusal for want of it is retried.
            if is_full(&updated) {
                updated = self.update_in_bucket(b, h, key, value, flags, cpu, Room::default());
            }
        }
        if self.def.map_type.is_lru() && is_full(&updated) {
            updated = self.lru_update_with_room(b, h, key, value, flags, cpu);
        }
        let slot = updated?;
        // Marked after the unlock: the unlock is a full barrier, so the new value is visible
        // before we look at the mark, and an already-set mark (forwarder not yet there) costs
        // only a load. A mark landing on an element reused meanwhile is a harmless extra report.
        self.mark_soft(slot, &self.elem(slot).mark, MARK_CHANGED);
        Ok(())
    }

    /// An LRU update that found no room under its bucket lock (every victim's bucket busy, or
    /// the pool's spare half full of tombstones): room is made first, holding no bucket lock,
    /// as the kernel's `prealloc_lru_pop` frees a node before `htab_lru_map_update_elem` takes
    /// the bucket lock. Waiting for a victim's bucket is then safe, and the freed unit and
    /// element are the caller's, not the next writer's. ENOMEM, as the kernel answers, only
    /// if no element could be freed.
    #[cold]
    fn lru_update_with_room(
        &self,
        b: &Bucket,
        h: u32,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
    ) -> Result<u32, MapError> {
        for _ in 0..LRU_ROOM_ROUNDS {
            let unit = self.reserve_entry(None);
            let room = Room {
                unit,
                slot: if unit { self.alloc_elem(None) } else { None },
            };
            let updated = self.update_in_bucket(b, h, key, value, flags, cpu, room);
            if !is_full(&updated) {
                return updated;
            }
        }
        self.count(ctr::FULL);
        Err(self.err("update", libc::ENOMEM))
    }

    #[allow(clippy::too_many_arguments)]
    fn update_in_bucket(
        &self,
        b: &Bucket,
        h: u32,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
        mut room: Room,
    ) -> Result<u32, MapError> {
        let updated = match self.lock_bucket(b) {
            Some(_g) => self.update_locked(b, h, key, value, flags, cpu, &mut room),
            None => Err(self.err("update", libc::EBUSY)),
        };
        // Room made beforehand and not needed (the key was live, or a tombstone revived).
        if room.unit {
            self.ctl().alloc.count.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(slot) = room.slot {
            self.free_elem(slot);
        }
        updated
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        b: &Bucket,
        h: u32,
        key: &[u8],
        value: &[u8],
        flags: u64,
        cpu: Option<u32>,
        room: &mut Room,
    ) -> Result<u32, MapError> {
        let locked = flags & BPF_F_LOCK != 0;
        let flags = flags & !BPF_F_LOCK;
        let found = self.find_locked(b, h, key);
        if let Some(f) = &found {
            if f.live {
                if flags == BPF_NOEXIST {
                    return Err(self.err("update", libc::EEXIST));
                }
                if locked {
                    // BPF_F_LOCK: the value is updated in place under its spin lock (the
                    // kernel's copy_map_value_locked); a new element needs no lock.
                    // SAFETY: a live element of this map, which has a spin lock.
                    unsafe {
                        self.geo.with_value_locked(self.val_ptr(f.slot, 0), || {
                            self.write_value(f.slot, value, cpu, false)
                        })
                    };
                } else {
                    self.write_value(f.slot, value, cpu, false);
                }
                return Ok(f.slot);
            }
        }
        if flags == BPF_EXIST {
            return Err(self.err("update", libc::ENOENT));
        }
        if !std::mem::take(&mut room.unit) && !self.reserve_entry(Some(b)) {
            self.count_full_unless_lru();
            return Err(self.err("update", libc::E2BIG));
        }
        // An eviction above may have removed or reclaimed our own tombstone; search again.
        let tomb = match found {
            Some(_) => self.find_locked(b, h, key).filter(|f| !f.live),
            None => None,
        };
        if let Some(t) = tomb {
            // Reviving the tombstone keeps one element per key, so the forwarder sees one
            // entry whose current state is "live" again.
            self.ctl().alloc.tombs.fetch_sub(1, Ordering::Relaxed);
            self.write_value(t.slot, value, cpu, true);
            let e = self.elem(t.slot);
            let st = e.state.load(Ordering::Relaxed);
            e.state
                .store((st & !STATE_MASK) | ELEM_LIVE, Ordering::Release);
            return Ok(t.slot);
        }
        let Some(slot) = room.slot.take().or_else(|| self.alloc_elem(Some(b))) else {
            self.ctl().alloc.count.fetch_sub(1, Ordering::Relaxed);
            self.count_full_unless_lru();
            return Err(self.err("update", libc::E2BIG));
        };
        let e = self.elem(slot);
        let ks = self.geo.key_stride as usize;
        // SAFETY: the element is ours (just allocated); key area is key_stride bytes.
        unsafe {
            let kp = self.elem_ptr(slot).add(16);
            std::ptr::write_bytes(kp, 0, ks);
            std::ptr::copy_nonoverlapping(key.as_ptr(), kp, key.len());
        }
        self.write_value(slot, value, cpu, true);
        e.hash.store(h, Ordering::Relaxed);
        let st = e.state.load(Ordering::Relaxed);
        e.state
            .store((st & !STATE_MASK) | ELEM_LIVE, Ordering::Relaxed);
        e.next
            .store(b.head.load(Ordering::Relaxed), Ordering::Relaxed);
        // Release: a reader that finds the element sees its key, value and state.
        b.head.store(slot + 1, Ordering::Release);
        Ok(slot)
    }

    /// An LRU map's refusal under the bucket lock is retried with room made first; only a
    /// final refusal counts as "full".
    fn count_full_unless_lru(&self) {
        if !self.def.map_type.is_lru() {
            self.count(ctr::FULL);
        }
    }

    pub(super) fn hash_delete(&self, key: &[u8]) -> Result<(), MapError> {
        let h = hash_key(key);
        let b = self.bucket(h);
        let removed = {
            let _g = self
                .lock_bucket(b)
                .ok_or_else(|| self.err("delete", libc::EBUSY))?;
            match self.find_locked(b, h, key) {
                Some(f) if f.live => {
                    self.remove_locked(b, f.slot, f.prev);
                    true
                }
                _ => false,
            }
        };
        self.repair_if_needed();
        if !removed {
            return Err(self.err("delete", libc::ENOENT));
        }
        self.count(ctr::DELETES);
        Ok(())
    }

    /// The element slots ever handed out (`next_fresh`, at most the pool): every live element
    /// is below it.
    fn slots_in_use(&self) -> u32 {
        self.ctl()
            .alloc
            .next_fresh
            .load(Ordering::Acquire)
            .min(self.geo.pool)
    }

    pub(super) fn hash_entries(&self) -> Vec<Entry> {
        let limit = self.slots_in_use();
        (0..limit)
            .filter_map(|s| self.hash_read_slot(s))
            .filter_map(|c| {
                Some(Entry {
                    key: c.key,
                    value: c.value?,
                })
            })
            .collect()
    }

    /// `GET_NEXT_KEY` on a hash: the live element after `current`'s in pool order (the first
    /// one when `current` is absent or not in the map). One lookup and a forward scan, not a
    /// listing per call: walking a map of n keys stays O(n) per key at worst and O(1) apart.
    pub(super) fn hash_next_key(&self, current: Option<&[u8]>) -> Option<Vec<u8>> {
        let limit = self.slots_in_use();
        let start = current
            .and_then(|k| self.hash_find_slot(k))
            .map_or(0, |s| s + 1);
        (start..limit).find_map(|s| {
            let e = self.elem(s);
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_LIVE {
                return None;
            }
            self.hash_read_slot(s)
                .filter(|c| c.value.is_some())
                .map(|c| c.key)
        })
    }

    /// Whether a hash element is free (never true for array slots).
    pub(super) fn slot_is_free(&self, slot: u32) -> bool {
        self.def.map_type.is_hash()
            && slot < self.geo.pool
            && self.elem(slot).state.load(Ordering::Acquire) & STATE_MASK == ELEM_FREE
    }

    pub(super) fn hash_read_slot(&self, slot: u32) -> Option<Change> {
        let e = self.elem(slot);
        for _ in 0..16 {
            let st = e.state.load(Ordering::Acquire);
            let value = match st & STATE_MASK {
                ELEM_LIVE => Some(self.read_value(slot)),
                ELEM_TOMB => None,
                _ => return None,
            };
            let key = self.read_key(slot);
            fence(Ordering::Acquire);
            if e.state.load(Ordering::Relaxed) == st {
                return Some(Change {
                    slot,
                    generation: st >> 2,
                    kind: ChangeKind(0),
                    key,
                    value,
                });
            }
        }
        None
    }

    pub(super) fn hash_for_each(
        &self,
        cpu: u32,
        f: &mut impl FnMut(*const u8, *mut u8) -> bool,
    ) -> u64 {
        let limit = self.slots_in_use();
        let lru = if self.def.map_type.is_lru() {
            LRU_REF
        } else {
            0
        };
        let mut n = 0;
        for slot in 0..limit {
            let e = self.elem(slot);
            if e.state.load(Ordering::Acquire) & STATE_MASK != ELEM_LIVE {
                continue;
            }
            self.mark_soft(slot, &e.mark, MARK_LOOKUP | lru);
            n += 1;
            if !f(
                self.elem_ptr(slot).wrapping_add(16),
                self.val_ptr(slot, cpu),
            ) {
                break;
            }
        }
        n
    }
}

impl HashMap {
    /// Whether deletes leave tombstones for the forwarder (set by `load` for synced maps).
    pub fn set_track_deletes(&self, on: bool) {
        self.ctl()
            .alloc
            .track_deletes
            .store(u32::from(on), Ordering::Release);
    }

    /// The forwarder's acknowledgment that the kernel has the deletion of `slot` (generation
    /// from the [`Change`]); frees the tombstone. False if the slot is no longer that
    /// tombstone (revived or reclaimed meanwhile).
    pub fn ack_deleted(&self, slot: u32, generation: u32) -> bool {
        if slot >= self.geo.pool {
            return false;
        }
        let e = self.elem(slot);
        let want = (generation << 2) | ELEM_TOMB;
        if e.state.load(Ordering::Acquire) != want {
            return false;
        }
        let b = self.bucket(e.hash.load(Ordering::Relaxed));
        let Some(_g) = self.lock_bucket(b) else {
            return false;
        };
        if e.state.load(Ordering::Acquire) != want {
            return false;
        }
        let Some(prev) = self.find_prev_locked(b, slot) else {
            return false;
        };
        self.unlink_locked(b, slot, prev);
        self.ctl().alloc.tombs.fetch_sub(1, Ordering::Relaxed);
        self.free_elem(slot);
        drop(_g);
        self.repair_if_needed();
        true
    }

    /// Test hook: a writer killed between taking capacity for `key` and linking it: takes the
    /// bucket lock, reserves an entry and an element, and returns with the lock held.
    #[doc(hidden)]
    pub fn debug_stop_mid_insert(&self, key: &[u8]) {
        let b = self.bucket(hash_key(key));
        let _ = b.lock.lock();
        assert!(
            self.reserve_entry(Some(b)),
            "debug_stop_mid_insert: the map is full"
        );
        let _ = self.alloc_elem(Some(b));
    }

    /// Test hook: takes the bucket lock of `key` and leaves it held with the bucket sequence
    /// odd, as a writer killed mid-unlink would.
    #[doc(hidden)]
    pub fn debug_hold_bucket_lock(&self, key: &[u8]) {
        let b = self.bucket(hash_key(key));
        let _ = b.lock.lock();
        let s = b.seq.load(Ordering::Relaxed);
        b.seq.store(s | 1, Ordering::Release);
    }
}
