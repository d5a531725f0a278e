//! Per-CPU maps and atomics from many threads at once, against the kernel on the same object
//! (`mt_counters.bpf.c` on `victim_mt`: 8 threads x 5,000 calls): the PERCPU_ARRAY summed over
//! CPUs and every `.bss` atomic (add, xor, exchange) equal the kernel uprobes' run and what the
//! victim's calls make, on our JIT and interpreter through the agent.

use bpftime_example_programs::{run_kernel_libbpf_sections_with, victim_mt_path};
use bpftime_testutils::require_kernel;

mod common;

const THREADS: u64 = 8;
const CALLS: u64 = 5_000;

/// The `.bss` words: calls, sum of i, xor of i << thread, largest thread.
fn expected_bss() -> Vec<u8> {
    let mut xor = 0u64;
    for t in 0..THREADS {
        for i in 0..CALLS {
            xor ^= i << (t & 7);
        }
    }
    [
        THREADS * CALLS,
        THREADS * (0..CALLS).sum::<u64>(),
        xor,
        THREADS - 1,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
}

#[test]
fn per_cpu_maps_and_atomics_from_eight_threads_match_the_kernel() {
    if !require_kernel("per_cpu_maps_and_atomics_from_eight_threads_match_the_kernel") {
        return;
    }
    let args = [THREADS.to_string(), CALLS.to_string()];
    let (kernel, _) = run_kernel_libbpf_sections_with("mt_counters", &victim_mt_path(), &args)
        .unwrap_or_else(|e| panic!("kernel run: {e:#}"));
    let per_thread: Vec<(Vec<u8>, Vec<u8>)> = (0..8u32)
        .map(|t| {
            let n = if u64::from(t) < THREADS { CALLS } else { 0 };
            (t.to_le_bytes().to_vec(), n.to_le_bytes().to_vec())
        })
        .collect();
    assert_eq!(kernel.maps["per_thread"], per_thread, "kernel uprobes");
    let kernel_bss = kernel
        .maps
        .iter()
        .find(|(name, _)| name.ends_with(".bss"))
        .map(|(_, entries)| entries[0].1.clone())
        .expect("the kernel run's .bss");
    assert_eq!(kernel_bss, expected_bss(), "kernel uprobes");
    for no_jit in [false, true] {
        let run = common::run_example_with_agent(
            "mt_counters",
            &format!("test-mt-counters-{no_jit}"),
            no_jit,
            std::process::Command::new(victim_mt_path()).args(&args),
        );
        run.out.unwrap_or_else(|e| panic!("victim: {e}"));
        let snapshot = run.snapshot;
        assert_eq!(
            snapshot.maps["per_thread"], kernel.maps["per_thread"],
            "per-CPU counts summed over CPUs (no_jit {no_jit})"
        );
        assert_eq!(
            snapshot.maps[".bss"][0].1, kernel_bss,
            ".bss atomics (no_jit {no_jit})"
        );
    }
}
