//! A loaded object: the parsed BPF object ([`crate::object`]), verified by the kernel
//! ([`crate::verifier`]), its maps created in shared memory ([`crate::maps`]), and its programs
//! published in the segment's registry with how they must run, so agents in other processes
//! ([`PublishedObject`]) run exactly the bytes the kernel verified.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::helpers::{wire, RuntimeHelpers};
use crate::maps::{MapError, ProgramInfo, ProgramSpec as RegistrySpec, ShmObject};
use crate::object::{AttachTarget, BpfObject, ObjectError};
use crate::verifier::{self, VerifyError};
use crate::vm::insn::decode_bytes;
use crate::vm::jit::{JitHook, JitSession};
use crate::vm::rbpf::{rbpf_check, RbpfMode};
use crate::vm::{Helpers, InterpOptions, MemoryMap, Program, VmError, VmKind};

/// Which VM runs the programs, as the CLI's `--vm` and `--no-jit` select it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmChoice {
    /// Our own VM (the default).
    #[default]
    Ours,
    /// rbpf 0.4, for programs whose every instruction it runs correctly.
    Rbpf,
}

impl std::str::FromStr for VmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ours" | "bpftime" => Ok(Self::Ours),
            "rbpf" => Ok(Self::Rbpf),
            other => Err(format!("unknown VM {other:?}: use `ours` or `rbpf`")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Pass every program through the kernel verifier first (the CLI's default).
    pub verify: bool,
    pub vm: VmChoice,
    /// Force the interpreter. Without verification the checked interpreter is used anyway:
    /// unchecked JIT code is only for verified bytes.
    pub no_jit: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            verify: true,
            vm: VmChoice::Ours,
            no_jit: false,
        }
    }
}

impl LoadOptions {
    fn vm_kind(&self) -> VmKind {
        let jit = self.verify && !self.no_jit;
        match (self.vm, jit) {
            (VmChoice::Ours, true) => VmKind::Jit,
            (VmChoice::Ours, false) => VmKind::Interpreter,
            (VmChoice::Rbpf, true) => VmKind::Rbpf,
            (VmChoice::Rbpf, false) => VmKind::RbpfInterpreter,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    UnsupportedMap(#[from] wire::UnsupportedMap),
    #[error("{object}: program {program} (section {section})")]
    Program {
        object: String,
        program: String,
        section: String,
        #[source]
        source: VmError,
    },
    #[error("{object}: program {program}: {why}")]
    Unrunnable {
        object: String,
        program: String,
        why: String,
    },
    #[error(
        "{object} is already loaded by pid {pid}: stop it or run `bpftime-rs unload {object}`"
    )]
    AlreadyLoaded { object: String, pid: u32 },
    #[error("{object}: no program named {program} (programs: {available})")]
    NoSuchProgram {
        object: String,
        program: String,
        available: String,
    },
}

/// Registry `run_flags`: how agents must run a published program.
mod run_flags {
    pub const VERIFIED: u64 = 1;
    pub const VM_SHIFT: u32 = 8;
}

fn vm_code(kind: VmKind) -> u64 {
    match kind {
        VmKind::Interpreter => 0,
        VmKind::Jit => 1,
        VmKind::Rbpf => 2,
        VmKind::RbpfInterpreter => 3,
    }
}

fn vm_from_code(code: u64) -> VmKind {
    match code {
        1 => VmKind::Jit,
        2 => VmKind::Rbpf,
        3 => VmKind::RbpfInterpreter,
        _ => VmKind::Interpreter,
    }
}

/// A program ready to run in this process.
#[derive(Debug, Clone)]
pub struct RunnableProgram {
    pub name: String,
    pub section: String,
    /// As the section names it (`uprobe/PATH:FUNC`...).
    pub attach_target: String,
    pub prog_type: u32,
    pub vm: VmKind,
    pub verified: bool,
    pub program: Arc<Program>,
}

impl RunnableProgram {
    /// Runs once on `ctx` (padded by the caller to what the program type may read). Inline,
    /// with only the JIT run in line: a hook calls it on every hooked call; the other VMs go
    /// through one out-of-line call.
    #[inline]
    pub fn run(&self, helpers: &mut RuntimeHelpers, ctx: &mut [u8]) -> Result<u64, VmError> {
        #[inline(never)]
        fn run_other(
            this: &RunnableProgram,
            helpers: &mut RuntimeHelpers,
            ctx: &mut [u8],
        ) -> Result<u64, VmError> {
            match this.vm {
                VmKind::Interpreter => {
                    helpers.run_interpreter(&this.program, ctx, InterpOptions::default())
                }
                // SAFETY: as in `run`.
                VmKind::Jit => unsafe { helpers.run_jit(&this.program, ctx) },
                VmKind::Rbpf | VmKind::RbpfInterpreter => {
                    let mut mem = MemoryMap::new();
                    // Only rbpf's interpreter checks accesses (against the regions registered
                    // before the run); its JIT, like ours, trusts verified pointers. rbpf's JIT
                    // image is compiled once and cached in the program (`Program::rbpf_jit`).
                    if this.vm == VmKind::RbpfInterpreter {
                        helpers.register_global_data(&mut mem);
                    }
                    helpers.begin_run();
                    // SAFETY: as above for rbpf's JIT; its interpreter checks accesses itself.
                    let r = unsafe {
                        crate::vm::run_with_ctx(
                            this.vm,
                            &this.program,
                            ctx,
                            &mut mem,
                            helpers,
                            InterpOptions::default(),
                        )
                    };
                    helpers.end_run();
                    r
                }
            }
        }
        match self.vm {
            // SAFETY: JIT kinds are only chosen for bytes the kernel verifier accepted (see
            // `LoadOptions::vm_kind`), and ctx is padded to what the program type may read.
            VmKind::Jit => unsafe { helpers.run_jit(&self.program, ctx) },
            _ => run_other(self, helpers, ctx),
        }
    }

    /// How many context bytes the program type may read: the context is zero-padded to this
    /// before an unchecked run (the verifier allows tracepoint programs 8 KiB).
    pub fn context_size(&self) -> usize {
        context_size(self.prog_type)
    }
}

/// One program run again and again with one set of helpers (a hook's state for one thread).
/// On our JIT the run environment is set up once ([`JitSession`]) instead of per run; the
/// other VMs run as [`RunnableProgram::run`] does.
pub struct ProgramRunner {
    /// Declared first: dropped before the helpers it points at.
    session: Option<Box<JitSession<'static>>>,
    /// Owned (from `Box::into_raw`); the session holds a pointer to it.
    helpers: std::ptr::NonNull<RuntimeHelpers>,
    /// The program run; keeps the session's image alive (dropped after the session).
    program: RunnableProgram,
}

// SAFETY: the runner owns its helpers, session and program (the session points only at the
// helpers, at its own memory map and at the program's image); moving it to another thread
// moves all of that together. `RuntimeHelpers` itself is `Send` (checked below).
unsafe impl Send for ProgramRunner {}

const _: () = {
    const fn send<T: Send>() {}
    send::<RuntimeHelpers>();
};

impl ProgramRunner {
    /// A runner for `program` (it keeps a copy) with `helpers`. A program whose JIT image does
    /// not compile gets no session: its runs then report the compile error as
    /// [`RunnableProgram::run`] does.
    pub fn new(program: &RunnableProgram, helpers: RuntimeHelpers) -> Self {
        let helpers = std::ptr::NonNull::from(Box::leak(Box::new(helpers)));
        let session = match program.vm {
            VmKind::Jit => program.program.jit().ok().map(|jit| {
                let h: *mut (dyn Helpers + 'static) = helpers.as_ptr();
                // SAFETY: the helpers live until the runner drops, after the session; runs
                // borrow the runner mutably, so nothing else uses them meanwhile. The image
                // lives in `program.program`, an `Arc` the runner keeps (its copy of
                // `program`), dropped after the session.
                unsafe { jit.session(h) }
            }),
            _ => None,
        };
        Self {
            session,
            helpers,
            program: program.clone(),
        }
    }

    /// Registers this runner's JIT session as slot `slot`'s in `hook` (see [`JitHook`]):
    /// the hook's entry then runs it directly. False when the runner has no session (not on
    /// our JIT) or the hook is for another image.
    ///
    /// # Safety
    /// The runner must stay alive and in place (boxed), and only be used by the thread
    /// holding the slot, for as long as `hook`'s entry may be called with `slot`.
    pub unsafe fn register_hook_slot(&mut self, hook: &JitHook, slot: usize) -> bool {
        match &mut self.session {
            // SAFETY: the caller's contract.
            Some(session) => unsafe { hook.set_slot(slot, session) },
            None => false,
        }
    }

    /// The outcome of a run `hook`'s entry made with this runner's session that did not
    /// simply return (its `after` callback): the error, or the result of its tail calls.
    ///
    /// # Safety
    /// Only from the `after` callback of that run, on the thread holding the slot.
    pub unsafe fn finish_hook_run(&mut self, r0: u64) -> Result<u64, VmError> {
        match &mut self.session {
            // SAFETY: the caller's contract.
            Some(session) => unsafe { session.finish_hook_run(r0) },
            None => Ok(r0),
        }
    }

    /// The helpers (between runs).
    pub fn helpers(&mut self) -> &mut RuntimeHelpers {
        // SAFETY: owned by the runner; no run is in progress while `self` is borrowed here.
        unsafe { self.helpers.as_mut() }
    }

    /// Runs the program once on `ctx`, as [`RunnableProgram::run`] does.
    // Always inline: the hot path of every hooked call; one frame less per call.
    #[inline(always)]
    pub fn run(&mut self, ctx: &mut [u8]) -> Result<u64, VmError> {
        let helpers = self.helpers.as_ptr();
        match &mut self.session {
            Some(session) => {
                // SAFETY: `helpers` is owned by the runner and not borrowed elsewhere; the
                // session exists only for the JIT kind, chosen only for bytes the kernel
                // verifier accepted, with `ctx` padded by the caller to what the program type
                // may read (as `RunnableProgram::run`).
                unsafe {
                    (*helpers).begin_run();
                    let r = session.run(ctx.as_mut_ptr() as u64, ctx.len() as u64);
                    (*helpers).end_run();
                    r
                }
            }
            // SAFETY: as above, for the helpers.
            None => self.program.run(unsafe { &mut *helpers }, ctx),
        }
    }
}

impl Drop for ProgramRunner {
    fn drop(&mut self) {
        self.session = None;
        // SAFETY: from `Box::leak` in `new`; the session that pointed at it is gone.
        drop(unsafe { Box::from_raw(self.helpers.as_ptr()) });
    }
}

/// See [`RunnableProgram::context_size`].
pub fn context_size(prog_type: u32) -> usize {
    const KPROBE: u32 = 2;
    const TRACEPOINT: u32 = 5;
    const RAW_TRACEPOINT: u32 = 17;
    match prog_type {
        // struct pt_regs on x86_64.
        KPROBE => 21 * 8,
        TRACEPOINT => 8192,
        RAW_TRACEPOINT => 12 * 8,
        _ => 8192,
    }
}

/// An object loaded into shared memory.
pub struct LoadedObject {
    pub object: BpfObject,
    pub shm: ShmObject,
    pub programs: Vec<RunnableProgram>,
    /// Programs the verifier or VM refused, with why (the rest load).
    pub refused: Vec<(String, String)>,
}

impl LoadedObject {
    /// Parses `path`, verifies its programs, creates its maps in shared memory in a segment
    /// named `segment` (normally the object's name) and publishes the programs.
    ///
    /// A segment left by a loader that is gone is reopened with its map contents intact (the
    /// targets keep using those maps; a restarted loader re-syncs from them), and its program
    /// registry is replaced. A segment whose loader still runs is an error.
    pub fn load(
        path: &Path,
        segment: Option<&str>,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        let object = BpfObject::from_file(path)?;
        let segment = segment.unwrap_or(&object.name).to_string();
        let defs = wire::map_defs(&object, true)?;
        if let Some(live) = crate::maps::list_segments()
            .unwrap_or_default()
            .into_iter()
            .find(|s| s.object == segment && s.creator_alive && s.creator_pid != std::process::id())
        {
            return Err(LoadError::AlreadyLoaded {
                object: segment,
                pid: live.creator_pid,
            });
        }
        let shm = match ShmObject::open(&segment) {
            Ok(existing) if !existing.is_creator() => {
                // Reuse the maps only if they are the same maps.
                drop(existing);
                let shm = ShmObject::open_or_create(&segment, &defs)?;
                for program in shm.programs() {
                    shm.unregister_program(program.index);
                }
                shm.claim()?;
                shm
            }
            _ => {
                let shm = ShmObject::create(&segment, &defs)?;
                wire::init_global_data(&object, &shm)?;
                shm
            }
        };
        // `bpftime-rs maps` (another process) formats entries with the object's BTF types.
        let btf_path = map_btf_path(&segment);
        let saved =
            std::fs::create_dir_all(btf_path.parent().expect("has a parent")).and_then(|()| {
                crate::object::btf_format::MapBtfInfo::from_object(&object).save(&btf_path)
            });
        if let Err(e) = saved {
            tracing::warn!("cannot save map types to {}: {e}", btf_path.display());
        }
        let kind = options.vm_kind();
        let mut programs = Vec::new();
        let mut refused = Vec::new();
        for (index, spec) in object.programs.iter().enumerate() {
            let bytes = if options.verify {
                match verifier::verify(&object, index) {
                    Ok(v) => {
                        for s in &v.substitutions {
                            tracing::warn!(program = %spec.name, "{s:?}");
                        }
                        v.insns.concat()
                    }
                    Err(e) => {
                        refused.push((spec.name.clone(), error_chain(&e)));
                        continue;
                    }
                }
            } else {
                spec.bytecode()
            };
            // A program this VM cannot run is refused alone; the others still load.
            let program = match compile(&object.name, &spec.name, &spec.section, &bytes, kind, &shm)
            {
                Ok(program) => program,
                Err(e) => {
                    refused.push((spec.name.clone(), error_chain(&e)));
                    continue;
                }
            };
            let attach_target = attach_string(&spec.attach);
            let flags = (vm_code(kind) << run_flags::VM_SHIFT)
                | if options.verify {
                    run_flags::VERIFIED
                } else {
                    0
                };
            shm.register_program(&RegistrySpec {
                name: &spec.name,
                section: &spec.section,
                attach_target: &attach_target,
                prog_type: spec.kernel_prog_type.unwrap_or(0),
                insns: &bytes,
                run_flags: flags,
            })?;
            programs.push(RunnableProgram {
                name: spec.name.clone(),
                section: spec.section.clone(),
                attach_target,
                prog_type: spec.kernel_prog_type.unwrap_or(0),
                vm: kind,
                verified: options.verify,
                program: Arc::new(program),
            });
        }
        for skipped in &object.skipped {
            refused.push((skipped.name.clone(), skipped.error.to_string()));
        }
        Ok(Self {
            object,
            shm,
            programs,
            refused,
        })
    }

    pub fn program(&self, name: &str) -> Result<&RunnableProgram, LoadError> {
        self.programs
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                if let Some((_, why)) = self.refused.iter().find(|(n, _)| n == name) {
                    LoadError::Unrunnable {
                        object: self.object.name.clone(),
                        program: name.to_string(),
                        why: why.clone(),
                    }
                } else {
                    LoadError::NoSuchProgram {
                        object: self.object.name.clone(),
                        program: name.to_string(),
                        available: self
                            .programs
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                }
            })
    }

    /// Helpers bound to this object's maps, with tail calls resolved among its programs and
    /// trace_printk lines going to the object's trace ring.
    pub fn helpers(&self) -> Result<RuntimeHelpers, LoadError> {
        helpers_for(&self.shm, &self.programs)
    }
}

/// Where `load` keeps the BTF descriptions of a segment's map keys and values.
pub fn map_btf_path(segment: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/bpftime-rs").join(format!("{segment}.maps-btf.json"))
}

/// An error with its sources, for messages kept as text.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn compile(
    object: &str,
    name: &str,
    section: &str,
    bytes: &[u8],
    kind: VmKind,
    shm: &ShmObject,
) -> Result<Program, LoadError> {
    let program_err = |source| LoadError::Program {
        object: object.to_string(),
        program: name.to_string(),
        section: section.to_string(),
        source,
    };
    let insns = decode_bytes(bytes).map_err(program_err)?;
    let helpers = RuntimeHelpers::from_object(shm);
    let program = helpers
        .load_program(insns)
        .map_err(|e| LoadError::Unrunnable {
            object: object.to_string(),
            program: name.to_string(),
            why: e.to_string(),
        })?;
    match kind {
        VmKind::Rbpf => rbpf_check(&program, RbpfMode::Jit).map_err(program_err)?,
        VmKind::RbpfInterpreter => {
            rbpf_check(&program, RbpfMode::Interpreter).map_err(program_err)?
        }
        VmKind::Jit => {
            program.jit().map_err(program_err)?;
        }
        VmKind::Interpreter => {}
    }
    Ok(program)
}

fn helpers_for(shm: &ShmObject, programs: &[RunnableProgram]) -> Result<RuntimeHelpers, LoadError> {
    let by_index: Vec<Arc<Program>> = programs.iter().map(|p| Arc::clone(&p.program)).collect();
    Ok(RuntimeHelpers::from_object(shm)
        .with_trace_sink(crate::helpers::RingbufTraceSink::from_object(shm)?)
        .with_programs(by_index))
}

/// The attach target as `PATH:FUNC[+OFF]` (or the section's own text for other kinds).
fn attach_string(target: &AttachTarget) -> String {
    match target {
        AttachTarget::Uprobe {
            path,
            symbol,
            offset,
            ..
        } => {
            let mut s = format!(
                "{}:{}",
                path.as_deref().unwrap_or(""),
                symbol.as_deref().unwrap_or("")
            );
            if *offset != 0 {
                s.push_str(&format!("+{offset:#x}"));
            }
            s
        }
        other => format!("{other:?}"),
    }
}

/// The programs another process published, as an agent opens them.
pub struct PublishedObject {
    pub shm: ShmObject,
    pub programs: Vec<RunnableProgram>,
}

impl PublishedObject {
    /// Opens `object`'s segment and prepares every registered program to run in this process
    /// (relocated against this process's mapping of the maps).
    pub fn open(object: &str) -> Result<Self, LoadError> {
        let shm = ShmObject::open(object)?;
        let mut programs = Vec::new();
        for info in shm.programs() {
            programs.push(Self::prepare(&shm, &info)?);
        }
        Ok(Self { shm, programs })
    }

    fn prepare(shm: &ShmObject, info: &ProgramInfo) -> Result<RunnableProgram, LoadError> {
        let verified = info.run_flags & run_flags::VERIFIED != 0;
        let mut vm = vm_from_code((info.run_flags >> run_flags::VM_SHIFT) & 0xff);
        if !verified && matches!(vm, VmKind::Jit | VmKind::Rbpf) {
            // Never run unverified bytes unchecked, whatever the registry says.
            vm = VmKind::Interpreter;
        }
        let program = compile(
            shm.object_name(),
            &info.name,
            &info.section,
            &info.insns,
            vm,
            shm,
        )?;
        Ok(RunnableProgram {
            name: info.name.clone(),
            section: info.section.clone(),
            attach_target: info.attach_target.clone(),
            prog_type: info.prog_type,
            vm,
            verified,
            program: Arc::new(program),
        })
    }

    pub fn helpers(&self) -> Result<RuntimeHelpers, LoadError> {
        helpers_for(&self.shm, &self.programs)
    }
}
