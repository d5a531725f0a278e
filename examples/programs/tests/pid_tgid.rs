//! `bpf_get_current_pid_tgid` answers from a per-thread cache in user space (no system call in
//! the common case): what it answers must still be the kernel's view of the caller, in threads,
//! a thread that reuses an exited one's slot, and fork, vfork and clone(CLONE_VM | CLONE_VFORK)
//! children (`victim_pids`: each caller records getpid/gettid from the kernel before calling
//! the probed function). The same object runs on kernel uprobes (libbpf) and through the agent
//! on our JIT and interpreter; each run's map must equal what that run's victim recorded.

use bpftime_example_programs::{run_kernel_libbpf_sections, victim_pids_path};
use bpftime_testutils::require_kernel;

mod common;

/// (id, pid << 32 | tid) per call, from the victim's output.
fn recorded(out: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<(Vec<u8>, Vec<u8>)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (f.len() == 3).then(|| {
                (
                    f[0].to_le_bytes().to_vec(),
                    ((f[1] << 32) | f[2]).to_le_bytes().to_vec(),
                )
            })
        })
        .collect();
    v.sort();
    v
}

#[test]
fn pid_tgid_is_the_callers_in_threads_and_every_kind_of_child() {
    if !require_kernel("pid_tgid_is_the_callers_in_threads_and_every_kind_of_child") {
        return;
    }
    let (kernel, out) = run_kernel_libbpf_sections("pid_tgid", &victim_pids_path(), 0)
        .unwrap_or_else(|e| panic!("kernel run: {e:#}"));
    let want = recorded(&out);
    assert_eq!(want.len(), 7, "{out}");
    assert_eq!(
        kernel.maps["seen"], want,
        "kernel uprobes: the victim's own view"
    );
    for no_jit in [false, true] {
        let run = common::run_example_with_agent(
            "pid_tgid",
            &format!("test-pid-tgid-{no_jit}"),
            no_jit,
            &mut std::process::Command::new(victim_pids_path()),
        );
        let (status, snapshot) = (run.status, run.snapshot);
        let out = run.out.unwrap_or_else(|e| panic!("victim: {e}"));
        assert!(
            !status.contains("bpf_get_current_pid_tgid asks the kernel"),
            "the clone family is watched, so the cache is on: {status}"
        );
        let want = recorded(&out);
        assert_eq!(want.len(), 7, "{out}");
        assert_eq!(
            snapshot.maps["seen"], want,
            "user space (no_jit {no_jit}): the victim's own view of every caller"
        );
    }
}
