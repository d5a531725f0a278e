//! Loader rules that used to refuse working programs: a map user space cannot hold refuses
//! only the programs that use it, and code the kernel verifier proved unreachable (behind a
//! frozen `.rodata` switch) does not keep a program from running even if it names such a map
//! and a helper user space lacks.

use bpftime_example_programs::{object_path, pt_regs};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::EntryValue;
use bpftime_testutils::{error_chain, require_kernel};

#[test]
fn an_unsupported_map_refuses_only_its_programs_and_dead_code_is_dropped() {
    if !require_kernel("an_unsupported_map_refuses_only_its_programs_and_dead_code_is_dropped") {
        return;
    }
    let segment = "test-partial-maps";
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(
        &object_path("partial_maps"),
        Some(segment),
        LoadOptions {
            verify: true,
            publish: false,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("the object loads: {}", error_chain(&e)));
    {
        let names: Vec<&str> = loaded.programs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["count_calls"], "refused: {:?}", loaded.refused);
        let unsupported: Vec<&str> = loaded
            .unsupported_maps
            .iter()
            .map(|m| m.map.as_str())
            .collect();
        assert_eq!(unsupported, ["ports"]);
        let (name, why) = &loaded.refused[0];
        let why = error_chain(why.as_ref());
        assert_eq!(name, "read_ports");
        assert!(
            why.contains("`ports`") && why.contains("devmap"),
            "the refusal names the map and its type: {why}"
        );
        let program = &loaded.programs[0];
        let mut helpers = loaded.helpers().expect("helpers");
        for _ in 0..3 {
            let mut ctx = pt_regs(1, 2);
            ctx.resize(program.context_size(), 0);
            program
                .run(&mut helpers, &mut ctx)
                .expect("count_calls runs");
        }
        let calls = loaded
            .shm
            .map("calls")
            .expect("calls")
            .get(&0u32.to_le_bytes());
        assert_eq!(
            calls.expect("lookup"),
            Some(EntryValue::Single(3u64.to_le_bytes().to_vec())),
            "count_calls ran three times"
        );
    }
    let _ = loaded.unload();
}
