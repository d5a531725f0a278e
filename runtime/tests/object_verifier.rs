//! The kernel verifier gate, on the objects in `tests/bpf/`. These tests need the kernel's BPF
//! (root): they fail with a clear message when it is missing, unless
//! `BPFTIME_SKIP_KERNEL_TESTS=1` says to skip kernel tests.

use bpftime_runtime::object::BpfObject;
use bpftime_runtime::verifier::{verify, VerifyError, HELPER_GET_FUNC_IP, HELPER_OVERRIDE_RETURN};

use bpftime_testutils::require_kernel;

fn load(name: &str) -> BpfObject {
    let path = format!("{}/{name}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
    BpfObject::from_file(&path).unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

fn verify_ok(obj: &BpfObject, name: &str) -> bpftime_runtime::verifier::VerifiedProgram {
    let idx = obj.program_index(name).unwrap();
    match verify(obj, idx) {
        Ok(v) => v,
        Err(e) => panic!("{name} should pass the kernel verifier: {e}"),
    }
}

#[test]
fn good_programs_pass_the_kernel_verifier() {
    if !require_kernel("good_programs_pass_the_kernel_verifier") {
        return;
    }
    for (object, programs) in [
        (
            "uprobe_counter",
            &[
                "count_arg",
                "ret_probe",
                "core_probe",
                "core_types",
                "core_missing",
            ][..],
        ),
        ("globals", &["use_globals"][..]),
        ("calls", &["xdp_calls", "loop_prog"][..]),
        ("legacy_maps", &["legacy_prog"][..]),
        (
            "mixed_sections",
            &["on_work", "on_work_too", "sys_prog"][..],
        ),
        ("extern_ksym", &["plain"][..]),
        // tp_btf needs the attach BTF id the gate looks up in vmlinux. (`on_unlink`, fentry, is
        // refused with EPERM on this kernel whichever loader is used, bpftool/libbpf included.)
        ("tracing", &["on_switch"][..]),
    ] {
        let obj = load(object);
        for name in programs {
            let v = verify_ok(&obj, name);
            let spec = obj.program(name).unwrap();
            // No substitution: the bytes the runtime runs are the bytes the kernel was handed,
            // which are the loader's relocated instructions.
            assert_eq!(v.insns, v.verified_insns, "{name}");
            assert_eq!(
                v.verified_insns, spec.insns,
                "{name}: no substitution expected"
            );
            assert!(v.substitutions.is_empty());
            assert!(v.stats.contains("processed"), "{name}: stats {:?}", v.stats);
        }
    }
}

#[test]
fn callback_program_needs_and_gets_func_info() {
    if !require_kernel("callback_program_needs_and_gets_func_info") {
        return;
    }
    let obj = load("calls");
    let p = obj.program("loop_prog").unwrap();
    assert!(p.functions.iter().all(|f| f.btf_type_id.is_some()));
    verify_ok(&obj, "loop_prog");
}

#[test]
fn bad_program_is_rejected_with_the_log() {
    if !require_kernel("bad_program_is_rejected_with_the_log") {
        return;
    }
    let obj = load("bad_verifier");
    let err = verify(&obj, obj.program_index("no_null_check").unwrap()).unwrap_err();
    let msg = err.to_string();
    match &err {
        VerifyError::Rejected {
            program,
            section,
            log,
            log_tail,
            ..
        } => {
            assert_eq!(program, "no_null_check");
            assert_eq!(section, "uprobe");
            assert!(log.contains("map_value_or_null"), "log: {log}");
            assert!(log_tail.contains("map_value_or_null"), "tail: {log_tail}");
        }
        other => panic!("expected a verifier rejection, got {other}"),
    }
    assert!(
        msg.contains("no_null_check") && msg.contains("section uprobe"),
        "{msg}"
    );
    assert!(msg.contains("invalid mem access"), "{msg}");
}

#[test]
fn override_return_is_verified_through_a_substitute() {
    if !require_kernel("override_return_is_verified_through_a_substitute") {
        return;
    }
    let obj = load("mixed_sections");
    let spec = obj.program("override").unwrap();
    let v = verify_ok(&obj, "override");
    assert_eq!(v.substitutions.len(), 1);
    let s = v.substitutions[0];
    assert_eq!(
        (s.original, s.replacement),
        (HELPER_OVERRIDE_RETURN, HELPER_GET_FUNC_IP)
    );
    let imm = |i: &[u8; 8]| i32::from_le_bytes([i[4], i[5], i[6], i[7]]);
    // The runtime keeps the real call; only the verified copy differs, at that one instruction.
    assert_eq!(v.verified_insns.len(), spec.insns.len());
    assert_eq!(imm(&spec.insns[s.insn_index]), HELPER_OVERRIDE_RETURN);
    assert_eq!(imm(&v.insns[s.insn_index]), HELPER_OVERRIDE_RETURN);
    assert_eq!(imm(&v.verified_insns[s.insn_index]), HELPER_GET_FUNC_IP);
    for (k, (a, b)) in v.insns.iter().zip(&v.verified_insns).enumerate() {
        if k != s.insn_index {
            assert_eq!(a, b);
        }
    }
}

#[test]
fn unknown_section_cannot_be_verified() {
    if !require_kernel("unknown_section_cannot_be_verified") {
        return;
    }
    let obj = load("mixed_sections");
    let err = verify(&obj, obj.program_index("weird").unwrap()).unwrap_err();
    assert!(
        matches!(err, VerifyError::UnknownProgramType { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("weird_unknown_section/abc"));
    let err = verify(&obj, 99).unwrap_err();
    assert!(matches!(err, VerifyError::NoSuchProgram { .. }));
}

/// What agents run is what the kernel verified: the programs `LoadedObject` publishes in its
/// manifest (the only place agents take programs from) equal, instruction by instruction, the
/// bytes the gate handed to BPF_PROG_LOAD, except at the listed substitutions, where the
/// original helper call stands.
#[test]
fn the_manifest_holds_the_bytes_the_kernel_verified() {
    if !require_kernel("the_manifest_holds_the_bytes_the_kernel_verified") {
        return;
    }
    use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
    for object in ["mixed_sections", "uprobe_counter", "calls"] {
        let path = format!("{}/{object}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"));
        let segment = format!("verifier-gate-{object}-{}", std::process::id());
        let loaded = LoadedObject::load(
            std::path::Path::new(&path),
            Some(&segment),
            LoadOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{object}: {e}"));
        let obj = load(object);
        let manifest = loaded.manifest().expect("published").clone();
        assert!(!manifest.programs.is_empty(), "{object}: nothing published");
        let mut substituted = 0;
        for published in &manifest.programs {
            let v = verify_ok(&obj, &published.name);
            let mut expected = v.verified_insns.clone();
            for s in &v.substitutions {
                let i = &mut expected[s.insn_index];
                assert_eq!(i32::from_le_bytes([i[4], i[5], i[6], i[7]]), s.replacement);
                i[4..8].copy_from_slice(&s.original.to_le_bytes());
                substituted += 1;
            }
            assert_eq!(
                published.insn_bytes(),
                expected.concat(),
                "{object}/{}: the published bytes differ from the verified ones",
                published.name
            );
        }
        if object == "mixed_sections" {
            assert!(substituted > 0, "the override program was published");
        }
        loaded.unload().expect("unload");
    }
}
