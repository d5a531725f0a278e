//! Shared harness of the `helpers_*` tests: a real shared-memory object per test and VM,
//! removed on drop, and runs of assembled programs through `RuntimeHelpers`.
#![allow(dead_code)]

use std::sync::Arc;

use bpftime_runtime::helpers::RuntimeHelpers;
use bpftime_runtime::maps::{MapDef, MapType, ShmObject};
use bpftime_runtime::vm::{asm::assemble, InterpOptions, Program, VmError};

pub struct Env {
    pub obj: ShmObject,
    pub h: RuntimeHelpers,
    pub jit: bool,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.obj.remove();
    }
}

pub fn def(name: &str, t: MapType, key: u32, value: u32, max: u32) -> MapDef {
    MapDef::new(t, key, value, max, name)
}

impl Env {
    /// A fresh object `t-helpers-<tag>-<pid>-<vm>` with `defs`.
    pub fn new(tag: &str, jit: bool, defs: &[MapDef]) -> Self {
        let name = format!("t-helpers-{tag}-{}-{}", std::process::id(), jit as u8);
        let _ = bpftime_runtime::maps::remove_object(&name);
        let obj = ShmObject::create(&name, defs).expect("create object");
        let h = RuntimeHelpers::from_object(&obj);
        Self { obj, h, jit }
    }

    pub fn load(&self, src: &str) -> Arc<Program> {
        Arc::new(
            self.h
                .load_program(assemble(src).expect("assemble"))
                .expect("load"),
        )
    }

    pub fn run(&mut self, p: &Program, ctx: &mut [u8]) -> Result<u64, VmError> {
        if self.jit {
            // SAFETY: the test programs only touch their context, stack, and memory the
            // helpers hand out (as the kernel verifier would require).
            unsafe { self.h.run_jit(p, ctx) }
        } else {
            self.h.run_interpreter(
                p,
                ctx,
                InterpOptions {
                    insn_budget: Some(10_000_000),
                },
            )
        }
    }
}

/// Both VMs.
pub const VMS: [bool; 2] = [false, true];

/// u64 at `off` of `ctx`.
pub fn at(ctx: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(ctx[off..off + 8].try_into().unwrap())
}

pub fn put(ctx: &mut [u8], off: usize, v: u64) {
    ctx[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// `-errno` as a helper returns it.
pub fn err(errno: i32) -> u64 {
    (-(errno as i64)) as u64
}

/// Assembly that stores r0 at `[r6+off]` (programs keep the context in r6).
pub fn save(off: usize) -> String {
    format!("stxdw [%r6+{off}], %r0\n")
}

/// `r2 = r10 + off` style pointer setup.
pub fn stack_ptr(reg: u8, off: i32) -> String {
    format!("mov %r{reg}, %r10\nadd %r{reg}, {off}\n")
}

/// `program` as a published uprobe program of the given VM (what an agent's hook runs).
pub fn runnable(
    program: Arc<Program>,
    vm: bpftime_runtime::vm::VmKind,
) -> bpftime_runtime::loaded::RunnableProgram {
    bpftime_runtime::loaded::RunnableProgram {
        name: "test".into(),
        section: "uprobe/test".into(),
        attach_target: String::new(),
        prog_type: 2,
        vm,
        verified: true,
        program,
    }
}

/// The first 8 bytes of map `map`'s value at `key`, as a u64 (the entry must exist).
pub fn value_u64(obj: &ShmObject, map: &str, key: &[u8]) -> u64 {
    let v = obj
        .map(map)
        .unwrap()
        .lookup(key)
        .unwrap()
        .expect("entry")
        .read();
    u64::from_le_bytes(v[..8].try_into().unwrap())
}
