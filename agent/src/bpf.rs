//! The BPF runtime behind the hooks: for every `uprobe`/`uretprobe` program an object published
//! (`bpftime-rs load`), a hook whose handler runs the program on the hooked call's `pt_regs`.
//!
//! Helpers carry per-run state (attach context, ringbuf reservations), so each thread gets its
//! own `RuntimeHelpers` per program, created on the thread's first call. The hook engine hands
//! handlers the calling thread's slot in its own per-thread table ([`ThreadSlot`]), and each
//! handler keeps one helpers pointer per slot: the hot path takes no lock, allocates nothing and
//! needs no thread-local storage (general-dynamic TLS in this cdylib costs a `__tls_get_addr`
//! call per access). Direct calls of `on_entry`/`on_return` (without a slot) use a thread-local
//! table instead.

use std::cell::{RefCell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bpftime_attach::hook::{ThreadSlot, MAX_THREADS};
use bpftime_attach::{EntryAction, ProbeHandler, ProbeKind, PtRegs};
use bpftime_runtime::helpers::RuntimeHelpers;
use bpftime_runtime::loaded::{PublishedObject, RunnableProgram};

/// One program on one hook.
pub struct BpfHandler {
    object: Arc<PublishedObject>,
    program: RunnableProgram,
    func_ip: u64,
    /// Index into each thread's helpers table.
    slot: usize,
    /// A faulting program is reported once, not on every call.
    reported: AtomicBool,
    /// Helpers by [`ThreadSlot`] index, created on the slot's first call. A slot passes to a
    /// later thread only after its previous thread exited, so the helpers move with it (they
    /// hold no thread identity; per-run state is reset by every run).
    per_slot: Box<[SlotHelpers]>,
}

/// One thread slot's helpers; only touched by the thread holding the slot, inside the hook
/// engine's re-entrancy guard.
struct SlotHelpers(UnsafeCell<Option<Box<RuntimeHelpers>>>);

// SAFETY: a slot's cell is only used by the one live thread that holds the slot, and never by
// two handler invocations at once (the engine runs handlers with the thread's guard set).
unsafe impl Sync for SlotHelpers {}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static HELPERS: RefCell<Vec<Option<RuntimeHelpers>>> = const { RefCell::new(Vec::new()) };
}

impl BpfHandler {
    pub fn new(object: Arc<PublishedObject>, program: RunnableProgram, func_ip: u64) -> Self {
        Self {
            object,
            program,
            func_ip,
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            reported: AtomicBool::new(false),
            per_slot: (0..MAX_THREADS)
                .map(|_| SlotHelpers(UnsafeCell::new(None)))
                .collect(),
        }
    }

    /// Runs the program on `regs` with the helpers of thread slot `slot`.
    #[inline(always)]
    fn run_in(&self, regs: &mut PtRegs, slot: ThreadSlot) -> Option<u64> {
        let Some(cell) = self.per_slot.get(slot.index()) else {
            return self.run(regs);
        };
        // SAFETY: see `SlotHelpers`: this thread holds the slot, and no other reference to the
        // cell's contents exists while a handler runs.
        let entry = unsafe { &mut *cell.0.get() };
        let helpers = match entry {
            Some(h) => h,
            None => self.first_helpers(entry)?,
        };
        self.run_with(helpers, regs)
    }

    #[cold]
    #[inline(never)]
    fn first_helpers<'a>(
        &self,
        entry: &'a mut Option<Box<RuntimeHelpers>>,
    ) -> Option<&'a mut Box<RuntimeHelpers>> {
        match self.object.helpers() {
            Ok(h) => Some(entry.insert(Box::new(h))),
            Err(e) => {
                self.report(&format!("cannot set up helpers: {e}"));
                None
            }
        }
    }

    /// Runs the program on `regs` with `helpers`; returns the override requested, if any.
    #[inline(always)]
    fn run_with(&self, helpers: &mut RuntimeHelpers, regs: &mut PtRegs) -> Option<u64> {
        helpers.attach_mut().func_ip = self.func_ip;
        // SAFETY: PtRegs is repr(C), exactly the kernel's 168-byte struct pt_regs, which is
        // the whole context a kprobe-type program may read (what the verifier allowed).
        let ctx = unsafe {
            std::slice::from_raw_parts_mut(
                (regs as *mut PtRegs).cast::<u8>(),
                std::mem::size_of::<PtRegs>(),
            )
        };
        match self.program.run(helpers, ctx) {
            Ok(_) => helpers.attach().override_return,
            Err(e) => {
                self.report(&e.to_string());
                None
            }
        }
    }

    /// Runs the program on `regs`; returns the override requested, if any.
    fn run(&self, regs: &mut PtRegs) -> Option<u64> {
        HELPERS.with(|table| {
            let mut table = table.borrow_mut();
            if table.len() <= self.slot {
                table.resize_with(self.slot + 1, || None);
            }
            if table[self.slot].is_none() {
                match self.object.helpers() {
                    Ok(h) => table[self.slot] = Some(h),
                    Err(e) => {
                        self.report(&format!("cannot set up helpers: {e}"));
                        return None;
                    }
                }
            }
            let helpers = table[self.slot].as_mut().expect("just set");
            self.run_with(helpers, regs)
        })
    }

    fn report(&self, what: &str) {
        if !self.reported.swap(true, Ordering::Relaxed) {
            eprintln!(
                "bpftime-agent: program {} ({}): {what}; the call continues unprobed",
                self.program.name, self.program.section
            );
        }
    }
}

impl ProbeHandler for BpfHandler {
    fn on_entry(&self, regs: &mut PtRegs) -> EntryAction {
        match self.run(regs) {
            Some(rc) => EntryAction::Override(rc),
            None => EntryAction::Continue,
        }
    }

    fn on_return(&self, regs: &mut PtRegs) {
        self.run(regs);
    }

    fn on_entry_in(&self, regs: &mut PtRegs, thread: ThreadSlot) -> EntryAction {
        match self.run_in(regs, thread) {
            Some(rc) => EntryAction::Override(rc),
            None => EntryAction::Continue,
        }
    }

    fn on_return_in(&self, regs: &mut PtRegs, thread: ThreadSlot) {
        self.run_in(regs, thread);
    }
}

/// The hook kind of a program's section, if it is a uprobe kind.
pub fn probe_kind(section: &str) -> Option<ProbeKind> {
    let kind = section.split('/').next()?;
    match kind {
        "uprobe" | "uprobe.s" => Some(ProbeKind::Uprobe),
        "uretprobe" | "uretprobe.s" => Some(ProbeKind::Uretprobe),
        _ => None,
    }
}

/// Splits `object NAME` lines (attach every uprobe program NAME published) from the rest of a
/// config file.
pub fn split_object_lines(text: &str) -> (Vec<String>, String) {
    let mut objects = Vec::new();
    let mut rest = String::new();
    for line in text.lines() {
        match line.trim().strip_prefix("object ") {
            Some(name) => objects.push(name.trim().to_string()),
            None => {
                rest.push_str(line);
                rest.push('\n');
            }
        }
    }
    (objects, rest)
}

/// Hooks every uprobe/uretprobe program of the published `object`; one status line per
/// program in `lines`. Returns how many could not be attached (the process runs on regardless).
pub fn attach_object(
    object: &str,
    resolver: &mut bpftime_attach::symbols::Resolver,
    hooks: &mut bpftime_attach::HookSet,
    lines: &mut Vec<String>,
) -> usize {
    let published = match PublishedObject::open(object) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            lines.push(format!("error object {object}: {e}"));
            return 1;
        }
    };
    let mut failed = 0;
    for program in &published.programs {
        let Some(kind) = probe_kind(&program.section) else {
            lines.push(format!(
                "skip {object}/{} ({}): not a uprobe program",
                program.name, program.section
            ));
            continue;
        };
        let target = program.attach_target.trim_start_matches(':');
        if target.is_empty() {
            failed += 1;
            lines.push(format!(
                "error {object}/{} ({}): the section names no PATH:FUNC to attach to",
                program.name, program.section
            ));
            continue;
        }
        let installed = resolver
            .resolve(target)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                let handler = BpfHandler::new(Arc::clone(&published), program.clone(), t.address);
                hooks
                    .install(&t, kind, Arc::new(handler))
                    .map(|_| t)
                    .map_err(|e| e.to_string())
            });
        match installed {
            Ok(t) => lines.push(format!(
                "ok {object}/{} {} {target} at {:#x} on {:?}",
                program.name,
                if kind == ProbeKind::Uprobe {
                    "uprobe"
                } else {
                    "uretprobe"
                },
                t.address,
                program.vm
            )),
            Err(e) => {
                failed += 1;
                eprintln!("bpftime-agent: {object}/{}: {e}", program.name);
                lines.push(format!(
                    "error {object}/{} ({}): {e}",
                    program.name, program.section
                ));
            }
        }
    }
    failed
}
