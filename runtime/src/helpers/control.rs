//! Control-flow and attach helpers: `bpf_tail_call`, `bpf_loop`, `bpf_override_return`,
//! `bpf_get_func_ip`, `bpf_get_attach_cookie`, and `bpf_spin_lock`/`bpf_spin_unlock`.

use bpftime_abi::HelperId;

use super::{neg, RuntimeHelpers, BPF_MAX_LOOPS, MAX_TAIL_CALLS};
use crate::maps::lock::ShmLock;
use crate::vm::{CallContext, HelperError};

type Ret = Result<u64, HelperError>;

/// A failing tail call (empty slot, bad index, limit reached) returns `-ENOENT` and the
/// program continues, as in the kernel.
pub(super) fn tail_call(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let idx = h.map_arg(HelperId::TAIL_CALL, 2, a[1])?;
    let m = &h.maps[idx];
    let target = (h.tail_calls < MAX_TAIL_CALLS)
        .then(|| m.as_prog_array().and_then(|p| p.get(a[2] as u32)))
        .flatten()
        .and_then(|p| h.programs.as_ref().and_then(|r| r(p)));
    Ok(match target {
        Some(p) => {
            h.tail_calls += 1;
            ctx.tail_call(p);
            0
        }
        None => neg(libc::ENOENT),
    })
}

/// `bpf_loop(nr_loops, callback, ctx, flags)`: the callback gets (index, ctx) and stops the
/// loop by returning 1; r0 is the number of iterations run.
pub(super) fn bpf_loop(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    if a[3] != 0 {
        return Ok(neg(libc::EINVAL));
    }
    if a[0] > BPF_MAX_LOOPS {
        return Ok(neg(libc::E2BIG));
    }
    let mut i = 0;
    while i < a[0] {
        let r = ctx.call_function(h, a[1], [i, a[2], 0, 0, 0])?;
        i += 1;
        if r != 0 {
            break;
        }
    }
    Ok(i)
}

/// Records the request; the hook returns the value instead of calling the function.
pub(super) fn override_return(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    h.attach.override_return = Some(a[1]);
    Ok(0)
}

pub(super) fn get_func_ip(h: &mut RuntimeHelpers, _: [u64; 5], _: &mut CallContext<'_, '_>) -> Ret {
    Ok(h.attach.func_ip)
}

pub(super) fn get_attach_cookie(
    h: &mut RuntimeHelpers,
    _: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    Ok(h.attach.cookie)
}

/// `bpf_spin_lock(lock)`: the `struct bpf_spin_lock` in a map value, shared by every process
/// that maps it. It is a lock word of ours (the holder's thread id, taken over when the holder
/// died), so a target killed inside a critical section does not wedge the others. A lock a
/// live thread holds for longer than the maps' lock timeout (1 s: a stopped process) is not
/// waited for any longer: the caller goes on without it rather than hang the target.
pub(super) fn spin_lock(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let word = lock_word(HelperId::SPIN_LOCK, a[0], ctx)?;
    // SAFETY: 4 writable, aligned bytes of a map value (checked above on the interpreter;
    // proved by the kernel verifier for the JIT), alive while the program runs.
    let lock = unsafe { ShmLock::at(word) };
    if lock.lock().is_some() {
        h.spin_locks.push(a[0]);
    }
    Ok(0)
}

/// `bpf_spin_unlock(lock)`.
pub(super) fn spin_unlock(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let word = lock_word(HelperId::SPIN_UNLOCK, a[0], ctx)?;
    if let Some(i) = h.spin_locks.iter().rposition(|&p| p == a[0]) {
        h.spin_locks.remove(i);
        // SAFETY: as in `spin_lock`; this run took it.
        unsafe { ShmLock::at(word) }.unlock();
    }
    Ok(0)
}

/// Releases the spin locks a run still holds when it ends (a run that faulted inside a
/// critical section: the kernel's verifier makes programs unlock before they exit).
pub(super) fn release_spin_locks(h: &mut RuntimeHelpers) {
    for p in h.spin_locks.drain(..) {
        // SAFETY: taken by this run in `spin_lock` on map-value memory the helpers' maps keep
        // mapped.
        unsafe { ShmLock::at(p as *mut u32) }.unlock();
    }
}

fn lock_word(
    id: HelperId,
    addr: u64,
    ctx: &mut CallContext<'_, '_>,
) -> Result<*mut u32, HelperError> {
    if !addr.is_multiple_of(4) {
        return Err(crate::vm::HelperFault::BadPointer {
            helper: id,
            arg: 1,
            addr,
            len: 4,
        }
        .into());
    }
    Ok(super::write_arg(ctx, id, 1, addr, 4)?.as_mut_ptr() as *mut u32)
}
