//! `load -- APP` throughput and hooked-call cost: the same application (`uprobe_tool -q`, which
//! counts the events it receives) on kernel uprobes and under bpftime-rs, receiving through its
//! ring buffer and through a libbpf perf buffer, while `victim_mt` calls the probed function from
//! 4 threads; and the victim alone, unprobed, as the baseline of the per-call cost. One run
//! measures every row.
//!
//! `cargo build --release --workspace && cargo bench -p bpftime-example-libbpf-apps --bench
//! app_events` (as root; bpftime-rs, its agent and shim are taken from `target/release/`).
//!
//! Columns: ns per hooked call (wall time of the slowest victim thread / calls, all 4 at once),
//! events received by the application per second of the victim's run, and the share of the
//! events the programs produced (an entry and a return per call) that reached the application
//! (the rest were dropped by a full ring, as the kernel drops them).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bpftime_example_libbpf_apps::{rust_tool_path, tool_path, victim_mt_path, VICTIM_FUNCTION};
use bpftime_testutils::require_kernel;

const THREADS: u32 = 4;
const CALLS: u64 = 200_000;

struct Row {
    ns_per_call: f64,
    received: u64,
    produced: u64,
    seconds: f64,
}

fn victim(prefix: &[String]) -> (Command, String) {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(victim_mt_path());
            c
        }
        None => Command::new(victim_mt_path()),
    };
    cmd.args([THREADS.to_string(), CALLS.to_string()]);
    (cmd, victim_mt_path().display().to_string())
}

/// Runs the victim (wrapped in `prefix`) and returns its ns per call and wall seconds.
fn run_victim(prefix: &[String]) -> (f64, f64) {
    let (mut cmd, _) = victim(prefix);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("victim_mt");
    let start = Instant::now();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("starting the victim");
    let out = child.wait_with_output().expect("victim_mt");
    let seconds = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let ns = text
        .lines()
        .find_map(|l| l.strip_prefix("ns_per_call "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("victim_mt printed {text:?}"));
    (ns, seconds)
}

/// The tool (wrapped in `tool_prefix`) receiving while the victim (wrapped in
/// `victim_prefix`) runs.
fn run(tool_prefix: &[String], perf: bool, victim_prefix: &[String]) -> Row {
    let mut cmd = match tool_prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(tool_path());
            c
        }
        None => Command::new(tool_path()),
    };
    cmd.arg("-b")
        .arg(victim_mt_path())
        .args(["-f", VICTIM_FUNCTION, "-q", "-n", "0", "-d", "120"]);
    if perf {
        cmd.arg("-P");
    }
    let mut tool = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("uprobe_tool");
    let mut lines = BufReader::new(tool.stdout.take().expect("stdout")).lines();
    match lines.next() {
        Some(Ok(l)) if l == "attached" => {}
        other => panic!("uprobe_tool did not attach: {other:?}"),
    }
    let (ns_per_call, seconds) = run_victim(victim_prefix);
    // Let the application drain what is left, then stop it.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill takes no pointer; the pid is our live child (the tool, or `bpftime-rs load`,
    // which passes SIGINT on to it).
    unsafe { libc::kill(tool.id() as i32, libc::SIGINT) };
    let mut received = None;
    let mut produced = None;
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("received ") {
            received = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
        if let Some(rest) = line.strip_prefix("bss entries=") {
            let mut it = rest.split(" returns=");
            let e: Option<u64> = it.next().and_then(|v| v.parse().ok());
            let r: Option<u64> = it.next().and_then(|v| v.parse().ok());
            produced = e.zip(r).map(|(e, r)| e + r);
        }
    }
    let _ = tool.wait();
    Row {
        ns_per_call,
        received: received.expect("the tool's received line"),
        produced: produced.expect("the tool's bss line"),
        seconds,
    }
}

fn main() {
    if !require_kernel("app_events benchmark") {
        return;
    }
    let bpftime = rust_tool_path("bpftime-rs");
    assert!(
        Path::new(&bpftime).is_file(),
        "{} not found: `cargo build --release --workspace` first",
        bpftime.display()
    );
    let bpftime = bpftime.display().to_string();
    let _ = Command::new(&bpftime)
        .args(["unload", "uprobe_tool"])
        .output();
    let load = vec![
        bpftime.clone(),
        "load".into(),
        "--no-sync".into(),
        "--".into(),
    ];
    let start = vec![bpftime.clone(), "start".into(), "--".into()];

    let (baseline_ns, _) = run_victim(&[]);
    println!(
        "victim_mt: {THREADS} threads x {CALLS} calls of {VICTIM_FUNCTION}; unprobed \
         {baseline_ns:.1} ns/call"
    );
    println!(
        "| APP on | buffer | ns/call hooked | x unprobed | events received/s | received/produced |"
    );
    println!("|---|---|---|---|---|---|");
    let mut costs = Vec::new();
    for (name, tool_prefix, victim_prefix) in [
        ("kernel uprobes", Vec::new(), Vec::new()),
        ("bpftime-rs", load.clone(), start.clone()),
    ] {
        for perf in [false, true] {
            let row = run(&tool_prefix, perf, &victim_prefix);
            let _ = Command::new(&bpftime)
                .args(["unload", "uprobe_tool"])
                .output();
            costs.push(row.ns_per_call);
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.0} | {:.1}% |",
                if perf { "perf buffer" } else { "ring buffer" },
                row.ns_per_call,
                row.ns_per_call / baseline_ns,
                row.received as f64 / row.seconds,
                100.0 * row.received as f64 / row.produced.max(1) as f64,
            );
        }
    }
    println!(
        "kernel / bpftime-rs cost per hooked call: ring buffer {:.1}x, perf buffer {:.1}x",
        costs[0] / costs[2],
        costs[1] / costs[3]
    );
}
