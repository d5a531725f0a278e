//! The CLI over the userspace runtime: load, start, attach, detach, maps, run, unload, with
//! real processes and real prog.o files (examples/programs).

mod common;

use common::*;

use bpftime_example_programs::{model, object_path, victim_path, victim_usdt_path};
use bpftime_testutils::require_kernel;
use std::process::{Command, Stdio};

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
    let out = spawn_target(Some("hash_counter"), 2000);
    let stdout = finish(out);
    assert!(stdout.contains("done"));
    let expected = &model::expected("hash_counter", 2000)["calls_by_arg"];
    assert_eq!(&map_entries("hash_counter", "calls_by_arg"), expected);
    // The forwarder catches up: the kernel mirror and --diff agree (bpftool reads the same
    // mirror in cli_lifecycle::maps_diff_exits_2_when_the_kernel_mirror_differs).
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
    wait_blocked_in_read(child.id());
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
    wait_blocked_in_read(child.id());
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

/// USDT through `attach PID`: the agent raises the probes' semaphores in the target (the victim
/// counts the calls that saw vt:sem's up), `detach` lowers them again (as the kernel's uprobe
/// unregistration takes its reference-counter increment off): the next run sees none.
#[test]
fn attach_raises_usdt_semaphores_and_detach_lowers_them() {
    if !require_kernel("attach_raises_usdt_semaphores_and_detach_lowers_them") {
        return;
    }
    let object = "usdt_counts_libbpf_rs";
    let loader = Loader::start(object, &["--no-sync"]);
    let blocked = || {
        let child = Command::new(victim_usdt_path())
            .arg("500")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_blocked_in_read(child.id());
        child
    };
    let child = blocked();
    let out = output(&["attach", &child.id().to_string(), "--object", object]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    for probe in ["add", "konst", "sem"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!("/on_{probe} usdt vt:{probe} at "))
                    && l.ends_with("semaphore raised")),
            "vt:{probe}: {stderr}"
        );
    }
    assert!(
        finish(child).contains("done 500 500"),
        "raised while attached"
    );
    let sem_calls = map_entries(object, "totals")[8].1.clone();
    assert_eq!(sem_calls, 500i64.to_le_bytes().to_vec());

    let child = blocked();
    let pid = child.id().to_string();
    assert!(output(&["attach", &pid, "--object", object])
        .status
        .success());
    let out = output(&["detach", &pid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(finish(child).contains("done 500 0"), "lowered by detach");
    assert_eq!(
        map_entries(object, "totals")[8].1,
        sem_calls,
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
    // The error part of the status line (after the section, which names the symbol too) names
    // the resolved file and the symbol.
    let victim = std::fs::canonicalize(victim_path()).unwrap();
    let error = stderr
        .lines()
        .find_map(|l| l.split_once("(uprobe/victim:no_such_function): "))
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no error line for the unknown symbol: {stderr}"));
    assert!(
        error.contains("`no_such_function` not found in")
            && error.contains(victim.to_str().unwrap()),
        "the error names the symbol and the file: {error}"
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
    // Reported once over the 100 faulting calls, naming the program and the faulting
    // instruction (the `ok` status line names the program too, so match the report).
    let reports: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("the call continues unprobed"))
        .collect();
    assert_eq!(reports.len(), 1, "one fault report: {stderr}");
    assert!(
        reports[0].contains("deref_argument") && reports[0].contains("instruction"),
        "{}",
        reports[0]
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
    let regs = bpftime_example_programs::pt_regs(5, 9);
    std::fs::write(&ctx, &regs).unwrap();
    // A short context: the first 16 bytes (r15, r14), the rest zero-padded.
    let short = std::env::temp_dir().join("bpftime-cli-regs-short.bin");
    std::fs::write(&short, &regs[..16]).unwrap();
    let args = object_path("ctx_args");
    let args = args.to_str().unwrap();
    let ctx = ctx.to_str().unwrap();
    let short = short.to_str().unwrap();
    for vm in [&[][..], &["--no-jit"][..], &["--vm", "rbpf"][..]] {
        for (program, ctx, r0) in [
            ("weighted_args", ctx, "r0 = 5009"),
            ("sixth_arg", ctx, "r0 = 1"),
            ("sixth_arg", short, "r0 = 1"),
        ] {
            let out =
                output(&[&["run", args, "--program", program, "--ctx", ctx][..], vm].concat());
            assert!(
                out.status.success(),
                "{program} {vm:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                r0,
                "{program} {vm:?} on {ctx}"
            );
        }
    }
    // A context that sets PARM6 (r9) shows the padding is zeros, not whatever was there.
    let mut six = regs.clone();
    six[64..72].copy_from_slice(&41u64.to_le_bytes());
    let six_path = std::env::temp_dir().join("bpftime-cli-regs-six.bin");
    std::fs::write(&six_path, &six).unwrap();
    let out = output(&[
        "run",
        args,
        "--program",
        "sixth_arg",
        "--ctx",
        six_path.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "r0 = 42");
    let object = object_path("bpf_to_bpf");
    let object = object.to_str().unwrap();
    let out = output(&["run", object, "--program", "nope", "--ctx", ctx]);
    assert!(one_line_error(&out).contains("no program named nope"));
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
    let error = one_line_error(&out);
    assert!(error.contains("rbpf cannot run instruction"), "{error}");
    let out = output(&["load", "/nonexistent/prog.o"]);
    assert!(one_line_error(&out).contains("/nonexistent/prog.o"));
    let junk = std::env::temp_dir().join("bpftime-junk.o");
    std::fs::write(&junk, b"not an elf file at all").unwrap();
    let out = output(&["run", junk.to_str().unwrap(), "--program", "x"]);
    assert!(one_line_error(&out).contains("bpftime-junk.o"));
}

/// A failed command's error: exactly one line on stderr (the README's promise), returned.
fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "the command succeeded: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    stderr
}

/// The pid of the only child of `pid` (the command `start` runs).
fn only_child(pid: u32) -> u32 {
    let mut found = None;
    wait_for("the command under start", || {
        found = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        found.is_some()
    });
    found.unwrap()
}

/// Whether `pid` has exited (gone, or a zombie its new parent has not reaped yet).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')').next().unwrap().trim_start().starts_with('Z')
    })
}

#[test]
fn override_return_replaces_what_the_hooked_function_returns() {
    if !require_kernel("override_return_replaces_what_the_hooked_function_returns") {
        return;
    }
    let loader = Loader::start("override_return", &["--no-sync"]);
    assert!(
        loader
            .lines
            .iter()
            .any(|l| l.contains("bpf_get_func_ip") || l.contains("verified by the kernel")),
        "{:?}",
        loader.lines
    );
    const ROUNDS: i64 = 500;
    let out = spawn_target(Some("override_return"), ROUNDS as u32);
    let stdout = finish(out);
    // The victim sums vt_add(i % 7, i) and vt_message(word, len) over the rounds; with the
    // override every vt_add returns (i % 7) * 100 instead of i % 7 + i.
    let message = |i: i64| [6, 5, 7, 5, 19][(i % 5) as usize];
    let overridden: i64 = (0..ROUNDS).map(|i| (i % 7) * 100 + message(i)).sum();
    let original: i64 = (0..ROUNDS).map(|i| i % 7 + i + message(i)).sum();
    assert_ne!(overridden, original);
    assert!(
        stdout.contains(&format!("done {overridden}")),
        "expected done {overridden} (not {original}): {stdout}"
    );
    assert!(loader.stop().success());
}

#[test]
fn start_stands_in_for_its_command() {
    if !require_kernel("start_stands_in_for_its_command") {
        return;
    }
    let loader = Loader::start("percpu_array", &["--no-sync"]);
    let start = || spawn_target(Some("percpu_array"), 10);
    use std::os::unix::process::ExitStatusExt;
    // A signal sent to `start` reaches the command, and `start` exits as the command did.
    let mut child = start();
    let command = only_child(child.id());
    wait_blocked_in_read(command);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    // Its stdin stays open: at EOF the victim would exit on its own.
    let stdin = child.stdin.take();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(exited(command), "the command outlived start");

    // `start` killed outright: the command dies with it instead of running on unsupervised.
    let mut child = start();
    let command = only_child(child.id());
    wait_blocked_in_read(command);
    let stdin = child.stdin.take();
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    wait_for("the command to die with start", || exited(command));
    drop(stdin);

    // The command's own exit code comes back.
    let out = bpftime()
        .args([
            "start",
            "--object",
            "percpu_array",
            "--",
            "/bin/sh",
            "-c",
            "exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(loader.stop().success());
}

/// Programs follow what the started command becomes: `start -- sh -c '...'` runs the victim
/// through `env` (an exec) and as a background child of the shell; both are hooked (the
/// shell itself does not map the victim and reports it pending), and the map holds the calls
/// of both runs, as kernel uprobes on the file would count them.
#[test]
fn exec_d_and_child_victims_of_a_started_shell_are_hooked() {
    if !require_kernel("exec_d_and_child_victims_of_a_started_shell_are_hooked") {
        return;
    }
    let loader = Loader::start("hash_counter", &[]);
    let victim = victim_path().display().to_string();
    let script = format!(
        "echo go | env BPFTIME_TEST=1 {victim} 1200 && (echo go | {victim} 800 &) ; wait; sleep 0.2"
    );
    let out = bpftime()
        .args([
            "start",
            "--object",
            "hash_counter",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pending hash_counter/"),
        "the shell reports the victim's programs pending: {stderr}"
    );
    // Both runs' calls: the model of each run, summed key by key.
    let expected = summed_calls(&[1200, 800]);
    wait_for("both victims' calls", || {
        map_entries("hash_counter", "calls_by_arg") == expected
    });
    assert!(loader.stop().success());
}

/// `detach PID` reaches what PID started, as removing a kernel uprobe reaches every process
/// running the file: the started shell's child blocked in read(2) is detached with it (its
/// calls afterwards count nothing), and a program the shell starts after the detach inherits
/// the agent through the environment but hooks nothing (its status says which ancestor was
/// detached). The victim run before the detach is the control: its calls are counted.
#[test]
fn detach_reaches_a_started_trees_children_and_what_they_start_later() {
    if !require_kernel("detach_reaches_a_started_trees_children_and_what_they_start_later") {
        return;
    }
    use std::io::{BufRead, Write};
    let loader = Loader::start("hash_counter", &[]);
    let victim = victim_path().display().to_string();
    let script = format!(
        "echo go | {victim} 200; echo ran0; {victim} 300; echo ran1; read x; \
         echo go | {victim} 300; echo ran2"
    );
    let mut start = bpftime()
        .args([
            "start",
            "--object",
            "hash_counter",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = start.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(start.stdout.take().unwrap()).lines();
    let mut wait_line = |want: &str| loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(want) => break,
            Some(Ok(_)) => {}
            other => panic!("no {want} line: {other:?}"),
        }
    };
    let counted = model::expected("hash_counter", 200)["calls_by_arg"].clone();
    wait_line("ran0");
    wait_for("the first victim's calls", || {
        map_entries("hash_counter", "calls_by_arg") == counted
    });
    // The second victim, hooked, waits for its go line.
    let shell = only_child(start.id());
    let hooked = only_child(shell);
    wait_blocked_in_read(hooked);
    let out = output(&["detach", &shell.to_string()]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pid in [shell, hooked] {
        assert!(said.contains(&format!("detached from pid {pid}")), "{said}");
    }
    writeln!(stdin, "go").unwrap();
    wait_line("ran1");
    writeln!(stdin, "x").unwrap();
    wait_line("ran2");
    drop(stdin);
    let status = start.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{stderr}");
    assert_eq!(
        map_entries("hash_counter", "calls_by_arg"),
        counted,
        "nothing counted after the detach"
    );
    assert!(
        stderr.contains(&format!("ancestor pid {shell} was detached")),
        "the victim started after the detach says why it hooked nothing: {stderr}"
    );
    assert!(loader.stop().success());
}

/// What an attached process runs later is probed too, as kernel uprobes probe every process
/// running the file: the agent hooks libc's `execve`, and the programs the process execs get
/// the agent in their environment (a forked child's exec and the process's own). The same
/// holds for a started command that clears its environment (`env -i`).
#[test]
fn attached_and_started_processes_pass_the_agent_to_what_they_exec() {
    if !require_kernel("attached_and_started_processes_pass_the_agent_to_what_they_exec") {
        return;
    }
    use std::io::Write;
    let loader = Loader::start("hash_counter", &[]);
    let victim = victim_path().display().to_string();
    // Each victim reads its go line from its own input (stdio would buffer both from one pipe).
    let go = std::env::temp_dir().join(format!("bpftime-go-{}", std::process::id()));
    std::fs::write(&go, "go\n").unwrap();
    let script = format!(
        "read x; echo go | {victim} 200; exec {victim} 300 < {}",
        go.display()
    );
    let mut shell = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked_in_read(shell.id());
    let out = output(&[
        "attach",
        &shell.id().to_string(),
        "--object",
        "hash_counter",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("follow libc.so.6:execve at "), "{stderr}");
    let mut stdin = shell.stdin.take().unwrap();
    writeln!(stdin, "x").unwrap();
    drop(stdin);
    let done = shell.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&go);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(
        String::from_utf8_lossy(&done.stdout)
            .matches("done")
            .count(),
        2,
        "both victims ran"
    );
    let expected = summed_calls(&[200, 300]);
    wait_for("both exec'd victims' calls", || {
        map_entries("hash_counter", "calls_by_arg") == expected
    });

    // `env -i` drops the started tree's environment; the agent in `env` puts it back.
    let out = bpftime()
        .args([
            "start",
            "--object",
            "hash_counter",
            "--",
            "env",
            "-i",
            &victim,
            "100",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = finish_output(out);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let more = summed_calls(&[200, 300, 100]);
    wait_for("the env -i victim's calls", || {
        map_entries("hash_counter", "calls_by_arg") == more
    });
    assert!(loader.stop().success());
}

/// `hash_counter`'s `calls_by_arg` after victim runs of `rounds` each: the runs' models,
/// summed key by key.
fn summed_calls(rounds: &[u32]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut sums: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
    for &r in rounds {
        for (k, v) in &model::expected("hash_counter", r)["calls_by_arg"] {
            *sums.entry(k.clone()).or_default() += u64::from_le_bytes(v[..8].try_into().unwrap());
        }
    }
    sums.into_iter()
        .map(|(k, v)| (k, v.to_le_bytes().to_vec()))
        .collect()
}

/// Writes the go line to a spawned victim and collects its output.
fn finish_output(mut child: std::process::Child) -> std::process::Output {
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    child.wait_with_output().unwrap()
}
