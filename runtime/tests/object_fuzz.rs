//! Fuzz-style robustness: mutated real objects and random bytes through the loader produce
//! `Ok` or a typed error, never a panic. Fixed seed, so CI is reproducible.

use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::object::{BpfObject, ObjectError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OBJECTS: &[&str] = &[
    "uprobe_counter",
    "globals",
    "calls",
    "legacy_maps",
    "mixed_sections",
    "extern_ksym",
    "tracing",
];

fn object_bytes() -> Vec<Vec<u8>> {
    OBJECTS
        .iter()
        .map(|n| std::fs::read(format!("{}/{n}.bpf.o", env!("BPFTIME_TEST_BPF_DIR"))).unwrap())
        .collect()
}

#[test]
fn mutated_objects_never_panic() {
    let objects = object_bytes();
    let mut rng = StdRng::seed_from_u64(0x5eed_b9f0);
    let (mut errors, mut insn_errors, mut accepted, mut ran) = (0, 0, 0, 0);
    for round in 0..2000 {
        let mut bytes = objects[round % objects.len()].clone();
        let flips = rng.random_range(1..=8);
        for _ in 0..flips {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..4) {
                0 => bytes[at] = rng.random(),
                1 => bytes[at] ^= 1 << rng.random_range(0..8),
                2 => bytes[at] = [0, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
                _ => {
                    // Overwrite a 4-byte field with an extreme value.
                    let v: u32 = [0, u32::MAX, 0x8000_0000, rng.random()][rng.random_range(0..4)];
                    let end = (at + 4).min(bytes.len());
                    bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
            }
        }
        if rng.random_range(0..10) == 0 {
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
        }
        match BpfObject::parse("mutant.o", &bytes) {
            Err(e) => {
                errors += 1;
                let text = e.to_string();
                assert!(text.starts_with("mutant.o"), "{e}");
                // Errors name the section and, for an instruction, its index (README).
                match &e {
                    ObjectError::Section { section, .. } => {
                        assert!(text.contains(&format!("section {section}")), "{text}")
                    }
                    ObjectError::Insn { section, insn, .. } => {
                        assert!(text.contains(&format!("section {section}")), "{text}");
                        assert!(text.contains(&format!("instruction {insn}")), "{text}");
                        insn_errors += 1;
                    }
                    _ => {}
                }
            }
            // Every 10th mutant the parser accepts goes on through the loader (maps in shared
            // memory, relocation, the interpreter without the verifier) and runs once.
            Ok(_) if accepted % 10 == 0 => {
                accepted += 1;
                ran += run_mutant(&bytes, round);
            }
            Ok(_) => accepted += 1,
        }
    }
    // Sanity: the mutations do hit the parser's error paths, and some get through.
    assert!(errors > 100, "only {errors} of 2000 mutants were rejected");
    assert!(insn_errors > 0, "no instruction-level error was produced");
    assert!(
        accepted > 100 && ran > 0,
        "{accepted} accepted, {ran} programs run"
    );
}

/// Loads a mutant the parser accepted (no verifier, interpreter) and runs each program once
/// on a zeroed context with an instruction budget: a typed error or a result, never a panic.
/// Returns how many programs ran.
fn run_mutant(bytes: &[u8], round: usize) -> usize {
    let path = std::env::temp_dir().join(format!("bpftime-fuzz-{}-{round}.o", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let segment = format!("fuzz-{}-{round}", std::process::id());
    bpftime_runtime::loaded::unload_object(&segment);
    let loaded = LoadedObject::load(
        &path,
        Some(&segment),
        LoadOptions {
            verify: false,
            no_jit: true,
            publish: false,
            ..LoadOptions::default()
        },
    );
    let _ = std::fs::remove_file(&path);
    let Ok(loaded) = loaded else {
        return 0;
    };
    let mut ran = 0;
    if let Ok(mut helpers) = loaded.helpers() {
        for p in &loaded.programs {
            let mut ctx = vec![0u8; p.context_size().max(64)];
            // A budget: without the verifier a mutated jump may loop forever.
            let budget = bpftime_runtime::vm::InterpOptions {
                insn_budget: Some(100_000),
            };
            let _ = helpers.run_interpreter(&p.program, &mut ctx, budget);
            ran += 1;
        }
    }
    let _ = loaded.unload();
    ran
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(42);
    let header = &object_bytes()[0][..64];
    for round in 0..2000 {
        let len = rng.random_range(0..4096);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if round % 2 == 0 && bytes.len() >= 64 {
            // A valid ELF header in front of random sections.
            bytes[..64].copy_from_slice(header);
        }
        let _ = BpfObject::parse("random.o", &bytes);
    }
}
