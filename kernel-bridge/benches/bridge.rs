//! Bridge throughput and latency against the kernel's own map-update syscalls, in one run, on the
//! same map shape: a fresh preallocated HASH of 1M u32 -> u64 entries per row, 1M distinct keys.
//!
//! `cargo bench -p bpftime-kernel-bridge --bench bridge [-- --keys N]` (as root).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpftime_kernel_bridge::{Bridge, BridgeConfig, Confirmation, MapType, MirrorDesc, Update};
use bpftime_testutils::require_kernel;
use libbpf_rs::{MapCore, MapFlags, MapHandle};

const MAX_ENTRIES: u32 = 1 << 20;

struct Row {
    path: String,
    per_sec: f64,
    latency: Option<(Duration, Duration)>,
}

fn fresh_map() -> MapHandle {
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    MapHandle::create(
        libbpf_rs::MapType::Hash,
        Some("bench"),
        4,
        8,
        MAX_ENTRIES,
        &opts,
    )
    .expect("map")
}

fn one_syscall_per_update(keys: u32) -> Row {
    let map = fresh_map();
    let started = Instant::now();
    for k in 0..keys {
        map.update(&k.to_ne_bytes(), &u64::from(k).to_ne_bytes(), MapFlags::ANY)
            .expect("update");
    }
    let per_sec = f64::from(keys) / started.elapsed().as_secs_f64();
    assert_eq!(map.keys().count() as u32, keys);
    Row {
        path: "BPF_MAP_UPDATE_ELEM, one syscall per update".into(),
        per_sec,
        latency: None,
    }
}

fn update_batch(keys: u32, batch: u32) -> Row {
    let map = fresh_map();
    let started = Instant::now();
    let mut k = 0;
    while k < keys {
        let n = batch.min(keys - k);
        let key_bytes: Vec<u8> = (k..k + n).flat_map(|i| i.to_ne_bytes()).collect();
        let value_bytes: Vec<u8> = (k..k + n)
            .flat_map(|i| u64::from(i).to_ne_bytes())
            .collect();
        map.update_batch(&key_bytes, &value_bytes, n, MapFlags::ANY, MapFlags::ANY)
            .expect("update_batch");
        k += n;
    }
    let per_sec = f64::from(keys) / started.elapsed().as_secs_f64();
    assert_eq!(map.keys().count() as u32, keys);
    Row {
        path: format!("BPF_MAP_UPDATE_BATCH, {batch} per call"),
        per_sec,
        latency: None,
    }
}

/// Every bridge row writes into a fresh mirror of the same shape.
fn bench_mirror(name: &str) -> MirrorDesc {
    MirrorDesc {
        kind: MapType::Hash,
        key_size: 4,
        value_size: 8,
        max_entries: MAX_ENTRIES,
        flags: 0,
        name: name.into(),
        object: "bench".into(),
    }
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_nanos(sorted[index])
}

/// Sends `keys` updates as fast as possible; latency is from `send` to the confirmation that
/// covers the update.
fn bridge_throughput(keys: u32, confirm_each: bool, fast_path: bool) -> Row {
    let epoch = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..=keys).map(|_| AtomicU64::new(0)).collect());
    let latencies: Arc<Vec<AtomicU64>> = Arc::new((0..=keys).map(|_| AtomicU64::new(0)).collect());
    let (sent_at_cb, latencies_cb) = (Arc::clone(&sent_at), Arc::clone(&latencies));
    let bridge = Bridge::with_config(BridgeConfig {
        confirm_each,
        fast_path,
        on_confirm: Some(Box::new(move |c| {
            let now = epoch.elapsed().as_nanos() as u64;
            let (first, last) = match *c {
                Confirmation::Applied { first, last } => (first, last),
                Confirmation::Failed { seq, .. } => (seq, seq),
            };
            for seq in first..=last {
                let sent = sent_at_cb[seq as usize].load(Ordering::Relaxed);
                latencies_cb[seq as usize].store(now.saturating_sub(sent), Ordering::Relaxed);
            }
        })),
    })
    .expect("bridge");
    let id = bridge
        .create_fresh_map(bench_mirror("bench"))
        .expect("mirror");
    let started = Instant::now();
    for k in 0..keys {
        let (key, value) = (k.to_ne_bytes(), u64::from(k).to_ne_bytes());
        // The sequence number is k + 1: record the time before the send makes it visible.
        sent_at[k as usize + 1].store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        bridge
            .send(&Update::put(id, &key, &value, 0))
            .expect("send");
    }
    let counters = bridge.flush(Duration::from_secs(120)).expect("flush");
    let per_sec = f64::from(keys) / started.elapsed().as_secs_f64();
    assert_eq!((counters.applied, counters.failed), (u64::from(keys), 0));
    eprintln!(
        "confirm_each={confirm_each} fast_path={fast_path}: {} drain runs, {:.0} records per run, {} full waits",
        counters.drain_runs,
        counters.sent as f64 / counters.drain_runs.max(1) as f64,
        counters.full_waits
    );
    let kernel_keys = bridge.mirror(id).expect("mirror").key_count();
    assert_eq!(
        kernel_keys, keys as usize,
        "every key reached the kernel map"
    );
    let mut sorted: Vec<u64> = latencies[1..]
        .iter()
        .map(|l| l.load(Ordering::Relaxed))
        .collect();
    sorted.sort_unstable();
    let mode = if confirm_each {
        "confirmation per update"
    } else {
        "confirmation per batch + failures (default)"
    };
    let path = if fast_path {
        "fast path"
    } else {
        "generic path (bpf_sys_bpf)"
    };
    Row {
        path: format!("bridge, {path}, {mode}"),
        per_sec,
        latency: Some((percentile(&sorted, 0.5), percentile(&sorted, 0.99))),
    }
}

/// One update in flight at a time: the bridge's own latency without queueing.
fn bridge_unloaded_latency(samples: u32) -> Row {
    let bridge = Bridge::new().expect("bridge");
    let id = bridge
        .create_fresh_map(bench_mirror("bench_latency"))
        .expect("mirror");
    let mut nanos = Vec::with_capacity(samples as usize);
    let started = Instant::now();
    for k in 0..samples {
        let sent = Instant::now();
        bridge
            .send(&Update::put(id, &k.to_ne_bytes(), &[1; 8], 0))
            .expect("send");
        bridge.flush(Duration::from_secs(10)).expect("flush");
        nanos.push(sent.elapsed().as_nanos() as u64);
    }
    let per_sec = f64::from(samples) / started.elapsed().as_secs_f64();
    nanos.sort_unstable();
    Row {
        path: "bridge, one update in flight (send, wait for its confirmation)".into(),
        per_sec,
        latency: Some((percentile(&nanos, 0.5), percentile(&nanos, 0.99))),
    }
}

fn main() {
    if !require_kernel("bridge benchmark") {
        return;
    }
    let mut keys: u32 = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--keys" {
            keys = args
                .next()
                .and_then(|n| n.parse().ok())
                .expect("--keys takes a number");
        }
    }
    keys = keys.min(MAX_ENTRIES);
    let rows = vec![
        one_syscall_per_update(keys),
        update_batch(keys, 1024),
        bridge_throughput(keys, false, true),
        bridge_throughput(keys, true, true),
        bridge_throughput(keys, false, false),
        bridge_throughput(keys, true, false),
        bridge_unloaded_latency(20_000),
    ];
    // Leave no 1M-entry mirror pinned behind for `bpftime-rs maps` to list.
    bpftime_kernel_bridge::mirror::remove_object_pins("bench").expect("unpinning bench mirrors");
    let baseline = rows[0].per_sec;
    println!("\n{keys} distinct u32 -> u64 keys into a fresh 1M-entry HASH per row\n");
    println!("| path | updates/s | vs one syscall per update | p50 send->confirmed | p99 |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        let (p50, p99) = match row.latency {
            Some((p50, p99)) => (format!("{p50:.1?}"), format!("{p99:.1?}")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.2} M | {:.2}x | {p50} | {p99} |",
            row.path,
            row.per_sec / 1e6,
            row.per_sec / baseline
        );
    }
}
