//! Typed errors of the VM layer.

use std::sync::Arc;

use bpftime_abi::HelperId;
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

/// Error returned by a helper function: the run aborts with it.
#[derive(Debug, Clone, Error)]
pub enum HelperError {
    #[error("unknown helper {0}")]
    Unknown(u32),
    /// A call the program cannot continue after (bad pointer, bad map, ...).
    #[error(transparent)]
    Fault(#[from] HelperFault),
    /// The helper panicked; the VM caught it at the helper boundary.
    #[error("the helper panicked")]
    Panicked,
    /// A BPF callback the helper ran (see [`CallContext::call_function`]) failed; the VM
    /// reports the inner error itself, not wrapped in [`VmError::Helper`].
    ///
    /// [`CallContext::call_function`]: super::CallContext::call_function
    #[error("callback failed: {0}")]
    Callback(Box<VmError>),
    /// A failure of an embedder's own [`Helpers`](super::Helpers) implementation, with its
    /// source kept.
    #[error("{0}")]
    Other(Arc<dyn std::error::Error + Send + Sync>),
}

impl HelperError {
    /// An embedder's failure (see [`HelperError::Other`]).
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        HelperError::Other(Arc::new(e))
    }
}

/// `Other` errors compare by message (their sources need not be comparable).
impl PartialEq for HelperError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Unknown(a), Self::Unknown(b)) => a == b,
            (Self::Fault(a), Self::Fault(b)) => a == b,
            (Self::Panicked, Self::Panicked) => true,
            (Self::Callback(a), Self::Callback(b)) => a == b,
            (Self::Other(a), Self::Other(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

impl Eq for HelperError {}

/// A helper call the program cannot continue after (the VM aborts the run with it). Each
/// names the helper by its kernel name.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HelperFault {
    #[error(
        "{}: argument r{arg} = {addr:#x} ({len} bytes) is not accessible program memory",
        .helper.display_name()
    )]
    BadPointer {
        helper: HelperId,
        arg: u8,
        addr: u64,
        len: usize,
    },
    #[error(
        "{}: argument r{arg} = {value:#x} is not a map of this program",
        .helper.display_name()
    )]
    BadMap {
        helper: HelperId,
        arg: u8,
        value: u64,
    },
    #[error("{}: {addr:#x} is not a reserved ringbuf record", .helper.display_name())]
    BadRecord { helper: HelperId, addr: u64 },
    /// The map refused an operation the program cannot be told about (a record it reserved
    /// could not be committed: the ring was changed under it).
    #[error(
        "{}: map `{map}` refused the operation: {}",
        .helper.display_name(),
        std::io::Error::from_raw_os_error(*.errno)
    )]
    Map {
        helper: HelperId,
        map: Arc<str>,
        errno: i32,
    },
    #[error(
        "the program reached an instruction whose CO-RE relocation failed (helper {id:#x} at \
         instruction {pc})"
    )]
    CoreRelocation { id: u32, pc: usize },
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
