//! A loaded object: the parsed BPF object ([`crate::object`]), verified by the kernel
//! ([`crate::verifier`]), its maps created in shared memory ([`crate::maps`]), and its programs
//! published in the loader's manifest ([`crate::state`]) with how they must run, so agents in
//! other processes ([`PublishedObject`]) run exactly the bytes the kernel verified, taken from a
//! file only the loader's user can write, never from shared memory.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::helpers::{wire, RuntimeHelpers};
use crate::maps::{MapError, ShmObject};
use crate::object::{AttachTarget, BpfObject, ObjectError};
use crate::state::manifest::{vm_name, ManifestProgram};
use crate::state::{Manifest, ManifestError, StateDir, TrustError};
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

/// How [`LoadedObject::load`] checks and runs an object's programs.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Pass every program through the kernel verifier first (the CLI's default).
    pub verify: bool,
    /// Which VM family runs the programs (ours or rbpf); with `verify` and not `no_jit`, its
    /// JIT, otherwise its interpreter.
    pub vm: VmChoice,
    /// Force the interpreter. Without verification the checked interpreter is used anyway:
    /// unchecked JIT code is only for verified bytes.
    pub no_jit: bool,
    /// Publish the object for agents (write its manifest to this user's state directory).
    /// `run` loads privately and publishes nothing.
    pub publish: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            verify: true,
            vm: VmChoice::Ours,
            no_jit: false,
            publish: true,
        }
    }
}

impl LoadOptions {
    /// The VM these options run verified programs on.
    pub fn vm_kind(&self) -> VmKind {
        let jit = self.verify && !self.no_jit;
        match (self.vm, jit) {
            (VmChoice::Ours, true) => VmKind::Jit,
            (VmChoice::Ours, false) => VmKind::Interpreter,
            (VmChoice::Rbpf, true) => VmKind::Rbpf,
            (VmChoice::Rbpf, false) => VmKind::RbpfInterpreter,
        }
    }
}

/// Why loading, publishing, opening or looking up an object's programs failed.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The object file could not be read or parsed.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// A verifier gate error. [`LoadedObject::load`] does not return it: it keeps each
    /// program's refusal in [`LoadedObject::refused`] and loads the others.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Creating, opening, filling or granting access to the shared-memory maps failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The object has a map type the shared-memory maps do not implement.
    #[error(transparent)]
    UnsupportedMap(#[from] wire::UnsupportedMap),
    /// Reading, writing or finding the object's manifest failed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A state directory or file was missing or not trustworthy, or could not be removed.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The VM refused a program's bytes (bad encoding, an instruction rbpf cannot run, a JIT
    /// compile failure).
    #[error("{object}: program {program} (section {section})")]
    Program {
        /// The object's name.
        object: String,
        /// The program's name.
        program: String,
        /// Its ELF section.
        section: String,
        /// The VM's error.
        #[source]
        source: VmError,
    },
    /// A program that exists but cannot run: refused by the verifier, by the helpers' linking
    /// (an unresolved map reference, an unsupported helper) or by the VM, or skipped by the
    /// object parser.
    #[error("{object}: program {program}")]
    Unrunnable {
        /// The object's name.
        object: String,
        /// The program's name.
        program: String,
        /// Why the verifier, the loader or the VM refused it.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "{object} is already loaded by pid {pid}: stop it or run `bpftime-rs unload {object}`"
    )]
    /// Another live loader has published this object.
    AlreadyLoaded {
        /// The object (segment) name.
        object: String,
        /// The live loader's pid, from its manifest.
        pid: u32,
    },
    /// [`LoadedObject::program`] found no program, runnable or refused, of that name.
    #[error("{object}: no program named {program} (programs: {available})")]
    NoSuchProgram {
        /// The object's name.
        object: String,
        /// The name asked for.
        program: String,
        /// The runnable programs' names, comma-separated.
        available: String,
    },
}

/// A program ready to run in this process.
#[derive(Debug, Clone)]
pub struct RunnableProgram {
    /// The program's function name in the object.
    pub name: String,
    /// Its ELF section name.
    pub section: String,
    /// Where it attaches: `PATH:FUNC[+OFF]` for uprobes, the parsed target's debug text for
    /// other kinds (see `attach_string`).
    pub attach_target: String,
    /// The kernel `bpf_prog_type` it was loaded as (0 for unknown sections); decides
    /// [`context_size`](Self::context_size) and which programs tail calls may reach.
    pub prog_type: u32,
    /// The VM that runs it.
    pub vm: VmKind,
    /// Whether the kernel verifier accepted these exact bytes (only then may a JIT run them).
    pub verified: bool,
    /// The validated, relocated program, shared by every runner.
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
    /// The parsed object.
    pub object: BpfObject,
    /// Its maps' shared-memory segment (created, or reopened after a loader that is gone).
    pub shm: ShmObject,
    /// The programs that loaded, in object order (their index is the tail-call index).
    pub programs: Vec<RunnableProgram>,
    /// Programs the verifier or VM refused, with why (the rest load).
    pub refused: Vec<(String, Arc<dyn std::error::Error + Send + Sync>)>,
    /// The object's maps user space cannot hold (each laid out as an empty placeholder; the
    /// programs that use one are in [`LoadedObject::refused`]).
    pub unsupported_maps: Vec<wire::UnsupportedMap>,
    /// What agents read (published objects only).
    manifest: Option<(StateDir, Manifest)>,
}

impl LoadedObject {
    /// Parses `path`, verifies its programs, creates its maps in shared memory in a segment
    /// named `segment` (normally the object's name) and, unless `options.publish` is off,
    /// publishes the programs in the object's manifest.
    ///
    /// A segment left by a loader that is gone is reopened with its map contents intact (the
    /// targets keep using those maps; a restarted loader re-syncs from them), and its manifest
    /// is replaced. An object whose loader still runs is an error.
    pub fn load(
        path: &Path,
        segment: Option<&str>,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        Self::load_object(BpfObject::from_file(path)?, path, segment, options)
    }

    /// [`load`](Self::load) of an object already parsed from `path` (and perhaps configured:
    /// globals set with [`BpfObject::set_global`] before its programs are verified).
    pub fn load_object(
        object: BpfObject,
        path: &Path,
        segment: Option<&str>,
        options: LoadOptions,
    ) -> Result<Self, LoadError> {
        let segment = segment.unwrap_or(&object.name).to_string();
        // A map user space cannot hold refuses only the programs that use it.
        let (defs, unsupported_maps) = wire::map_defs_with_placeholders(&object, true);
        for (_, m) in &unsupported_maps {
            tracing::warn!("{m}; the programs that use it are refused");
        }
        let state = if options.publish {
            let dir = StateDir::ours()?;
            if let Ok(old) = Manifest::read(&dir, &segment) {
                if old.loader_alive() && old.loader_pid != std::process::id() {
                    return Err(LoadError::AlreadyLoaded {
                        object: segment,
                        pid: old.loader_pid,
                    });
                }
            }
            Some(dir)
        } else {
            None
        };
        let shm = match ShmObject::open(&segment) {
            // A restarted loader: reuse the maps only if they are the same maps.
            Ok(existing) => {
                drop(existing);
                ShmObject::open_or_create(&segment, &defs)?
            }
            Err(e) if e.errno() == libc::ENOENT => {
                let shm = ShmObject::create(&segment, &defs)?;
                wire::init_global_data(&object, &shm)?;
                shm
            }
            Err(e) => return Err(e.into()),
        };
        let kind = options.vm_kind();
        let mut programs = Vec::new();
        let mut published = Vec::new();
        let mut refused: Vec<(String, Arc<dyn std::error::Error + Send + Sync>)> = Vec::new();
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
                        refused.push((spec.name.clone(), Arc::new(e)));
                        continue;
                    }
                }
            } else {
                spec.bytecode()
            };
            if let Some((_, m)) = unsupported_maps
                .iter()
                .find(|(i, _)| references_map(&bytes, *i))
            {
                refused.push((spec.name.clone(), Arc::new(m.clone())));
                continue;
            }
            // A program this VM cannot run is refused alone; the others still load.
            let program = match compile(&object.name, &spec.name, &spec.section, &bytes, kind, &shm)
            {
                Ok(program) => program,
                Err(e) => {
                    refused.push((spec.name.clone(), Arc::new(e)));
                    continue;
                }
            };
            let attach_target = attach_string(&spec.attach);
            let prog_type = spec.kernel_prog_type.unwrap_or(0);
            published.push(ManifestProgram {
                index: programs.len() as u32,
                name: spec.name.clone(),
                section: spec.section.clone(),
                attach_target: attach_target.clone(),
                prog_type,
                vm: vm_name(kind).to_string(),
                verified: options.verify,
                insns: ManifestProgram::encode_insns(&bytes),
            });
            programs.push(RunnableProgram {
                name: spec.name.clone(),
                section: spec.section.clone(),
                attach_target,
                prog_type,
                vm: kind,
                verified: options.verify,
                program: Arc::new(program),
            });
        }
        for skipped in &object.skipped {
            refused.push((skipped.name.clone(), Arc::new(skipped.error.clone())));
        }
        let manifest = match state {
            Some(dir) => {
                let mut manifest = Manifest::new(
                    &segment,
                    &path.display().to_string(),
                    &shm.map_defs(),
                    shm.identity(),
                );
                manifest.programs = published;
                // `bpftime-rs maps` (another process) formats entries with the object's BTF.
                let btf_path = dir.ensure_object_dir(&segment)?.join(MAP_BTF_FILE);
                let json = crate::object::btf_format::MapBtfInfo::from_object(&object).to_json();
                let saved = crate::state::fs::write_atomic(&btf_path, json.as_bytes(), 0o644);
                if let Err(e) = saved {
                    tracing::warn!("cannot save map types to {}: {e}", btf_path.display());
                }
                manifest.publish(&dir)?;
                Some((dir, manifest))
            }
            None => None,
        };
        Ok(Self {
            object,
            shm,
            programs,
            refused,
            unsupported_maps: unsupported_maps.into_iter().map(|(_, m)| m).collect(),
            manifest,
        })
    }

    /// Gives `uids` and `gids` read-write access to the object's maps (POSIX ACL entries on its
    /// segment), as a non-root target needs, and records them in the manifest.
    pub fn grant(&mut self, uids: &[u32], gids: &[u32]) -> Result<(), LoadError> {
        self.shm.grant(uids, gids)?;
        if let Some((dir, manifest)) = &mut self.manifest {
            for uid in uids {
                if !manifest.granted_uids.contains(uid) {
                    manifest.granted_uids.push(*uid);
                }
            }
            for gid in gids {
                if !manifest.granted_gids.contains(gid) {
                    manifest.granted_gids.push(*gid);
                }
            }
            manifest.publish(dir)?;
        }
        Ok(())
    }

    /// Removes what loading made: the manifest (agents can no longer open the object) and the
    /// shared-memory segment (mappings stay valid in processes that have them).
    pub fn unload(self) -> Result<(), LoadError> {
        if let Some((dir, manifest)) = &self.manifest {
            Manifest::remove(dir, &manifest.object).map_err(|e| TrustError::Io {
                path: dir.object_dir(&manifest.object),
                source: e,
            })?;
        }
        match self.shm.remove() {
            Err(e) if e.errno() != libc::ENOENT => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The manifest agents read (published objects only).
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref().map(|(_, m)| m)
    }

    /// The runnable program called `name`, or why it was refused ([`LoadError::Unrunnable`]),
    /// or [`LoadError::NoSuchProgram`].
    pub fn program(&self, name: &str) -> Result<&RunnableProgram, LoadError> {
        self.programs
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                if let Some((_, why)) = self.refused.iter().find(|(n, _)| n == name) {
                    LoadError::Unrunnable {
                        object: self.object.name.clone(),
                        program: name.to_string(),
                        source: why.clone(),
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
        helpers_for(&self.shm, &self.programs, None)
    }
}

/// Removes `object`'s manifest from this user's state directory and its segment, whatever
/// state they are in (cleanup after tests and crashed loaders; `bpftime-rs unload` also removes
/// the kernel pins).
pub fn unload_object(object: &str) {
    if let Ok(dir) = StateDir::ours() {
        let _ = Manifest::remove(&dir, object);
    }
    let _ = crate::maps::remove_object(object);
}

/// The file, in an object's state directory, holding the BTF of its map keys and values.
pub const MAP_BTF_FILE: &str = "maps-btf.json";

/// Where `load` keeps the BTF descriptions of `object`'s map keys and values in `dir`.
pub fn map_btf_path(dir: &StateDir, object: &str) -> std::path::PathBuf {
    dir.object_dir(object).join(MAP_BTF_FILE)
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
            source: Arc::new(e),
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

/// Checks that `bytes`, a program another loader relocated (its map references already
/// indices of `shm`'s maps) and the kernel verified, can run on `kind` over `shm`'s maps: the
/// check `load` makes of each program before publishing it (the syscall shim's `load -- APP`).
pub fn check_program(
    shm: &ShmObject,
    name: &str,
    section: &str,
    bytes: &[u8],
    kind: VmKind,
) -> Result<(), LoadError> {
    compile(shm.object_name(), name, section, bytes, kind, shm).map(drop)
}

/// Helpers over `shm`'s maps for the programs of one object. Tail calls reach `programs` by
/// index; with `caller` (a program type), only programs of that type, as the kernel only lets
/// a PROG_ARRAY hold programs of the type that uses it (`bpf_prog_map_compatible`): a slot
/// holding another index (a target can write its PROG_ARRAYs) is an empty slot.
fn helpers_for(
    shm: &ShmObject,
    programs: &[RunnableProgram],
    caller: Option<u32>,
) -> Result<RuntimeHelpers, LoadError> {
    let by_index: Vec<Option<Arc<Program>>> = programs
        .iter()
        .map(|p| {
            caller
                .is_none_or(|t| t == p.prog_type)
                .then(|| Arc::clone(&p.program))
        })
        .collect();
    Ok(RuntimeHelpers::from_object(shm)
        .with_trace_sink(crate::helpers::RingbufTraceSink::from_object(shm)?)
        .with_program_resolver(move |i| by_index.get(i as usize).cloned().flatten()))
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
    /// The loader's segment, opened and checked against the manifest.
    pub shm: ShmObject,
    /// The manifest's programs, compiled for this process, in manifest order.
    pub programs: Vec<RunnableProgram>,
    /// The loader's manifest the programs came from.
    pub manifest: Manifest,
}

impl PublishedObject {
    /// Finds `object`'s manifest in a trusted state directory (root's, or this process's
    /// user's), maps the segment it names (refusing any other file of that name, or one whose
    /// maps differ from the manifest's), and prepares every program to run in this process from
    /// the manifest's bytes.
    pub fn open(object: &str) -> Result<Self, LoadError> {
        let found = crate::state::find_object(object)?;
        let manifest = found.manifest;
        let shm = ShmObject::open_expect(object, &manifest.segment, &manifest.map_defs())?;
        let programs = manifest
            .programs
            .iter()
            .map(|p| Self::prepare(&shm, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            shm,
            programs,
            manifest,
        })
    }

    fn prepare(shm: &ShmObject, info: &ManifestProgram) -> Result<RunnableProgram, LoadError> {
        let vm = info.vm_kind();
        let program = compile(
            shm.object_name(),
            &info.name,
            &info.section,
            &info.insn_bytes(),
            vm,
            shm,
        )?;
        Ok(RunnableProgram {
            name: info.name.clone(),
            section: info.section.clone(),
            attach_target: info.attach_target.clone(),
            prog_type: info.prog_type,
            vm,
            verified: info.verified,
            program: Arc::new(program),
        })
    }

    /// Helpers for running `program` (one of this object's): tail calls reach only programs of
    /// its type.
    pub fn helpers_for(&self, program: &RunnableProgram) -> Result<RuntimeHelpers, LoadError> {
        helpers_for(&self.shm, &self.programs, Some(program.prog_type))
    }

    /// Helpers with every program reachable by tail calls (tests).
    pub fn helpers(&self) -> Result<RuntimeHelpers, LoadError> {
        helpers_for(&self.shm, &self.programs, None)
    }
}

/// Whether the program `bytes` load map `index` (an `lddw` with a map pseudo source), after
/// the verifier's dead code was removed.
fn references_map(bytes: &[u8], index: usize) -> bool {
    use crate::object::insn;
    use crate::vm::insn::{
        BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE, BPF_PSEUDO_MAP_VALUE,
    };
    let insns: Vec<crate::object::RawInsn> = bytes
        .chunks_exact(8)
        .map(|c| c.try_into().expect("8 bytes"))
        .collect();
    let found = insn::starts(&insns).any(|(k, _)| {
        let i = &insns[k];
        insn::opc(i) == insn::LDDW
            && matches!(
                insn::src(i),
                BPF_PSEUDO_MAP_FD
                    | BPF_PSEUDO_MAP_IDX
                    | BPF_PSEUDO_MAP_VALUE
                    | BPF_PSEUDO_MAP_IDX_VALUE
            )
            && insn::imm(i) as usize == index
    });
    found
}
