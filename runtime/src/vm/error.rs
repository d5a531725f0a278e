//! Typed errors of the VM layer.

use thiserror::Error;

/// Kind of a memory access, for fault reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    Load,
    Store,
    Atomic,
}

impl std::fmt::Display for AccessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessKind::Load => "load",
            AccessKind::Store => "store",
            AccessKind::Atomic => "atomic",
        })
    }
}

/// Error returned by a helper function.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HelperError {
    #[error("unknown helper {0}")]
    Unknown(u32),
    #[error("{0}")]
    Failed(String),
    /// A BPF callback the helper ran (see [`CallContext::call_function`]) failed; the VM
    /// reports the inner error itself, not wrapped in [`VmError::Helper`].
    ///
    /// [`CallContext::call_function`]: super::CallContext::call_function
    #[error("callback failed: {0}")]
    Callback(Box<VmError>),
}

impl From<VmError> for HelperError {
    fn from(e: VmError) -> Self {
        HelperError::Callback(Box::new(e))
    }
}

impl VmError {
    /// The error the VM reports for helper `id` at `pc` failing with `source`: a failed
    /// callback propagates its own error (a fault inside the callback stays a fault).
    pub(crate) fn from_helper(pc: usize, id: u32, source: HelperError) -> Self {
        match source {
            HelperError::Callback(e) => *e,
            source => VmError::Helper { pc, id, source },
        }
    }
}

/// Errors of loading, compiling or running an eBPF program.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum VmError {
    #[error("program length {0} is not a multiple of 8")]
    BadLength(usize),
    #[error("empty program")]
    EmptyProgram,
    #[error("invalid instruction at {pc} (opcode {opc:#04x}): {reason}")]
    InvalidInsn { pc: usize, opc: u8, reason: String },
    #[error("instruction at {pc} jumps to {target}, outside the program or into an lddw")]
    BadJump { pc: usize, target: i64 },
    #[error("execution ran past the end of the program after instruction {pc}")]
    FellOffEnd { pc: usize },
    #[error("memory fault at instruction {pc}: {kind} of {len} bytes at {addr:#x}")]
    MemoryFault {
        pc: usize,
        addr: u64,
        len: usize,
        kind: AccessKind,
    },
    #[error("misaligned atomic at instruction {pc}: address {addr:#x}")]
    MisalignedAtomic { pc: usize, addr: u64 },
    #[error("call depth limit ({max}) exceeded at instruction {pc}")]
    CallDepth { pc: usize, max: usize },
    #[error("helper {id} called at instruction {pc} failed: {source}")]
    Helper {
        pc: usize,
        id: u32,
        #[source]
        source: HelperError,
    },
    #[error("callx at instruction {pc}: invalid target {target:#x}")]
    BadCallx { pc: usize, target: u64 },
    #[error("callback at instruction {pc}: {func:#x} is not a BPF function")]
    BadCallback { pc: usize, func: u64 },
    #[error("this VM cannot run BPF callbacks from helpers (instruction {pc})")]
    CallbackUnsupported { pc: usize },
    #[error("tail call limit ({0}) exceeded")]
    TailCallLimit(usize),
    #[error("tail call from a bpf-to-bpf subprogram (instruction {pc}) is not supported")]
    TailCallInSubprog { pc: usize },
    #[error("instruction budget of {0} exhausted")]
    Budget(u64),
    #[error("relocation of lddw at instruction {pc} failed: {reason}")]
    Relocation { pc: usize, reason: String },
    #[error("JIT: {0}")]
    Jit(String),
    #[error("rbpf cannot run instruction {pc} ({opc:#04x}): {reason}")]
    RbpfRefused { pc: usize, opc: u8, reason: String },
    #[error("rbpf: {0}")]
    Rbpf(String),
}
