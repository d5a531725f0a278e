//! Task and time helpers: pid/tgid, uid/gid, comm, CPU, clocks, random numbers.

use super::{write_arg, RuntimeHelpers};
use crate::maps;
use crate::vm::{CallContext, HelperError};
use bpftime_abi::HelperId;

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

pub(super) fn get_current_pid_tgid(
    _: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    // SAFETY: getpid has no preconditions.
    let tgid = unsafe { libc::getpid() } as u32;
    Ok((u64::from(tgid) << 32) | u64::from(gettid()))
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
