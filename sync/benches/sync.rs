//! Sync benchmark, in one run: end-to-end lag (a write to a shared-memory map -> the value in the
//! kernel mirror, one write at a time: unloaded) p50/p99, through the update path and through a
//! looked-up value pointer, what change tracking costs a lookup
//! while the forwarder runs, and the
//! time until the last of 1,000,000 distinct keys written in user space is in the kernel mirror
//! against the same updates made with one BPF_MAP_UPDATE_ELEM each (rounds interleaved, best
//! of each kept: the 2 shared vCPUs drift between rounds).
//!
//! `cargo bench -p bpftime-sync --bench sync` (as root); `BENCH_KEYS` / `BENCH_ROUNDS` change the
//! key count (default 1,000,000) and rounds (default 3).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpftime_kernel_bridge::mirror::{pin_path, remove_object_pins};
use bpftime_runtime::maps::{remove_object, MapDef, MapType, ShmObject};
use bpftime_sync::{Forwarder, SyncOptions};
use bpftime_testutils::require_kernel;
use libbpf_rs::{MapCore, MapFlags, MapHandle};

const OBJECT: &str = "bench_sync";
const BULK_OBJECT: &str = "bench_sync_keys";
const BULK_MAX: u32 = 1 << 20;

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The baseline: `keys` distinct u32 -> u64 updates into a fresh kernel HASH of the mirror's
/// shape, one BPF_MAP_UPDATE_ELEM syscall each.
fn keys_by_syscall(keys: u32) -> Duration {
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let map = MapHandle::create(
        libbpf_rs::MapType::Hash,
        Some("bench_base"),
        4,
        8,
        BULK_MAX,
        &opts,
    )
    .expect("baseline map");
    let started = Instant::now();
    for k in 0..keys {
        map.update(&k.to_le_bytes(), &value_of(k), MapFlags::ANY)
            .expect("baseline update");
    }
    let took = started.elapsed();
    assert_eq!(map.keys().count() as u32, keys, "baseline map incomplete");
    took
}

fn value_of(key: u32) -> [u8; 8] {
    (u64::from(key) * 3 + 1).to_le_bytes()
}

/// The same `keys` updates made in a fresh shared-memory HASH through the update path
/// `bpf_map_update_elem` takes, by one writer thread, while a forwarder syncs the object; the
/// clock runs from the first write until the forwarder reports every key confirmed with nothing
/// pending, failed or unsynced. The kernel mirror is then read back key by key: a missing or
/// wrong key fails the benchmark.
fn keys_through_sync(keys: u32) -> Duration {
    let _ = remove_object(BULK_OBJECT);
    let _ = remove_object_pins(BULK_OBJECT);
    let shm = ShmObject::create(
        BULK_OBJECT,
        &[MapDef::new(MapType::Hash, 4, 8, BULK_MAX, "keys")],
    )
    .expect("shared maps");
    let (forwarder, _) = Forwarder::start(&shm, SyncOptions::default()).expect("forwarder");
    let stop = Arc::new(AtomicBool::new(false));
    let forwarding = {
        let stop = Arc::clone(&stop);
        let mut forwarder = forwarder;
        std::thread::spawn(move || forwarder.run(&stop).expect("forwarding"))
    };
    let map = shm.map("keys").unwrap();
    let started = Instant::now();
    let writer = {
        let map = map.clone();
        std::thread::spawn(move || {
            for k in 0..keys {
                map.update(&k.to_le_bytes(), &value_of(k), 0)
                    .expect("shared-memory update");
            }
        })
    };
    writer.join().expect("writer");
    let took = loop {
        let report = map.sync_report().unwrap_or_default();
        assert_eq!(report.failed, 0, "the kernel refused updates: {report:?}");
        if report.confirmed >= u64::from(keys) && report.pending == 0 && report.unsynced == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "sync did not finish: {report:?}"
        );
        std::thread::sleep(Duration::from_micros(500));
    };
    stop.store(true, Ordering::Relaxed);
    forwarding.join().expect("forwarder thread");
    let kernel = MapHandle::from_pinned_path(pin_path(BULK_OBJECT, "keys")).expect("mirror");
    for k in 0..keys {
        let got = kernel
            .lookup(&k.to_le_bytes(), MapFlags::ANY)
            .expect("lookup");
        assert_eq!(
            got.as_deref(),
            Some(&value_of(k)[..]),
            "key {k} in the mirror"
        );
    }
    assert_eq!(
        kernel.keys().count() as u32,
        keys,
        "extra keys in the mirror"
    );
    drop(kernel);
    let _ = shm.remove();
    let _ = remove_object_pins(BULK_OBJECT);
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !require_kernel("sync benchmark") {
        return;
    }
    let _ = remove_object(OBJECT);
    let _ = remove_object_pins(OBJECT);
    let shm = ShmObject::create(
        OBJECT,
        &["lag", "bulk"].map(|name| MapDef::new(MapType::Hash, 4, 8, 1 << 20, name)),
    )
    .expect("shared maps");
    let (forwarder, _) = Forwarder::start(&shm, SyncOptions::default()).expect("forwarder");
    let stop = Arc::new(AtomicBool::new(false));
    let forwarding = {
        let stop = Arc::clone(&stop);
        let mut forwarder = forwarder;
        std::thread::spawn(move || {
            forwarder.run(&stop).expect("forwarding");
            forwarder
        })
    };

    // Lag: write a fresh value, poll the kernel mirror until it shows it. The poll sleeps 20 µs
    // between lookups (the forwarder's own poll interval: the figures are within that of the
    // truth), with this thread's timer slack cut to 1 ns as the forwarder cuts its own: a
    // measurer spinning on lookups competes with the forwarder and the drain for the 2 vCPUs
    // and put milliseconds into the p99 (10-18 ms in earlier runs, 0.1-2.7 ms in four of this
    // session's, against 120-190 µs in four runs with the sleeps).
    // SAFETY: prctl with an integer argument changes only this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let lag_map = shm.map("lag").unwrap();
    let kernel = MapHandle::from_pinned_path(pin_path(OBJECT, "lag")).expect("mirror");
    let mut lags = Vec::new();
    for n in 1..=2000u64 {
        let key = ((n % 64) as u32).to_le_bytes();
        let written = Instant::now();
        lag_map.update(&key, &n.to_le_bytes(), 0).unwrap();
        loop {
            if let Ok(Some(v)) = kernel.lookup(&key, MapFlags::ANY) {
                if v == n.to_le_bytes() {
                    break;
                }
            }
            if written.elapsed() > Duration::from_secs(5) {
                panic!("value {n} never reached the kernel");
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        lags.push(written.elapsed());
        std::thread::sleep(Duration::from_micros(100));
    }
    lags.sort();

    // The same through a value pointer, as programs mostly write: a lookup (which marks the
    // entry) hands out the pointer and the value is stored through it afterwards, so the
    // forwarder learns of the write only by reading the entry again after the mark.
    for key in 64..128u32 {
        lag_map
            .update(&key.to_le_bytes(), &0u64.to_le_bytes(), 0)
            .unwrap();
    }
    let mut pointer_lags = Vec::new();
    for n in 1..=2000u64 {
        let key = (64 + (n % 64) as u32).to_le_bytes();
        let written = Instant::now();
        let value = lag_map.lookup(&key).unwrap().expect("populated key");
        value.write(&n.to_le_bytes());
        loop {
            if let Ok(Some(v)) = kernel.lookup(&key, MapFlags::ANY) {
                if v == n.to_le_bytes() {
                    break;
                }
            }
            if written.elapsed() > Duration::from_secs(5) {
                panic!("pointer write {n} never reached the kernel");
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        pointer_lags.push(written.elapsed());
        std::thread::sleep(Duration::from_micros(100));
    }
    pointer_lags.sort();

    // Tracking cost while the forwarder runs (it clears the marks these lookups set, so many
    // lookups find their mark cleared and publish it again): lookups spread over 4096 populated
    // keys that mark the entry, against the same lookups without marking.
    let tracked = shm.map("bulk").unwrap();
    for k in 0..4096u32 {
        tracked
            .update(&k.to_le_bytes(), &1u64.to_le_bytes(), 0)
            .unwrap();
    }
    let time = |marked: bool| {
        let runs = 4096 * 1000u32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for i in 0..runs {
                let key = (i.wrapping_mul(2_654_435_761) % 4096).to_le_bytes();
                let v = if marked {
                    tracked.lookup(black_box(&key)).unwrap()
                } else {
                    tracked.lookup_unmarked(black_box(&key), 0).unwrap()
                };
                black_box(v);
            }
            best = best.min(t.elapsed().as_nanos() as f64 / f64::from(runs));
        }
        best
    };
    let (off, on) = (time(false), time(true));
    stop.store(true, Ordering::Relaxed);
    drop(forwarding.join().expect("forwarder thread"));
    let _ = shm.remove();
    let _ = remove_object_pins(OBJECT);

    // Many distinct keys: rounds interleaved, the best of each kept.
    let keys = env_u32("BENCH_KEYS", 1_000_000).min(BULK_MAX);
    let rounds = env_u32("BENCH_ROUNDS", 3).max(1);
    let (mut by_syscall, mut by_sync) = (Duration::MAX, Duration::MAX);
    for round in 1..=rounds {
        let base = keys_by_syscall(keys);
        let sync = keys_through_sync(keys);
        eprintln!("round {round}: one syscall per update {base:.2?}, through sync {sync:.2?}");
        by_syscall = by_syscall.min(base);
        by_sync = by_sync.min(sync);
    }

    println!("\n| sync measure | value |");
    println!("|---|---:|");
    println!(
        "| lag write -> kernel mirror, p50 | {:.1?} |",
        percentile(&lags, 0.5)
    );
    println!(
        "| lag write -> kernel mirror, p99 | {:.1?} |",
        percentile(&lags, 0.99)
    );
    println!(
        "| lag lookup + write through the pointer -> kernel mirror, p50 | {:.1?} |",
        percentile(&pointer_lags, 0.5)
    );
    println!(
        "| lag lookup + write through the pointer -> kernel mirror, p99 | {:.1?} |",
        percentile(&pointer_lags, 0.99)
    );
    println!("| hash lookup over 4096 keys, marking, forwarder running | {on:.1} ns |");
    println!("| the same lookups without marking | {off:.1} ns |");
    println!("| change tracking cost per lookup | {:.1} ns |", on - off);
    println!(
        "| {keys} distinct keys, first write -> last key confirmed in the kernel mirror (best of {rounds}) | {by_sync:.2?} ({:.2} M keys/s) |",
        f64::from(keys) / by_sync.as_secs_f64() / 1e6
    );
    println!(
        "| the same {keys} updates, one BPF_MAP_UPDATE_ELEM each (best of {rounds}) | {by_syscall:.2?} ({:.2} M keys/s) |",
        f64::from(keys) / by_syscall.as_secs_f64() / 1e6
    );
    println!(
        "| sync vs one syscall per update | {:.2}x |",
        by_syscall.as_secs_f64() / by_sync.as_secs_f64()
    );
}
