//! Typed errors of the VM layer.

use std::sync::Arc;

use bpftime_abi::HelperId;
use thiserror::Error;

/// Kind of a memory access, for fault reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    /// A read (`ldx`).
    Load,
    /// A write (`st`, `stx`).
    Store,
    /// An atomic read-modify-write (`BPF_ATOMIC`).
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
    /// The program called a helper id the helper table does not implement (the id).
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
    /// A pointer argument does not cover `len` bytes of memory the program may access.
    BadPointer {
        /// The helper that was called.
        helper: HelperId,
        /// The argument register (1..=5) that held the pointer.
        arg: u8,
        /// The pointer's value.
        addr: u64,
        /// How many bytes the helper needed at `addr`.
        len: usize,
    },
    #[error(
        "{}: argument r{arg} = {value:#x} is not a map of this program",
        .helper.display_name()
    )]
    /// A map argument is not the handle of one of the program's maps.
    BadMap {
        /// The helper that was called.
        helper: HelperId,
        /// The argument register (1..=5) that held the map.
        arg: u8,
        /// The register's value.
        value: u64,
    },
    #[error("{}: {addr:#x} is not a reserved ringbuf record", .helper.display_name())]
    /// A ringbuf submit/discard got an address that is not a record reserved from a ringbuf.
    BadRecord {
        /// The helper that was called.
        helper: HelperId,
        /// The address the program passed.
        addr: u64,
    },
    /// The map refused an operation the program cannot be told about (a record it reserved
    /// could not be committed: the ring was changed under it).
    #[error(
        "{}: map `{map}` refused the operation: {}",
        .helper.display_name(),
        std::io::Error::from_raw_os_error(*.errno)
    )]
    Map {
        /// The helper that was called.
        helper: HelperId,
        /// The map's name, as the object names it.
        map: Arc<str>,
        /// The map's error, as a positive errno.
        errno: i32,
    },
    #[error(
        "the program reached an instruction whose CO-RE relocation failed (helper {id:#x} at \
         instruction {pc})"
    )]
    /// The program called [`POISON_HELPER`](crate::object::POISON_HELPER), which the loader
    /// left where a CO-RE relocation could not be applied: the path was reachable after all.
    CoreRelocation {
        /// The helper id called (the poison id).
        id: u32,
        /// Index of the call instruction (in 8-byte slots).
        pc: usize,
    },
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
    /// Raw bytecode whose length (the value, in bytes) is not whole instructions.
    #[error("program length {0} is not a multiple of 8")]
    BadLength(usize),
    /// A program with no instructions.
    #[error("empty program")]
    EmptyProgram,
    /// Validation refused an instruction (bad opcode, register, lddw pair, ...).
    #[error("invalid instruction at {pc} (opcode {opc:#04x}): {reason}")]
    InvalidInsn {
        /// Index of the failing instruction (in 8-byte slots).
        pc: usize,
        /// The instruction's opcode byte.
        opc: u8,
        /// What is wrong with it.
        reason: String,
    },
    /// A jump, call or `BPF_PSEUDO_FUNC` lddw whose target is outside the program or the second
    /// slot of an lddw.
    #[error("instruction at {pc} jumps to {target}, outside the program or into an lddw")]
    BadJump {
        /// Index of the jumping instruction (in 8-byte slots).
        pc: usize,
        /// The slot it targets.
        target: i64,
    },
    /// Execution reached the end of the instruction array without an `exit`.
    #[error("execution ran past the end of the program after instruction {pc}")]
    FellOffEnd {
        /// Index of the last instruction executed.
        pc: usize,
    },
    /// A load, store or atomic touched memory outside the regions the program may access.
    #[error("memory fault at instruction {pc}: {kind} of {len} bytes at {addr:#x}")]
    MemoryFault {
        /// Index of the failing instruction (in 8-byte slots).
        pc: usize,
        /// The address accessed.
        addr: u64,
        /// The access width in bytes.
        len: usize,
        /// Load, store or atomic.
        kind: AccessKind,
    },
    /// An atomic operation on an address not aligned to its width.
    #[error("misaligned atomic at instruction {pc}: address {addr:#x}")]
    MisalignedAtomic {
        /// Index of the failing instruction (in 8-byte slots).
        pc: usize,
        /// The misaligned address.
        addr: u64,
    },
    /// A bpf-to-bpf call or callback would exceed the frame limit (the kernel's
    /// `MAX_CALL_FRAMES`).
    #[error("call depth limit ({max}) exceeded at instruction {pc}")]
    CallDepth {
        /// Index of the call instruction (in 8-byte slots).
        pc: usize,
        /// The frame limit ([`MAX_CALL_FRAMES`](super::program::MAX_CALL_FRAMES)).
        max: usize,
    },
    /// A helper failed with an error that aborts the run.
    #[error("helper {id} called at instruction {pc} failed: {source}")]
    Helper {
        /// Index of the call instruction (in 8-byte slots).
        pc: usize,
        /// The helper id called.
        id: u32,
        /// The helper's error.
        #[source]
        source: HelperError,
    },
    /// A `callx` whose register holds a function pointer past the end of the program, or an
    /// untagged value too large to be a helper id.
    #[error("callx at instruction {pc}: invalid target {target:#x}")]
    BadCallx {
        /// Index of the `callx` instruction (in 8-byte slots).
        pc: usize,
        /// The register's value.
        target: u64,
    },
    /// A helper asked to run a callback whose value is not the address of a BPF function of
    /// this program.
    #[error("callback at instruction {pc}: {func:#x} is not a BPF function")]
    BadCallback {
        /// Index of the helper call instruction (in 8-byte slots).
        pc: usize,
        /// The callback value passed.
        func: u64,
    },
    /// A helper asked to run a callback on a VM that has no way to call back into the program.
    #[error("this VM cannot run BPF callbacks from helpers (instruction {pc})")]
    CallbackUnsupported {
        /// Index of the helper call instruction (in 8-byte slots).
        pc: usize,
    },
    /// A chain of tail calls longer than the limit (the value,
    /// [`MAX_TAIL_CALLS`](super::program::MAX_TAIL_CALLS), as the kernel's `MAX_TAIL_CALL_CNT`).
    #[error("tail call limit ({0}) exceeded")]
    TailCallLimit(usize),
    /// A tail call made below the entry frame (from a subprogram or a callback), which this
    /// VM does not support.
    #[error("tail call from a bpf-to-bpf subprogram (instruction {pc}) is not supported")]
    TailCallInSubprog {
        /// Index of the tail-call helper call (in 8-byte slots).
        pc: usize,
    },
    /// The run executed as many instructions as its budget allowed (the value: the budget).
    #[error("instruction budget of {0} exhausted")]
    Budget(u64),
    /// The resolver refused a pseudo `lddw` (map fd, map value, ...) while loading.
    #[error("relocation of lddw at instruction {pc} failed: {reason}")]
    Relocation {
        /// Index of the lddw (in 8-byte slots).
        pc: usize,
        /// The resolver's message.
        reason: String,
    },
    /// The JIT could not compile the program (unsupported target, mapping the code, ...).
    #[error("JIT: {0}")]
    Jit(String),
    /// The program uses an instruction rbpf runs wrongly or not at all (see
    /// [`rbpf_check`](super::rbpf::rbpf_check)).
    #[error("rbpf cannot run instruction {pc} ({opc:#04x}): {reason}")]
    RbpfRefused {
        /// Index of the refused instruction (in 8-byte slots).
        pc: usize,
        /// Its opcode byte.
        opc: u8,
        /// Why rbpf cannot run it.
        reason: String,
    },
    /// rbpf failed to load, compile or run the program (its message).
    #[error("rbpf: {0}")]
    Rbpf(String),
}
