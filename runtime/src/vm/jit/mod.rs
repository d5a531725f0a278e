//! x86_64 JIT for the verified path.
//!
//! Register mapping follows the kernel's `bpf_jit_comp.c`: r0=rax, r1=rdi, r2=rsi, r3=rdx,
//! r4=rcx, r5=r8, r6=rbx, r7=r13, r8=r14, r9=r15, r10=rbp. r12 holds the run environment
//! (`JitEnv`); r9, r10 and r11 are scratch. Every BPF function (main program and each
//! subprogram) is a native function with its own 512-byte stack frame that saves r6-r10.
//! Memory accesses are unchecked: only run programs that the kernel verifier accepted (or that
//! are otherwise known to touch only valid memory).
//!
//! # Map fast paths
//! Helper calls normally go through `helper_trampoline` into the stateful [`Helpers`] (a dyn
//! call, a `catch_unwind`, a [`CallContext`], a match on the id): ~10 ns per call, as much as the
//! map operation itself. The kernel avoids this because its verifier knows which map each call
//! site uses. Given a [`JitMapResolver`] (see [`Program::with_jit_maps`]), the JIT does the
//! same for `bpf_map_lookup_elem`, `bpf_map_update_elem` and `bpf_map_delete_elem`: when the
//! value in r1 at a call site is known at JIT time (an `lddw` map token), the call goes straight
//! to a specialised `extern "C"` [`JitMapFn`] with r1 replaced by the map's handle, and ARRAY
//! lookups are inlined (bounds check, change-mark test, `base + index * stride`). Every fast path
//! is guarded at run time: r1 must still hold the expected token (the JIT's tracking of r1 is a
//! simple forward scan, so a path it did not foresee just takes the generic call), and the
//! running [`Helpers`] must name the same maps ([`Helpers::map_set_id`], checked once per run);
//! otherwise the generic trampoline runs, so behaviour never depends on the fast path.
//!
//! # Layout
//! One module per stage:
//! * `encoder`: x86-64 registers, REX/ModRM/SIB encoding, one method per instruction shape,
//!   labels and their fixups (unit-tested against an independent decoder);
//! * `translate`: BPF to x86-64, a short driver (functions, frames, the outer entry and the
//!   abort path) dispatching to one module per instruction class (`alu`, `memory`, `jump`,
//!   `call`) and to the map fast paths (`fast_path`);
//! * `env`: the run-time environment the generated code works in (`JitEnv`, status codes),
//!   the helper trampoline, [`JitProgram::run`] and [`JitSession`];
//! * `hook`: [`JitHook`], the machine-code entry for hook engines.
//!
//! [`Helpers`]: super::Helpers
//! [`Helpers::map_set_id`]: super::Helpers::map_set_id
//! [`CallContext`]: super::CallContext
//! [`Program::with_jit_maps`]: super::Program::with_jit_maps

mod encoder;
mod env;
mod hook;
mod translate;

use std::sync::Arc;

use bpftime_abi::Mmap;

use super::error::{HelperError, VmError};
use env::{JitEnv, ST_HELPER_ERR};

pub use env::JitSession;
pub use hook::{JitHook, JitHookAfterFn, JitHookSlowFn};

/// A map helper the JIT calls directly (see the module docs), with the SysV ABI: r1 replaced by
/// [`JitMap::handle`], r2..r5 as the program passed them, and the run's [`JitCall`] (for
/// [`JitCall::fail`]). Returns the helper's r0. Must not unwind (catch panics and report them
/// with [`JitCall::fail`]).
pub type JitMapFn = unsafe extern "C" fn(
    handle: *const (),
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
    call: *mut JitCall,
) -> u64;

/// The run state a [`JitMapFn`] receives (opaque).
pub struct JitCall {
    _opaque: [u8; 0],
}

impl JitCall {
    /// Abort the running program with `error` from helper `id` once the function returns.
    ///
    /// # Safety
    /// `call` must be the pointer the JIT passed to the [`JitMapFn`] now running.
    pub unsafe fn fail(call: *mut JitCall, id: u32, error: HelperError) {
        let env = call as *mut JitEnv<'_, '_>;
        // SAFETY: the JIT passes its live `JitEnv` (exclusively borrowed by `run`; the generated
        // code holds no reference across the call) as `call`.
        unsafe {
            (*env).error = Some(VmError::from_helper((*env).pc as usize, id, error));
            (*env).status = ST_HELPER_ERR;
        }
    }
}

/// An ARRAY map whose `bpf_map_lookup_elem` the JIT inlines (as the kernel's JIT does): value
/// `i` is at `values + i * stride` for `i < max_entries`. A lookup must leave a change mark
/// (`mark_bit` in the 32-bit word at `marks + 4 * i`) for the sync forwarder; inline code only
/// tests it (one load of a word the sync protocol allows to be read plainly) and, when the bit
/// is missing, calls [`JitMap::lookup`] instead, which sets it.
#[derive(Debug, Clone, Copy)]
pub struct InlineArray {
    /// Address of value 0.
    pub values: *mut u8,
    /// Bytes from one value to the next.
    pub stride: u32,
    /// Number of values: indices at or above it make the lookup return NULL.
    pub max_entries: u32,
    /// One `u32` mark word per index.
    pub marks: *const u32,
    /// The bit a lookup must find (or set, through [`JitMap::lookup`]) in the mark word.
    pub mark_bit: u32,
}

/// How JIT code reaches one map directly. Every pointer must stay valid while the
/// [`JitMapResolver`] that returned it lives (the JIT image keeps the resolver).
#[derive(Debug, Clone, Copy)]
pub struct JitMap {
    /// First argument of the functions below.
    pub handle: *const (),
    /// `bpf_map_lookup_elem(map, key)`.
    pub lookup: Option<JitMapFn>,
    /// `bpf_map_update_elem(map, key, value, flags)`.
    pub update: Option<JitMapFn>,
    /// `bpf_map_delete_elem(map, key)`.
    pub delete: Option<JitMapFn>,
    /// Inline lookups (needs `lookup` for the unmarked case).
    pub inline_array: Option<InlineArray>,
}

/// Resolves the map values `lddw` loads (map tokens) to direct entry points for the JIT.
pub trait JitMapResolver: Send + Sync {
    /// Identity of the maps the tokens name: fast paths run only when the running
    /// [`Helpers::map_set_id`](super::Helpers::map_set_id) returns the same value (equal ids
    /// must mean the same maps).
    fn map_set_id(&self) -> u64;

    /// The map `token` names, if JIT code may reach it directly.
    fn resolve(&self, token: u64) -> Option<JitMap>;
}

/// Compiled native code of a program.
pub struct JitProgram {
    /// Read+execute copy of the generated code (W^X, see [`Mmap::executable`]).
    code: Mmap,
    /// Calls no helper but the map lookup/update/delete and no `callx` (see [`JitHook`]);
    /// then its native calls keep xmm0-7.
    leaf: bool,
    len: usize,
    /// Native entry of each instruction that starts a function (for `callx` and callbacks);
    /// 0 elsewhere.
    func_table: Box<[u64]>,
    /// The resolver the map fast paths were compiled against: keeps alive the map memory and
    /// the map handles that the generated code points at.
    _maps: Option<Arc<dyn JitMapResolver>>,
    /// `_maps`' [`JitMapResolver::map_set_id`].
    map_set: Option<u64>,
}

// SAFETY: the code mapping is immutable (read+execute) after `compile` and the function table is
// never written after it; sharing them between threads is sound. The map fast paths in the code
// reach shared-memory maps built for concurrent use (from many processes), through handles that
// `_maps` (`Send + Sync`) keeps alive.
unsafe impl Send for JitProgram {}
// SAFETY: as above, no interior mutability.
unsafe impl Sync for JitProgram {}

impl std::fmt::Debug for JitProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitProgram")
            .field("size", &self.code.len())
            .finish()
    }
}

impl JitProgram {
    /// The generated machine code (for disassembly when debugging).
    pub fn code(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the read+execute mapping hold the code; the mapping
        // lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.code.as_ptr(), self.len) }
    }

    /// Size of the generated code mapping in bytes.
    pub fn code_size(&self) -> usize {
        self.code.len()
    }
}
