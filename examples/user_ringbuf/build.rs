fn main() {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("dir"));
    bpf_build::compile_dir(&manifest, &out_dir);
}
