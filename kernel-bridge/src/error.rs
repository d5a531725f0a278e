//! [`BridgeError`], the one error type of the crate.

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
    /// A [`MirrorDesc`](crate::MirrorDesc) the bridge cannot mirror (type, names, sizes), or a
    /// pinned map that does not fit it.
    #[error("mirror map {map}: {why}")]
    InvalidMirror {
        /// The map's name (for a pinned map found by path: the path).
        map: String,
        /// What is wrong, in full.
        why: String,
    },
    /// Creating the kernel map, or registering it with the drain (its slot in the drain's
    /// `mirrors` map, or in a fast-path map of maps), failed.
    #[error("creating kernel map {map}")]
    MapCreate {
        /// The mirror's name.
        map: String,
        /// The failed `bpf()` command and its errno.
        #[source]
        source: SyscallError,
    },
    /// Reading a mirror back (batch lookup, key iteration, lookup, pop) failed.
    #[error("reading kernel map {map}")]
    MapRead {
        /// The mirror's name.
        map: String,
        /// The failed `bpf()` command and its errno.
        #[source]
        source: SyscallError,
    },
    /// A file operation on the pin directory failed.
    #[error("{}", path.display())]
    Pin {
        /// The pin or directory operated on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Pinning a map at `path`, opening the map pinned there, or reading its shape failed.
    #[error("{}", path.display())]
    PinnedMap {
        /// The pin path.
        path: PathBuf,
        /// The failed `bpf()` command (`BPF_OBJ_PIN`, `BPF_OBJ_GET`, `BPF_OBJ_GET_INFO_BY_FD`)
        /// and its errno.
        #[source]
        source: SyscallError,
    },
    /// A plain OS call of the bridge failed (duplicating an fd, starting the drain thread).
    #[error("{what}")]
    System {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// aya refused a map of the drain object (it reads the confirmation ringbuf).
    #[error("{what}")]
    AyaMap {
        /// What was being done.
        what: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
    /// A [`MirrorId`](crate::MirrorId) this bridge never handed out.
    #[error("no mirror with id {0} in this bridge")]
    UnknownMirror(u32),
    /// The drain's `mirrors` table is full (`BRIDGE_MAX_MIRRORS` slots in `ebpf/bridge.h`).
    #[error("the bridge serves at most {0} mirrors")]
    TooManyMirrors(u32),
    /// An update's key or value length differs from what its mirror copies; refused before it
    /// is queued.
    #[error("update of map {map}: the {what} is {got} bytes, the mirror takes {expected}")]
    SizeMismatch {
        /// The mirror's name.
        map: String,
        /// `"key"` or `"value"`.
        what: &'static str,
        /// Bytes given.
        got: usize,
        /// Bytes the mirror takes ([`MirrorDesc::key_bytes`](crate::MirrorDesc::key_bytes) or
        /// [`MirrorDesc::value_bytes`](crate::MirrorDesc::value_bytes)).
        expected: usize,
    },
    /// A push to a keyed map, or an update or delete of a QUEUE or STACK; refused before it is
    /// queued.
    #[error("update of map {map}: {op:?} does not apply to a {kind} map")]
    WrongOp {
        /// The mirror's name.
        map: String,
        /// The operation asked for.
        op: Op,
        /// The mirror's map type, as [`MapType::name`](crate::MapType::name) spells it.
        kind: &'static str,
    },
    /// The update ring could not be mapped (when the bridge starts), or a record could not be
    /// reserved in it (too large, an epoll failure); a full ring is waited out, not an error.
    #[error("user ringbuf")]
    Ring(#[from] UserRingBufError),
    /// `BPF_PROG_TEST_RUN` of the drain failed.
    #[error("running the drain program")]
    Drain(#[source] SyscallError),
    /// The drain ran and returned `-errno`.
    #[error("running the drain program: it returned an error")]
    DrainReturned(#[source] std::io::Error),
    /// [`Bridge::flush`](crate::Bridge::flush) ran out of time; the updates stay queued and may
    /// still be confirmed later.
    #[error("{pending} updates still unconfirmed after {waited:?}")]
    FlushTimeout {
        /// Updates sent before the flush and not confirmed when it gave up.
        pending: u64,
        /// The timeout given.
        waited: Duration,
    },
    /// The drain thread met this error and stopped; updates are no longer applied.
    #[error("the bridge's drain thread stopped")]
    DrainStopped(#[source] Arc<BridgeError>),
}
