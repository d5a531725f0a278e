//! Each example under real kernel uprobes matches the model of the victim's calls.

use bpftime_example_programs::{model, run_kernel, EXAMPLES};
use bpftime_testutils::require_kernel;

const ROUNDS: u32 = 2000;

#[test]
fn kernel_uprobes_match_the_model() {
    if !require_kernel("kernel_uprobes_match_the_model") {
        return;
    }
    for example in EXAMPLES {
        let snapshot = run_kernel(example, ROUNDS).unwrap_or_else(|e| panic!("{example}: {e:#}"));
        for (map, expected) in model::expected(example, ROUNDS) {
            let got = snapshot
                .maps
                .get(&map)
                .unwrap_or_else(|| panic!("{example}: no map {map} in {:?}", snapshot.maps.keys()));
            assert_eq!(got, &expected, "{example}: map {map}");
        }
        println!(
            "{example}: kernel matches the model ({} maps)",
            snapshot.maps.len()
        );
    }
}
