//! Map values with a `struct bpf_spin_lock` (`spin_lock.bpf.c`): `BPF_F_LOCK` lookups and
//! updates from user space answer as the kernel's on the same object (errnos, in-place
//! updates, the lock reading 0 in every copy), and a copy taken with `BPF_F_LOCK` never tears
//! while programs bump both counters of a value under its lock: on the kernel (two threads of
//! BPF_PROG_TEST_RUN) and on our JIT (two threads running the program), with every bump counted.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use bpftime_example_programs::object_path;
use bpftime_runtime::loaded::{LoadOptions, LoadedObject};
use bpftime_runtime::maps::{EntryValue, MapHandle, BPF_ANY, BPF_EXIST, BPF_F_LOCK, BPF_NOEXIST};
use bpftime_testutils::{error_chain, require_kernel};
use libbpf_rs::MapCore;

/// `struct pair { u64 a; struct bpf_spin_lock lock; u64 b; }` with `lock` holding `lock`.
fn pair(a: u64, lock: u32, b: u64) -> Vec<u8> {
    let mut v = a.to_le_bytes().to_vec();
    v.extend_from_slice(&lock.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&b.to_le_bytes());
    v
}

/// What one operation answered: the value copied out, or the errno.
type Outcome = Result<Option<Vec<u8>>, i32>;

/// The operations of the comparison, on any backend: (map, op, key, value, flags).
enum Op {
    Update(&'static str, u32, Vec<u8>, u64),
    Lookup(&'static str, u32, u64),
}

fn ops() -> Vec<Op> {
    use Op::*;
    let garbage = 0xdead_beef;
    vec![
        // An absent key with BPF_F_LOCK is inserted; the caller's lock bytes are not stored.
        Update("pairs", 1, pair(5, garbage, 6), BPF_F_LOCK),
        Lookup("pairs", 1, BPF_F_LOCK),
        Lookup("pairs", 1, 0),
        Update("pairs", 1, pair(7, 0, 8), BPF_F_LOCK | BPF_NOEXIST),
        Update("pairs", 2, pair(7, 0, 8), BPF_F_LOCK | BPF_EXIST),
        // In place, under the lock.
        Update("pairs", 1, pair(9, garbage, 10), BPF_F_LOCK | BPF_EXIST),
        Lookup("pairs", 1, BPF_F_LOCK),
        Update("pairs", 1, pair(11, garbage, 12), BPF_ANY),
        Lookup("pairs", 1, 0),
        Lookup("pairs", 3, BPF_F_LOCK),
        Lookup("pairs", 1, BPF_EXIST),
        Update("pairs", 1, pair(1, 0, 1), 8),
        Update("slots", 1, pair(13, garbage, 14), BPF_F_LOCK),
        Lookup("slots", 1, BPF_F_LOCK),
        Update("slots", 1, pair(15, 0, 16), BPF_F_LOCK | BPF_NOEXIST),
        Update("slots", 5, pair(15, 0, 16), BPF_F_LOCK),
        Lookup("slots", 0, BPF_F_LOCK),
        // No spin lock in the value: BPF_F_LOCK is EINVAL.
        Update("plain", 1, 7u64.to_le_bytes().to_vec(), BPF_ANY),
        Update("plain", 1, 8u64.to_le_bytes().to_vec(), BPF_F_LOCK),
        Lookup("plain", 1, BPF_F_LOCK),
        Lookup("plain", 1, 0),
    ]
}

fn on_kernel(object: &libbpf_rs::Object) -> Vec<Outcome> {
    let fd = |name: &str| {
        object
            .maps()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("map {name}"))
            .as_fd()
            .as_raw_fd()
    };
    ops()
        .into_iter()
        .map(|op| match op {
            Op::Update(map, key, value, flags) => {
                // SAFETY: valid key and value buffers of the map's sizes.
                let r = unsafe {
                    libbpf_sys::bpf_map_update_elem(
                        fd(map),
                        (&key as *const u32).cast(),
                        value.as_ptr().cast(),
                        flags,
                    )
                };
                if r < 0 {
                    Err(-r)
                } else {
                    Ok(None)
                }
            }
            Op::Lookup(map, key, flags) => {
                let mut v = vec![0u8; if map == "plain" { 8 } else { 24 }];
                // SAFETY: valid key and value buffers of the map's sizes.
                let r = unsafe {
                    libbpf_sys::bpf_map_lookup_elem_flags(
                        fd(map),
                        (&key as *const u32).cast(),
                        v.as_mut_ptr().cast(),
                        flags,
                    )
                };
                if r < 0 {
                    Err(-r)
                } else {
                    Ok(Some(v))
                }
            }
        })
        .collect()
}

fn on_user_space(loaded: &LoadedObject) -> Vec<Outcome> {
    let map = |name: &str| loaded.shm.map(name).unwrap();
    ops()
        .into_iter()
        .map(|op| match op {
            Op::Update(name, key, value, flags) => map(name)
                .update(&key.to_le_bytes(), &value, flags)
                .map(|()| None)
                .map_err(|e| e.errno()),
            Op::Lookup(name, key, flags) => {
                match map(name).get_with_flags(&key.to_le_bytes(), flags) {
                    Ok(Some(EntryValue::Single(v))) => Ok(Some(v)),
                    Ok(Some(EntryValue::PerCpu(_))) => panic!("no per-CPU map here"),
                    Ok(None) => Err(libc::ENOENT),
                    Err(e) => Err(e.errno()),
                }
            }
        })
        .collect()
}

fn load_ours(segment: &str) -> LoadedObject {
    bpftime_runtime::loaded::unload_object(segment);
    LoadedObject::load(
        &object_path("spin_lock"),
        Some(segment),
        LoadOptions {
            publish: false,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)))
}

fn load_kernel() -> libbpf_rs::Object {
    libbpf_rs::ObjectBuilder::default()
        .open_file(object_path("spin_lock"))
        .and_then(|o| o.load())
        .expect("spin_lock.bpf.o loads into the kernel")
}

#[test]
fn f_lock_lookups_and_updates_answer_as_the_kernel() {
    if !require_kernel("f_lock_lookups_and_updates_answer_as_the_kernel") {
        return;
    }
    let kernel = on_kernel(&load_kernel());
    let loaded = load_ours("test-spin-lock-ops");
    let ours = on_user_space(&loaded);
    let _ = loaded.unload();
    assert_eq!(ours, kernel, "op by op: {:?}", ops().len());
    // What the kernel answered is what the op list says it should (so the comparison is not
    // between two wrong answers).
    assert_eq!(kernel[1], Ok(Some(pair(5, 0, 6))), "the lock reads 0");
    assert_eq!(kernel[3], Err(libc::EEXIST));
    assert_eq!(kernel[4], Err(libc::ENOENT));
    assert_eq!(kernel[6], Ok(Some(pair(9, 0, 10))));
    assert_eq!(kernel[18], Err(libc::EINVAL));
    assert_eq!(kernel[19], Err(libc::EINVAL));
}

/// Reads `read()` (a BPF_F_LOCK copy of a pair) until `stop`, asserting both halves agree.
fn watch_pairs(stop: &AtomicBool, read: impl Fn() -> Vec<u8>) -> u64 {
    let mut reads = 0;
    while !stop.load(Ordering::Relaxed) {
        let v = read();
        let a = u64::from_le_bytes(v[..8].try_into().unwrap());
        let b = u64::from_le_bytes(v[16..24].try_into().unwrap());
        assert_eq!(a, b, "a copy taken under the lock tore: {v:?}");
        assert_eq!(&v[8..12], &[0; 4], "the lock reads 0");
        reads += 1;
    }
    reads
}

const RUNS: u32 = 200_000;

#[test]
fn f_lock_copies_never_tear_while_programs_bump_under_the_lock() {
    if !require_kernel("f_lock_copies_never_tear_while_programs_bump_under_the_lock") {
        return;
    }
    // The kernel: two threads of BPF_PROG_TEST_RUN, a reader with BPF_F_LOCK.
    let object = load_kernel();
    let pairs = object.maps().find(|m| m.name() == "pairs").unwrap();
    let slots = object.maps().find(|m| m.name() == "slots").unwrap();
    pairs
        .update(
            &0u32.to_le_bytes(),
            &pair(0, 0, 0),
            libbpf_rs::MapFlags::ANY,
        )
        .unwrap();
    let prog = object
        .progs()
        .find(|p| p.name() == "bump_pairs")
        .unwrap()
        .as_fd()
        .as_raw_fd();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runners: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(move || {
                    let packet = [0u8; 64];
                    // SAFETY: a zeroed opts struct is valid; the packet outlives the call.
                    let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
                    opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
                    opts.data_in = packet.as_ptr().cast();
                    opts.data_size_in = packet.len() as u32;
                    opts.repeat = RUNS as _;
                    // SAFETY: a program fd of the live object and a valid opts struct.
                    let r = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog, &mut opts) };
                    assert_eq!(r, 0, "BPF_PROG_TEST_RUN");
                })
            })
            .collect();
        let pairs_fd = pairs.as_fd().as_raw_fd();
        let stop = &stop;
        let reader = s.spawn(move || {
            watch_pairs(stop, || {
                let mut v = vec![0u8; 24];
                // SAFETY: valid key and value buffers of the map's sizes.
                let r = unsafe {
                    libbpf_sys::bpf_map_lookup_elem_flags(
                        pairs_fd,
                        (&0u32 as *const u32).cast(),
                        v.as_mut_ptr().cast(),
                        BPF_F_LOCK,
                    )
                };
                assert_eq!(r, 0);
                v
            })
        });
        for r in runners {
            r.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    let count = |m: &libbpf_rs::Map| {
        let v = m
            .lookup(&0u32.to_le_bytes(), libbpf_rs::MapFlags::LOCK)
            .unwrap()
            .unwrap();
        u64::from_le_bytes(v[..8].try_into().unwrap())
    };
    assert_eq!(
        count(&pairs),
        2 * u64::from(RUNS),
        "kernel: every bump counted"
    );
    assert_eq!(count(&slots), 2 * u64::from(RUNS));

    // Ours: the same object on our JIT, two threads, the same reader.
    let loaded = load_ours("test-spin-lock-race");
    let ours = loaded.shm.map("pairs").unwrap();
    ours.update(&0u32.to_le_bytes(), &pair(0, 0, 0), BPF_ANY)
        .unwrap();
    let program = loaded.program("bump_pairs").unwrap();
    let stop = AtomicBool::new(false);
    let locked_copy = |m: &MapHandle| match m.get_with_flags(&0u32.to_le_bytes(), BPF_F_LOCK) {
        Ok(Some(EntryValue::Single(v))) => v,
        other => panic!("{other:?}"),
    };
    std::thread::scope(|s| {
        let runners: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut helpers = loaded.helpers().unwrap();
                    let mut ctx = vec![0u8; 64];
                    for _ in 0..RUNS {
                        program.run(&mut helpers, &mut ctx).expect("run");
                    }
                })
            })
            .collect();
        let reader = s.spawn(|| watch_pairs(&stop, || locked_copy(&ours)));
        for r in runners {
            r.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    let count = |m: &MapHandle| u64::from_le_bytes(locked_copy(m)[..8].try_into().unwrap());
    let total = (count(&ours), count(&loaded.shm.map("slots").unwrap()));
    let _ = loaded.unload();
    assert_eq!(
        total,
        (2 * u64::from(RUNS), 2 * u64::from(RUNS)),
        "ours: every bump counted"
    );
}
