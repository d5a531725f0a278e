//! The global registry of hooked sites: installing (thunks, detours, handler lists),
//! switching between the fast path and the dispatchers, removing, and the unwinder fix-ups.

use super::*;

/// A site and how it is patched, in the global registry.
pub(super) struct SiteEntry {
    site: &'static Site,
    patch: Patch,
    enabled: bool,
    /// The bytes from `site.addr` the patch takes over: the displaced instructions of a detour
    /// (executed from its trampoline, never from here), 1 for an `int3`.
    span: u64,
}

/// How a site's code is patched.
#[derive(Clone, Copy)]
enum Patch {
    /// A 5-byte `jmp` to the site's thunk (detour's trampoline holds the displaced code).
    Detour(&'static detour::RawDetour),
    /// An `int3` on the first byte (see [`super::trap`]); `original` is the byte it replaces.
    Trap { original: u8 },
}

pub(super) struct Registry {
    sites: HashMap<u64, SiteEntry>,
    hooks: HashMap<HookId, (u64, ProbeKind)>,
    next_id: u64,
    /// Addresses that are or may become sites ([`reserve_sites`]): no detour displaces them.
    reserved: std::collections::BTreeSet<u64>,
}

impl Registry {
    /// The site whose patch takes over `address` without starting there, if any.
    fn covering(&self, address: u64) -> Option<&SiteEntry> {
        self.sites
            .values()
            .find(|e| e.site.addr < address && address < e.site.addr + e.span)
    }

    /// Whether a site, or a reserved address, lies in `from..to`.
    fn crowded(&self, from: u64, to: u64) -> bool {
        self.reserved.range(from..to).next().is_some()
            || self.sites.keys().any(|&a| (from..to).contains(&a))
    }

    fn empty() -> Self {
        Registry {
            sites: HashMap::new(),
            hooks: HashMap::new(),
            next_id: 1,
            reserved: Default::default(),
        }
    }
}

/// Marks `addresses` as probe sites that may be hooked later (a file's USDT sites, often
/// consecutive 1-byte `nop`s): a detour elsewhere does not displace their bytes (it would run
/// them from its trampoline, where no later hook sees them); the site takes an `int3` instead.
pub fn reserve_sites(addresses: impl IntoIterator<Item = u64>) {
    let mut guard = registry();
    let reg = guard.get_or_insert_with(Registry::empty);
    reg.reserved.extend(addresses);
}

pub(super) static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

pub(super) fn registry() -> MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The detour trampoline of the site hooked at `address`, if there is one.
pub(super) fn trampoline_of(address: u64) -> Option<u64> {
    let reg = registry();
    let site = reg.as_ref()?.sites.get(&address)?.site;
    Some(site.trampoline.load(Ordering::Acquire))
}

/// Builds the per-site thunk (`push [site]; jmp [stub]`) on its own never-modified page.
pub(super) fn make_thunk(site: &'static Site, stub_addr: u64) -> Result<u64, AttachError> {
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

pub(super) fn publish(list: &AtomicPtr<Handlers>, f: impl FnOnce(&mut Handlers)) {
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
    /// An empty set; nothing is patched until [`HookSet::install`].
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
        ensure_sigaction_guard();
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
        ensure_sigaction_guard();
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

    /// The hooks this set still owns, in install order except after a [`HookSet::remove`]
    /// (which moves the last one into the gap).
    pub fn ids(&self) -> &[HookId] {
        &self.ids
    }

    /// How many hooks this set owns (not sites: several hooks may share one).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether this set owns no hook.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Drop for HookSet {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

pub(super) fn remove_hooks(ids: &[HookId]) -> Result<(), AttachError> {
    let mut guard = registry();
    let Some(reg) = guard.as_mut() else {
        return ids
            .first()
            .map_or(Ok(()), |id| Err(AttachError::NoSuchHook(id.0)));
    };
    let mut missing = None;
    for &id in ids {
        if !reg.hooks.contains_key(&id) {
            missing.get_or_insert(AttachError::NoSuchHook(id.0));
        }
    }
    // Sites left without any hook are unpatched first, in one transaction, and only then
    // lose their handlers: a call entering while the lists change one by one would run the
    // return hooks but not the entry hooks already gone (or the reverse), which the engine
    // would count as a return without its entry.
    let emptied: Vec<u64> = {
        let mut sites: Vec<u64> = ids
            .iter()
            .filter_map(|id| reg.hooks.get(id))
            .map(|h| h.0)
            .collect();
        sites.sort_unstable();
        sites.dedup();
        sites.retain(|addr| {
            reg.hooks
                .iter()
                .filter(|(_, h)| h.0 == *addr)
                .all(|(id, _)| ids.contains(id))
        });
        sites
    };
    switch_sites(reg, &emptied, false)?;
    // Where other hooks stay, return hooks go before entry hooks: a call crossing meanwhile
    // runs its entry without a return (as one still in flight would), never the reverse.
    let mut order: Vec<HookId> = ids
        .iter()
        .copied()
        .filter(|id| reg.hooks.contains_key(id))
        .collect();
    order.sort_by_key(|id| reg.hooks[id].1 == ProbeKind::Uprobe);
    for id in order {
        // A site this leaves without hooks was among `emptied`, unpatched already.
        let _ = unpublish(reg, id);
    }
    missing.map_or(Ok(()), Err)
}

/// Number of currently patched sites in this process.
pub fn active_sites() -> usize {
    registry()
        .as_ref()
        .map_or(0, |r| r.sites.values().filter(|s| s.enabled).count())
}

/// How the site at `address` is patched: `"detour"` (a 5-byte jump) or `"int3"` (a trap
/// and an out-of-line copy of the instruction, where a jump does not fit); `None` if no
/// hook was ever installed there.
pub fn site_mechanism(address: u64) -> Option<&'static str> {
    let reg = registry();
    let e = reg.as_ref()?.sites.get(&address)?;
    Some(match e.patch {
        Patch::Detour(_) => "detour",
        Patch::Trap { .. } => "int3",
    })
}

pub(super) fn check_kind(target: &ResolvedTarget, kind: ProbeKind) -> Result<(), AttachError> {
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
pub(super) unsafe fn install_locked(
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
    let reg = guard.get_or_insert_with(Registry::empty);
    if !reg.sites.contains_key(&address) {
        if let Some(cover) = reg.covering(address) {
            return Err(AttachError::Unpatchable {
                function: name.to_string(),
                reason: format!(
                    "its instruction is displaced by the {}-byte detour of the site hooked at \
                     {:#x} ({}), which runs it from a trampoline",
                    cover.span, cover.site.addr, cover.site.name
                ),
            });
        }
        // SAFETY: forwarded from the caller.
        let displaced = match unsafe { precheck::check_site(address, size, name) } {
            Ok(n) => Some(n),
            // An unknown size stays refused: nothing says where the function's code ends.
            Err(e) if size == 0 => return Err(e),
            // Too short, leaving or branched into before byte 5: the int3 fallback.
            Err(AttachError::TooShort { .. } | AttachError::Unpatchable { .. }) => None,
            Err(e) => return Err(e),
        };
        // Another site (hooked or reserved) among the displaced bytes: the int3 fallback too.
        let displaced = displaced.filter(|&n| !reg.crowded(address + 1, address + n));
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
        match displaced {
            None => {
                // SAFETY: forwarded from the caller: `size` bytes of the function are readable.
                let first = unsafe { trap::first_instruction(address, size, name)? };
                if first.len() as u64 > size {
                    return Err(AttachError::Unpatchable {
                        function: name.to_string(),
                        reason: "its first instruction extends past the function's end".into(),
                    });
                }
                let xol = trap::build_xol(&first, name)?;
                site.trampoline.store(xol, Ordering::Release);
                trap::install_handler()?;
                trap::register(site)?;
                // SAFETY: as above.
                let original = unsafe { (address as *const u8).read_volatile() };
                reg.sites.insert(
                    address,
                    SiteEntry {
                        site,
                        patch: Patch::Trap { original },
                        enabled: false,
                        span: 1,
                    },
                );
            }
            Some(span) => {
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
                    match unsafe {
                        detour::RawDetour::new(address as *const (), thunk as *const ())
                    } {
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
                reg.sites.insert(
                    address,
                    SiteEntry {
                        site,
                        patch: Patch::Detour(Box::leak(Box::new(det))),
                        enabled: false,
                        span,
                    },
                );
            }
        }
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
pub(super) fn unpublish(reg: &mut Registry, id: HookId) -> Option<u64> {
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
pub(super) fn switch_sites(
    reg: &mut Registry,
    addrs: &[u64],
    enable: bool,
) -> Result<(), AttachError> {
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
    // Trap sites one by one (a byte each, no thread suspended), then the detours in one
    // transaction.
    let (traps, detours): (Vec<u64>, Vec<u64>) = addrs
        .iter()
        .partition(|a| matches!(reg.sites[a].patch, Patch::Trap { .. }));
    for a in &traps {
        let e = reg.sites.get_mut(a).expect("listed site");
        let Patch::Trap { original } = e.patch else {
            unreachable!("partitioned")
        };
        // Enabled before the int3 goes in; after it is gone when disabling (a thread that
        // trapped meanwhile finds the site either way and continues through its XOL slot).
        if enable {
            e.site.enabled.store(true, Ordering::Release);
        }
        let r = trap::poke(*a, if enable { 0xcc } else { original });
        if !enable || r.is_err() {
            e.site.enabled.store(false, Ordering::Release);
        }
        r?;
        e.enabled = enable;
    }
    let addrs = detours;
    if addrs.is_empty() {
        return Ok(());
    }
    let mut tx = detour::Transaction::new();
    for a in &addrs {
        let e = &reg.sites[a];
        let Patch::Detour(d) = e.patch else {
            unreachable!("partitioned")
        };
        if enable {
            e.site.enabled.store(true, Ordering::Release);
            tx.enable(d);
        } else {
            e.site.enabled.store(false, Ordering::Release);
            tx.disable(d);
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

pub(super) fn enable_sites(reg: &mut Registry, addrs: &[u64]) -> Result<(), AttachError> {
    switch_sites(reg, addrs, true)
}

/// Once an int3 site exists, libc's `sigaction` is hooked (once per process, never removed)
/// so that the process cannot replace the SIGTRAP handler those sites need (see `trap.rs`).
pub(super) fn ensure_sigaction_guard() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !trap::handler_installed() || DONE.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(mut res) = crate::symbols::Resolver::new(None) else {
        return;
    };
    const WITHOUT: &str = "a SIGTRAP handler the process installs would take int3 sites' traps";
    match res
        .find_module(Some("libc.so.6"))
        .and_then(|_| res.resolve("libc.so.6:sigaction"))
    {
        Ok(t) => engine_hook(&t, false, Arc::new(trap::SigactionGuard), WITHOUT),
        Err(e) => eprintln!("bpftime-attach: {e} ({WITHOUT})"),
    }
}

/// Hooks a library function for the engine's own needs (once per process, never removed);
/// a failure is reported with what goes `without` it.
fn engine_hook(
    t: &crate::symbols::ResolvedTarget,
    unwind_fixup: bool,
    handler: Arc<dyn ProbeHandler>,
    without: &str,
) {
    let mut guard = registry();
    // SAFETY: a resolved function entry of a mapped library.
    let r = unsafe {
        install_locked(
            &mut guard,
            t.address,
            t.size,
            false,
            unwind_fixup,
            &t.display_name(),
            ProbeKind::Uprobe,
            handler,
            true,
        )
    };
    if let Err(e) = r {
        eprintln!("bpftime-attach: cannot hook {} ({without}): {e}", t.symbol);
    }
}

pub(super) struct NoopHandler;
impl ProbeHandler for NoopHandler {}

/// With return hooks pending, a C++ exception (or Rust panic, or `pthread_exit`) unwinding
/// through a hooked frame would meet the return stub's address where the unwinder expects the
/// caller's, find no unwind info and abort. So the unwinder's entry points in `libgcc_s` are
/// hooked too (once per process, never removed); their hook puts the real return addresses back
/// on the throwing thread's stack first.
pub(super) fn ensure_unwind_fixups() {
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
    const WITHOUT: &str = "exceptions through uretprobe frames will abort";
    for f in ["_Unwind_RaiseException", "_Unwind_ForcedUnwind"] {
        match res.resolve(&format!("libgcc_s.so.1:{f}")) {
            Ok(t) => engine_hook(&t, true, Arc::new(NoopHandler), WITHOUT),
            Err(e) => eprintln!("bpftime-attach: {e} ({WITHOUT})"),
        }
    }
}
