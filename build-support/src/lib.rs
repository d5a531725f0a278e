//! Build-script helpers shared by every crate that ships kernel-side BPF C.
//!
//! Each crate's `build.rs` calls [`compile_dir`] so that all BPF objects are built the same way:
//! clang `-O2 -g -target bpf -mcpu=v3`, against a `vmlinux.h` generated from the running kernel's
//! BTF (never committed, see the conventions note) and libbpf's headers from `libbpf-dev`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the host kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Generates `vmlinux.h` in `out_dir` from the host BTF with `bpftool btf dump ... format c`.
///
/// Panics with an actionable message: build scripts report errors by panicking.
pub fn generate_vmlinux_h(out_dir: &Path) -> PathBuf {
    let header = out_dir.join("vmlinux.h");
    if header.exists() {
        return header;
    }
    let output = Command::new(bpftool())
        .args(["btf", "dump", "file", VMLINUX_BTF, "format", "c"])
        .output()
        .unwrap_or_else(|e| {
            panic!("running bpftool to generate vmlinux.h failed: {e}; run scripts/setup.sh")
        });
    assert!(
        output.status.success(),
        "bpftool btf dump {VMLINUX_BTF} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(&header, output.stdout).expect("writing vmlinux.h");
    header
}

/// Compiles every `*.bpf.c` file in `src_dir` into `out_dir/<stem>.bpf.o` and returns the objects.
pub fn compile_dir(src_dir: &Path, out_dir: &Path) -> Vec<PathBuf> {
    println!("cargo:rerun-if-changed={}", src_dir.display());
    let include = generate_vmlinux_h(out_dir);
    let mut sources: Vec<PathBuf> = std::fs::read_dir(src_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for header in std::fs::read_dir(src_dir)
        .expect("reading BPF dir")
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", header.path().display());
    }
    sources
        .iter()
        .map(|src| compile(src, include.parent().expect("vmlinux.h dir"), out_dir))
        .collect()
}

/// Compiles one BPF C file; `include_dir` holds `vmlinux.h`.
pub fn compile(src: &Path, include_dir: &Path, out_dir: &Path) -> PathBuf {
    let file_name = src.file_name().expect("source file name").to_string_lossy();
    let stem = file_name.trim_end_matches(".c");
    compile_as(
        src,
        &[include_dir],
        &out_dir.join(format!("{stem}.o")),
        out_dir,
    )
}

/// [`compile`] into `object`, searching `include_dirs` (one holds `vmlinux.h`) before the
/// system's headers: the same source built against another libbpf's headers.
pub fn compile_as(src: &Path, include_dirs: &[&Path], object: &Path, out_dir: &Path) -> PathBuf {
    let object = object.to_path_buf();
    let mut includes = Vec::new();
    for dir in include_dirs {
        includes.push("-I".into());
        includes.push(dir.as_os_str().to_owned());
    }
    let status = Command::new(clang())
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
        ])
        .args(&includes)
        .arg("-I")
        .arg(src.parent().expect("source dir"))
        // `<linux/errno.h>` (included by libbpf's usdt.bpf.h) includes `<asm/errno.h>`, which
        // Debian keeps under the multiarch directory: searched last, as libbpf-tools do.
        .args(["-idirafter", "/usr/include/x86_64-linux-gnu"])
        // Where the build puts what programs name by path (a USDT section's victim).
        .arg(format!("-DBPF_OUT_DIR=\"{}\"", out_dir.display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&object)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running clang on {}: {e}; run scripts/setup.sh",
                src.display()
            )
        });
    assert!(status.success(), "clang failed on {}", src.display());
    object
}

fn clang() -> String {
    std::env::var("CLANG").unwrap_or_else(|_| "clang".into())
}

fn bpftool() -> String {
    if let Ok(tool) = std::env::var("BPFTOOL") {
        return tool;
    }
    // Debian installs bpftool in /usr/sbin, which a non-login shell may not have on PATH.
    for candidate in ["/usr/sbin/bpftool", "/usr/local/sbin/bpftool"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "bpftool".into()
}
