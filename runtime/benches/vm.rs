//! ns/exec of a trivial and a loop program on the interpreter, the JIT and rbpf's JIT.
//! Run with `cargo bench -p bpftime-runtime --bench vm`.

use std::hint::black_box;
use std::time::Instant;

use bpftime_runtime::vm::asm::assemble;
use bpftime_runtime::vm::insn::encode_insns;
use bpftime_runtime::vm::rbpf::{RbpfMode, RbpfProgram};
use bpftime_runtime::vm::{interpret, InterpOptions, MemoryMap, NoHelpers, Program};

const TRIVIAL: &str = "mov %r0, 1\nexit";
const LOOP: &str =
    "mov %r0, 0\nmov %r1, 1000\nloop:\nadd %r0, %r1\nsub %r1, 1\njne %r1, 0, loop\nexit";

fn time(label: &str, iters: u32, mut f: impl FnMut() -> u64) {
    for _ in 0..iters / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    println!("{label:<28} {ns:>12.1} ns/exec");
}

fn main() {
    for (name, src, iters) in [("trivial", TRIVIAL, 200_000), ("loop1000", LOOP, 5_000)] {
        let insns = assemble(src).expect("assemble");
        let prog = Program::new(insns.clone()).expect("load");
        time(&format!("{name} interpreter"), iters, || {
            let mut mem = MemoryMap::new();
            interpret(
                &prog,
                [0; 5],
                &mut mem,
                &mut NoHelpers,
                InterpOptions::default(),
            )
            .unwrap()
        });
        let jit = prog.jit().expect("jit");
        time(&format!("{name} jit"), iters * 10, || {
            let mut mem = MemoryMap::new();
            // SAFETY: the bench programs touch no memory.
            unsafe { jit.run([0; 5], &mut mem, &mut NoHelpers).unwrap() }
        });
        let bytes = encode_insns(&insns);
        let mut vm = rbpf::EbpfVmRaw::new(Some(&bytes)).expect("rbpf load");
        vm.jit_compile().expect("rbpf jit");
        time(&format!("{name} rbpf jit (raw)"), iters * 10, || {
            let mut data = [0u8; 0];
            // SAFETY: the bench programs touch no memory.
            unsafe { vm.execute_program_jit(&mut data).unwrap() }
        });
        let mut rp = RbpfProgram::new(&prog, RbpfMode::Jit).expect("rbpf adapter");
        time(&format!("{name} rbpf jit (adapter)"), iters * 10, || {
            let mut mem = MemoryMap::new();
            // SAFETY: the bench programs touch no memory.
            unsafe { rp.run(&mut [], &mut mem, &mut NoHelpers).unwrap() }
        });
    }
}
