//! Test helpers shared by the test suites and benchmarks of every crate (a dev-dependency only,
//! never published): kernel tests never skip silently. An explicit skip
//! (`BPFTIME_SKIP_KERNEL_TESTS=1`) is said on stderr and, since cargo counts a test that
//! returns early as passed, also appended to the file `BPFTIME_SKIP_REPORT` names:
//! `scripts/test.sh` counts them and reports the run as skipped, never as green.

use std::io::Write;
use std::sync::OnceLock;

use bpftime_abi::{sys, MapType};

/// Returns `true` when kernel tests should run. If BPF is unusable here, panics with the reason,
/// unless `BPFTIME_SKIP_KERNEL_TESTS=1` is set, in which case it says so and returns `false`.
pub fn require_kernel(test: &str) -> bool {
    if skip_requested() {
        record_skip(test, "BPFTIME_SKIP_KERNEL_TESTS=1");
        return false;
    }
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = PROBE.get_or_init(probe) {
        panic!(
            "{test} needs the kernel's BPF: {why}. Run scripts/setup.sh as root, or set \
             BPFTIME_SKIP_KERNEL_TESTS=1 to skip kernel tests explicitly"
        );
    }
    true
}

fn probe() -> Result<(), String> {
    let fs = std::fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    if !fs
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Err("bpffs is not mounted at /sys/fs/bpf".into());
    }
    let name = sys::object_name("probe");
    let args = sys::MapCreate::new(MapType::Array.as_raw(), &name, 4, 4, 1);
    sys::map_create(&args).map(drop).map_err(|e| {
        format!(
            "creating a BPF array map failed ({}); are you root with CAP_BPF?",
            e.source
        )
    })
}

/// Whether kernel tests were asked to be skipped.
pub fn skip_requested() -> bool {
    std::env::var("BPFTIME_SKIP_KERNEL_TESTS").as_deref() == Ok("1")
}

/// Says that `test` is skipped and why, on stderr and in the skip report.
pub fn record_skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let Some(path) = std::env::var_os("BPFTIME_SKIP_REPORT") else {
        return;
    };
    // One `write` of a whole line on an O_APPEND file: lines of parallel tests never mix.
    let line = format!("{test}: {why}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", path.to_string_lossy());
    }
}

/// An error with its sources, `: `-separated, for test failure messages (the one
/// implementation, in `bpftime-abi`; re-exported since test suites call it by this path).
pub use bpftime_abi::error_chain;
