//! Userspace maps against real kernel maps: the same seeded sequence of operations on a
//! shared-memory map and on a kernel map of the same shape (through the `sys` layer), with
//! every result (value or errno) and the final contents compared. The kernel is the reference
//! for "kernel semantics", not numbers written into the tests.

mod maps_common;

use std::os::fd::{AsFd, OwnedFd};

use bpftime_abi::sys::{self, MapCreate};
use bpftime_runtime::maps::{MapHandle, MapType, BPF_ANY, BPF_EXIST, BPF_F_LOCK, BPF_NOEXIST};
use bpftime_testutils::require_kernel;
use maps_common::*;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x6b65_726e_656c;

fn kernel_map(t: MapType, key: u32, value: u32, max: u32) -> OwnedFd {
    let name = sys::object_name("vs_kernel");
    sys::map_create(&MapCreate::new(t.as_raw(), &name, key, value, max)).expect("kernel map")
}

/// `Ok(value)`, `Ok(None)` for a missing key, or the errno.
type Outcome = Result<Option<Vec<u8>>, i32>;

fn user_lookup(m: &MapHandle, key: &[u8]) -> Outcome {
    match m.get(key) {
        Ok(Some(v)) => Ok(Some(match v {
            bpftime_runtime::maps::EntryValue::Single(v) => v,
            other => panic!("per-CPU value {other:?}"),
        })),
        Ok(None) => Ok(None),
        Err(e) => Err(e.errno()),
    }
}

fn kernel_lookup(fd: &OwnedFd, key: &[u8], value_size: usize) -> Outcome {
    let mut v = vec![0u8; value_size];
    match sys::map_lookup_elem(fd.as_fd(), key, &mut v, 0) {
        Ok(()) => Ok(Some(v)),
        Err(e) if e.errno() == libc::ENOENT => Ok(None),
        Err(e) => Err(e.errno()),
    }
}

fn status<E>(r: Result<(), E>, errno: impl Fn(&E) -> i32) -> i32 {
    r.err().map_or(0, |e| errno(&e))
}

/// Random updates (every flag, valid or not), deletes and lookups over twice the capacity's
/// keys; each result must be the kernel's.
fn keyed(t: MapType, max: u32, ops: usize) {
    let (ks, vs) = (4u32, 8u32);
    let seg = Seg::new("vs-kernel", t.name(), &[def(t, ks, vs, max, "m")]);
    let user = seg.0.map("m").unwrap();
    let kernel = kernel_map(t, ks, vs, max);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ u64::from(t.as_raw()));
    let flags = [BPF_ANY, BPF_NOEXIST, BPF_EXIST, 3, BPF_F_LOCK];
    let (mut refused, mut applied) = (0, 0);
    for op in 0..ops {
        let key = rng.random_range(0..2 * max).to_le_bytes();
        match rng.random_range(0..10) {
            0..=5 => {
                let value = rng.random::<u64>().to_le_bytes();
                let f = flags[rng.random_range(0..flags.len())];
                let u = status(user.update(&key, &value, f), |e| e.errno());
                let k = status(sys::map_update_elem(kernel.as_fd(), &key, &value, f), |e| {
                    e.errno()
                });
                assert_eq!(u, k, "{t:?} op {op}: update {key:?} flags {f}");
                if u == 0 {
                    applied += 1;
                } else {
                    refused += 1;
                }
            }
            6..=7 => {
                let u = status(user.delete(&key), |e| e.errno());
                let k = status(sys::map_delete_elem(kernel.as_fd(), &key), |e| e.errno());
                assert_eq!(u, k, "{t:?} op {op}: delete {key:?}");
            }
            _ => assert_eq!(
                user_lookup(&user, &key),
                kernel_lookup(&kernel, &key, vs as usize),
                "{t:?} op {op}: lookup {key:?}"
            ),
        }
    }
    for key in 0..2 * max {
        let key = key.to_le_bytes();
        assert_eq!(
            user_lookup(&user, &key),
            kernel_lookup(&kernel, &key, vs as usize),
            "{t:?} at the end: {key:?}"
        );
    }
    assert!(
        applied > 0 && refused > 0,
        "{t:?}: {applied} applied, {refused} refused"
    );
    println!("{t:?}: {ops} ops, {applied} updates applied, {refused} refused, all as the kernel");
}

/// Random pushes (every flag), pops and peeks on a QUEUE or STACK; each result the kernel's.
fn keyless(t: MapType, max: u32, ops: usize) {
    let vs = 8u32;
    let seg = Seg::new("vs-kernel", t.name(), &[def(t, 0, vs, max, "q")]);
    let user = seg.0.map("q").unwrap();
    let queue = user.as_queue().unwrap();
    let kernel = kernel_map(t, 0, vs, max);
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ u64::from(t.as_raw()));
    let flags = [BPF_ANY, BPF_EXIST, BPF_NOEXIST, 7];
    let mut full = 0;
    for op in 0..ops {
        match rng.random_range(0..10) {
            0..=5 => {
                let value = rng.random::<u64>().to_le_bytes();
                let f = flags[rng.random_range(0..flags.len())];
                let u = status(queue.push(&value, f), |e| e.errno());
                let k = status(sys::map_update_elem(kernel.as_fd(), &[], &value, f), |e| {
                    e.errno()
                });
                assert_eq!(u, k, "{t:?} op {op}: push flags {f}");
                full += usize::from(u == libc::E2BIG);
            }
            pop => {
                let mut kv = vec![0u8; vs as usize];
                let (u, k) = if pop <= 7 {
                    (
                        queue.pop().map_err(|e| e.errno()),
                        sys::map_lookup_and_delete_elem(kernel.as_fd(), &[], &mut kv),
                    )
                } else {
                    (
                        queue.peek().map_err(|e| e.errno()),
                        sys::map_lookup_elem(kernel.as_fd(), &[], &mut kv, 0),
                    )
                };
                let k = k.map(|()| kv).map_err(|e| e.errno());
                assert_eq!(
                    u,
                    k,
                    "{t:?} op {op}: {}",
                    if pop <= 7 { "pop" } else { "peek" }
                );
            }
        }
    }
    assert!(full > 0, "{t:?}: the map never filled up");
    println!("{t:?}: {ops} ops, {full} pushes refused as full, all as the kernel");
}

#[test]
fn hashes_and_arrays_behave_as_the_kernels() {
    if !require_kernel("hashes_and_arrays_behave_as_the_kernels") {
        return;
    }
    keyed(MapType::Hash, 64, 20_000);
    keyed(MapType::Array, 64, 20_000);
}

#[test]
fn queues_and_stacks_behave_as_the_kernels() {
    if !require_kernel("queues_and_stacks_behave_as_the_kernels") {
        return;
    }
    keyless(MapType::Queue, 16, 20_000);
    keyless(MapType::Stack, 16, 20_000);
}

/// Bloom filters with a zero seed against the kernel's: after the same pushes, the same
/// values test positive, false positives included (the bit count, the hashes and their
/// seeds are the kernel's). Word-sized values use `jhash2`, odd sizes `jhash`.
#[test]
fn bloom_filters_answer_as_the_kernels() {
    if !require_kernel("bloom_filters_answer_as_the_kernels") {
        return;
    }
    use bpftime_abi::flags::BPF_F_ZERO_SEED;
    for (value_size, max, hashes) in [(4u32, 100u32, 0u64), (6, 64, 3), (8, 1000, 1)] {
        let mut d = def(MapType::BloomFilter, 0, value_size, max, "bloom");
        d.flags = BPF_F_ZERO_SEED;
        d.map_extra = hashes;
        let seg = Seg::new("vs-kernel", &format!("bloom{value_size}"), &[d]);
        let user = seg.0.map("bloom").unwrap();
        let bloom = user.as_bloom_filter().unwrap();
        let name = sys::object_name("vs_bloom");
        let mut create = MapCreate::new(MapType::BloomFilter.as_raw(), &name, 0, value_size, max);
        create.map_flags = BPF_F_ZERO_SEED;
        create.map_extra = hashes;
        let kernel = sys::map_create(&create).expect("kernel bloom filter");
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ u64::from(value_size));
        let value = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
            (0..value_size).map(|_| rng.random::<u8>() & 0x3f).collect()
        };
        for _ in 0..max {
            let v = value(&mut rng);
            bloom.push(&v, BPF_ANY).unwrap();
            sys::map_update_elem(kernel.as_fd(), &[], &v, BPF_ANY).expect("kernel push");
        }
        let bad = status(bloom.push(&value(&mut rng), BPF_EXIST), |e| e.errno());
        let kbad = status(
            sys::map_update_elem(kernel.as_fd(), &[], &value(&mut rng), BPF_EXIST),
            |e| e.errno(),
        );
        assert_eq!(bad, kbad, "push with BPF_EXIST");
        let (mut positives, mut probes) = (0, 0);
        for _ in 0..5000 {
            let mut v = value(&mut rng);
            let u = status(bloom.peek(&v), |e| e.errno());
            let k = status(sys::map_lookup_elem(kernel.as_fd(), &[], &mut v, 0), |e| {
                e.errno()
            });
            assert_eq!(u, k, "peek of {v:?} (value size {value_size})");
            positives += usize::from(u == 0);
            probes += 1;
        }
        assert!(
            positives > 0 && positives < probes,
            "value size {value_size}: {positives} of {probes} positive"
        );
        println!(
            "bloom value {value_size}, {max} pushes, {} hashes: {positives}/{probes} positive, as \
             the kernel",
            if hashes == 0 { 5 } else { hashes }
        );
    }
}

/// STACK_TRACE maps from user space: lookups, deletes, updates and key iteration, with each
/// errno the kernel's (stacks themselves come from programs; see
/// examples/programs/tests/stacks.rs for those against kernel uprobes).
#[test]
fn stack_trace_maps_answer_syscalls_as_the_kernels() {
    if !require_kernel("stack_trace_maps_answer_syscalls_as_the_kernels") {
        return;
    }
    let seg = Seg::new(
        "vs-kernel",
        "stacks",
        &[def(MapType::StackTrace, 4, 32, 6, "st")],
    );
    let user = seg.0.map("st").unwrap();
    let kernel = kernel_map(MapType::StackTrace, 4, 32, 6);
    for id in [0u32, 5, 7, 8, 1000] {
        let key = id.to_le_bytes();
        assert_eq!(
            user_lookup(&user, &key),
            kernel_lookup(&kernel, &key, 32),
            "lookup {id}"
        );
        assert_eq!(
            status(user.delete(&key), |e| e.errno()),
            status(sys::map_delete_elem(kernel.as_fd(), &key), |e| e.errno()),
            "delete {id}"
        );
        assert_eq!(
            status(user.update(&key, &[0; 32], BPF_ANY), |e| e.errno()),
            status(
                sys::map_update_elem(kernel.as_fd(), &key, &[0; 32], BPF_ANY),
                |e| { e.errno() }
            ),
            "update {id}"
        );
        let mut next = [0u8; 4];
        let k = sys::map_get_next_key(kernel.as_fd(), Some(&key), &mut next)
            .map(|()| Some(next.to_vec()))
            .or_else(|e| {
                if e.errno() == libc::ENOENT {
                    Ok(None)
                } else {
                    Err(e.errno())
                }
            });
        assert_eq!(
            user.next_key(Some(&key)).map_err(|e| e.errno()),
            k,
            "next key of {id}"
        );
    }
}

/// LPM tries against the kernel's: random updates (every flag, prefixes beyond the data
/// included), deletes, longest-prefix lookups and GET_NEXT_KEY steps on 16-bit keys, until
/// the trie fills; every result and errno, and the whole key order, must be the kernel's.
#[test]
fn lpm_tries_answer_as_the_kernels() {
    if !require_kernel("lpm_tries_answer_as_the_kernels") {
        return;
    }
    use bpftime_abi::flags::BPF_F_NO_PREALLOC;
    let (key_size, value_size, max) = (6u32, 8u32, 16u32);
    let mut d = def(MapType::LpmTrie, key_size, value_size, max, "lpm");
    d.flags = BPF_F_NO_PREALLOC;
    let seg = Seg::new("vs-kernel", "lpm", &[d]);
    let user = seg.0.map("lpm").unwrap();
    let name = sys::object_name("vs_lpm");
    let mut create = MapCreate::new(MapType::LpmTrie.as_raw(), &name, key_size, value_size, max);
    create.map_flags = BPF_F_NO_PREALLOC;
    let kernel = sys::map_create(&create).expect("kernel LPM trie");
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ 0x1b);
    let key = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
        // Few distinct bits, so prefixes nest and collide; prefixes up to 17 (> 16 bits).
        let len: u32 = rng.random_range(0..=17);
        let data = [rng.random::<u8>() & 0xc3, rng.random::<u8>() & 0x81];
        let mut k = len.to_le_bytes().to_vec();
        k.extend_from_slice(&data);
        k
    };
    let kernel_next = |k: Option<&[u8]>| -> Result<Option<Vec<u8>>, i32> {
        let mut next = vec![0u8; key_size as usize];
        match sys::map_get_next_key(kernel.as_fd(), k, &mut next) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e.errno()),
        }
    };
    let flags = [BPF_ANY, BPF_NOEXIST, BPF_EXIST, 4];
    let (mut full, mut found) = (0, 0);
    for op in 0..20_000 {
        let k = key(&mut rng);
        match rng.random_range(0..10) {
            0..=3 => {
                let v = rng.random::<u64>().to_le_bytes();
                let f = flags[rng.random_range(0..flags.len())];
                let u = status(user.update(&k, &v, f), |e| e.errno());
                let kr = status(sys::map_update_elem(kernel.as_fd(), &k, &v, f), |e| {
                    e.errno()
                });
                assert_eq!(u, kr, "op {op}: update {k:?} flags {f}");
                full += usize::from(u == libc::ENOSPC);
            }
            4..=5 => {
                let u = status(user.delete(&k), |e| e.errno());
                let kr = status(sys::map_delete_elem(kernel.as_fd(), &k), |e| e.errno());
                assert_eq!(u, kr, "op {op}: delete {k:?}");
            }
            6..=7 => {
                let u = user_lookup(&user, &k);
                assert_eq!(
                    u,
                    kernel_lookup(&kernel, &k, value_size as usize),
                    "op {op}: lookup {k:?}"
                );
                found += usize::from(matches!(u, Ok(Some(_))));
            }
            _ => {
                let from = rng.random_bool(0.2).then_some(k.as_slice());
                let u = user.next_key(from).map_err(|e| e.errno());
                assert_eq!(u, kernel_next(from), "op {op}: next key of {from:?}");
            }
        }
    }
    let walk = |next: &dyn Fn(Option<&[u8]>) -> Outcome| {
        let mut keys = Vec::new();
        let mut at: Option<Vec<u8>> = None;
        while let Ok(Some(k)) = next(at.as_deref()) {
            keys.push(k.clone());
            at = Some(k);
        }
        keys
    };
    let user_order = walk(&|k| user.next_key(k).map_err(|e| e.errno()));
    assert_eq!(user_order, walk(&kernel_next), "the whole key order");
    assert!(
        full > 0 && found > 0,
        "the trie filled ({full}) and lookups matched ({found})"
    );
    println!("lpm: 20000 ops, {full} refused as full, {found} lookups found, all as the kernel");
}
