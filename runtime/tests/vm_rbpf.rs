//! The rbpf 0.4 adapter: refusals name the instruction, helpers reach caller state.

use std::cell::Cell;

use bpftime_runtime::vm::asm::assemble;
use bpftime_runtime::vm::rbpf::{rbpf_check, run_rbpf, RbpfMode};
use bpftime_runtime::vm::{
    run_with_ctx, CallContext, HelperError, HelperTable, InterpOptions, MemoryMap, Program,
    VmError, VmKind,
};

fn prog(src: &str) -> Program {
    Program::new(assemble(src).unwrap()).unwrap()
}

#[test]
fn refuses_unsupported_instructions_by_index() {
    let p = prog("mov %r0, 0\nstdw [%r10-8], 1\nmov %r1, 1\nlock add [%r10-8], %r1\nexit");
    for mode in [RbpfMode::Jit, RbpfMode::Interpreter] {
        match rbpf_check(&p, mode) {
            Err(VmError::RbpfRefused {
                pc: 3,
                opc: 0xdb,
                reason,
            }) => {
                assert!(reason.contains("atomic"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
    let cases = [
        ("mov %r0, 7\nsdiv %r0, 2\nexit", 1),
        ("mov %r1, 7\nmovsx832 %r0, %r1\nexit", 1),
        ("ldxsb %r0, [%r10-1]\nexit", 0),
        ("mov %r0, 1\nbswap16 %r0\nexit", 1),
        ("ja32 +0\nmov %r0, 1\nexit", 0),
        ("mov %r1, 1\ncall %r1\nexit", 1),
        ("call local f\nexit\nf:\nmov %r0, 1\nexit", 0),
    ];
    for (src, pc) in cases {
        let e = rbpf_check(&prog(src), RbpfMode::Jit).unwrap_err();
        assert!(
            matches!(e, VmError::RbpfRefused { pc: p, .. } if p == pc),
            "{src}: {e}"
        );
    }
    // Mode-specific refusals.
    let neg_imm = prog("mov %r0, 1\njeq %r0, -1, +1\nmov %r0, 2\nexit");
    assert!(rbpf_check(&neg_imm, RbpfMode::Jit).is_ok());
    assert!(rbpf_check(&neg_imm, RbpfMode::Interpreter).is_err());
    let mov32 = prog("mov32 %r0, %r1\nexit");
    assert!(rbpf_check(&mov32, RbpfMode::Jit).is_err());
    assert!(rbpf_check(&mov32, RbpfMode::Interpreter).is_ok());
}

#[test]
fn helpers_reach_caller_state_on_both_rbpf_engines() {
    let p = prog("mov %r1, 5\ncall 1\nmov %r1, 7\ncall 1\nexit");
    for mode in [RbpfMode::Jit, RbpfMode::Interpreter] {
        let total = Cell::new(0u64);
        let mut h = HelperTable::new();
        h.register(1, |a: [u64; 5], _c: &mut CallContext<'_, '_>| {
            total.set(total.get() + a[0]);
            Ok::<u64, HelperError>(total.get())
        });
        let mut mem = MemoryMap::new();
        let mut data = [0u8; 8];
        // SAFETY: the program touches no memory.
        let r = unsafe { run_rbpf(&p, &mut data, &mut mem, &mut h, mode) };
        assert_eq!(r, Ok(12), "{mode:?}");
        drop(h);
        assert_eq!(total.get(), 12);
    }
}

#[test]
fn helper_errors_are_reported_after_the_run() {
    let p = prog("call 2\nmov %r0, 3\nexit");
    let mut h = HelperTable::new();
    h.register(2, |_a: [u64; 5], _c: &mut CallContext<'_, '_>| {
        Err::<u64, HelperError>(HelperError::other(std::io::Error::other("nope")))
    });
    let mut mem = MemoryMap::new();
    // SAFETY: the program touches no memory.
    let r = unsafe { run_rbpf(&p, &mut [], &mut mem, &mut h, RbpfMode::Jit) };
    assert!(matches!(r, Err(VmError::Helper { id: 2, .. })), "{r:?}");
}

#[test]
fn run_with_ctx_on_every_vm() {
    let p = prog("ldxb %r0, [%r1+2]\nadd %r0, 1\nexit");
    for kind in [
        VmKind::Interpreter,
        VmKind::Jit,
        VmKind::Rbpf,
        VmKind::RbpfInterpreter,
    ] {
        let mut ctx = [1u8, 2, 41, 4];
        let mut mem = MemoryMap::new();
        // SAFETY: the program reads ctx[2] only.
        let r = unsafe {
            run_with_ctx(
                kind,
                &p,
                &mut ctx,
                &mut mem,
                &mut HelperTable::new(),
                InterpOptions::default(),
            )
        };
        assert_eq!(r, Ok(42), "{kind:?}");
    }
    assert_eq!("rbpf".parse::<VmKind>(), Ok(VmKind::Rbpf));
}
