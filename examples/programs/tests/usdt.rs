//! USDT programs (`usdt_counts.bpf.c`, libbpf's `usdt.bpf.h`) on `victim_usdt`: the same object
//! on kernel USDT probes (libbpf's auto-attach, the kernel counting semaphores) and through the
//! agent on our JIT and interpreter. Every map is compared, the argument specs the programs read
//! (`__bpf_usdt_specs`) included, and each map also against what the victim's loop makes; the
//! probe behind a semaphore fires only while the semaphore is up, which the victim reports.
//!
//! The object is built twice: against libbpf-sys's headers (the libbpf the kernel run uses,
//! whose spec layout reads Scale-Index-Base operands) and against the system's older libbpf
//! headers (the compact layout, which cannot: that one site is refused, naming why, the rest
//! run).

use bpftime_example_programs::Snapshot;
use bpftime_example_programs::{run_kernel_libbpf_sections, victim_usdt_path};
use bpftime_testutils::require_kernel;

mod common;

/// Kernel USDT probes belong to the file: while one test's kernel run has victim_usdt probed,
/// the other test's victim would feed the kernel's maps too. One test at a time.
static VICTIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Past 127, so vt:sem's `char` argument is negative for some rounds (sign extension).
const ROUNDS: i64 = 300;

fn slot(k: u32, v: i64) -> (Vec<u8>, Vec<u8>) {
    (k.to_le_bytes().to_vec(), v.to_le_bytes().to_vec())
}

/// What the victim's loop makes `totals` hold (see the BPF file for the slots); `sib`: whether
/// vt:sib is probed.
fn expected_totals(sib: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let sum: i64 = (0..ROUNDS).sum();
    let chars: i64 = (0..ROUNDS).map(|i| i64::from(i as u8 as i8)).sum();
    let arr = [10, 20, 30, 40, 50];
    let sibs: i64 = (0..ROUNDS).map(|i| arr[(i % 4 + 1) as usize]).sum();
    let enoent = -i64::from(libc::ENOENT);
    [
        ROUNDS,
        sum,
        3 * sum,
        2,
        ROUNDS,
        42 * ROUNDS,
        1,
        enoent,
        ROUNDS,
        chars,
        3,
        chars,
        if sib { sibs } else { 0 },
    ]
    .iter()
    .enumerate()
    .map(|(k, &v)| slot(k as u32, v))
    .collect()
}

fn expected_sem_args() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<_> = (0..ROUNDS)
        .map(|i| (i.to_le_bytes().to_vec(), (-i).to_le_bytes().to_vec()))
        .collect();
    v.sort();
    v
}

/// Runs the victim with the agent on `example` loaded on one of our VMs: the agent's status,
/// the victim's output and the maps after the run.
fn run_agent(example: &str, no_jit: bool) -> (String, String, Snapshot) {
    let run = common::run_example_with_agent(
        example,
        &format!("test-{example}-{no_jit}"),
        no_jit,
        std::process::Command::new(victim_usdt_path()).arg(ROUNDS.to_string()),
    );
    let out = run.out.unwrap_or_else(|e| panic!("victim: {e}"));
    (run.status, out, run.snapshot)
}

/// The `ok` line of `probe` in `status`.
fn armed<'a>(status: &'a str, probe: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.starts_with("ok ") && l.contains(&format!(" usdt {probe} at ")))
}

#[test]
fn usdt_probes_read_their_arguments_as_on_kernel_usdt() {
    if !require_kernel("usdt_probes_read_their_arguments_as_on_kernel_usdt") {
        return;
    }
    let _one = VICTIM.lock().unwrap_or_else(|e| e.into_inner());
    let example = "usdt_counts_libbpf_rs";
    let (kernel, out) = run_kernel_libbpf_sections(example, &victim_usdt_path(), ROUNDS as u32)
        .unwrap_or_else(|e| panic!("kernel run: {e:#}"));
    assert!(
        out.contains(&format!("done {ROUNDS} {ROUNDS}")),
        "the kernel raised vt:sem's semaphore: {out}"
    );
    assert_eq!(kernel.maps["totals"], expected_totals(true), "kernel USDT");
    assert_eq!(kernel.maps["sem_args"], expected_sem_args(), "kernel USDT");
    for no_jit in [false, true] {
        let (status, out, ours) = run_agent(example, no_jit);
        for probe in ["vt:add", "vt:konst", "vt:sem", "vt:sib"] {
            let line = armed(&status, probe)
                .unwrap_or_else(|| panic!("{probe} armed (no_jit {no_jit}): {status}"));
            assert_eq!(
                line.contains("semaphore raised"),
                probe != "vt:sib",
                "every sdt.h probe's semaphore is raised, vt:sib has none: {line}"
            );
        }
        assert!(!status.contains("error"), "{status}");
        assert!(
            out.contains(&format!("done {ROUNDS} {ROUNDS}")),
            "the agent raised vt:sem's semaphore (no_jit {no_jit}): {out}"
        );
        for map in ["totals", "sem_args", "__bpf_usdt_specs"] {
            assert_eq!(
                ours.maps[map], kernel.maps[map],
                "{map}: user space (no_jit {no_jit}) == kernel"
            );
        }
    }
}

#[test]
fn an_object_with_the_older_usdt_header_runs_all_but_its_sib_site() {
    if !require_kernel("an_object_with_the_older_usdt_header_runs_all_but_its_sib_site") {
        return;
    }
    let _one = VICTIM.lock().unwrap_or_else(|e| e.into_inner());
    let (status, out, ours) = run_agent("usdt_counts", false);
    for probe in ["vt:add", "vt:konst", "vt:sem"] {
        assert!(armed(&status, probe).is_some(), "{probe}: {status}");
    }
    let errors: Vec<&str> = status.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{status}");
    assert!(
        errors[0].contains("on_sib") && errors[0].contains("Scale-Index-Base"),
        "the refusal names the program and why: {}",
        errors[0]
    );
    assert!(out.contains(&format!("done {ROUNDS} {ROUNDS}")), "{out}");
    assert_eq!(ours.maps["totals"], expected_totals(false));
    assert_eq!(ours.maps["sem_args"], expected_sem_args());
    // The compact layout: 208-byte specs, arg_cnt at 200 (vt:sib's id, 3, stays zero).
    let specs = &ours.maps["__bpf_usdt_specs"];
    let counts: Vec<u16> = specs[..4]
        .iter()
        .map(|(_, v)| {
            assert_eq!(v.len(), 208);
            u16::from_le_bytes(v[200..202].try_into().unwrap())
        })
        .collect();
    assert_eq!(
        counts,
        [2, 1, 3, 0],
        "arg counts by spec id (program order)"
    );
}
