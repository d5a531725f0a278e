//! Unmodified libbpf applications, built by this crate's `build.rs` so that the same binaries
//! can run under kernel uprobes and under `bpftime-rs load` and their outputs be compared.
//!
//! * `uprobe_tool` (`uprobe_tool.c` on a `bpftool gen skeleton` skeleton of
//!   `uprobe_tool.bpf.c`, dynamically linked against the system libbpf): attaches an entry and a
//!   return uprobe to a function of a binary and prints every ring buffer event, then the entry
//!   histogram and the `.bss` counters. Run it with `-h` for its options.
//! * `victim` (`victim.c`): `victim N` waits for a line on stdin, then calls
//!   [`VICTIM_FUNCTION`] `N` times and prints `done SUM`.

use std::path::PathBuf;

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
