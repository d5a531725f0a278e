//! Typed errors of symbol resolution, hooking and injection.

use std::path::PathBuf;

/// Errors of resolving a target and installing or removing a hook.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("invalid attach target `{spec}`: {reason}")]
    BadTarget { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse ELF file {path}: {reason}")]
    Elf { path: PathBuf, reason: String },
    #[error("module `{module}` is not loaded in process {pid}")]
    ModuleNotLoaded { module: String, pid: u32 },
    #[error("symbol `{symbol}` not found in {path} (neither .dynsym nor .symtab)")]
    UnknownSymbol { path: PathBuf, symbol: String },
    #[error("symbol `{symbol}` in {path} is a GNU indirect function (ifunc); attach to the implementation instead")]
    IndirectFunction { path: PathBuf, symbol: String },
    #[error("offset {offset:#x} is outside `{symbol}` ({size} bytes) in {path}")]
    OffsetOutOfRange {
        path: PathBuf,
        symbol: String,
        offset: u64,
        size: u64,
    },
    #[error("address {address:#x} of `{symbol}` in {path} is not mapped in process {pid}")]
    NotMapped {
        path: PathBuf,
        symbol: String,
        address: u64,
        pid: u32,
    },
    #[error("cannot hook `{function}` ({size} bytes): {reason}")]
    TooShort {
        function: String,
        size: u64,
        reason: String,
    },
    #[error("cannot hook `{function}`: {reason}")]
    Unpatchable { function: String, reason: String },
    #[error("hooking `{function}` failed: {source}")]
    Detour {
        function: String,
        #[source]
        source: detour::Error,
    },
    #[error("no hook with id {0}")]
    NoSuchHook(u64),
    #[error("{what} failed: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Errors of ptrace injection and remote calls.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("ptrace {op} on thread {tid} failed: {source}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] AttachError),
    #[error("process {pid} exited during injection (status {status:#x})")]
    Exited { pid: i32, status: i32 },
    #[error("no safe point in process {pid} after {tries} rounds over its threads (last stop: {last_reason}); nothing was changed")]
    NoSafePoint {
        pid: i32,
        tries: u32,
        last_reason: &'static str,
    },
    #[error("remote call of {function} in process {pid} did not return within {ms} ms")]
    Timeout {
        pid: i32,
        function: String,
        ms: u128,
    },
    #[error("remote call of {function} in process {pid} stopped by signal {signal} at {rip:#x}")]
    Crashed {
        pid: i32,
        function: String,
        signal: i32,
        rip: u64,
    },
    #[error("dlopen({path}) in process {pid} failed: {message}")]
    Dlopen {
        pid: i32,
        path: PathBuf,
        message: String,
    },
    #[error("cannot access memory of process {pid}: {source}")]
    Memory {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}
