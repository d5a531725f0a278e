//! The vocabulary every bpftime-rs crate shares with the kernel and with its own BPF C.
//!
//! Kernel numbers (map types, flags, opcodes, pseudo sources, helper ids and names, ringbuf
//! header bits, BTF kinds) come from libbpf-sys's generated UAPI bindings and from libbpf's generated
//! `bpf_helper_defs.h`, never from hand copies: a copied constant is a place for the product's
//! promise of kernel semantics to drift silently. The typed wrappers add what the numbers alone
//! do not say (bpftool's names, which types are per-CPU or keyless, which can be mirrored).
//!
//! The crate also holds the other things several crates need exactly once: the wire format
//! of `ebpf/bridge.h` (records between the forwarder and the kernel drain program), the OS
//! primitives (`Mmap`, `page_size`, `possible_cpus`), [`sys`], the one layer every `bpf()`
//! command of the project goes through (with a test override), and [`error_chain()`] /
//! [`ErrorChain`], how every crate prints an error with its sources.

#![warn(missing_docs)]

pub mod bridge;
pub mod btf;
mod error_chain;
pub mod flags;
pub mod helper;
pub mod insn;
pub mod map_type;
pub mod os;
pub mod ringbuf;
pub mod sys;

pub use error_chain::{error_chain, ErrorChain};
pub use helper::HelperId;
pub use map_type::{MapType, UnknownMapType};
pub use os::{page_size, possible_cpus, Mmap};
