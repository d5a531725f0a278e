//! A cross-process lock that survives the death of its holder.
//!
//! The lock word holds the holder's kernel thread id (plus a "waiters" bit). A waiter that has
//! spun for a while checks whether that thread still exists; if it does not (a process killed
//! with -9 mid-update), the waiter takes the lock over and the caller is told so, so it can
//! repair what the dead holder may have left half-done. We use this instead of robust pthread
//! mutexes because the recovery decision stays in our hands (no EOWNERDEAD/consistent dance in
//! every caller) and the lock word is a plain u32 that any process can inspect for diagnostics.
//! Limitation: all processes sharing a segment must be in one pid namespace.
//!
//! Waiting is bounded by [`LOCK_TIMEOUT`]: a lock word that a live thread holds for that long
//! (a holder stopped with SIGSTOP or in a debugger, or a word a target overwrote with the id of
//! some live thread) makes the operation fail with `EBUSY` instead of hanging its caller, which
//! may be a hooked function in a target or the root forwarder.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

const WAITERS: u32 = 1 << 31;

/// How long an operation waits for a shared-memory lock before failing with `EBUSY`: far above
/// any legitimate hold (a few hundred nanoseconds of copying).
pub(crate) const LOCK_TIMEOUT: Duration = Duration::from_secs(1);
const TID_MASK: u32 = !WAITERS;

thread_local! {
    // gettid() is a real syscall; caching it keeps the uncontended lock at one CAS.
    static TID: Cell<u32> = const { Cell::new(0) };
}

static ATFORK: Once = Once::new();

extern "C" fn reset_tid_after_fork() {
    // The forked child's only thread has a new tid; a stale cached one would make a crashed
    // child look alive (its parent's tid) and wedge the lock.
    TID.with(|t| t.set(0));
    PID.store(0, Ordering::Relaxed);
}

pub(crate) fn current_tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        ATFORK.call_once(|| {
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe {
                libc::pthread_atfork(None, None, Some(reset_tid_after_fork));
            }
        });
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        t.set(tid);
        tid
    })
}

static PID: AtomicU32 = AtomicU32::new(0);

/// Current process id (tgid), cached: getpid() is a syscall and ringbuf records carry it.
#[inline]
pub(crate) fn current_pid() -> u32 {
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    current_tid();
    let p = std::process::id();
    PID.store(p, Ordering::Relaxed);
    p
}

/// Whether a thread or process id names a living (non-zombie) task.
pub(crate) fn task_alive(id: u32) -> bool {
    if id == 0 || id > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only performs the existence/permission check.
    let r = unsafe { libc::kill(id as i32, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A killed process stays a zombie until reaped and kill() still succeeds on it; a zombie
    // holds nothing, so look at its state.
    match std::fs::read_to_string(format!("/proc/{id}/stat")) {
        Ok(s) => !matches!(
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next()),
            Some("Z" | "X" | "x")
        ),
        Err(_) => false,
    }
}

pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the word lives in a shared mapping that outlives the call; non-private futex op
    // because waiters and wakers are in different processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

pub(super) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: as in futex_wait.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// The lock word as it lies in shared memory.
#[repr(transparent)]
pub(crate) struct ShmLock(AtomicU32);

impl ShmLock {
    /// The lock whose word is the `u32` at `p` (a `struct bpf_spin_lock` in a map value).
    ///
    /// # Safety
    /// `p` is 4-byte aligned and valid for reads and writes for `'a`.
    pub(crate) unsafe fn at<'a>(p: *mut u32) -> &'a ShmLock {
        // SAFETY: ShmLock is repr(transparent) over AtomicU32, which has u32's layout; the
        // caller guarantees alignment and lifetime.
        unsafe { &*(p as *const ShmLock) }
    }
}

/// Whether acquiring took the lock over from a dead holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquired {
    Clean,
    Recovered,
}

impl ShmLock {
    /// Takes the lock, waiting at most [`LOCK_TIMEOUT`]; `None` when that passed.
    #[inline]
    pub(crate) fn lock(&self) -> Option<Acquired> {
        let me = current_tid();
        if self
            .0
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(Acquired::Clean);
        }
        self.lock_slow(me)
    }

    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(0, current_tid(), Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[cold]
    fn lock_slow(&self, me: u32) -> Option<Acquired> {
        let mut spins = 0u32;
        // Taken only once the wait gets long (the common contended case never reads a clock).
        let mut deadline: Option<std::time::Instant> = None;
        // After sleeping once we cannot know whether others sleep too, so we keep the waiters
        // bit when we take the lock (the classic futex mutex "contended" state).
        let mut slept = false;
        loop {
            let cur = self.0.load(Ordering::Relaxed);
            if cur == 0 {
                let want = if slept { me | WAITERS } else { me };
                if self
                    .0
                    .compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(Acquired::Clean);
                }
                continue;
            }
            let owner = cur & TID_MASK;
            spins += 1;
            if owner == me {
                // We are not holding it (no nesting anywhere), so our tid was recycled from a
                // dead holder.
                if self
                    .0
                    .compare_exchange(
                        cur,
                        me | (cur & WAITERS),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return Some(Acquired::Recovered);
                }
                continue;
            }
            if spins < 100 {
                std::hint::spin_loop();
                continue;
            }
            if spins < 120 {
                std::thread::yield_now();
                continue;
            }
            if spins & 7 == 0 && !task_alive(owner) {
                if self
                    .0
                    .compare_exchange(
                        cur,
                        me | (cur & WAITERS),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    tracing::warn!(
                        dead_owner = owner,
                        "took over a shared-memory lock from a dead thread"
                    );
                    return Some(Acquired::Recovered);
                }
                continue;
            }
            let now = std::time::Instant::now();
            match deadline {
                None => deadline = Some(now + LOCK_TIMEOUT),
                Some(d) if now >= d => {
                    tracing::warn!(
                        owner,
                        "a shared-memory lock stayed held by a live thread for {LOCK_TIMEOUT:?}; \
                         giving up (EBUSY)"
                    );
                    return None;
                }
                Some(_) => {}
            }
            if cur & WAITERS == 0
                && self
                    .0
                    .compare_exchange(cur, cur | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            slept = true;
            // Bounded sleep: a holder that dies never wakes us, so we come back to check.
            futex_wait(&self.0, cur | WAITERS, Duration::from_millis(2));
        }
    }

    #[inline]
    pub(crate) fn unlock(&self) {
        // SeqCst: callers rely on the unlock being a full barrier (see hash update marking).
        let prev = self.0.swap(0, Ordering::SeqCst);
        if prev & WAITERS != 0 {
            futex_wake(&self.0, 1);
        }
    }

    /// Thread id of the holder, 0 when free.
    pub(crate) fn holder(&self) -> u32 {
        self.0.load(Ordering::Relaxed) & TID_MASK
    }
}

/// Unlocks on drop, so an early return or a panic never leaves the lock held.
pub(crate) struct LockGuard<'a> {
    lock: &'a ShmLock,
    pub(crate) acquired: Acquired,
}

impl<'a> LockGuard<'a> {
    /// Takes `lock` (see [`ShmLock::lock`]); `None` after [`LOCK_TIMEOUT`].
    #[inline]
    pub(crate) fn new(lock: &'a ShmLock) -> Option<Self> {
        let acquired = lock.lock()?;
        Some(Self { lock, acquired })
    }

    /// Takes `lock` only if it is free or its holder is dead (then taken over: `Recovered`);
    /// `None` while a live thread holds it, without waiting.
    pub(crate) fn try_new(lock: &'a ShmLock) -> Option<Self> {
        if lock.try_lock() {
            return Some(Self {
                lock,
                acquired: Acquired::Clean,
            });
        }
        if task_alive(lock.holder()) {
            return None;
        }
        Self::new(lock)
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lock_recovers_from_dead_tid() {
        let l = ShmLock(AtomicU32::new(0));
        // A tid that cannot exist (above pid_max's hard limit of 2^22).
        l.0.store(4_194_305 + 7, Ordering::Relaxed);
        assert_eq!(l.lock(), Some(Acquired::Recovered));
        assert_eq!(l.holder(), current_tid());
        l.unlock();
        assert_eq!(l.lock(), Some(Acquired::Clean));
        l.unlock();
    }

    #[test]
    fn maps_lock_held_by_a_live_thread_times_out() {
        let l = ShmLock(AtomicU32::new(0));
        // pid 1 always lives: a lock word naming it (a corrupted word, or a stopped holder)
        // must not hang the caller.
        l.0.store(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        assert_eq!(l.lock(), None);
        let waited = start.elapsed();
        assert!(
            waited >= LOCK_TIMEOUT && waited < LOCK_TIMEOUT * 3,
            "{waited:?}"
        );
    }

    /// A lock word holding our own tid, which we do not hold (no lock nests): a dead holder's
    /// tid the kernel gave to us. Taken over at once as recovered (not waited on until the
    /// timeout as a live holder's would be), then it works as any lock.
    #[test]
    fn maps_lock_left_by_a_dead_holder_whose_tid_is_now_ours_is_recovered() {
        let mut word = current_tid();
        // SAFETY: a 4-byte aligned u32 of this frame, alive for the test.
        let lock = unsafe { ShmLock::at(&mut word) };
        let started = std::time::Instant::now();
        assert_eq!(lock.lock(), Some(Acquired::Recovered));
        assert!(
            started.elapsed() < LOCK_TIMEOUT / 2,
            "no waiting for ourselves"
        );
        lock.unlock();
        assert_eq!(lock.lock(), Some(Acquired::Clean));
        lock.unlock();
        assert_eq!(word, 0);
    }

    #[test]
    fn maps_task_alive_self() {
        assert!(task_alive(current_pid()));
        assert!(task_alive(current_tid()));
        assert!(!task_alive(0));
    }
}
