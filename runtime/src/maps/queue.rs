//! QUEUE and STACK: a ring of max_entries + 1 value slots under the map's [`ShmLock`], as in
//! the kernel (which uses a raw spinlock). Each operation copies the value first and moves
//! head/tail with one store last, so a holder killed mid-operation leaves a consistent ring.

use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::*;
use super::lock::{Acquired, LockGuard};
use super::typed::typed_map;
use super::{Entry, EntryValue, MapError, MapHandle, MapType, BPF_EXIST, BPF_NOEXIST};

typed_map!(
    /// A QUEUE (pops the oldest value) or STACK (pops the newest).
    QueueMap,
    Queue,
    "queue or stack"
);

/// QUEUE / STACK definitions: no key.
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 0 || def.value_size == 0 || def.max_entries == 0 {
        return Err("queue/stack need key_size 0, value_size > 0, max_entries > 0".into());
    }
    Ok(())
}

/// Region layout after the control block at `cur`: the push sequence number of each slot
/// (for the forwarder's `pushes_since`), then max_entries + 1 value slots.
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    let slots = u64::from(def.max_entries) + 1;
    g.marks_off = cur;
    g.data_off = round_up(cur + slots * 8, 64);
    g.data_size = slots * u64::from(g.value_stride);
}

impl MapHandle {
    /// The map's lock; `EBUSY` when a live holder kept it past the lock timeout.
    fn qlock(&self, op: &'static str) -> Result<LockGuard<'_>, MapError> {
        self.map_lock(op, Self::repair_push_numbering)
    }

    /// The map-wide lock (queues, stacks, stack traces, LPM tries); `EBUSY` when a live holder
    /// kept it past the lock timeout. When it was taken over from a dead holder, `repair`
    /// fixes what that holder may have left half done (counted as a recovery).
    pub(super) fn map_lock(
        &self,
        op: &'static str,
        repair: impl FnOnce(&Self),
    ) -> Result<LockGuard<'_>, MapError> {
        let g = LockGuard::new(&self.ctl().alloc.lock).ok_or_else(|| self.err(op, libc::EBUSY))?;
        if g.acquired == Acquired::Recovered {
            self.count(ctr::RECOVERIES);
            repair(self);
        }
        Ok(g)
    }

    /// A pusher killed between publishing its value (the head store) and counting it leaves
    /// the newest queued value numbered like the next push would be: the next push would share
    /// its number and the forwarder would send one of them twice. Numbers continue after the
    /// newest queued one.
    fn repair_push_numbering(&self) {
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let head = a.qhead.load(Ordering::Relaxed) % size;
        let tail = a.qtail.load(Ordering::Relaxed) % size;
        if head == tail {
            return;
        }
        let newest = self.qseq((head + size - 1) % size).load(Ordering::Relaxed);
        let pushes = &self.ctl().counters.c[ctr::PUSHES];
        if pushes.load(Ordering::Relaxed) <= newest {
            pushes.store(newest + 1, Ordering::Release);
        }
    }

    #[inline]
    fn qslot(&self, i: u32) -> *mut u8 {
        let g = &self.geo;
        self.at(g.data_off + u64::from(i) * u64::from(g.value_stride))
    }

    #[inline]
    fn qseq(&self, i: u32) -> &AtomicU64 {
        // SAFETY: i < size; the sequence array holds max_entries + 1 u64s at marks_off.
        unsafe { &*(self.at(self.geo.marks_off) as *const AtomicU64).add(i as usize) }
    }

    fn qsize(&self) -> u32 {
        self.def.max_entries + 1
    }

    /// Copies the next value into `out` (value_size bytes; the helper's form, no allocation).
    fn take_into(&self, op: &'static str, remove: bool, out: &mut [u8]) -> Result<(), MapError> {
        let vs = self.def.value_size as usize;
        if out.len() < vs {
            return Err(self.err(op, libc::EINVAL));
        }
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let _g = self.qlock(op)?;
        let head = a.qhead.load(Ordering::Relaxed) % size;
        let tail = a.qtail.load(Ordering::Relaxed) % size;
        if head == tail {
            return Err(self.err(op, libc::ENOENT));
        }
        let idx = if self.def.map_type == MapType::Queue {
            tail
        } else {
            (head + size - 1) % size
        };
        // SAFETY: idx < size; out holds at least value_size bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.qslot(idx), out.as_mut_ptr(), vs) };
        if remove {
            if self.def.map_type == MapType::Queue {
                a.qtail.store((tail + 1) % size, Ordering::Release);
            } else {
                a.qhead.store(idx, Ordering::Release);
            }
            self.count(ctr::POPS);
        }
        Ok(())
    }

    pub(super) fn queue_len(&self) -> usize {
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let head = a.qhead.load(Ordering::Acquire) % size;
        let tail = a.qtail.load(Ordering::Acquire) % size;
        ((head + size - tail) % size) as usize
    }

    pub(super) fn queue_entries(&self) -> Vec<Entry> {
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let Ok(_g) = self.qlock("lookup") else {
            tracing::warn!(map = %self.name, "queue lock held too long: listing nothing");
            return Vec::new();
        };
        let head = a.qhead.load(Ordering::Relaxed) % size;
        let tail = a.qtail.load(Ordering::Relaxed) % size;
        let n = (head + size - tail) % size;
        let vs = self.def.value_size as usize;
        (0..n)
            .map(|k| {
                let idx = if self.def.map_type == MapType::Queue {
                    (tail + k) % size
                } else {
                    (head + size - 1 - k) % size
                };
                let mut v = vec![0u8; vs];
                // SAFETY: idx < size.
                unsafe { std::ptr::copy_nonoverlapping(self.qslot(idx), v.as_mut_ptr(), vs) };
                Entry {
                    key: Vec::new(),
                    value: EntryValue::Single(v),
                }
            })
            .collect()
    }
}

/// A value still queued, with its push sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedPush {
    /// The push's sequence number: pushes are numbered 0, 1, 2, ... in push order.
    pub seq: u64,
    /// The value pushed (value_size bytes).
    pub value: Vec<u8>,
}

impl QueueMap {
    /// Test hook: a pusher killed after publishing `value` and before counting the push: takes
    /// the lock, queues the value, and returns with the lock held and the count not advanced.
    #[doc(hidden)]
    pub fn debug_stop_mid_push(&self, value: &[u8]) {
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let _ = self.ctl().alloc.lock.lock();
        let head = a.qhead.load(Ordering::Relaxed) % size;
        // SAFETY: head < size; each slot holds value_stride >= value_size bytes.
        unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), self.qslot(head), value.len()) };
        let seq = self.ctl().counters.c[ctr::PUSHES].load(Ordering::Relaxed);
        self.qseq(head).store(seq, Ordering::Relaxed);
        a.qhead.store((head + 1) % size, Ordering::Release);
    }

    /// `bpf_map_push_elem`: BPF_EXIST on a full map drops the oldest value.
    pub fn push(&self, value: &[u8], flags: u64) -> Result<(), MapError> {
        if flags & BPF_NOEXIST != 0 || flags > BPF_EXIST {
            return Err(self.err("push", libc::EINVAL));
        }
        if value.len() != self.def.value_size as usize {
            return Err(self.err("push", libc::EINVAL));
        }
        let a = &self.ctl().alloc;
        let size = self.qsize();
        let _g = self.qlock("push")?;
        let head = a.qhead.load(Ordering::Relaxed) % size;
        let mut tail = a.qtail.load(Ordering::Relaxed) % size;
        if (head + 1) % size == tail {
            if flags != BPF_EXIST {
                self.count(ctr::FULL);
                return Err(self.err("push", libc::E2BIG));
            }
            tail = (tail + 1) % size;
            a.qtail.store(tail, Ordering::Release);
        }
        // SAFETY: head < size; each slot holds value_stride >= value_size bytes.
        unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), self.qslot(head), value.len()) };
        // Pushes are numbered under the lock, so the numbers are the push order.
        let seq = self.ctl().counters.c[ctr::PUSHES].load(Ordering::Relaxed);
        self.qseq(head).store(seq, Ordering::Relaxed);
        a.qhead.store((head + 1) % size, Ordering::Release);
        self.ctl().counters.c[ctr::PUSHES].store(seq + 1, Ordering::Release);
        self.ctl().dirty.dirty.store(1, Ordering::Release);
        Ok(())
    }

    /// `bpf_map_pop_elem`: ENOENT when empty.
    pub fn pop(&self) -> Result<Vec<u8>, MapError> {
        let mut v = vec![0u8; self.def.value_size as usize];
        self.take_into("pop", true, &mut v)?;
        Ok(v)
    }

    /// `bpf_map_peek_elem`: ENOENT when empty.
    pub fn peek(&self) -> Result<Vec<u8>, MapError> {
        let mut v = vec![0u8; self.def.value_size as usize];
        self.take_into("peek", false, &mut v)?;
        Ok(v)
    }

    /// `pop` into a caller buffer of at least value_size bytes (no allocation).
    pub fn pop_into(&self, out: &mut [u8]) -> Result<(), MapError> {
        self.take_into("pop", true, out)
    }

    /// `peek` into a caller buffer of at least value_size bytes (no allocation).
    pub fn peek_into(&self, out: &mut [u8]) -> Result<(), MapError> {
        self.take_into("peek", false, out)
    }

    /// For the forwarder of a QUEUE/STACK: the values pushed with sequence number >= `since`
    /// that are still queued, oldest push first, and the sequence number to pass next time.
    /// Values pushed and popped in between are not seen (the kernel mirror would not have
    /// kept them either once popped by a program).
    pub fn pushes_since(&self, since: u64) -> Result<(Vec<QueuedPush>, u64), MapError> {
        let a = &self.ctl().alloc;
        let size = self.qsize();
        // Cleared before reading, so a push that lands after this read sets it again.
        self.ctl().dirty.dirty.swap(0, Ordering::SeqCst);
        let _g = self.qlock("pushes_since")?;
        let head = a.qhead.load(Ordering::Relaxed) % size;
        let tail = a.qtail.load(Ordering::Relaxed) % size;
        let next = self.ctl().counters.c[ctr::PUSHES].load(Ordering::Relaxed);
        let vs = self.def.value_size as usize;
        let mut out = Vec::new();
        let mut i = tail;
        while i != head {
            let seq = self.qseq(i).load(Ordering::Relaxed);
            if seq >= since {
                let mut v = vec![0u8; vs];
                // SAFETY: i < size.
                unsafe { std::ptr::copy_nonoverlapping(self.qslot(i), v.as_mut_ptr(), vs) };
                out.push(QueuedPush { seq, value: v });
            }
            i = (i + 1) % size;
        }
        out.sort_by_key(|p| p.seq);
        // Never hand back a number at or below one returned: the caller would see that push
        // again (a dead pusher can leave the count behind its published value).
        let next = out.last().map_or(next, |p| next.max(p.seq + 1));
        Ok((out, next))
    }
}
