//! The same prog.o on the same calls: kernel uprobes (aya, on the real victim) against the
//! userspace runtime (each program run on the pt_regs of every call the victim makes), on our
//! JIT, our interpreter and, where it can run the program, rbpf. Maps are compared entry by
//! entry (per-CPU maps by their sum), ringbuf streams record by record.

mod common;

use std::collections::BTreeMap;

use bpftime_example_programs::{
    model, object_path, pt_regs, run_kernel, victim_calls, victim_words, Snapshot, EXAMPLES,
};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject, VmChoice};
use bpftime_testutils::error_chain;
use bpftime_testutils::require_kernel;

const ROUNDS: u32 = 2000;

fn function_of(attach_target: &str) -> &str {
    attach_target.rsplit(':').next().unwrap_or_default()
}

/// How the userspace side sees the victim's calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drive {
    /// Run each program on the pt_regs of every call the victim makes.
    Contexts,
    /// Run the real victim with the agent preloaded: inline hooks, the real path.
    Agent,
}

fn run_userspace(
    example: &str,
    options: LoadOptions,
    tag: &str,
    drive: Drive,
) -> Result<Snapshot, String> {
    let segment = format!("test-{tag}-{example}");
    bpftime_runtime::loaded::unload_object(&segment);
    let loaded = LoadedObject::load(&object_path(example), Some(&segment), options)
        .map_err(|e| error_chain(&e))?;
    let result = (|| {
        if let Some((name, why)) = loaded.refused.first() {
            return Err(format!("{name}: {}", error_chain(why.as_ref())));
        }
        if drive == Drive::Agent {
            common::run_agent_victim(&bpftime_example_programs::victim_path(), ROUNDS, &segment)?;
        } else {
            let words = victim_words();
            let mut helpers = loaded.helpers().map_err(|e| e.to_string())?;
            for (function, rdi, rsi) in victim_calls(ROUNDS, &words) {
                for program in &loaded.programs {
                    if function_of(&program.attach_target) != function {
                        continue;
                    }
                    let mut ctx = pt_regs(rdi, rsi);
                    ctx.resize(program.context_size(), 0);
                    program
                        .run(&mut helpers, &mut ctx)
                        .map_err(|e| format!("{}: {}", program.name, error_chain(&e)))?;
                }
            }
        }
        common::snapshot_of(&loaded.shm)
    })();
    let _ = loaded.unload();
    result
}

#[test]
fn every_example_matches_the_kernel_on_every_vm() {
    if !require_kernel("every_example_matches_the_kernel_on_every_vm") {
        return;
    }
    let mut rbpf_refusals = BTreeMap::new();
    for example in EXAMPLES {
        let kernel = run_kernel(example, ROUNDS).unwrap_or_else(|e| panic!("{example}: {e:#}"));
        for (map, expected) in model::expected(example, ROUNDS) {
            assert_eq!(
                kernel.maps.get(&map),
                Some(&expected),
                "{example}: kernel map {map}"
            );
        }
        let vms = [
            ("jit", VmChoice::Ours, false, Drive::Contexts),
            ("interpreter", VmChoice::Ours, true, Drive::Contexts),
            ("rbpf", VmChoice::Rbpf, false, Drive::Contexts),
            ("agent-jit", VmChoice::Ours, false, Drive::Agent),
            ("agent-interpreter", VmChoice::Ours, true, Drive::Agent),
        ];
        for (tag, vm, no_jit, drive) in vms {
            let options = LoadOptions {
                verify: true,
                vm,
                no_jit,
                ..LoadOptions::default()
            };
            match run_userspace(example, options, tag, drive) {
                Ok(user) => {
                    assert_eq!(
                        user.maps.keys().collect::<Vec<_>>(),
                        kernel.maps.keys().collect::<Vec<_>>(),
                        "{example} on {tag}: the same maps"
                    );
                    for (name, entries) in &kernel.maps {
                        assert_eq!(&user.maps[name], entries, "{example} on {tag}: map {name}");
                    }
                    println!("{example}: userspace ({tag}) == kernel");
                }
                Err(why) if vm == VmChoice::Rbpf => {
                    assert!(
                        why.contains("rbpf cannot run instruction"),
                        "{example}: {why}"
                    );
                    rbpf_refusals.insert(*example, why);
                }
                Err(why) => panic!("{example} on {tag}: {why}"),
            }
        }
    }
    for (example, why) in &rbpf_refusals {
        println!("{example}: rbpf refused: {why}");
    }
    // rbpf 0.4 runs percpu_array (and matched the kernel above); every other example uses an
    // instruction it rejects or gets wrong, and is refused naming it.
    let refused: Vec<&str> = rbpf_refusals.keys().copied().collect();
    let want: Vec<&str> = EXAMPLES
        .iter()
        .copied()
        .filter(|e| *e != "percpu_array")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(refused, want, "the examples rbpf refuses");
}
