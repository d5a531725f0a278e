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

pub mod printk;
pub mod probe;
pub mod wire;

use std::sync::{Arc, Mutex};

use bpftime_abi::HelperId;
use thiserror::Error;

use crate::maps::{self, MapDef, MapError, MapHandle, MapType, ShmObject};
use crate::vm::insn::{
    Insn, BPF_PSEUDO_BTF_ID, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
    BPF_PSEUDO_MAP_VALUE, CALL, LDDW,
};
use crate::vm::jit::{InlineArray, JitCall, JitMap, JitMapResolver, JitProgram};
use crate::vm::{
    interpret, CallContext, HelperError, Helpers, InterpOptions, LddwReloc, MemoryBuffers,
    MemoryMap, Program, VmError,
};

/// Every helper id [`RuntimeHelpers`] implements, ascending.
pub const SUPPORTED_HELPERS: &[HelperId] = &[
    HelperId::MAP_LOOKUP_ELEM,
    HelperId::MAP_UPDATE_ELEM,
    HelperId::MAP_DELETE_ELEM,
    HelperId::PROBE_READ,
    HelperId::KTIME_GET_NS,
    HelperId::TRACE_PRINTK,
    HelperId::GET_PRANDOM_U32,
    HelperId::GET_SMP_PROCESSOR_ID,
    HelperId::TAIL_CALL,
    HelperId::GET_CURRENT_PID_TGID,
    HelperId::GET_CURRENT_UID_GID,
    HelperId::GET_CURRENT_COMM,
    HelperId::PERF_EVENT_OUTPUT,
    HelperId::GET_CURRENT_TASK,
    HelperId::PROBE_WRITE_USER,
    HelperId::PROBE_READ_STR,
    HelperId::OVERRIDE_RETURN,
    HelperId::MAP_PUSH_ELEM,
    HelperId::MAP_POP_ELEM,
    HelperId::MAP_PEEK_ELEM,
    HelperId::PROBE_READ_USER,
    HelperId::PROBE_READ_KERNEL,
    HelperId::PROBE_READ_USER_STR,
    HelperId::PROBE_READ_KERNEL_STR,
    HelperId::KTIME_GET_BOOT_NS,
    HelperId::RINGBUF_OUTPUT,
    HelperId::RINGBUF_RESERVE,
    HelperId::RINGBUF_SUBMIT,
    HelperId::RINGBUF_DISCARD,
    HelperId::RINGBUF_QUERY,
    HelperId::KTIME_GET_COARSE_NS,
    HelperId::FOR_EACH_MAP_ELEM,
    HelperId::SNPRINTF,
    HelperId::GET_FUNC_IP,
    HelperId::GET_ATTACH_COOKIE,
    HelperId::TRACE_VPRINTK,
    HelperId::LOOP,
    HelperId::MAP_LOOKUP_PERCPU_ELEM,
    HelperId::KTIME_GET_TAI_NS,
];

/// Whether [`RuntimeHelpers`] implements helper `id`.
pub fn is_supported(id: u32) -> bool {
    SUPPORTED_HELPERS.binary_search(&HelperId(id)).is_ok()
}

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
/// The call a failed CO-RE relocation leaves in the program (see [`crate::object::core`]).
pub const POISON_HELPER: u32 = crate::object::POISON_HELPER as u32;

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

/// A helper call the program cannot continue after (the VM aborts the run with it).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HelperFault {
    #[error(
        "{helper}: argument r{arg} = {addr:#x} ({len} bytes) is not accessible program memory"
    )]
    BadPointer {
        helper: &'static str,
        arg: u8,
        addr: u64,
        len: usize,
    },
    #[error("{helper}: argument r{arg} = {value:#x} is not a map of this program")]
    BadMap {
        helper: &'static str,
        arg: u8,
        value: u64,
    },
    #[error("{helper}: {addr:#x} is not a reserved ringbuf record")]
    BadRecord { helper: &'static str, addr: u64 },
    #[error(
        "the program reached an instruction whose CO-RE relocation failed (helper {id:#x} at \
         instruction {pc})"
    )]
    CoreRelocation { id: u32, pc: usize },
}

impl From<HelperFault> for HelperError {
    fn from(e: HelperFault) -> Self {
        HelperError::Failed(e.to_string())
    }
}

/// A program calls a helper [`RuntimeHelpers`] does not implement (found at load time).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("helper {id} ({name}) is not supported at instruction {pc}")]
pub struct UnknownHelper {
    pub id: u32,
    /// `bpf_<name>` from the kernel's helper list, or `unknown`.
    pub name: String,
    pub pc: usize,
}

/// Load-time check: every `call <helper>` of `prog` is one [`RuntimeHelpers`] implements.
/// (Calls of the CO-RE poison helper are accepted: they fail only if reached.)
pub fn check_helpers(prog: &Program) -> Result<(), UnknownHelper> {
    check_helper_calls(prog.insns())
}

/// [`check_helpers`] on raw instructions.
pub fn check_helper_calls(insns: &[Insn]) -> Result<(), UnknownHelper> {
    let mut pc = 0;
    while pc < insns.len() {
        let i = insns[pc];
        if i.opc == CALL && i.src == 0 {
            let id = i.imm as u32;
            if !is_supported(id) && id != POISON_HELPER {
                return Err(UnknownHelper {
                    id,
                    name: HelperId(id).display_name(),
                    pc,
                });
            }
        }
        pc += if i.opc == LDDW { 2 } else { 1 };
    }
    Ok(())
}

/// Whether runs of `prog` can do without the per-run reset of the helpers' state
/// ([`RuntimeHelpers::begin_run`] / [`RuntimeHelpers::end_run`]): it calls none of the helpers
/// that keep state for the length of a run (tail calls, `bpf_override_return`, ringbuf
/// reservations) and makes no `callx` (which may reach any helper). Such a program may run from
/// a JIT hook entry (`vm::jit::JitHook`) that skips the reset.
pub fn needs_no_run_reset(prog: &Program) -> bool {
    const CALLX: u8 = 0x8d;
    let mut pc = 0;
    let insns = prog.insns();
    while pc < insns.len() {
        let i = insns[pc];
        if i.opc == CALLX
            || (i.opc == CALL
                && i.src == 0
                && matches!(
                    HelperId(i.imm as u32),
                    HelperId::TAIL_CALL
                        | HelperId::OVERRIDE_RETURN
                        | HelperId::RINGBUF_RESERVE
                        | HelperId::RINGBUF_SUBMIT
                        | HelperId::RINGBUF_DISCARD
                ))
        {
            return false;
        }
        pc += if i.opc == LDDW { 2 } else { 1 };
    }
    true
}

/// Errors of [`RuntimeHelpers::load_program`].
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LoadError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    UnknownHelper(#[from] UnknownHelper),
}

/// Where `bpf_trace_printk` lines go.
pub trait TraceSink: Send {
    /// One formatted line (without its trailing newline).
    fn emit(&mut self, line: &[u8]);
}

impl<F: FnMut(&[u8]) + Send> TraceSink for F {
    fn emit(&mut self, line: &[u8]) {
        self(line)
    }
}

/// Discards lines (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTraceSink;

impl TraceSink for NullTraceSink {
    fn emit(&mut self, _line: &[u8]) {}
}

/// Collects lines in memory (shared: clone it before handing it to the helpers).
#[derive(Debug, Default, Clone)]
pub struct MemoryTraceSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl MemoryTraceSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lines so far, lossily decoded.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// Remove and return the lines so far.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TraceSink for MemoryTraceSink {
    fn emit(&mut self, line: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.to_vec());
    }
}

/// Writes each line as one record into a RINGBUF map (normally [`TRACE_MAP_NAME`]), where a
/// consumer in any process (the CLI's `load`) reads them. A full ring drops the line (counted
/// in the map's `lost` counter), as the kernel's trace buffer overwrites.
#[derive(Debug, Clone)]
pub struct RingbufTraceSink(MapHandle);

impl RingbufTraceSink {
    /// Sink into `map`, which must be a RINGBUF.
    pub fn new(map: MapHandle) -> Result<Self, MapError> {
        if map.map_type() != MapType::Ringbuf {
            return Err(MapError::InvalidDef {
                map: map.name().to_string(),
                reason: "the trace sink needs a RINGBUF map".into(),
            });
        }
        Ok(Self(map))
    }

    /// Sink into the object's [`TRACE_MAP_NAME`] map.
    pub fn from_object(obj: &ShmObject) -> Result<Self, MapError> {
        Self::new(obj.map(TRACE_MAP_NAME)?)
    }
}

impl TraceSink for RingbufTraceSink {
    fn emit(&mut self, line: &[u8]) {
        // A full ring loses the line; the map counts it.
        let _ = self.0.ringbuf_output(line, 0);
    }
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
}

impl std::fmt::Debug for RuntimeHelpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHelpers")
            .field("maps", &self.maps.len())
            .field("attach", &self.attach)
            .finish()
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock ids used are supported by Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The calling thread's name (`comm`), up to 15 bytes.
fn current_comm() -> Vec<u8> {
    let mut buf = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (incl. NUL) into the buffer.
    let rc = unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) };
    if rc != 0 {
        return Vec::new();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(16);
    buf[..n].to_vec()
}

impl RuntimeHelpers {
    /// Helpers over `maps`, where `maps[i]` is the map an `lddw` with index (or fd) `i` names.
    pub fn new(maps: Vec<MapHandle>) -> Self {
        let seed = clock_ns(libc::CLOCK_MONOTONIC)
            ^ (u64::from(gettid()) << 32)
            ^ (&maps as *const _ as u64);
        Self {
            map_set: map_set_id(&maps),
            maps: Arc::new(maps),
            programs: None,
            trace: Box::new(NullTraceSink),
            attach: AttachContext::default(),
            ncpu: maps::possible_cpus(),
            rng: seed | 1,
            tail_calls: 0,
            reserved: Vec::new(),
            interp_buffers: MemoryBuffers::default(),
        }
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

    pub fn set_program_resolver(&mut self, r: ProgramResolver) {
        self.programs = Some(r);
    }

    /// The maps, by index.
    pub fn maps(&self) -> &[MapHandle] {
        &self.maps
    }

    pub fn attach(&self) -> &AttachContext {
        &self.attach
    }

    pub fn attach_mut(&mut self) -> &mut AttachContext {
        &mut self.attach
    }

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
    pub fn load_program(&self, insns: Vec<Insn>) -> Result<Program, LoadError> {
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
    }

    #[cold]
    #[inline(never)]
    fn discard_reserved(&mut self) {
        for r in self.reserved.drain(..) {
            let _ = self.maps[r.map].ringbuf_discard(r.ptr as *mut u8, 0);
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

    fn map_arg(&self, helper: &'static str, arg: u8, v: u64) -> Result<usize, HelperFault> {
        map_index(v)
            .filter(|&i| i < self.maps.len())
            .ok_or(HelperFault::BadMap {
                helper,
                arg,
                value: v,
            })
    }

    fn next_random(&mut self) -> u32 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

/// Identity of a map set for [`Helpers::map_set_id`]: equal exactly when the handles name the
/// same maps through the same mappings, in the same order. Ids come from a counter and are
/// never reused; the table is emptied when it grows large (a set interned again then gets a
/// new id, so images compiled against the old one only lose their fast paths).
fn map_set_id(maps: &[MapHandle]) -> u64 {
    use std::collections::HashMap;
    struct Table {
        ids: HashMap<Vec<usize>, u64>,
        next: u64,
    }
    static TABLE: Mutex<Option<Table>> = Mutex::new(None);
    let key: Vec<usize> = maps.iter().map(MapHandle::identity).collect();
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let t = guard.get_or_insert_with(|| Table {
        ids: HashMap::new(),
        next: 1,
    });
    if let Some(&id) = t.ids.get(&key) {
        return id;
    }
    if t.ids.len() >= 4096 {
        t.ids.clear();
    }
    let id = t.next;
    t.next += 1;
    t.ids.insert(key, id);
    id
}

/// The JIT's direct entry points into a helper set's maps ([`JitMapResolver`]): lookups,
/// updates and deletes on HASH/ARRAY maps (all variants) skip the helper trampoline, the
/// `dyn Helpers` dispatch and the `CallContext`, and ARRAY lookups are inlined. They do what
/// [`RuntimeHelpers`]'s `bpf_map_*_elem` do on the JIT (the JIT registers no regions and
/// trusts verified pointers; a NULL or wrapping argument fails the same way).
pub struct JitMaps {
    maps: Arc<Vec<MapHandle>>,
    id: u64,
}

impl JitMapResolver for JitMaps {
    fn map_set_id(&self) -> u64 {
        self.id
    }

    fn resolve(&self, token: u64) -> Option<JitMap> {
        let m = self.maps.get(map_index(token)?)?;
        let t = m.map_type();
        if !(t.is_hash() || t.is_array()) {
            // Other types: the generic helper (errors, queue/stack semantics).
            return None;
        }
        let inline_array = m
            .inline_array_layout()
            .map(|(values, stride, marks, mark_bit)| InlineArray {
                values,
                stride,
                max_entries: m.def().max_entries,
                marks,
                mark_bit,
            });
        // Plain (not per-CPU) hash maps, the common case, go straight to the hash code: no
        // key-size check (the slice is built with the key size), no CPU lookup, no `Result`.
        let plain_hash = t.is_hash() && !t.is_percpu();
        Some(JitMap {
            // Points into `self.maps`, which the JIT image keeps alive with this resolver.
            handle: m as *const MapHandle as *const (),
            lookup: Some(if plain_hash {
                jit_hash_lookup
            } else {
                jit_map_lookup
            }),
            update: Some(if plain_hash {
                jit_hash_update
            } else {
                jit_map_update
            }),
            delete: Some(jit_map_delete),
            inline_array,
        })
    }
}

/// `len` bytes of a verified program's memory at `addr` (as `CallContext::read_mem` on the
/// JIT), or the fault the generic helper would report.
///
/// # Safety
/// The program passed the kernel verifier, which checked `[addr, addr+len)` for the call.
unsafe fn jit_arg<'a>(
    helper: &'static str,
    arg: u8,
    addr: u64,
    len: usize,
) -> Result<&'a [u8], HelperFault> {
    if addr == 0 || addr.checked_add(len as u64).is_none() {
        return Err(HelperFault::BadPointer {
            helper,
            arg,
            addr,
            len,
        });
    }
    // SAFETY: see the function contract.
    Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
}

/// Runs a fast map helper on the map handle `map`: panics and faults abort the program as
/// through the trampoline.
///
/// # Safety
/// `map` is a handle from `JitMaps::resolve` (kept alive by the JIT image) and `call` the
/// [`JitCall`] the JIT passed; the JIT only runs verified programs.
#[inline(always)]
unsafe fn jit_map_op(
    call: *mut JitCall,
    map: *const (),
    id: u32,
    f: impl FnOnce(&MapHandle) -> Result<u64, HelperFault>,
) -> u64 {
    // SAFETY: the caller's contract.
    let m = unsafe { &*(map as *const MapHandle) };
    let error = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(m))) {
        Ok(Ok(v)) => return v,
        Ok(Err(fault)) => fault.into(),
        Err(_) => HelperError::Failed("helper panicked".into()),
    };
    // SAFETY: the caller's contract.
    unsafe { JitCall::fail(call, id, error) };
    0
}

/// The key argument (r2) of a map helper called from JIT code.
///
/// # Safety
/// As [`jit_arg`].
#[inline(always)]
unsafe fn jit_key<'a>(
    helper: &'static str,
    m: &MapHandle,
    key: u64,
) -> Result<&'a [u8], HelperFault> {
    // SAFETY: the caller's contract.
    unsafe { jit_arg(helper, 2, key, m.def().key_size as usize) }
}

/// The key and value arguments (r2, r3) of `bpf_map_update_elem` called from JIT code.
///
/// # Safety
/// As [`jit_arg`].
#[inline(always)]
unsafe fn jit_update_args<'a>(
    m: &MapHandle,
    key: u64,
    value: u64,
) -> Result<(&'a [u8], &'a [u8]), HelperFault> {
    const N: &str = "bpf_map_update_elem";
    // SAFETY: the caller's contract.
    unsafe {
        Ok((
            jit_key(N, m, key)?,
            jit_arg(N, 3, value, m.def().value_size as usize)?,
        ))
    }
}

/// r0 of an update or delete: 0, or the negative errno.
fn status(r: Result<(), MapError>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => neg_map(&e),
    }
}

/// `bpf_map_lookup_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_lookup(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: the JIT's call of a fast path (see `jit_map_op`).
    unsafe {
        jit_map_op(call, map, HelperId::MAP_LOOKUP_ELEM.0, |m| {
            let key = jit_key("bpf_map_lookup_elem", m, key)?;
            Ok(match m.lookup(key) {
                Ok(Some(v)) => v.as_ptr() as u64,
                _ => 0,
            })
        })
    }
}

/// [`jit_map_lookup`] for a HASH or LRU_HASH map.
unsafe extern "C" fn jit_hash_lookup(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_LOOKUP_ELEM.0, |m| {
            let key = jit_key("bpf_map_lookup_elem", m, key)?;
            Ok(m.hash_lookup(key, 0).map_or(0, |p| p as u64))
        })
    }
}

/// [`jit_map_update`] for a HASH or LRU_HASH map.
unsafe extern "C" fn jit_hash_update(
    map: *const (),
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_UPDATE_ELEM.0, |m| {
            let (key, value) = jit_update_args(m, key, value)?;
            Ok(status(m.hash_update(key, value, flags, None)))
        })
    }
}

/// `bpf_map_update_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_update(
    map: *const (),
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_UPDATE_ELEM.0, |m| {
            let (key, value) = jit_update_args(m, key, value)?;
            Ok(status(m.update(key, value, flags)))
        })
    }
}

/// `bpf_map_delete_elem` for JIT code (see [`JitMaps`]).
unsafe extern "C" fn jit_map_delete(
    map: *const (),
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    call: *mut JitCall,
) -> u64 {
    // SAFETY: as in `jit_map_lookup`.
    unsafe {
        jit_map_op(call, map, HelperId::MAP_DELETE_ELEM.0, |m| {
            Ok(status(m.delete(jit_key("bpf_map_delete_elem", m, key)?)))
        })
    }
}

/// `len` bytes of program memory at `addr` (argument `arg` of `helper`).
fn read_arg<'c>(
    ctx: &'c mut CallContext<'_, '_>,
    helper: &'static str,
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

fn write_arg<'c>(
    ctx: &'c mut CallContext<'_, '_>,
    helper: &'static str,
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

    fn call(
        &mut self,
        id: u32,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        use HelperId as H;
        Ok(match HelperId(id) {
            H::MAP_LOOKUP_ELEM | H::MAP_LOOKUP_PERCPU_ELEM => {
                let name = if HelperId(id) == H::MAP_LOOKUP_ELEM {
                    "bpf_map_lookup_elem"
                } else {
                    "bpf_map_lookup_percpu_elem"
                };
                let idx = self.map_arg(name, 1, a[0])?;
                let m = &self.maps[idx];
                let ks = m.def().key_size as usize;
                let key = read_arg(ctx, name, 2, a[1], ks)?;
                let found = if HelperId(id) == H::MAP_LOOKUP_ELEM {
                    m.lookup(key)
                } else if !m.map_type().is_percpu() {
                    return Ok(0);
                } else {
                    m.lookup_cpu(key, a[2] as u32)
                };
                match found {
                    Ok(Some(v)) => {
                        let p = v.as_ptr() as u64;
                        register(ctx, &self.maps, p, v.len() as u64, !readonly(m));
                        p
                    }
                    _ => 0,
                }
            }
            H::MAP_UPDATE_ELEM => {
                const N: &str = "bpf_map_update_elem";
                let idx = self.map_arg(N, 1, a[0])?;
                let m = &self.maps[idx];
                let (ks, vs) = (m.def().key_size as usize, m.def().value_size as usize);
                let Some((key, val)) = ctx.read_mem2((a[1], ks), (a[2], vs)) else {
                    // Name the argument that is bad.
                    let (arg, addr, len) = if ctx.read_mem(a[1], ks).is_none() {
                        (2, a[1], ks)
                    } else {
                        (3, a[2], vs)
                    };
                    return Err(HelperFault::BadPointer {
                        helper: N,
                        arg,
                        addr,
                        len,
                    }
                    .into());
                };
                match m.update(key, val, a[3]) {
                    Ok(()) => 0,
                    Err(e) => neg_map(&e),
                }
            }
            H::MAP_DELETE_ELEM => {
                const N: &str = "bpf_map_delete_elem";
                let idx = self.map_arg(N, 1, a[0])?;
                let m = &self.maps[idx];
                let key = read_arg(ctx, N, 2, a[1], m.def().key_size as usize)?;
                match m.delete(key) {
                    Ok(()) => 0,
                    Err(e) => neg_map(&e),
                }
            }
            H::MAP_PUSH_ELEM => {
                const N: &str = "bpf_map_push_elem";
                let idx = self.map_arg(N, 1, a[0])?;
                let m = &self.maps[idx];
                if !matches!(m.map_type(), MapType::Queue | MapType::Stack) {
                    return Ok(neg(libc::EINVAL));
                }
                let val = read_arg(ctx, N, 2, a[1], m.def().value_size as usize)?;
                match m.push(val, a[2]) {
                    Ok(()) => 0,
                    Err(e) => neg_map(&e),
                }
            }
            H::MAP_POP_ELEM | H::MAP_PEEK_ELEM => {
                let n = if HelperId(id) == H::MAP_POP_ELEM {
                    "bpf_map_pop_elem"
                } else {
                    "bpf_map_peek_elem"
                };
                let idx = self.map_arg(n, 1, a[0])?;
                let m = &self.maps[idx];
                if !matches!(m.map_type(), MapType::Queue | MapType::Stack) {
                    return Ok(neg(libc::EINVAL));
                }
                let out = write_arg(ctx, n, 2, a[1], m.def().value_size as usize)?;
                let r = if HelperId(id) == H::MAP_POP_ELEM {
                    m.pop()
                } else {
                    m.peek()
                };
                match r {
                    Ok(v) => {
                        out.copy_from_slice(&v[..out.len()]);
                        0
                    }
                    Err(e) => neg_map(&e),
                }
            }
            H::PROBE_READ | H::PROBE_READ_USER | H::PROBE_READ_KERNEL => {
                let len = a[1] as u32 as usize;
                let dst = write_arg(ctx, "bpf_probe_read", 1, a[0], len)?;
                if probe::read(a[2], dst) {
                    0
                } else {
                    dst.fill(0);
                    neg(libc::EFAULT)
                }
            }
            H::PROBE_READ_STR | H::PROBE_READ_USER_STR | H::PROBE_READ_KERNEL_STR => {
                let len = a[1] as u32 as usize;
                let dst = write_arg(ctx, "bpf_probe_read_str", 1, a[0], len)?;
                match probe::read_str(a[2], dst) {
                    Some(n) => n as u64,
                    None => {
                        dst.fill(0);
                        neg(libc::EFAULT)
                    }
                }
            }
            H::PROBE_WRITE_USER => {
                let len = a[2] as u32 as usize;
                let src = read_arg(ctx, "bpf_probe_write_user", 2, a[1], len)?;
                if probe::write(a[0], src) {
                    0
                } else {
                    neg(libc::EFAULT)
                }
            }
            H::KTIME_GET_NS => clock_ns(libc::CLOCK_MONOTONIC),
            H::KTIME_GET_BOOT_NS => clock_ns(libc::CLOCK_BOOTTIME),
            H::KTIME_GET_COARSE_NS => clock_ns(libc::CLOCK_MONOTONIC_COARSE),
            H::KTIME_GET_TAI_NS => clock_ns(libc::CLOCK_TAI),
            H::GET_PRANDOM_U32 => u64::from(self.next_random()),
            H::GET_SMP_PROCESSOR_ID => u64::from(maps::current_cpu(self.ncpu)),
            H::GET_CURRENT_PID_TGID => {
                // SAFETY: getpid has no preconditions.
                let tgid = unsafe { libc::getpid() } as u32;
                (u64::from(tgid) << 32) | u64::from(gettid())
            }
            H::GET_CURRENT_UID_GID => {
                // SAFETY: getuid/getgid have no preconditions.
                let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                (u64::from(gid) << 32) | u64::from(uid)
            }
            H::GET_CURRENT_COMM => {
                let comm = current_comm();
                let out = write_arg(ctx, "bpf_get_current_comm", 1, a[0], a[1] as u32 as usize)?;
                // strscpy_pad: at most len-1 bytes, NUL-terminated, zero-padded.
                out.fill(0);
                if !out.is_empty() {
                    let n = comm.len().min(out.len() - 1);
                    out[..n].copy_from_slice(&comm[..n]);
                }
                0
            }
            H::GET_CURRENT_TASK => 0,
            H::TRACE_PRINTK => {
                let fmt = read_arg(ctx, "bpf_trace_printk", 1, a[0], a[1] as u32 as usize)?;
                self.printk(fmt, &a[2..5])
            }
            H::TRACE_VPRINTK | H::SNPRINTF => self.vprintk(id, a, ctx)?,
            H::RINGBUF_OUTPUT => {
                const N: &str = "bpf_ringbuf_output";
                let idx = self.map_arg(N, 1, a[0])?;
                let data = read_arg(ctx, N, 2, a[1], a[2] as usize)?;
                match self.maps[idx].ringbuf_output(data, a[3]) {
                    Ok(()) => 0,
                    Err(e) => neg_map(&e),
                }
            }
            H::RINGBUF_RESERVE => {
                let idx = self.map_arg("bpf_ringbuf_reserve", 1, a[0])?;
                match self.maps[idx].ringbuf_reserve(a[1], a[2]) {
                    Some(p) => {
                        let p = p as u64;
                        register(ctx, &self.maps, p, a[1], true);
                        self.reserved.push(Reservation {
                            ptr: p,
                            len: a[1],
                            map: idx,
                        });
                        p
                    }
                    None => 0,
                }
            }
            H::RINGBUF_SUBMIT | H::RINGBUF_DISCARD => {
                let n = if HelperId(id) == H::RINGBUF_SUBMIT {
                    "bpf_ringbuf_submit"
                } else {
                    "bpf_ringbuf_discard"
                };
                let pos = self.reserved.iter().position(|r| r.ptr == a[0]).ok_or(
                    HelperFault::BadRecord {
                        helper: n,
                        addr: a[0],
                    },
                )?;
                let r = self.reserved.swap_remove(pos);
                if ctx.is_checked() {
                    ctx.memory().remove(r.ptr, r.len);
                }
                let m = &self.maps[r.map];
                let res = if HelperId(id) == H::RINGBUF_SUBMIT {
                    m.ringbuf_submit(r.ptr as *mut u8, a[1])
                } else {
                    m.ringbuf_discard(r.ptr as *mut u8, a[1])
                };
                res.map_err(|e| HelperError::Failed(e.to_string()))?;
                0
            }
            H::RINGBUF_QUERY => {
                let idx = self.map_arg("bpf_ringbuf_query", 1, a[0])?;
                let m = &self.maps[idx];
                match a[1] {
                    0 => m.ring_pending(0),
                    1 => u64::from(m.def().max_entries),
                    _ => 0,
                }
            }
            H::PERF_EVENT_OUTPUT => {
                const N: &str = "bpf_perf_event_output";
                let idx = self.map_arg(N, 2, a[1])?;
                let data = read_arg(ctx, N, 4, a[3], a[4] as usize)?;
                match self.maps[idx].perf_event_output(a[2], data) {
                    Ok(()) => 0,
                    Err(e) => neg_map(&e),
                }
            }
            H::GET_FUNC_IP => self.attach.func_ip,
            H::GET_ATTACH_COOKIE => self.attach.cookie,
            H::OVERRIDE_RETURN => {
                self.attach.override_return = Some(a[1]);
                0
            }
            H::TAIL_CALL => {
                let idx = self.map_arg("bpf_tail_call", 2, a[1])?;
                let m = &self.maps[idx];
                let target = (self.tail_calls < MAX_TAIL_CALLS)
                    .then(|| m.prog_array_get(a[2] as u32))
                    .flatten()
                    .and_then(|p| self.programs.as_ref().and_then(|r| r(p)));
                match target {
                    Some(p) => {
                        self.tail_calls += 1;
                        ctx.tail_call(p);
                        0
                    }
                    None => neg(libc::ENOENT),
                }
            }
            H::LOOP => {
                if a[3] != 0 {
                    return Ok(neg(libc::EINVAL));
                }
                if a[0] > BPF_MAX_LOOPS {
                    return Ok(neg(libc::E2BIG));
                }
                let mut i = 0;
                while i < a[0] {
                    let r = ctx.call_function(self, a[1], [i, a[2], 0, 0, 0])?;
                    i += 1;
                    if r != 0 {
                        break;
                    }
                }
                i
            }
            H::FOR_EACH_MAP_ELEM => self.for_each_map_elem(a, ctx)?,
            HelperId(POISON_HELPER) => {
                return Err(HelperFault::CoreRelocation { id, pc: ctx.pc() }.into());
            }
            _ => return Err(HelperError::Unknown(id)),
        })
    }
}

impl RuntimeHelpers {
    /// `bpf_trace_vprintk(fmt, fmt_size, data, data_len)` and
    /// `bpf_snprintf(str, str_size, fmt, data, data_len)`.
    #[inline(never)]
    fn vprintk(
        &mut self,
        id: u32,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperFault> {
        let snprintf = HelperId(id) == HelperId::SNPRINTF;
        let (fmt_at, data_at) = if snprintf { (2, 3) } else { (0, 2) };
        let n = if snprintf {
            "bpf_snprintf"
        } else {
            "bpf_trace_vprintk"
        };
        let data_len = a[data_at + 1] as u32 as usize;
        if !data_len.is_multiple_of(8) || data_len > 12 * 8 {
            return Ok(neg(libc::EINVAL));
        }
        let data = read_arg(ctx, n, data_at as u8 + 1, a[data_at], data_len)?;
        let args: Vec<u64> = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let fmt = if snprintf {
            // A constant string (the verifier requires read-only map memory) of
            // unknown length: read up to the kernel's limit.
            let mut v = vec![0u8; printk::MAX_OUTPUT];
            let n = probe::read_str(a[fmt_at], &mut v).unwrap_or(0);
            v.truncate(n);
            v
        } else {
            read_arg(ctx, n, 1, a[0], a[1] as u32 as usize)?.to_vec()
        };
        if snprintf {
            self.snprintf(ctx, a[0], a[1] as u32 as usize, &fmt, &args)
        } else {
            Ok(self.printk(&fmt, &args))
        }
    }

    #[inline(never)]
    fn printk(&mut self, fmt: &[u8], args: &[u64]) -> u64 {
        let Ok(fmt) = printk::terminated(fmt) else {
            return neg(libc::EINVAL);
        };
        match printk::format(fmt, args, read_str) {
            Ok(mut line) => {
                let n = line.len() as u64;
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                self.trace.emit(&line);
                n
            }
            Err(_) => neg(libc::EINVAL),
        }
    }

    #[inline(never)]
    fn snprintf(
        &mut self,
        ctx: &mut CallContext<'_, '_>,
        dst: u64,
        size: usize,
        fmt: &[u8],
        args: &[u64],
    ) -> Result<u64, HelperFault> {
        let Ok(fmt) = printk::terminated(fmt) else {
            return Ok(neg(libc::EINVAL));
        };
        let out = write_arg(ctx, "bpf_snprintf", 1, dst, size)?;
        match printk::format(fmt, args, read_str) {
            Ok(s) => {
                if !out.is_empty() {
                    let n = s.len().min(out.len() - 1);
                    out[..n].copy_from_slice(&s[..n]);
                    out[n] = 0;
                }
                Ok(s.len() as u64 + 1)
            }
            Err(_) => {
                if let Some(b) = out.first_mut() {
                    *b = 0;
                }
                Ok(neg(libc::EINVAL))
            }
        }
    }

    #[inline(never)]
    fn for_each_map_elem(
        &mut self,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        let idx = self.map_arg("bpf_for_each_map_elem", 1, a[0])?;
        if a[3] != 0 {
            return Ok(neg(libc::EINVAL));
        }
        let m = self.maps[idx].clone();
        let t = m.map_type();
        if !(t.is_hash() || t.is_array()) {
            return Ok(neg(libc::EINVAL));
        }
        let cpu = if t.is_percpu() {
            maps::current_cpu(self.ncpu)
        } else {
            0
        };
        let (ks, vs) = (u64::from(m.def().key_size), u64::from(m.def().value_size));
        let writable = !readonly(&m);
        let maps = self.maps.clone();
        let mut failed = None;
        let n = m.for_each_ptr(cpu, |k, v| {
            let (k, v) = (k as u64, v as u64);
            // Register key and value for the callback only (the key may live on the
            // iterator's stack); keep registrations that existed before.
            let mut added = Vec::new();
            if ctx.is_checked() {
                let mem = ctx.memory();
                mem.keep_alive(&maps);
                for (p, len, w) in [(k, ks, false), (v, vs, writable)] {
                    if !mem.regions().iter().any(|r| r.start == p && r.len == len) {
                        // SAFETY: the key and value stay valid until this closure returns
                        // (the iterator holds them; values live in the mapping `mem` keeps
                        // alive); both are removed again below.
                        unsafe { mem.add_raw(p, len, w) };
                        added.push((p, len));
                    }
                }
            }
            let r = ctx.call_function(self, a[1], [a[0], k, v, a[2], 0]);
            for (p, len) in added {
                ctx.memory().remove(p, len);
            }
            match r {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(n),
        }
    }
}

/// `%s` argument reader: up to `max` bytes of a string anywhere in the process.
fn read_str(addr: u64, max: usize) -> Option<Vec<u8>> {
    let mut v = vec![0u8; max];
    let n = probe::read_str(addr, &mut v)?;
    v.truncate(n.saturating_sub(1));
    Some(v)
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
    fn supported_table_is_sorted_named_and_implemented() {
        assert!(SUPPORTED_HELPERS.windows(2).all(|w| w[0] < w[1]));
        let mut h = RuntimeHelpers::new(Vec::new());
        for &helper in SUPPORTED_HELPERS {
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
        assert_eq!(h.call(27, [0; 5], &mut ctx), Err(HelperError::Unknown(27)));
    }
}
