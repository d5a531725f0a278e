//! Threads hammering one hash map with inserts, deletes and lock-free lookups: every thread
//! owns a key range and checks that what it wrote is exactly what lookups see, while the
//! others churn the same buckets and reuse the same pooled elements.

mod maps_common;

use bpftime_runtime::maps::*;
use maps_common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One forwarder pass: drains the changes and acknowledges every reported deletion; returns
/// how many tombstones that freed.
fn ack_tombstones(h: &MapHandle) -> u64 {
    let mut dead = Vec::new();
    h.drain_changes(|c| {
        if c.value.is_none() {
            dead.push((c.slot, c.generation));
        }
    });
    dead.into_iter()
        .map(|(slot, g)| u64::from(h.as_hash().unwrap().ack_deleted(slot, g)))
        .sum()
}

/// A forwarder thread making [`ack_tombstones`] passes until `stop`; joins to the total.
fn spawn_acker(h: &MapHandle, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (h, stop) = (h.clone(), Arc::clone(stop));
    std::thread::spawn(move || {
        let mut acked = 0;
        while !stop.load(Ordering::Relaxed) {
            acked += ack_tombstones(&h);
        }
        acked
    })
}

#[test]
fn owners_always_see_their_own_writes_under_churn() {
    for track in [false, true] {
        let s = Seg::new(
            "stress",
            if track { "churn-track" } else { "churn" },
            &[def(MapType::Hash, 8, 16, 256, "h")],
        );
        let h = s.0.map("h").unwrap();
        h.as_hash().unwrap().set_track_deletes(track);
        let stop = Arc::new(AtomicBool::new(false));
        // A forwarder acknowledging tombstones concurrently, when tracking.
        let fwd = spawn_acker(&h, &stop);
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9u64 ^ t;
                    let mut present = [false; 48];
                    for round in 0..40_000u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = (x % 48) as usize;
                        let key = (t << 32 | i as u64).to_le_bytes();
                        let mut val = [0u8; 16];
                        val[..8].copy_from_slice(&key);
                        val[8..].copy_from_slice(&round.to_le_bytes());
                        match (x >> 32) % 3 {
                            0 => {
                                let r = h.delete(&key);
                                assert_eq!(r.is_ok(), present[i], "delete of {t}/{i}");
                                present[i] = false;
                            }
                            1 => {
                                let r = h.update(&key, &val, BPF_NOEXIST);
                                match r {
                                    Ok(()) => {
                                        assert!(!present[i]);
                                        present[i] = true;
                                    }
                                    Err(e) => assert_eq!(
                                        e.errno(),
                                        if present[i] {
                                            libc::EEXIST
                                        } else {
                                            libc::E2BIG
                                        }
                                    ),
                                }
                            }
                            _ => {
                                let got = h.lookup(&key).unwrap();
                                assert_eq!(got.is_some(), present[i], "lookup of {t}/{i}");
                                if let Some(p) = got {
                                    // The element holds our key, not a reused stranger's.
                                    assert_eq!(p.read()[..8], key);
                                }
                            }
                        }
                    }
                    present.iter().filter(|&&p| p).count()
                })
            })
            .collect();
        let live: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
        stop.store(true, Ordering::Relaxed);
        let acked = fwd.join().unwrap();
        assert_eq!(h.len(), live);
        assert_eq!(h.iter().len(), live);
        if track {
            // Whatever the concurrent forwarder did not get to (it may barely have been
            // scheduled on two cores), a final pass acknowledges: no tombstone may be lost.
            let late = ack_tombstones(&h);
            let c = h.counters();
            eprintln!("acked {acked} concurrently + {late} at the end; {c:?}");
            assert_eq!(
                c.tombstones, 0,
                "every tombstone was reported and acknowledged"
            );
            assert_eq!(c.tombstones_dropped, 0);
            assert_eq!(h.iter().len(), live);
        }
    }
}

#[test]
fn for_each_visits_every_entry_and_marks() {
    let s = Seg::new(
        "stress",
        "foreach",
        &[
            def(MapType::Hash, 4, 8, 64, "h"),
            def(MapType::PercpuArray, 4, 8, 5, "pa"),
        ],
    );
    let h = s.0.map("h").unwrap();
    for i in 0..10u32 {
        h.update(&i.to_le_bytes(), &u64::from(i).to_le_bytes(), BPF_ANY)
            .unwrap();
    }
    h.drain_changes(|_| {});
    let mut sum = 0u64;
    let n = h.for_each_ptr(0, |k, v| {
        // SAFETY: key and value pointers of a live entry, 4 and 8 bytes.
        unsafe {
            let key = std::ptr::read_unaligned(k as *const u32);
            let val = std::ptr::read_unaligned(v as *const u64);
            assert_eq!(u64::from(key), val);
            sum += val;
            std::ptr::write_unaligned(v as *mut u64, val * 2);
        }
        true
    });
    assert_eq!(n, 10);
    assert_eq!(sum, 45);
    assert_eq!(
        h.drain_changes(|c| assert!(c.kind.pointer_handed_out())),
        10
    );
    assert_eq!(
        h.get(&3u32.to_le_bytes()).unwrap().unwrap().sum_u64(),
        Some(6)
    );
    let mut stops = 0;
    assert_eq!(
        h.for_each_ptr(0, |_, _| {
            stops += 1;
            stops < 3
        }),
        3
    );
    let pa = s.0.map("pa").unwrap();
    assert_eq!(pa.for_each_ptr(0, |_, _| true), 5);
    assert_eq!(pa.for_each_ptr(pa.ncpu(), |_, _| true), 0);
}

/// An LRU map never refuses an update for want of room: the kernel evicts, and answers an
/// error only when no element can be freed at all. Eight threads insert distinct keys into a
/// small LRU (every insert past the first 64 evicts) while tracking keeps evicted entries as
/// tombstones, with and without a forwarder acknowledging them.
#[test]
fn lru_updates_evict_under_contention_and_never_refuse() {
    for (name, t, ack) in [
        ("lru-ack", MapType::LruHash, true),
        ("lru-noack", MapType::LruHash, false),
        ("lru-percpu", MapType::LruPercpuHash, false),
    ] {
        let s = Seg::new("stress", name, &[def(t, 4, 8, 64, "h")]);
        let h = s.0.map("h").unwrap();
        h.as_hash().unwrap().set_track_deletes(true);
        let stop = Arc::new(AtomicBool::new(false));
        let fwd = ack.then(|| spawn_acker(&h, &stop));
        let per_value = if t.is_percpu() { h.ncpu() as usize } else { 1 };
        let writers: Vec<_> = (0..8u32)
            .map(|w| {
                let h = h.clone();
                std::thread::spawn(move || {
                    let mut refused = Vec::new();
                    for i in 0..20_000u32 {
                        let key = (w << 24 | i).to_le_bytes();
                        let val: Vec<u8> = (0..per_value)
                            .flat_map(|_| u64::from(i).to_le_bytes())
                            .collect();
                        let r = if per_value > 1 {
                            h.update_percpu(&key, &val, BPF_ANY)
                        } else {
                            h.update(&key, &val, BPF_ANY)
                        };
                        if let Err(e) = r {
                            refused.push((i, e.errno()));
                        }
                    }
                    refused
                })
            })
            .collect();
        let refused: Vec<_> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        stop.store(true, Ordering::Relaxed);
        if let Some(f) = fwd {
            f.join().unwrap();
        }
        let c = h.counters();
        assert!(
            refused.is_empty(),
            "{name}: {} of 160,000 LRU updates refused (first {:?}); {c:?}",
            refused.len(),
            &refused[..refused.len().min(5)]
        );
        assert_eq!(h.len(), 64, "{name}: a full LRU stays full");
        assert!(c.evictions >= 160_000 - 64, "{name}: {c:?}");
    }
}

/// The same at scale: 8 writers put 4 x 65,536 distinct keys each into a 65,536-entry LRU
/// (a bucket lock per key spread over many buckets, eviction from the whole pool): no update
/// refused, the map ends full, every listed entry holds its key's value, and a key written
/// after all the others is still there (the clock evicts old entries first).
#[test]
fn a_large_lru_under_eight_writers_evicts_and_keeps_the_newest() {
    const CAP: u32 = 1 << 16;
    let s = Seg::new(
        "stress",
        "lru-64k",
        &[def(MapType::LruHash, 4, 8, CAP, "h")],
    );
    let h = s.0.map("h").unwrap();
    let writers: Vec<_> = (0..8u32)
        .map(|w| {
            let h = h.clone();
            std::thread::spawn(move || {
                (0..4 * CAP)
                    .filter(|&i| {
                        let key = w << 24 | i;
                        h.update(&key.to_le_bytes(), &u64::from(key).to_le_bytes(), BPF_ANY)
                            .is_err()
                    })
                    .count()
            })
        })
        .collect();
    let refused: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(refused, 0, "{:?}", h.counters());
    assert_eq!(h.len(), CAP as usize, "a full LRU stays full");
    let entries = h.iter();
    assert_eq!(entries.len(), CAP as usize);
    for e in &entries {
        let EntryValue::Single(v) = &e.value else {
            panic!("not per-CPU")
        };
        assert_eq!(e.key[..4], v[..4], "an entry holds its own key's value");
    }
    let last = 0xff00_0000u32.to_le_bytes();
    h.update(&last, &7u64.to_le_bytes(), BPF_ANY).unwrap();
    assert!(h.lookup(&last).unwrap().is_some(), "the newest key is kept");
    assert!(h.counters().evictions >= u64::from(8 * 4 * CAP - CAP));
}
