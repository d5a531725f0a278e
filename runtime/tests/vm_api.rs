//! Behaviour of the VM API on the interpreter and the JIT: stateful helpers, regions handed out
//! by helpers, faults, per-frame stacks, call depth, callx, tail calls, relocations.

use std::cell::Cell;
use std::sync::Arc;

use bpftime_runtime::vm::insn::*;
use bpftime_runtime::vm::{
    asm::assemble, interpret, CallContext, HelperError, HelperTable, Helpers, Insn, InterpOptions,
    MemoryMap, Program, VmError,
};

fn prog(src: &str) -> Program {
    Program::new(assemble(src).expect("assemble")).expect("load")
}

fn interp(p: &Program, args: [u64; 5], h: &mut dyn Helpers) -> Result<u64, VmError> {
    let mut mem = MemoryMap::new();
    interpret(
        p,
        args,
        &mut mem,
        h,
        InterpOptions {
            insn_budget: Some(100_000),
        },
    )
}

fn jit(p: &Program, args: [u64; 5], h: &mut dyn Helpers) -> Result<u64, VmError> {
    let mut mem = MemoryMap::new();
    // SAFETY: the test programs only use their stack and memory handed out by test helpers.
    unsafe { p.jit()?.run(args, &mut mem, h) }
}

/// Run on both engines and check they agree; return the common result.
fn both(
    p: &Program,
    args: [u64; 5],
    mk: impl Fn() -> HelperTable<'static>,
) -> Result<u64, VmError> {
    let a = interp(p, args, &mut mk());
    let b = jit(p, args, &mut mk());
    assert_eq!(a, b, "interpreter and JIT disagree");
    a
}

#[test]
fn stateful_helper_closure() {
    let p = prog("mov %r1, 5\ncall 1\nmov %r1, 7\ncall 1\nexit");
    for engine in 0..2 {
        let total = Cell::new(0u64);
        let mut h = HelperTable::new();
        h.register(1, |a: [u64; 5], _c: &mut CallContext<'_, '_>| {
            total.set(total.get() + a[0]);
            Ok::<u64, HelperError>(total.get())
        });
        let r = if engine == 0 {
            interp(&p, [0; 5], &mut h)
        } else {
            jit(&p, [0; 5], &mut h)
        };
        assert_eq!(r, Ok(12));
        drop(h);
        assert_eq!(total.get(), 12);
    }
}

#[test]
fn helper_registers_region_during_run() {
    let value: &'static mut [u64; 2] = Box::leak(Box::new([40, 0]));
    let addr = value.as_mut_ptr() as u64;
    let mk = move || {
        let mut h = HelperTable::new();
        h.register(1, move |_a: [u64; 5], c: &mut CallContext<'_, '_>| {
            // SAFETY: `value` is leaked, valid for the whole process.
            unsafe { c.memory().add_raw(addr, 16, true) };
            Ok::<u64, HelperError>(addr)
        });
        h
    };
    let p = prog(
        "call 1\njeq %r0, 0, +5\nldxdw %r1, [%r0]\nadd %r1, 1\nstxdw [%r0], %r1\n\
         mov %r2, 1\nlock add [%r0+8], %r2\nldxdw %r0, [%r0]\nexit",
    );
    assert_eq!(interp(&p, [0; 5], &mut mk()), Ok(41));
    assert_eq!(jit(&p, [0; 5], &mut mk()), Ok(42));
    // SAFETY: reading the leaked value after the runs.
    let v = unsafe { std::ptr::read_volatile(addr as *const [u64; 2]) };
    assert_eq!(v, [42, 2]);
    // Past the end of the region: a fault on the interpreter naming instruction and address.
    let p = prog("call 1\nldxdw %r1, [%r0+16]\nexit");
    let e = interp(&p, [0; 5], &mut mk()).unwrap_err();
    assert_eq!(
        e,
        VmError::MemoryFault {
            pc: 1,
            addr: addr + 16,
            len: 8,
            kind: bpftime_runtime::vm::AccessKind::Load
        }
    );
    assert!(e.to_string().contains("instruction 1"), "{e}");
}

#[test]
fn faults_are_errors() {
    let p = prog("mov %r1, 0x10\nldxw %r0, [%r1]\nexit");
    let e = interp(&p, [0; 5], &mut HelperTable::new()).unwrap_err();
    assert!(
        matches!(
            e,
            VmError::MemoryFault {
                pc: 1,
                addr: 0x10,
                ..
            }
        ),
        "{e}"
    );
    // Stack bounds: just below the frame of the main program belongs to nothing.
    let p = prog("stdw [%r10+0], 1\nexit");
    assert!(matches!(
        interp(&p, [0; 5], &mut HelperTable::new()),
        Err(VmError::MemoryFault { pc: 0, .. })
    ));
    // Read-only region.
    let data = [1u8, 2, 3, 4];
    let mut mem = MemoryMap::new();
    mem.add_slice(&data);
    let p = prog("stb [%r1], 9\nexit");
    let r = interpret(
        &p,
        [data.as_ptr() as u64, 0, 0, 0, 0],
        &mut mem,
        &mut HelperTable::new(),
        InterpOptions::default(),
    );
    assert!(matches!(r, Err(VmError::MemoryFault { pc: 0, .. })));
    // Budget.
    let p = prog("ja -1\nexit");
    assert_eq!(
        interp(&p, [0; 5], &mut HelperTable::new()),
        Err(VmError::Budget(100_000))
    );
}

#[test]
fn frames_have_their_own_stack_and_preserve_r6_r9() {
    let p = prog(
        "mov %r6, 1\nstdw [%r10-8], 42\ncall local f\nldxdw %r0, [%r10-8]\nadd %r0, %r6\nexit\n\
         f:\nstdw [%r10-8], 99\nmov %r6, 100\nmov %r0, 0\nexit",
    );
    assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(43));
    // A callee may use a pointer into its caller's frame.
    let p = prog(
        "stdw [%r10-8], 5\nmov %r1, %r10\nadd %r1, -8\ncall local f\nldxdw %r0, [%r10-8]\nexit\n\
         f:\nldxdw %r2, [%r1]\nadd %r2, 1\nstxdw [%r1], %r2\nexit",
    );
    assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(6));
}

#[test]
fn call_depth_is_limited() {
    let p = prog("call local f\nexit\nf:\ncall local f\nexit");
    let r = both(&p, [0; 5], HelperTable::new);
    assert!(
        matches!(r, Err(VmError::CallDepth { pc: 2, max: 8 })),
        "{r:?}"
    );
    // Depth 7 (8 frames) is fine.
    let mut src = String::new();
    for k in 0..7 {
        src += &format!("f{k}:\ncall local f{}\nadd %r0, 1\nexit\n", k + 1);
    }
    src += "f7:\nmov %r0, 0\nexit\n";
    assert_eq!(both(&prog(&src), [0; 5], HelperTable::new), Ok(7));
}

#[test]
fn callx_function_pointer_and_helper_id() {
    let insns = vec![
        Insn::new(LDDW, 2, BPF_PSEUDO_FUNC, 0, 4),
        Insn::new(0, 0, 0, 0, 0),
        Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, 1, 0, 0, 20),
        Insn::new(BPF_JMP | BPF_CALL | BPF_X, 2, 0, 0, 0),
        Insn::new(EXIT, 0, 0, 0, 0),
        Insn::new(BPF_ALU64 | BPF_MOV | BPF_X, 0, 1, 0, 0),
        Insn::new(BPF_ALU64 | BPF_ADD | BPF_K, 0, 0, 0, 1),
        Insn::new(EXIT, 0, 0, 0, 0),
    ];
    let p = Program::new(insns).unwrap();
    assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(21));
    let mk = || {
        let mut h = HelperTable::new();
        h.register(7, |a: [u64; 5], _c: &mut CallContext<'_, '_>| {
            Ok::<u64, HelperError>(a[0] * 2)
        });
        h
    };
    let p = prog("mov %r1, 21\nmov %r3, 7\ncall %r3\nexit");
    assert_eq!(both(&p, [0; 5], mk), Ok(42));
}

#[test]
fn tail_call_replaces_program() {
    let target = Arc::new(prog("mov %r0, %r1\nadd %r0, 100\nexit"));
    let p = prog("mov %r1, 5\ncall 12\nmov %r0, 1\nexit");
    let mk = || {
        let t = target.clone();
        let mut h = HelperTable::new();
        h.register(12, move |_a: [u64; 5], c: &mut CallContext<'_, '_>| {
            c.tail_call(t.clone());
            Ok::<u64, HelperError>(0)
        });
        h
    };
    assert_eq!(interp(&p, [0; 5], &mut mk()), Ok(105));
    assert_eq!(jit(&p, [0; 5], &mut mk()), Ok(105));
    // A program tail-calling itself forever hits the limit.
    let selfp: Arc<std::sync::OnceLock<Arc<Program>>> = Arc::new(std::sync::OnceLock::new());
    let sp = selfp.clone();
    let mut h = HelperTable::new();
    h.register(12, move |_a: [u64; 5], c: &mut CallContext<'_, '_>| {
        c.tail_call(sp.get().unwrap().clone());
        Ok::<u64, HelperError>(0)
    });
    let looping = Arc::new(prog("call 12\nexit"));
    selfp.set(looping.clone()).unwrap();
    assert_eq!(
        interp(&looping, [0; 5], &mut h),
        Err(VmError::TailCallLimit(33))
    );
    assert_eq!(
        jit(&looping, [0; 5], &mut h),
        Err(VmError::TailCallLimit(33))
    );
}

#[test]
fn helper_errors_abort() {
    let mk = || {
        let mut h = HelperTable::new();
        h.register(3, |_a: [u64; 5], _c: &mut CallContext<'_, '_>| {
            Err::<u64, HelperError>(HelperError::other(std::io::Error::other("boom")))
        });
        h
    };
    let p = prog("mov %r0, 1\ncall 3\nmov %r0, 2\nexit");
    let e = both(&p, [0; 5], mk).unwrap_err();
    assert!(matches!(e, VmError::Helper { pc: 1, id: 3, .. }), "{e}");
    let p = prog("call 99\nexit");
    assert!(matches!(
        both(&p, [0; 5], HelperTable::new),
        Err(VmError::Helper { pc: 0, id: 99, .. })
    ));
}

#[test]
fn lddw_relocations_use_resolver() {
    let insns = vec![
        Insn::new(LDDW, 0, BPF_PSEUDO_MAP_FD, 0, 7),
        Insn::new(0, 0, 0, 0, 0),
        Insn::new(LDDW, 1, BPF_PSEUDO_MAP_VALUE, 0, 3),
        Insn::new(0, 0, 0, 0, 16),
        Insn::new(BPF_ALU64 | BPF_ADD | BPF_X, 0, 1, 0, 0),
        Insn::new(EXIT, 0, 0, 0, 0),
    ];
    let p = Program::with_relocations(insns.clone(), |r| match r.src {
        BPF_PSEUDO_MAP_FD => Ok(0xdead_0000_0000 + r.imm as u64),
        BPF_PSEUDO_MAP_VALUE => Ok(0x1000 * r.imm as u64 + r.next_imm as u64),
        _ => Err("unexpected".into()),
    })
    .unwrap();
    assert_eq!(
        both(&p, [0; 5], HelperTable::new),
        Ok(0xdead_0000_0007 + 0x3010)
    );
    assert!(matches!(
        Program::new(insns),
        Err(VmError::Relocation { pc: 0, .. })
    ));
}

#[test]
fn jit_atomics_with_r0_operands() {
    let cases = [
        // fetch or with src = r0
        ("stdw [%r10-8], 6\nmov %r0, 3\nlock fetch or [%r10-8], %r0\nldxdw %r1, [%r10-8]\nlsh %r0, 8\nor %r0, %r1\nexit", 0x607),
        // fetch xor with base = r0
        ("stdw [%r10-8], 6\nmov %r0, %r10\nmov %r1, 3\nlock fetch xor [%r0-8], %r1\nldxdw %r0, [%r10-8]\nlsh %r1, 8\nor %r0, %r1\nexit", 0x605),
        // fetch and 32 with src = r0, upper half untouched
        ("lddw %r1, 0x1122334455667788\nstxdw [%r10-8], %r1\nmov %r0, 0xf0\nlock fetch and32 [%r10-8], %r0\nldxdw %r1, [%r10-8]\nxor %r0, %r1\nexit", 0x1122334455667708),
        // cmpxchg32 result is zero-extended
        ("stw [%r10-4], 9\nlddw %r0, 0xffffffff00000009\nmov %r1, 1\nlock cmpxchg32 [%r10-4], %r1\nexit", 9),
        // xchg with base register = src register
        // (r1 gets the old value 4; the slot gets the address, returned in the high bits as a
        // check that it is the stack address r10 - 8)
        ("mov %r1, %r10\nadd %r1, -8\nstdw [%r10-8], 4\nlock xchg [%r1+0], %r1\nldxdw %r2, [%r10-8]\nmov %r3, %r10\nadd %r3, -8\nmov %r0, 1\njeq %r2, %r3, same\nmov %r0, 0\nsame:\nlsh %r0, 8\nor %r0, %r1\nexit", 0x104),
    ];
    for (src, want) in cases {
        let p = prog(src);
        assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(want), "{src}");
    }
}

#[test]
fn shifts_and_division_with_rcx_rdx_aliasing() {
    // r4 is rcx and r3 is rdx in the JIT.
    // Expected values by the ISA (RFC 9669): shift counts are masked to 63 / 31, signed
    // division truncates toward zero, 32-bit results are zero-extended.
    let cases: [(&str, u64); 8] = [
        ("mov %r4, 3\nmov %r0, 1\nlsh %r4, %r4\nmov %r0, %r4\nexit", 3 << 3),
        ("mov %r4, 3\nmov %r1, 5\nlsh %r1, %r4\nmov %r0, %r1\nadd %r0, %r4\nexit", 43),
        ("mov %r3, 100\nmov %r4, 7\ndiv %r3, %r4\nmov %r0, %r3\nexit", 14),
        ("mov %r3, 100\nmov %r0, 7\nmod %r0, %r3\nmov %r1, %r0\nmov %r0, 100\nmod %r0, %r1\nexit", 2),
        ("mov %r0, -100\nmov %r3, 7\nsdiv %r0, %r3\nadd %r0, %r3\nexit", (-7i64) as u64),
        ("mov %r3, -100\nsmod32 %r3, %r3\nmov %r0, %r3\nexit", 0),
        ("mov32 %r0, -1\nmov %r4, 36\nrsh32 %r0, %r4\nexit", 0x0fff_ffff),
        ("mov %r4, -1\narsh %r4, %r4\nmov %r0, %r4\nexit", u64::MAX),
    ];
    for (src, want) in cases {
        assert_eq!(
            both(&prog(src), [0; 5], HelperTable::new),
            Ok(want),
            "{src}"
        );
    }
}

#[test]
fn loops_back_to_a_function_start() {
    // Loop to instruction 0 of main and to the first instruction of a subprogram.
    let p = prog(
        "add %r0, 1\njlt %r0, 10, -2\nmov %r1, 0\ncall local f\nexit\n\
         f:\nadd %r1, 3\njlt %r1, 30, -2\nadd %r0, %r1\nexit",
    );
    assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(40));
    // Falling through into a subprogram's code behaves like the interpreter.
    let p = prog("mov %r0, 5\nja +0\nf:\nadd %r0, 1\nexit\ng:\ncall local f\nexit");
    assert_eq!(both(&p, [0; 5], HelperTable::new), Ok(6));
}
