//! `stack_ids.bpf.c` on victim_stacks: kernel uprobes against the agent in the real victim
//! (inline hooks, our JIT and our interpreter). Stack maps, ids, per-id counts, skipped
//! frames, raw `bpf_get_stack` records, kernel stacks of a user-space probe, collisions in a
//! too-small map and stacks taken under a pending return probe must all be the kernel's,
//! entry by entry: the victim is built without PIE, so the addresses (and the ids hashed from
//! them) are the same in both runs.

mod common;

use bpftime_example_programs::{object_path, run_kernel_with, victim_stacks_path, Snapshot};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_testutils::{error_chain, require_kernel};

const ROUNDS: u32 = 300;
const ATTACH: &[(&str, &str)] = &[
    ("leaf_stack", "vs_leaf"),
    ("mid_a_return", "vs_mid_a"),
    ("mid_a_entry", "vs_mid_a"),
];

fn run_userspace(no_jit: bool) -> Result<Snapshot, String> {
    let segment = format!("test-stacks-{}", if no_jit { "interp" } else { "jit" });
    bpftime_runtime::loaded::unload_object(&segment);
    let options = LoadOptions {
        verify: true,
        no_jit,
        ..LoadOptions::default()
    };
    let loaded = LoadedObject::load(&object_path("stack_ids"), Some(&segment), options)
        .map_err(|e| error_chain(&e))?;
    let result = (|| {
        if let Some((name, why)) = loaded.refused.first() {
            return Err(format!("{name}: {}", error_chain(why.as_ref())));
        }
        common::run_agent_victim(&victim_stacks_path(), ROUNDS, &segment)?;
        common::snapshot_of(&loaded.shm)
    })();
    let _ = loaded.unload();
    result
}

fn decode_results(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<(i64, i32, u64)> {
    entries
        .iter()
        .map(|(k, v)| {
            let k = i64::from_le_bytes(k[..8].try_into().unwrap());
            let v = u64::from_le_bytes(v[..8].try_into().unwrap());
            (k >> 32, k as i32, v)
        })
        .collect()
}

#[test]
fn stack_traces_match_kernel_uprobes() {
    if !require_kernel("stack_traces_match_kernel_uprobes") {
        return;
    }
    let kernel = run_kernel_with("stack_ids", &victim_stacks_path(), ROUNDS, ATTACH)
        .unwrap_or_else(|e| panic!("kernel: {e:#}"));
    // The kernel's answers pin down what the program sees; check the run is the one the
    // comparison needs before comparing.
    let stacks = &kernel.maps["stacks"];
    assert_eq!(
        stacks.len(),
        // vs_leaf sets up no frame, so its caller is missing from its stacks (the walk starts
        // at the caller's frame): vs_leaf alone (from vs_root), vs_leaf + vs_root (through
        // vs_mid_a from vs_root, or from vs_mid_b), vs_leaf + vs_mid_b + vs_root (through
        // vs_mid_a from vs_mid_b, whose return address the pending return probe replaced and
        // the walk puts back); at vs_mid_a's return: vs_root, and vs_mid_b + vs_root; at
        // vs_mid_a's entry (a push %rbp: the return address at the stack pointer counts):
        // vs_mid_a + vs_root, and vs_mid_a + vs_mid_b + vs_root.
        7,
        "distinct user stacks on the kernel: {stacks:x?}"
    );
    let results = decode_results(&kernel.maps["results"]);
    let errno_of =
        |tag: i64| -> Vec<i32> { results.iter().filter(|r| r.0 == tag).map(|r| r.1).collect() };
    assert_eq!(errno_of(2), [-libc::EFAULT], "kernel stack of a uprobe");
    assert_eq!(errno_of(5), [-libc::EFAULT], "skipping past the stack");
    assert_eq!(errno_of(6), [0], "bpf_get_stack of the kernel stack");
    assert!(
        errno_of(3).contains(&-libc::EEXIST),
        "a two-bucket map collides: {results:?}"
    );
    for (tag, no_jit) in [("jit", false), ("interpreter", true)] {
        let user = run_userspace(no_jit).unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(
            user.maps.keys().collect::<Vec<_>>(),
            kernel.maps.keys().collect::<Vec<_>>(),
            "{tag}: the same maps"
        );
        for (name, entries) in &kernel.maps {
            assert_eq!(&user.maps[name], entries, "{tag}: map {name}");
        }
        println!(
            "stack_ids: userspace ({tag}) == kernel ({} stacks)",
            stacks.len()
        );
    }
}
