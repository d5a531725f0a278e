//! Micro benchmark of the shared-memory maps: ns per operation, single thread.
//! `cargo run --release -p bpftime-runtime --example maps_bench`

use bpftime_runtime::maps::*;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::Instant;

fn bench(name: &str, iters: u64, mut f: impl FnMut(u64)) {
    for i in 0..iters / 10 {
        f(i);
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    println!("{name:<44} {best:>8.1} ns/op");
}

fn main() {
    let name = format!("bench-{}", std::process::id());
    let obj = ShmObject::create(
        &name,
        &[
            MapDef::new(MapType::Hash, 4, 8, 10_240, "h"),
            MapDef::new(MapType::Array, 4, 8, 1024, "a"),
            MapDef::new(MapType::PercpuArray, 4, 8, 1024, "pa"),
            MapDef::new(MapType::LruHash, 4, 8, 10_240, "lru"),
            MapDef::new(MapType::Ringbuf, 0, 0, 1 << 20, "rb"),
        ],
    )
    .expect("create");
    let h = obj.map("h").unwrap();
    let a = obj.map("a").unwrap();
    let pa = obj.map("pa").unwrap();
    let lru = obj.map("lru").unwrap();
    let rb = obj.map("rb").unwrap();
    for i in 0..1024u32 {
        h.update(&i.to_le_bytes(), &0u64.to_le_bytes(), BPF_ANY)
            .unwrap();
        lru.update(&i.to_le_bytes(), &0u64.to_le_bytes(), BPF_ANY)
            .unwrap();
    }
    const N: u64 = 5_000_000;
    println!("shared-memory maps, 1 thread, best of 5 x {N} ops");
    bench("array lookup", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        black_box(a.lookup(black_box(&k)).unwrap().map(|p| p.as_ptr()));
    });
    bench("array lookup + atomic add", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        let v = a.lookup(&k).unwrap().unwrap();
        v.atomic_u64(0).unwrap().fetch_add(1, Ordering::Relaxed);
    });
    bench("percpu array lookup + add", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        let v = pa.lookup(&k).unwrap().unwrap();
        v.atomic_u64(0).unwrap().fetch_add(1, Ordering::Relaxed);
    });
    bench("hash lookup (1024 keys)", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        black_box(h.lookup(black_box(&k)).unwrap().map(|p| p.as_ptr()));
    });
    bench("hash lookup, no change mark (tracking off)", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        black_box(
            h.lookup_unmarked(black_box(&k), 0)
                .unwrap()
                .map(|p| p.as_ptr()),
        );
    });
    bench("hash lookup + atomic add", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        let v = h.lookup(&k).unwrap().unwrap();
        v.atomic_u64(0).unwrap().fetch_add(1, Ordering::Relaxed);
    });
    bench("hash lookup + update (existing key)", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        let v = h.lookup(&k).unwrap().unwrap();
        let n = v.atomic_u64(0).unwrap().load(Ordering::Relaxed);
        h.update(&k, &(n + 1).to_le_bytes(), BPF_ANY).unwrap();
    });
    bench("hash lookup miss + update (insert) + delete", N / 5, |i| {
        let k = (5000 + (i & 1023) as u32).to_le_bytes();
        black_box(h.lookup(&k).unwrap());
        h.update(&k, &i.to_le_bytes(), BPF_ANY).unwrap();
        h.delete(&k).unwrap();
    });
    bench("lru_hash lookup + update", N, |i| {
        let k = ((i & 1023) as u32).to_le_bytes();
        let v = lru.lookup(&k).unwrap().unwrap();
        let n = v.atomic_u64(0).unwrap().load(Ordering::Relaxed);
        lru.update(&k, &(n + 1).to_le_bytes(), BPF_ANY).unwrap();
    });
    let mut c = RingBufConsumer::new(&rb).unwrap();
    bench("ringbuf output 16 B (+ consume every 1024)", N, |i| {
        let mut rec = [0u8; 16];
        rec[..8].copy_from_slice(&i.to_le_bytes());
        rb.as_ringbuf().unwrap().output(&rec, 0).unwrap();
        if i & 1023 == 1023 {
            c.poll(|r| {
                black_box(r.data);
            });
        }
    });
    // Change tracking cost on the lookup path: marks already set (steady state) versus a
    // forwarder clearing them after every lookup (worst case: every lookup re-marks).
    let mut total = 0u64;
    let t = Instant::now();
    for i in 0..N / 10 {
        let k = ((i & 1023) as u32).to_le_bytes();
        black_box(h.lookup(&k).unwrap());
        if i & 1023 == 1023 {
            total += h.drain_changes(|c| {
                black_box(c);
            }) as u64;
        }
    }
    println!(
        "{:<44} {:>8.1} ns/op ({} changes drained)",
        "hash lookup, forwarder drains every 1024",
        t.elapsed().as_nanos() as f64 / (N / 10) as f64,
        total
    );
    drop(obj.remove());
}
