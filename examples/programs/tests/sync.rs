//! The sync forwarder end to end: target processes run a userspace uprobe (through the agent) that
//! counts into a synced hash map through looked-up pointers and updates a second map through
//! the update helper; once the forwarder is idle the kernel mirrors equal the userspace maps.
//! Kills of real targets and of `bpftime-rs load` itself, with every survivor's keys checked
//! exactly, are `tests/cli_sync.rs`'s (`targets_and_the_loader_killed_at_random_moments_...`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bpftime_example_programs::{agent_library, object_path, victim_mt_path};
use bpftime_kernel_bridge::mirror::{pin_path, remove_object_pins};
use bpftime_kernel_bridge::Mirror;
use bpftime_runtime::loaded::unload_object;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::{EntryValue, ShmObject};
use bpftime_sync::{Forwarder, SyncOptions};
use bpftime_testutils::require_kernel;

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        unload_object(&self.0);
        let _ = remove_object_pins(&self.0);
    }
}

/// Starts a victim with the agent preloaded and hooks in place; it runs when `go` is called.
fn spawn_victim(segment: &str, threads: u32, calls: u64) -> Child {
    spawn_paced_victim(segment, threads, calls, 0)
}

/// [`spawn_victim`] whose threads sleep `pause_us` after every 1000 calls.
fn spawn_paced_victim(segment: &str, threads: u32, calls: u64, pause_us: u64) -> Child {
    // One config per victim: rewriting a shared one could let a starting agent read it empty.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let config = std::env::temp_dir().join(format!("bpftime-sync-{segment}-{n}.conf"));
    std::fs::write(&config, format!("object {segment}\n")).unwrap();
    Command::new(victim_mt_path())
        .args([threads.to_string(), calls.to_string(), pause_us.to_string()])
        .env("LD_PRELOAD", agent_library())
        .env("BPFTIME_AGENT_CONFIG", &config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting victim_mt")
}

fn go(child: &mut Child) {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

fn user_entries(shm: &ShmObject, map: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    shm.map(map)
        .unwrap()
        .iter()
        .into_iter()
        .map(|e| match e.value {
            EntryValue::Single(v) => (e.key, v),
            EntryValue::PerCpu(_) => panic!("no per-CPU maps here"),
        })
        .collect()
}

fn kernel_entries(segment: &str, map: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    Mirror::open_pinned(&pin_path(segment, map), segment)
        .unwrap()
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.values[0].clone()))
        .collect()
}

fn sum(entries: &BTreeMap<Vec<u8>, Vec<u8>>) -> u64 {
    entries
        .values()
        .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()))
        .sum()
}

/// Runs the forwarder on a thread until `stop`, then until idle.
fn forward(forwarder: Forwarder, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Forwarder> {
    std::thread::spawn(move || {
        let mut forwarder = forwarder;
        forwarder.run(&stop).expect("forwarding");
        forwarder
    })
}

fn assert_mirrors_equal(segment: &str, shm: &ShmObject, forwarder: &mut Forwarder) {
    assert!(
        forwarder.run_until_idle(Duration::from_secs(60)).unwrap(),
        "forwarder idle"
    );
    for map in ["hits", "per_thread"] {
        let user = user_entries(shm, map);
        let kernel = kernel_entries(segment, map);
        assert_eq!(
            user, kernel,
            "map {map}: kernel mirror equals userspace, entry by entry"
        );
    }
}

/// What `bpftime-rs load` does: `sync_counter.bpf.o` into a fresh segment, and its forwarder
/// running on a thread until the returned flag is set.
fn load_and_forward(
    segment: &str,
) -> (
    Cleanup,
    LoadedObject,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Forwarder>,
) {
    let cleanup = Cleanup(segment.to_string());
    unload_object(segment);
    let _ = remove_object_pins(segment);
    let loaded = LoadedObject::load(
        &object_path("sync_counter"),
        Some(segment),
        LoadOptions::default(),
    )
    .expect("loading sync_counter");
    assert!(loaded.refused.is_empty(), "{:?}", loaded.refused);
    let (forwarder, _) = Forwarder::start(&loaded.shm, SyncOptions::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let forwarding = forward(forwarder, Arc::clone(&stop));
    (cleanup, loaded, stop, forwarding)
}

#[test]
fn four_targets_eight_threads_one_million_calls_reach_the_kernel() {
    if !require_kernel("four_targets_eight_threads_one_million_calls_reach_the_kernel") {
        return;
    }
    let segment = "test-sync-mt".to_string();
    let (_cleanup, loaded, stop, forwarding) = load_and_forward(&segment);

    // 4 processes x 8 threads x 31,250 calls = 1,000,000 calls.
    let mut victims: Vec<Child> = (0..4).map(|_| spawn_victim(&segment, 8, 31_250)).collect();
    for v in &mut victims {
        go(v);
    }
    for v in victims {
        let out = v.wait_with_output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("done"));
    }
    stop.store(true, Ordering::Relaxed);
    let mut forwarder = forwarding.join().unwrap();
    assert_mirrors_equal(&segment, &loaded.shm, &mut forwarder);

    let hits = user_entries(&loaded.shm, "hits");
    assert_eq!(sum(&hits), 1_000_000, "every call counted exactly once");
    assert_eq!(hits.len(), 64);
    assert_eq!(
        user_entries(&loaded.shm, "per_thread").len(),
        32,
        "4 processes x 8 threads"
    );
    read_with_a_users_kernel_program(&segment, &hits);
    for (name, c) in forwarder.counters() {
        println!(
            "{name}: changes seen {}, sent {}, confirmed {}, failed {}, pending {}",
            c.changes_seen, c.sent, c.confirmed, c.failed, c.pending
        );
        assert_eq!(c.sent, c.confirmed, "{name}: sent == confirmed");
        assert_eq!((c.failed, c.pending), (0, 0), "{name}");
    }
}

/// The mirror follows while targets run, not only once they are done: two reads of the kernel
/// map, both while the victim is still calling, see the count grow; at the end it is exact.
#[test]
fn the_kernel_mirror_follows_while_targets_run() {
    if !require_kernel("the_kernel_mirror_follows_while_targets_run") {
        return;
    }
    let segment = "test-sync-live".to_string();
    let (_cleanup, loaded, stop, forwarding) = load_and_forward(&segment);
    // 2 threads x 40,000 calls, 20 ms pause per 1,000: about 0.8 s of calls.
    let mut victim = spawn_paced_victim(&segment, 2, 40_000, 20_000);
    go(&mut victim);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let kernel_sum = || sum(&kernel_entries(&segment, "hits"));
    while kernel_sum() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing reached the kernel"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let first = kernel_sum();
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the victim ended before the first read"
    );
    // One write while the targets run reaches the kernel within a bound (the sync bench's
    // unloaded p99 is about 120 µs; 100 ms leaves room for a loaded CI machine, and a
    // forwarder starved behind the targets fails it). Value 0: the sums below stay the calls'.
    let sentinel = 1_000_000u32.to_le_bytes();
    let written = std::time::Instant::now();
    loaded
        .shm
        .map("hits")
        .unwrap()
        .update(&sentinel, &0u64.to_le_bytes(), 0)
        .unwrap();
    while !kernel_entries(&segment, "hits").contains_key(sentinel.as_slice()) {
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the sentinel never reached the kernel"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let lag = written.elapsed();
    assert!(
        lag < Duration::from_millis(100),
        "a write made while the targets run reached the kernel after {lag:?}"
    );
    std::thread::sleep(Duration::from_millis(150));
    let second = kernel_sum();
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the victim ended before the second read"
    );
    assert!(
        second > first,
        "the mirror did not move while the victim ran: {first} then {second}"
    );
    assert!(second < 80_000, "the victim had not finished: {second}");
    let out = victim.wait_with_output().unwrap();
    assert!(out.status.success());
    stop.store(true, Ordering::Relaxed);
    let mut forwarder = forwarding.join().unwrap();
    assert_mirrors_equal(&segment, &loaded.shm, &mut forwarder);
    assert_eq!(sum(&user_entries(&loaded.shm, "hits")), 80_000);
    println!("kernel mirror while running: {first}, then {second} of 80000; sentinel lag {lag:?}");
}

/// `kernel_reader.bpf.c`, opened by libbpf with `pin_root_path` at the object's pin directory,
/// reuses the synced `hits` mirror by name and reads what the userspace uprobe counted.
fn read_with_a_users_kernel_program(segment: &str, hits: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let pin_root = pin_path(segment, "hits").parent().unwrap().to_path_buf();
    let mut builder = libbpf_rs::ObjectBuilder::default();
    builder.pin_root_path(&pin_root).unwrap();
    let object = builder
        .open_file(object_path("kernel_reader"))
        .and_then(|o| o.load())
        .expect("loading kernel_reader with pin_root_path");
    let program = object.progs_mut().find(|p| p.name() == "read_hit").unwrap();
    for (key, value) in hits {
        let mut args = [0u8; 16];
        args[..4].copy_from_slice(key);
        program
            .test_run(libbpf_rs::ProgramInput {
                context_in: Some(&mut args),
                ..Default::default()
            })
            .expect("running read_hit");
        assert_eq!(
            u32::from_le_bytes(args[4..8].try_into().unwrap()),
            1,
            "key {key:?} found"
        );
        assert_eq!(
            &args[8..16],
            &value[..],
            "the kernel program reads the synced value"
        );
    }
    println!(
        "a kernel program reading {} pinned by name saw every synced count",
        pin_root.display()
    );
}
