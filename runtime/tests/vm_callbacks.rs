//! Helpers calling BPF callbacks (`CallContext::call_function`) on the interpreter and the JIT:
//! results, fresh frames, preserved caller state, depth limit, fault propagation.

use std::sync::Arc;

use bpftime_runtime::vm::{
    asm::assemble, interpret, CallContext, HelperError, Helpers, InterpOptions, MemoryMap, Program,
    VmError,
};

fn prog(src: &str) -> Program {
    Program::new(assemble(src).expect("assemble")).expect("load")
}

/// Helper 181: `loop(n, cb, ctx)` calling `cb(i, ctx)` until it returns non-zero; helper 1
/// returns 7; helper 2 requests a tail call into `tail`.
struct LoopHelpers {
    tail: Option<Arc<Program>>,
}

impl Helpers for LoopHelpers {
    fn call(
        &mut self,
        id: u32,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        match id {
            181 => {
                let mut i = 0;
                while i < a[0] {
                    let r = ctx.call_function(self, a[1], [i, a[2], 0, 0, 0])?;
                    i += 1;
                    if r != 0 {
                        break;
                    }
                }
                Ok(i)
            }
            1 => Ok(7),
            2 => {
                if let Some(p) = &self.tail {
                    ctx.tail_call(p.clone());
                }
                Ok(0)
            }
            _ => Err(HelperError::Unknown(id)),
        }
    }
}

fn run(p: &Program, jit: bool) -> Result<u64, VmError> {
    let mut h = LoopHelpers { tail: None };
    run_with(p, jit, &mut h)
}

fn run_with(p: &Program, jit: bool, h: &mut LoopHelpers) -> Result<u64, VmError> {
    let mut mem = MemoryMap::new();
    if jit {
        // SAFETY: the test programs only touch their own stacks.
        unsafe { p.jit()?.run([0; 5], &mut mem, h) }
    } else {
        interpret(
            p,
            [0; 5],
            &mut mem,
            h,
            InterpOptions {
                insn_budget: Some(1_000_000),
            },
        )
    }
}

fn both(p: &Program) -> Result<u64, VmError> {
    let a = run(p, false);
    let b = run(p, true);
    assert_eq!(a, b, "interpreter and JIT disagree");
    a
}

/// Sums the loop indices into a caller stack slot; the callback scribbles on its own stack and
/// clobbers r6-r9, which the caller must not see.
const SUM: &str = "
    mov %r6, 100
    mov %r9, 900
    stdw [%r10-8], 0
    stdw [%r10-16], 55
    mov %r1, 5
    lddw %r2, cb
    mov %r3, %r10
    add %r3, -8
    call 181
    mov %r7, %r0          # iterations
    ldxdw %r0, [%r10-8]   # sum
    ldxdw %r1, [%r10-16]
    jne %r1, 55, bad
    jne %r6, 100, bad
    jne %r9, 900, bad
    mul %r7, 1000
    add %r0, %r7
    exit
bad:
    mov %r0, -1
    exit
cb:
    stdw [%r10-16], 77     # own frame
    mov %r6, 1
    mov %r9, 2
    ldxdw %r3, [%r2]
    add %r3, %r1
    stxdw [%r2], %r3
    mov %r0, 0
    exit
";

#[test]
fn loop_callback_sums_on_both_vms() {
    let p = prog(SUM);
    assert_eq!(both(&p), Ok(5 * 1000 + 10));
}

#[test]
fn callback_early_stop_and_helper_inside_callback() {
    let p = prog(
        "
        stdw [%r10-8], 0
        mov %r1, 100
        lddw %r2, cb
        mov %r3, %r10
        add %r3, -8
        call 181
        ldxdw %r1, [%r10-8]
        mul %r0, 1000
        add %r0, %r1
        exit
    cb:
        mov %r6, %r2
        mov %r7, %r1
        call 1              # helper from inside the callback
        ldxdw %r3, [%r6]
        add %r3, %r0
        stxdw [%r6], %r3
        mov %r0, 0
        jne %r7, 3, out
        mov %r0, 1          # stop after index 3
    out:
        exit
    ",
    );
    // 4 iterations, each adds 7.
    assert_eq!(both(&p), Ok(4 * 1000 + 28));
}

#[test]
fn nested_callbacks_hit_the_depth_limit() {
    // The callback calls bpf_loop with itself: every level is one more frame.
    let p = prog(
        "
        mov %r1, 1
        lddw %r2, cb
        mov %r3, 0
        call 181
        exit
    cb:
        mov %r1, 1
        lddw %r2, cb
        mov %r3, 0
        call 181
        exit
    ",
    );
    for jit in [false, true] {
        match run(&p, jit) {
            Err(VmError::CallDepth { max: 8, .. }) => {}
            other => panic!("jit={jit}: {other:?}"),
        }
    }
}

#[test]
fn nested_callbacks_within_the_limit() {
    // Three levels of loops: 2 * 3 * 4 innermost iterations counted in the main frame.
    let p = prog(
        "
        stdw [%r10-8], 0
        mov %r1, 2
        lddw %r2, l1
        mov %r3, %r10
        add %r3, -8
        call 181
        ldxdw %r0, [%r10-8]
        exit
    l1:
        mov %r3, %r2
        mov %r1, 3
        lddw %r2, l2
        call 181
        mov %r0, 0
        exit
    l2:
        mov %r3, %r2
        mov %r1, 4
        lddw %r2, l3
        call 181
        mov %r0, 0
        exit
    l3:
        ldxdw %r1, [%r2]
        add %r1, 1
        stxdw [%r2], %r1
        mov %r0, 0
        exit
    ",
    );
    assert_eq!(both(&p), Ok(24));
}

#[test]
fn fault_in_callback_is_reported_as_the_fault() {
    let p = prog(
        "
        mov %r1, 3
        lddw %r2, cb
        mov %r3, 0
        call 181
        exit
    cb:
        ldxdw %r0, [%r2+16]   # ctx is NULL
        exit
    ",
    );
    // Interpreter only: the JIT trusts verified programs.
    match run(&p, false) {
        Err(VmError::MemoryFault {
            pc: 6, addr: 16, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn helper_error_in_callback_propagates() {
    let p = prog(
        "
        mov %r1, 3
        lddw %r2, cb
        call 181
        exit
    cb:
        call 99
        exit
    ",
    );
    for jit in [false, true] {
        match run(&p, jit) {
            Err(VmError::Helper {
                pc: 5,
                id: 99,
                source: HelperError::Unknown(99),
            }) => {}
            other => panic!("jit={jit}: {other:?}"),
        }
    }
}

#[test]
fn bad_callback_value_is_an_error() {
    let p = prog(
        "
        mov %r1, 1
        mov %r2, 1234
        call 181
        exit
    ",
    );
    for jit in [false, true] {
        match run(&p, jit) {
            Err(VmError::BadCallback { pc: 2, func: 1234 }) => {}
            other => panic!("jit={jit}: {other:?}"),
        }
    }
}

#[test]
fn tail_call_inside_callback_is_refused() {
    let p = prog(
        "
        mov %r1, 1
        lddw %r2, cb
        call 181
        exit
    cb:
        call 2
        mov %r0, 0
        exit
    ",
    );
    let target = Arc::new(prog("mov %r0, 5\nexit"));
    for jit in [false, true] {
        let mut h = LoopHelpers {
            tail: Some(target.clone()),
        };
        match run_with(&p, jit, &mut h) {
            Err(VmError::TailCallInSubprog { pc: 5 }) => {}
            other => panic!("jit={jit}: {other:?}"),
        }
    }
}

#[test]
fn callbacks_work_after_a_tail_call() {
    let target = Arc::new(prog(SUM));
    let p = prog("call 2\nmov %r0, 1\nexit");
    for jit in [false, true] {
        let mut h = LoopHelpers {
            tail: Some(target.clone()),
        };
        assert_eq!(run_with(&p, jit, &mut h), Ok(5010), "jit={jit}");
    }
}
