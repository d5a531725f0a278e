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
mod stub;
mod thread;

use crate::error::AttachError;
use crate::precheck;
use crate::regs::PtRegs;
use crate::symbols::ResolvedTarget;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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

/// One registered handler. `ptr` is `handler`'s object, computed once at registration: the
/// dispatchers call through it without re-deriving the data address from the `Arc` (a load of
/// the vtable's alignment and arithmetic on every call).
#[derive(Clone)]
struct HandlerEntry {
    id: HookId,
    ptr: *const dyn ProbeHandler,
    /// Keeps `ptr` valid.
    _handler: Arc<dyn ProbeHandler>,
}

// SAFETY: `ptr` points into `_handler`, a `Send + Sync` object the entry keeps alive.
unsafe impl Send for HandlerEntry {}
// SAFETY: as above.
unsafe impl Sync for HandlerEntry {}

impl HandlerEntry {
    fn new(id: HookId, handler: Arc<dyn ProbeHandler>) -> Self {
        Self {
            id,
            ptr: Arc::as_ptr(&handler),
            _handler: handler,
        }
    }
}

type Handlers = Vec<HandlerEntry>;

/// A hooked address. Leaked: referenced by thunks and pending shadow frames forever.
/// `repr(C)`: the entry stub reads the first four fields (offsets checked below).
#[repr(C)]
pub(crate) struct Site {
    addr: u64,
    /// Where "continue" goes: the detour trampoline.
    trampoline: AtomicU64,
    /// The only entry handler's [`DirectEntry`] when the stub may call it itself (see
    /// [`refresh_direct`]); null otherwise. Leaked like the handler lists.
    direct: AtomicPtr<DirectEntry>,
    enabled: AtomicBool,
    /// Only return handlers (at a function entry): the entry stub pushes the shadow frame
    /// itself, with no call at all.
    returns_only: AtomicBool,
    /// The only return handler's [`ProbeHandler::direct_return`], or null.
    direct_return: AtomicPtr<DirectEntry>,
    /// Hooked inside a function (no override, no return hooks).
    mid_function: bool,
    /// An unwinder entry point (`_Unwind_RaiseException`, ...): put back every replaced return
    /// address of this thread first, so the unwinder walks real frames.
    unwind_fixup: bool,
    name: String,
    /// Null = empty. Replaced copy-on-write, old lists leaked (readers never see freed memory).
    entries: AtomicPtr<Handlers>,
    returns: AtomicPtr<Handlers>,
}

pub(crate) const SITE_ADDR: usize = std::mem::offset_of!(Site, addr);
pub(crate) const SITE_TRAMPOLINE: usize = std::mem::offset_of!(Site, trampoline);
pub(crate) const SITE_DIRECT: usize = std::mem::offset_of!(Site, direct);
pub(crate) const SITE_ENABLED: usize = std::mem::offset_of!(Site, enabled);
pub(crate) const SITE_RETURNS_ONLY: usize = std::mem::offset_of!(Site, returns_only);
pub(crate) const SITE_DIRECT_RETURN: usize = std::mem::offset_of!(Site, direct_return);

/// Points the site's fast paths at its handlers' direct entries when the stubs may call them
/// alone: exactly one entry handler offering one and no return handler (the entry stub's fast
/// path pushes no shadow frame), or exactly one return handler offering one (the return stub's);
/// and notes a site with return handlers only (the entry stub pushes the frame itself). Only at
/// a function entry and not at an unwinder fix-up site. Called after every change of the site's
/// handler lists, under the registry lock.
fn refresh_direct(site: &Site) {
    let load = |l: &AtomicPtr<Handlers>| {
        let p = l.load(Ordering::Acquire);
        // SAFETY: published lists are never freed.
        (!p.is_null()).then(|| unsafe { (*p).as_slice() })
    };
    let plain = !site.mid_function && !site.unwind_fixup;
    let (entries, returns) = (load(&site.entries), load(&site.returns));
    let direct = match (entries, returns) {
        (Some([only]), None) if plain => {
            // SAFETY: the entry keeps its handler alive.
            unsafe { &*only.ptr }.direct_entry()
        }
        _ => None,
    };
    let direct_return = match returns {
        // SAFETY: as above.
        Some([only]) if plain => unsafe { &*only.ptr }.direct_return(),
        _ => None,
    };
    let leak =
        |d: Option<DirectEntry>| d.map_or(std::ptr::null_mut(), |d| Box::into_raw(Box::new(d)));
    // Previous entries are leaked: a thread in a stub may still be reading them.
    site.direct.store(leak(direct), Ordering::Release);
    site.direct_return
        .store(leak(direct_return), Ordering::Release);
    site.returns_only.store(
        plain && entries.is_none() && returns.is_some(),
        Ordering::Release,
    );
}

/// Runs `f` on each handler of a list.
#[inline(always)]
fn for_each(list: &AtomicPtr<Handlers>, mut f: impl FnMut(&dyn ProbeHandler)) {
    let p = list.load(Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: lists are never freed once published; each entry keeps its handler alive.
    for h in unsafe { &*p } {
        // SAFETY: `ptr` points into the `Arc` the entry holds, alive as long as the entry.
        f(unsafe { &*h.ptr });
    }
}

/// Called by the entry stub. Returns where to continue.
///
/// # Safety
/// Only called by the stub, with a leaked `Site` and the frame it built.
unsafe extern "C" fn dispatch_entry(site: *const Site, regs: *mut PtRegs) -> u64 {
    // SAFETY: see the function's contract.
    let (site, regs) = unsafe { (&*site, &mut *regs) };
    regs.rip = site.addr;
    let cont = site.trampoline.load(Ordering::Relaxed);
    if !site.enabled.load(Ordering::Relaxed) {
        return cont;
    }
    let Some((index, ts)) = thread::current_indexed() else {
        NO_SLOT.fetch_add(1, Ordering::Relaxed);
        return cont;
    };
    let slot = ThreadSlot(index);
    let guard = thread::guard(index);
    if guard.load(Ordering::Relaxed) {
        REENTERED.fetch_add(1, Ordering::Relaxed);
        return cont;
    }
    if site.unwind_fixup {
        restore_all_frames(ts);
    }
    guard.store(true, Ordering::Relaxed);
    let entry_rsp = regs.rsp;
    let mut over = None;
    for_each(&site.entries, |h| {
        match catch_unwind(AssertUnwindSafe(|| h.on_entry_in(regs, slot))) {
            Ok(EntryAction::Override(v)) if !site.mid_function => over = Some(v),
            Ok(_) => {}
            Err(_) => {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let next = if let Some(v) = over {
        regs.rax = v;
        stub::ret_insn()
    } else {
        let rets = site.returns.load(Ordering::Acquire);
        // SAFETY: lists are never freed once published.
        if !site.mid_function && !rets.is_null() && !unsafe { &*rets }.is_empty() {
            push_frame(ts, site, entry_rsp);
        }
        cont
    };
    guard.store(false, Ordering::Relaxed);
    next
}

/// The entry stub's slow thread lookup (the hash probe missed: a thread's first hooked call,
/// or a collision): the calling thread's slot index, or -1 when the table is full (counted).
extern "C" fn stub_thread_slot() -> isize {
    match thread::current_indexed() {
        Some((index, _)) => index as isize,
        None => {
            NO_SLOT.fetch_add(1, Ordering::Relaxed);
            -1
        }
    }
}

#[inline]
fn push_frame(ts: &mut thread::ThreadState, site: &Site, slot: u64) {
    let ret_ptr = slot as *mut u64;
    // SAFETY: `slot` is the stack pointer at the function's entry: it holds the return address.
    let current = unsafe { ret_ptr.read() };
    // A function entered by a tail call (`jmp`, e.g. libc's `realloc(NULL, n)` into `malloc`)
    // from a function whose return is hooked finds that function's frame at the same slot and
    // the return stub already in it: the new frame chains to that one (same original return
    // address; the shared return runs both frames' handlers, innermost first).
    let chained = current == stub::return_stub();
    // Other frames at or below the current stack pointer belong to returns that never happened
    // (longjmp, exceptions): drop them.
    while let Some(top) = ts.depth.checked_sub(1).map(|i| ts.frames[i]) {
        if top.slot > slot || (chained && top.slot == slot) {
            break;
        }
        ts.depth -= 1;
        STALE.fetch_add(1, Ordering::Relaxed);
    }
    let orig_ret = if chained {
        match ts.depth.checked_sub(1).map(|i| ts.frames[i]) {
            Some(top) if top.slot == slot => top.orig_ret,
            // The stub without a frame of ours: not a return this thread hooked; leave it.
            _ => return,
        }
    } else {
        current
    };
    if ts.depth == thread::MAX_FRAMES {
        OVERFLOW.fetch_add(1, Ordering::Relaxed);
        return;
    }
    ts.frames[ts.depth] = thread::Frame {
        slot,
        orig_ret,
        site,
    };
    ts.depth += 1;
    if !chained {
        // SAFETY: as above; the return stub restores the real return address.
        unsafe { ret_ptr.write(stub::return_stub()) };
    }
}

/// Writes the real return addresses back into every pending frame of this thread and empties
/// its shadow stack (their return handlers will not run: the frames are being unwound, or are
/// outer frames, which then return directly).
fn restore_all_frames(ts: &mut thread::ThreadState) {
    let stub_addr = stub::return_stub();
    for f in &ts.frames[..ts.depth] {
        let p = f.slot as *mut u64;
        // SAFETY: `slot` held the return address of a frame of this thread's stack at entry;
        // only rewritten if it still holds our stub (the frame is still live).
        unsafe {
            if p.read() == stub_addr {
                p.write(f.orig_ret);
            }
        }
    }
    STALE.fetch_add(ts.depth as u64, Ordering::Relaxed);
    ts.depth = 0;
}

/// Called by the return stub. Returns the original return address.
///
/// # Safety
/// Only called by the stub with the frame it built.
unsafe extern "C" fn dispatch_return(regs: *mut PtRegs) -> u64 {
    // SAFETY: see the function's contract.
    let regs = unsafe { &mut *regs };
    let slot = regs.rsp - 8;
    let Some((index, ts)) = thread::current_indexed() else {
        fatal(b"bpftime-attach: return stub reached on a thread without state\n");
    };
    let frame = loop {
        if ts.depth == 0 {
            fatal(b"bpftime-attach: return stub reached with an empty shadow stack\n");
        }
        let f = ts.frames[ts.depth - 1];
        ts.depth -= 1;
        if f.slot == slot {
            break f;
        }
        if f.slot > slot {
            fatal(b"bpftime-attach: no shadow frame for this return\n");
        }
        STALE.fetch_add(1, Ordering::Relaxed);
    };
    regs.rip = frame.orig_ret;
    // SAFETY: sites are leaked, never freed; `index` is this thread's slot.
    unsafe { stub_run_returns(frame.site, regs, index) };
    // Frames chained to this one by tail calls (see `push_frame`) return here too.
    while let Some(outer) = ts.depth.checked_sub(1).map(|i| ts.frames[i]) {
        if outer.slot != slot {
            break;
        }
        ts.depth -= 1;
        // SAFETY: as above.
        unsafe { stub_run_returns(outer.site, regs, index) };
    }
    frame.orig_ret
}

/// Runs the return handlers of `site` on `regs` for the thread in slot `index`, unless the
/// thread is inside a handler already or the site is being removed. Called by
/// [`dispatch_return`] and by the return stub's fast path (which popped the frame itself).
///
/// # Safety
/// `site` is a leaked site, `regs` the return stub's frame, `index` the calling thread's slot.
unsafe extern "C" fn stub_run_returns(site: *const Site, regs: *mut PtRegs, index: usize) {
    // SAFETY: see the function's contract.
    let (site, regs) = unsafe { (&*site, &mut *regs) };
    let guard = thread::guard(index);
    if !guard.load(Ordering::Relaxed) && site.enabled.load(Ordering::Relaxed) {
        guard.store(true, Ordering::Relaxed);
        for_each(&site.returns, |h| {
            if catch_unwind(AssertUnwindSafe(|| h.on_return_in(regs, ThreadSlot(index)))).is_err() {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
        });
        guard.store(false, Ordering::Relaxed);
    }
}

fn fatal(msg: &[u8]) -> ! {
    // SAFETY: write(2) of a static buffer, then abort.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}

/// A site and its detour, in the global registry.
struct SiteEntry {
    site: &'static Site,
    detour: &'static detour::RawDetour,
    enabled: bool,
}

struct Registry {
    sites: HashMap<u64, SiteEntry>,
    hooks: HashMap<HookId, (u64, ProbeKind)>,
    next_id: u64,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds the per-site thunk (`push [site]; jmp [stub]`) on its own never-modified page.
fn make_thunk(site: &'static Site, stub_addr: u64) -> Result<u64, AttachError> {
    let red_zone = site.mid_function;
    let mut code: Vec<u8> = Vec::with_capacity(48);
    if red_zone {
        code.extend_from_slice(&[0x48, 0x8d, 0x64, 0x24, 0x80]); // lea rsp, [rsp-128]
    }
    let push_at = code.len();
    code.extend_from_slice(&[0xff, 0x35, 0, 0, 0, 0]); // push qword [rip+d]
    let jmp_at = code.len();
    code.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp qword [rip+d]
    while !code.len().is_multiple_of(8) {
        code.push(0xcc);
    }
    let data = code.len();
    code.extend_from_slice(&(site as *const Site as u64).to_le_bytes());
    code.extend_from_slice(&stub_addr.to_le_bytes());
    let d1 = (data - (push_at + 6)) as i32;
    let d2 = (data + 8 - (jmp_at + 6)) as i32;
    code[push_at + 2..push_at + 6].copy_from_slice(&d1.to_le_bytes());
    code[jmp_at + 2..jmp_at + 6].copy_from_slice(&d2.to_le_bytes());

    // Thunks live for the rest of the process: a thread may be inside one whenever.
    let thunk = bpftime_abi::Mmap::executable(&code).map_err(|source| AttachError::Os {
        what: "mapping a hook thunk",
        source,
    })?;
    Ok(thunk.leak().as_ptr() as u64)
}

fn publish(list: &AtomicPtr<Handlers>, f: impl FnOnce(&mut Handlers)) {
    let old = list.load(Ordering::Acquire);
    let mut new: Handlers = if old.is_null() {
        Vec::new()
    } else {
        // SAFETY: published lists are never freed.
        unsafe { &*old }.clone()
    };
    f(&mut new);
    let p = if new.is_empty() {
        std::ptr::null_mut()
    } else {
        Box::into_raw(Box::new(new))
    };
    // The old list is leaked on purpose: another thread may be iterating it.
    list.store(p, Ordering::Release);
}

/// The hooks installed by one owner. Dropping it removes them.
#[derive(Default)]
pub struct HookSet {
    ids: Vec<HookId>,
}

impl HookSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a hook on a resolved target (see [`crate::symbols`]).
    pub fn install(
        &mut self,
        target: &ResolvedTarget,
        kind: ProbeKind,
        handler: Arc<dyn ProbeHandler>,
    ) -> Result<HookId, AttachError> {
        check_kind(target, kind)?;
        // SAFETY: a resolved target is the runtime address of a function symbol of `size` bytes
        // in a file mapped by this process.
        unsafe {
            self.install_at(
                target.address,
                target.size,
                target.offset != 0,
                &target.display_name(),
                kind,
                handler,
            )
        }
    }

    /// Installs many hooks, patching all their sites in one transaction (other threads are
    /// suspended once, not once per hook). Each request succeeds or fails on its own; if the
    /// common transaction fails, the sites are patched one by one instead.
    pub fn install_many(
        &mut self,
        requests: Vec<(ResolvedTarget, ProbeKind, Arc<dyn ProbeHandler>)>,
    ) -> Vec<Result<HookId, AttachError>> {
        let mut results = Vec::with_capacity(requests.len());
        let mut any_return = false;
        {
            let mut guard = registry();
            for (target, kind, handler) in requests {
                let r = check_kind(&target, kind).and_then(|()| {
                    // SAFETY: as in `install`.
                    unsafe {
                        install_locked(
                            &mut guard,
                            target.address,
                            target.size,
                            target.offset != 0,
                            false,
                            &target.display_name(),
                            kind,
                            handler,
                            false,
                        )
                    }
                    .map(|id| (id, target.address))
                });
                any_return |= r.is_ok() && kind == ProbeKind::Uretprobe;
                results.push(r);
            }
            let addrs: Vec<u64> = results.iter().flatten().map(|&(_, a)| a).collect();
            // No request got as far as the registry (none given, or every one refused): there
            // is nothing to patch, and the registry may not even exist yet.
            let reg = match guard.as_mut() {
                Some(reg) if !addrs.is_empty() => reg,
                _ => return results.into_iter().map(|r| r.map(|(id, _)| id)).collect(),
            };
            if enable_sites(reg, &addrs).is_err() {
                for r in results.iter_mut() {
                    if let Ok((id, addr)) = *r {
                        if let Err(e) = enable_sites(reg, &[addr]) {
                            unpublish(reg, id);
                            *r = Err(e);
                        }
                    }
                }
            }
        }
        if any_return {
            ensure_unwind_fixups();
        }
        results
            .into_iter()
            .map(|r| {
                r.map(|(id, _)| {
                    self.ids.push(id);
                    id
                })
            })
            .collect()
    }

    /// Installs a hook at a raw address.
    ///
    /// # Safety
    /// `address..address + size` must be mapped code of one function (from `address` to its end);
    /// `mid_function` must be true unless `address` is the function's entry.
    pub unsafe fn install_at(
        &mut self,
        address: u64,
        size: u64,
        mid_function: bool,
        name: &str,
        kind: ProbeKind,
        handler: Arc<dyn ProbeHandler>,
    ) -> Result<HookId, AttachError> {
        let id = {
            let mut guard = registry();
            // SAFETY: forwarded from the caller.
            unsafe {
                install_locked(
                    &mut guard,
                    address,
                    size,
                    mid_function,
                    false,
                    name,
                    kind,
                    handler,
                    true,
                )?
            }
        };
        if kind == ProbeKind::Uretprobe {
            ensure_unwind_fixups();
        }
        self.ids.push(id);
        Ok(id)
    }

    /// Removes one hook. The site is unpatched when its last hook goes; return hooks pending on
    /// some thread's stack still return correctly (without calling the handler).
    pub fn remove(&mut self, id: HookId) -> Result<(), AttachError> {
        let pos = self
            .ids
            .iter()
            .position(|i| *i == id)
            .ok_or(AttachError::NoSuchHook(id.0))?;
        self.ids.swap_remove(pos);
        remove_hooks(&[id])
    }

    /// Removes every hook of this set, unpatching their sites in one transaction.
    pub fn detach(&mut self) -> Result<(), AttachError> {
        remove_hooks(&std::mem::take(&mut self.ids))
    }

    pub fn ids(&self) -> &[HookId] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Drop for HookSet {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

fn remove_hooks(ids: &[HookId]) -> Result<(), AttachError> {
    let mut guard = registry();
    let Some(reg) = guard.as_mut() else {
        return ids
            .first()
            .map_or(Ok(()), |id| Err(AttachError::NoSuchHook(id.0)));
    };
    let mut missing = None;
    let mut to_disable = Vec::new();
    for &id in ids {
        if !reg.hooks.contains_key(&id) {
            missing.get_or_insert(AttachError::NoSuchHook(id.0));
            continue;
        }
        to_disable.extend(unpublish(reg, id));
    }
    switch_sites(reg, &to_disable, false)?;
    missing.map_or(Ok(()), Err)
}

/// Number of currently patched sites in this process.
pub fn active_sites() -> usize {
    registry()
        .as_ref()
        .map_or(0, |r| r.sites.values().filter(|s| s.enabled).count())
}

fn check_kind(target: &ResolvedTarget, kind: ProbeKind) -> Result<(), AttachError> {
    if kind == ProbeKind::Uretprobe && target.offset != 0 {
        return Err(AttachError::Unpatchable {
            function: target.display_name(),
            reason: "a uretprobe must be at the function entry (offset 0)".into(),
        });
    }
    Ok(())
}

/// Installs a hook with the registry locked; patches the site now if `enable`, else the caller
/// does (see [`switch_sites`]).
///
/// # Safety
/// As [`HookSet::install_at`].
#[allow(clippy::too_many_arguments)]
unsafe fn install_locked(
    guard: &mut MutexGuard<'static, Option<Registry>>,
    address: u64,
    size: u64,
    mid_function: bool,
    unwind_fixup: bool,
    name: &str,
    kind: ProbeKind,
    handler: Arc<dyn ProbeHandler>,
    enable: bool,
) -> Result<HookId, AttachError> {
    thread::register_process_handlers();
    let reg = guard.get_or_insert_with(|| Registry {
        sites: HashMap::new(),
        hooks: HashMap::new(),
        next_id: 1,
    });
    if let std::collections::hash_map::Entry::Vacant(slot) = reg.sites.entry(address) {
        // SAFETY: forwarded from the caller.
        unsafe { precheck::check_site(address, size, name)? };
        let site: &'static Site = Box::leak(Box::new(Site {
            addr: address,
            mid_function,
            unwind_fixup,
            name: name.to_string(),
            trampoline: AtomicU64::new(0),
            direct: AtomicPtr::new(std::ptr::null_mut()),
            enabled: AtomicBool::new(false),
            returns_only: AtomicBool::new(false),
            direct_return: AtomicPtr::new(std::ptr::null_mut()),
            entries: AtomicPtr::new(std::ptr::null_mut()),
            returns: AtomicPtr::new(std::ptr::null_mut()),
        }));
        let stub_addr = if mid_function {
            stub::entry_stub_red_zone()
        } else {
            stub::entry_stub()
        };
        let thunk = make_thunk(site, stub_addr)?;
        // detour checks executability through /proc/self/maps, which the kernel does not
        // produce atomically: a concurrent mmap elsewhere can hide a line. Retry that case.
        let mut attempt = 0;
        let det = loop {
            // SAFETY: the target was pre-checked to hold at least 5 bytes of whole
            // instructions of one function; the thunk is valid code that preserves all
            // registers.
            match unsafe { detour::RawDetour::new(address as *const (), thunk as *const ()) } {
                Err(detour::Error::NotExecutable) if attempt < 8 => attempt += 1,
                r => {
                    break r.map_err(|source| AttachError::Detour {
                        function: name.to_string(),
                        source,
                    })?
                }
            }
        };
        // SAFETY: the site is pre-checked and not yet patched; its trampoline is unreachable.
        unsafe { callfix::fix_trailing_call(address, size, det.trampoline() as u64) };
        site.trampoline
            .store(det.trampoline() as u64, Ordering::Release);
        slot.insert(SiteEntry {
            site,
            detour: Box::leak(Box::new(det)),
            enabled: false,
        });
    }
    let id = HookId(reg.next_id);
    reg.next_id += 1;
    let entry = reg.sites.get_mut(&address).expect("site just inserted");
    let list = match kind {
        ProbeKind::Uprobe => &entry.site.entries,
        ProbeKind::Uretprobe => &entry.site.returns,
    };
    publish(list, |l| l.push(HandlerEntry::new(id, handler)));
    refresh_direct(entry.site);
    reg.hooks.insert(id, (address, kind));
    if enable {
        if let Err(e) = enable_sites(reg, &[address]) {
            unpublish(reg, id);
            return Err(e);
        }
    }
    Ok(id)
}

/// Removes hook `id` from its site's handler list; returns the site's address if the site now
/// has no handler and is patched (to be disabled by the caller).
fn unpublish(reg: &mut Registry, id: HookId) -> Option<u64> {
    let (addr, kind) = reg.hooks.remove(&id)?;
    let entry = reg.sites.get_mut(&addr).expect("hook of a known site");
    let list = match kind {
        ProbeKind::Uprobe => &entry.site.entries,
        ProbeKind::Uretprobe => &entry.site.returns,
    };
    publish(list, |l| l.retain(|h| h.id != id));
    refresh_direct(entry.site);
    let empty = entry.site.entries.load(Ordering::Acquire).is_null()
        && entry.site.returns.load(Ordering::Acquire).is_null();
    (empty && entry.enabled).then_some(addr)
}

/// Patches (enable) or unpatches every listed site in one transaction: other threads are
/// suspended once for all of them. All or nothing.
fn switch_sites(reg: &mut Registry, addrs: &[u64], enable: bool) -> Result<(), AttachError> {
    let mut addrs: Vec<u64> = addrs
        .iter()
        .copied()
        .filter(|a| reg.sites.get(a).is_some_and(|e| e.enabled != enable))
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Ok(());
    }
    let mut tx = detour::Transaction::new();
    for a in &addrs {
        let e = &reg.sites[a];
        if enable {
            e.site.enabled.store(true, Ordering::Release);
            tx.enable(e.detour);
        } else {
            e.site.enabled.store(false, Ordering::Release);
            tx.disable(e.detour);
        }
    }
    // SAFETY: every target was pre-checked; all other threads are suspended and moved out of
    // the patched bytes while they are written; on error nothing stays applied.
    let r = unsafe { tx.commit(detour::Threads::All) };
    for a in &addrs {
        let e = reg.sites.get_mut(a).expect("listed site");
        match r {
            Ok(()) => e.enabled = enable,
            Err(_) => e.site.enabled.store(e.enabled, Ordering::Release),
        }
    }
    r.map_err(|source| AttachError::Detour {
        function: addrs
            .iter()
            .map(|a| reg.sites[a].site.name.clone())
            .collect::<Vec<_>>()
            .join(", "),
        source,
    })
}

fn enable_sites(reg: &mut Registry, addrs: &[u64]) -> Result<(), AttachError> {
    switch_sites(reg, addrs, true)
}

struct NoopHandler;
impl ProbeHandler for NoopHandler {}

/// With return hooks pending, a C++ exception (or Rust panic, or `pthread_exit`) unwinding
/// through a hooked frame would meet the return stub's address where the unwinder expects the
/// caller's, find no unwind info and abort. So the unwinder's entry points in `libgcc_s` are
/// hooked too (once per process, never removed); their hook puts the real return addresses back
/// on the throwing thread's stack first.
fn ensure_unwind_fixups() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.load(Ordering::Acquire) {
        return;
    }
    let Ok(mut res) = crate::symbols::Resolver::new(None) else {
        return;
    };
    if res.find_module(Some("libgcc_s.so.1")).is_err() {
        return; // not loaded (yet): retried at the next uretprobe install
    }
    DONE.store(true, Ordering::Release);
    for f in ["_Unwind_RaiseException", "_Unwind_ForcedUnwind"] {
        let t = match res.resolve(&format!("libgcc_s.so.1:{f}")) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("bpftime-attach: {e} (exceptions through uretprobe frames will abort)");
                continue;
            }
        };
        {
            let mut guard = registry();
            // SAFETY: a resolved function entry of a mapped library.
            let r = unsafe {
                install_locked(
                    &mut guard,
                    t.address,
                    t.size,
                    false,
                    true,
                    &t.display_name(),
                    ProbeKind::Uprobe,
                    Arc::new(NoopHandler),
                    true,
                )
            };
            if let Err(e) = r {
                eprintln!("bpftime-attach: cannot hook {f} (exceptions through uretprobe frames will abort): {e}");
            }
        }
    }
}
