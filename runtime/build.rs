//! Compiles the BPF C sources the object-loader tests use (`tests/bpf/*.bpf.c`) with the same
//! clang flags as every other BPF object in the workspace (see `bpf-build`), and tells the tests
//! where the objects are through `BPFTIME_TEST_BPF_DIR`.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("bpf");
    std::fs::create_dir_all(&out).expect("creating OUT_DIR/bpf");
    let src = manifest.join("tests").join("bpf");
    if src.is_dir() {
        bpf_build::compile_dir(&src, &out);
    }
    println!("cargo:rustc-env=BPFTIME_TEST_BPF_DIR={}", out.display());
    println!("cargo:rerun-if-changed=build.rs");
}
