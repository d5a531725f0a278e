//! The BPF runtime behind the hooks: for every `uprobe`/`uretprobe` program an object published
//! (`bpftime-rs load`), a hook whose handler runs the program on the hooked call's `pt_regs`.
//!
//! Helpers carry per-run state (attach context, ringbuf reservations), so each thread gets its
//! own `RuntimeHelpers` per program, created on the thread's first call. The hook engine hands
//! handlers the calling thread's slot in its own per-thread table ([`ThreadSlot`]), and each
//! handler keeps one [`ProgramRunner`] per slot (the helpers, and on our JIT a run environment
//! set up once): the hot path takes no lock, allocates nothing and needs no thread-local storage
//! (general-dynamic TLS in this cdylib costs a `__tls_get_addr` call per access). Entry hooks
//! reach the handler through the engine's direct entry ([`DirectEntry`]), without the generic
//! dispatcher. Direct calls of `on_entry`/`on_return` (without a slot) use a thread-local
//! table instead.

use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bpftime_attach::hook::{ThreadSlot, MAX_THREADS};
use bpftime_attach::usdt;
use bpftime_attach::{DirectEntry, EntryAction, ProbeHandler, ProbeKind, PtRegs};
use bpftime_runtime::helpers::{needs_no_run_reset, RuntimeHelpers};
use bpftime_runtime::loaded::{ProgramRunner, PublishedObject, RunnableProgram};
use bpftime_runtime::object::{parse_section, AttachTarget, SectionInfo};
use bpftime_runtime::vm::jit::{JitHook, JitHookSlowFn};
use bpftime_runtime::vm::{VmError, VmKind};

/// One program on one hook.
pub struct BpfHandler {
    object: Arc<PublishedObject>,
    program: RunnableProgram,
    func_ip: u64,
    /// What `bpf_get_attach_cookie` returns (the link's cookie; 0 for section attachments).
    cookie: u64,
    /// See [`bpftime_runtime::helpers::AttachContext::frame_at_entry`].
    frame_at_entry: bool,
    /// Index into each thread's helpers table.
    slot: usize,
    /// A faulting program is reported once, not on every call.
    reported: AtomicBool,
    /// Helpers by [`ThreadSlot`] index, created on the slot's first call. A slot passes to a
    /// later thread only after its previous thread exited, so the helpers move with it (they
    /// hold no thread identity; per-run state is reset by every run).
    per_slot: Box<[SlotHelpers]>,
    /// The JIT's machine-code entry ([`JitHook`]) for a program that needs no per-run reset of
    /// its helpers, made on first use (it points back at this handler); `None` when the program
    /// needs the Rust path (not on our JIT, or its helpers keep per-run state).
    jit_hook: OnceLock<Option<Box<JitHook>>>,
}

/// One thread slot's runner (helpers and JIT session); only touched by the thread holding the
/// slot, inside the hook engine's re-entrancy guard.
struct SlotHelpers(UnsafeCell<Option<Box<ProgramRunner>>>);

// SAFETY: a slot's cell is only used by the one live thread that holds the slot, and never by
// two handler invocations at once (the engine runs handlers with the thread's guard set).
unsafe impl Sync for SlotHelpers {}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// What `bpf_get_current_pid_tgid` keeps per thread slot, shared by every program's helpers on
/// the slot (so one `vfork` mark reaches them all).
pub static TASK_IDENTITIES: [bpftime_runtime::helpers::TaskIdentity; MAX_THREADS] =
    [const { bpftime_runtime::helpers::TaskIdentity::new() }; MAX_THREADS];

thread_local! {
    static HELPERS: RefCell<Vec<Option<RuntimeHelpers>>> = const { RefCell::new(Vec::new()) };
}

impl BpfHandler {
    /// A handler, in its `Arc` from the start: its JIT hook entry (made on first use) points
    /// back at it, so it never lives anywhere else.
    pub fn new(
        object: Arc<PublishedObject>,
        program: RunnableProgram,
        func_ip: u64,
        cookie: u64,
        frame_at_entry: bool,
    ) -> Arc<Self> {
        // Compiled at attach time rather than on the first hooked call (a compile error
        // surfaces on the first run).
        if program.vm == VmKind::Jit {
            let _ = program.program.jit();
        }
        Arc::new(Self {
            object,
            program,
            func_ip,
            cookie,
            frame_at_entry,
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            reported: AtomicBool::new(false),
            per_slot: (0..MAX_THREADS)
                .map(|_| SlotHelpers(UnsafeCell::new(None)))
                .collect(),
            jit_hook: OnceLock::new(),
        })
    }

    /// The JIT hook entry of this handler's program, if it has one (see `jit_hook`).
    fn jit_hook(&self) -> Option<&JitHook> {
        self.jit_hook
            .get_or_init(|| {
                let jit = (self.program.vm == VmKind::Jit)
                    .then(|| self.program.program.jit().ok())
                    .flatten()?;
                // SAFETY: the image lives in `self.program` and the callbacks' data is `self`:
                // both live as long as the hook, which `self` owns; the engine calls the entry
                // only while it keeps this handler alive.
                unsafe {
                    JitHook::new(
                        jit,
                        MAX_THREADS,
                        std::mem::size_of::<PtRegs>() as u64,
                        jit_hook_slow,
                        jit_hook_after,
                        self as *const Self as *const (),
                        needs_no_run_reset(&self.program.program),
                    )
                }
            })
            .as_deref()
    }

    /// Runs the program on `regs` with the runner of thread slot `slot`.
    #[inline(always)]
    fn run_in(&self, regs: &mut PtRegs, slot: ThreadSlot) -> Option<u64> {
        self.run_slot(regs, slot.index())
    }

    /// [`run_in`](Self::run_in) by slot index (as the JIT hook entry passes it).
    #[inline(always)]
    fn run_slot(&self, regs: &mut PtRegs, index: usize) -> Option<u64> {
        let Some(cell) = self.per_slot.get(index) else {
            return self.run(regs);
        };
        // SAFETY: see `SlotHelpers`: this thread holds the slot, and no other reference to the
        // cell's contents exists while a handler runs.
        let entry = unsafe { &mut *cell.0.get() };
        let runner = match entry {
            Some(r) => r,
            None => self.first_runner(entry, index)?,
        };
        let result = runner.run(regs.as_bytes_mut());
        self.outcome(result, runner.helpers())
    }

    #[cold]
    #[inline(never)]
    fn first_runner<'a>(
        &self,
        entry: &'a mut Option<Box<ProgramRunner>>,
        index: usize,
    ) -> Option<&'a mut Box<ProgramRunner>> {
        match self.object.helpers_for(&self.program) {
            Ok(mut h) => {
                h.attach_mut().func_ip = self.func_ip;
                h.attach_mut().cookie = self.cookie;
                h.attach_mut().frame_at_entry = self.frame_at_entry;
                let watched = crate::CLONES_WATCHED.load(Ordering::Relaxed);
                if let Some(generation) =
                    bpftime_attach::hook::slot_identity_generation(index).filter(|_| watched)
                {
                    h.set_task_identity(&TASK_IDENTITIES[index], generation);
                }
                let runner = entry.insert(Box::new(ProgramRunner::new(&self.program, h)));
                if let Some(hook) = self.jit_hook() {
                    // SAFETY: the runner is boxed in this slot's cell for the handler's whole
                    // life (never replaced), and only the thread holding the slot uses it.
                    unsafe { runner.register_hook_slot(hook, index) };
                }
                Some(runner)
            }
            Err(e) => {
                self.report(&format!("cannot set up helpers: {e}"));
                None
            }
        }
    }

    /// The override a finished run requested, if any; a failed run is reported (once).
    #[inline(always)]
    fn outcome(&self, result: Result<u64, VmError>, helpers: &RuntimeHelpers) -> Option<u64> {
        match result {
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
                match self.object.helpers_for(&self.program) {
                    Ok(h) => table[self.slot] = Some(h),
                    Err(e) => {
                        self.report(&format!("cannot set up helpers: {e}"));
                        return None;
                    }
                }
            }
            let helpers = table[self.slot].as_mut().expect("just set");
            helpers.attach_mut().func_ip = self.func_ip;
            helpers.attach_mut().cookie = self.cookie;
            helpers.attach_mut().frame_at_entry = self.frame_at_entry;
            let result = self.program.run(helpers, regs.as_bytes_mut());
            self.outcome(result, helpers)
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

/// The hook engine's direct entry for a [`BpfHandler`] (see [`DirectEntry`]).
unsafe extern "C" fn direct_entry(data: *const (), regs: *mut PtRegs, thread: ThreadSlot) -> u64 {
    // SAFETY: `data` is the handler that returned this entry (kept alive by the engine), `regs`
    // the stub's frame, ours alone for the call.
    let (handler, regs) = unsafe { (&*(data as *const BpfHandler), &mut *regs) };
    // A panic must not unwind into the stub: the call then goes on unprobed.
    let run = catch_unwind(AssertUnwindSafe(|| handler.run_in(regs, thread)));
    handler.direct_outcome(run, regs)
}

/// [`JitHook`]'s `slow` callback: the slot's first run (no session registered yet), made
/// through the Rust path, which sets the slot up. xmm0-7 are saved by the caller.
unsafe extern "C" fn jit_hook_slow(data: *const (), ctx: *mut u8, slot: usize) -> u64 {
    // SAFETY: the hook's data is its handler (see `BpfHandler::jit_hook`) and `ctx` the stub's
    // `PtRegs` frame, forwarded by the entry.
    let (handler, regs) = unsafe { (&*(data as *const BpfHandler), &mut *(ctx as *mut PtRegs)) };
    let run = catch_unwind(AssertUnwindSafe(|| handler.run_slot(regs, slot)));
    handler.direct_outcome(run, regs)
}

/// [`JitHook`]'s `after` callback: a run of the slot's session that did not simply return.
unsafe extern "C" fn jit_hook_after(data: *const (), slot: usize, r0: u64) -> u64 {
    // SAFETY: as in `jit_hook_slow`.
    let handler = unsafe { &*(data as *const BpfHandler) };
    let run = catch_unwind(AssertUnwindSafe(|| {
        let cell = handler.per_slot.get(slot)?;
        // SAFETY: see `SlotHelpers`; the entry only runs slots whose runner is registered.
        let runner = unsafe { &mut *cell.0.get() }.as_mut()?;
        // SAFETY: called right after the entry's run of this session, on the slot's thread.
        let result = unsafe { runner.finish_hook_run(r0) };
        handler.outcome(result, runner.helpers())
    }));
    match run {
        Ok(_) => 0,
        Err(_) => {
            handler.report("panicked");
            0
        }
    }
}

impl BpfHandler {
    /// What a direct entry returns for the outcome of a run (see [`DirectEntry`]).
    fn direct_outcome(&self, run: std::thread::Result<Option<u64>>, regs: &mut PtRegs) -> u64 {
        match run {
            Ok(Some(rc)) => {
                regs.rax = rc;
                1
            }
            Ok(None) => 0,
            Err(_) => {
                self.report("panicked");
                0
            }
        }
    }
}

/// The hook engine's direct return entry for a [`BpfHandler`] (uretprobe): as
/// [`direct_entry`], but an override the program asks for does not apply to a return.
unsafe extern "C" fn direct_return_entry(
    data: *const (),
    regs: *mut PtRegs,
    thread: ThreadSlot,
) -> u64 {
    // SAFETY: as in `direct_entry`.
    let (handler, regs) = unsafe { (&*(data as *const BpfHandler), &mut *regs) };
    if catch_unwind(AssertUnwindSafe(|| handler.run_in(regs, thread))).is_err() {
        handler.report("panicked");
    }
    0
}

impl BpfHandler {
    /// The JIT hook's entry as a [`DirectEntry`] (a leaf program on our JIT), if any.
    fn jit_direct_entry(&self) -> Option<DirectEntry> {
        let hook = self.jit_hook()?;
        // SAFETY: the entry's signature is the engine's with `ThreadSlot` (a transparent
        // usize) as `usize` and the `PtRegs` pointer as the context pointer.
        let func = unsafe {
            std::mem::transmute::<
                JitHookSlowFn,
                unsafe extern "C" fn(*const (), *mut PtRegs, ThreadSlot) -> u64,
            >(JitHook::entry())
        };
        Some(DirectEntry {
            func,
            data: hook as *const JitHook as *const (),
            preserves_vector_regs: hook.preserves_vector_regs(),
        })
    }
}

impl ProbeHandler for BpfHandler {
    fn direct_return(&self) -> Option<DirectEntry> {
        // A program on the JIT's entry cannot ask for an override (it needs no run reset): the
        // entry serves returns as is.
        self.jit_direct_entry().or(Some(DirectEntry {
            func: direct_return_entry,
            data: self as *const Self as *const (),
            preserves_vector_regs: false,
        }))
    }

    fn direct_entry(&self) -> Option<DirectEntry> {
        self.jit_direct_entry().or(Some(DirectEntry {
            func: direct_entry,
            data: self as *const Self as *const (),
            preserves_vector_regs: false,
        }))
    }

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

/// The BPF part of a config file: `object NAME` lines (attach every uprobe program NAME
/// published) and a `discover` line (also attach objects loaded later, while this process
/// runs), split from the rest.
pub struct ObjectLines {
    /// The objects named.
    pub objects: Vec<String>,
    /// Objects loaded later are picked up too.
    pub discover: bool,
}

/// Splits the [`ObjectLines`] from the rest of a config file.
pub fn split_object_lines(text: &str) -> (ObjectLines, String) {
    let mut lines = ObjectLines {
        objects: Vec::new(),
        discover: false,
    };
    let mut rest = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("object ") {
            lines.objects.push(name.trim().to_string());
        } else if trimmed == "discover" {
            lines.discover = true;
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    (lines, rest)
}

/// Objects loaded since `known` was filled, as discovery finds them: trusted manifests (root's
/// or this user's state directory) whose loader runs; `run` objects are private.
pub fn new_objects(known: &[String]) -> Vec<String> {
    let (found, _skipped) = bpftime_runtime::state::discover_except(known);
    found
        .into_iter()
        .filter(|f| f.manifest.attachable())
        .map(|f| f.manifest.object)
        .collect()
}

/// One hook to install: a program of the object, where and how.
struct Attachment {
    program: usize,
    kind: ProbeKind,
    target: String,
    cookie: u64,
    /// The file offset of a reference counter (a USDT semaphore) in the target's file, counted
    /// up while the hook is in (the kernel's `ref_ctr_offset`).
    semaphore: Option<u64>,
    /// Set for a USDT site the agent arms from a section (the cookie is then its spec id).
    usdt: Option<UsdtSite>,
}

/// What arming one USDT site from its program's section needs besides its hook.
struct UsdtSite {
    /// `PROVIDER:NAME`, for status lines.
    probe: String,
    /// The site's arguments, for its `__bpf_usdt_specs` value (or why they cannot be read).
    args: Result<Vec<usdt::UsdtArg>, String>,
}

/// A USDT semaphore the agent counted up, taken off again on detach.
pub struct RaisedSemaphore {
    semaphore: usdt::Semaphore,
    /// The module and file offset it was found at: on detach it is lowered only where the
    /// module is still mapped (a library unloaded since took its mapping with it).
    module: String,
    file_offset: u64,
}

/// Lowers every semaphore in `raised` whose module is still mapped where it was.
pub fn lower_semaphores(raised: Vec<RaisedSemaphore>) {
    if raised.is_empty() {
        return;
    }
    let Ok(now) = bpftime_attach::symbols::Resolver::new(None) else {
        eprintln!(
            "bpftime-agent: cannot read this process's mappings: USDT semaphores stay raised"
        );
        return;
    };
    for r in raised {
        if now.writable_address(&r.module, r.file_offset) == Some(r.semaphore.address()) {
            // SAFETY: the writable mapping of the module holding the semaphore is still there.
            unsafe { r.semaphore.lower() };
        }
    }
}

/// Where `published`'s programs attach in this process: the links its loader made (`load --
/// APP`; a link for another pid is not for us), or else each uprobe program's section, and
/// each site of each USDT program's probe. Programs that cannot attach get a status line and
/// count in `failed`.
fn attachments(
    published: &PublishedObject,
    lines: &mut Vec<String>,
    failed: &mut usize,
) -> Vec<Attachment> {
    let object = published.shm.object_name();
    if let Some(links) = &published.manifest.links {
        let pid = std::process::id();
        return links
            .iter()
            .filter(|l| l.pid.is_none_or(|p| p == pid))
            .map(|l| Attachment {
                program: l.program as usize,
                kind: if l.retprobe {
                    ProbeKind::Uretprobe
                } else {
                    ProbeKind::Uprobe
                },
                target: l.target.clone(),
                cookie: l.cookie,
                semaphore: l.ref_ctr_offset,
                usdt: None,
            })
            .collect();
    }
    let mut out = Vec::new();
    let sections: Vec<SectionInfo> = published
        .programs
        .iter()
        .map(|p| parse_section(&p.section))
        .collect();
    let mut probes = Vec::new();
    for (index, program) in published.programs.iter().enumerate() {
        if let AttachTarget::Usdt {
            path,
            provider,
            name,
        } = &sections[index].attach
        {
            probes.push(usdt::UsdtProbe {
                program: index,
                path,
                provider,
                name,
            });
            continue;
        }
        let Some(kind) = probe_kind(&program.section) else {
            lines.push(format!(
                "skip {object}/{} ({}): not a uprobe or USDT program",
                program.name, program.section
            ));
            continue;
        };
        let target = program.attach_target.trim_start_matches(':');
        if target.is_empty() {
            *failed += 1;
            lines.push(format!(
                "error {object}/{} ({}): the section names no PATH:FUNC to attach to",
                program.name, program.section
            ));
            continue;
        }
        out.push(Attachment {
            program: index,
            kind,
            target: target.to_string(),
            cookie: 0,
            semaphore: None,
            usdt: None,
        });
    }
    for (probe, planned) in probes.iter().zip(usdt::plan(&probes)) {
        let program = &published.programs[probe.program];
        let mut refuse = |e: String| {
            *failed += 1;
            lines.push(format!(
                "error {object}/{} ({}): {e}",
                program.name, program.section
            ));
        };
        match planned {
            Err(e) => refuse(e.to_string()),
            Ok(sites) => {
                for p in sites {
                    match p.target {
                        Err(e) => refuse(format!("site at {:#x}: {e}", p.site.address)),
                        Ok(target) => out.push(Attachment {
                            program: probe.program,
                            kind: ProbeKind::Uprobe,
                            target,
                            cookie: u64::from(p.spec_id),
                            semaphore: p.site.semaphore.map(|(_, off)| off),
                            usdt: Some(UsdtSite {
                                probe: format!("{}:{}", probe.provider, probe.name),
                                args: p.args.map_err(|e| e.to_string()),
                            }),
                        }),
                    }
                }
            }
        }
    }
    out
}

/// Hooks every uprobe/uretprobe program of the published `object`; one status line per
/// program in `lines`. Returns how many could not be attached (the process runs on regardless).
pub fn attach_object(
    object: &str,
    resolver: &mut bpftime_attach::symbols::Resolver,
    hooks: &mut bpftime_attach::HookSet,
    lines: &mut Vec<String>,
    semaphores: &mut Vec<RaisedSemaphore>,
) -> (usize, Option<FollowedObject>) {
    let published = match PublishedObject::open(object) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            // The agent's status lines and stderr are text, and the errno (say, EACCES on the
            // object's maps) is usually a source.
            let text = bpftime_abi::error_chain(&e);
            let hint = if text.contains("Permission denied") {
                format!(
                    " (its maps are not shared with uid {}: the loader's user grants them with \
                     `bpftime-rs load --grant UID`, or root attaches with `bpftime-rs attach PID`)",
                    bpftime_runtime::maps::euid()
                )
            } else {
                String::new()
            };
            eprintln!("bpftime-agent: object {object}: {text}{hint}");
            lines.push(format!("error object {object}: {text}{hint}"));
            return (1, None);
        }
    };
    let mut failed = 0;
    let wanted = attachments(&published, lines, &mut failed);
    let mut installed = install(&published, wanted, resolver, hooks, lines, &mut failed);
    if published.manifest.links.is_none() {
        // Section attachments stay until detach, their semaphores with the agent.
        semaphores.extend(installed.iter_mut().filter_map(|i| i.semaphore.take()));
    }
    let followed = published.manifest.links.is_some().then(|| FollowedObject {
        name: object.to_string(),
        generation: published.manifest.generation,
        hooks: installed,
        seen: None,
    });
    (failed, followed)
}

/// What identifies one installed attachment across manifest generations (program indices
/// of an object whose loader adds links only grow).
type AttachmentKey = (usize, ProbeKind, String, u64);

fn key_of(a: &Attachment) -> AttachmentKey {
    (a.program, a.kind, a.target.clone(), a.cookie)
}

/// An object whose loader makes and removes links while targets run (`load -- APP`): the
/// agent follows its manifest ([`follow`]).
pub struct FollowedObject {
    name: String,
    generation: u64,
    hooks: Vec<Installed>,
    /// The manifest file as last read (its identity and its loader's pid): while the file is
    /// the same and the loader lives, nothing changed and nothing is parsed.
    seen: Option<ManifestStamp>,
}

/// What tells a manifest file changed without reading it: it is replaced by rename (a new
/// inode) on every publication.
#[derive(Clone, PartialEq, Eq)]
struct ManifestStamp {
    path: std::path::PathBuf,
    inode: u64,
    modified_ns: i128,
    size: u64,
    loader_pid: u32,
}

impl ManifestStamp {
    fn of(path: std::path::PathBuf, loader_pid: u32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).ok()?;
        Some(Self {
            inode: m.ino(),
            modified_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            size: m.size(),
            loader_pid,
            path,
        })
    }

    /// The file is still the one read, and its loader is alive.
    fn unchanged(&self) -> bool {
        let alive = self.loader_pid > 0
            // SAFETY: kill with signal 0 only checks that the process exists.
            && unsafe { libc::kill(self.loader_pid as i32, 0) } == 0;
        alive && Self::of(self.path.clone(), self.loader_pid).as_ref() == Some(self)
    }
}

/// Brings `followed`'s hooks in line with its manifest if it changed: links added are
/// installed, links removed (or all of them, when the object or its loader is gone) are
/// removed. Status lines go to `lines`.
pub fn follow(
    followed: &mut FollowedObject,
    hooks: &mut bpftime_attach::HookSet,
    lines: &mut Vec<String>,
) {
    let object = followed.name.clone();
    if followed.seen.as_ref().is_some_and(ManifestStamp::unchanged) {
        return;
    }
    let found = bpftime_runtime::state::find_object(&object);
    // The stamp counts only if the file it describes holds what was read: the manifest is
    // read again after the stat, and generations only grow, so equal generations mean the
    // same publication.
    followed.seen = found.as_ref().ok().and_then(|f| {
        let path = bpftime_runtime::state::Manifest::path(&f.dir, &object);
        let stamp = ManifestStamp::of(path, f.manifest.loader_pid)?;
        let again = bpftime_runtime::state::find_object(&object).ok()?;
        (again.manifest.generation == f.manifest.generation).then_some(stamp)
    });
    let manifest = found.map(|f| f.manifest);
    if let Ok(m) = &manifest {
        if m.generation == followed.generation && m.loader_alive() {
            return;
        }
    }
    let published = match &manifest {
        Ok(m) if m.loader_alive() => PublishedObject::open(&object).ok().map(Arc::new),
        _ => None,
    };
    let mut failed = 0;
    let wanted = match &published {
        Some(p) => attachments(p, lines, &mut failed),
        None => Vec::new(),
    };
    let wanted_keys: Vec<AttachmentKey> = wanted.iter().map(key_of).collect();
    let mut lowered = Vec::new();
    followed.hooks.retain_mut(|i| {
        if wanted_keys.contains(&i.key) {
            return true;
        }
        let key = &i.key;
        match hooks.remove(i.id) {
            Ok(()) => lines.push(format!("removed {object} {} {}", key.2, probe_name(key.1))),
            Err(e) => lines.push(format!("error removing {object} {}: {e}", key.2)),
        }
        lowered.extend(i.semaphore.take());
        false
    });
    lower_semaphores(lowered);
    if let Some(published) = &published {
        let new: Vec<Attachment> = wanted
            .into_iter()
            .filter(|a| !followed.hooks.iter().any(|i| i.key == key_of(a)))
            .collect();
        if !new.is_empty() {
            match bpftime_attach::symbols::Resolver::new(None) {
                Ok(mut resolver) => {
                    let added = install(published, new, &mut resolver, hooks, lines, &mut failed);
                    followed.hooks.extend(added);
                }
                Err(e) => lines.push(format!("error {object}: {e}")),
            }
        }
        followed.generation = published.manifest.generation;
    } else if let Ok(m) = &manifest {
        followed.generation = m.generation;
    }
}

impl FollowedObject {
    /// The semaphores raised for this object's hooks (handed over on detach).
    pub fn take_semaphores(&mut self) -> Vec<RaisedSemaphore> {
        self.hooks
            .iter_mut()
            .filter_map(|i| i.semaphore.take())
            .collect()
    }
}

fn probe_name(kind: ProbeKind) -> &'static str {
    if kind == ProbeKind::Uprobe {
        "uprobe"
    } else {
        "uretprobe"
    }
}

/// Writes a USDT site's argument spec at its spec id into the object's `__bpf_usdt_specs`
/// (what `usdt.bpf.h`'s `bpf_usdt_arg()` reads). A program that does not use `usdt.bpf.h`
/// has no spec map and needs none.
fn write_usdt_spec(
    published: &PublishedObject,
    spec_id: u64,
    site: &UsdtSite,
) -> Result<(), String> {
    let Ok(specs) = published.shm.map(USDT_SPECS_MAP) else {
        return Ok(());
    };
    let args = site.args.as_ref().map_err(Clone::clone)?;
    let value_size = specs.def().value_size;
    let layout = usdt::SpecLayout::of_value_size(value_size).ok_or_else(|| {
        format!(
            "{USDT_SPECS_MAP} holds {value_size}-byte values, no struct __bpf_usdt_spec of \
             a libbpf usdt.bpf.h known here (208 or 304 bytes)"
        )
    })?;
    let spec =
        usdt::spec_value(args, 0, layout).map_err(|e| format!("USDT {}: {e}", site.probe))?;
    let capacity = specs.def().max_entries;
    if spec_id >= u64::from(capacity) {
        return Err(format!(
            "the object's USDT sites need more than the {capacity} entries of \
             {USDT_SPECS_MAP} (BPF_USDT_MAX_SPEC_CNT)"
        ));
    }
    specs
        .update(&(spec_id as u32).to_le_bytes(), &spec, 0)
        .map_err(|e| format!("{USDT_SPECS_MAP}[{spec_id}]: {e}"))
}

/// The spec map `usdt.bpf.h` defines.
const USDT_SPECS_MAP: &str = "__bpf_usdt_specs";

/// Counts the reference counter at `file_offset` of `module` (a mapped file's path, as the
/// resolver names it) up in this process.
fn raise_semaphore(
    resolver: &bpftime_attach::symbols::Resolver,
    module: &str,
    file_offset: u64,
) -> Result<RaisedSemaphore, String> {
    let address = resolver
        .writable_address(module, file_offset)
        .ok_or_else(|| {
            format!(
                "USDT semaphore: {module} has no writable mapping of file offset {file_offset:#x}"
            )
        })?;
    // SAFETY: `address` is in this process's writable mapping of the module, at the
    // semaphore's file offset.
    let semaphore = unsafe { usdt::Semaphore::raise(address) }.map_err(|e| e.to_string())?;
    Ok(RaisedSemaphore {
        semaphore,
        module: module.to_string(),
        file_offset,
    })
}

/// Marks every USDT site of `module` as a probe site ([`bpftime_attach::hook::reserve_sites`])
/// once per module: no detour then displaces one (two probes' `nop`s are often back to back),
/// whether it is hooked now, later, or by a plain uprobe at its offset.
fn reserve_usdt_sites(resolver: &bpftime_attach::symbols::Resolver, module: &str) {
    static DONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|m| m == module) {
        return;
    }
    done.push(module.to_string());
    let Ok(sites) = usdt::read_sites(std::path::Path::new(module)) else {
        return;
    };
    bpftime_attach::hook::reserve_sites(
        sites
            .iter()
            .filter_map(|s| resolver.executable_address(module, s.file_offset)),
    );
}

/// One attachment installed: its hook and the semaphore raised for it.
pub(crate) struct Installed {
    key: AttachmentKey,
    id: bpftime_attach::HookId,
    semaphore: Option<RaisedSemaphore>,
}

/// Installs `wanted`, one status line each; returns what was installed.
fn install(
    published: &Arc<PublishedObject>,
    wanted: Vec<Attachment>,
    resolver: &mut bpftime_attach::symbols::Resolver,
    hooks: &mut bpftime_attach::HookSet,
    lines: &mut Vec<String>,
    failed: &mut usize,
) -> Vec<Installed> {
    let object = published.shm.object_name().to_string();
    let mut installed = Vec::new();
    for attachment in wanted {
        let key = key_of(&attachment);
        let Attachment {
            program,
            kind,
            target,
            cookie,
            semaphore,
            usdt,
        } = attachment;
        let program = &published.programs[program];
        let resolved = resolver.resolve(&target);
        if let Err(e @ bpftime_attach::AttachError::ModuleNotLoaded { .. }) = &resolved {
            // Not this process's file: a shell or wrapper that execs it later (its agent then
            // hooks it), or a library it has not loaded. Kernel uprobes belong to the file,
            // so this is no error.
            lines.push(format!(
                "pending {object}/{} ({}): {e}; hooked in the process that runs it",
                program.name, program.section
            ));
            continue;
        }
        let result = resolved.map_err(|e| e.to_string()).and_then(|t| {
            let module = t.module.to_string_lossy().into_owned();
            reserve_usdt_sites(resolver, &module);
            if let Some(site) = &usdt {
                write_usdt_spec(published, cookie, site)?;
            }
            let raised = semaphore
                .map(|off| raise_semaphore(resolver, &module, off))
                .transpose()?;
            // The kernel's user stacks at a function's entry include the return address
            // still at the stack pointer when the probed instruction is `push %rbp`.
            let frame_at_entry = kind == ProbeKind::Uprobe
                && t.offset == 0
                && bpftime_attach::hook::pushes_frame_at_entry(
                    &bpftime_attach::hook::original_code(t.address, 1),
                );
            let handler = BpfHandler::new(
                Arc::clone(published),
                program.clone(),
                t.address,
                cookie,
                frame_at_entry,
            );
            match hooks.install(&t, kind, handler) {
                Ok(id) => Ok((t, id, raised)),
                Err(e) => {
                    lower_semaphores(raised.into_iter().collect());
                    Err(e.to_string())
                }
            }
        });
        match result {
            Ok((t, id, raised)) => {
                let semaphore = if raised.is_some() {
                    ", semaphore raised"
                } else {
                    ""
                };
                installed.push(Installed {
                    key,
                    id,
                    semaphore: raised,
                });
                // Where a 5-byte jump does not fit, the site traps (`int3`): say so, it costs
                // a signal per call.
                let via = match bpftime_attach::site_mechanism(t.address) {
                    Some("int3") => " via int3",
                    _ => "",
                };
                let what = match &usdt {
                    Some(site) => format!("usdt {} at {target}", site.probe),
                    None => format!("{} {target}", probe_name(kind)),
                };
                lines.push(format!(
                    "ok {object}/{} {what} at {:#x} on {:?}{via}{semaphore}",
                    program.name, t.address, program.vm
                ));
            }
            Err(e) => {
                *failed += 1;
                eprintln!("bpftime-agent: {object}/{}: {e}", program.name);
                lines.push(format!(
                    "error {object}/{} ({}): {e}",
                    program.name, program.section
                ));
            }
        }
    }
    installed
}
