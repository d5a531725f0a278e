//! Helper-call interface shared by the interpreter, the JIT and the rbpf adapter.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::HelperError;
use super::memory::MemoryMap;
use super::program::Program;

/// What a helper sees of the running program.
pub struct CallContext<'m, 'a> {
    pc: usize,
    mem: &'m mut MemoryMap<'a>,
    tail_call: Option<Arc<Program>>,
}

impl<'m, 'a> CallContext<'m, 'a> {
    pub(crate) fn new(pc: usize, mem: &'m mut MemoryMap<'a>) -> Self {
        Self {
            pc,
            mem,
            tail_call: None,
        }
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

    pub fn contains(&self, id: u32) -> bool {
        self.fns.contains_key(&id)
    }

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
