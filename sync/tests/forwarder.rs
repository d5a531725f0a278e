//! The forwarder against real kernel mirrors, with userspace writers in other threads writing
//! the way BPF programs do (through looked-up pointers, update/delete helpers, plain stores).

use std::sync::Arc;
use std::time::Duration;

use bpftime_kernel_bridge::mirror::remove_object_pins;
use bpftime_runtime::maps::{remove_object, EntryValue, MapDef, MapType, ShmObject};
use bpftime_sync::{Forwarder, SyncOptions, SyncSelection};
use bpftime_testutils::require_kernel;

struct Cleanup(&'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = remove_object(self.0);
        let _ = remove_object_pins(self.0);
    }
}

fn def(name: &str, map_type: MapType, key_size: u32, value_size: u32, max: u32) -> MapDef {
    MapDef::new(map_type, key_size, value_size, max, name)
}

/// Kernel mirror contents as (key, value) with per-CPU values summed as u64.
fn kernel_state(forwarder: &Forwarder, index: usize) -> Vec<(Vec<u8>, u64)> {
    let names = forwarder.map_names();
    let mirror = bpftime_kernel_bridge::Mirror::open_pinned(
        &bpftime_kernel_bridge::mirror::pin_path(forwarder.object(), names[index]),
        forwarder.object(),
    )
    .unwrap();
    let mut out: Vec<_> = mirror
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| {
            let sum = e
                .values
                .iter()
                .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()))
                .sum();
            (e.key, sum)
        })
        .collect();
    out.sort();
    out
}

fn user_state(shm: &ShmObject, name: &str) -> Vec<(Vec<u8>, u64)> {
    let mut out: Vec<_> = shm
        .map(name)
        .unwrap()
        .iter()
        .into_iter()
        .map(|e| {
            let sum = match &e.value {
                EntryValue::Single(v) => u64::from_le_bytes(v[..8].try_into().unwrap()),
                EntryValue::PerCpu(_) => e.value.sum_u64().unwrap(),
            };
            (e.key, sum)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn pointer_writes_helper_updates_and_deletes_reach_the_kernel() {
    if !require_kernel("pointer_writes_helper_updates_and_deletes_reach_the_kernel") {
        return;
    }
    const OBJECT: &str = "test_sync_basic";
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let shm = Arc::new(
        ShmObject::create(
            OBJECT,
            &[
                def("counts", MapType::Hash, 4, 8, 1024),
                def("updated", MapType::Hash, 4, 8, 1024),
                def("percpu", MapType::PercpuArray, 4, 8, 16),
                def("events", MapType::Ringbuf, 0, 0, 4096),
            ],
        )
        .unwrap(),
    );
    let (mut forwarder, unmirrorable) = Forwarder::start(&shm, SyncOptions::default()).unwrap();
    assert_eq!(unmirrorable.len(), 1);
    assert_eq!(unmirrorable[0].name, "events");

    // 8 threads: counters through looked-up pointers (as __sync_fetch_and_add does), a second
    // map through the update helper, a per-CPU array, and deletes.
    let writers: Vec<_> = (0..8u32)
        .map(|t| {
            let shm = Arc::clone(&shm);
            std::thread::spawn(move || {
                let counts = shm.map("counts").unwrap();
                let updated = shm.map("updated").unwrap();
                let percpu = shm.map("percpu").unwrap();
                for i in 0..20_000u32 {
                    let key = (i % 64).to_le_bytes();
                    if counts.lookup(&key).unwrap().is_none() {
                        let _ = counts.update(&key, &0u64.to_le_bytes(), 1);
                    }
                    let value = counts.lookup(&key).unwrap().unwrap();
                    value
                        .atomic_u64(0)
                        .unwrap()
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    updated
                        .update(
                            &(t * 100 + i % 10).to_le_bytes(),
                            &u64::from(i).to_le_bytes(),
                            0,
                        )
                        .unwrap();
                    let slot = percpu.lookup(&(i % 16).to_le_bytes()).unwrap().unwrap();
                    slot.atomic_u64(0)
                        .unwrap()
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i == 19_999 && t % 2 == 0 {
                        updated.delete(&(t * 100).to_le_bytes()).unwrap();
                    }
                }
            })
        })
        .collect();
    // Forward while the writers run, as `load` does.
    let mut passes = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        forwarder.pass().unwrap();
        passes += 1;
        std::thread::sleep(Duration::from_micros(50));
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        forwarder.run_until_idle(Duration::from_secs(30)).unwrap(),
        "forwarder went idle"
    );
    println!(
        "{passes} passes while writing; counters: {:?}",
        forwarder.counters()
    );

    for (index, name) in ["counts", "updated", "percpu"].iter().enumerate() {
        let user = user_state(&shm, name);
        let kernel = kernel_state(&forwarder, index);
        assert_eq!(user, kernel, "map {name}: kernel mirror equals userspace");
    }
    let total: u64 = user_state(&shm, "counts").iter().map(|(_, v)| v).sum();
    assert_eq!(total, 8 * 20_000);
    for (name, c) in forwarder.counters() {
        assert_eq!(c.sent, c.confirmed, "{name}: every record confirmed");
        assert_eq!((c.failed, c.pending), (0, 0), "{name}");
    }
}

#[test]
fn restarted_forwarder_resyncs_and_full_kernel_map_reports_failures() {
    if !require_kernel("restarted_forwarder_resyncs_and_full_kernel_map_reports_failures") {
        return;
    }
    const OBJECT: &str = "test_sync_restart";
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let shm = ShmObject::create(OBJECT, &[def("kv", MapType::Hash, 4, 8, 64)]).unwrap();
    let kv = shm.map("kv").unwrap();
    for k in 0..32u32 {
        kv.update(&k.to_le_bytes(), &u64::from(k * 3).to_le_bytes(), 0)
            .unwrap();
    }
    {
        let (mut forwarder, _) = Forwarder::start(&shm, SyncOptions::default()).unwrap();
        assert!(forwarder.run_until_idle(Duration::from_secs(30)).unwrap());
        assert_eq!(kernel_state(&forwarder, 0).len(), 32);
    }
    // While no forwarder runs: deletes and new values. A restart must converge.
    for k in 0..16u32 {
        kv.delete(&k.to_le_bytes()).unwrap();
    }
    kv.update(&40u32.to_le_bytes(), &7u64.to_le_bytes(), 0)
        .unwrap();
    let (mut forwarder, _) = Forwarder::start(
        &shm,
        SyncOptions {
            selection: SyncSelection::Only(vec!["kv".into()]),
            ..SyncOptions::default()
        },
    )
    .unwrap();
    assert!(forwarder.run_until_idle(Duration::from_secs(30)).unwrap());
    assert_eq!(user_state(&shm, "kv"), kernel_state(&forwarder, 0));

    // A kernel-side writer fills the mirror: userspace inserts then fail with E2BIG, per key,
    // counted, and the rest keeps flowing.
    let mirror = bpftime_kernel_bridge::Mirror::open_pinned(
        &bpftime_kernel_bridge::mirror::pin_path(OBJECT, "kv"),
        OBJECT,
    )
    .unwrap();
    let filled = fill_kernel_map(&mirror);
    assert!(filled > 0);
    kv.update(&50u32.to_le_bytes(), &1u64.to_le_bytes(), 0)
        .unwrap();
    kv.update(&20u32.to_le_bytes(), &99u64.to_le_bytes(), 0)
        .unwrap();
    assert!(forwarder.run_until_idle(Duration::from_secs(30)).unwrap());
    let (_, counters) = &forwarder.counters()[0];
    assert_eq!(
        counters.failed, 1,
        "the new key 50 did not fit: {counters:?}"
    );
    assert_eq!(
        forwarder.last_failure("kv"),
        Some(&bpftime_sync::SyncFailure {
            key: Some(50u32.to_le_bytes().to_vec()),
            errno: libc::E2BIG,
        }),
        "the refusal names its key and the kernel's errno"
    );
    assert_eq!(counters.unsynced, 1, "key 50 stays unsynced: {counters:?}");
    let kernel = kernel_state(&forwarder, 0);
    assert!(
        kernel.contains(&(20u32.to_le_bytes().to_vec(), 99)),
        "existing keys still update"
    );
}

/// Fills the kernel mirror up to max_entries with keys userspace does not have.
fn fill_kernel_map(mirror: &bpftime_kernel_bridge::Mirror) -> usize {
    let bridge = bpftime_kernel_bridge::Bridge::new().unwrap();
    let id = bridge.create_map(mirror.desc().clone()).unwrap();
    let mut k = 1000u32;
    while mirror.key_count() < mirror.desc().max_entries as usize {
        bridge
            .send(&bpftime_kernel_bridge::Update::put(
                id,
                &k.to_le_bytes(),
                &[0; 8],
                0,
            ))
            .unwrap();
        bridge.flush(Duration::from_secs(10)).unwrap();
        k += 1;
    }
    (k - 1000) as usize
}

#[test]
fn sync_selection_names_unknown_and_unmirrorable_maps() {
    if !require_kernel("sync_selection_names_unknown_and_unmirrorable_maps") {
        return;
    }
    const OBJECT: &str = "test_sync_select";
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let shm = ShmObject::create(OBJECT, &[def("events", MapType::Ringbuf, 0, 0, 4096)]).unwrap();
    let only = |name: &str| SyncOptions {
        selection: SyncSelection::Only(vec![name.into()]),
        ..SyncOptions::default()
    };
    let err = Forwarder::start(&shm, only("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("is not a map"),
        "{err}"
    );
    let err = Forwarder::start(&shm, only("events"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("ringbuf") && err.contains("no kernel mirror"),
        "{err}"
    );
}

#[test]
fn every_mirrorable_map_type_reaches_the_kernel() {
    if !require_kernel("every_mirrorable_map_type_reaches_the_kernel") {
        return;
    }
    const OBJECT: &str = "test_sync_types";
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let maps = [
        def("array", MapType::Array, 4, 8, 64),
        def("lru", MapType::LruHash, 4, 8, 128),
        def("percpu_hash", MapType::PercpuHash, 4, 8, 128),
        def("queue", MapType::Queue, 0, 8, 64),
        def("stack", MapType::Stack, 0, 8, 64),
    ];
    let shm = Arc::new(ShmObject::create(OBJECT, &maps).unwrap());
    let (mut forwarder, unmirrorable) = Forwarder::start(&shm, SyncOptions::default()).unwrap();
    assert!(unmirrorable.is_empty(), "{unmirrorable:?}");
    let ncpu = shm.map("percpu_hash").unwrap().ncpu() as usize;
    // 4 threads: array slots through the update helper, 1,000 distinct keys each into a
    // 128-entry LRU (which evicts), whole per-CPU values; one thread pushes onto the queue and
    // the stack (their order is the test's to know).
    let writers: Vec<_> = (0..4u32)
        .map(|t| {
            let shm = Arc::clone(&shm);
            std::thread::spawn(move || {
                let array = shm.map("array").unwrap();
                let lru = shm.map("lru").unwrap();
                let percpu = shm.map("percpu_hash").unwrap();
                for i in 0..1000u32 {
                    array
                        .update(
                            &(i % 64).to_le_bytes(),
                            &u64::from(t * 10_000 + i).to_le_bytes(),
                            0,
                        )
                        .unwrap();
                    lru.update(
                        &(t * 1000 + i).to_le_bytes(),
                        &u64::from(i).to_le_bytes(),
                        0,
                    )
                    .unwrap();
                    let per_cpu: Vec<u8> = (0..ncpu as u64)
                        .flat_map(|c| (u64::from(i) + c).to_le_bytes())
                        .collect();
                    percpu
                        .update_percpu(&(t * 25 + i % 25).to_le_bytes(), &per_cpu, 0)
                        .unwrap();
                    if t == 0 && i < 50 {
                        shm.map("queue")
                            .unwrap()
                            .as_queue()
                            .unwrap()
                            .push(&u64::from(i).to_le_bytes(), 0)
                            .unwrap();
                        shm.map("stack")
                            .unwrap()
                            .as_queue()
                            .unwrap()
                            .push(&u64::from(100 + i).to_le_bytes(), 0)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    while writers.iter().any(|w| !w.is_finished()) {
        forwarder.pass().unwrap();
        std::thread::sleep(Duration::from_micros(50));
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(forwarder.run_until_idle(Duration::from_secs(30)).unwrap());
    let names = forwarder.map_names();
    let index = |name: &str| names.iter().position(|n| *n == name).unwrap();
    for name in ["array", "lru", "percpu_hash"] {
        let user = user_state(&shm, name);
        assert!(!user.is_empty(), "{name}");
        assert_eq!(user, kernel_state(&forwarder, index(name)), "map {name}");
    }
    assert_eq!(
        user_state(&shm, "lru").len(),
        128,
        "the LRU is full, the rest evicted"
    );
    assert_eq!(user_state(&shm, "array").len(), 64);
    // Every push reached the kernel's queue and stack: popped there in FIFO and LIFO order.
    let popped = |name: &str| -> Vec<u64> {
        bpftime_kernel_bridge::Mirror::open_pinned(
            &bpftime_kernel_bridge::mirror::pin_path(OBJECT, name),
            OBJECT,
        )
        .unwrap()
        .drain_queue()
        .unwrap()
        .into_iter()
        .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()))
        .collect()
    };
    assert_eq!(popped("queue"), (0..50).collect::<Vec<u64>>());
    assert_eq!(popped("stack"), (100..150).rev().collect::<Vec<u64>>());
    for (name, c) in forwarder.counters() {
        assert_eq!(c.sent, c.confirmed, "{name}: every record confirmed");
        assert_eq!((c.failed, c.pending), (0, 0), "{name}");
    }
}

#[test]
fn a_pointer_write_long_after_its_lookup_still_reaches_the_kernel() {
    if !require_kernel("a_pointer_write_long_after_its_lookup_still_reaches_the_kernel") {
        return;
    }
    const OBJECT: &str = "test_sync_late";
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let shm = Arc::new(ShmObject::create(OBJECT, &[def("late", MapType::Hash, 4, 8, 16)]).unwrap());
    let (mut forwarder, _) = Forwarder::start(&shm, SyncOptions::default()).unwrap();
    let map = shm.map("late").unwrap();
    map.update(&1u32.to_le_bytes(), &5u64.to_le_bytes(), 0)
        .unwrap();
    // A program looks the value up and keeps the pointer (a target preempted, or a value kept
    // across calls through a map-value pointer).
    let value = map.lookup(&1u32.to_le_bytes()).unwrap().unwrap();
    // Every recheck of that lookup (up to 1 s) and the quiet sweep pass with nothing to find.
    let quiet_until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < quiet_until {
        forwarder.pass().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        kernel_state(&forwarder, 0),
        vec![(1u32.to_le_bytes().to_vec(), 5)]
    );
    // Then the write through the old pointer: no mark, no lookup, no helper call.
    value
        .atomic_u64(0)
        .unwrap()
        .store(77, std::sync::atomic::Ordering::SeqCst);
    let written = std::time::Instant::now();
    while kernel_state(&forwarder, 0) != vec![(1u32.to_le_bytes().to_vec(), 77)] {
        assert!(
            written.elapsed() < Duration::from_secs(20),
            "a write through a pointer looked up long before never reached the kernel"
        );
        forwarder.pass().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("arrived {:?} after the write", written.elapsed());
    let (_, c) = &forwarder.counters()[0];
    assert_eq!(c.sweep_fixes, 1, "found by a sweep, and counted: {c:?}");
}

/// Deletes faster than the forwarder acknowledges them: more tombstones than the map's spare
/// pool holds are dropped (counted), the map asks for a full resync, and the forwarder's resync
/// converges the kernel mirror to exactly what userspace holds, deleted keys removed, after a
/// churn of 5 x 4,096 distinct keys through a 4,096-entry map.
#[test]
fn deletes_past_the_tombstone_pool_resync_the_mirror_exactly() {
    if !require_kernel("deletes_past_the_tombstone_pool_resync_the_mirror_exactly") {
        return;
    }
    const OBJECT: &str = "test_sync_tombstones";
    const N: u32 = 4096;
    let _cleanup = Cleanup(OBJECT);
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let shm = ShmObject::create(OBJECT, &[def("kv", MapType::Hash, 4, 8, N)]).unwrap();
    let kv = shm.map("kv").unwrap();
    let put = |k: u32| {
        kv.update(
            &k.to_le_bytes(),
            &u64::from(k).wrapping_mul(7).to_le_bytes(),
            0,
        )
        .unwrap()
    };
    for k in 0..N {
        put(k);
    }
    let (mut forwarder, _) = Forwarder::start(&shm, SyncOptions::default()).unwrap();
    assert!(forwarder.run_until_idle(Duration::from_secs(60)).unwrap());
    assert_eq!(kernel_state(&forwarder, 0).len(), N as usize);
    let resyncs_before = forwarder.counters()[0].1.resyncs;
    // The forwarder does not run while the keys churn: nothing acknowledges the tombstones.
    for round in 1..=5u32 {
        for k in (round - 1) * N..round * N {
            kv.delete(&k.to_le_bytes()).unwrap();
        }
        for k in round * N..(round + 1) * N {
            put(k);
        }
    }
    let dropped = kv.counters().tombstones_dropped;
    assert!(
        dropped > 0,
        "the churn overflowed the tombstone pool: {:?}",
        kv.counters()
    );
    assert!(forwarder.run_until_idle(Duration::from_secs(60)).unwrap());
    let (_, counters) = &forwarder.counters()[0];
    assert!(
        counters.resyncs > resyncs_before,
        "dropped tombstones ({dropped}) must trigger a resync: {counters:?}"
    );
    let user = user_state(&shm, "kv");
    assert_eq!(user.len(), N as usize);
    assert_eq!(
        kernel_state(&forwarder, 0),
        user,
        "the mirror holds exactly the last 4,096 keys"
    );
    assert_eq!(counters.failed, 0, "{counters:?}");
}
