//! STACK_TRACE: call stacks stored by id, as `kernel/bpf/stackmap.c` keeps them.
//!
//! The id of a stack is `jhash2(ips, 0) & (n_buckets - 1)` with `n_buckets` the next power of
//! two of `max_entries`, so the same stack gets the id the kernel gives it. A bucket holds one
//! stack (its hash, depth and addresses); at most `max_entries` buckets are filled at a time
//! (the kernel's preallocated element pool: a stack that needs one more fails with `ENOMEM`).
//!
//! Writers (`bpf_get_stackid` storing a new stack, deletes) serialise on the map's
//! [`ShmLock`](super::lock); each bucket has a sequence word, odd while a writer fills it, so
//! the common case — a stack already stored — is checked without the lock. A writer killed
//! mid-fill leaves its bucket's sequence odd: the next holder of the lock empties such buckets
//! and recounts (the kernel swaps whole buckets with `xchg` and cannot tear one).

use std::sync::atomic::{fence, AtomicU32, Ordering};

use bpftime_abi::flags::{
    BPF_F_FAST_STACK_CMP, BPF_F_NUMA_NODE, BPF_F_RDONLY, BPF_F_REUSE_STACKID,
    BPF_F_SKIP_FIELD_MASK, BPF_F_STACK_BUILD_ID, BPF_F_USER_STACK, BPF_F_WRONLY,
};

use super::layout::*;
use super::lock::LockGuard;
use super::typed::typed_map;
use super::{Entry, EntryValue, MapError, MapHandle};

typed_map!(
    /// A STACK_TRACE map: stacks by id, filled by `bpf_get_stackid`.
    StackTraceMap,
    StackTrace,
    "stack_trace"
);

/// The kernel's `sysctl_perf_event_max_stack` default: the deepest stack a map may hold and a
/// walk collects.
pub const PERF_MAX_STACK_DEPTH: u32 = 127;

/// The flags `bpf_get_stackid` accepts.
const STACKID_FLAGS: u64 =
    BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID;

/// Bucket header; the stack's addresses (value_size bytes) follow.
#[repr(C)]
struct BucketHdr {
    /// Odd while a writer fills or empties the bucket.
    seq: AtomicU32,
    /// Addresses stored; 0 = empty bucket.
    nr: AtomicU32,
    hash: AtomicU32,
    _pad: u32,
}

const HDR: u64 = std::mem::size_of::<BucketHdr>() as u64;

/// `jhash2` over the addresses as 32-bit words, as `__bpf_get_stackid` hashes a trace.
fn stack_hash(ips: &[u64]) -> u32 {
    let words: Vec<u32> = ips
        .iter()
        .flat_map(|ip| [*ip as u32, (*ip >> 32) as u32])
        .collect();
    super::jhash::jhash2(&words, 0)
}

/// STACK_TRACE definitions, checked as `stack_map_alloc` does.
pub(super) fn validate(def: &super::MapDef) -> Result<(), String> {
    if def.flags & BPF_F_STACK_BUILD_ID != 0 {
        return Err(
            "build-id stacks (BPF_F_STACK_BUILD_ID) are not supported in user space: \
                    store addresses and resolve them with the process's maps"
                .into(),
        );
    }
    if def.flags & !(BPF_F_NUMA_NODE | BPF_F_RDONLY | BPF_F_WRONLY) != 0 {
        return Err(format!(
            "stack_trace flags {:#x} not allowed (EINVAL)",
            def.flags
        ));
    }
    if def.key_size != 4
        || def.value_size < 8
        || !def.value_size.is_multiple_of(8)
        || def.max_entries == 0
    {
        return Err(
            "stack_trace needs key_size 4, value_size a multiple of 8, max_entries > 0 \
                    (EINVAL)"
                .into(),
        );
    }
    if def.value_size / 8 > PERF_MAX_STACK_DEPTH {
        return Err(format!(
            "stack_trace value_size {} holds more than {PERF_MAX_STACK_DEPTH} frames \
             (perf_event_max_stack; EINVAL)",
            def.value_size
        ));
    }
    if def.max_entries > 1 << 31 {
        return Err("stack_trace max_entries above 2^31 (E2BIG)".into());
    }
    Ok(())
}

/// Region layout: `n_buckets` buckets of header + addresses.
pub(super) fn plan(g: &mut Geometry, def: &super::MapDef, cur: u64) {
    g.n_buckets = def.max_entries.next_power_of_two();
    g.elem_size = (HDR + u64::from(def.value_size)) as u32;
    g.data_off = round_up(cur, 64);
    g.data_size = u64::from(g.n_buckets) * u64::from(g.elem_size);
}

impl StackTraceMap {
    /// Deepest stack a bucket holds (`value_size / 8`).
    pub fn max_depth(&self) -> u32 {
        self.def.value_size / 8
    }

    /// Bucket count (ids are `0..n_buckets`).
    pub fn n_buckets(&self) -> u32 {
        self.geo.n_buckets
    }

    fn bucket(&self, id: u32) -> (&BucketHdr, *mut u64) {
        let off = self.geo.data_off + u64::from(id) * u64::from(self.geo.elem_size);
        let p = self.at(off);
        // SAFETY: id < n_buckets (callers check), so the bucket lies inside the region the
        // geometry planned; the header is 8-byte aligned (elem_size and data_off are).
        unsafe { (&*(p as *const BucketHdr), p.add(HDR as usize) as *mut u64) }
    }

    /// The stack in bucket `id` with its hash, read consistently (`None`: empty).
    fn read_bucket(&self, id: u32) -> Option<(u32, Vec<u64>)> {
        let (h, ips) = self.bucket(id);
        let max = self.max_depth() as usize;
        for _ in 0..1000 {
            let s1 = h.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let nr = (h.nr.load(Ordering::Relaxed) as usize).min(max);
            let hash = h.hash.load(Ordering::Relaxed);
            let stack: Vec<u64> = (0..nr)
                // SAFETY: i < max_depth: inside the bucket's addresses.
                .map(|i| unsafe { std::ptr::read_volatile(ips.add(i)) })
                .collect();
            fence(Ordering::Acquire);
            if h.seq.load(Ordering::Relaxed) == s1 {
                return (nr > 0).then_some((hash, stack));
            }
        }
        // A writer that died mid-fill (odd forever until the next lock holder repairs it):
        // the bucket has no stack anyone can rely on.
        None
    }

    /// Runs `write` on bucket `id` with its sequence odd (readers retry meanwhile); the
    /// caller holds the map's lock.
    fn write_bucket(&self, id: u32, write: impl FnOnce(&BucketHdr, *mut u64)) {
        let (h, dst) = self.bucket(id);
        let s = h.seq.load(Ordering::Relaxed);
        h.seq.store(s | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        write(h, dst);
        h.seq.store((s | 1).wrapping_add(1), Ordering::Release);
    }

    fn lock(&self, op: &'static str) -> Result<LockGuard<'_>, MapError> {
        self.map_lock(op, |_| self.repair())
    }

    /// After a writer died holding the lock: empty the bucket it was filling and recount.
    fn repair(&self) {
        let mut count = 0;
        for id in 0..self.n_buckets() {
            let (h, _) = self.bucket(id);
            let s = h.seq.load(Ordering::Relaxed);
            if s & 1 != 0 {
                h.nr.store(0, Ordering::Relaxed);
                h.seq.store(s.wrapping_add(1), Ordering::Release);
                self.count(ctr::REPAIRS);
            }
            if h.nr.load(Ordering::Relaxed) != 0 {
                count += 1;
            }
        }
        self.ctl().alloc.count.store(count, Ordering::Relaxed);
    }

    /// Kernel `__bpf_get_stackid` on a collected trace (`ips`, innermost first, before
    /// skipping): the stack's id, or the errno `bpf_get_stackid` returns negated (`EFAULT`
    /// when nothing is left after skipping, `EEXIST` on a colliding stack without
    /// `BPF_F_REUSE_STACKID`, `ENOMEM` when `max_entries` stacks are stored, `EINVAL` for
    /// unknown flags).
    pub fn store(&self, ips: &[u64], flags: u64) -> Result<u32, i32> {
        if flags & !STACKID_FLAGS != 0 {
            return Err(libc::EINVAL);
        }
        let skip = (flags & BPF_F_SKIP_FIELD_MASK) as usize;
        if ips.len() <= skip {
            return Err(libc::EFAULT);
        }
        let max = self.max_depth() as usize;
        let ips = &ips[skip..ips.len().min(skip + max)];
        let hash = stack_hash(ips);
        let id = hash & (self.n_buckets() - 1);
        let fast = flags & BPF_F_FAST_STACK_CMP != 0;
        let same = |stored: &Option<(u32, Vec<u64>)>| match stored {
            Some((h, s)) => *h == hash && (fast || s.as_slice() == ips),
            None => false,
        };
        let stored = self.read_bucket(id);
        if same(&stored) {
            return Ok(id);
        }
        let _g = self.lock("get_stackid").map_err(|e| e.errno())?;
        // Again under the lock: another writer may have filled the bucket meanwhile.
        let stored = self.read_bucket(id);
        if same(&stored) {
            return Ok(id);
        }
        if stored.is_some() && flags & BPF_F_REUSE_STACKID == 0 {
            return Err(libc::EEXIST);
        }
        let a = &self.ctl().alloc;
        // The kernel takes a fresh element from its pool of max_entries even to replace.
        if a.count.load(Ordering::Relaxed) >= self.def.max_entries {
            self.count(ctr::FULL);
            return Err(libc::ENOMEM);
        }
        self.write_bucket(id, |h, dst| {
            h.hash.store(hash, Ordering::Relaxed);
            h.nr.store(ips.len() as u32, Ordering::Relaxed);
            for (i, ip) in ips.iter().enumerate() {
                // SAFETY: i < max_depth: inside the bucket's addresses.
                unsafe { std::ptr::write_volatile(dst.add(i), *ip) };
            }
        });
        if stored.is_none() {
            a.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(id)
    }

    /// User-space lookup (`bpf_stackmap_copy`): the stack of `id` as value_size bytes (the
    /// addresses, then zeros); `None` for an empty bucket or an id beyond the buckets.
    pub fn get(&self, id: u32) -> Option<Vec<u8>> {
        if id >= self.n_buckets() {
            return None;
        }
        let (_, stack) = self.read_bucket(id)?;
        let mut v: Vec<u8> = stack.iter().flat_map(|ip| ip.to_le_bytes()).collect();
        v.resize(self.def.value_size as usize, 0);
        Some(v)
    }

    /// Kernel `stack_map_delete_elem`: `E2BIG` beyond the buckets, `ENOENT` when empty.
    pub fn delete(&self, id: u32) -> Result<(), MapError> {
        if id >= self.n_buckets() {
            return Err(self.err("delete", libc::E2BIG));
        }
        let _g = self.lock("delete")?;
        if self.bucket(id).0.nr.load(Ordering::Relaxed) == 0 {
            return Err(self.err("delete", libc::ENOENT));
        }
        self.write_bucket(id, |h, _| h.nr.store(0, Ordering::Relaxed));
        self.ctl().alloc.count.fetch_sub(1, Ordering::Relaxed);
        self.count(ctr::DELETES);
        Ok(())
    }

    /// Kernel `stack_map_get_next_key`: the first filled id after `id` (from 0 when `id` is
    /// absent, beyond the buckets or empty).
    pub fn next_id(&self, id: Option<u32>) -> Option<u32> {
        let n = self.n_buckets();
        let start = match id {
            Some(i) if i < n && self.bucket(i).0.nr.load(Ordering::Acquire) != 0 => i + 1,
            _ => 0,
        };
        (start..n).find(|&i| self.bucket(i).0.nr.load(Ordering::Acquire) != 0)
    }

    /// Test hook: a writer killed mid-store: takes the map's lock and leaves the bucket of
    /// `ips` half written (its sequence odd), returning with the lock held.
    #[doc(hidden)]
    pub fn debug_stop_mid_store(&self, ips: &[u64]) {
        let _ = self.ctl().alloc.lock.lock();
        let id = stack_hash(ips) & (self.n_buckets() - 1);
        let (h, dst) = self.bucket(id);
        h.seq.fetch_add(1, Ordering::Relaxed);
        h.nr.store(ips.len() as u32, Ordering::Relaxed);
        // SAFETY: the first address of the bucket.
        unsafe { std::ptr::write_volatile(dst, ips[0]) };
    }

    /// How many stacks are stored.
    pub fn stacks(&self) -> usize {
        self.ctl().alloc.count.load(Ordering::Relaxed) as usize
    }
}

impl MapHandle {
    pub(super) fn stack_trace_entries(&self, m: &StackTraceMap) -> Vec<Entry> {
        (0..m.n_buckets())
            .filter_map(|id| {
                m.get(id).map(|v| Entry {
                    key: id.to_le_bytes().to_vec(),
                    value: EntryValue::Single(v),
                })
            })
            .collect()
    }
}
