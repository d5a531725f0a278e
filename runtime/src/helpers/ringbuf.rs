//! Ring helpers: `bpf_ringbuf_{output,reserve,submit,discard,query}` and
//! `bpf_perf_event_output`.

use bpftime_abi::HelperId;

use super::{neg, neg_map, read_arg, register, Reservation, RuntimeHelpers};
use crate::vm::{CallContext, HelperError, HelperFault};

type Ret = Result<u64, HelperError>;

pub(super) fn ringbuf_output(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::RINGBUF_OUTPUT;
    let idx = h.map_arg(ID, 1, a[0])?;
    let data = read_arg(ctx, ID, 2, a[1], a[2] as usize)?;
    let Some(rb) = h.maps[idx].as_ringbuf() else {
        return Ok(neg(libc::EINVAL));
    };
    Ok(match rb.output(data, a[3]) {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}

/// Reserved records are remembered for the run: submit/discard accept only those, and
/// [`RuntimeHelpers::end_run`] discards what an aborted run left.
pub(super) fn ringbuf_reserve(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(HelperId::RINGBUF_RESERVE, 1, a[0])?;
    let Some(rb) = h.maps[idx].as_ringbuf() else {
        return Ok(0);
    };
    Ok(match rb.reserve(a[1], a[2]) {
        Some(p) => {
            let p = p as u64;
            register(ctx, &h.maps, p, a[1], true);
            h.reserved.push(Reservation {
                ptr: p,
                len: a[1],
                map: idx,
            });
            p
        }
        None => 0,
    })
}

pub(super) fn ringbuf_submit(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    commit(h, HelperId::RINGBUF_SUBMIT, a, ctx)
}

pub(super) fn ringbuf_discard(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    commit(h, HelperId::RINGBUF_DISCARD, a, ctx)
}

fn commit(h: &mut RuntimeHelpers, id: HelperId, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let pos = h
        .reserved
        .iter()
        .position(|r| r.ptr == a[0])
        .ok_or(HelperFault::BadRecord {
            helper: id,
            addr: a[0],
        })?;
    let r = h.reserved.swap_remove(pos);
    if ctx.is_checked() {
        ctx.memory().remove(r.ptr, r.len);
    }
    let m = &h.maps[r.map];
    // Reservations are made on RINGBUF maps only.
    let rb = m.as_ringbuf().ok_or(HelperFault::BadRecord {
        helper: id,
        addr: a[0],
    })?;
    let res = if id == HelperId::RINGBUF_SUBMIT {
        rb.submit(r.ptr as *mut u8, a[1])
    } else {
        rb.discard(r.ptr as *mut u8, a[1])
    };
    res.map_err(|e| HelperFault::Map {
        helper: id,
        map: m.name().into(),
        errno: e.errno(),
    })?;
    Ok(0)
}

/// `BPF_RB_AVAIL_DATA` and `BPF_RB_RING_SIZE`; the positions are not exposed (0).
pub(super) fn ringbuf_query(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    _: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(HelperId::RINGBUF_QUERY, 1, a[0])?;
    let m = &h.maps[idx];
    Ok(match a[1] {
        0 => m.as_ringbuf().map_or(0, |rb| rb.pending()),
        1 => u64::from(m.def().max_entries),
        _ => 0,
    })
}

pub(super) fn perf_event_output(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::PERF_EVENT_OUTPUT;
    let idx = h.map_arg(ID, 2, a[1])?;
    let data = read_arg(ctx, ID, 4, a[3], a[4] as usize)?;
    let Some(perf) = h.maps[idx].as_perf_event_array() else {
        return Ok(neg(libc::EINVAL));
    };
    Ok(match perf.output(a[2], data) {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}
