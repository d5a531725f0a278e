//! BPF helper functions with kernel semantics for our VM ([`RuntimeHelpers`]).
//!
//! # Wiring an object
//! ```text
//! let defs = wire::map_defs(&obj, true)?;               // object maps + the trace ring
//! let shm = ShmObject::create(&obj.name, &defs)?;      // maps in BpfObject::maps order
//! wire::init_global_data(&obj, &shm)?;                  // .data/.rodata initial bytes
//! let mut h = RuntimeHelpers::from_object(&shm)          // map index i = shm.map(i)
//!     .with_trace_sink(RingbufTraceSink::from_object(&shm)?) // or any TraceSink / closure
//!     .with_program_resolver(move |idx| progs.get(idx as usize).cloned());
//! let prog = Arc::new(h.load_program(decode_bytes(&spec.bytecode())?)?); // relocate + check
//! h.set_attach(AttachContext { func_ip, cookie, ..Default::default() });
//! let r0 = h.run_interpreter(&prog, &mut ctx_bytes, opts)?;  // or unsafe run_jit
//! let rc = h.attach().override_return;                       // bpf_override_return request
//! ```
//! Runs through [`interpret`] / [`JitProgram::run`](crate::vm::jit::JitProgram::run) directly
//! must call [`RuntimeHelpers::begin_run`] before and [`RuntimeHelpers::end_run`] after, and
//! (interpreter) [`RuntimeHelpers::register_global_data`] on the [`MemoryMap`].
//!
//! # Map tokens
//! `lddw rX, map` (`BPF_PSEUDO_MAP_FD` with the map index as "fd", or the loader's
//! `BPF_PSEUDO_MAP_IDX`) loads [`map_token`]`(index)` = [`MAP_TOKEN_TAG`]` | index`, a
//! non-canonical address (a stray dereference faults in the interpreter and would in native
//! code). Helpers decode it with [`map_index`]. `BPF_PSEUDO_MAP_VALUE`/`..._IDX_VALUE`
//! resolve to the real shared-memory address of the value of a one-entry ARRAY (global data:
//! `.rodata`, `.data`, `.bss`) plus the offset; the interpreter can only touch it after
//! [`RuntimeHelpers::register_global_data`] registered those values (read-only for maps with
//! `BPF_F_RDONLY_PROG`). `BPF_PSEUDO_BTF_ID` (ksyms) is refused.
//!
//! # Regions
//! On the interpreter, pointers the helpers hand out are registered in the run's
//! [`MemoryMap`]: map values from `bpf_map_lookup_elem` (read-only for `.rodata`-like maps),
//! ringbuf records from `bpf_ringbuf_reserve` (removed again on submit/discard), and the
//! key/value of each `bpf_for_each_map_elem` callback (for the callback only). The map
//! handles are kept alive by the memory map ([`MemoryMap::keep_alive`]). On the JIT nothing is
//! registered and pointer arguments are trusted, as the kernel verifier checked them.
//!
//! # Trace output
//! `bpf_trace_printk`, `bpf_trace_vprintk` lines (formatted, one trailing newline removed) go
//! to a [`TraceSink`]: a closure `FnMut(&[u8])`, [`MemoryTraceSink`] (collects lines), or
//! [`RingbufTraceSink`], which writes each line as one record into the RINGBUF map
//! [`TRACE_MAP_NAME`] of the object's shared memory (create it with [`trace_map_def`]), where
//! the CLI reads them with a [`RingBufConsumer`](crate::maps::RingBufConsumer). The default
//! sink discards lines (the kernel never prints to the traced process either).
//!
//! # Documented deviations
//! * `bpf_get_current_task` returns 0 (there is no `task_struct` in user space); CO-RE reads
//!   through it then fail like reads of a NULL pointer (`bpf_probe_read*` return `-EFAULT`).
//! * `bpf_probe_read_kernel*` read this process's memory, like the `_user` variants.
//! * `bpf_ringbuf_query`: `BPF_RB_AVAIL_DATA` and `BPF_RB_RING_SIZE` are answered;
//!   `BPF_RB_CONS_POS`/`BPF_RB_PROD_POS` return 0.
//! * `%p` prints the raw value (as `%px`): there is no pointer hashing to protect.
//! * A failing `bpf_tail_call` (empty slot, bad index, 33 tail calls done) returns `-ENOENT`
//!   and the program continues, as in the kernel (where r0 is then unspecified).

pub mod cgroup;
mod control;
mod dynptr;
mod jit_maps;
mod map;
pub mod printk;
pub mod probe;
mod ringbuf;
mod sink;
pub mod stack;
mod table;
mod task;
pub use task::TaskIdentity;
pub mod wire;

use std::sync::Arc;

use bpftime_abi::HelperId;
use thiserror::Error;

use crate::maps::{MapDef, MapError, MapHandle, MapType, ShmObject};
use crate::vm::insn::{
    Insn, BPF_PSEUDO_BTF_ID, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
    BPF_PSEUDO_MAP_VALUE,
};
use crate::vm::jit::JitProgram;
use crate::vm::{
    interpret, CallContext, HelperError, Helpers, InterpOptions, LddwReloc, MemoryBuffers,
    MemoryMap, Program, VmError,
};

pub use crate::vm::HelperFault;
pub use jit_maps::JitMaps;
pub use sink::{MemoryTraceSink, NullTraceSink, RingbufTraceSink, TraceSink};
pub use table::{
    check_helper_calls, check_helpers, is_supported, needs_no_run_reset, supported_helpers,
    UnknownHelper, POISON_HELPER,
};

/// Tag of map tokens (see the module docs): bits 32..63 of every token.
pub const MAP_TOKEN_TAG: u64 = 0xb9f1_0000_0000_0000;
const MAP_TOKEN_MASK: u64 = 0xffff_ffff_0000_0000;

/// The value `lddw rX, <map index>` loads.
pub fn map_token(index: usize) -> u64 {
    MAP_TOKEN_TAG | (index as u64 & !MAP_TOKEN_MASK)
}

/// The map index of a token, or `None` for any other value.
pub fn map_index(token: u64) -> Option<usize> {
    (token & MAP_TOKEN_MASK == MAP_TOKEN_TAG).then_some((token & !MAP_TOKEN_MASK) as usize)
}

pub use bpftime_abi::flags::BPF_F_RDONLY_PROG;
/// Maximum `nr_loops` of `bpf_loop`.
pub const BPF_MAX_LOOPS: u64 = 1 << 23;
/// Maximum chained tail calls (kernel `MAX_TAIL_CALL_CNT`).
pub const MAX_TAIL_CALLS: usize = crate::vm::program::MAX_TAIL_CALLS;

/// Name of the RINGBUF map that [`RingbufTraceSink`] writes `bpf_trace_printk` lines into.
pub const TRACE_MAP_NAME: &str = ".trace_printk";
/// Size of that ring.
pub const TRACE_MAP_SIZE: u32 = 256 * 1024;

/// Definition of the trace ring the loader adds to an object's maps (after the object's own
/// maps, so map indices are unchanged).
pub fn trace_map_def() -> MapDef {
    MapDef::new(MapType::Ringbuf, 0, 0, TRACE_MAP_SIZE, TRACE_MAP_NAME)
}

fn neg(errno: i32) -> u64 {
    (-(errno as i64)) as u64
}

fn neg_map(e: &MapError) -> u64 {
    neg(e.errno())
}

/// Errors of [`RuntimeHelpers::load_program`]: the program cannot be linked against these maps and helpers.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LinkError {
    /// Validation failed, or a pseudo `lddw` does not resolve against these maps (index out
    /// of range, a value reference outside a one-entry ARRAY).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The program calls a helper [`RuntimeHelpers`] does not implement.
    #[error(transparent)]
    UnknownHelper(#[from] UnknownHelper),
}

/// What the program was attached to, and what it asked of the attach point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachContext {
    /// `bpf_get_func_ip`: address of the probed function.
    pub func_ip: u64,
    /// `bpf_get_attach_cookie`.
    pub cookie: u64,
    /// Set by `bpf_override_return(ctx, rc)`: the hook should return `rc` instead of calling
    /// the function. Cleared by [`RuntimeHelpers::begin_run`].
    pub override_return: Option<u64>,
    /// The probe is on a function's first instruction and that instruction is `push %rbp`:
    /// the return address is still at the stack pointer, not yet in a frame, and user stacks
    /// include it (the kernel's `is_uprobe_at_func_entry`).
    pub frame_at_entry: bool,
}

/// Resolves the program index stored in a PROG_ARRAY slot to the program to tail-call.
pub type ProgramResolver = Arc<dyn Fn(u32) -> Option<Arc<Program>> + Send + Sync>;

struct Reservation {
    ptr: u64,
    len: u64,
    map: usize,
}

/// Runtime state of a program's helpers: its maps (by index), PROG_ARRAY targets, trace sink,
/// attach context, per-run state. No process-wide globals: every loaded program (or agent
/// thread) owns one.
pub struct RuntimeHelpers {
    maps: Arc<Vec<MapHandle>>,
    programs: Option<ProgramResolver>,
    trace: Box<dyn TraceSink>,
    attach: AttachContext,
    ncpu: u32,
    rng: u64,
    tail_calls: usize,
    reserved: Vec<Reservation>,
    /// [`map_set_id`] of `maps` (see [`Helpers::map_set_id`]).
    map_set: u64,
    /// Storage of the interpreter's memory map, reused run after run (an interpreter run
    /// registers the context and global data: two allocations per run otherwise).
    interp_buffers: MemoryBuffers,
    /// `bpf_spin_lock`s this run holds (addresses), released if the run ends holding one.
    spin_locks: Vec<u64>,
    /// The hook engine's thread slot's [`TaskIdentity`] and identity generation, when the
    /// helpers run on one (`bpf_get_current_pid_tgid` then asks the kernel only when the task
    /// may have changed).
    task_identity: Option<(&'static TaskIdentity, &'static std::sync::atomic::AtomicU64)>,
}

impl std::fmt::Debug for RuntimeHelpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHelpers")
            .field("maps", &self.maps.len())
            .field("attach", &self.attach)
            .finish()
    }
}

impl RuntimeHelpers {
    /// Helpers over `maps`, where `maps[i]` is the map an `lddw` with index (or fd) `i` names.
    pub fn new(maps: Vec<MapHandle>) -> Self {
        let seed = task::clock_ns(libc::CLOCK_MONOTONIC)
            ^ (u64::from(task::gettid()) << 32)
            ^ (&maps as *const _ as u64);
        Self {
            map_set: jit_maps::map_set_id(&maps),
            maps: Arc::new(maps),
            programs: None,
            trace: Box::new(NullTraceSink),
            attach: AttachContext::default(),
            ncpu: bpftime_abi::possible_cpus(),
            rng: seed | 1,
            tail_calls: 0,
            reserved: Vec::new(),
            interp_buffers: MemoryBuffers::default(),
            spin_locks: Vec::new(),
            task_identity: None,
        }
    }

    /// Runs on the thread slot whose [`TaskIdentity`] is `identity` and identity generation
    /// `generation` (see `bpftime_attach::hook::ThreadSlot::identity_generation`).
    pub fn set_task_identity(
        &mut self,
        identity: &'static TaskIdentity,
        generation: &'static std::sync::atomic::AtomicU64,
    ) {
        self.task_identity = Some((identity, generation));
    }

    /// Helpers over every map of `obj`, in the object's map order (the loader's map indices).
    pub fn from_object(obj: &ShmObject) -> Self {
        Self::new(obj.maps())
    }

    /// Send `bpf_trace_printk` lines to `sink`.
    pub fn with_trace_sink(mut self, sink: impl TraceSink + 'static) -> Self {
        self.trace = Box::new(sink);
        self
    }

    /// As [`with_trace_sink`](Self::with_trace_sink), in place.
    pub fn set_trace_sink(&mut self, sink: impl TraceSink + 'static) {
        self.trace = Box::new(sink);
    }

    /// Tail calls resolve PROG_ARRAY values through `f` (program index -> program).
    pub fn with_program_resolver(
        mut self,
        f: impl Fn(u32) -> Option<Arc<Program>> + Send + Sync + 'static,
    ) -> Self {
        self.programs = Some(Arc::new(f));
        self
    }

    /// Tail calls resolve PROG_ARRAY value `i` to `programs[i]`.
    pub fn with_programs(self, programs: Vec<Arc<Program>>) -> Self {
        self.with_program_resolver(move |i| programs.get(i as usize).cloned())
    }

    /// As [`with_program_resolver`](Self::with_program_resolver), in place.
    pub fn set_program_resolver(&mut self, r: ProgramResolver) {
        self.programs = Some(r);
    }

    /// The maps, by index.
    pub fn maps(&self) -> &[MapHandle] {
        &self.maps
    }

    /// The attach context: what the hook told the program, and `override_return` after a run.
    pub fn attach(&self) -> &AttachContext {
        &self.attach
    }

    /// The attach context, for a hook to set `func_ip` or `cookie` before a run.
    pub fn attach_mut(&mut self) -> &mut AttachContext {
        &mut self.attach
    }

    /// Replaces the whole attach context.
    pub fn set_attach(&mut self, a: AttachContext) {
        self.attach = a;
    }

    /// Resolver for [`Program::with_relocations`] (see the module docs on map tokens).
    pub fn resolve_lddw(&self, r: &LddwReloc) -> Result<u64, String> {
        let idx = r.imm as u32 as usize;
        let map = |what: &str| {
            self.maps.get(idx).ok_or_else(|| {
                format!(
                    "{what} names map {idx}, but the program has {} maps",
                    self.maps.len()
                )
            })
        };
        match r.src {
            BPF_PSEUDO_MAP_FD | BPF_PSEUDO_MAP_IDX => {
                map("map reference")?;
                Ok(map_token(idx))
            }
            BPF_PSEUDO_MAP_VALUE | BPF_PSEUDO_MAP_IDX_VALUE => {
                let m = map("map value reference")?;
                let d = m.def();
                if d.map_type != MapType::Array || d.max_entries != 1 {
                    return Err(format!(
                        "map value reference into `{}`, which is not a one-entry ARRAY",
                        m.name()
                    ));
                }
                let off = r.next_imm as u32;
                if off >= d.value_size {
                    return Err(format!(
                        "offset {off} is beyond the {}-byte value of `{}`",
                        d.value_size,
                        m.name()
                    ));
                }
                // Marks the value: the program may write global data through the address.
                let v = m
                    .lookup(&0u32.to_le_bytes())
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("`{}` has no value 0", m.name()))?;
                Ok(v.as_ptr() as u64 + u64::from(off))
            }
            BPF_PSEUDO_BTF_ID => Err("kernel symbols (BPF_PSEUDO_BTF_ID) do not exist in user \
                                      space"
                .into()),
            s => Err(format!("unknown lddw pseudo source {s}")),
        }
    }

    /// Relocate `insns` against these maps and check that every helper it calls exists. The
    /// program's JIT image gets the map fast paths ([`JitMaps`]) for these maps: helpers over
    /// the same maps (e.g. another `RuntimeHelpers::from_object` of the same object) use them.
    pub fn load_program(&self, insns: Vec<Insn>) -> Result<Program, LinkError> {
        let p = Program::with_relocations(insns, |r| self.resolve_lddw(r))?
            .with_jit_maps(Arc::new(self.jit_maps()));
        check_helpers(&p)?;
        Ok(p)
    }

    /// The JIT's direct entry points into these maps (see [`JitMaps`]).
    pub fn jit_maps(&self) -> JitMaps {
        JitMaps {
            maps: self.maps.clone(),
            id: self.map_set,
        }
    }

    /// Register the values of the one-entry ARRAY maps (global data, the targets of
    /// `BPF_PSEUDO_MAP_VALUE`) in `mem`, read-only for `BPF_F_RDONLY_PROG` maps, and keep the
    /// maps mapped as long as `mem` lives. Needed before an interpreter run.
    pub fn register_global_data(&self, mem: &mut MemoryMap<'_>) {
        mem.keep_alive(&self.maps);
        for m in self.maps.iter() {
            let d = m.def();
            if d.map_type != MapType::Array || d.max_entries != 1 {
                continue;
            }
            if let Ok(Some(v)) = m.lookup_unmarked(&0u32.to_le_bytes(), 0) {
                // SAFETY: the value lies in the object's shared mapping, which `mem` keeps
                // alive (keep_alive above); array values are never freed.
                unsafe {
                    mem.add_raw(
                        v.as_ptr() as u64,
                        v.len() as u64,
                        d.flags & BPF_F_RDONLY_PROG == 0,
                    )
                };
            }
        }
    }

    /// Reset the per-run state: tail-call count, override request, leftover reservations.
    #[inline]
    pub fn begin_run(&mut self) {
        self.tail_calls = 0;
        self.attach.override_return = None;
        self.end_run();
    }

    /// Discard ringbuf records the run reserved but neither submitted nor discarded (a run
    /// that aborted), so the consumer is not stalled. Inline: on every run, and nearly always
    /// there is nothing to discard.
    #[inline]
    pub fn end_run(&mut self) {
        if !self.reserved.is_empty() {
            self.discard_reserved();
        }
        if !self.spin_locks.is_empty() {
            control::release_spin_locks(self);
        }
    }

    #[cold]
    #[inline(never)]
    fn discard_reserved(&mut self) {
        for r in self.reserved.drain(..) {
            if let Some(rb) = self.maps[r.map].as_ringbuf() {
                let _ = rb.discard(r.ptr as *mut u8, 0);
            }
        }
    }

    /// Run `prog` on the interpreter with r1 = `ctx` (writable), r2 = its length.
    pub fn run_interpreter(
        &mut self,
        prog: &Program,
        ctx: &mut [u8],
        opts: InterpOptions,
    ) -> Result<u64, VmError> {
        let args = [ctx.as_mut_ptr() as u64, ctx.len() as u64, 0, 0, 0];
        let mut mem = MemoryMap::from_buffers(std::mem::take(&mut self.interp_buffers));
        self.register_global_data(&mut mem);
        mem.add_mut_slice(ctx);
        self.begin_run();
        let r = interpret(prog, args, &mut mem, self, opts);
        self.end_run();
        self.interp_buffers = mem.into_buffers();
        r
    }

    /// Run `prog` on the JIT with r1 = `ctx`, r2 = its length.
    ///
    /// # Safety
    /// As [`JitProgram::run`](crate::vm::jit::JitProgram::run): the program passed the kernel
    /// verifier (with `ctx` as large as the program type may read).
    // Inline: on the hot path of every hooked call (one call frame less per run).
    #[inline]
    pub unsafe fn run_jit(&mut self, prog: &Program, ctx: &mut [u8]) -> Result<u64, VmError> {
        let jit = prog.jit()?;
        // SAFETY: the caller's contract.
        unsafe { self.run_jit_image(jit, ctx) }
    }

    /// [`run_jit`](Self::run_jit) with the program's image at hand ([`Program::jit`]): for a
    /// caller that runs the same program on every call (a hook) and keeps the image.
    ///
    /// # Safety
    /// As [`run_jit`](Self::run_jit).
    #[inline]
    pub unsafe fn run_jit_image(
        &mut self,
        jit: &JitProgram,
        ctx: &mut [u8],
    ) -> Result<u64, VmError> {
        let args = [ctx.as_mut_ptr() as u64, ctx.len() as u64, 0, 0, 0];
        // Nothing is registered for the JIT (pointers are trusted, helpers register regions
        // and owners only on the checked interpreter), so nothing to keep alive and nothing
        // to free: the empty map is not dropped (an out-of-line drop-glue call per run), nor
        // handed to `release` by value (a copy of the whole struct right after its
        // field-by-field initialisation: store-forwarding stalls). Dropped only if a region
        // was registered after all.
        let mut mem = std::mem::ManuallyDrop::new(MemoryMap::new());
        self.begin_run();
        let map_set = Some(self.map_set);
        // SAFETY: the caller's contract; `map_set` is what `Helpers::map_set_id` returns.
        let r = unsafe { jit.run_with_map_set(args, &mut mem, self, map_set) };
        if !mem.regions().is_empty() {
            // SAFETY: `mem` is not used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut mem) };
        }
        self.end_run();
        // Rebuilt rather than moved: moving the 40-byte `Result` kept across `end_run` was a
        // wide copy of narrow stores (a store-forwarding stall, ~3 ns on every run).
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(e),
        }
    }

    /// The map index of a map token in argument `arg`.
    fn map_arg(&self, helper: HelperId, arg: u8, v: u64) -> Result<usize, HelperFault> {
        map_index(v)
            .filter(|&i| i < self.maps.len())
            .ok_or(HelperFault::BadMap {
                helper,
                arg,
                value: v,
            })
    }
}

/// `len` bytes of program memory at `addr` (argument `arg` of `helper`).
fn read_arg<'c>(
    ctx: &'c mut CallContext<'_, '_>,
    helper: HelperId,
    arg: u8,
    addr: u64,
    len: usize,
) -> Result<&'c [u8], HelperFault> {
    ctx.read_mem(addr, len).ok_or(HelperFault::BadPointer {
        helper,
        arg,
        addr,
        len,
    })
}

/// `len` writable bytes of program memory at `addr` (argument `arg` of `helper`).
fn write_arg<'c>(
    ctx: &'c mut CallContext<'_, '_>,
    helper: HelperId,
    arg: u8,
    addr: u64,
    len: usize,
) -> Result<&'c mut [u8], HelperFault> {
    ctx.write_mem(addr, len).ok_or(HelperFault::BadPointer {
        helper,
        arg,
        addr,
        len,
    })
}

/// Register a region for the interpreter only (the JIT trusts verified pointers).
fn register(ctx: &mut CallContext<'_, '_>, maps: &Arc<Vec<MapHandle>>, p: u64, len: u64, w: bool) {
    if ctx.is_checked() {
        let mem = ctx.memory();
        mem.keep_alive(maps);
        // SAFETY: `p..p+len` lies in the object's shared mapping, kept alive by `mem` (above).
        unsafe { mem.add_raw(p, len, w) };
    }
}

fn readonly(m: &MapHandle) -> bool {
    m.def().flags & BPF_F_RDONLY_PROG != 0
}

impl Helpers for RuntimeHelpers {
    fn map_set_id(&self) -> Option<u64> {
        Some(self.map_set)
    }

    #[inline]
    fn call(
        &mut self,
        id: u32,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        table::dispatch(self, id, a, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<RuntimeHelpers>();
    }

    #[test]
    fn every_supported_helper_answers_without_maps() {
        let mut h = RuntimeHelpers::new(Vec::new());
        for helper in supported_helpers() {
            let id = helper.0;
            assert!(helper.name().is_some(), "{id}");
            let mut mem = MemoryMap::new();
            let mut ctx = CallContext::new(0, &mut mem);
            // NULL/zero arguments: a result or a typed failure, never "unknown".
            let r = h.call(id, [0; 5], &mut ctx);
            assert_ne!(r, Err(HelperError::Unknown(id)), "{id}");
        }
        let mut mem = MemoryMap::new();
        let mut ctx = CallContext::new(0, &mut mem);
        assert_eq!(h.call(84, [0; 5], &mut ctx), Err(HelperError::Unknown(84)));
    }
}
