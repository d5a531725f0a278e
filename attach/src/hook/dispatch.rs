//! The dispatchers the stubs call: entry and return handling through the per-thread shadow
//! stack, the handler lists they walk, and the direct-entry fast path's bookkeeping.

use super::*;

/// One registered handler. `ptr` is `handler`'s object, computed once at registration: the
/// dispatchers call through it without re-deriving the data address from the `Arc` (a load of
/// the vtable's alignment and arithmetic on every call).
#[derive(Clone)]
pub(super) struct HandlerEntry {
    pub(super) id: HookId,
    pub(super) ptr: *const dyn ProbeHandler,
    /// Keeps `ptr` valid.
    pub(super) _handler: Arc<dyn ProbeHandler>,
}

// SAFETY: `ptr` points into `_handler`, a `Send + Sync` object the entry keeps alive.
unsafe impl Send for HandlerEntry {}
// SAFETY: as above.
unsafe impl Sync for HandlerEntry {}

impl HandlerEntry {
    pub(super) fn new(id: HookId, handler: Arc<dyn ProbeHandler>) -> Self {
        Self {
            id,
            ptr: Arc::as_ptr(&handler),
            _handler: handler,
        }
    }
}

pub(super) type Handlers = Vec<HandlerEntry>;

/// A hooked address. Leaked: referenced by thunks and pending shadow frames forever.
/// `repr(C)`: the entry stub reads the first four fields (offsets checked below).
#[repr(C)]
pub(crate) struct Site {
    pub(super) addr: u64,
    /// Where "continue" goes: the detour trampoline, or an `int3` site's out-of-line copy of
    /// its first instruction (see `trap.rs`).
    pub(super) trampoline: AtomicU64,
    /// The only entry handler's [`DirectEntry`] when the stub may call it itself (see
    /// [`refresh_direct`]); null otherwise. Leaked like the handler lists.
    pub(super) direct: AtomicPtr<DirectEntry>,
    pub(super) enabled: AtomicBool,
    /// Only return handlers (at a function entry): the entry stub pushes the shadow frame
    /// itself, with no call at all.
    pub(super) returns_only: AtomicBool,
    /// The only return handler's [`ProbeHandler::direct_return`], or null.
    pub(super) direct_return: AtomicPtr<DirectEntry>,
    /// Hooked inside a function (no override, no return hooks).
    pub(super) mid_function: bool,
    /// An unwinder entry point (`_Unwind_RaiseException`, ...): put back every replaced return
    /// address of this thread first, so the unwinder walks real frames.
    pub(super) unwind_fixup: bool,
    pub(super) name: String,
    /// Null = empty. Replaced copy-on-write, old lists leaked (readers never see freed memory).
    pub(super) entries: AtomicPtr<Handlers>,
    pub(super) returns: AtomicPtr<Handlers>,
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
pub(super) fn refresh_direct(site: &Site) {
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
pub(super) fn for_each(list: &AtomicPtr<Handlers>, mut f: impl FnMut(&dyn ProbeHandler)) {
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
pub(super) unsafe extern "C" fn dispatch_entry(site: *const Site, regs: *mut PtRegs) -> u64 {
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
pub(super) extern "C" fn stub_thread_slot() -> isize {
    match thread::current_indexed() {
        Some((index, _)) => index as isize,
        None => {
            NO_SLOT.fetch_add(1, Ordering::Relaxed);
            -1
        }
    }
}

#[inline]
pub(super) fn push_frame(ts: &mut thread::ThreadState, site: &Site, slot: u64) {
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
pub(super) fn restore_all_frames(ts: &mut thread::ThreadState) {
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
pub(super) unsafe extern "C" fn dispatch_return(regs: *mut PtRegs) -> u64 {
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
pub(super) unsafe extern "C" fn stub_run_returns(
    site: *const Site,
    regs: *mut PtRegs,
    index: usize,
) {
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

pub(super) fn fatal(msg: &[u8]) -> ! {
    // SAFETY: write(2) of a static buffer, then abort.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}
