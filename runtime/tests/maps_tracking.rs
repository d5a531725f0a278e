//! Change marks and the forwarder protocol, in one process.

mod maps_common;

use bpftime_runtime::maps::*;
use maps_common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn drain(m: &MapHandle) -> Vec<Change> {
    let mut v = Vec::new();
    m.drain_changes(|c| v.push(c));
    v
}

#[test]
fn update_lookup_delete_mark_and_drain_clears() {
    let s = Seg::new("trk", "basic", &[def(MapType::Hash, 4, 8, 8, "h")]);
    let h = s.0.map("h").unwrap();
    assert!(drain(&h).is_empty());
    h.update(&k4(1), &1u64.to_le_bytes(), BPF_ANY).unwrap();
    let c = drain(&h);
    assert_eq!(c.len(), 1);
    assert!(c[0].kind.changed());
    assert!(drain(&h).is_empty(), "drain clears the marks");
    // get() copies without handing out a pointer: no mark. lookup() marks.
    h.get(&k4(1)).unwrap();
    assert!(drain(&h).is_empty());
    h.lookup(&k4(1)).unwrap().unwrap();
    let c = drain(&h);
    assert_eq!(c.len(), 1);
    assert!(c[0].kind.pointer_handed_out());
    // Without tombstone tracking a delete frees the element at once: nothing to report.
    h.delete(&k4(1)).unwrap();
    assert!(drain(&h).is_empty());
}

#[test]
fn tombstones_until_ack_and_revival() {
    let s = Seg::new("trk", "tomb", &[def(MapType::Hash, 4, 8, 4, "h")]);
    let h = s.0.map("h").unwrap();
    h.as_hash().unwrap().set_track_deletes(true);
    for i in 0..4 {
        h.update(&k4(i), &[0; 8], BPF_ANY).unwrap();
    }
    drain(&h);
    h.delete(&k4(0)).unwrap();
    h.delete(&k4(1)).unwrap();
    // Tombstones are invisible and do not count against max_entries.
    assert!(h.lookup(&k4(0)).unwrap().is_none());
    assert_eq!(h.len(), 2);
    assert_eq!(h.iter().len(), 2);
    assert_eq!(h.delete(&k4(0)).unwrap_err().errno(), libc::ENOENT);
    h.update(&k4(10), &[1; 8], BPF_NOEXIST).unwrap();
    h.update(&k4(11), &[1; 8], BPF_NOEXIST).unwrap();
    assert_eq!(
        h.update(&k4(12), &[1; 8], BPF_ANY).unwrap_err().errno(),
        libc::E2BIG
    );
    // Re-inserting a deleted key revives its tombstone: one record, current state live.
    h.delete(&k4(10)).unwrap();
    h.update(&k4(1), &[9; 8], BPF_ANY).unwrap();
    let mut by_key: HashMap<u32, Change> = HashMap::new();
    for c in drain(&h) {
        by_key.insert(u32::from_le_bytes(c.key[..].try_into().unwrap()), c);
    }
    assert_eq!(by_key[&0].value, None);
    assert_eq!(by_key[&1].value, Some(EntryValue::Single(vec![9; 8])));
    assert_eq!(by_key[&10].value, None);
    assert!(by_key[&11].value.is_some());
    // A stale acknowledgment (revived element) is refused; real ones free the tombstones.
    assert!(!h
        .as_hash()
        .unwrap()
        .ack_deleted(by_key[&1].slot, by_key[&1].generation));
    assert!(h
        .as_hash()
        .unwrap()
        .ack_deleted(by_key[&0].slot, by_key[&0].generation));
    assert!(
        !h.as_hash()
            .unwrap()
            .ack_deleted(by_key[&0].slot, by_key[&0].generation),
        "acked twice"
    );
    assert!(h
        .as_hash()
        .unwrap()
        .ack_deleted(by_key[&10].slot, by_key[&10].generation));
    assert_eq!(h.counters().tombstones, 0);
    assert!(!h.take_resync_needed());
}

#[test]
fn unacknowledged_tombstones_never_block_inserts() {
    let s = Seg::new("trk", "overflow", &[def(MapType::Hash, 4, 4, 4, "h")]);
    let h = s.0.map("h").unwrap();
    h.as_hash().unwrap().set_track_deletes(true);
    // Far more distinct deleted keys than the pool's spare half holds.
    for i in 0..100 {
        h.update(&k4(i), &k4(i), BPF_NOEXIST).unwrap();
        h.delete(&k4(i)).unwrap();
    }
    assert_eq!(h.len(), 0);
    assert!(h.counters().tombstones <= 8);
    assert!(h.counters().tombstones_dropped > 0);
    assert!(
        h.take_resync_needed(),
        "dropped tombstones ask for a full resync"
    );
    for i in 0..4 {
        h.update(&k4(1000 + i), &k4(i), BPF_NOEXIST).unwrap();
    }
    let mut n = 0;
    h.snapshot_changes(|c| {
        assert!(c.value.is_some());
        n += 1;
    });
    assert_eq!(n, 4);
}

#[test]
fn array_and_percpu_marks() {
    let s = Seg::new(
        "trk",
        "arr",
        &[
            def(MapType::Array, 4, 8, 300, "a"),
            def(MapType::PercpuArray, 4, 8, 3, "pa"),
        ],
    );
    let a = s.0.map("a").unwrap();
    assert!(drain(&a).is_empty());
    a.lookup(&k4(5)).unwrap().unwrap();
    a.update(&k4(299), &7u64.to_le_bytes(), BPF_ANY).unwrap();
    a.lookup(&k4(70)).unwrap().unwrap();
    let mut keys: Vec<u32> = drain(&a)
        .into_iter()
        .map(|c| u32::from_le_bytes(c.key[..].try_into().unwrap()))
        .collect();
    keys.sort();
    assert_eq!(keys, vec![5, 70, 299]);
    let pa = s.0.map("pa").unwrap();
    let p = pa.lookup(&k4(1)).unwrap().unwrap();
    p.atomic_u64(0).unwrap().fetch_add(3, Ordering::Relaxed);
    let c = drain(&pa);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].value.as_ref().unwrap().sum_u64(), Some(3));
    assert!(a.mark_changed(&k4(1)));
    assert_eq!(drain(&a).len(), 1);
}

/// A writer updating a key while the forwarder drains: once the writer stops, one more
/// drain gives the final value (clear-then-read never loses the last write).
#[test]
fn concurrent_writer_last_value_always_reaches_the_forwarder() {
    let s = Seg::new("trk", "race", &[def(MapType::Hash, 4, 8, 64, "h")]);
    let h = s.0.map("h").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let h = h.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) || i < 10_000 {
                    h.update(&k4(w * 8 + (i % 8) as u32), &i.to_le_bytes(), BPF_ANY)
                        .unwrap();
                    i += 1;
                }
                i
            })
        })
        .collect();
    let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut passes = 0;
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_millis(300) {
        h.drain_changes(|c| {
            let v = c.value.unwrap().sum_u64().unwrap();
            last.insert(c.key, v);
        });
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let totals: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    h.drain_changes(|c| {
        last.insert(c.key.clone(), c.value.unwrap().sum_u64().unwrap());
    });
    assert!(passes > 1);
    for e in h.iter() {
        assert_eq!(
            last.get(&e.key).copied(),
            e.value.sum_u64(),
            "forwarder's last copy differs for {:?} (writers did {totals:?})",
            e.key
        );
    }
}

/// A write through a pointer that lands after the forwarder read the lookup-marked entry is
/// picked up by the cursor's re-read on the next pass.
#[test]
fn cursor_rereads_entries_written_after_their_lookup() {
    let s = Seg::new("trk", "cursor", &[def(MapType::Hash, 4, 8, 8, "h")]);
    let h = s.0.map("h").unwrap();
    h.update(&k4(1), &0u64.to_le_bytes(), BPF_ANY).unwrap();
    let mut cur = ChangeCursor::new(2);
    let last = std::cell::RefCell::new(HashMap::new());
    let record = |c: Change| {
        last.borrow_mut()
            .insert(c.key.clone(), c.value.unwrap().sum_u64().unwrap());
    };
    cur.pass(&h, record);
    // The program looks up ... the forwarder passes ... then the program writes.
    let p = h.lookup(&k4(1)).unwrap().unwrap();
    cur.pass(&h, record);
    p.atomic_u64(0).unwrap().fetch_add(41, Ordering::Relaxed);
    assert_eq!(
        h.drain_changes(|_| {}),
        0,
        "no mark left for the late write"
    );
    assert_eq!(cur.pending_rechecks(), 1);
    cur.pass(&h, record);
    assert_eq!(last.borrow()[&k4(1).to_vec()], 41);
    cur.pass(&h, record);
    cur.pass(&h, record);
    assert_eq!(
        cur.pending_rechecks(),
        0,
        "rechecks expire after the grace passes"
    );
}
