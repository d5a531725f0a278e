//! `bpftime-shim`: the syscall shim `bpftime-rs load -- APP` preloads into an unmodified
//! libbpf application (a bcc libbpf-tool, a skeleton-based C tool, a Rust tool on libbpf-rs or
//! aya), so that its BPF programs run in user space, in the targets' agents, instead of on
//! kernel uprobes.
//!
//! It interposes the libc entry points those loaders go through: `syscall()` for `__NR_bpf`
//! and `__NR_perf_event_open`, and `ioctl`, `mmap`/`mmap64`, `close`, `fcntl`/`fcntl64`,
//! `dup`/`dup2`/`dup3`, `epoll_ctl`, `poll` for the descriptors it handed out. Everything else, and every
//! call in a process that never issues `bpf()` (the preload is inherited by the application's
//! children), goes straight to the kernel.
//!
//! How an application's objects become a loaded object ([`table`] for the state, [`bpf`] for
//! the commands, [`perf`] for the events, [`publish`] for the object):
//! * Every `bpf()` command first reaches the kernel unchanged: maps are created there, programs
//!   are verified there (the verifier gate is the kernel's own PROG_LOAD, on the bytes libbpf
//!   relocated, with the application's log buffer), feature probes get the kernel's answers.
//!   The descriptors the application holds are the kernel's; the shim records what they are.
//! * Once a uprobe program (`BPF_PROG_TYPE_KPROBE`) is loaded, the first step that needs user
//!   space (a uprobe link, an `mmap`, `epoll` or `poll` of a map, a perf buffer) *seals* the
//!   object: the maps still open become its shared segment (their kernel contents copied:
//!   `.rodata`, `.data`, values and PROG_ARRAY slots set after load), the programs still open
//!   are published in the object's manifest with their map references turned into segment
//!   indices, and from then on map commands on those descriptors are served from the shared
//!   maps (the kernel maps remain only as what the verifier checks programs against). Not at
//!   the load itself: loaders load feature-probe programs of that type (aya, before it creates
//!   the object's maps).
//! * `perf_event_open` on the uprobe PMU returns an eventfd standing for the probe; a
//!   `LINK_CREATE(BPF_PERF_EVENT)` (or `PERF_EVENT_IOC_SET_BPF`) on it publishes a link in the
//!   manifest, which the targets' agents install; closing the link or the event removes it.
//! * `mmap` of a RINGBUF or `BPF_F_MMAPABLE` array maps the segment the way the kernel maps
//!   its maps; `epoll_ctl` on a ring registers an eventfd the shim signals while the ring
//!   holds records.
//!
//! The shim never lets a panic or an error take the application down: a command it cannot
//! serve fails with an errno and one `bpftime-shim:` line on stderr naming the command.

mod bpf;
mod link;
mod perf;
mod perfbuf;
mod publish;
mod raw;
mod table;
mod user;

use std::cell::Cell;
use std::ffi::{c_int, c_long, c_ulong, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// Set while this thread is inside the shim: the shim's own libc calls (the runtime's
    /// libbpf wrappers issue `syscall()`, Rust's std calls `close`) then go to the kernel.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Set by the first `bpf()` or `perf_event_open()` call: before it, no descriptor is the
/// shim's and every interposed call goes to the kernel at once.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The first `bpf()` or `perf_event_open()`: from now on descriptors are tracked. Also arms the
/// fork handler (once).
fn activate() {
    static FORK_HANDLER: std::sync::Once = std::sync::Once::new();
    FORK_HANDLER.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no arguments as the child's
        // fork handler.
        unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    });
    ACTIVE.store(true, Ordering::Relaxed);
}

/// In the child of a fork (a `popen` of the application): the child owns none of the parent's
/// objects and usually execs at once; its copy of the shim's state may even be locked, by a
/// thread of the parent that does not exist here. The child starts inert, with the lock free
/// and the state forgotten (its mappings stay; nothing is unmapped or closed).
extern "C" fn forked_child() {
    ACTIVE.store(false, Ordering::Relaxed);
    if table::SHIM.is_locked() {
        // SAFETY: the holder was a thread of the parent; no thread of this process holds it.
        unsafe { table::SHIM.force_unlock() };
    }
    if let Some(old) = table::SHIM.lock().take() {
        std::mem::forget(old);
    }
}

/// Marks this thread inside the shim for its lifetime.
struct Busy;

impl Busy {
    /// `None` if this thread is already inside the shim.
    fn enter() -> Option<Busy> {
        if BUSY.with(Cell::get) {
            return None;
        }
        BUSY.with(|b| b.set(true));
        Some(Busy)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.with(|b| b.set(false));
    }
}

/// Runs `f` inside the shim, turning a panic into `-EFAULT` and a line on stderr: the
/// application must never be taken down by the shim.
fn guarded(what: &str, f: impl FnOnce() -> i64) -> i64 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            eprintln!("bpftime-shim: internal error in {what}; the call fails with EFAULT");
            -i64::from(libc::EFAULT)
        }
    }
}

/// A kernel-style result (`-errno` on error) as libc returns it: -1 with `errno` set.
fn libc_result(r: i64) -> i64 {
    if (-4095..0).contains(&r) {
        // SAFETY: __errno_location returns this thread's errno.
        unsafe { *libc::__errno_location() = (-r) as c_int };
        -1
    } else {
        r
    }
}

/// Whether an interposed descriptor call must look at the shim's table: the shim is active
/// and this is not the shim's own call.
fn tracking() -> bool {
    ACTIVE.load(Ordering::Relaxed) && !BUSY.with(Cell::get)
}

/// glibc's `long syscall(long number, ...)`. On x86-64 variadic integer arguments travel in the
/// same registers as fixed ones, so six fixed `long`s receive them (the caller's count of
/// vector registers in `al` is irrelevant: none is used).
///
/// # Safety
/// As the system call requires.
#[no_mangle]
pub unsafe extern "C" fn syscall(
    nr: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    if nr == libc::SYS_bpf || nr == libc::SYS_perf_event_open {
        if let Some(_busy) = Busy::enter() {
            activate();
            let r = if nr == libc::SYS_bpf {
                guarded("bpf()", || bpf::command(a1 as i32, a2 as usize, a3 as u32))
            } else {
                guarded("perf_event_open()", || {
                    perf::open(a1 as usize, a2 as i32, a3 as i32, a4 as i32, a5 as u64)
                })
            };
            return libc_result(r);
        }
    }
    // The descriptor calls the shim follows, when a loader issues them through `syscall()`
    // (libbpf 1.7 calls `syscall(__NR_dup3, ...)` to put each map on its placeholder fd).
    if tracking() {
        let (fd, fd2) = (a1 as c_int, a2 as c_int);
        match nr {
            libc::SYS_dup3 => return dup3(fd, fd2, a3 as c_int).into(),
            libc::SYS_dup2 => return dup2(fd, fd2).into(),
            libc::SYS_dup => return dup(fd).into(),
            libc::SYS_close => return close(fd).into(),
            // SAFETY: the caller's contract for the command, passed on.
            libc::SYS_fcntl => return unsafe { fcntl(fd, a2 as c_int, a3 as c_ulong) }.into(),
            // SAFETY: the caller's contract for the request, passed on.
            libc::SYS_ioctl => return unsafe { ioctl(fd, a2 as c_ulong, a3 as c_ulong) }.into(),
            libc::SYS_mmap => {
                // SAFETY: the caller's contract for mmap(2), passed on.
                return unsafe {
                    mmap(
                        a1 as *mut c_void,
                        a2 as usize,
                        a3 as c_int,
                        a4 as c_int,
                        a5 as c_int,
                        a6,
                    )
                } as c_long;
            }
            libc::SYS_epoll_ctl => {
                // SAFETY: the caller's contract for epoll_ctl(2), passed on.
                return unsafe { epoll_ctl(fd, a2 as c_int, a3 as c_int, a4 as *mut _) }.into();
            }
            _ => {}
        }
    }
    // SAFETY: the caller's contract for system call `nr`.
    libc_result(unsafe { raw::syscall6(nr, a1, a2, a3, a4, a5, a6) })
}

/// `int ioctl(int fd, unsigned long request, ...)`: perf-event requests on the shim's uprobe
/// events; everything else to the kernel.
///
/// # Safety
/// As the request requires of `arg`.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: c_ulong) -> c_int {
    if tracking() {
        if let Some(_busy) = Busy::enter() {
            if let Some(r) = perf::ioctl(fd, request, arg) {
                return libc_result(r) as c_int;
            }
        }
    }
    // SAFETY: the caller's contract for the request.
    let r = unsafe { raw::syscall3(libc::SYS_ioctl, fd.into(), request as i64, arg as i64) };
    libc_result(r) as c_int
}

/// `mmap`: a shim map descriptor maps the shared segment as the kernel maps the map.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    if fd >= 0 && tracking() {
        if let Some(_busy) = Busy::enter() {
            let r = guarded("mmap", || {
                bpf::mmap(addr as usize, len, prot, flags, fd, offset).unwrap_or_else(|| {
                    // SAFETY: as the caller's mmap.
                    unsafe { raw::mmap(addr as usize, len, prot, flags, fd, offset) }
                })
            });
            return libc_result(r) as *mut c_void;
        }
    }
    // SAFETY: the caller's contract.
    libc_result(unsafe { raw::mmap(addr as usize, len, prot, flags, fd, offset) }) as *mut c_void
}

/// `mmap64` (the same call on 64-bit targets).
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // SAFETY: the caller's contract.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// `close`: forgets what the descriptor was (a link or event closed is detached).
#[no_mangle]
pub extern "C" fn close(fd: c_int) -> c_int {
    if tracking() {
        if let Some(_busy) = Busy::enter() {
            guarded("close", || {
                table::closed(fd);
                0
            });
        }
    }
    libc_result(raw::close(fd)) as c_int
}

/// `int fcntl(int fd, int cmd, ...)`: a duplicate of a shim descriptor is the same object.
///
/// # Safety
/// As the command requires of `arg`.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: the caller's contract for the command.
    let r = unsafe { raw::syscall3(libc::SYS_fcntl, fd.into(), cmd.into(), arg as i64) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        return duplicated(fd, r);
    }
    libc_result(r) as c_int
}

/// `fcntl64` (the same call on 64-bit targets).
///
/// # Safety
/// As `fcntl`.
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { fcntl(fd, cmd, arg) }
}

/// `dup`.
#[no_mangle]
pub extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: dup takes no pointer.
    let r = unsafe { raw::syscall3(libc::SYS_dup, fd.into(), 0, 0) };
    duplicated(fd, r)
}

/// After a call that duplicated `old` as descriptor `r` (or failed): the duplicate is the same
/// object; the call's result as libc returns it.
fn duplicated(old: c_int, r: i64) -> c_int {
    if r >= 0 && tracking() {
        if let Some(_busy) = Busy::enter() {
            table::duplicated(old, r as i32);
        }
    }
    libc_result(r) as c_int
}

/// `dup2`: the target descriptor's old object is closed first, as the kernel does.
#[no_mangle]
pub extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: dup3 takes no pointer.
    dup_onto(old, new, 0, || unsafe {
        raw::syscall3(libc::SYS_dup2, old.into(), new.into(), 0)
    })
}

/// `dup3`.
#[no_mangle]
pub extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: dup3 takes no pointer.
    dup_onto(old, new, flags, || unsafe {
        raw::syscall3(libc::SYS_dup3, old.into(), new.into(), flags.into())
    })
}

fn dup_onto(old: c_int, new: c_int, _flags: c_int, call: impl FnOnce() -> i64) -> c_int {
    let r = call();
    if r >= 0 && old != new && tracking() {
        if let Some(_busy) = Busy::enter() {
            table::closed(new);
            table::duplicated(old, new);
        }
    }
    libc_result(r) as c_int
}

/// `poll`: a ring's descriptor is polled as the ring's readiness eventfd (see `epoll_ctl`).
///
/// # Safety
/// As `poll(2)`: `fds` points at `nfds` entries.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    let mut substitutes: Vec<(usize, c_int)> = Vec::new();
    if tracking() && !fds.is_null() {
        if let Some(_busy) = Busy::enter() {
            for i in 0..nfds as usize {
                // SAFETY: the caller's contract: `nfds` valid entries.
                let fd = unsafe { (*fds.add(i)).fd };
                if let Some(ready) = bpf::ring_readiness_fd(fd) {
                    substitutes.push((i, fd));
                    // SAFETY: as above.
                    unsafe { (*fds.add(i)).fd = ready };
                }
            }
        }
    }
    // SAFETY: the caller's contract (ppoll with a null sigmask is poll; x86-64 has no poll
    // number in every libc's headers, ppoll always exists).
    let r = unsafe {
        let ts = (timeout >= 0).then(|| libc::timespec {
            tv_sec: (timeout / 1000).into(),
            tv_nsec: ((timeout % 1000) as i64) * 1_000_000,
        });
        raw::syscall6(
            libc::SYS_ppoll,
            fds as i64,
            nfds as i64,
            ts.as_ref().map_or(0, |t| t as *const libc::timespec as i64),
            0,
            8,
            0,
        )
    };
    for (i, fd) in substitutes {
        // SAFETY: as above; the caller sees its own descriptor back.
        unsafe { (*fds.add(i)).fd = fd };
    }
    libc_result(r) as c_int
}

/// `epoll_ctl`: a ring's descriptor is registered as the ring's readiness eventfd (same event
/// data), which the shim signals while the ring holds records.
///
/// # Safety
/// As `epoll_ctl(2)`.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    let mut target = fd;
    if tracking() {
        if let Some(_busy) = Busy::enter() {
            if let Some(ready) = bpf::ring_readiness_fd(fd) {
                target = ready;
            }
        }
    }
    // SAFETY: the caller's contract.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_epoll_ctl,
            epfd.into(),
            op.into(),
            target.into(),
            event as i64,
            0,
            0,
        )
    };
    libc_result(r) as c_int
}
