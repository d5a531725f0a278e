//! The agent is invisible to the target's probes: `malloc_count.bpf.c` counts the mallocs
//! victim_alloc makes in a window where it makes exactly N, on kernel uprobes and with the
//! agent preloaded. The agent's follower thread (which wakes every 50 ms and allocates while
//! reading manifests; `discover` keeps it running) and its start-up on the target's main
//! thread must not add a single call to the count.

mod common;

use bpftime_example_programs::{object_path, run_kernel_with, victim_alloc_path};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_testutils::{error_chain, require_kernel};

const BLOCKS: u32 = 400;
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

fn count(entries: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    u64::from_le_bytes(entries[0].1[..8].try_into().unwrap())
}

#[test]
fn agent_allocations_are_not_counted_by_malloc_probes() {
    if !require_kernel("agent_allocations_are_not_counted_by_malloc_probes") {
        return;
    }
    let malloc = format!("{LIBC}:malloc");
    let attach = [
        ("window_opens", "va_begin"),
        ("window_closes", "va_end"),
        ("count_malloc", malloc.as_str()),
    ];
    let kernel = run_kernel_with("malloc_count", &victim_alloc_path(), BLOCKS, &attach)
        .unwrap_or_else(|e| panic!("kernel: {e:#}"));
    assert_eq!(
        count(&kernel.maps["mallocs"]),
        u64::from(BLOCKS),
        "kernel uprobes count the victim's own mallocs"
    );

    let segment = "test-invisible-agent";
    bpftime_runtime::loaded::unload_object(segment);
    let loaded = LoadedObject::load(
        &object_path("malloc_count"),
        Some(segment),
        LoadOptions {
            verify: true,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let run = common::run_agent_victim_with_config(
        &victim_alloc_path(),
        BLOCKS,
        segment,
        &format!("object {segment}\ndiscover\n"),
    )
    .and_then(|_| common::snapshot_of(&loaded.shm));
    let _ = loaded.unload();
    let user = run.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        count(&user.maps["mallocs"]),
        u64::from(BLOCKS),
        "the agent's own allocations were counted as the target's"
    );
}
