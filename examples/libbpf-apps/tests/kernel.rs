//! `uprobe_tool` (a skeleton C tool on the system libbpf) and its Rust ports (`aya_uprobe_tool`,
//! `libbpf_rs_uprobe_tool`) under real kernel uprobes: the reference output ([`expected_output`])
//! that the same binaries must reproduce under bpftime-rs (`tests/cli_load_app.rs` at the
//! workspace root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bpftime_example_libbpf_apps::{
    aya_tool_path, libbpf_rs_tool_path, tool_path, victim_path, VICTIM_FUNCTION,
};
use bpftime_testutils::require_kernel;
use common::{
    event_pids, expected_events, expected_output, expected_victim_output, normalise, run_tool,
    symbol_file_offset, tool_args as args, Bystander, Run, CALLS, MIN_ARG,
};

/// This package's integration tests get the binaries from cargo.
fn aya_tool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_aya_uprobe_tool"))
}

fn libbpf_rs_tool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_libbpf_rs_uprobe_tool"))
}

/// Runs `tool` with `extra` arguments against `victim CALLS` on kernel uprobes; checks both
/// succeeded.
fn run_kernel(tool: &Path, extra: &[&str]) -> Run {
    let run = run_tool(tool, &[], &args(extra), &[], &[CALLS.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.status.success(),
        "{} failed ({}); stdout:\n{}stderr:\n{}",
        tool.display(),
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(run.victim_status.success(), "victim: {}", run.victim_status);
    assert_eq!(run.victim_stdout, expected_victim_output(CALLS));
    run
}

/// Checks a run that saw all of the victim's calls: the C tool's output, from the victim only.
fn check_all_calls_seen(tool: &Path, run: &Run) {
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
        "{}; stderr:\n{}",
        tool.display(),
        run.stderr
    );
    print!("normalised {} output:\n{normalised}", tool.display());
}

fn by_function_name(test: &str, tool: &Path) {
    if !require_kernel(test) {
        return;
    }
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let run = run_kernel(tool, &["-f", VICTIM_FUNCTION, "-n", &events]);
    check_all_calls_seen(tool, &run);
}

fn by_file_offset(test: &str, tool: &Path) {
    if !require_kernel(test) {
        return;
    }
    let offset =
        symbol_file_offset(&victim_path(), VICTIM_FUNCTION).unwrap_or_else(|e| panic!("{e}"));
    let offset = format!("{offset:#x}");
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let run = run_kernel(tool, &["-o", &offset, "-n", &events]);
    check_all_calls_seen(tool, &run);
}

fn pid_filter_excludes_other_processes(test: &str, tool: &Path) {
    if !require_kernel(test) {
        return;
    }
    // A live process that is not the victim: the probes are attached to it only.
    let bystander = Bystander::start();
    let pid = bystander.pid();
    let run = run_kernel(
        tool,
        &["-f", VICTIM_FUNCTION, "-p", &pid, "-n", "0", "-d", "1"],
    );
    assert!(
        run.tool_outlived_victim,
        "the tool exited before the victim finished, so the filter was not exercised"
    );
    assert_eq!(normalise(&run.stdout), expected_output(0, MIN_ARG));
}

/// `-n` more events than arrive: like uprobe_tool.c, the tool says so on stderr, still prints
/// the maps, and exits 1.
fn timeout_exits_1_after_printing_the_maps(test: &str, tool: &Path) {
    if !require_kernel(test) {
        return;
    }
    let run = run_tool(
        tool,
        &[],
        &args(&["-f", VICTIM_FUNCTION, "-n", "1000", "-d", "1"]),
        &[],
        &[CALLS.to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let events = expected_events(CALLS, MIN_ARG);
    assert!(
        run.stderr
            .contains(&format!("timed out after {events} of 1000 events\n")),
        "{}",
        run.stderr
    );
    assert_eq!(normalise(&run.stdout), expected_output(CALLS, MIN_ARG));
}

#[test]
fn c_tool_by_function_name() {
    by_function_name("c_tool_by_function_name", &tool_path());
}

#[test]
fn c_tool_by_file_offset() {
    by_file_offset("c_tool_by_file_offset", &tool_path());
}

#[test]
fn c_tool_pid_filter_excludes_other_processes() {
    pid_filter_excludes_other_processes("c_tool_pid_filter_excludes_other_processes", &tool_path());
}

#[test]
fn normalise_replaces_pid_digits_only() {
    assert_eq!(
        normalise("entry pid=123 arg=4\nreturn pid=7 rc=9\npid= x\n"),
        "entry pid=PID arg=4\nreturn pid=PID rc=9\npid= x\n"
    );
}

#[test]
fn libbpf_rs_tool_on_uprobe_multi_links() {
    if !require_kernel("libbpf_rs_tool_on_uprobe_multi_links") {
        return;
    }
    let tool = libbpf_rs_tool();
    let events = expected_events(CALLS, MIN_ARG).to_string();
    let run = run_kernel(&tool, &["-M", "-f", VICTIM_FUNCTION, "-n", &events]);
    check_all_calls_seen(&tool, &run);
}

#[test]
fn aya_tool_by_function_name() {
    by_function_name("aya_tool_by_function_name", &aya_tool());
}

#[test]
fn libbpf_rs_tool_by_function_name() {
    by_function_name("libbpf_rs_tool_by_function_name", &libbpf_rs_tool());
}

#[test]
fn aya_tool_by_file_offset() {
    by_file_offset("aya_tool_by_file_offset", &aya_tool());
}

#[test]
fn libbpf_rs_tool_by_file_offset() {
    by_file_offset("libbpf_rs_tool_by_file_offset", &libbpf_rs_tool());
}

#[test]
fn aya_tool_pid_filter_excludes_other_processes() {
    pid_filter_excludes_other_processes(
        "aya_tool_pid_filter_excludes_other_processes",
        &aya_tool(),
    );
}

#[test]
fn libbpf_rs_tool_pid_filter_excludes_other_processes() {
    pid_filter_excludes_other_processes(
        "libbpf_rs_tool_pid_filter_excludes_other_processes",
        &libbpf_rs_tool(),
    );
}

#[test]
fn all_three_tools_time_out_alike() {
    for tool in [tool_path(), aya_tool(), libbpf_rs_tool()] {
        timeout_exits_1_after_printing_the_maps("all_three_tools_time_out_alike", &tool);
    }
}

/// The library's lookup (for other packages' tests, which cannot use `CARGO_BIN_EXE_*`) finds
/// the binaries cargo built for these tests.
#[test]
fn library_paths_find_the_binaries_cargo_built() {
    let same = |found: PathBuf, cargo: PathBuf| {
        let canonical = |p: &Path| {
            p.canonicalize()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        assert_eq!(canonical(&found), canonical(&cargo));
    };
    same(aya_tool_path(), aya_tool());
    same(libbpf_rs_tool_path(), libbpf_rs_tool());
}

/// Bad command lines are rejected before anything is loaded, with exit status 2 as
/// uprobe_tool.c's; `-h` prints the usage and exits 0.
#[test]
fn command_line_errors_exit_2() {
    for tool in [tool_path(), aya_tool(), libbpf_rs_tool()] {
        for bad in [
            &["-b", "x"][..],
            &["-b", "x", "-f", "f", "-o", "1"],
            &["-b", "x", "-f", "f", "-p", "-2"],
            &["-b", "x", "-f", "f", "-m", "-1"],
            &["-b", "x", "-f", "f", "-d", "0"],
            &["-b", "x", "-f", "f", "extra"],
        ] {
            let out = Command::new(&tool).args(bad).output().expect("running");
            assert_eq!(out.status.code(), Some(2), "{} {bad:?}", tool.display());
            assert!(out.stdout.is_empty());
        }
        let out = Command::new(&tool).arg("-h").output().expect("running");
        assert!(out.status.success(), "{}", tool.display());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: "));
    }
}
