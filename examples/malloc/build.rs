use std::path::{Path, PathBuf};
use std::process::Command;

fn cc(out: &Path, src: &Path, extra: &[&str]) {
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running cc on {}: {e}", src.display()));
    assert!(status.success(), "cc failed on {}", src.display());
    println!("cargo:rerun-if-changed={}", src.display());
}

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("dir"));
    // malloc.bpf.c here, the benchmark's array-counter programs in bench/.
    bpf_build::compile_dir(&dir, &out_dir);
    bpf_build::compile_dir(&dir.join("bench"), &out_dir);
    // -fno-builtin-malloc: the compiler must not fold or drop the malloc/free pairs the tests
    // count; -O1 keeps the calls real.
    cc(
        &out_dir.join("victim"),
        &dir.join("victim.c"),
        &["-O1", "-g", "-fno-builtin-malloc", "-fno-builtin-free"],
    );
    // The bench victim's probed functions are written in assembly so their first instruction
    // (what the kernel's uprobe path depends on) does not change with the compiler.
    cc(
        &out_dir.join("bench_victim"),
        &dir.join("bench").join("bench_victim.c"),
        &["-O2", "-g", "-pthread"],
    );
}
