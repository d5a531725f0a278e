//! Control-flow and attach helpers: `bpf_tail_call`, `bpf_loop`, `bpf_override_return`,
//! `bpf_get_func_ip`, `bpf_get_attach_cookie`.

use bpftime_abi::HelperId;

use super::{neg, RuntimeHelpers, BPF_MAX_LOOPS, MAX_TAIL_CALLS};
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
