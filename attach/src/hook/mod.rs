//! The in-process hook engine.
//!
//! Each hooked address (a *site*) gets a detour (`detour` 0.10: the displaced instructions are
//! relocated into a trampoline; patching happens in a `Transaction` with every other thread
//! suspended and moved out of the patched bytes) to a small per-site thunk, which pushes the site
//! pointer and jumps to a shared stub that saves all registers into a kernel-layout
//! [`PtRegs`] (+ xmm0-7) and calls the dispatcher. Handlers registered on the site run in order.
//! Return hooks replace the return address with the return stub and keep the real one on a
//! per-thread shadow stack, validated by stack address so frames skipped by `longjmp` are dropped.
//!
//! Fast paths (see `stub.rs` and `refresh_direct`): a site whose only entry handler offers a
//! [`DirectEntry`] is served by the stub calling it, without the dispatcher (and without saving
//! the vector registers when the entry preserves them); at a site with return handlers only,
//! the stub pushes the shadow frame itself; the return stub pops the top frame itself and calls
//! the only return handler's direct entry. Everything unusual falls back to the dispatchers.
//!
//! Sites and their trampolines, thunks and handler lists are never freed: a thread may still be
//! inside them, or have a return pending, after the hook is removed.
//!
//! Known limits:
//! * per-thread state lives in a fixed table of 2048 slots keyed by TCB
//!   address (no TLS, see `thread.rs`), freed when a thread exits; beyond 2048 live threads,
//!   calls run without handlers ([`HookStats::no_thread_slot`]). Shadow stacks hold 256 frames; deeper pending returns are
//!   not hooked ([`HookStats::shadow_overflow`]).
//! * stale shadow frames (longjmp, exceptions) are recognised by stack address; a signal
//!   handler on an alternate stack placed *above* the thread's stack that calls a
//!   return-hooked function drops the thread's pending frames' handlers (returns stay correct).
//! * C++ exceptions / Rust panics / `pthread_exit` through a frame with a pending return hook:
//!   the unwinder entry points of `libgcc_s` are hooked to put real return addresses back first
//!   (`ensure_unwind_fixups`); the return handlers of the thread's pending frames then do
//!   not run. A program whose unwinder is linked statically is not covered.
//! * while a hook is installed or removed, a call on another thread may still see the site's
//!   previous handlers (or fast path) for that one call: a handler just added may miss it, a
//!   return handler just added may miss that call's return. Nothing is freed under a thread.
//! * a function reading its own return address (`__builtin_return_address`) sees the return
//!   stub while a return hook is pending; coroutine switches (`swapcontext`) between a hooked
//!   entry and its return are not supported for return hooks.

mod callfix;
mod dispatch;
mod registry;
mod stub;
mod thread;
mod trap;

use crate::error::AttachError;
use crate::precheck;
use crate::regs::PtRegs;
use crate::symbols::ResolvedTarget;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dispatch::*;
pub use registry::{active_sites, reserve_sites, site_mechanism, HookSet};

/// Makes the calling thread invisible to every hook for the rest of its life: its hooked
/// calls run unprobed, as calls made inside a handler do. For the agent's own threads, whose
/// allocations and file reads must never be counted as the target's.
pub fn exclude_current_thread() {
    if let Some((index, _)) = thread::current_indexed() {
        thread::guard(index).store(true, Ordering::Relaxed);
    }
}

/// Runs `f` with the calling thread's hooks off (restored afterwards): for work the agent does
/// on a target's thread outside any handler (starting up, installing hooks).
pub fn without_probes<R>(f: impl FnOnce() -> R) -> R {
    let Some((index, _)) = thread::current_indexed() else {
        return f();
    };
    let guard = thread::guard(index);
    let was = guard.swap(true, Ordering::Relaxed);
    let r = f();
    guard.store(was, Ordering::Relaxed);
    r
}

/// The real return address behind `address`, read from stack slot `slot` of the calling
/// thread: a pending return hook replaced the return address with our return stub, whose
/// original the thread's shadow stack holds (the kernel's
/// `fixup_uretprobe_trampoline_entries` does the same for its uretprobe trampoline). Any
/// other address is returned unchanged.
pub fn real_return_address(slot: u64, address: u64) -> u64 {
    if address != stub::return_stub() {
        return address;
    }
    thread::pending_return(slot).unwrap_or(address)
}

/// Whether the instruction bytes at a function's entry set up a frame the way the kernel's
/// `is_uprobe_at_func_entry` recognises (`push %rbp`; `endbr64` counts only on kernels
/// built with IBT, which the x86 kernel checks with `is_endbr`, so it is not counted here).
pub fn pushes_frame_at_entry(code: &[u8]) -> bool {
    code.first() == Some(&0x55)
}

/// The first bytes of the function at `address` as they were before any hook patched them:
/// a hooked site's displaced instructions start its detour trampoline (copied verbatim for
/// position-independent instructions such as `push %rbp`); any other address is read in
/// place.
pub fn original_code(address: u64, len: usize) -> Vec<u8> {
    let from = registry::trampoline_of(address).unwrap_or(address);
    let mut out = vec![0u8; len];
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: from as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` is our buffer; the kernel validates `remote` (EFAULT, not a fault).
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n != len as isize {
        out.clear();
    }
    out
}

/// What an entry handler asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryAction {
    /// Run the original function.
    Continue,
    /// Skip the function and return this value to its caller (`bpf_override_return`).
    Override(u64),
}

/// A probe program. Runs on whichever thread calls the hooked function, possibly on many
/// threads at once. Calls of hooked functions made by a handler (on the same thread) do not
/// trigger handlers again.
pub trait ProbeHandler: Send + Sync {
    /// At function entry (uprobe). `regs` may be modified; the changes are applied.
    fn on_entry(&self, regs: &mut PtRegs) -> EntryAction {
        let _ = regs;
        EntryAction::Continue
    }
    /// At function return (uretprobe); `regs.rax` = return value, `regs.rip` = return address.
    fn on_return(&self, regs: &mut PtRegs) {
        let _ = regs;
    }
    /// What the hook engine calls at function entry: [`on_entry`](Self::on_entry) unless
    /// overridden. `thread` identifies the calling thread's slot, for per-thread handler state
    /// without thread-local storage (see [`ThreadSlot`]).
    #[inline]
    fn on_entry_in(&self, regs: &mut PtRegs, thread: ThreadSlot) -> EntryAction {
        let _ = thread;
        self.on_entry(regs)
    }
    /// What the hook engine calls at function return: [`on_return`](Self::on_return) unless
    /// overridden (see [`on_entry_in`](Self::on_entry_in)).
    #[inline]
    fn on_return_in(&self, regs: &mut PtRegs, thread: ThreadSlot) {
        let _ = thread;
        self.on_return(regs)
    }
    /// A direct entry point doing what [`on_entry_in`](Self::on_entry_in) does, for the
    /// engine's fast path: when this handler is the only one at a function-entry site, the
    /// entry stub calls it itself, without the generic dispatcher. `None` (the default): calls
    /// go through `on_entry_in`. Asked once per change of the site's handlers.
    fn direct_entry(&self) -> Option<DirectEntry> {
        None
    }
    /// A direct entry point doing what [`on_return_in`](Self::on_return_in) does, for the
    /// return stub's fast path (the only return handler of a site); its result is ignored.
    fn direct_return(&self) -> Option<DirectEntry> {
        None
    }
}

/// A handler's direct entry point ([`ProbeHandler::direct_entry`]).
///
/// The entry stub calls `func(data, regs, thread)` (SysV ABI) with the thread's re-entrancy
/// guard set, `regs` the hooked call's registers (changes are applied) and `thread` the
/// calling thread's [`ThreadSlot`]. It returns 0 to run the function, or nonzero to skip it and
/// return `regs.rax` to the caller (`bpf_override_return`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct DirectEntry {
    /// Must not unwind (an `extern "C"` function aborts the process if it does: catch panics).
    pub func: unsafe extern "C" fn(data: *const (), regs: *mut PtRegs, thread: ThreadSlot) -> u64,
    /// Valid for as long as the handler that returned it lives (the engine keeps it alive).
    pub data: *const (),
    /// `func` leaves xmm0-7 (the vector argument registers) as it found them, so the stub
    /// need not save them (16 vector memory operations per call). Compiled Rust cannot
    /// promise this (the compiler uses vector registers for copies); machine code written to
    /// save them around its own calls can.
    pub preserves_vector_regs: bool,
}

pub(crate) const DIRECT_FUNC: usize = std::mem::offset_of!(DirectEntry, func);
pub(crate) const DIRECT_DATA: usize = std::mem::offset_of!(DirectEntry, data);
pub(crate) const DIRECT_PRESERVES_VECTOR_REGS: usize =
    std::mem::offset_of!(DirectEntry, preserves_vector_regs);

/// How many [`ThreadSlot`]s there are: indices run from 0 to `MAX_THREADS - 1`.
pub const MAX_THREADS: usize = thread::MAX_THREADS;

/// The calling thread's slot in the hook engine's per-thread table, handed to handlers
/// ([`ProbeHandler::on_entry_in`]). Two threads alive at the same time never have the same
/// slot, and a thread keeps its slot for life; after a thread exits, its slot goes to a later
/// thread with the same thread control block (glibc reuses them). Handlers run with the
/// thread's re-entrancy guard set, so per-thread state indexed by the slot is only ever used by
/// one handler invocation at a time (per handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct ThreadSlot(usize);

impl ThreadSlot {
    /// The slot's index, below [`MAX_THREADS`].
    #[inline]
    pub fn index(self) -> usize {
        self.0
    }

    /// The slot's identity generation: it changes whenever the task holding the slot may be
    /// another one (a new thread claimed it; a fork child's copy of it). What a handler caches
    /// about the calling thread is valid while the generation it cached at is current. `None`
    /// when this process cannot hand slots over safely: cache nothing then.
    #[inline]
    pub fn identity_generation(self) -> Option<&'static AtomicU64> {
        thread::identity_generation(self.0)
    }
}

/// [`ThreadSlot::identity_generation`] by slot index (below [`MAX_THREADS`]).
pub fn slot_identity_generation(index: usize) -> Option<&'static AtomicU64> {
    (index < MAX_THREADS)
        .then(|| thread::identity_generation(index))
        .flatten()
}

/// Which handler method a hook calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `on_entry` at the target address.
    Uprobe,
    /// `on_return` when the function returns (target must be a function entry).
    Uretprobe,
}

/// Identifies an installed hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookId(pub u64);

impl std::fmt::Display for HookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Process-wide counters of unusual events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookStats {
    /// Hooked calls made from inside a handler (handlers not run).
    pub reentered: u64,
    /// Calls on threads beyond the thread table's capacity (handlers not run).
    pub no_thread_slot: u64,
    /// Return hooks skipped because the shadow stack was full.
    pub shadow_overflow: u64,
    /// Shadow frames dropped because their stack frame was gone (longjmp, unwinding).
    pub stale_frames: u64,
    /// Handlers that panicked (treated as `Continue`).
    pub handler_panics: u64,
    /// Thread-table slots held by live threads now (exited threads free theirs).
    pub thread_slots_in_use: u64,
}

static REENTERED: AtomicU64 = AtomicU64::new(0);
static NO_SLOT: AtomicU64 = AtomicU64::new(0);
static OVERFLOW: AtomicU64 = AtomicU64::new(0);
static STALE: AtomicU64 = AtomicU64::new(0);
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Reads the process-wide counters.
pub fn stats() -> HookStats {
    HookStats {
        reentered: REENTERED.load(Ordering::Relaxed),
        no_thread_slot: NO_SLOT.load(Ordering::Relaxed),
        shadow_overflow: OVERFLOW.load(Ordering::Relaxed),
        stale_frames: STALE.load(Ordering::Relaxed),
        handler_panics: PANICS.load(Ordering::Relaxed),
        thread_slots_in_use: thread::slots_in_use() as u64,
    }
}
