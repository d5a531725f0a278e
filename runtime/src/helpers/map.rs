//! Map helpers: `bpf_map_{lookup,update,delete}_elem`, `bpf_map_lookup_percpu_elem`,
//! `bpf_map_{push,pop,peek}_elem`, `bpf_for_each_map_elem`.

use bpftime_abi::HelperId;

use super::{neg, neg_map, read_arg, readonly, register, write_arg, RuntimeHelpers};
use crate::maps;
use crate::vm::{CallContext, HelperError, HelperFault};

type Ret = Result<u64, HelperError>;

pub(super) fn lookup_elem(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    lookup(h, HelperId::MAP_LOOKUP_ELEM, a, ctx)
}

pub(super) fn lookup_percpu_elem(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    lookup(h, HelperId::MAP_LOOKUP_PERCPU_ELEM, a, ctx)
}

fn lookup(h: &mut RuntimeHelpers, id: HelperId, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let idx = h.map_arg(id, 1, a[0])?;
    let m = &h.maps[idx];
    let key = read_arg(ctx, id, 2, a[1], m.def().key_size as usize)?;
    if m.map_type().is_map_of_maps() {
        // The kernel's CONST_PTR_TO_MAP: the inner map, as the map argument of the helpers
        // the program calls next (it never reads memory through it).
        return Ok(maps::inner_map(&h.maps, m, key).map_or(0, super::map_token));
    }
    let found = if id == HelperId::MAP_LOOKUP_ELEM {
        m.lookup(key)
    } else if !m.map_type().is_percpu() {
        return Ok(0);
    } else {
        m.lookup_cpu(key, a[2] as u32)
    };
    Ok(match found {
        Ok(Some(v)) => {
            let p = v.as_ptr() as u64;
            register(ctx, &h.maps, p, v.len() as u64, !readonly(m));
            p
        }
        _ => 0,
    })
}

pub(super) fn update_elem(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::MAP_UPDATE_ELEM;
    let idx = h.map_arg(ID, 1, a[0])?;
    let m = &h.maps[idx];
    let (ks, vs) = (m.def().key_size as usize, m.def().value_size as usize);
    let Some((key, val)) = ctx.read_mem2((a[1], ks), (a[2], vs)) else {
        // Name the argument that is bad.
        let (arg, addr, len) = if ctx.read_mem(a[1], ks).is_none() {
            (2, a[1], ks)
        } else {
            (3, a[2], vs)
        };
        return Err(HelperFault::BadPointer {
            helper: ID,
            arg,
            addr,
            len,
        }
        .into());
    };
    Ok(match m.update(key, val, a[3]) {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}

pub(super) fn delete_elem(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    const ID: HelperId = HelperId::MAP_DELETE_ELEM;
    let idx = h.map_arg(ID, 1, a[0])?;
    let m = &h.maps[idx];
    let key = read_arg(ctx, ID, 2, a[1], m.def().key_size as usize)?;
    Ok(match m.delete(key) {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}

pub(super) fn push_elem(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    const ID: HelperId = HelperId::MAP_PUSH_ELEM;
    let idx = h.map_arg(ID, 1, a[0])?;
    if let Some(b) = h.maps[idx].as_bloom_filter() {
        let val = read_arg(ctx, ID, 2, a[1], b.def().value_size as usize)?;
        return Ok(match b.push(val, a[2]) {
            Ok(()) => 0,
            Err(e) => neg_map(&e),
        });
    }
    let Some(q) = h.maps[idx].as_queue() else {
        return Ok(neg(libc::EINVAL));
    };
    let val = read_arg(ctx, ID, 2, a[1], q.def().value_size as usize)?;
    Ok(match q.push(val, a[2]) {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}

pub(super) fn pop_elem(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    take(h, HelperId::MAP_POP_ELEM, a, ctx)
}

pub(super) fn peek_elem(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    take(h, HelperId::MAP_PEEK_ELEM, a, ctx)
}

/// `bpf_map_pop_elem` (removes the value) and `bpf_map_peek_elem` (keeps it). On a bloom
/// filter the value is the one to test (peek), and pop is not supported.
fn take(h: &mut RuntimeHelpers, id: HelperId, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    let idx = h.map_arg(id, 1, a[0])?;
    if let Some(b) = h.maps[idx].as_bloom_filter() {
        if id == HelperId::MAP_POP_ELEM {
            return Ok(neg(libc::ENOTSUP));
        }
        let val = read_arg(ctx, id, 2, a[1], b.def().value_size as usize)?;
        return Ok(match b.peek(val) {
            Ok(()) => 0,
            Err(e) => neg_map(&e),
        });
    }
    let Some(q) = h.maps[idx].as_queue() else {
        return Ok(neg(libc::EINVAL));
    };
    let out = write_arg(ctx, id, 2, a[1], q.def().value_size as usize)?;
    let r = if id == HelperId::MAP_POP_ELEM {
        q.pop_into(out)
    } else {
        q.peek_into(out)
    };
    Ok(match r {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    })
}

/// `bpf_for_each_map_elem(map, callback, ctx, flags)`: the callback gets (map, key, value,
/// ctx) and stops the walk by returning 1.
#[inline(never)]
pub(super) fn for_each_map_elem(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(HelperId::FOR_EACH_MAP_ELEM, 1, a[0])?;
    if a[3] != 0 {
        return Ok(neg(libc::EINVAL));
    }
    let m = h.maps[idx].clone();
    let t = m.map_type();
    if !(t.is_hash() || t.is_array()) {
        return Ok(neg(libc::EINVAL));
    }
    let cpu = if t.is_percpu() {
        maps::current_cpu(h.ncpu)
    } else {
        0
    };
    let (ks, vs) = (u64::from(m.def().key_size), u64::from(m.def().value_size));
    let writable = !readonly(&m);
    let all_maps = h.maps.clone();
    let mut failed = None;
    let n = m.for_each_ptr(cpu, |k, v| {
        let (k, v) = (k as u64, v as u64);
        // Register key and value for the callback only (the key may live on the
        // iterator's stack); keep registrations that existed before.
        let mut added = Vec::new();
        if ctx.is_checked() {
            let mem = ctx.memory();
            mem.keep_alive(&all_maps);
            for (p, len, w) in [(k, ks, false), (v, vs, writable)] {
                if !mem.regions().iter().any(|r| r.start == p && r.len == len) {
                    // SAFETY: the key and value stay valid until this closure returns
                    // (the iterator holds them; values live in the mapping `mem` keeps
                    // alive); both are removed again below.
                    unsafe { mem.add_raw(p, len, w) };
                    added.push((p, len));
                }
            }
        }
        let r = ctx.call_function(h, a[1], [a[0], k, v, a[2], 0]);
        for (p, len) in added {
            ctx.memory().remove(p, len);
        }
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(n),
    }
}
