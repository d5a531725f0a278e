//! Helper-call interface shared by the interpreter, the JIT and the rbpf adapter.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{HelperError, VmError};
use super::memory::MemoryMap;
use super::program::{Program, FUNC_PTR_MASK, FUNC_PTR_TAG};

/// Runs a BPF function of the current program on behalf of a helper (implemented by the
/// interpreter and the JIT).
pub(crate) trait FuncInvoker {
    /// Run the function tagged `func` (a `BPF_PSEUDO_FUNC` value) with r1..r5 = `args` in a
    /// fresh stack frame one call level below the helper's caller; returns its r0.
    fn invoke(
        &mut self,
        func: u64,
        args: [u64; 5],
        mem: &mut MemoryMap<'_>,
        helpers: &mut dyn Helpers,
    ) -> Result<u64, VmError>;
}

/// What a helper sees of the running program.
pub struct CallContext<'m, 'a> {
    pc: usize,
    mem: &'m mut MemoryMap<'a>,
    tail_call: Option<Arc<Program>>,
    invoker: Option<&'m mut dyn FuncInvoker>,
    checked: bool,
}

impl<'m, 'a> CallContext<'m, 'a> {
    pub(crate) fn new(pc: usize, mem: &'m mut MemoryMap<'a>) -> Self {
        Self {
            pc,
            mem,
            tail_call: None,
            invoker: None,
            checked: false,
        }
    }

    pub(crate) fn with_invoker(
        pc: usize,
        mem: &'m mut MemoryMap<'a>,
        invoker: &'m mut dyn FuncInvoker,
        checked: bool,
    ) -> Self {
        Self {
            pc,
            mem,
            tail_call: None,
            invoker: Some(invoker),
            checked,
        }
    }

    /// Whether the program runs on the checked interpreter (pointer arguments must lie in
    /// registered regions) rather than on a JIT trusting the kernel verifier.
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// `len` bytes of program memory at `addr` that a helper argument points to (a key, a
    /// value, a buffer). On the interpreter only memory inside the program's stack or a
    /// registered region is returned (`None` otherwise). On the JIT (and rbpf) the pointer is
    /// trusted, as the program's own loads are: it passed the kernel verifier, which checked
    /// the argument (the contract of [`JitProgram::run`](super::jit::JitProgram::run)); only a
    /// NULL or wrapping range is refused.
    pub fn read_mem(&mut self, addr: u64, len: usize) -> Option<&[u8]> {
        if self.checked {
            return self.mem.read_bytes(addr, len);
        }
        if len == 0 {
            return Some(&[]);
        }
        if addr == 0 || addr.checked_add(len as u64).is_none() {
            return None;
        }
        // SAFETY: verified program (see above): the verifier proved `[addr, addr+len)` is
        // readable memory of the program (stack, map value, context) for the helper call.
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
    }

    /// Two argument buffers at once (e.g. the key and the value of `bpf_map_update_elem`),
    /// each as [`read_mem`](Self::read_mem) checks it.
    pub fn read_mem2(&mut self, a: (u64, usize), b: (u64, usize)) -> Option<(&[u8], &[u8])> {
        for (addr, len) in [a, b] {
            let ok = if self.checked {
                self.mem.check(addr, len as u64, false)
            } else {
                len == 0 || (addr != 0 && addr.checked_add(len as u64).is_some())
            };
            if !ok {
                return None;
            }
        }
        let slice = |(addr, len): (u64, usize)| -> &[u8] {
            if len == 0 {
                return &[];
            }
            // SAFETY: checked above like `read_mem`: inside a registered region or the
            // interpreter's stack, or (JIT) a verifier-checked argument.
            unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
        };
        Some((slice(a), slice(b)))
    }

    /// Writable counterpart of [`read_mem`](Self::read_mem) (a helper's output buffer).
    pub fn write_mem(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        if self.checked {
            return self.mem.write_bytes(addr, len);
        }
        if len == 0 {
            return Some(&mut []);
        }
        if addr == 0 || addr.checked_add(len as u64).is_none() {
            return None;
        }
        // SAFETY: verified program: the verifier proved `[addr, addr+len)` is writable memory
        // of the program for the helper call.
        Some(unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) })
    }

    /// Index of the calling instruction.
    pub fn pc(&self) -> usize {
        self.pc
    }

    /// The memory map of the run: helpers read program memory through it and register regions
    /// they hand out (see [`MemoryMap::add_raw`]).
    pub fn memory(&mut self) -> &mut MemoryMap<'a> {
        self.mem
    }

    /// Request a tail call: when the helper returns, the current program is replaced by `prog`
    /// (with the same r1). Used by an implementation of `bpf_tail_call`.
    pub fn tail_call(&mut self, prog: Arc<Program>) {
        self.tail_call = Some(prog);
    }

    pub(crate) fn take_tail_call(&mut self) -> Option<Arc<Program>> {
        self.tail_call.take()
    }

    /// Whether `v` is a function value (`lddw rX, <func>` with `BPF_PSEUDO_FUNC`).
    pub fn is_function(v: u64) -> bool {
        v & FUNC_PTR_MASK == FUNC_PTR_TAG
    }

    /// Call the BPF subprogram `func` (a `BPF_PSEUDO_FUNC` value the program passed to the
    /// helper, e.g. the callback of `bpf_loop`) with r1..r5 = `args` and return its r0.
    ///
    /// The callback runs on the same VM (interpreter or JIT) in a fresh 512-byte stack frame
    /// one call level below the helper's caller, so it counts toward the call-depth limit
    /// ([`VmError::CallDepth`]); it may read the caller's stack through pointers it was given.
    /// Helpers it calls go to `helpers` (pass the helper's own `self`). A fault or any other
    /// error inside the callback is returned; return it from the helper as
    /// [`HelperError::Callback`] (`?` converts) and the VM reports the original error. Tail
    /// calls inside a callback are refused ([`VmError::TailCallInSubprog`]).
    ///
    /// On the interpreter, memory the helper hands to the callback (key/value pointers) must
    /// be registered in [`memory`](Self::memory) first. rbpf cannot run callbacks
    /// ([`VmError::CallbackUnsupported`]).
    pub fn call_function(
        &mut self,
        helpers: &mut dyn Helpers,
        func: u64,
        args: [u64; 5],
    ) -> Result<u64, VmError> {
        match self.invoker.as_mut() {
            Some(inv) => inv.invoke(func, args, self.mem, helpers),
            None => Err(VmError::CallbackUnsupported { pc: self.pc }),
        }
    }
}

/// A stateful table of helper functions.
pub trait Helpers {
    /// Call helper `id` with r1..r5. `Err` aborts the program.
    fn call(
        &mut self,
        id: u32,
        args: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError>;

    /// Identity of the maps this helper set's map tokens name, compared with
    /// [`JitMapResolver::map_set_id`](super::jit::JitMapResolver::map_set_id): JIT images
    /// compiled against the same maps call them directly (the map fast paths of
    /// [`super::jit`]). `None` (the default) keeps every call on [`call`](Self::call).
    fn map_set_id(&self) -> Option<u64> {
        None
    }
}

/// No helpers at all: every call fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHelpers;

impl Helpers for NoHelpers {
    fn call(
        &mut self,
        id: u32,
        _args: [u64; 5],
        _ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        Err(HelperError::Unknown(id))
    }
}

/// Boxed helper closure.
pub type HelperFn<'e> =
    Box<dyn FnMut([u64; 5], &mut CallContext<'_, '_>) -> Result<u64, HelperError> + 'e>;

/// Helpers as closures (which may capture any environment) keyed by id.
#[derive(Default)]
pub struct HelperTable<'e> {
    fns: HashMap<u32, HelperFn<'e>>,
}

impl<'e> HelperTable<'e> {
    /// A table with no helpers: every call fails with [`HelperError::Unknown`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Register (or replace) helper `id`.
    pub fn register(
        &mut self,
        id: u32,
        f: impl FnMut([u64; 5], &mut CallContext<'_, '_>) -> Result<u64, HelperError> + 'e,
    ) -> &mut Self {
        self.fns.insert(id, Box::new(f));
        self
    }

    /// Whether helper `id` is registered.
    pub fn contains(&self, id: u32) -> bool {
        self.fns.contains_key(&id)
    }

    /// The registered helper ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.fns.keys().copied()
    }
}

impl Helpers for HelperTable<'_> {
    fn call(
        &mut self,
        id: u32,
        args: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        match self.fns.get_mut(&id) {
            Some(f) => f(args, ctx),
            None => Err(HelperError::Unknown(id)),
        }
    }
}
