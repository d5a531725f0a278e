//! The kernel half of bpftime-rs: mirror maps in the kernel, kept in step with userspace maps
//! through a `BPF_MAP_TYPE_USER_RINGBUF`, drained by a kernel program that applies each update
//! to a real kernel map and confirms it through a `BPF_MAP_TYPE_RINGBUF`.
//!
//! Flow: [`Bridge::send`] -> [`user_ringbuf::UserRingBuf`] -> `ebpf/bridge.bpf.c` (drain, run
//! with BPF_PROG_RUN) -> kernel mirror map ([`mirror`]) -> confirmation -> [`Bridge`] counters.

#![warn(missing_docs)]

pub mod bridge;
mod drain;
pub mod error;
pub mod mirror;
pub mod selftest;
pub mod user_ringbuf;

pub use bpftime_abi::bridge::Op;
pub use bpftime_abi::MapType;
pub use bridge::{
    Bridge, BridgeConfig, BridgeCounters, Confirmation, MirrorId, Update, UpdateStatus,
};
pub use error::BridgeError;
pub use mirror::{KernelEntry, Mirror, MirrorDesc, PIN_ROOT};
