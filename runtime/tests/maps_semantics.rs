//! Single-process semantics of every map type, errnos as the kernel's.

mod maps_common;

use bpftime_runtime::maps::*;
use maps_common::*;
use std::sync::atomic::Ordering;

fn errno<T: std::fmt::Debug>(r: Result<T, MapError>) -> i32 {
    r.expect_err("expected an error").errno()
}

#[test]
fn hash_flags_and_errnos() {
    let o = Seg::new("sem", "hash", &[def(MapType::Hash, 4, 8, 4, "h")]);
    let m = o.0.map("h").unwrap();
    let v = 7u64.to_le_bytes();
    m.update(&k4(1), &v, BPF_NOEXIST).unwrap();
    assert_eq!(errno(m.update(&k4(1), &v, BPF_NOEXIST)), libc::EEXIST);
    assert_eq!(errno(m.update(&k4(2), &v, BPF_EXIST)), libc::ENOENT);
    assert_eq!(errno(m.update(&k4(2), &v, 3)), libc::EINVAL);
    assert_eq!(errno(m.update(&k4(2), &v, BPF_F_LOCK)), libc::EINVAL);
    for i in 2..=4 {
        m.update(&k4(i), &v, BPF_ANY).unwrap();
    }
    assert_eq!(m.len(), 4);
    let e = m.update(&k4(5), &v, BPF_ANY).unwrap_err();
    assert_eq!(e.errno(), libc::E2BIG);
    assert!(e.to_string().contains("`h`"), "error names the map: {e}");
    // Updating an existing key of a full map works; NOEXIST still says EEXIST first.
    m.update(&k4(4), &9u64.to_le_bytes(), BPF_EXIST).unwrap();
    assert_eq!(errno(m.update(&k4(4), &v, BPF_NOEXIST)), libc::EEXIST);
    assert_eq!(
        m.get(&k4(4)).unwrap(),
        Some(EntryValue::Single(9u64.to_le_bytes().to_vec()))
    );
    assert_eq!(errno(m.delete(&k4(9))), libc::ENOENT);
    m.delete(&k4(3)).unwrap();
    assert!(m.lookup(&k4(3)).unwrap().is_none());
    m.update(&k4(5), &v, BPF_NOEXIST).unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(errno(m.lookup(&[1, 2])), libc::EINVAL);
    assert_eq!(errno(m.update(&k4(1), &[0; 4], BPF_ANY)), libc::EINVAL);
    assert_eq!(m.counters().full, 1);
    assert_eq!(m.counters().deletes, 1);

    // Counters through the handed-out pointer, as programs do.
    let p = m.lookup(&k4(1)).unwrap().unwrap();
    for _ in 0..10 {
        p.atomic_u64(0).unwrap().fetch_add(1, Ordering::Relaxed);
    }
    assert_eq!(m.get(&k4(1)).unwrap().unwrap().sum_u64(), Some(17));
    let mut keys: Vec<u32> = m
        .iter()
        .iter()
        .map(|e| u32::from_le_bytes(e.key[..].try_into().unwrap()))
        .collect();
    keys.sort();
    assert_eq!(keys, vec![1, 2, 4, 5]);
}

#[test]
fn hash_many_keys_and_odd_key_sizes() {
    let o = Seg::new("sem", "hash-many", &[def(MapType::Hash, 13, 3, 5000, "h")]);
    let m = o.0.map(0usize).unwrap();
    let key = |i: u32| {
        let mut k = [0xa5u8; 13];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k[12] = i as u8;
        k
    };
    for i in 0..5000 {
        m.update(&key(i), &[i as u8, 1, 2], BPF_NOEXIST).unwrap();
    }
    assert_eq!(errno(m.update(&key(5000), &[0; 3], BPF_ANY)), libc::E2BIG);
    for i in (0..5000).step_by(2) {
        m.delete(&key(i)).unwrap();
    }
    for i in 0..5000 {
        let got = m.get(&key(i)).unwrap();
        if i % 2 == 0 {
            assert!(got.is_none());
        } else {
            assert_eq!(got, Some(EntryValue::Single(vec![i as u8, 1, 2])));
        }
    }
    for i in 5000..7500 {
        m.update(&key(i), &[0; 3], BPF_NOEXIST).unwrap();
    }
    assert_eq!(m.len(), 5000);
    assert_eq!(m.iter().len(), 5000);
}

#[test]
fn array_semantics() {
    let o = Seg::new("sem", "array", &[def(MapType::Array, 4, 12, 10, "a")]);
    let m = o.0.map("a").unwrap();
    assert!(m.lookup(&k4(10)).unwrap().is_none());
    let p = m.lookup(&k4(3)).unwrap().unwrap();
    assert_eq!(p.read(), vec![0; 12]);
    m.update(&k4(3), &[1; 12], BPF_ANY).unwrap();
    m.update(&k4(3), &[2; 12], BPF_EXIST).unwrap();
    assert_eq!(p.read(), vec![2; 12]);
    assert_eq!(errno(m.update(&k4(3), &[1; 12], BPF_NOEXIST)), libc::EEXIST);
    assert_eq!(errno(m.update(&k4(10), &[1; 12], BPF_ANY)), libc::E2BIG);
    assert_eq!(errno(m.update(&k4(1), &[1; 12], 7)), libc::EINVAL);
    assert_eq!(errno(m.delete(&k4(1))), libc::EINVAL);
    assert_eq!(m.iter().len(), 10);
    // Values are 8-byte aligned for atomics.
    assert_eq!(p.as_ptr() as usize % 8, 0);
}

#[test]
fn percpu_maps_sum_over_cpus() {
    let o = Seg::new(
        "sem",
        "percpu",
        &[
            def(MapType::PercpuArray, 4, 8, 4, "pa"),
            def(MapType::PercpuHash, 8, 4, 16, "ph"),
        ],
    );
    let ncpu = o.0.ncpu();
    assert_eq!(ncpu, possible_cpus());
    let pa = o.0.map("pa").unwrap();
    for cpu in 0..ncpu {
        let p = pa.lookup_cpu(&k4(1), cpu).unwrap().unwrap();
        p.atomic_u64(0)
            .unwrap()
            .fetch_add(u64::from(cpu) + 1, Ordering::Relaxed);
    }
    let p = pa.lookup(&k4(1)).unwrap().unwrap();
    p.atomic_u64(0).unwrap().fetch_add(100, Ordering::Relaxed);
    let v = pa.get(&k4(1)).unwrap().unwrap();
    let n = u64::from(ncpu);
    assert_eq!(v.sum_u64(), Some(n * (n + 1) / 2 + 100));
    match &v {
        EntryValue::PerCpu(vs) => assert_eq!(vs.len(), ncpu as usize),
        _ => panic!("per-CPU value expected"),
    }
    assert_eq!(errno(pa.lookup_cpu(&k4(1), ncpu)), libc::EINVAL);

    let ph = o.0.map("ph").unwrap();
    // The program's form writes the current CPU's slot and zeroes the others.
    ph.update(&7u64.to_le_bytes(), &5u32.to_le_bytes(), BPF_ANY)
        .unwrap();
    assert_eq!(
        ph.get(&7u64.to_le_bytes()).unwrap().unwrap().sum_u64(),
        Some(5)
    );
    // The syscall form: ncpu values padded to 8 bytes.
    let mut all = vec![0u8; 8 * ncpu as usize];
    for c in 0..ncpu as usize {
        all[c * 8..c * 8 + 4].copy_from_slice(&(c as u32 + 10).to_le_bytes());
    }
    ph.update_percpu(&8u64.to_le_bytes(), &all, BPF_NOEXIST)
        .unwrap();
    let expect: u64 = (0..u64::from(ncpu)).map(|c| c + 10).sum();
    assert_eq!(
        ph.get(&8u64.to_le_bytes()).unwrap().unwrap().sum_u64(),
        Some(expect)
    );
    assert_eq!(
        errno(ph.update_percpu(&9u64.to_le_bytes(), &all[..4], BPF_ANY)),
        libc::EINVAL
    );
}

#[test]
fn lru_evicts_instead_of_failing() {
    let o = Seg::new("sem", "lru", &[def(MapType::LruHash, 4, 8, 8, "l")]);
    let m = o.0.map("l").unwrap();
    for i in 0..8 {
        m.update(&k4(i), &[0; 8], BPF_NOEXIST).unwrap();
    }
    for i in 100..164 {
        // Key 0 is hot: looked up before every insert, so the clock keeps sparing it.
        assert!(
            m.lookup(&k4(0)).unwrap().is_some(),
            "hot key evicted at {i}"
        );
        m.update(&k4(i), &[1; 8], BPF_ANY).unwrap();
        assert!(m.get(&k4(i)).unwrap().is_some());
        assert_eq!(m.len(), 8);
    }
    assert!(m.counters().evictions >= 56);
    assert_eq!(m.iter().len(), 8);
    // LRU still honours the flags.
    assert_eq!(errno(m.update(&k4(0), &[0; 8], BPF_NOEXIST)), libc::EEXIST);
    assert_eq!(errno(m.update(&k4(5000), &[0; 8], BPF_EXIST)), libc::ENOENT);
}

#[test]
fn queue_and_stack() {
    let o = Seg::new(
        "sem",
        "qs",
        &[
            def(MapType::Queue, 0, 4, 3, "q"),
            def(MapType::Stack, 0, 4, 3, "s"),
        ],
    );
    for (name, fifo) in [("q", true), ("s", false)] {
        let m = o.0.map(name).unwrap();
        assert_eq!(errno(m.as_queue().unwrap().pop()), libc::ENOENT);
        assert_eq!(errno(m.as_queue().unwrap().peek()), libc::ENOENT);
        for i in 1..=3u32 {
            m.as_queue()
                .unwrap()
                .push(&i.to_le_bytes(), BPF_ANY)
                .unwrap();
        }
        assert_eq!(
            errno(m.as_queue().unwrap().push(&4u32.to_le_bytes(), BPF_ANY)),
            libc::E2BIG
        );
        assert_eq!(
            errno(m.as_queue().unwrap().push(&4u32.to_le_bytes(), BPF_NOEXIST)),
            libc::EINVAL
        );
        // BPF_EXIST on a full map drops the oldest value.
        m.as_queue()
            .unwrap()
            .push(&4u32.to_le_bytes(), BPF_EXIST)
            .unwrap();
        assert_eq!(m.len(), 3);
        let order: Vec<u32> = m
            .iter()
            .iter()
            .map(|e| match &e.value {
                EntryValue::Single(v) => u32::from_le_bytes(v[..].try_into().unwrap()),
                _ => unreachable!(),
            })
            .collect();
        let expect = if fifo { vec![2, 3, 4] } else { vec![4, 3, 2] };
        assert_eq!(order, expect);
        assert_eq!(
            m.as_queue().unwrap().peek().unwrap(),
            expect[0].to_le_bytes()
        );
        for want in expect {
            assert_eq!(m.as_queue().unwrap().pop().unwrap(), want.to_le_bytes());
        }
        assert_eq!(errno(m.as_queue().unwrap().pop()), libc::ENOENT);
        // update() on a queue is a push, lookups hand out nothing.
        m.update(&[], &9u32.to_le_bytes(), BPF_ANY).unwrap();
        assert_eq!(m.as_queue().unwrap().pop().unwrap(), 9u32.to_le_bytes());
        assert_eq!(errno(m.lookup(&[])), libc::ENOTSUP);
    }
}

#[test]
fn prog_array_slots() {
    let o = Seg::new("sem", "prog", &[def(MapType::ProgArray, 4, 4, 4, "jmp")]);
    let m = o.0.map("jmp").unwrap();
    assert_eq!(m.as_prog_array().unwrap().get(0), None);
    m.update(&k4(2), &7u32.to_le_bytes(), BPF_ANY).unwrap();
    assert_eq!(m.as_prog_array().unwrap().get(2), Some(7));
    assert_eq!(
        errno(m.update(&k4(2), &7u32.to_le_bytes(), BPF_NOEXIST)),
        libc::EINVAL
    );
    assert_eq!(
        errno(m.update(&k4(4), &7u32.to_le_bytes(), BPF_ANY)),
        libc::E2BIG
    );
    assert_eq!(m.iter().len(), 1);
    m.delete(&k4(2)).unwrap();
    assert_eq!(errno(m.delete(&k4(2))), libc::ENOENT);
    assert_eq!(errno(m.delete(&k4(9))), libc::EINVAL);
    assert_eq!(m.as_prog_array().unwrap().get(2), None);
}

#[test]
fn ringbuf_reserve_submit_discard_output_wrap() {
    let o = Seg::new("sem", "rb", &[def(MapType::Ringbuf, 0, 0, 4096, "rb")]);
    let m = o.0.map("rb").unwrap();
    let mut c = RingBufConsumer::new(&m).unwrap();
    assert!(
        m.as_ringbuf().unwrap().reserve(8, 1).is_none(),
        "flags must be 0"
    );
    assert!(
        m.as_ringbuf().unwrap().reserve(4096, 0).is_none(),
        "larger than the ring"
    );
    let p = m.as_ringbuf().unwrap().reserve(5, 0).unwrap();
    // SAFETY: 5 reserved bytes.
    unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), p, 5) };
    let d = m.as_ringbuf().unwrap().reserve(3, 0).unwrap();
    // A BUSY record blocks the ones behind it until submitted.
    m.as_ringbuf().unwrap().output(b"after", 0).unwrap();
    assert_eq!(c.poll(|_| panic!("record still busy")), 0);
    m.as_ringbuf().unwrap().submit(p, 0).unwrap();
    let mut got = Vec::new();
    c.poll(|r| got.push(r.data.to_vec()));
    assert_eq!(got, vec![b"hello".to_vec()]);
    m.as_ringbuf().unwrap().discard(d, 0).unwrap();
    assert_eq!(
        errno(m.as_ringbuf().unwrap().submit(d, 0)),
        libc::EINVAL,
        "double commit"
    );
    got.clear();
    c.poll(|r| got.push(r.data.to_vec()));
    assert_eq!(got, vec![b"after".to_vec()]);
    assert_eq!(errno(m.as_ringbuf().unwrap().output(b"x", 8)), libc::EINVAL);

    // Many records of varying size, several times around the ring, including wrapping ones.
    let mut next = 0u32;
    let mut expect = 0u32;
    for round in 0..2000u32 {
        let len = 1 + (round * 37 % 300) as usize;
        let rec: Vec<u8> = (0..len).map(|i| (next as usize + i) as u8).collect();
        if m.as_ringbuf().unwrap().output(&rec, 0).is_ok() {
            next += 1;
        } else {
            // Full: drain and retry once.
            c.poll(|r| {
                assert_eq!(r.data[0], expect as u8);
                expect += 1;
            });
            m.as_ringbuf().unwrap().output(&rec, 0).unwrap();
            next += 1;
        }
    }
    c.poll(|r| {
        assert_eq!(r.data[0], expect as u8);
        expect += 1;
    });
    assert_eq!(expect, next);
    assert!(m.counters().lost > 0, "the ring was full at times");
    assert_eq!(m.as_ringbuf().unwrap().pending(), 0);
}

#[test]
fn perf_event_array_per_cpu_rings() {
    let o = Seg::new(
        "sem",
        "perf",
        &[def(MapType::PerfEventArray, 4, 4, 0, "events")],
    );
    let m = o.0.map("events").unwrap();
    assert_eq!(m.def().max_entries, o.0.ncpu());
    m.as_perf_event_array()
        .unwrap()
        .output(BPF_F_CURRENT_CPU, b"abc")
        .unwrap();
    m.as_perf_event_array()
        .unwrap()
        .output(0, b"on cpu0")
        .unwrap();
    assert_eq!(
        errno(
            m.as_perf_event_array()
                .unwrap()
                .output(u64::from(o.0.ncpu()), b"x")
        ),
        libc::E2BIG
    );
    assert_eq!(
        errno(m.as_perf_event_array().unwrap().output(1 << 40, b"x")),
        libc::EINVAL
    );
    let mut c = RingBufConsumer::new(&m).unwrap();
    let mut got = Vec::new();
    c.poll(|r| got.push((r.ring, r.data.to_vec())));
    assert_eq!(got.len(), 2);
    assert!(got.iter().any(|(ring, d)| *ring == 0 && d == b"on cpu0"));
    assert!(got.iter().any(|(_, d)| d == b"abc"));
}

#[test]
fn definitions_are_validated() {
    let name = format!("test-sem-{}-bad", std::process::id());
    let bad = [
        def(MapType::Ringbuf, 0, 0, 5000, "rb"),
        def(MapType::Hash, 0, 8, 1, "h"),
        def(MapType::Array, 8, 8, 1, "a"),
        def(MapType::Queue, 4, 8, 1, "q"),
        def(MapType::ProgArray, 4, 8, 1, "p"),
        // A map of maps without its inner-map template, and a template on a plain array.
        def(MapType::ArrayOfMaps, 4, 4, 2, "aom"),
        MapDef {
            inner: Some(InnerMapDef::of(&def(MapType::Array, 4, 8, 1, "t"))),
            ..def(MapType::Array, 4, 8, 1, "tmpl")
        },
    ];
    for d in bad {
        let e = ShmObject::create(&name, std::slice::from_ref(&d))
            .err()
            .expect("invalid");
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains(&format!("`{}`", d.name)), "{e}");
    }
    let dup = [
        def(MapType::Array, 4, 4, 1, "a"),
        def(MapType::Array, 4, 4, 1, "a"),
    ];
    let e = ShmObject::create(&name, &dup)
        .err()
        .expect("duplicate names");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(
        e.to_string().contains("map `a`") && e.to_string().contains("duplicate map name"),
        "{e}"
    );
    assert!(ShmObject::open(&name).is_err(), "nothing was created");
    let e = ShmObject::create("../etc", &[]).err().expect("a path");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(
        e.to_string().contains("invalid object name \"../etc\""),
        "{e}"
    );
    assert!(
        !std::path::Path::new("/dev/shm/bpftime-rs.../etc.shm").exists()
            && !std::path::Path::new("/dev/etc.shm").exists(),
        "no file outside /dev/shm"
    );
    assert_eq!(MapType::from_raw(27), Some(MapType::Ringbuf));
    assert_eq!(MapType::from_raw(12), Some(MapType::ArrayOfMaps));
    assert_eq!(MapType::from_raw(14), None, "DEVMAP");
}

#[test]
fn segments_list_open_remove() {
    let defs = [
        def(MapType::Hash, 4, 4, 16, "h"),
        def(MapType::Array, 4, 4, 2, "a"),
    ];
    let o = Seg::new("sem", "seg", &defs);
    let name = o.0.object_name().to_string();
    assert!(std::path::Path::new(&format!("/dev/shm/bpftime-rs.{name}.shm")).exists());
    assert_eq!(
        ShmObject::create(&name, &defs).err().unwrap().errno(),
        libc::EEXIST
    );
    let again = ShmObject::open_or_create(&name, &defs).unwrap();
    assert!(!again.is_creator());
    again
        .map("h")
        .unwrap()
        .update(&k4(1), &k4(2), BPF_ANY)
        .unwrap();
    assert!(o.0.map("h").unwrap().get(&k4(1)).unwrap().is_some());
    let e = ShmObject::open_or_create(&name, &defs[..1])
        .err()
        .expect("other maps");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(
        e.to_string().contains(&format!("object `{name}`"))
            && e.to_string()
                .contains("an existing segment has different maps"),
        "{e}"
    );
    let segs = list_segments().unwrap();
    let me = segs.iter().find(|s| s.object == name).expect("listed");
    assert_eq!(me.owner_uid, euid());
    assert_eq!(me.identity, Some(o.0.identity()));
    assert_eq!(again.identity(), o.0.identity());
    assert_eq!(again.map_defs(), o.0.map_defs());
    // Created for the loader's user alone: never world-writable, whatever the umask.
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(&me.path).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "segment mode {mode:o}");
    // The manifest's identity check: the same name with another inode is refused.
    let other = SegmentIdentity {
        ino: o.0.identity().ino + 1,
        ..o.0.identity()
    };
    let e = ShmObject::open_expect(&name, &other, &defs).err().unwrap();
    assert!(
        e.to_string().contains("not the segment the loader created"),
        "{e}"
    );
    // ... and so are map definitions other than the loader's.
    let mut wider = defs.to_vec();
    wider[0].value_size = 8;
    let e = ShmObject::open_expect(&name, &o.0.identity(), &wider)
        .err()
        .unwrap();
    assert!(e.to_string().contains("in the loader's definition"), "{e}");
    assert!(ShmObject::open_expect(&name, &o.0.identity(), &defs).is_ok());
    let e = o.0.map("nope").unwrap_err();
    assert!(e.to_string().contains(&name));
    remove_object(&name).unwrap();
    assert_eq!(ShmObject::open(&name).err().unwrap().errno(), libc::ENOENT);
    // Existing mappings stay usable after unlink.
    assert!(again.map("h").unwrap().get(&k4(1)).unwrap().is_some());
}

#[test]
fn queue_pushes_since_for_the_forwarder() {
    let o = Seg::new(
        "sem",
        "qseq",
        &[
            def(MapType::Queue, 0, 4, 4, "q"),
            def(MapType::Stack, 0, 4, 4, "s"),
        ],
    );
    for name in ["q", "s"] {
        let m = o.0.map(name).unwrap();
        let (none, mut next) = m.as_queue().unwrap().pushes_since(0).unwrap();
        assert!(none.is_empty());
        assert_eq!(next, 0);
        m.as_queue().unwrap().push(&k4(1), BPF_ANY).unwrap();
        m.as_queue().unwrap().push(&k4(2), BPF_ANY).unwrap();
        let (got, n) = m.as_queue().unwrap().pushes_since(next).unwrap();
        assert_eq!(
            got.iter().map(|p| p.value.clone()).collect::<Vec<_>>(),
            vec![k4(1).to_vec(), k4(2).to_vec()]
        );
        next = n;
        m.as_queue().unwrap().pop().unwrap();
        m.as_queue().unwrap().push(&k4(3), BPF_ANY).unwrap();
        let (got, n) = m.as_queue().unwrap().pushes_since(next).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].value, k4(3));
        assert_eq!(got[0].seq, 2);
        assert_eq!(n, 3);
    }
}

#[test]
fn unmarked_lookup_and_corrupt_segment_rejected() {
    let o = Seg::new("sem", "corrupt", &[def(MapType::Hash, 4, 8, 8, "h")]);
    let h = o.0.map("h").unwrap();
    h.update(&k4(1), &[1; 8], BPF_ANY).unwrap();
    h.drain_changes(|_| {});
    let p = h.lookup_unmarked(&k4(1), 0).unwrap().unwrap();
    assert_eq!(p.read(), vec![1; 8]);
    assert!(!h.has_changes(), "unmarked lookups leave no mark");
    // Flip a geometry field in the file: opening must refuse it rather than follow it.
    let path = format!("/dev/shm/bpftime-rs.{}.shm", o.0.object_name());
    let bytes = std::fs::read(&path).unwrap();
    // Find the first map region's geometry by its map type,
    // key size and value size words (1, 4, 8) at a page boundary.
    let pg = 4096;
    let off = (0..bytes.len() / pg)
        .map(|i| i * pg)
        .rev()
        .find(|&o| bytes[o..o + 12] == [1, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0])
        .expect("geometry found");
    // In place: truncating a mapped segment (fs::write) would SIGBUS concurrent readers,
    // such as list_segments() in a parallel test.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[bytes[off + 32] ^ 0x40], (off + 32) as u64) // n_buckets
        .unwrap();
    let e = ShmObject::open(o.0.object_name()).err().expect("corrupt");
    assert!(e.to_string().contains("geometry"), "{e}");
}

#[test]
fn typed_views_check_the_type_once_and_refuse_others() {
    let defs = [
        def(MapType::Hash, 4, 8, 4, "h"),
        def(MapType::LruPercpuHash, 4, 8, 4, "lru"),
        def(MapType::PercpuArray, 4, 8, 4, "a"),
        def(MapType::ProgArray, 4, 4, 4, "jmp"),
        def(MapType::Stack, 0, 8, 4, "s"),
        def(MapType::Ringbuf, 0, 0, 4096, "rb"),
        def(MapType::PerfEventArray, 4, 4, 0, "perf"),
        def(MapType::StackTrace, 4, 64, 4, "stacks"),
        def(MapType::BloomFilter, 0, 8, 16, "bloom"),
        def(MapType::CgroupArray, 4, 4, 2, "cgroups"),
        MapDef {
            flags: bpftime_abi::flags::BPF_F_NO_PREALLOC,
            ..def(MapType::LpmTrie, 8, 8, 4, "lpm")
        },
    ];
    let o = Seg::new("sem", "typed", &defs);
    let family = |name: &str| match o.0.map(name).unwrap().typed() {
        MapRef::Hash(_) => "hash",
        MapRef::Array(_) => "array",
        MapRef::ProgArray(_) => "prog_array",
        MapRef::Queue(_) => "queue",
        MapRef::RingBuf(_) => "ringbuf",
        MapRef::PerfEventArray(_) => "perf",
        MapRef::StackTrace(_) => "stack_trace",
        MapRef::BloomFilter(_) => "bloom_filter",
        MapRef::CgroupArray(_) => "cgroup_array",
        MapRef::LpmTrie(_) => "lpm_trie",
    };
    let families: Vec<_> = defs.iter().map(|d| family(&d.name)).collect();
    assert_eq!(
        families,
        [
            "hash",
            "hash",
            "array",
            "prog_array",
            "queue",
            "ringbuf",
            "perf",
            "stack_trace",
            "bloom_filter",
            "cgroup_array",
            "lpm_trie"
        ]
    );

    let h = o.0.map("h").unwrap();
    let e = QueueMap::try_from(h.clone()).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(e.to_string(), "map `h`: is a hash, not a queue or stack");
    assert!(h.as_queue().is_none() && h.as_ringbuf().is_none() && h.as_array().is_none());
    let e = <&RingBuf>::try_from(&o.0.map("s").unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "map `s`: is a stack, not a ringbuf");

    // A view is the map: operations through it and through the handle see each other.
    let stack = QueueMap::try_from(o.0.map("s").unwrap()).unwrap();
    stack.push(&5u64.to_le_bytes(), BPF_ANY).unwrap();
    assert_eq!(o.0.map("s").unwrap().len(), 1);
    let hash = HashMap::try_from(h.clone()).unwrap();
    h.update(&k4(1), &3u64.to_le_bytes(), BPF_ANY).unwrap();
    let p = hash.lookup_ptr(&k4(1)).expect("the handle's entry");
    // SAFETY: the value of a live entry, 8 bytes in the mapping `hash` keeps alive.
    assert_eq!(unsafe { (p as *const u64).read_unaligned() }, 3);
    assert!(
        hash.lookup_ptr(&[1, 2]).is_none(),
        "a short key finds nothing"
    );
}

/// A consumer sleeping in `wait_for_records` is woken by the next commit (from another thread
/// here; processes share the word the same way), returns at once when records wait, and
/// otherwise sleeps until its timeout.
#[test]
fn ringbuf_consumer_sleeps_until_a_commit_wakes_it() {
    use std::time::{Duration, Instant};
    let o = Seg::new("sem", "rbwake", &[def(MapType::Ringbuf, 0, 0, 4096, "rb")]);
    let m = o.0.map("rb").unwrap();
    // Nothing comes: the whole timeout passes.
    let t = Instant::now();
    m.wait_for_records(Duration::from_millis(100));
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );
    // A commit 50 ms into a 20 s wait ends it.
    let producer = {
        let m = m.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            m.as_ringbuf().unwrap().output(b"wake", 0).unwrap();
        })
    };
    let t = Instant::now();
    m.wait_for_records(Duration::from_secs(20));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the commit did not wake the consumer ({:?})",
        t.elapsed()
    );
    producer.join().unwrap();
    // A record is waiting: no sleep at all.
    let t = Instant::now();
    m.wait_for_records(Duration::from_secs(20));
    assert!(t.elapsed() < Duration::from_secs(10));
    let mut c = RingBufConsumer::new(&m).unwrap();
    let mut got = Vec::new();
    c.poll(|r| got.push(r.data.to_vec()));
    assert_eq!(got, vec![b"wake".to_vec()]);
}

/// A target with the segment mapped writes an LPM entry's prefix length past what the key
/// holds: readers (lookups, GET_NEXT_KEY, the listing) index the key's bits up to that
/// length, so they must treat the slot as no entry rather than read past the key.
#[test]
fn an_lpm_prefix_length_written_past_the_key_is_no_entry() {
    let mut d = def(MapType::LpmTrie, 8, 8, 4, "lpm");
    d.flags = bpftime_abi::flags::BPF_F_NO_PREALLOC;
    let o = Seg::new("sem", "lpmhostile", &[d]);
    let m = o.0.map("lpm").unwrap();
    let lpm = m.as_lpm_trie().unwrap();
    let key = |len: u32, a: [u8; 4]| {
        let mut k = len.to_le_bytes().to_vec();
        k.extend_from_slice(&a);
        k
    };
    m.update(&key(24, [10, 1, 2, 0]), &1u64.to_le_bytes(), 0)
        .unwrap();
    m.update(&key(8, [10, 0, 0, 0]), &2u64.to_le_bytes(), 0)
        .unwrap();
    lpm.debug_overwrite_prefixlen(&key(24, [10, 1, 2, 0]), 40_000);
    // The listing, the iteration and lookups see the other entry only.
    let entries = m.iter();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].key, key(8, [10, 0, 0, 0]));
    assert_eq!(m.next_key(None).unwrap(), Some(key(8, [10, 0, 0, 0])));
    assert_eq!(m.next_key(Some(&key(8, [10, 0, 0, 0]))).unwrap(), None);
    assert_eq!(
        m.get(&key(32, [10, 1, 2, 3])).unwrap(),
        Some(EntryValue::Single(2u64.to_le_bytes().to_vec())),
        "the /8 matches; the overwritten /24 does not"
    );
}
