//! The project's eBPF VM: instruction model, assembler, bounds-checked interpreter, x86_64 JIT,
//! and an adapter for rbpf 0.4 as a second VM.
//!
//! * [`Program`] validates instructions (ISA v1-v4) and resolves `lddw` pseudo sources: map
//!   fds/indices/values and BTF ids through a caller-provided resolver
//!   ([`Program::with_relocations`] with an [`LddwReloc`]), `BPF_PSEUDO_FUNC` internally (to a
//!   tagged value that `callx` understands).
//! * [`interpret`] runs a program with every load/store/atomic checked against the program's
//!   stack frames and the regions of a [`MemoryMap`] (context, packet, `-- mem`, and regions
//!   helpers register during the run via [`CallContext::memory`]). Faults are
//!   [`VmError::MemoryFault`] naming the instruction and the address.
//! * [`jit::JitProgram`] (via [`Program::jit`]) is the x86_64 JIT for verified programs:
//!   unchecked memory access, per-frame native stacks, helpers through a trampoline into the
//!   same [`Helpers`], except map lookups/updates/deletes on maps known at JIT time, which call
//!   the map directly or are inlined (ARRAY lookups; see [`jit`]'s map fast paths and
//!   [`Program::with_jit_maps`]).
//! * Helpers: implement [`Helpers`] (stateful, `&mut self`), or use a [`HelperTable`] of
//!   closures. A helper can read program memory and register regions through its
//!   [`CallContext`], request a tail call with [`CallContext::tail_call`], and run a BPF
//!   callback (`bpf_loop`, `bpf_for_each_map_elem`) with [`CallContext::call_function`] on the
//!   same VM (interpreter or JIT) in a fresh frame. The runtime's helper library is
//!   [`crate::helpers::RuntimeHelpers`].
//! * [`rbpf`] runs programs on rbpf 0.4 when every instruction is one rbpf runs correctly.

pub mod asm;
pub mod error;
pub mod helpers;
pub mod insn;
pub mod interp;
pub mod jit;
pub mod memory;
pub mod program;
pub mod rbpf;

pub use error::{AccessKind, HelperError, HelperFault, VmError};
pub use helpers::{CallContext, HelperFn, HelperTable, Helpers, NoHelpers};
pub use insn::Insn;
pub use interp::{interpret, InterpOptions};
pub use memory::{MemoryBuffers, MemoryMap, Region};
pub use program::{LddwReloc, Program};

/// Which VM runs a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmKind {
    /// The bounds-checked interpreter (the safe default without a verifier).
    Interpreter,
    /// The x86_64 JIT (for programs the kernel verifier accepted).
    #[default]
    Jit,
    /// rbpf 0.4's JIT, for programs it can run (see [`rbpf::rbpf_check`]).
    Rbpf,
    /// rbpf 0.4's interpreter.
    RbpfInterpreter,
}

impl std::str::FromStr for VmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "interpreter" | "interp" => VmKind::Interpreter,
            "jit" => VmKind::Jit,
            "rbpf" | "rbpf-jit" => VmKind::Rbpf,
            "rbpf-interpreter" | "rbpf-interp" => VmKind::RbpfInterpreter,
            _ => {
                return Err(format!(
                    "unknown VM '{s}' (interpreter, jit, rbpf, rbpf-interpreter)"
                ))
            }
        })
    }
}

/// Run `prog` with r1 = `ctx` (registered as a writable region) and r2 = its length.
///
/// # Safety
/// With [`VmKind::Jit`] and [`VmKind::Rbpf`] memory accesses are unchecked: the program must
/// have passed the kernel verifier (or otherwise only touch valid memory). The interpreter
/// kinds check every access (rbpf's interpreter only the start address).
pub unsafe fn run_with_ctx<'a>(
    kind: VmKind,
    prog: &Program,
    ctx: &'a mut [u8],
    mem: &mut MemoryMap<'a>,
    helpers: &mut dyn Helpers,
    opts: InterpOptions,
) -> Result<u64, VmError> {
    let (ptr, len) = (ctx.as_mut_ptr() as u64, ctx.len() as u64);
    match kind {
        VmKind::Interpreter | VmKind::Jit => {
            mem.add_mut_slice(ctx);
            let args = [ptr, len, 0, 0, 0];
            if kind == VmKind::Interpreter {
                interpret(prog, args, mem, helpers, opts)
            } else {
                // SAFETY: see the function contract.
                unsafe { prog.jit()?.run(args, mem, helpers) }
            }
        }
        VmKind::Rbpf | VmKind::RbpfInterpreter => {
            let mode = if kind == VmKind::Rbpf {
                rbpf::RbpfMode::Jit
            } else {
                rbpf::RbpfMode::Interpreter
            };
            // SAFETY: see the function contract.
            unsafe { rbpf::run_rbpf(prog, ctx, mem, helpers, mode) }
        }
    }
}
