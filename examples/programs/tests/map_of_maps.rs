//! Maps of maps beyond the kernel comparison of `userspace_vs_kernel` (which runs
//! `map_in_map.bpf.c` on every VM against libbpf's load of it): storing a map of another
//! shape is refused with the kernel's errno, a map stored from user space routes the
//! program's calls at once, and a slot a target rewrites through the shared segment to name a
//! map of another shape is no map to the program (a miss), never a pointer of the wrong shape.

use std::os::fd::{AsFd, AsRawFd};

use bpftime_example_programs::{object_path, pt_regs};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::{set_inner_map, EntryValue, MapHandle, BPF_ANY};
use bpftime_testutils::{error_chain, require_kernel};
use libbpf_rs::MapCore;

/// The errno the kernel answers when `outer[slot]` is set to `inner` (0: stored).
fn kernel_store(object: &libbpf_rs::Object, outer: &str, slot: u32, inner: &str) -> i32 {
    let map = |name: &str| {
        object
            .maps()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("kernel map {name}"))
    };
    let (outer, inner) = (map(outer), map(inner));
    let fd = inner.as_fd().as_raw_fd();
    match bpftime_abi::sys::map_update_elem(
        outer.as_fd(),
        &slot.to_le_bytes(),
        &fd.to_le_bytes(),
        0,
    ) {
        Ok(()) => 0,
        Err(e) => e.errno(),
    }
}

fn u64_at(map: &MapHandle, key: u32) -> u64 {
    match map.get(&key.to_le_bytes()).unwrap() {
        Some(EntryValue::Single(v)) => u64::from_le_bytes(v[..8].try_into().unwrap()),
        other => panic!("{}[{key}]: {other:?}", map.name()),
    }
}

#[test]
fn maps_of_another_shape_are_refused_and_never_reach_programs() {
    if !require_kernel("maps_of_another_shape_are_refused_and_never_reach_programs") {
        return;
    }
    // The kernel's answers, on libbpf's load of the same object.
    let kernel = libbpf_rs::ObjectBuilder::default()
        .open_file(object_path("map_in_map"))
        .unwrap()
        .load()
        .unwrap();
    let cases = [
        // (outer, slot, inner): a sums array (same shape), a 2-entry array, a hash.
        ("sums_by_slot", 2, "odd_sums"),
        ("sums_by_slot", 2, "misses"),
        ("sums_by_slot", 2, "low_counts"),
        ("counts_by_key", 2, "high_counts"),
        ("counts_by_key", 2, "even_sums"),
    ];
    let kernel_errnos: Vec<i32> = cases
        .iter()
        .map(|&(o, s, i)| kernel_store(&kernel, o, s, i))
        .collect();
    assert_eq!(
        kernel_errnos,
        [0, libc::EINVAL, libc::EINVAL, 0, libc::EINVAL],
        "the kernel's answers"
    );

    for no_jit in [false, true] {
        let segment = format!("test-map-of-maps-{no_jit}");
        bpftime_runtime::loaded::unload_object(&segment);
        let loaded = LoadedObject::load(
            &object_path("map_in_map"),
            Some(&segment),
            LoadOptions {
                verify: true,
                publish: false,
                no_jit,
                ..LoadOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("the object loads: {}", error_chain(&e)));
        let maps = loaded.shm.maps();
        let index = |name: &str| maps.iter().position(|m| m.name() == name).unwrap();
        let map = |name: &str| &maps[index(name)];
        let errnos: Vec<i32> = cases
            .iter()
            .map(|&(o, s, i)| {
                match set_inner_map(&maps, map(o), &s.to_le_bytes(), index(i), BPF_ANY) {
                    Ok(()) => 0,
                    Err(e) => e.errno(),
                }
            })
            .collect();
        assert_eq!(errnos, kernel_errnos, "user space answers as the kernel");

        let mut helpers = loaded.helpers().unwrap();
        let program = &loaded.programs[0];
        let mut call = |a: u64, b: u64| {
            let mut ctx = pt_regs(a, b);
            ctx.resize(program.context_size(), 0);
            program.run(&mut helpers, &mut ctx).unwrap();
        };
        // Slot 2 now holds odd_sums (stored above): a % 3 == 2 routes there.
        call(2, 3);
        assert_eq!(u64_at(map("odd_sums"), 3), 3, "slot 2 routes to odd_sums");
        assert_eq!(u64_at(map("misses"), 0), 0);
        // A target rewrites slot 0 through the segment to name the low_counts hash (the
        // fd-array store itself, without the shape check): programs see no map there.
        map("sums_by_slot")
            .update(
                &0u32.to_le_bytes(),
                &(index("low_counts") as u32).to_le_bytes(),
                BPF_ANY,
            )
            .unwrap();
        // And key 0 of the hash of maps names an array.
        map("counts_by_key")
            .update(
                &0u32.to_le_bytes(),
                &(index("even_sums") as u32).to_le_bytes(),
                BPF_ANY,
            )
            .unwrap();
        for b in 0..100 {
            call(3, b);
        }
        assert_eq!(u64_at(map("misses"), 0), 100, "slot 0 is a miss");
        assert_eq!(u64_at(map("misses"), 1), 100, "key 0 is a miss");
        assert!(
            (0..8).all(|i| u64_at(map("even_sums"), i) == 0),
            "nothing was written through the wrong-shape map"
        );
        assert!(map("low_counts").iter().is_empty());
        // Slot 1 and key 1 are untouched and still route.
        call(4, 5);
        assert_eq!(u64_at(map("odd_sums"), 5), 5);
        assert_eq!(
            map("high_counts").get(&4u32.to_le_bytes()).unwrap(),
            Some(EntryValue::Single(1u64.to_le_bytes().to_vec()))
        );
        let _ = loaded.unload();
    }
}
