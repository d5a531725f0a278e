use std::path::PathBuf;
use std::time::Duration;

use crate::user_ringbuf::UserRingBufError;
use bpftime_abi::bridge::Op;

/// Everything that can go wrong in the bridge, each naming the map or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("loading the bridge drain program (ebpf/bridge.bpf.c)")]
    LoadDrain(#[source] std::io::Error),
    #[error("mirror map {map}: {why}")]
    InvalidMirror { map: String, why: String },
    #[error("creating kernel map {map}")]
    MapCreate {
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading kernel map {map}")]
    MapRead {
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    System {
        what: &'static str,
        #[source]
        source: std::io::Error,
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
    #[error("running the drain program")]
    Drain(#[source] std::io::Error),
    #[error("{pending} updates still unconfirmed after {waited:?}")]
    FlushTimeout { pending: u64, waited: Duration },
    #[error("the bridge's drain thread stopped: {0}")]
    DrainStopped(String),
}
