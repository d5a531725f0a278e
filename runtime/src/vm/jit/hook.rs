//! [`JitHook`]: a machine-code entry that runs an image in per-thread-slot [`JitSession`]s,
//! for hook engines to call directly.

use std::sync::atomic::{AtomicPtr, Ordering};

use super::env::{JitEnv, ENV_STATUS};
use super::{JitProgram, JitSession};

/// Called by [`JitHook`]'s entry, with xmm0-7 saved: `(data, ctx, slot)`, as the entry itself.
pub type JitHookSlowFn = unsafe extern "C" fn(data: *const (), ctx: *mut u8, slot: usize) -> u64;
/// Called by [`JitHook`]'s entry, with xmm0-7 saved, after a run that did not simply return
/// (an error, see [`JitSession::finish_hook_run`]): `(data, slot, r0)`; returns what the entry
/// returns.
pub type JitHookAfterFn = unsafe extern "C" fn(data: *const (), slot: usize, r0: u64) -> u64;

/// A machine-code entry point running an image in per-thread-slot sessions, for a hook engine
/// to call directly: `entry(hook, ctx, slot) -> 0`, with `ctx` the context of `ctx_len` bytes
/// and `slot` the calling thread's slot. With the per-slot environment set up once, a run is a
/// few loads, the image's code and one status test; the helpers' per-run reset is skipped, so
/// only images whose runs need none get an entry (see [`new`](Self::new)). The entry itself
/// touches no vector register (it saves xmm0-7 around its callbacks); a *leaf* image (its only
/// helper calls are map lookup/update/delete, and no `callx`) saves them around its own native
/// calls too, so a caller need not save them at all
/// ([`preserves_vector_regs`](Self::preserves_vector_regs)). The first run of a slot (no session registered yet, see
/// [`set_slot`](Self::set_slot)) goes to `slow`, a run that did not simply return to `after`.
#[repr(C)]
pub struct JitHook {
    envs: *const AtomicPtr<JitEnv<'static, 'static>>,
    slots: usize,
    code: u64,
    ctx_len: u64,
    slow: JitHookSlowFn,
    after: JitHookAfterFn,
    data: *const (),
    image: *const JitProgram,
    /// Owns what `envs` points at.
    env_table: Box<[AtomicPtr<JitEnv<'static, 'static>>]>,
}

// SAFETY: the slot table is atomics; the other fields are immutable after `new`. What the
// pointers name (the image, the callbacks' data) is owned by whoever made the hook, who keeps it
// alive (the contract of `new`).
unsafe impl Send for JitHook {}
// SAFETY: as above.
unsafe impl Sync for JitHook {}

const HOOK_ENVS: usize = std::mem::offset_of!(JitHook, envs);
const HOOK_SLOTS: usize = std::mem::offset_of!(JitHook, slots);
const HOOK_CODE: usize = std::mem::offset_of!(JitHook, code);
const HOOK_CTX_LEN: usize = std::mem::offset_of!(JitHook, ctx_len);
const HOOK_SLOW: usize = std::mem::offset_of!(JitHook, slow);
const HOOK_AFTER: usize = std::mem::offset_of!(JitHook, after);
const HOOK_DATA: usize = std::mem::offset_of!(JitHook, data);

/// xmm0-7 to / from the 128 bytes at `rsp`.
macro_rules! save_xmm_at_rsp {
    () => {
        concat!(
            "movdqu [rsp], xmm0\n",
            "movdqu [rsp+16], xmm1\n",
            "movdqu [rsp+32], xmm2\n",
            "movdqu [rsp+48], xmm3\n",
            "movdqu [rsp+64], xmm4\n",
            "movdqu [rsp+80], xmm5\n",
            "movdqu [rsp+96], xmm6\n",
            "movdqu [rsp+112], xmm7\n",
        )
    };
}

macro_rules! restore_xmm_at_rsp {
    () => {
        concat!(
            "movdqu xmm0, [rsp]\n",
            "movdqu xmm1, [rsp+16]\n",
            "movdqu xmm2, [rsp+32]\n",
            "movdqu xmm3, [rsp+48]\n",
            "movdqu xmm4, [rsp+64]\n",
            "movdqu xmm5, [rsp+80]\n",
            "movdqu xmm6, [rsp+96]\n",
            "movdqu xmm7, [rsp+112]\n",
        )
    };
}

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl bpftime_jit_hook_entry",
    ".hidden bpftime_jit_hook_entry",
    ".type bpftime_jit_hook_entry,@function",
    "bpftime_jit_hook_entry:",
    // rdi = hook, rsi = ctx, rdx = slot
    "cmp rdx, [rdi+{slots}]",
    "jae 5f",
    "mov rax, [rdi+{envs}]",
    "mov r9, [rax+rdx*8]",
    "test r9, r9",
    "jz 5f",
    // three pushes: rsp 16-byte aligned for the call
    "push rbx",
    "push r12",
    "push r13",
    "mov rbx, r9",
    "mov r12, rdi",
    "mov r13, rdx",
    "mov rdi, rsi",
    "mov rsi, [r12+{ctx_len}]",
    // the image's outer entry: r1 = rdi, r2 = rsi, env = r9
    "call [r12+{code}]",
    "cmp dword ptr [rbx+{status}], 0",
    "jne 6f",
    "xor eax, eax",
    "2:",
    "pop r13",
    "pop r12",
    "pop rbx",
    "ret",
    // a run that did not simply return: `after(data, slot, r0)`, vector registers saved
    "6:",
    "sub rsp, 128",
    save_xmm_at_rsp!(),
    "mov rdi, [r12+{data}]",
    "mov rsi, r13",
    "mov rdx, rax",
    "call [r12+{after}]",
    restore_xmm_at_rsp!(),
    "add rsp, 128",
    "jmp 2b",
    // no session for this slot yet: `slow(data, ctx, slot)`, vector registers saved
    "5:",
    "sub rsp, 136",
    save_xmm_at_rsp!(),
    "mov rax, rdi",
    "mov rdi, [rax+{data}]",
    "call [rax+{slow}]",
    restore_xmm_at_rsp!(),
    "add rsp, 136",
    "ret",
    ".size bpftime_jit_hook_entry, .-bpftime_jit_hook_entry",
    slots = const HOOK_SLOTS,
    envs = const HOOK_ENVS,
    ctx_len = const HOOK_CTX_LEN,
    code = const HOOK_CODE,
    status = const ENV_STATUS,
    data = const HOOK_DATA,
    after = const HOOK_AFTER,
    slow = const HOOK_SLOW,
);

extern "C" {
    fn bpftime_jit_hook_entry(hook: *const (), ctx: *mut u8, slot: usize) -> u64;
}

impl JitHook {
    /// A hook entry for `image` with `slots` thread slots, or `None` when its runs may need the
    /// helpers' per-run reset, which the entry does not do (run those through
    /// [`JitSession::run`] and the helpers' `begin_run`/`end_run`). A leaf image never does;
    /// for others the caller says so with `no_run_reset` (it knows what its helpers keep per
    /// run: `helpers::needs_no_run_reset`).
    ///
    /// # Safety
    /// `image` must outlive the hook, and `data` must stay valid for `slow` and `after` while
    /// the entry may be called; `no_run_reset` must be true only if the image's runs need no
    /// reset of the helpers' state between them.
    pub unsafe fn new(
        image: &JitProgram,
        slots: usize,
        ctx_len: u64,
        slow: JitHookSlowFn,
        after: JitHookAfterFn,
        data: *const (),
        no_run_reset: bool,
    ) -> Option<Box<Self>> {
        if !image.leaf && !no_run_reset {
            return None;
        }
        let envs: Box<[AtomicPtr<JitEnv<'static, 'static>>]> = (0..slots)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        let mut hook = Box::new(Self {
            envs: std::ptr::null(),
            slots,
            code: image.code.as_ptr() as u64,
            ctx_len,
            slow,
            after,
            data,
            image,
            env_table: envs,
        });
        // Taken from the table in its final place.
        hook.envs = hook.env_table.as_ptr();
        Some(hook)
    }

    /// Whether a run through the entry leaves xmm0-7 as they were (a leaf image saves them
    /// around its own native calls); otherwise the caller must save them.
    pub fn preserves_vector_regs(&self) -> bool {
        // SAFETY: the image outlives the hook (the contract of `new`).
        unsafe { (*self.image).leaf }
    }

    /// The entry point, to be called as `entry(hook as *const JitHook as *const (), ctx, slot)`.
    pub fn entry() -> JitHookSlowFn {
        bpftime_jit_hook_entry
    }

    /// Registers `session` as slot `slot`'s: later runs of that slot go straight to the image.
    /// Returns false (and registers nothing) when the slot is out of range or the session runs
    /// another image.
    ///
    /// # Safety
    /// The session must stay alive and in place, and be used only by the thread holding the
    /// slot (as the entry uses it), for as long as the entry may be called with this slot.
    pub unsafe fn set_slot(&self, slot: usize, session: &mut JitSession<'_>) -> bool {
        if slot >= self.slots || !std::ptr::eq(session.image, self.image) {
            return false;
        }
        let env: *mut JitEnv<'static, 'static> =
            (&mut session.env as *mut JitEnv<'_, 'static>).cast();
        self.env_table[slot].store(env, Ordering::Release);
        true
    }
}
