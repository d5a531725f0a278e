//! Task and time helpers: pid/tgid, uid/gid, comm, CPU, clocks, random numbers.

use super::{write_arg, RuntimeHelpers};
use crate::maps;
use crate::vm::{CallContext, HelperError};
use bpftime_abi::HelperId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

type Ret = Result<u64, HelperError>;

pub(super) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock ids used are supported by Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(super) fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The calling thread's name (`comm`), up to 15 bytes.
fn current_comm() -> Vec<u8> {
    let mut buf = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (incl. NUL) into the buffer.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) };
    if rc != 0 {
        return Vec::new();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(16);
    buf[..n].to_vec()
}

pub(super) fn ktime_get_ns(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(clock_ns(libc::CLOCK_MONOTONIC))
}

pub(super) fn ktime_get_boot_ns(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(clock_ns(libc::CLOCK_BOOTTIME))
}

pub(super) fn ktime_get_coarse_ns(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(clock_ns(libc::CLOCK_MONOTONIC_COARSE))
}

pub(super) fn ktime_get_tai_ns(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(clock_ns(libc::CLOCK_TAI))
}

pub(super) fn get_prandom_u32(
    h: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    // xorshift64*
    let mut x = h.rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    h.rng = x;
    Ok(x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32)
}

pub(super) fn get_smp_processor_id(
    h: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(u64::from(maps::current_cpu(h.ncpu)))
}

/// What `bpf_get_current_pid_tgid` keeps about the thread a hook runs on (one per thread slot
/// of the hook engine, shared by every program's helpers on that slot), so that the common call
/// makes no system call: the answer, the slot generation it was taken at, and whether a
/// `CLONE_VM` child (`vfork`, `posix_spawn`, `clone`) may be running as this thread: such a
/// child shares the thread's memory and TCB, so nothing in memory tells it from the thread.
#[derive(Debug, Default)]
pub struct TaskIdentity {
    pid_tgid: AtomicU64,
    taken_at: AtomicU64,
    suspect: AtomicBool,
}

impl TaskIdentity {
    /// Nothing known yet.
    pub const fn new() -> Self {
        Self {
            pid_tgid: AtomicU64::new(0),
            taken_at: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
        }
    }

    /// A `CLONE_VM` child of this thread may run next (called at `vfork`, `posix_spawn` and
    /// `clone` entry): the next answers come from the kernel until one shows this thread again.
    pub fn suspect_clone(&self) {
        self.suspect.store(true, Ordering::Release);
    }

    /// `bpf_get_current_pid_tgid` for the thread whose slot generation is `generation`.
    #[inline]
    pub fn pid_tgid(&self, generation: &AtomicU64) -> u64 {
        let now = generation.load(Ordering::Acquire);
        let cached = self.pid_tgid.load(Ordering::Relaxed);
        let current = self.taken_at.load(Ordering::Relaxed) == now && cached != 0;
        if current && !self.suspect.load(Ordering::Acquire) {
            return cached;
        }
        let real = pid_tgid_from_kernel();
        if self.suspect.load(Ordering::Acquire) {
            // In the child, the kernel's answer differs from the cached thread's: never
            // cached (its parent, resuming, would read it). The thread itself again: done.
            if current && real == cached {
                self.suspect.store(false, Ordering::Release);
            }
            return real;
        }
        self.pid_tgid.store(real, Ordering::Relaxed);
        self.taken_at.store(now, Ordering::Relaxed);
        real
    }
}

fn pid_tgid_from_kernel() -> u64 {
    // SAFETY: getpid has no preconditions.
    let tgid = unsafe { libc::getpid() } as u32;
    (u64::from(tgid) << 32) | u64::from(gettid())
}

pub(super) fn get_current_pid_tgid(
    h: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(match h.task_identity {
        Some((identity, generation)) => identity.pid_tgid(generation),
        None => pid_tgid_from_kernel(),
    })
}

pub(super) fn get_current_uid_gid(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok((u64::from(gid) << 32) | u64::from(uid))
}

pub(super) fn get_current_comm(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let comm = current_comm();
    let out = write_arg(
        ctx,
        HelperId::GET_CURRENT_COMM,
        1,
        a[0],
        a[1] as u32 as usize,
    )?;
    // strscpy_pad: at most len-1 bytes, NUL-terminated, zero-padded.
    out.fill(0);
    if !out.is_empty() {
        let n = comm.len().min(out.len() - 1);
        out[..n].copy_from_slice(&comm[..n]);
    }
    Ok(0)
}

/// There is no `task_struct` in user space (see the module docs of `helpers`).
pub(super) fn get_current_task(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(0)
}

/// `bpf_send_signal(sig)`: the signal to the whole process (`group_send_sig_info`); the
/// kernel's errors: `-EINVAL` for an invalid signal, `-EPERM` in the init process. The
/// signal is delivered when the hooked thread leaves the probe, as the kernel delivers it on
/// the return to user space.
pub(super) fn send_signal(_: &mut RuntimeHelpers, a: [u64; 5], _: &mut CallContext<'_, '_>) -> Ret {
    send(a[0], false)
}

/// `bpf_send_signal_thread(sig)`: the signal to the calling thread only.
pub(super) fn send_signal_thread(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    send(a[0], true)
}

fn send(sig: u64, thread: bool) -> Ret {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid == 1 {
        return Ok(super::neg(libc::EPERM));
    }
    // valid_signal(): 0..=_NSIG (64); 0 only checks that the task exists.
    if sig > 64 {
        return Ok(super::neg(libc::EINVAL));
    }
    let rc = if thread {
        // SAFETY: tgkill to our own thread id; the kernel validates the signal number.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, gettid(), sig as libc::c_int) }
    } else {
        // SAFETY: kill to our own process; the kernel validates the signal number.
        i64::from(unsafe { libc::kill(pid, sig as libc::c_int) })
    };
    Ok(if rc == 0 {
        0
    } else {
        super::neg(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        )
    })
}

/// The kernel's tick rate, from the running kernel's configuration (`CONFIG_HZ` in
/// /proc/config.gz or /boot/config-RELEASE); 250 (x86 defconfig) when neither is readable.
fn kernel_hz() -> u64 {
    bpftime_abi::os::kernel_config()
        .and_then(|c| c.get("CONFIG_HZ"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(250)
}

/// `bpf_jiffies64()`: jiffies start at `INITIAL_JIFFIES` (`-300 * HZ` as a 32-bit value, so
/// that they wrap five minutes after boot on 32-bit kernels) and count ticks of
/// CLOCK_MONOTONIC's time base; user space has no tick counter, so the value is computed
/// from the clock and agrees with the kernel's to within a tick.
pub(super) fn jiffies64(_: &mut RuntimeHelpers, _: [u64; 5], _: &mut CallContext<'_, '_>) -> Ret {
    let hz = kernel_hz();
    let initial = u64::from((-(300 * hz as i64)) as u32);
    let ns = clock_ns(libc::CLOCK_MONOTONIC);
    Ok(initial.wrapping_add(ns / (1_000_000_000 / hz)))
}

/// `bpf_get_ns_current_pid_tgid(dev, ino, nsdata, size)`: pid and tgid as seen in the pid
/// namespace `(dev, ino)` (`stat` of /proc/PID/ns/pid), which must be the caller's own;
/// `-EINVAL` (and `nsdata` zeroed) for another namespace or a size other than 8.
pub(super) fn get_ns_current_pid_tgid(
    _: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let (dev, ino, size) = (a[0], a[1], a[3] as u32 as usize);
    let out = write_arg(ctx, HelperId::GET_NS_CURRENT_PID_TGID, 3, a[2], size)?;
    out.fill(0);
    if size != 8 || dev > u64::from(u32::MAX) {
        return Ok(super::neg(libc::EINVAL));
    }
    let mut st: libc::stat = unsafe_zeroed_stat();
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::stat(c"/proc/self/ns/pid".as_ptr(), &mut st) } != 0 {
        return Ok(super::neg(libc::ENOENT));
    }
    if st.st_dev != dev || st.st_ino != ino {
        return Ok(super::neg(libc::EINVAL));
    }
    // SAFETY: getpid has no preconditions.
    let tgid = unsafe { libc::getpid() } as u32;
    out[..4].copy_from_slice(&gettid().to_le_bytes());
    out[4..8].copy_from_slice(&tgid.to_le_bytes());
    Ok(0)
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}
