//! The userspace runtime, in the order data flows through it: [`object`] parses a clang-built
//! BPF object, [`verifier`] has the kernel check its programs, [`maps`] holds its maps in shared
//! memory, [`vm`] runs programs (interpreter, JIT, rbpf) with the [`helpers`] library, and
//! [`loaded`] ties them together for the CLI (`load`, `run`) and for agents in target processes.

#![warn(missing_docs)]

pub mod helpers;
pub mod loaded;
pub mod maps;
pub mod object;
pub mod state;
pub mod verifier;
pub mod vm;
