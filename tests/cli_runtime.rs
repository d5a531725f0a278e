//! The CLI over the userspace runtime: load, start, attach, detach, maps, run, unload, with
//! real processes and real prog.o files (examples/programs).

mod common;

use common::bytes;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpftime_example_programs::{model, object_path, victim_path};
use bpftime_kernel_bridge::testing::require_kernel;
use serde_json::Value;

fn bpftime() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bpftime-rs"))
}

fn output(args: &[&str]) -> std::process::Output {
    bpftime().args(args).output().expect("running bpftime-rs")
}

/// `bpftime-rs load` in the background, returned once it printed that it is ready.
struct Loader {
    child: Child,
    object: String,
    lines: Vec<String>,
    /// What it prints after it is ready (trace lines, events).
    later: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Loader {
    fn start(example: &str, extra: &[&str]) -> Loader {
        let _ = output(&["unload", example]);
        let path = object_path(example);
        let mut child = bpftime()
            .arg("load")
            .arg(&path)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bpftime-rs load");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("load exited early: {lines:?}");
            }
            lines.push(line.trim_end().to_string());
            if line.starts_with("loaded ") {
                break;
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        let later = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&later);
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Loader {
            child,
            object: example.to_string(),
            lines,
            later,
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        let out = output(&["unload", &self.object]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        status
    }
}

impl Drop for Loader {
    /// A failing test must not leave its loader running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = output(&["unload", &self.object]);
        }
    }
}

fn victim(rounds: u32) -> Child {
    Command::new(victim_path())
        .arg(rounds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(mut child: Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the victim exits normally");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bpftime-rs start --object OBJECT -- victim ROUNDS`, run to completion.
fn start_victim(object: &str, rounds: u32) -> std::process::Output {
    let mut child = bpftime()
        .args(["start", "--object", object, "--"])
        .arg(victim_path())
        .arg(rounds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child.wait_with_output().unwrap()
}

/// `maps --json` entries of `object/map`, sorted.
fn map_entries(object: &str, map: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = output(&["maps", "--json"]);
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["object"] == object && m["name"] == map)
        .unwrap_or_else(|| panic!("{object}/{map} not listed"))
        .clone();
    let mut entries: Vec<_> = row["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect();
    entries.sort();
    entries
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn load_start_maps_diff_unload() {
    if !require_kernel("load_start_maps_diff_unload") {
        return;
    }
    let loader = Loader::start("hash_counter", &[]);
    assert!(
        loader
            .lines
            .iter()
            .any(|l| l.contains("verified by the kernel")),
        "{:?}",
        loader.lines
    );
    let out = bpftime()
        .args(["start", "--object", "hash_counter", "--"])
        .arg(victim_path())
        .arg("2000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = finish(out);
    assert!(stdout.contains("done"));
    let expected = &model::expected("hash_counter", 2000)["calls_by_arg"];
    assert_eq!(&map_entries("hash_counter", "calls_by_arg"), expected);
    // The forwarder catches up: the kernel mirror, bpftool and --diff agree.
    wait_for("the kernel mirror", || {
        output(&["maps", "--diff", "hash_counter/calls_by_arg"])
            .status
            .success()
    });
    let diff = output(&["maps", "--diff", "calls_by_arg"]);
    assert!(String::from_utf8_lossy(&diff.stdout).contains("7 equal, 0 different"));
    let table = String::from_utf8_lossy(&output(&["maps"]).stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("hash_counter/calls_by_arg"))
        .unwrap();
    assert!(
        row.contains("/sys/fs/bpf/bpftime-rs/hash_counter/calls_by_arg"),
        "{row}"
    );
    assert!(loader.stop().success());
    assert!(!std::path::Path::new("/dev/shm/bpftime-rs.hash_counter.shm").exists());
}

#[test]
fn attach_to_a_sleeping_process_then_detach() {
    if !require_kernel("attach_to_a_sleeping_process_then_detach") {
        return;
    }
    let loader = Loader::start("array_counters", &["--no-sync"]);
    // Attached while blocked in read(2) on stdin.
    let child = victim(2000);
    std::thread::sleep(Duration::from_millis(100));
    let pid = child.id().to_string();
    // Tests run in parallel: name the object, or every loaded one would be attached.
    let out = output(&["attach", &pid, "--object", "array_counters"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ok array_counters/sum_by_bucket"));
    finish(child);
    let expected = &model::expected("array_counters", 2000)["sums"];
    assert_eq!(&map_entries("array_counters", "sums"), expected);

    // Attach then detach before it runs: it runs normally and counts nothing more.
    let child = victim(2000);
    std::thread::sleep(Duration::from_millis(100));
    let pid = child.id().to_string();
    assert!(output(&["attach", &pid, "--object", "array_counters"])
        .status
        .success());
    let out = output(&["detach", &pid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    finish(child);
    assert_eq!(
        &map_entries("array_counters", "sums"),
        expected,
        "no probe ran after detach"
    );
    loader.stop();
}

#[test]
fn unknown_symbol_and_faulting_program_leave_the_target_running() {
    if !require_kernel("unknown_symbol_and_faulting_program_leave_the_target_running") {
        return;
    }
    let loader = Loader::start("bad_target", &["--no-sync"]);
    let out = start_victim("bad_target", 100);
    assert!(out.status.success(), "the target runs on: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_function"), "{stderr}");
    assert!(
        stderr.contains("victim"),
        "the error names the file: {stderr}"
    );
    loader.stop();

    let loader = Loader::start("faulty", &["--no-sync", "--no-verify"]);
    assert!(
        loader.lines.iter().any(|l| l.contains("Interpreter")),
        "{:?}",
        loader.lines
    );
    let out = start_victim("faulty", 100);
    assert!(
        out.status.success(),
        "a faulting probe never crashes the target"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("done"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("deref_argument"),
        "the fault is reported: {stderr}"
    );
    let bss = map_entries("faulty", ".bss");
    assert_eq!(
        bss[0].1,
        100u64.to_le_bytes().to_vec(),
        "the program ran on every call"
    );
    loader.stop();
}

#[test]
fn load_prints_trace_printk_lines_and_ringbuf_events() {
    if !require_kernel("load_prints_trace_printk_lines_and_ringbuf_events") {
        return;
    }
    let loader = Loader::start("printk", &["--no-sync"]);
    let out = start_victim("printk", 20);
    assert!(out.status.success());
    // vt_add(i % 7, i): a == 3 for i = 3, 10, 17.
    wait_for("three trace lines", || {
        loader
            .later
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("trace: "))
            .count()
            == 3
    });
    let later = loader.later.lock().unwrap().clone();
    assert!(
        later.contains(&"trace: vt_add(3, 10)".to_string()),
        "{later:?}"
    );
    wait_for("three ringbuf events", || {
        loader
            .later
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("calls: "))
            .count()
            == 3
    });
    let later = loader.later.lock().unwrap().clone();
    assert!(
        later.contains(&"calls: 11 00 00 00 00 00 00 00".to_string()),
        "{later:?}"
    );
    loader.stop();
}

#[test]
fn run_prints_r0_and_errors_name_what_is_wrong() {
    if !require_kernel("run_prints_r0_and_errors_name_what_is_wrong") {
        return;
    }
    let ctx = std::env::temp_dir().join("bpftime-cli-regs.bin");
    std::fs::write(&ctx, bpftime_example_programs::pt_regs(5, 9)).unwrap();
    let object = object_path("bpf_to_bpf");
    let object = object.to_str().unwrap();
    let ctx = ctx.to_str().unwrap();
    for vm in [&[][..], &["--no-jit"][..]] {
        let out = output(
            &[
                &["run", object, "--program", "mix_args", "--ctx", ctx][..],
                vm,
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "r0 = 0");
    }
    let out = output(&["run", object, "--program", "nope", "--ctx", ctx]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no program named nope"));
    let out = output(&[
        "run",
        object,
        "--program",
        "mix_args",
        "--ctx",
        ctx,
        "--vm",
        "rbpf",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("rbpf cannot run instruction"), "{stderr}");
    let out = output(&["load", "/nonexistent/prog.o"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/prog.o"));
    let junk = std::env::temp_dir().join("bpftime-junk.o");
    std::fs::write(&junk, b"not an elf file at all").unwrap();
    let out = output(&["run", junk.to_str().unwrap(), "--program", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bpftime-junk.o"));
}
