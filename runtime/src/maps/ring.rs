//! RINGBUF (the kernel's layout) and PERF_EVENT_ARRAY (one such ring per CPU).
//!
//! A ring is a consumer page (consumer_pos at offset 0), a producer page (producer_pos at
//! offset 0) and a power-of-two data area mapped twice back to back, so a record that wraps is
//! contiguous. Records have the kernel's 8-byte header: `len` with BUSY (bit 31) and DISCARD
//! (bit 30), then a u32 that the kernel uses for a page offset and we use for the producer's
//! pid (consumers such as libbpf ignore it). Producers serialise their short reservation step
//! on a [`ShmLock`] kept in the producer page; submit/discard is one atomic store.
//!
//! A producer killed between reserve and submit leaves a BUSY record. The kernel never has
//! that problem; we cannot wait forever, so [`RingBufConsumer`] discards a record that stays
//! BUSY while its producer pid no longer runs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpftime_abi::ringbuf;

use super::layout::*;
use super::lock::{current_pid, task_alive, Acquired, LockGuard, ShmLock};
use super::segment::file::{page_size, RingMapping};
use super::typed::typed_map;
use super::{current_cpu, MapError, MapHandle, BPF_F_CURRENT_CPU, BPF_F_INDEX_MASK};

struct Ring<'a> {
    base: *mut u8,
    pg: usize,
    size: u64,
    _m: std::marker::PhantomData<&'a RingMapping>,
}

impl Ring<'_> {
    #[inline]
    fn cons(&self) -> &AtomicU64 {
        // SAFETY: offset 0 of the consumer page of a live ring mapping.
        unsafe { &*(self.base as *const AtomicU64) }
    }
    #[inline]
    fn prod(&self) -> &AtomicU64 {
        // SAFETY: offset 0 of the producer page.
        unsafe { &*(self.base.add(self.pg) as *const AtomicU64) }
    }
    #[inline]
    fn lock(&self) -> &ShmLock {
        // SAFETY: inside the producer page, 4-aligned.
        unsafe { &*(self.base.add(self.pg + RING_LOCK_OFF) as *const ShmLock) }
    }
    #[inline]
    /// A USER_RINGBUF's consumer lock (the kernel's `rb->busy`), on the consumer page, which
    /// user-space producers map read-only.
    fn drain_lock(&self) -> &ShmLock {
        // SAFETY: the consumer page is a whole page; offset 64 is past consumer_pos.
        unsafe { &*(self.base.add(RING_LOCK_OFF) as *const ShmLock) }
    }

    fn waiting(&self) -> &AtomicU32 {
        // SAFETY: inside the producer page, 4-aligned.
        unsafe { &*(self.base.add(self.pg + RING_WAITING_OFF) as *const AtomicU32) }
    }
    #[inline]
    fn wake(&self) -> &AtomicU32 {
        // SAFETY: inside the producer page, 4-aligned.
        unsafe { &*(self.base.add(self.pg + RING_WAKE_OFF) as *const AtomicU32) }
    }
    #[inline]
    fn lost(&self) -> &AtomicU64 {
        // SAFETY: inside the producer page, 8-aligned.
        unsafe { &*(self.base.add(self.pg + RING_LOST_OFF) as *const AtomicU64) }
    }
    #[inline]
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area starts two pages in; it is mapped twice (2 * size bytes).
        unsafe { self.base.add(2 * self.pg) }
    }
    #[inline]
    fn hdr(&self, pos: u64) -> &AtomicU32 {
        // SAFETY: pos & mask < size, headers are 8-aligned and never straddle the end.
        unsafe { &*(self.data().add((pos & (self.size - 1)) as usize) as *const AtomicU32) }
    }
}

/// RINGBUF definitions: no key or value; the size is a power-of-2 number of pages.
pub(super) fn validate_ringbuf(def: &super::MapDef, pg: u64) -> Result<(), String> {
    if def.key_size != 0 || def.value_size != 0 {
        return Err("ringbuf needs key_size 0 and value_size 0".into());
    }
    let m = def.max_entries;
    if !m.is_power_of_two() || !u64::from(m).is_multiple_of(pg) {
        return Err(format!(
            "ringbuf max_entries {m} must be a power of 2 and a multiple of the page size"
        ));
    }
    Ok(())
}

/// PERF_EVENT_ARRAY definitions: 4-byte keys (the CPU) and values.
pub(super) fn validate_perf_event_array(def: &super::MapDef) -> Result<(), String> {
    if def.key_size != 4 || def.value_size != 4 {
        return Err("perf_event_array needs key_size 4 and value_size 4".into());
    }
    Ok(())
}

/// Region layout: one ring of max_entries bytes from the next page.
pub(super) fn plan_ringbuf(g: &mut Geometry, def: &super::MapDef, cur: u64, pg: u64) {
    g.rings = 1;
    g.data_size = u64::from(def.max_entries);
    g.data_off = round_up(cur, pg);
}

/// Region layout: one ring of [`PERF_RING_DATA`] bytes per CPU from the next page.
pub(super) fn plan_perf_event_array(g: &mut Geometry, ncpu: u32, cur: u64, pg: u64) {
    g.rings = ncpu;
    g.data_size = PERF_RING_DATA as u64;
    g.data_off = round_up(cur, pg);
}

/// One record handed to a consumer callback.
#[derive(Debug)]
pub struct RingRecord<'a> {
    /// Ring index: 0 for a RINGBUF, the CPU for a PERF_EVENT_ARRAY.
    pub ring: u32,
    /// The record's bytes, in the ring's shared memory (valid during the callback only).
    pub data: &'a [u8],
}

impl MapHandle {
    fn ring(&self, i: u32) -> Option<Ring<'_>> {
        let rings = self.rings.as_ref()?;
        let r = rings.get(i as usize)?;
        Some(Ring {
            base: r.base(),
            pg: page_size(),
            size: self.geo.data_size,
            _m: std::marker::PhantomData,
        })
    }

    pub(super) fn ring_lost(&self) -> u64 {
        (0..self.geo.rings)
            .filter_map(|i| self.ring(i))
            .map(|r| r.lost().load(Ordering::Relaxed))
            .sum()
    }

    fn ring_reserve(&self, ri: u32, size: u64) -> Option<*mut u8> {
        let r = self.ring(ri)?;
        if size > u64::from(u32::MAX >> 2) {
            return None;
        }
        let len = ringbuf::record_len(size as usize) as u64;
        if len > r.size {
            return None;
        }
        let Some(g) = LockGuard::new(r.lock()) else {
            r.lost().fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if g.acquired == Acquired::Recovered {
            // The dead holder either published producer_pos or did not; the header it may
            // have written beyond producer_pos is overwritten by the next reservation.
            self.count(ctr::RECOVERIES);
        }
        // Acquire pairs with the consumer's release store of consumer_pos (ours in `poll`, or
        // libbpf's smp_store_release in ringbuf_process_ring()): the space before it is free.
        let cons = r.cons().load(Ordering::Acquire);
        let prod = r.prod().load(Ordering::Relaxed);
        let new = prod.wrapping_add(len);
        // The kernel keeps the producer at most size - 1 bytes ahead; so do we. Positions are
        // shared memory anyone mapping the ring can write: compare with wrapping arithmetic, so
        // garbage refuses the record instead of overflowing.
        if new.wrapping_sub(cons) > r.size - 1 {
            drop(g);
            r.lost().fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let h = r.hdr(prod);
        h.store(size as u32 | ringbuf::BUSY_BIT, Ordering::Relaxed);
        // SAFETY: the pid word follows the len word in the 8-byte header.
        unsafe {
            (*(h as *const AtomicU32).add(1)).store(current_pid(), Ordering::Relaxed);
        }
        // Release: the consumer sees the BUSY header before the new producer_pos; pairs with
        // the acquire load of producer_pos in `poll` and in libbpf's ringbuf_process_ring()
        // (the kernel's __bpf_ringbuf_reserve() publishes it the same way).
        r.prod().store(new, Ordering::Release);
        drop(g);
        // SAFETY: the record body follows its header; the double mapping keeps it contiguous.
        Some(unsafe {
            r.data()
                .add(((prod & (r.size - 1)) as usize) + ringbuf::HDR_SZ)
        })
    }

    fn ring_commit(
        &self,
        ri: u32,
        sample: *mut u8,
        discard: bool,
        op: &'static str,
    ) -> Result<(), MapError> {
        let r = self.ring(ri).ok_or_else(|| self.err(op, libc::EINVAL))?;
        let data = r.data() as usize;
        let p = sample as usize;
        if p < data + ringbuf::HDR_SZ
            || p >= data + r.size as usize + ringbuf::HDR_SZ
            || (p - data) & 7 != 0
        {
            return Err(self.err(op, libc::EINVAL));
        }
        // SAFETY: validated to be 8 bytes after a header position inside the first data copy.
        let h = unsafe { &*((sample.sub(ringbuf::HDR_SZ)) as *const AtomicU32) };
        let cur = h.load(Ordering::Relaxed);
        if cur & ringbuf::BUSY_BIT == 0 {
            return Err(self.err(op, libc::EINVAL));
        }
        let mut new = cur & !ringbuf::BUSY_BIT;
        if discard {
            new |= ringbuf::DISCARD_BIT;
        }
        // Release: the body written through the sample pointer is visible with the header;
        // pairs with the consumer's acquire load of the header (`poll`; libbpf's
        // smp_load_acquire(len_ptr)), as the kernel's bpf_ringbuf_commit() xchg does.
        h.store(new, Ordering::Release);
        self.wake_waiting_consumer();
        Ok(())
    }

    /// Wakes a consumer sleeping in [`MapHandle::wait_for_records`], as the kernel's
    /// `bpf_ringbuf_commit` wakes a waiting consumer (through irq_work): only when one waits,
    /// so a commit costs a fence and a load, not a system call.
    #[inline]
    fn wake_waiting_consumer(&self) {
        let Some(r0) = self.ring(0) else { return };
        // StoreLoad: the record (reserved and committed above) before the read of the flag;
        // pairs with the fence in `wait_for_records` between its store of the flag and its
        // re-check of the positions: either it sees this record or we see it waiting.
        std::sync::atomic::fence(Ordering::SeqCst);
        if r0.waiting().load(Ordering::Relaxed) != 0 {
            r0.wake().fetch_add(1, Ordering::Release);
            super::lock::futex_wake(r0.wake(), i32::MAX);
        }
    }

    /// Sleeps until a producer commits a record to this RINGBUF or PERF_EVENT_ARRAY (in any
    /// process), or `timeout` passes; returns at once if records wait already. For one
    /// consumer at a time (the flag is one word); a target rewriting the words can only cause
    /// spurious or missed wakeups, which the timeout bounds.
    pub fn wait_for_records(&self, timeout: Duration) {
        let Some(r0) = self.ring(0) else {
            std::thread::sleep(timeout);
            return;
        };
        let seq = r0.wake().load(Ordering::Acquire);
        r0.waiting().store(1, Ordering::Relaxed);
        // StoreLoad: the flag before the re-check; pairs with `wake_waiting_consumer`.
        std::sync::atomic::fence(Ordering::SeqCst);
        let pending = (0..self.geo.rings).any(|i| self.ring_pending(i) > 0);
        if !pending {
            super::lock::futex_wait(r0.wake(), seq, timeout);
        }
        r0.waiting().store(0, Ordering::Relaxed);
    }

    /// Bytes waiting in ring `i`.
    pub(super) fn ring_pending(&self, i: u32) -> u64 {
        self.ring(i).map_or(0, |r| {
            r.prod()
                .load(Ordering::Acquire)
                .saturating_sub(r.cons().load(Ordering::Acquire))
        })
    }
}

typed_map!(
    /// A RINGBUF: the kernel's ring layout, so consumers in any process (and kernel-style
    /// consumers) read it.
    RingBuf,
    RingBuf,
    "ringbuf"
);

typed_map!(
    /// A PERF_EVENT_ARRAY: one ring per CPU.
    PerfEventArray,
    PerfEventArray,
    "perf_event_array"
);

/// `BPF_MAX_USER_RINGBUF_SAMPLES`: the most records one `bpf_user_ringbuf_drain` takes.
pub const MAX_USER_RINGBUF_SAMPLES: u64 = 128 * 1024;

/// Why a drain step stopped (the kernel's `__bpf_user_ringbuf_peek` errnos).
enum Peek {
    Sample(*mut u8, u32),
    Empty,
    Discarded,
    Invalid(i32),
}

impl RingBuf {
    /// Kernel `__bpf_user_ringbuf_peek`: the next committed record of a USER_RINGBUF (the
    /// producer is user space), or why there is none.
    fn user_peek(&self) -> Peek {
        let Some(r) = self.ring(0) else {
            return Peek::Invalid(libc::EINVAL);
        };
        let prod = r.prod().load(Ordering::Acquire);
        if prod % 8 != 0 {
            return Peek::Invalid(libc::EINVAL);
        }
        let cons = r.cons().load(Ordering::Acquire);
        if cons >= prod {
            return Peek::Empty;
        }
        let word = r.hdr(cons).load(Ordering::Acquire);
        let len = ringbuf::payload_len(word);
        let total = ringbuf::record_len(len as usize) as u64;
        if total > prod - cons {
            return Peek::Invalid(libc::EINVAL);
        }
        if total > r.size {
            return Peek::Invalid(libc::E2BIG);
        }
        if word & ringbuf::DISCARD_BIT != 0 {
            r.cons().store(cons + total, Ordering::Release);
            return Peek::Discarded;
        }
        if word & ringbuf::BUSY_BIT != 0 {
            return Peek::Empty;
        }
        // SAFETY: the record lies inside the ring (checked against the producer and the ring
        // size above); the double mapping keeps it contiguous.
        let sample = unsafe {
            r.data()
                .add(((cons & (r.size - 1)) as usize) + ringbuf::HDR_SZ)
        };
        Peek::Sample(sample, len)
    }

    /// Kernel `bpf_user_ringbuf_drain(map, callback, ctx, flags)` on a USER_RINGBUF: calls
    /// `f(sample, size)` for each committed record (discarded ones are skipped), releasing
    /// each after its call, until the ring is empty, `f` returns non-zero (that record
    /// counts) or [`MAX_USER_RINGBUF_SAMPLES`] were taken. Returns the records drained, or
    /// the kernel's errno: `EINVAL` for bad flags or a corrupt ring, `E2BIG` for a record
    /// larger than the ring, `EBUSY` while another drain runs.
    pub fn drain_user<E>(
        &self,
        flags: u64,
        mut f: impl FnMut(*mut u8, u32) -> Result<u64, E>,
    ) -> Result<Result<u64, i32>, E> {
        use bpftime_abi::flags::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
        if flags & !(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP) != 0 {
            return Ok(Err(libc::EINVAL));
        }
        let Some(r) = self.ring(0) else {
            return Ok(Err(libc::EINVAL));
        };
        // One consumer at a time, as the kernel's `rb->busy` (EBUSY, no waiting), unless the
        // holder died mid-drain: its lock is taken over.
        let Some(busy) = LockGuard::try_new(r.drain_lock()) else {
            return Ok(Err(libc::EBUSY));
        };
        if busy.acquired == Acquired::Recovered {
            self.count(ctr::RECOVERIES);
        }
        let (mut samples, mut discarded) = (0u64, 0u64);
        let mut ret = 0u64;
        while samples < MAX_USER_RINGBUF_SAMPLES && ret == 0 {
            match self.user_peek() {
                Peek::Empty => break,
                Peek::Discarded => discarded += 1,
                Peek::Invalid(e) => return Ok(Err(e)),
                Peek::Sample(sample, size) => {
                    ret = f(sample, size)?;
                    let cons = r.cons().load(Ordering::Relaxed);
                    let total = ringbuf::record_len(size as usize) as u64;
                    r.cons().store(cons + total, Ordering::Release);
                }
            }
            samples += 1;
        }
        Ok(Ok(samples - discarded))
    }

    /// `bpf_ringbuf_reserve`: a pointer to `size` writable bytes, or None when the ring is
    /// full, the size is too large or `flags` is not 0 (the kernel returns NULL in all three
    /// cases).
    pub fn reserve(&self, size: u64, flags: u64) -> Option<*mut u8> {
        if flags != 0 {
            return None;
        }
        self.ring_reserve(0, size)
    }

    /// `bpf_ringbuf_submit` of a pointer returned by [`reserve`](Self::reserve).
    pub fn submit(&self, sample: *mut u8, _flags: u64) -> Result<(), MapError> {
        self.ring_commit(0, sample, false, "ringbuf_submit")
    }

    /// `bpf_ringbuf_discard`.
    pub fn discard(&self, sample: *mut u8, _flags: u64) -> Result<(), MapError> {
        self.ring_commit(0, sample, true, "ringbuf_discard")
    }

    /// `bpf_ringbuf_output`: EAGAIN when full, EINVAL for unknown flags.
    pub fn output(&self, data: &[u8], flags: u64) -> Result<(), MapError> {
        if flags & !(super::BPF_RB_NO_WAKEUP | super::BPF_RB_FORCE_WAKEUP) != 0 {
            return Err(self.err("ringbuf_output", libc::EINVAL));
        }
        let p = self
            .ring_reserve(0, data.len() as u64)
            .ok_or_else(|| self.err("ringbuf_output", libc::EAGAIN))?;
        // SAFETY: p points at data.len() reserved bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        self.ring_commit(0, p, false, "ringbuf_output")
    }

    /// Bytes waiting for the consumer (`BPF_RB_AVAIL_DATA`).
    pub fn pending(&self) -> u64 {
        self.ring_pending(0)
    }

    /// Test hook: takes the ring's reservation lock and leaves it held, as a producer killed
    /// in the middle of a reservation would.
    #[doc(hidden)]
    pub fn debug_hold_reserve_lock(&self) {
        if let Some(r) = self.ring(0) {
            let _ = r.lock().lock();
        }
    }
}

impl PerfEventArray {
    /// `bpf_perf_event_output` into the ring of the CPU named by `flags` (BPF_F_CURRENT_CPU or
    /// an index). E2BIG for an index beyond the array, ENOSPC when that ring is full.
    pub fn output(&self, flags: u64, data: &[u8]) -> Result<(), MapError> {
        const OP: &str = "perf_event_output";
        if flags & !BPF_F_INDEX_MASK != 0 {
            return Err(self.err(OP, libc::EINVAL));
        }
        let rings = self.geo.rings;
        let idx = if flags & BPF_F_INDEX_MASK == BPF_F_CURRENT_CPU {
            current_cpu(self.ncpu)
        } else {
            (flags & BPF_F_INDEX_MASK) as u32
        };
        if idx >= self.def.max_entries {
            return Err(self.err(OP, libc::E2BIG));
        }
        if idx >= rings {
            return Err(self.err(OP, libc::ENOENT));
        }
        let p = self
            .ring_reserve(idx, data.len() as u64)
            .ok_or_else(|| self.err(OP, libc::ENOSPC))?;
        // SAFETY: p points at data.len() reserved bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        self.ring_commit(idx, p, false, OP)
    }

    /// Bytes waiting in the ring of `cpu`.
    pub fn pending(&self, cpu: u32) -> u64 {
        self.ring_pending(cpu)
    }
}

/// Reads records from a RINGBUF or all CPU rings of a PERF_EVENT_ARRAY, in this or any other
/// process. One consumer per map at a time (as with the kernel's consumer_pos).
pub struct RingBufConsumer {
    map: MapHandle,
    rings: Arc<Vec<RingMapping>>,
    /// Position and first sighting of a BUSY record per ring, to time out dead producers.
    stuck: Vec<Option<(u64, Instant)>>,
    dead_after: Duration,
}

impl RingBufConsumer {
    /// A consumer of `map`'s rings; EINVAL if `map` is neither a RINGBUF nor a
    /// PERF_EVENT_ARRAY.
    pub fn new(map: &MapHandle) -> Result<Self, MapError> {
        let rings = map
            .rings
            .clone()
            .ok_or_else(|| map.err("ringbuf_consume", libc::EINVAL))?;
        let n = rings.len();
        Ok(Self {
            map: map.clone(),
            rings,
            stuck: vec![None; n],
            dead_after: Duration::from_millis(5),
        })
    }

    /// Calls `f` for every committed record available now, skipping discarded ones; returns
    /// how many it delivered.
    pub fn poll(&mut self, mut f: impl FnMut(RingRecord<'_>)) -> usize {
        let mut n = 0;
        for ri in 0..self.rings.len() as u32 {
            n += self.poll_ring(ri, &mut f);
        }
        n
    }

    /// Polls until at least one record arrived or `timeout` passed.
    pub fn poll_timeout(&mut self, timeout: Duration, mut f: impl FnMut(RingRecord<'_>)) -> usize {
        let start = Instant::now();
        let mut sleep = Duration::from_micros(20);
        loop {
            let n = self.poll(&mut f);
            if n > 0 || start.elapsed() >= timeout {
                return n;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(5));
        }
    }

    fn poll_ring(&mut self, ri: u32, f: &mut impl FnMut(RingRecord<'_>)) -> usize {
        let map = self.map.clone();
        let Some(r) = map.ring(ri) else { return 0 };
        let mut n = 0;
        let mut cons = r.cons().load(Ordering::Acquire);
        loop {
            let prod = r.prod().load(Ordering::Acquire);
            if cons >= prod {
                break;
            }
            // Producers (targets) can write anything into the ring: a producer position more
            // than a ring ahead, or a record longer than what is left, is corruption. Skip to
            // the producer and count it; never read outside the mapping.
            if prod - cons > r.size {
                self.skip_corrupt(&r, ri, prod);
                break;
            }
            let h = r.hdr(cons);
            let word = h.load(Ordering::Acquire);
            if word & ringbuf::BUSY_BIT != 0 {
                if !self.reap_dead(ri, cons, h, word) {
                    break;
                }
                continue;
            }
            self.stuck[ri as usize] = None;
            let len = ringbuf::payload_len(word) as u64;
            let step = ringbuf::record_len(len as usize) as u64;
            if step > prod - cons {
                self.skip_corrupt(&r, ri, prod);
                break;
            }
            if word & ringbuf::DISCARD_BIT == 0 {
                // SAFETY: a committed record of `len` bytes follows the header, inside the
                // ring (checked above: it ends before the producer, at most a ring away); the
                // double mapping keeps it contiguous even when it wraps.
                let data = unsafe {
                    std::slice::from_raw_parts(
                        (h as *const AtomicU32 as *const u8).add(ringbuf::HDR_SZ),
                        len as usize,
                    )
                };
                f(RingRecord { ring: ri, data });
                n += 1;
            }
            cons += step;
            r.cons().store(cons, Ordering::Release);
        }
        n
    }

    #[cold]
    fn skip_corrupt(&mut self, r: &Ring<'_>, ri: u32, prod: u64) {
        r.cons().store(prod, Ordering::Release);
        self.stuck[ri as usize] = None;
        self.map.count(ctr::LOST);
        tracing::warn!(
            map = self.map.name(),
            ring = ri,
            "ring positions or a record header are corrupt: skipped to the producer"
        );
    }

    /// Marks a BUSY record discarded if it has been BUSY a while and its producer is gone.
    fn reap_dead(&mut self, ri: u32, pos: u64, h: &AtomicU32, word: u32) -> bool {
        let slot = &mut self.stuck[ri as usize];
        match slot {
            Some((p, since)) if *p == pos => {
                if since.elapsed() < self.dead_after {
                    return false;
                }
            }
            _ => {
                *slot = Some((pos, Instant::now()));
                return false;
            }
        }
        // SAFETY: the pid word follows the len word.
        let pid = unsafe { (*(h as *const AtomicU32).add(1)).load(Ordering::Relaxed) };
        if task_alive(pid) {
            *slot = Some((pos, Instant::now()));
            return false;
        }
        let new = (word & !ringbuf::BUSY_BIT) | ringbuf::DISCARD_BIT;
        if h.compare_exchange(word, new, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.map.count(ctr::DEAD_RECORDS);
            tracing::warn!(
                map = self.map.name(),
                pid,
                "discarded a ringbuf record reserved by a dead process"
            );
        }
        *slot = None;
        true
    }

    /// Sets how long a record must stay BUSY before its producer's liveness is checked.
    pub fn set_dead_producer_timeout(&mut self, d: Duration) {
        self.dead_after = d;
    }
}
