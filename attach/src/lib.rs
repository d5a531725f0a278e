//! `bpftime-attach`: gets BPF uprobe programs running inside a target process.
//!
//! * [`symbols`]: resolves libbpf-style targets (`PATH:FUNC`, `FUNC+OFF`, `libc.so.6:malloc`)
//!   to runtime addresses from `/proc/PID/maps` and the ELF files mapped there.
//! * [`hook`]: inline entry detours with a kernel-layout [`PtRegs`] context, return hooks by
//!   return-address replacement with a per-thread shadow stack, `override_return`.
//! * [`inject`]: ptrace injection of the agent (`dlopen` in the target) and remote calls of its
//!   exported control functions.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![warn(missing_docs)]

pub mod error;
pub mod hook;
pub mod inject;
pub mod precheck;
pub mod procmaps;
pub mod regs;
pub mod symbols;
pub mod usdt;

pub use error::{AttachError, InjectError};
pub use hook::{
    site_mechanism, DirectEntry, EntryAction, HookId, HookSet, HookStats, ProbeHandler, ProbeKind,
};
pub use regs::PtRegs;
pub use symbols::{resolve, resolve_in, ResolvedTarget, TargetSpec};
