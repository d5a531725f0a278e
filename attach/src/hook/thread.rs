//! Per-thread hook state (re-entrancy guard and shadow stack of return addresses) without
//! thread-local storage: a dlopen'ed agent's TLS is allocated lazily by `__tls_get_addr`, which
//! calls `malloc`, which may be the hooked function. Threads are keyed by their TCB address
//! (`fs:0`) in a fixed open-addressed table in `.bss`. A thread that exits frees its slot: a
//! pthread key destructor (glibc keeps the first 32 keys' values inline in the TCB, so setting
//! one allocates nothing, even from inside a hooked `malloc`) leaves a tombstone that later
//! claims reuse, so threads that come and go never fill the table, whatever their TCBs.

use super::Site;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub(super) const MAX_THREADS: usize = 2048;
pub(super) const MAX_FRAMES: usize = 256;

/// `repr(C)`: the stubs push and pop frames themselves (offsets below).
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Frame {
    /// Address of the stack slot holding the replaced return address (`rsp` at entry).
    pub slot: u64,
    pub orig_ret: u64,
    pub site: *const Site,
}

#[repr(C)]
pub(super) struct ThreadState {
    pub depth: usize,
    pub frames: [Frame; MAX_FRAMES],
}

/// Keys apart from states: the key probe walks a dense array (8 bytes per slot) and finds the
/// state by index, instead of striding through the multi-kilobyte states. `repr(C)` with the
/// keys first: the entry stub probes `keys` itself (`TABLE` is the keys' address).
#[repr(C)]
pub(super) struct Table {
    keys: [AtomicUsize; MAX_THREADS],
    states: [UnsafeCell<ThreadState>; MAX_THREADS],
}

// SAFETY: a slot's state is only touched by the thread whose key claimed it.
unsafe impl Sync for Table {}

pub(super) static TABLE: Table = Table {
    keys: [const { AtomicUsize::new(0) }; MAX_THREADS],
    states: [const {
        UnsafeCell::new(ThreadState {
            depth: 0,
            frames: [Frame {
                slot: 0,
                orig_ret: 0,
                site: std::ptr::null(),
            }; MAX_FRAMES],
        })
    }; MAX_THREADS],
};

/// Layout the stubs use: state `i` is at `TABLE + STATES_OFFSET + i * STATE_SIZE`; its depth at
/// 0, frame `k` at `FRAMES_OFFSET + k * FRAME_SIZE` (slot, original return address, site).
pub(super) const STATES_OFFSET: usize = std::mem::offset_of!(Table, states);
pub(super) const STATE_SIZE: usize = std::mem::size_of::<ThreadState>();
pub(super) const FRAMES_OFFSET: usize = std::mem::offset_of!(ThreadState, frames);
pub(super) const FRAME_SIZE: usize = std::mem::size_of::<Frame>();

const _: () = {
    assert!(std::mem::offset_of!(Table, keys) == 0);
    assert!(std::mem::offset_of!(ThreadState, depth) == 0);
    assert!(FRAMES_OFFSET == 8);
    assert!(FRAME_SIZE == 24);
    assert!(std::mem::offset_of!(Frame, slot) == 0);
    assert!(std::mem::offset_of!(Frame, orig_ret) == 8);
    assert!(std::mem::offset_of!(Frame, site) == 16);
    assert!(std::mem::size_of::<UnsafeCell<ThreadState>>() == STATE_SIZE);
};

/// Per-slot re-entrancy guards (1 = a handler of this thread is running), apart from the states
/// so the entry stub tests one byte at `GUARDS + index`.
#[repr(transparent)]
pub(super) struct Guards(pub [AtomicBool; MAX_THREADS]);

pub(super) static GUARDS: Guards = Guards([const { AtomicBool::new(false) }; MAX_THREADS]);

/// Per-slot identity generations: bumped whenever the task behind a slot may have changed (a
/// thread claims the slot; in a fork child, every slot: the forking thread is a new task
/// there). What a handler caches about its thread (the pid and tid `bpf_get_current_pid_tgid`
/// answers) is valid while the generation it was cached at is current.
static IDENTITY: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];

/// The identity generation of slot `index`, or `None` when slots are never handed over safely
/// (the thread-exit key is missing, so a new thread reusing an exited one's TCB finds its slot
/// without claiming it): then nothing about a thread may be cached.
pub(super) fn identity_generation(index: usize) -> Option<&'static AtomicU64> {
    (EXIT_KEY.load(Ordering::Relaxed) < INLINE_PTHREAD_KEYS).then(|| &IDENTITY[index])
}

/// Multiplier of the key hash; the entry stub computes the same hash.
pub(super) const KEY_HASH: u64 = 0x9E37_79B9_7F4A_7C15;
/// Right shift of the key hash: leaves the index bits.
pub(super) const KEY_SHIFT: u32 = 64 - MAX_THREADS.trailing_zeros();

/// The calling thread's guard (only the thread holding slot `index` touches it; relaxed
/// accesses suffice).
#[inline(always)]
pub(super) fn guard(index: usize) -> &'static AtomicBool {
    &GUARDS.0[index]
}

#[inline(always)]
fn thread_key() -> usize {
    let k: usize;
    // SAFETY: on x86_64 Linux (glibc and musl) fs:0 holds the thread control block's own address.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) k, options(nostack, readonly, preserves_flags, pure));
    }
    k
}

/// The key of a slot freed by an exited thread. Lookups walk past it (the keys after it stay
/// reachable); a claim reuses it. No TCB is at address 1.
const TOMBSTONE: usize = 1;

/// The calling thread's slot index (below [`MAX_THREADS`]) and state, or `None` when the table
/// is full. Two live threads never share an index; a thread's index never changes while it
/// lives.
#[inline]
pub(super) fn current_indexed() -> Option<(usize, &'static mut ThreadState)> {
    let key = thread_key();
    let home = ((key as u64).wrapping_mul(KEY_HASH) >> KEY_SHIFT) as usize & (MAX_THREADS - 1);
    // Found at once in the common case; otherwise claimed (a few retries at most when other
    // new threads claim the same free slot first).
    for _ in 0..MAX_THREADS {
        let mut free = None;
        let mut i = home;
        for _ in 0..MAX_THREADS {
            let k = TABLE.keys[i].load(Ordering::Acquire);
            if k == key {
                // SAFETY: only the thread with this key (this thread) reaches this slot's
                // state, and the dispatchers never hold two references at once.
                return Some((i, unsafe { &mut *TABLE.states[i].get() }));
            }
            if k == TOMBSTONE && free.is_none() {
                free = Some((i, TOMBSTONE));
            }
            if k == 0 {
                // The key is not in the table: its chain ends here.
                free = free.or(Some((i, 0)));
                break;
            }
            i = (i + 1) & (MAX_THREADS - 1);
        }
        let (i, was) = free?;
        if TABLE.keys[i]
            .compare_exchange(was, key, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            release_at_exit(i);
            IDENTITY[i].fetch_add(1, Ordering::Release);
            // SAFETY: as above; the slot was free, so no other thread uses its state. A
            // previous owner that exited mid-call left nothing pending that is still valid.
            let state = unsafe { &mut *TABLE.states[i].get() };
            state.depth = 0;
            guard(i).store(false, Ordering::Relaxed);
            return Some((i, state));
        }
    }
    None
}

/// The original return address of the calling thread's pending return hook whose replaced
/// return address sits at stack address `slot`, if one does (without claiming a slot).
pub(super) fn pending_return(slot: u64) -> Option<u64> {
    let key = thread_key();
    let mut i = ((key as u64).wrapping_mul(KEY_HASH) >> KEY_SHIFT) as usize & (MAX_THREADS - 1);
    for _ in 0..MAX_THREADS {
        let k = TABLE.keys[i].load(Ordering::Acquire);
        if k == key {
            let state = TABLE.states[i].get();
            // SAFETY: only this thread touches its slot's state; the dispatcher that runs the
            // current handler holds a reference but does not use it until the handler
            // returns, and this reads through the raw pointer without making another one.
            unsafe {
                let depth = std::ptr::addr_of!((*state).depth).read().min(MAX_FRAMES);
                let frames = std::ptr::addr_of!((*state).frames) as *const Frame;
                return (0..depth)
                    .map(|f| frames.add(f).read())
                    .find(|f| f.slot == slot)
                    .map(|f| f.orig_ret);
            }
        }
        if k == 0 {
            return None;
        }
        i = (i + 1) & (MAX_THREADS - 1);
    }
    None
}

/// The pthread key whose destructor frees a thread's slot; `u32::MAX` until created, or when it
/// could not be made one of the inline keys (then slots are not freed).
static EXIT_KEY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// glibc's `PTHREAD_KEY_2NDLEVEL_SIZE`: keys below it keep their values in the TCB itself.
const INLINE_PTHREAD_KEYS: u32 = 32;

/// Arranges for slot `index` to be freed when the calling thread exits.
fn release_at_exit(index: usize) {
    let key = EXIT_KEY.load(Ordering::Relaxed);
    if key < INLINE_PTHREAD_KEYS {
        // SAFETY: `key` is a live pthread key; the value is a plain integer, never
        // dereferenced (slot index + 1, so never NULL).
        unsafe { libc::pthread_setspecific(key, (index + 1) as *const libc::c_void) };
    }
}

/// Runs on the exiting thread after its TLS destructors: frees the slot it held. glibc runs
/// key destructors again (up to 4 rounds) if a later destructor's hooked call claims a slot
/// anew, so that one is freed too.
extern "C" fn free_slot_at_exit(value: *mut libc::c_void) {
    let index = (value as usize).wrapping_sub(1);
    if index < MAX_THREADS && TABLE.keys[index].load(Ordering::Relaxed) == thread_key() {
        guard(index).store(false, Ordering::Relaxed);
        // SAFETY: the slot is this thread's, and the thread is exiting: no handler of it runs.
        unsafe { (*TABLE.states[index].get()).depth = 0 };
        // Release: the reset state is visible to the thread that claims the slot next.
        TABLE.keys[index].store(TOMBSTONE, Ordering::Release);
    }
}

/// Slots held by live threads (for tests and stats).
pub(super) fn slots_in_use() -> usize {
    TABLE
        .keys
        .iter()
        .filter(|k| !matches!(k.load(Ordering::Relaxed), 0 | TOMBSTONE))
        .count()
}

/// In the child of a `fork` only the forking thread exists, but the table still holds the
/// parent's other threads. glibc reuses their stacks and TCBs for the child's new threads, which
/// would then find those slots with a guard possibly set (their handlers would never run) and
/// pending frames. So the child resets every other slot's guard and shadow stack. Keys stay:
/// clearing one would break the probe chains of the keys after it (the forking thread's too).
extern "C" fn reset_other_threads_after_fork() {
    for generation in &IDENTITY {
        generation.fetch_add(1, Ordering::Release);
    }
    let me = thread_key();
    for (i, key) in TABLE.keys.iter().enumerate() {
        let k = key.load(Ordering::Relaxed);
        if k != 0 && k != TOMBSTONE && k != me {
            GUARDS.0[i].store(false, Ordering::Relaxed);
            // SAFETY: in the child right after fork, no other thread exists to use the slot.
            unsafe { (*TABLE.states[i].get()).depth = 0 };
        }
    }
}

/// Registers [`reset_other_threads_after_fork`] and the thread-exit key once per process.
pub(super) fn register_process_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that only touches this module's statics.
        unsafe { libc::pthread_atfork(None, None, Some(reset_other_threads_after_fork)) };
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; the destructor only touches this module's
        // statics.
        if unsafe { libc::pthread_key_create(&mut key, Some(free_slot_at_exit)) } == 0 {
            if key < INLINE_PTHREAD_KEYS {
                EXIT_KEY.store(key, Ordering::Relaxed);
            } else {
                // Setting it could allocate inside a hooked malloc: keep slots instead.
                // SAFETY: deleting the key just created, which holds no values.
                unsafe { libc::pthread_key_delete(key) };
            }
        }
    });
}
