//! Unmodified libbpf applications, built by this crate's `build.rs` so that the same binaries
//! can run under kernel uprobes and under `bpftime-rs load` and their outputs be compared.
//!
//! * `uprobe_tool` (`uprobe_tool.c` on a `bpftool gen skeleton` skeleton of
//!   `uprobe_tool.bpf.c`, dynamically linked against the system libbpf): attaches an entry and a
//!   return uprobe to a function of a binary and prints every ring buffer event, then the entry
//!   histogram and the `.bss` counters. Run it with `-h` for its options.
//! * `victim` (`victim.c`): `victim N` waits for a line on stdin, then calls
//!   [`VICTIM_FUNCTION`] `N` times and prints `done SUM`.
//! * `aya_uprobe_tool` and `libbpf_rs_uprobe_tool` (`src/bin/`): the same tool written in
//!   Rust over aya and over libbpf-rs, loading the same `uprobe_tool.bpf.o`; same options, same
//!   output. [`cli`] holds what they share with uprobe_tool.c (options, output lines).

pub mod cli;

use std::path::{Path, PathBuf};

/// The probed function of the victim: `long lt_work(long a)`, returning `a * 2 + 1`.
pub const VICTIM_FUNCTION: &str = "lt_work";

const TOOL: &str = concat!(env!("OUT_DIR"), "/uprobe_tool");
const VICTIM: &str = concat!(env!("OUT_DIR"), "/victim");
const OBJECT: &str = concat!(env!("OUT_DIR"), "/uprobe_tool.bpf.o");
const SKELETON: &str = concat!(env!("OUT_DIR"), "/uprobe_tool.skel.h");

/// Path of the `uprobe_tool` executable (the libbpf application).
pub fn tool_path() -> PathBuf {
    PathBuf::from(TOOL)
}

/// Path of the `aya_uprobe_tool` executable (the tool on aya); see [`rust_tool_path`].
pub fn aya_tool_path() -> PathBuf {
    rust_tool_path("aya_uprobe_tool")
}

/// Path of the `libbpf_rs_uprobe_tool` executable (the tool on libbpf-rs); see
/// [`rust_tool_path`].
pub fn libbpf_rs_tool_path() -> PathBuf {
    rust_tool_path("libbpf_rs_uprobe_tool")
}

/// Path of one of this crate's binaries (`src/bin/NAME.rs`).
///
/// Cargo puts a package's binaries in `target/[TRIPLE/]PROFILE/`. Only this package's own
/// integration tests can name them with `env!("CARGO_BIN_EXE_NAME")` (and only for them does
/// cargo build the binaries first); other code finds them in that directory:
///
/// 1. beside the running executable's directory when that is `deps/` or `examples/` (test,
///    bench and example binaries live in `PROFILE/deps/` or `PROFILE/examples/`), or in that
///    directory itself (a binary in `PROFILE/`);
/// 2. else `PROFILE/` as found from this crate's build directory (`OUT_DIR` is
///    `PROFILE/build/bpftime-example-libbpf-apps-HASH/out`).
///
/// The first candidate that exists wins; when none does, the first is returned, so that the
/// error of running it names where it was expected. Other packages' tests get the binaries
/// only once something built them: `cargo build -p bpftime-example-libbpf-apps` (or a test
/// run of this package) with the same profile.
pub fn rust_tool_path(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let in_profile_subdir = dir
            .file_name()
            .is_some_and(|d| d == "deps" || d == "examples");
        match dir.parent() {
            Some(profile) if in_profile_subdir => candidates.push(profile.join(name)),
            _ => candidates.push(dir.join(name)),
        }
    }
    if let Some(profile) = Path::new(env!("OUT_DIR")).ancestors().nth(3) {
        candidates.push(profile.join(name));
    }
    candidates
        .iter()
        .find(|path| path.is_file())
        .or(candidates.first())
        .cloned()
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Path of `usdt_tool` (`usdt_tool OBJECT [-d SECONDS]`: a libbpf application attaching every
/// program of a USDT object where its section says; prints `totals K V` lines at exit).
pub fn usdt_tool_path() -> PathBuf {
    PathBuf::from(concat!(env!("OUT_DIR"), "/usdt_tool"))
}

/// Path of `bad_calls` (raw `bpf()`/`perf_event_open()` calls with bad input; `bad_calls
/// BINARY FILE_OFFSET`).
pub fn bad_calls_path() -> PathBuf {
    PathBuf::from(concat!(env!("OUT_DIR"), "/bad_calls"))
}

/// Path of `victim_mt` (`victim_mt THREADS CALLS`, the benchmark's victim).
pub fn victim_mt_path() -> PathBuf {
    PathBuf::from(concat!(env!("OUT_DIR"), "/victim_mt"))
}

/// Path of the `victim` executable the tool probes.
pub fn victim_path() -> PathBuf {
    PathBuf::from(VICTIM)
}

/// Path of the BPF object the tool's skeleton embeds (`uprobe_tool.bpf.o`).
pub fn object_path() -> PathBuf {
    PathBuf::from(OBJECT)
}

/// Path of the generated skeleton header (`uprobe_tool.skel.h`).
pub fn skeleton_path() -> PathBuf {
    PathBuf::from(SKELETON)
}
