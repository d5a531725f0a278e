//! Runs the example binary against the real kernel and checks every echoed event.
//!
//! Needs root or CAP_BPF + CAP_PERFMON and tracefs. Without them the test fails, unless
//! `BPFTIME_SKIP_KERNEL_TESTS=1` is set, in which case it is recorded as skipped.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

const COUNT: u32 = 25;

#[test]
fn echoes_every_sample_with_pid_comm_and_sequence() {
    // Skipped only when asked; a failing example is always a failure.
    if !bpftime_testutils::require_kernel("echoes_every_sample_with_pid_comm_and_sequence") {
        return;
    }
    // Meanwhile this process calls kill() too: had the BPF side not filtered on the example's
    // tgid, these calls would drain its samples and the echoes would carry our pid.
    let done = AtomicBool::new(false);
    let output = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                // SAFETY: signal 0 only checks permissions; nothing is delivered.
                unsafe { libc::kill(libc::getpid(), 0) };
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        });
        let output = run_example();
        done.store(true, Ordering::Relaxed);
        output
    });
    check(output);
}

fn run_example() -> (String, std::process::Output) {
    let child = Command::new(env!("CARGO_BIN_EXE_user_ringbuf"))
        .args(["--count", &COUNT.to_string(), "--interval-ms", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the user_ringbuf example");
    let pid = child.id().to_string();
    (
        pid,
        child.wait_with_output().expect("waiting for the example"),
    )
}

fn check((pid, output): (String, std::process::Output)) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "the example failed ({}); it needs root or CAP_BPF + CAP_PERFMON and tracefs.\
             \nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
    }

    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("header line")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["TIME", "EVENT", "COMM", "PID", "SEQ", "MESSAGE"]);

    // Every event must come from the child itself (the BPF side filters on its tgid), with the
    // binary's file name as comm.
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), COUNT as usize, "stdout:\n{stdout}");
    for (seq, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), 10, "row {seq}: {row:?}");
        let time: Vec<&str> = row[0].split(':').collect();
        assert_eq!(time.len(), 3, "TIME column of row {seq}: {row:?}");
        assert_eq!(row[1], "echo");
        assert_eq!(row[2], "user_ringbuf");
        assert_eq!(row[3], pid, "PID of row {seq}");
        assert_eq!(row[4], seq.to_string(), "sequence of row {seq}");
        assert_eq!(row[5..].join(" "), format!("hello from user space #{seq}"));
    }
}
