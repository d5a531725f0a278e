use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("dir"));
    bpf_build::compile_dir(&dir, &out_dir);
    // The victim keeps frame pointers and no inlining of the probed functions; -O1 keeps the
    // calls real.
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(out_dir.join("victim"))
        .arg(dir.join("victim.c"))
        .status()
        .expect("running cc on victim.c");
    assert!(status.success(), "cc failed on victim.c");
    println!("cargo:rerun-if-changed=victim.c");
}
