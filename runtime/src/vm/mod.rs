//! The project's eBPF VM: instruction model, assembler, bounds-checked interpreter, x86_64 JIT,
//! and an adapter for rbpf 0.4 as a second VM.

pub mod asm;
pub mod error;
pub mod helpers;
pub mod insn;
pub mod interp;
pub mod jit;
pub mod memory;
pub mod program;
pub mod rbpf;

pub use error::{AccessKind, HelperError, VmError};
pub use helpers::{CallContext, HelperFn, HelperTable, Helpers, NoHelpers};
pub use insn::Insn;
pub use interp::{interpret, InterpOptions};
pub use memory::{MemoryMap, Region};
pub use program::{LddwReloc, Program};
