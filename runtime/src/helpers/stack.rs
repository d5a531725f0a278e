//! Stack helpers: `bpf_get_stackid` and `bpf_get_stack`.
//!
//! User stacks are collected as the kernel's x86-64 `perf_callchain_user` collects them from a
//! uprobe's registers: the probed address first; at a function's entry whose first instruction
//! is `push %rbp` (`is_uprobe_at_func_entry`) the return address at the stack pointer; then
//! the frame-pointer chain from `rbp` (`{next frame, return address}` pairs), until a frame
//! outside user space, an unreadable frame or the depth limit. Every read goes through
//! [`probe::read`], so a broken chain ends the walk instead of faulting, as the kernel's
//! `__get_user` under `pagefault_disable` does. Return addresses that a pending uretprobe of
//! ours replaced are put back (`fixup_uretprobe_trampoline_entries`) through the resolver the
//! hook engine registers ([`set_return_address_resolver`]).
//!
//! Kernel stacks: a uprobe runs on user-mode registers, for which the kernel collects no
//! kernel frames (`get_perf_callchain` walks the kernel stack only for kernel-mode
//! registers). So without `BPF_F_USER_STACK`, `bpf_get_stackid` returns `-EFAULT` and
//! `bpf_get_stack` returns 0 bytes, as on kernel uprobes.

use std::sync::OnceLock;

use bpftime_abi::flags::{BPF_F_SKIP_FIELD_MASK, BPF_F_USER_BUILD_ID, BPF_F_USER_STACK};
use bpftime_abi::HelperId;

use super::{neg, probe, write_arg, RuntimeHelpers};
use crate::maps::PERF_MAX_STACK_DEPTH;
use crate::vm::{CallContext, HelperError};

type Ret = Result<u64, HelperError>;

/// Offsets of the registers the walk needs in the kernel's x86-64 `struct pt_regs`.
const PT_REGS_RBP: usize = 4 * 8;
const PT_REGS_RIP: usize = 16 * 8;
const PT_REGS_RSP: usize = 19 * 8;
const PT_REGS_SIZE: usize = 21 * 8;

/// `TASK_SIZE_MAX` with 4-level paging: frames must end below it (`valid_user_frame`).
const USER_SPACE_END: u64 = 0x7fff_ffff_f000;

/// Maps a return address read from the stack at `slot` to the real one when a return probe
/// replaced it (see [`set_return_address_resolver`]).
pub type ReturnAddressResolver = fn(slot: u64, address: u64) -> u64;

static RESOLVER: OnceLock<ReturnAddressResolver> = OnceLock::new();

/// Registers the hook engine's resolver of replaced return addresses (the agent does, once).
pub fn set_return_address_resolver(f: ReturnAddressResolver) {
    let _ = RESOLVER.set(f);
}

fn real_return(slot: u64, address: u64) -> u64 {
    match RESOLVER.get() {
        Some(f) => f(slot, address),
        None => address,
    }
}

fn read_u64(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    probe::read(addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// The user stack of the registers `regs` (a `pt_regs`), innermost first, at most `max`
/// addresses. `at_entry`: the probe is on a function's first instruction and it is
/// `push %rbp` (see [`super::AttachContext::frame_at_entry`]).
pub fn user_stack(regs: &[u8], at_entry: bool, max: usize) -> Vec<u64> {
    let reg = |off: usize| u64::from_le_bytes(regs[off..off + 8].try_into().expect("8 bytes"));
    let mut out = Vec::with_capacity(max.min(32));
    if regs.len() < PT_REGS_SIZE || max == 0 {
        return out;
    }
    out.push(reg(PT_REGS_RIP));
    if at_entry && out.len() < max {
        let sp = reg(PT_REGS_RSP);
        if let Some(ret) = read_u64(sp) {
            out.push(real_return(sp, ret));
        }
    }
    let mut fp = reg(PT_REGS_RBP);
    while out.len() < max {
        if fp.checked_add(16).is_none_or(|end| end > USER_SPACE_END) {
            break;
        }
        let (Some(next), Some(ret)) = (read_u64(fp), read_u64(fp + 8)) else {
            break;
        };
        out.push(real_return(fp + 8, ret));
        fp = next;
    }
    out
}

/// The stack the helpers' flags ask for: the user stack, or the (always empty) kernel stack
/// of a user-mode context; `None` when the context is not readable as registers.
fn collect(
    h: &RuntimeHelpers,
    ctx: &mut CallContext<'_, '_>,
    regs: u64,
    user: bool,
    max: usize,
) -> Option<Vec<u64>> {
    let regs = ctx.read_mem(regs, PT_REGS_SIZE)?;
    Some(if user {
        user_stack(regs, h.attach.frame_at_entry, max)
    } else {
        Vec::new()
    })
}

/// `bpf_get_stackid(ctx, map, flags)`: the id of the current stack in a STACK_TRACE map.
pub(super) fn get_stackid(
    h: &mut RuntimeHelpers,
    a: [u64; 5],
    ctx: &mut CallContext<'_, '_>,
) -> Ret {
    let idx = h.map_arg(HelperId::GET_STACKID, 2, a[1])?;
    let Some(map) = h.maps[idx].as_stack_trace().cloned() else {
        return Ok(neg(libc::EINVAL));
    };
    let flags = a[2];
    let skip = (flags & BPF_F_SKIP_FIELD_MASK) as u32;
    let max = (map.max_depth() + skip).min(PERF_MAX_STACK_DEPTH) as usize;
    let Some(ips) = collect(h, ctx, a[0], flags & BPF_F_USER_STACK != 0, max) else {
        return Ok(neg(libc::EFAULT));
    };
    Ok(match map.store(&ips, flags) {
        Ok(id) => u64::from(id),
        Err(e) => neg(e),
    })
}

/// `bpf_get_stack(ctx, buf, size, flags)`: the current stack's addresses into `buf`; returns
/// the bytes written (the rest of `buf` zeroed), or a negative errno with `buf` zeroed.
pub(super) fn get_stack(h: &mut RuntimeHelpers, a: [u64; 5], ctx: &mut CallContext<'_, '_>) -> Ret {
    const ID: HelperId = HelperId::GET_STACK;
    let (regs, buf, size, flags) = (a[0], a[1], a[2] as u32 as usize, a[3]);
    let skip = (flags & BPF_F_SKIP_FIELD_MASK) as usize;
    let user = flags & BPF_F_USER_STACK != 0;
    let bad_flags = flags & !(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_USER_BUILD_ID) != 0;
    // Build-id stacks need the build id of every mapped file: not collected in user space.
    let result = if bad_flags || flags & BPF_F_USER_BUILD_ID != 0 || !size.is_multiple_of(8) {
        Err(libc::EINVAL)
    } else {
        let max = (size / 8 + skip).min(PERF_MAX_STACK_DEPTH as usize);
        match collect(h, ctx, regs, user, max) {
            Some(ips) if ips.len() >= skip => {
                Ok(ips[skip..].iter().take(size / 8).copied().collect())
            }
            _ => Err(libc::EFAULT),
        }
    };
    let out = write_arg(ctx, ID, 2, buf, size)?;
    out.fill(0);
    Ok(match result {
        Ok(ips) => {
            let ips: Vec<u64> = ips;
            for (i, ip) in ips.iter().enumerate() {
                out[i * 8..i * 8 + 8].copy_from_slice(&ip.to_le_bytes());
            }
            (ips.len() * 8) as u64
        }
        Err(e) => neg(e),
    })
}
