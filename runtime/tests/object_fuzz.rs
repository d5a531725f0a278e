//! Fuzz-style robustness: mutated real objects and random bytes through the loader produce
//! `Ok` or a typed error, never a panic. Fixed seed, so CI is reproducible.

use bpftime_runtime::object::BpfObject;
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
    let mut errors = 0;
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
        if let Err(e) = BpfObject::parse("mutant.o", &bytes) {
            errors += 1;
            assert!(e.to_string().starts_with("mutant.o"), "{e}");
        }
    }
    // Sanity: the mutations do hit the parser's error paths.
    assert!(errors > 100, "only {errors} of 2000 mutants were rejected");
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
