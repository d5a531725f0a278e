//! ns per execution of the same three program bodies (`vm_bench.bpf.c`) on our JIT, our
//! interpreter, rbpf's JIT and the kernel's JIT, in one run. The kernel row is
//! BPF_PROG_TEST_RUN with `repeat` (only XDP/skb programs accept it, hence XDP bodies).
//!
//! `cargo bench -p bpftime-example-programs --bench vm` (as root).
//!
//! Userspace rows count the benchmark thread's CPU time (`/proc/thread-self/schedstat`), not
//! wall time, like the kernel's test run, which stops its timer while it is rescheduled: on a
//! shared machine wall time mostly measures the other tenants. Each batch runs until it has
//! used at least 200 ms of CPU (that counter advances in scheduler ticks of a few ms).

use std::hint::black_box;

use bpftime_example_programs::object_path;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject, VmChoice};
use bpftime_testutils::require_kernel;

const PROGRAMS: [&str; 5] = [
    "trivial",
    "array_counter",
    "hash_lookup_update",
    "hash_random_keys",
    "compute_loop",
];
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

/// CPU ns per run of `program` (see [`best_cpu_ns`]), `None` if the VM refuses it.
fn userspace_ns(program: &str, vm: VmChoice, no_jit: bool) -> Option<f64> {
    let segment = format!("bench-vm-{}", std::process::id());
    bpftime_runtime::loaded::unload_object(&segment);
    let loaded = match LoadedObject::load(
        &object_path("vm_bench"),
        Some(&segment),
        LoadOptions {
            verify: true,
            vm,
            no_jit,
            ..LoadOptions::default()
        },
    ) {
        Ok(l) => l,
        Err(e) => panic!("loading vm_bench: {e}"),
    };
    let result = loaded.program(program).ok().map(|p| {
        let mut helpers = loaded.helpers().expect("helpers");
        let mut ctx = vec![0u8; 64];
        best_cpu_ns(|| {
            black_box(p.run(&mut helpers, black_box(&mut ctx)).expect("run"));
        })
    });
    let _ = loaded.unload();
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
    // The kernel column is the kernel's JIT only if the JIT is on (0: its interpreter; 2:
    // the JIT with debug output): say which, rather than compare against the wrong engine.
    let jit_enable = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    if jit_enable != "1" {
        eprintln!(
            "vm benchmark: /proc/sys/net/core/bpf_jit_enable is {jit_enable}, not 1: the \
             kernel column is not the kernel's JIT; set it to 1 to compare JITs"
        );
        std::process::exit(1);
    }
    println!(
        "\nns per execution (kernel: best of 5 x {RUNS} test runs; ours: CPU time, best of 5 \
         batches of >= 200 ms; ratio to the kernel's JIT)\n"
    );
    println!("| program | kernel JIT | our JIT | our interpreter | rbpf JIT |");
    println!("|---|---:|---:|---:|---:|");
    // `VM_BENCH_ONLY=jit,interp` (any of kernel, jit, interp, rbpf) runs only those columns.
    let only = std::env::var("VM_BENCH_ONLY").ok();
    let want = |col: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|c| c == col))
    };
    // `VM_BENCH_PROGRAMS=trivial,...` runs only those rows.
    let rows = std::env::var("VM_BENCH_PROGRAMS").ok();
    let mut jit_ns = std::collections::HashMap::new();
    for program in PROGRAMS {
        if rows
            .as_deref()
            .is_some_and(|r| !r.split(',').any(|p| p == program))
        {
            continue;
        }
        let kernel = if want("kernel") {
            kernel_ns(program)
        } else {
            f64::NAN
        };
        let ours = want("jit")
            .then(|| userspace_ns(program, VmChoice::Ours, false))
            .flatten();
        let interp = want("interp")
            .then(|| userspace_ns(program, VmChoice::Ours, true))
            .flatten();
        let rbpf = want("rbpf")
            .then(|| userspace_ns(program, VmChoice::Rbpf, false))
            .flatten();
        if let Some(ns) = ours {
            jit_ns.insert(program, ns);
        }
        println!(
            "| {program} | {kernel:.1} ns | {} | {} | {} |",
            cell(ours, kernel),
            cell(interp, kernel),
            cell(rbpf, kernel)
        );
    }
    if let (Some(hash), Some(trivial)) = (jit_ns.get("hash_lookup_update"), jit_ns.get("trivial")) {
        println!(
            "\nhash lookup+update called from our JIT: {:.1} ns per lookup+update \
             (hash_lookup_update minus trivial); the same two MapHandle calls from Rust: {:.1} ns",
            hash - trivial,
            map_ops_ns()
        );
    }
}

/// CPU time this thread has used, in ns (scheduler-tick granularity).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat")
}

/// CPU ns per call of `f`: the best of five batches, each of at least 200 ms of CPU time.
fn best_cpu_ns(mut f: impl FnMut()) -> f64 {
    const BATCH_CPU_NS: u64 = 200_000_000;
    const STEP: u32 = 20_000;
    for _ in 0..STEP {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = thread_cpu_ns();
        let mut runs = 0u64;
        let used = loop {
            for _ in 0..STEP {
                f();
            }
            runs += u64::from(STEP);
            let used = thread_cpu_ns() - start;
            if used >= BATCH_CPU_NS {
                break used;
            }
        };
        best = best.min(used as f64 / runs as f64);
    }
    best
}

/// `MapHandle::lookup` + `update` on vm_bench's hash map from Rust, in CPU ns per
/// lookup+update (see [`best_cpu_ns`]): what the JIT's map calls cost at least.
fn map_ops_ns() -> f64 {
    let segment = format!("bench-vm-maps-{}", std::process::id());
    bpftime_runtime::loaded::unload_object(&segment);
    let loaded = LoadedObject::load(
        &object_path("vm_bench"),
        Some(&segment),
        LoadOptions::default(),
    )
    .expect("loading vm_bench");
    let m = loaded.shm.map("table").expect("table");
    let key = 7u32.to_le_bytes();
    let best = best_cpu_ns(|| {
        let next = match m.lookup(black_box(&key)).expect("lookup") {
            Some(v) => {
                v.atomic_u64(0)
                    .expect("8-byte value")
                    .load(std::sync::atomic::Ordering::Relaxed)
                    + 1
            }
            None => 1,
        };
        m.update(&key, &next.to_le_bytes(), 0).expect("update");
    });
    let _ = loaded.unload();
    best
}
