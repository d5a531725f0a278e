//! `ProgramRunner`: one program run again and again with one set of helpers, as a hook runs it.
//! On the JIT the run environment is set up once (`JitSession`); every run must still behave
//! like a fresh `RunnableProgram::run`: errors, tail calls and `bpf_override_return` leave
//! nothing behind for the next run.

mod helpers_common;

use std::sync::Arc;

use bpftime_runtime::helpers::RuntimeHelpers;
use bpftime_runtime::loaded::ProgramRunner;
use bpftime_runtime::maps::{MapType, BPF_ANY};
use bpftime_runtime::vm::{VmError, VmKind};
use helpers_common::*;

const KINDS: [VmKind; 2] = [VmKind::Interpreter, VmKind::Jit];

#[test]
fn repeated_runs_keep_counting_and_return_each_result() {
    for vm in KINDS {
        let e = Env::new(
            &format!("runner-count-{vm:?}"),
            false,
            &[def("a", MapType::Array, 4, 8, 1)],
        );
        // a[0] += 1; return ctx[0] * 2
        let p = e.load(
            "mov %r6, %r1\nmov %r1, 0\nstxw [%r10-4], %r1\nmov %r2, %r10\nadd %r2, -4\n\
             ldmap %r1, 0\ncall 1\njeq %r0, 0, out\nmov %r1, 1\nlock add [%r0], %r1\n\
             out:\nldxdw %r0, [%r6]\nmul %r0, 2\nexit",
        );
        let program = runnable(p, vm);
        let mut runner = ProgramRunner::new(&program, RuntimeHelpers::from_object(&e.obj));
        for i in 0..1000u64 {
            let mut ctx = i.to_le_bytes();
            assert_eq!(runner.run(&mut ctx), Ok(2 * i), "{vm:?}");
        }
        assert_eq!(value_u64(&e.obj, "a", &0u32.to_le_bytes()), 1000, "{vm:?}");
    }
}

#[test]
fn a_failed_run_leaves_the_runner_usable() {
    for vm in KINDS {
        let e = Env::new(&format!("runner-fail-{vm:?}"), false, &[]);
        // ctx[0] != 0: a helper call with a bad map argument (the run fails); else return 5
        let p = e.load(
            "ldxdw %r2, [%r1]\njeq %r2, 0, ok\nmov %r1, 12345\nmov %r2, %r10\nadd %r2, -8\n\
             call 1\nexit\nok:\nmov %r0, 5\nexit",
        );
        let program = runnable(p, vm);
        let mut runner = ProgramRunner::new(&program, RuntimeHelpers::from_object(&e.obj));
        for _ in 0..3 {
            assert_eq!(runner.run(&mut 0u64.to_le_bytes()), Ok(5));
            match runner.run(&mut 1u64.to_le_bytes()) {
                Err(VmError::Helper { .. }) => {}
                other => panic!("{vm:?}: {other:?}"),
            }
        }
        assert_eq!(runner.run(&mut 0u64.to_le_bytes()), Ok(5));
    }
}

#[test]
fn tail_calls_restart_their_count_in_every_run() {
    for vm in KINDS {
        let e = Env::new(
            &format!("runner-tail-{vm:?}"),
            false,
            &[def("progs", MapType::ProgArray, 4, 4, 2)],
        );
        let base = RuntimeHelpers::from_object(&e.obj);
        let load = |src: &str| {
            Arc::new(
                base.load_program(bpftime_runtime::vm::asm::assemble(src).unwrap())
                    .unwrap(),
            )
        };
        // Counts its runs in ctx[0] and tail-calls itself: 1 run + 33 tail calls, then 7.
        let looping = load(
            "ldxdw %r2, [%r1]\nadd %r2, 1\nstxdw [%r1], %r2\nldmap %r2, 0\nmov %r3, 0\n\
             call 12\nmov %r0, 7\nexit",
        );
        let helpers = RuntimeHelpers::from_object(&e.obj).with_programs(vec![looping.clone()]);
        e.obj
            .map("progs")
            .unwrap()
            .update(&0u32.to_le_bytes(), &0u32.to_le_bytes(), BPF_ANY)
            .unwrap();
        let program = runnable(looping, vm);
        let mut runner = ProgramRunner::new(&program, helpers);
        for _ in 0..3 {
            let mut ctx = [0u8; 8];
            assert_eq!(runner.run(&mut ctx), Ok(7), "{vm:?}");
            assert_eq!(u64::from_le_bytes(ctx), 34, "{vm:?}: 1 run + 33 tail calls");
        }
    }
}

#[test]
fn override_return_is_per_run() {
    for vm in KINDS {
        let e = Env::new(&format!("runner-override-{vm:?}"), false, &[]);
        // ctx[0] != 0: bpf_override_return(ctx, ctx[0])
        let p = e.load("ldxdw %r2, [%r1]\njeq %r2, 0, out\ncall 58\nout:\nmov %r0, 0\nexit");
        let program = runnable(p, vm);
        let mut runner = ProgramRunner::new(&program, RuntimeHelpers::from_object(&e.obj));
        assert_eq!(runner.run(&mut 77u64.to_le_bytes()), Ok(0));
        assert_eq!(
            runner.helpers().attach().override_return,
            Some(77),
            "{vm:?}"
        );
        assert_eq!(runner.run(&mut 0u64.to_le_bytes()), Ok(0));
        assert_eq!(runner.helpers().attach().override_return, None, "{vm:?}");
    }
}
