use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("dir"));
    bpf_build::compile_dir(&dir, &out_dir);
    // The USDT example again, against the headers of the libbpf the tests' kernel runs use
    // (libbpf-sys's): the `struct __bpf_usdt_spec` its user space writes changed layout between
    // libbpf releases, and the object must be built with the header of the libbpf filling it.
    let libbpf_include = std::env::var("DEP_BPF_INCLUDE").expect("libbpf-sys exports its headers");
    bpf_build::compile_as(
        &dir.join("usdt_counts.bpf.c"),
        &[Path::new(&libbpf_include), &out_dir],
        &out_dir.join("usdt_counts_libbpf_rs.bpf.o"),
        &out_dir,
    );
    // The victim keeps frame pointers and no inlining of the probed functions; -O1 keeps the
    // calls real.
    for (victim, extra) in [
        ("victim", None),
        ("victim_mt", Some("-pthread")),
        ("victim_keys", Some("-pthread")),
        ("victim_stacks", None),
        ("victim_alloc", None),
        ("victim_short", None),
        ("victim_usdt", None),
        ("victim_pids", Some("-pthread")),
    ] {
        let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
        cc.args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(out_dir.join(victim))
            .arg(dir.join(format!("{victim}.c")));
        if let Some(flag) = extra {
            cc.arg(flag);
        }
        if victim == "victim_stacks" {
            // Fixed code addresses: stack ids are the same in every run (see the file).
            cc.arg("-no-pie");
        }
        let status = cc.status().expect("running cc");
        assert!(status.success(), "cc failed on {victim}.c");
        println!("cargo:rerun-if-changed={victim}.c");
    }
}
