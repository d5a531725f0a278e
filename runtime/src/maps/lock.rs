//! A cross-process lock that survives the death of its holder.
//!
//! The lock word holds the holder's kernel thread id (plus a "waiters" bit). A waiter that has
//! spun for a while checks whether that thread still exists; if it does not (a process killed
//! with -9 mid-update), the waiter takes the lock over and the caller is told so, so it can
//! repair what the dead holder may have left half-done. We use this instead of robust pthread
//! mutexes because the recovery decision stays in our hands (no EOWNERDEAD/consistent dance in
//! every caller) and the lock word is a plain u32 that any process can inspect for diagnostics.
//! Limitation: all processes sharing a segment must be in one pid namespace.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

const WAITERS: u32 = 1 << 31;
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

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
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

fn futex_wake(word: &AtomicU32, n: i32) {
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

/// Whether acquiring took the lock over from a dead holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquired {
    Clean,
    Recovered,
}

impl ShmLock {
    #[inline]
    pub(crate) fn lock(&self) -> Acquired {
        let me = current_tid();
        if self
            .0
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Acquired::Clean;
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
    fn lock_slow(&self, me: u32) -> Acquired {
        let mut spins = 0u32;
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
                    return Acquired::Clean;
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
                    return Acquired::Recovered;
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
                    return Acquired::Recovered;
                }
                continue;
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
    #[cfg(test)]
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
    #[inline]
    pub(crate) fn new(lock: &'a ShmLock) -> Self {
        let acquired = lock.lock();
        Self { lock, acquired }
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
        assert_eq!(l.lock(), Acquired::Recovered);
        assert_eq!(l.holder(), current_tid());
        l.unlock();
        assert_eq!(l.lock(), Acquired::Clean);
        l.unlock();
    }

    #[test]
    fn maps_task_alive_self() {
        assert!(task_alive(current_pid()));
        assert!(task_alive(current_tid()));
        assert!(!task_alive(0));
    }
}
