//! Kernel tests of the bridge: real drain program, real kernel maps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpftime_kernel_bridge::selftest::{self, SelftestOptions};
use bpftime_kernel_bridge::{
    Bridge, BridgeConfig, BridgeError, Confirmation, MapType, Mirror, MirrorDesc, Update,
    UpdateStatus,
};
use bpftime_testutils::require_kernel;

const FLUSH: Duration = Duration::from_secs(60);

/// Removes a test object's pins when the test ends, pass or fail, so that `bpftime-rs maps`
/// does not list test leftovers.
struct Unpin(&'static str);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = bpftime_kernel_bridge::mirror::remove_object_pins(self.0);
    }
}
/// The selftest pins its mirrors under one directory; its runs must not overlap.
static SELFTEST: Mutex<()> = Mutex::new(());

fn desc(object: &str, name: &str, kind: MapType, key: u32, value: u32, max: u32) -> MirrorDesc {
    MirrorDesc {
        kind,
        key_size: key,
        value_size: value,
        max_entries: max,
        flags: 0,
        name: name.into(),
        object: object.into(),
    }
}

fn run_selftest(confirm_each: bool) {
    let _guard = SELFTEST.lock().unwrap_or_else(|e| e.into_inner());
    let report = selftest::run(&SelftestOptions {
        updates: 100_000,
        confirm_each,
        seed: 42,
    })
    .expect("selftest runs");
    let c = report.counters;
    println!(
        "confirm_each={confirm_each}: sent {} applied {} failed {} lost {} pending {} ({:.0} updates/s)",
        c.sent, c.applied, c.failed, report.lost, c.pending, report.updates_per_sec
    );
    assert_eq!(report.mismatches, Vec::<String>::new());
    assert_eq!(c.sent, 100_000);
    assert_eq!(report.lost, 0);
    assert_eq!(c.pending, 0);
    let predicted: u64 = report.expected_failures.values().sum();
    assert_eq!(c.failed, predicted, "every predicted failure, and no other");
    for errno in ["E2BIG", "EEXIST", "ENOENT", "EINVAL"] {
        assert!(
            report.expected_failures.get(errno).copied().unwrap_or(0) > 0,
            "the stream exercises {errno}"
        );
    }
    for map in &report.maps {
        assert_eq!(map.expected_entries, map.kernel_entries, "{}", map.name);
    }
}

#[test]
fn selftest_100k_updates_batch_confirmations() {
    if require_kernel("selftest_100k_updates_batch_confirmations") {
        run_selftest(false);
    }
}

#[test]
fn selftest_100k_updates_confirm_each() {
    if require_kernel("selftest_100k_updates_confirm_each") {
        run_selftest(true);
    }
}

#[test]
fn full_hash_gives_e2big_and_noexist_gives_eexist() {
    if !require_kernel("full_hash_gives_e2big_and_noexist_gives_eexist") {
        return;
    }
    let _unpin = Unpin("test_errno");
    for confirm_each in [false, true] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let bridge = Bridge::with_config(BridgeConfig {
            confirm_each,
            on_confirm: Some(Box::new(move |c| sink.lock().unwrap().push(*c))),
            ..BridgeConfig::default()
        })
        .unwrap();
        // A generic-path shape (8 -> 16) and a fast-path shape (4 -> 8) must agree.
        for (key_size, value_size) in [(8u32, 16u32), (4, 8)] {
            let name = format!("full_{key_size}_{value_size}_{confirm_each}");
            let id = bridge
                .create_fresh_map(desc(
                    "test_errno",
                    &name,
                    MapType::Hash,
                    key_size,
                    value_size,
                    2,
                ))
                .unwrap();
            let key = |n: u8| vec![n; key_size as usize];
            let value = vec![7u8; value_size as usize];
            let a = bridge.send(&Update::put(id, &key(1), &value, 0)).unwrap();
            let b = bridge.send(&Update::put(id, &key(2), &value, 0)).unwrap();
            let full = bridge.send(&Update::put(id, &key(3), &value, 0)).unwrap();
            let exists = bridge.send(&Update::put(id, &key(1), &value, 1)).unwrap();
            let missing = bridge.send(&Update::put(id, &key(9), &value, 2)).unwrap();
            let replace = bridge.send(&Update::put(id, &key(2), &value, 2)).unwrap();
            let delete_missing = bridge.send(&Update::delete(id, &key(5))).unwrap();
            bridge.flush(FLUSH).unwrap();
            assert_eq!(bridge.status(a), UpdateStatus::Applied);
            assert_eq!(bridge.status(b), UpdateStatus::Applied);
            assert_eq!(
                bridge.status(full),
                UpdateStatus::Failed { errno: libc::E2BIG }
            );
            assert_eq!(
                bridge.status(exists),
                UpdateStatus::Failed {
                    errno: libc::EEXIST
                }
            );
            assert_eq!(
                bridge.status(missing),
                UpdateStatus::Failed {
                    errno: libc::ENOENT
                }
            );
            assert_eq!(bridge.status(replace), UpdateStatus::Applied);
            assert_eq!(
                bridge.status(delete_missing),
                UpdateStatus::Failed {
                    errno: libc::ENOENT
                }
            );
            assert_eq!(bridge.mirror(id).unwrap().entries().unwrap().len(), 2);
        }
        let counters = bridge.counters();
        assert_eq!(
            (counters.sent, counters.applied, counters.failed),
            (14, 6, 8)
        );
        let seen = seen.lock().unwrap();
        let failed: Vec<_> = seen
            .iter()
            .filter_map(|c| match c {
                Confirmation::Failed { seq, errno, .. } => Some((*seq, *errno)),
                _ => None,
            })
            .collect();
        assert_eq!(failed, bridge.failures());
        // Applied ranges plus failures account for every sequence number exactly once.
        let mut settled: Vec<u64> = seen
            .iter()
            .flat_map(|c| match *c {
                Confirmation::Applied { first, last } => (first..=last).collect::<Vec<_>>(),
                Confirmation::Failed { .. } => Vec::new(),
            })
            .filter(|seq| !failed.iter().any(|(f, _)| f == seq))
            .chain(failed.iter().map(|(seq, _)| *seq))
            .collect();
        settled.sort();
        assert_eq!(
            settled,
            (1..=14).collect::<Vec<_>>(),
            "confirm_each={confirm_each}"
        );
        if confirm_each {
            assert_eq!(seen.len(), 14, "one confirmation per update");
        }
    }
}

#[test]
fn full_ring_waits_and_loses_nothing() {
    if !require_kernel("full_ring_waits_and_loses_nothing") {
        return;
    }
    let _unpin = Unpin("test_backpressure");
    // 4 threads x 3,000 records of 4 KiB = 48 MiB through an 8 MiB ring. The drain is paused
    // until the senders have found the ring full, so the wait is certain, not a race.
    let bridge = Arc::new(Bridge::new().unwrap());
    let id = bridge
        .create_fresh_map(desc(
            "test_backpressure",
            "big",
            MapType::Hash,
            16,
            4000,
            12_000,
        ))
        .unwrap();
    bridge.pause_drain();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let bridge = Arc::clone(&bridge);
            std::thread::spawn(move || {
                for i in 0..3000u64 {
                    let n = t * 3000 + i;
                    let mut key = [0u8; 16];
                    key[..8].copy_from_slice(&n.to_ne_bytes());
                    let value = vec![(n % 251) as u8; 4000];
                    bridge.send(&Update::put(id, &key, &value, 0)).unwrap();
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + FLUSH;
    while bridge.counters().full_waits == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ring never filled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let queued = bridge.counters();
    assert_eq!(queued.applied, 0, "nothing drains while paused");
    assert!(
        queued.sent < 12_000,
        "senders wait for space instead of dropping"
    );
    bridge.resume_drain();
    for thread in threads {
        thread.join().unwrap();
    }
    let counters = bridge.flush(FLUSH).unwrap();
    assert_eq!(
        (counters.sent, counters.applied, counters.failed),
        (12_000, 12_000, 0)
    );
    println!("senders waited for space {} times", counters.full_waits);
    let entries = bridge.mirror(id).unwrap().entries().unwrap();
    assert_eq!(entries.len(), 12_000);
    for entry in entries {
        let n = u64::from_ne_bytes(entry.key[..8].try_into().unwrap());
        assert!(
            entry.values[0].iter().all(|b| *b == (n % 251) as u8),
            "key {n}"
        );
    }
}

#[test]
fn malformed_updates_are_refused_with_the_map_named() {
    if !require_kernel("malformed_updates_are_refused_with_the_map_named") {
        return;
    }
    let _unpin = Unpin("test_bad");
    let bridge = Bridge::new().unwrap();
    let id = bridge
        .create_fresh_map(desc("test_bad", "counts", MapType::Hash, 4, 8, 16))
        .unwrap();
    let err = bridge
        .send(&Update::put(id, &[1, 2], &[0; 8], 0))
        .unwrap_err();
    assert!(
        matches!(err, BridgeError::SizeMismatch { what: "key", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("counts"), "{err}");
    let err = bridge
        .send(&Update::put(id, &[0; 4], &[0; 9], 0))
        .unwrap_err();
    assert!(err.to_string().contains("value is 9 bytes"), "{err}");
    let err = bridge.send(&Update::push(id, &[0; 8], 0)).unwrap_err();
    assert!(matches!(err, BridgeError::WrongOp { .. }), "{err}");
    let err = bridge
        .send(&Update::put(
            bpftime_kernel_bridge::MirrorId(77),
            &[0; 4],
            &[0; 8],
            0,
        ))
        .unwrap_err();
    assert!(matches!(err, BridgeError::UnknownMirror(77)), "{err}");
    assert_eq!(
        bridge.counters().sent,
        0,
        "nothing malformed reaches the ring"
    );

    // The drain checks each record again in the kernel: sizes that do not match the mirror
    // (as a buggy or hostile producer could write) are rejected with EINVAL, the map untouched,
    // and the records after them still apply.
    let good = bridge
        .send(&Update::put(id, &[1, 0, 0, 0], &[7; 8], 0))
        .unwrap();
    let short_key = bridge
        .debug_send_unchecked(&Update::put(id, &[2, 0, 0], &[9; 8], 0), 3, 8)
        .unwrap();
    let long_value = bridge
        .debug_send_unchecked(&Update::put(id, &[3, 0, 0, 0], &[9; 12], 0), 4, 12)
        .unwrap();
    let keyless = bridge
        .debug_send_unchecked(&Update::push(id, &[9; 8], 0), 0, 8)
        .unwrap();
    let after = bridge
        .send(&Update::put(id, &[4, 0, 0, 0], &[8; 8], 0))
        .unwrap();
    let counters = bridge.flush(Duration::from_secs(10)).unwrap();
    assert_eq!(counters.pending, 0);
    for seq in [short_key, long_value, keyless] {
        assert_eq!(
            bridge.status(seq),
            UpdateStatus::Failed {
                errno: libc::EINVAL
            },
            "record {seq}"
        );
    }
    assert_eq!(bridge.status(good), UpdateStatus::Applied);
    assert_eq!(bridge.status(after), UpdateStatus::Applied);
    let mut keys: Vec<Vec<u8>> = bridge
        .mirror(id)
        .unwrap()
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![vec![1, 0, 0, 0], vec![4, 0, 0, 0]],
        "only the well-formed records"
    );

    let err = bridge
        .create_map(desc("test_bad", "counts", MapType::Hash, 4, 16, 16))
        .unwrap_err();
    assert!(err.to_string().contains("another shape"), "{err}");
    let err = bridge
        .create_map(desc("test_bad", "a/b", MapType::Hash, 4, 8, 16))
        .unwrap_err();
    assert!(matches!(err, BridgeError::InvalidMirror { .. }), "{err}");
}

#[test]
fn reopened_mirror_keeps_its_entries() {
    if !require_kernel("reopened_mirror_keeps_its_entries") {
        return;
    }
    let _unpin = Unpin("test_reopen");
    let shape = desc("test_reopen", "kept", MapType::Array, 4, 8, 4);
    {
        let bridge = Bridge::new().unwrap();
        let id = bridge.create_fresh_map(shape.clone()).unwrap();
        bridge
            .send(&Update::put(
                id,
                &2u32.to_ne_bytes(),
                &99u64.to_ne_bytes(),
                0,
            ))
            .unwrap();
        bridge.flush(FLUSH).unwrap();
    }
    let bridge = Bridge::new().unwrap();
    let id = bridge.create_map(shape.clone()).unwrap();
    let entries = bridge.mirror(id).unwrap().entries().unwrap();
    assert_eq!(entries[2].values[0], 99u64.to_ne_bytes());
    let reopened = Mirror::open_pinned(&shape.pin_path(), "test_reopen").unwrap();
    assert_eq!(reopened.desc(), &shape);
}
