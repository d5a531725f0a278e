//! ns per execution of the same three program bodies (`vm_bench.bpf.c`) on our JIT, our
//! interpreter, rbpf's JIT and the kernel's JIT, in one run. The kernel row is
//! BPF_PROG_TEST_RUN with `repeat` (only XDP/skb programs accept it, hence XDP bodies).
//!
//! `cargo bench -p bpftime-example-programs --bench vm` (as root).

use std::hint::black_box;
use std::time::Instant;

use bpftime_example_programs::object_path;
use bpftime_kernel_bridge::testing::require_kernel;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject, VmChoice};

const PROGRAMS: [&str; 3] = ["trivial", "array_counter", "hash_lookup_update"];
const RUNS: u32 = 2_000_000;

fn kernel_ns(program: &str) -> f64 {
    let object = libbpf_rs::ObjectBuilder::default()
        .open_file(object_path("vm_bench"))
        .and_then(|o| o.load())
        .expect("loading vm_bench into the kernel");
    let prog = object
        .progs_mut()
        .find(|p| p.name() == program)
        .expect("program");
    let packet = [0u8; 64];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let out = prog
            .test_run(libbpf_rs::ProgramInput {
                data_in: Some(&packet),
                repeat: RUNS,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        best = best.min(out.duration.as_nanos() as f64);
    }
    best
}

/// Best of five timed batches of `RUNS` runs, in ns per run.
fn userspace_ns(program: &str, vm: VmChoice, no_jit: bool) -> Option<f64> {
    let segment = format!("bench-vm-{}", std::process::id());
    let _ = bpftime_runtime::maps::remove_object(&segment);
    let loaded = match LoadedObject::load(
        &object_path("vm_bench"),
        Some(&segment),
        LoadOptions {
            verify: true,
            vm,
            no_jit,
        },
    ) {
        Ok(l) => l,
        Err(e) => panic!("loading vm_bench: {e}"),
    };
    let result = loaded.program(program).ok().map(|p| {
        let mut helpers = loaded.helpers().expect("helpers");
        let mut ctx = vec![0u8; 64];
        let runs = if no_jit { RUNS / 10 } else { RUNS };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            for _ in 0..runs {
                black_box(p.run(&mut helpers, black_box(&mut ctx)).expect("run"));
            }
            best = best.min(started.elapsed().as_nanos() as f64 / f64::from(runs));
        }
        best
    });
    let _ = loaded.shm.remove();
    result
}

fn cell(ns: Option<f64>, kernel: f64) -> String {
    match ns {
        Some(ns) => format!("{ns:.1} ns ({:.2}x)", ns / kernel),
        None => "refused".into(),
    }
}

fn main() {
    if !require_kernel("vm benchmark") {
        return;
    }
    println!("\nns per execution (best of 5 x {RUNS} runs; ratio to the kernel's JIT)\n");
    println!("| program | kernel JIT | our JIT | our interpreter | rbpf JIT |");
    println!("|---|---:|---:|---:|---:|");
    for program in PROGRAMS {
        let kernel = kernel_ns(program);
        let ours = userspace_ns(program, VmChoice::Ours, false);
        let interp = userspace_ns(program, VmChoice::Ours, true);
        let rbpf = userspace_ns(program, VmChoice::Rbpf, false);
        println!(
            "| {program} | {kernel:.1} ns | {} | {} | {} |",
            cell(ours, kernel),
            cell(interp, kernel),
            cell(rbpf, kernel)
        );
    }
}
