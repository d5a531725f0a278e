//! `uprobe_tool`, an unmodified libbpf application, under real kernel uprobes: the reference
//! output that the same binary must reproduce under bpftime-rs.

mod common;

use std::process::{Child, Command};

use bpftime_example_libbpf_apps::{victim_path, VICTIM_FUNCTION};
use bpftime_testutils::require_kernel;
use common::{
    event_pids, expected_events, expected_output, expected_victim_output, normalise, run,
    symbol_file_offset, Run,
};

/// The victim's call count and the tool's `-m`.
const CALLS: u64 = 10;
const MIN_ARG: u64 = 3;

fn args(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-b".to_string(),
        victim_path().display().to_string(),
        "-m".into(),
        MIN_ARG.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs the kernel-mode tool with `extra` arguments against `victim CALLS`.
fn run_kernel(extra: &[&str]) -> Run {
    let run = run(&[], &args(extra), &[], &[CALLS.to_string()]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.status.success(),
        "uprobe_tool failed ({}); stdout:\n{}stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(run.victim_status.success(), "victim: {}", run.victim_status);
    assert_eq!(run.victim_stdout, expected_victim_output(CALLS));
    run
}

/// Checks a run that saw all of the victim's calls.
fn check_all_calls_seen(run: &Run) {
    let pids = event_pids(&run.stdout);
    assert_eq!(
        pids.len() as u64,
        expected_events(CALLS, MIN_ARG),
        "{}",
        run.stdout
    );
    assert!(
        pids.iter().all(|&pid| pid == run.victim_pid),
        "events from pids other than the victim's {}:\n{}",
        run.victim_pid,
        run.stdout
    );
    let normalised = normalise(&run.stdout);
    assert_eq!(
        normalised,
        expected_output(CALLS, MIN_ARG),
        "stderr:\n{}",
        run.stderr
    );
    print!("normalised kernel output:\n{normalised}");
}

#[test]
fn kernel_uprobes_by_function_name() {
    if !require_kernel("kernel_uprobes_by_function_name") {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let run = run_kernel(&["-f", VICTIM_FUNCTION, "-n", &events]);
    check_all_calls_seen(&run);
}

#[test]
fn kernel_uprobes_by_file_offset() {
    if !require_kernel("kernel_uprobes_by_file_offset") {
        return;
    }
    let offset =
        symbol_file_offset(&victim_path(), VICTIM_FUNCTION).unwrap_or_else(|e| panic!("{e}"));
    let offset = format!("{offset:#x}");
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let run = run_kernel(&["-o", &offset, "-n", &events]);
    check_all_calls_seen(&run);
}

/// Kills the bystander process when the test ends.
struct Bystander(Child);

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kernel_uprobes_pid_filter_excludes_other_processes() {
    if !require_kernel("kernel_uprobes_pid_filter_excludes_other_processes") {
        return;
    }
    // A live process that is not the victim: the probes are attached to it only.
    let bystander = Bystander(
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawning sleep"),
    );
    let pid = bystander.0.id().to_string();
    let run = run_kernel(&["-f", VICTIM_FUNCTION, "-p", &pid, "-n", "0", "-d", "1"]);
    assert!(
        run.tool_outlived_victim,
        "the tool exited before the victim finished, so the filter was not exercised"
    );
    assert_eq!(normalise(&run.stdout), expected_output(0, MIN_ARG));
    assert!(
        run.stdout.contains("bss entries=0 returns=0\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn normalise_replaces_pid_digits_only() {
    assert_eq!(
        normalise("entry pid=123 arg=4\nreturn pid=7 rc=9\npid= x\n"),
        "entry pid=PID arg=4\nreturn pid=PID rc=9\npid= x\n"
    );
}
