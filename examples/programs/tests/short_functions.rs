//! A function shorter than a 5-byte jump (`short_add`, 4 bytes), probed with a uprobe and a
//! uretprobe: on kernel uprobes and through the agent in the real victim (the int3 fallback,
//! which the agent's status names), the same calls counted, the same arguments and results
//! summed, on our JIT and interpreter.

use bpftime_example_programs::{run_kernel_with, victim_short_path};
use bpftime_testutils::require_kernel;

mod common;

const CALLS: u32 = 3000;

#[test]
fn short_functions_are_probed_as_on_the_kernel() {
    if !require_kernel("short_functions_are_probed_as_on_the_kernel") {
        return;
    }
    let kernel = run_kernel_with(
        "short_funcs",
        &victim_short_path(),
        CALLS,
        &[("short_entry", "short_add"), ("short_return", "short_add")],
    )
    .unwrap_or_else(|e| panic!("kernel run: {e:#}"));
    let sum: u64 = (0..u64::from(CALLS)).map(|i| i % 5 + i).sum();
    let want: Vec<(Vec<u8>, Vec<u8>)> = [u64::from(CALLS), sum, sum]
        .iter()
        .enumerate()
        .map(|(k, v)| ((k as u32).to_le_bytes().to_vec(), v.to_le_bytes().to_vec()))
        .collect();
    assert_eq!(kernel.maps["totals"], want, "kernel uprobes");
    for no_jit in [false, true] {
        let run = common::run_example_with_agent(
            "short_funcs",
            &format!("test-short-funcs-{no_jit}"),
            no_jit,
            std::process::Command::new(victim_short_path()).arg(CALLS.to_string()),
        );
        run.out.unwrap_or_else(|e| panic!("victim: {e}"));
        let (status, snapshot) = (run.status, run.snapshot);
        let hooked: Vec<&str> = status.lines().filter(|l| l.starts_with("ok ")).collect();
        assert_eq!(hooked.len(), 2, "{status}");
        assert!(
            hooked.iter().all(|l| l.ends_with(" via int3")),
            "the status names the int3 sites: {status}"
        );
        assert_eq!(
            snapshot.maps["totals"], kernel.maps["totals"],
            "user space (no_jit {no_jit}) == kernel"
        );
    }
}
