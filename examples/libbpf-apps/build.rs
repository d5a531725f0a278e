//! Builds the libbpf application the way its own Makefile would: the BPF object with
//! `bpf_build`, its skeleton with `bpftool gen skeleton`, then the C loader (dynamically linked
//! against the system libbpf, so a preloaded shim sees the libc calls libbpf makes) and the
//! victim with `cc`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=BPFTOOL");
    println!("cargo:rerun-if-env-changed=CC");

    let objects = bpf_build::compile_dir(&dir, &out_dir);
    let object = out_dir.join("uprobe_tool.bpf.o");
    assert!(
        objects.contains(&object),
        "bpf_build did not build {} (got {objects:?})",
        object.display()
    );

    let skeleton = out_dir.join("uprobe_tool.skel.h");
    let tool = bpftool();
    let output = Command::new(&tool)
        .args(["gen", "skeleton"])
        .arg(&object)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {tool} gen skeleton failed: {e}; run scripts/setup.sh (installs bpftool)"
            )
        });
    assert!(
        output.status.success(),
        "{tool} gen skeleton {} failed: {}",
        object.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(&skeleton, &output.stdout)
        .unwrap_or_else(|e| panic!("writing {}: {e}", skeleton.display()));

    cc(
        &dir.join("uprobe_tool.c"),
        &out_dir.join("uprobe_tool"),
        &["-O2", "-g", "-Wall", "-Wextra"],
        &["-I", out_dir.to_str().expect("OUT_DIR is UTF-8")],
        &["-lbpf", "-lelf", "-lz"],
    );
    // The USDT tool (opens an object file given on its command line).
    cc(
        &dir.join("usdt_tool.c"),
        &out_dir.join("usdt_tool"),
        &["-O2", "-g", "-Wall", "-Wextra"],
        &[],
        &["-lbpf", "-lelf", "-lz"],
    );
    // The benchmark's multi-threaded victim.
    cc(
        &dir.join("victim_mt.c"),
        &out_dir.join("victim_mt"),
        &["-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-pthread"],
        &[],
        &["-pthread"],
    );
    // Raw bpf()/perf_event_open() calls with bad input (no libbpf).
    cc(
        &dir.join("bad_calls.c"),
        &out_dir.join("bad_calls"),
        &["-O1", "-g", "-Wall", "-Wextra"],
        &[],
        &[],
    );
    // -O1 and no inlining keep lt_work a real call; frame pointers as in the other victims.
    cc(
        &dir.join("victim.c"),
        &out_dir.join("victim"),
        &["-O1", "-g", "-fno-omit-frame-pointer", "-Wall"],
        &[],
        &[],
    );
}

/// Compiles and links one C program; `libs` come after the source, as the linker needs.
fn cc(src: &Path, out: &Path, flags: &[&str], includes: &[&str], libs: &[&str]) {
    println!("cargo:rerun-if-changed={}", src.display());
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args(flags)
        .args(includes)
        .arg("-o")
        .arg(out)
        .arg(src)
        .args(libs)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {compiler} on {}: {e}; run scripts/setup.sh (installs gcc)",
                src.display()
            )
        });
    assert!(
        status.success(),
        "{compiler} failed on {}; if libbpf/libelf/zlib headers or libraries are missing, run \
         scripts/setup.sh (installs libbpf-dev, libelf-dev, zlib1g-dev)",
        src.display()
    );
}

/// bpftool, found as `bpf_build` finds it (its lookup is private): `$BPFTOOL`, then Debian's
/// /usr/sbin (often not on a non-login shell's PATH), then PATH.
fn bpftool() -> String {
    if let Ok(tool) = std::env::var("BPFTOOL") {
        return tool;
    }
    ["/usr/sbin/bpftool", "/usr/local/sbin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("bpftool")
        .into()
}
