//! Sync benchmark, in one run: end-to-end lag (a write to a shared-memory map -> the value in the
//! kernel mirror) p50/p99, sustained synced keys/s, and what change tracking costs a lookup.
//!
//! `cargo bench -p bpftime-sync --bench sync` (as root).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpftime_kernel_bridge::mirror::{pin_path, remove_object_pins};
use bpftime_kernel_bridge::testing::require_kernel;
use bpftime_runtime::maps::{remove_object, MapDef, MapType, ShmObject};
use bpftime_sync::{Forwarder, SyncOptions};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

const OBJECT: &str = "bench_sync";

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

    // Lag: write a fresh value, poll the kernel mirror until it shows it.
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
        }
        lags.push(written.elapsed());
        std::thread::sleep(Duration::from_micros(100));
    }
    lags.sort();

    // Sustained: a writer thread updates distinct keys for 2 s (2 cores: the writer, the
    // forwarder and the drain thread already share them).
    let bulk = shm.map("bulk").unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<_> = (0..1u32)
        .map(|t| {
            let bulk = bulk.clone();
            let writing = Arc::clone(&writing);
            std::thread::spawn(move || {
                let mut i = 0u32;
                while writing.load(Ordering::Relaxed) {
                    let key = (t << 19 | (i % (1 << 19))).to_le_bytes();
                    bulk.update(&key, &u64::from(i).to_le_bytes(), 0).unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    let counters_before = confirmed(&bulk);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let synced = confirmed(&bulk) - counters_before;
    let seconds = started.elapsed().as_secs_f64();
    writing.store(false, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    drop(forwarding.join().expect("forwarder thread"));

    // Tracking cost: a lookup that marks the entry against one that does not.
    let key = 7u32.to_le_bytes();
    lag_map.update(&key, &1u64.to_le_bytes(), 0).unwrap();
    let time = |marked: bool| {
        let runs = 5_000_000u32;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..runs {
                let v = if marked {
                    lag_map.lookup(black_box(&key)).unwrap()
                } else {
                    lag_map.lookup_unmarked(black_box(&key), 0).unwrap()
                };
                black_box(v);
            }
            best = best.min(t.elapsed().as_nanos() as f64 / f64::from(runs));
        }
        best
    };
    let (on, off) = (time(true), time(false));

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
        "| sustained synced keys/s (1 writer thread, distinct keys) | {:.0} |",
        synced as f64 / seconds
    );
    println!("| hash lookup, tracking on (marks the entry) | {on:.1} ns |");
    println!("| hash lookup, tracking off | {off:.1} ns |");
    println!("| tracking cost per lookup | {:.1} ns |", on - off);
    let _ = shm.remove();
    let _ = remove_object_pins(OBJECT);
}

fn confirmed(map: &bpftime_runtime::maps::MapHandle) -> u64 {
    map.sync_counters()[bpftime_runtime::maps::sync_slot::CONFIRMED].load(Ordering::Relaxed)
}
