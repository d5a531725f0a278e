//! Bridge throughput and latency against the kernel's own map-update syscalls, in one run, on the
//! same map shape: a fresh preallocated HASH of 1M u32 -> u64 entries per row, 1M distinct keys.
//!
//! Every row runs `--rounds` times (default 3), the rows interleaved and rotated round by round
//! so machine drift reaches each alike; a row keeps its fastest round. Beside wall-clock rate
//! each row shows the CPU time of the whole process per update (every thread, user and system:
//! the bridge's sender and drain thread against the baseline's one thread).
//!
//! `cargo bench -p bpftime-kernel-bridge --bench bridge [-- --keys N] [--rounds N]` (as root).

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
    /// Process CPU time (all threads) per update over the timed part.
    cpu_per_update: Duration,
}

/// CPU time (user + system) of every thread of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
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
    let (started, cpu) = (Instant::now(), process_cpu());
    for k in 0..keys {
        map.update(&k.to_ne_bytes(), &u64::from(k).to_ne_bytes(), MapFlags::ANY)
            .expect("update");
    }
    let per_sec = f64::from(keys) / started.elapsed().as_secs_f64();
    let cpu_per_update = (process_cpu() - cpu) / keys.max(1);
    assert_eq!(map.keys().count() as u32, keys);
    Row {
        path: "BPF_MAP_UPDATE_ELEM, one syscall per update".into(),
        per_sec,
        latency: None,
        cpu_per_update,
    }
}

fn update_batch(keys: u32, batch: u32) -> Row {
    let map = fresh_map();
    let (started, cpu) = (Instant::now(), process_cpu());
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
    let cpu_per_update = (process_cpu() - cpu) / keys.max(1);
    assert_eq!(map.keys().count() as u32, keys);
    Row {
        path: format!("BPF_MAP_UPDATE_BATCH, {batch} per call"),
        per_sec,
        latency: None,
        cpu_per_update,
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
    let (started, cpu) = (Instant::now(), process_cpu());
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
    let cpu_per_update = (process_cpu() - cpu) / keys.max(1);
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
        cpu_per_update,
    }
}

/// One update in flight at a time: the bridge's own latency without queueing.
fn bridge_unloaded_latency(samples: u32) -> Row {
    let bridge = Bridge::new().expect("bridge");
    let id = bridge
        .create_fresh_map(bench_mirror("bench_latency"))
        .expect("mirror");
    let mut nanos = Vec::with_capacity(samples as usize);
    let (started, cpu) = (Instant::now(), process_cpu());
    for k in 0..samples {
        let sent = Instant::now();
        bridge
            .send(&Update::put(id, &k.to_ne_bytes(), &[1; 8], 0))
            .expect("send");
        bridge.flush(Duration::from_secs(10)).expect("flush");
        nanos.push(sent.elapsed().as_nanos() as u64);
    }
    let per_sec = f64::from(samples) / started.elapsed().as_secs_f64();
    let cpu_per_update = (process_cpu() - cpu) / samples.max(1);
    nanos.sort_unstable();
    Row {
        path: "bridge, one update in flight (send, wait for its confirmation)".into(),
        per_sec,
        latency: Some((percentile(&nanos, 0.5), percentile(&nanos, 0.99))),
        cpu_per_update,
    }
}

fn main() {
    if !require_kernel("bridge benchmark") {
        return;
    }
    let (mut keys, mut rounds): (u32, usize) = (1_000_000, 3);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> Option<u32> { args.next().and_then(|n| n.parse().ok()) };
        match arg.as_str() {
            "--keys" => keys = number().expect("--keys takes a number"),
            "--rounds" => rounds = number().expect("--rounds takes a number") as usize,
            _ => {}
        }
    }
    keys = keys.min(MAX_ENTRIES);
    const LATENCY_SAMPLES: u32 = 20_000;
    type RowFn = Box<dyn Fn(u32) -> Row>;
    let rows: Vec<(u32, RowFn)> = vec![
        (keys, Box::new(one_syscall_per_update)),
        (keys, Box::new(|k| update_batch(k, 1024))),
        (keys, Box::new(|k| bridge_throughput(k, false, true))),
        (keys, Box::new(|k| bridge_throughput(k, true, true))),
        (keys, Box::new(|k| bridge_throughput(k, false, false))),
        (keys, Box::new(|k| bridge_throughput(k, true, false))),
        (LATENCY_SAMPLES, Box::new(bridge_unloaded_latency)),
    ];
    let mut best: Vec<Option<Row>> = (0..rows.len()).map(|_| None).collect();
    for round in 0..rounds.max(1) {
        for i in 0..rows.len() {
            let index = (i + round) % rows.len();
            let (updates, row) = &rows[index];
            let r = row(*updates);
            eprintln!(
                "round {}: {}: {:.2} M/s, {:?} CPU per update",
                round + 1,
                r.path,
                r.per_sec / 1e6,
                r.cpu_per_update
            );
            if best[index].as_ref().is_none_or(|b| r.per_sec > b.per_sec) {
                best[index] = Some(r);
            }
        }
    }
    let rows: Vec<Row> = best.into_iter().flatten().collect();
    // Leave no 1M-entry mirror pinned behind for `bpftime-rs maps` to list.
    bpftime_kernel_bridge::mirror::remove_object_pins("bench").expect("unpinning bench mirrors");
    let baseline = rows[0].per_sec;
    println!(
        "\n{keys} distinct u32 -> u64 keys into a fresh 1M-entry HASH per row; best of {rounds} \
         interleaved rounds; CPU: the whole process (every thread, user + system) per update\n"
    );
    println!(
        "| path | updates/s | vs one syscall per update | CPU per update | p50 send->confirmed | p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let (p50, p99) = match row.latency {
            Some((p50, p99)) => (format!("{p50:.1?}"), format!("{p99:.1?}")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.2} M | {:.2}x | {:.2?} | {p50} | {p99} |",
            row.path,
            row.per_sec / 1e6,
            row.per_sec / baseline,
            row.cpu_per_update
        );
    }
}
