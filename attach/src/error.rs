//! Typed errors of symbol resolution, hooking and injection.

use std::path::PathBuf;

/// Errors of resolving a target and installing or removing a hook.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The target string is not of a form [`TargetSpec::parse`](crate::TargetSpec::parse)
    /// accepts (`PATH:FUNC[+OFF]`, `LIB:FUNC[+OFF]`, `FUNC[+OFF]`).
    #[error("invalid attach target `{spec}`: {reason}")]
    BadTarget {
        /// The target as written.
        spec: String,
        /// Which part of it is wrong.
        reason: String,
    },
    /// A file needed for resolution (`/proc/PID/maps`, a mapped ELF file, the process's `exe`)
    /// could not be read or stat'ed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file, as opened from this process (through `/proc/PID/root` for other processes).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// goblin could not parse the mapped file as ELF.
    #[error("cannot parse ELF file {path}: {reason}")]
    Elf {
        /// The file, as mapped in the target process.
        path: PathBuf,
        /// goblin's message.
        reason: String,
    },
    /// No file-backed mapping of the process matches the module named in the target.
    #[error("module `{module}` is not loaded in process {pid}")]
    ModuleNotLoaded {
        /// The module as named in the target (`<main executable>` when none was).
        module: String,
        /// The process searched (this process's own pid when resolving in self).
        pid: u32,
    },
    /// Neither `.dynsym` nor `.symtab` defines a function of that name.
    #[error("symbol `{symbol}` not found in {path} (neither .dynsym nor .symtab)")]
    UnknownSymbol {
        /// The file searched.
        path: PathBuf,
        /// The symbol asked for (without any `@VERSION`).
        symbol: String,
    },
    /// The symbol is an `STT_GNU_IFUNC` resolver: patching it would hook the resolver, not the
    /// implementation the loader picked.
    #[error("symbol `{symbol}` in {path} is a GNU indirect function (ifunc); attach to the implementation instead")]
    IndirectFunction {
        /// The file defining it.
        path: PathBuf,
        /// The ifunc symbol.
        symbol: String,
    },
    /// `FUNC+OFF` with `OFF` at or past the symbol's `st_size`.
    #[error("offset {offset:#x} is outside `{symbol}` ({size} bytes) in {path}")]
    OffsetOutOfRange {
        /// The file defining the symbol.
        path: PathBuf,
        /// The symbol.
        symbol: String,
        /// The requested offset, in bytes from the symbol's start.
        offset: u64,
        /// The symbol's `st_size`, in bytes.
        size: u64,
    },
    /// The symbol's address lies in no `PT_LOAD` segment, or the segment is not mapped in the
    /// process with its own permissions.
    #[error("address {address:#x} of `{symbol}` in {path} is not mapped in process {pid}")]
    NotMapped {
        /// The file defining the symbol.
        path: PathBuf,
        /// The symbol.
        symbol: String,
        /// The ELF virtual address of `symbol + offset` (before load bias).
        address: u64,
        /// The process searched.
        pid: u32,
    },
    /// The function is too small, or of unknown size, for the 5-byte entry patch, or the
    /// instructions it would displace leave it (see [`crate::precheck::check_site`]).
    #[error("cannot hook `{function}` ({size} bytes): {reason}")]
    TooShort {
        /// The hook site's name (`file:symbol[+off]`).
        function: String,
        /// Bytes from the hook site to the end of the symbol (`st_size - offset`; 0 = unknown).
        size: u64,
        /// What the pre-check found.
        reason: String,
    },
    /// The site cannot take a patch for another reason: an undecodable instruction, a branch
    /// into the displaced bytes, or a uretprobe away from the function entry.
    #[error("cannot hook `{function}`: {reason}")]
    Unpatchable {
        /// The hook site's name (`file:symbol[+off]`).
        function: String,
        /// Why it was refused.
        reason: String,
    },
    /// The `detour` crate failed to build or to apply (or revert) a patch.
    #[error("hooking `{function}` failed: {source}")]
    Detour {
        /// The site's name; for a failed multi-site transaction, every site's, comma-separated.
        function: String,
        /// detour's error.
        #[source]
        source: detour::Error,
    },
    /// No hook with this [`HookId`](crate::HookId) is installed (or in this [`HookSet`](crate::HookSet)).
    #[error("no hook with id {0}")]
    NoSuchHook(u64),
    /// An OS call of the hook machinery itself failed (e.g. mapping a thunk page).
    #[error("{what} failed: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Errors of ptrace injection and remote calls.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A ptrace request (or the `waitpid` on the tracee) failed.
    #[error("ptrace {op} on thread {tid} failed: {source}")]
    Ptrace {
        /// The request without its `PTRACE_` prefix (`SEIZE`, `GETREGS`, ...), or `waitpid`.
        op: &'static str,
        /// The thread it was issued on.
        tid: i32,
        /// errno of the request.
        #[source]
        source: std::io::Error,
    },
    /// Resolving `dlopen`, `dlerror` or an agent export in the target failed.
    #[error(transparent)]
    Resolve(#[from] AttachError),
    /// The traced thread exited or was killed while seized.
    #[error("process {pid} exited during injection (status {status:#x})")]
    Exited {
        /// The target process.
        pid: i32,
        /// The raw `waitpid` status.
        status: i32,
    },
    /// Every round over the target's threads found each one at an unsafe point (see the
    /// [module documentation](crate::inject)); the target was not changed.
    #[error("no safe point in process {pid} after {tries} rounds over its threads (last stop: {last_reason}); nothing was changed")]
    NoSafePoint {
        /// The target process.
        pid: i32,
        /// Rounds made ([`InjectOptions::max_tries`](crate::inject::InjectOptions::max_tries)).
        tries: u32,
        /// Why the last stop examined was refused.
        last_reason: &'static str,
    },
    /// A remote call did not return within
    /// [`InjectOptions::call_timeout`](crate::inject::InjectOptions::call_timeout); the thread is
    /// interrupted, and its original registers are put back when it is detached.
    #[error("remote call of {function} in process {pid} did not return within {ms} ms")]
    Timeout {
        /// The target process.
        pid: i32,
        /// The function called (`dlopen`, `bpftime_agent_start`, ...).
        function: String,
        /// The timeout, in milliseconds.
        ms: u128,
    },
    /// A remote call stopped with SIGSEGV, SIGBUS or SIGILL anywhere but at the return-address-0
    /// trap that marks its end; the thread's registers were restored.
    #[error("remote call of {function} in process {pid} stopped by signal {signal} at {rip:#x}")]
    Crashed {
        /// The target process.
        pid: i32,
        /// The function called.
        function: String,
        /// The signal number.
        signal: i32,
        /// Where it stopped.
        rip: u64,
    },
    /// `dlopen` in the target returned NULL.
    #[error("dlopen({path}) in process {pid} failed: {message}")]
    Dlopen {
        /// The target process.
        pid: i32,
        /// The library, canonicalized.
        path: PathBuf,
        /// The target's `dlerror()` text (or why it could not be had).
        message: String,
    },
    /// Opening, reading or writing `/proc/PID/mem` failed.
    #[error("cannot access memory of process {pid}: {source}")]
    Memory {
        /// The target process.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, described in full (a path that cannot be canonicalized, an agent that
    /// stays busy).
    #[error("{0}")]
    Other(String),
}
