use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::user_ringbuf::UserRingBufError;
use bpftime_abi::bridge::Op;
use bpftime_abi::sys::SyscallError;

/// Everything that can go wrong in the bridge, each naming the map or file concerned. A failed
/// `bpf()` command is the [`SyscallError`] source, with the command's name and the errno.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// libbpf could not open or load the drain object.
    #[error("loading the bridge drain program (ebpf/bridge.bpf.c)")]
    LoadDrain(#[source] libbpf_rs::Error),
    /// The loaded drain object lacks a map or program this crate expects of it.
    #[error("loading the bridge drain program (ebpf/bridge.bpf.c): it has no {0}")]
    DrainIncomplete(String),
    #[error("mirror map {map}: {why}")]
    InvalidMirror { map: String, why: String },
    #[error("creating kernel map {map}")]
    MapCreate {
        map: String,
        #[source]
        source: SyscallError,
    },
    #[error("reading kernel map {map}")]
    MapRead {
        map: String,
        #[source]
        source: SyscallError,
    },
    /// A file operation on the pin directory failed.
    #[error("{}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Pinning a map at `path`, opening the map pinned there, or reading its shape failed.
    #[error("{}", path.display())]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error("{what}")]
    System {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// aya refused a map of the drain object (it reads the confirmation ringbuf).
    #[error("{what}")]
    AyaMap {
        what: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no mirror with id {0} in this bridge")]
    UnknownMirror(u32),
    #[error("the bridge serves at most {0} mirrors")]
    TooManyMirrors(u32),
    #[error("update of map {map}: the {what} is {got} bytes, the mirror takes {expected}")]
    SizeMismatch {
        map: String,
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("update of map {map}: {op:?} does not apply to a {kind} map")]
    WrongOp {
        map: String,
        op: Op,
        kind: &'static str,
    },
    #[error("user ringbuf")]
    Ring(#[from] UserRingBufError),
    /// `BPF_PROG_TEST_RUN` of the drain failed.
    #[error("running the drain program")]
    Drain(#[source] SyscallError),
    /// The drain ran and returned `-errno`.
    #[error("running the drain program: it returned an error")]
    DrainReturned(#[source] std::io::Error),
    #[error("{pending} updates still unconfirmed after {waited:?}")]
    FlushTimeout { pending: u64, waited: Duration },
    /// The drain thread met this error and stopped; updates are no longer applied.
    #[error("the bridge's drain thread stopped")]
    DrainStopped(#[source] Arc<BridgeError>),
}
