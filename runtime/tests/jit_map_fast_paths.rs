//! The JIT's map fast paths (inline ARRAY lookups, direct lookup/update/delete calls; see
//! `vm::jit`) behave exactly like the generic helper path: same results, same change marks
//! for the sync forwarder, same faults, and no fast path with helpers over other maps.

mod helpers_common;

use bpftime_runtime::helpers::RuntimeHelpers;
use bpftime_runtime::maps::{EntryValue, MapType, ShmObject};
use bpftime_runtime::vm::asm::assemble;
use bpftime_runtime::vm::Program;
use helpers_common::*;

/// `r0 = bpf_map_lookup_elem(map, &key)`, key at r10-4.
fn lookup(map: u32, key: u32) -> String {
    format!(
        "stw [%r10-4], {key}\nldmap %r1, {map}\n{}call 1\n",
        stack_ptr(2, -4)
    )
}

/// Adds 1 to the u64 value of `key` if it exists; stores r0 of the lookup (0 or not) as a
/// flag at `[r6+out]`.
fn bump(map: u32, key: u32, out: usize) -> String {
    format!(
        "{}mov %r1, 0\njeq %r0, 0, +3\nmov %r1, 1\nmov %r2, 1\nlock add [%r0], %r2\nstxdw [%r6+{out}], %r1\n",
        lookup(map, key)
    )
}

fn value(obj: &ShmObject, map: &str, key: u32) -> u64 {
    match obj.map(map).unwrap().get(&key.to_le_bytes()).unwrap() {
        Some(EntryValue::Single(v)) => u64::from_le_bytes(v[..8].try_into().unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn inline_array_lookups_bound_check_write_and_mark() {
    for jit in VMS {
        let mut e = Env::new("fast-array", jit, &[def("a", MapType::Array, 4, 8, 4)]);
        let p = e.load(&format!(
            "mov %r6, %r1\n{}{}{}mov %r0, 0\nexit\n",
            bump(0, 2, 0),
            bump(0, 3, 8),
            bump(0, 4, 16)
        ));
        let m = e.obj.map("a").unwrap();
        let mut ctx = [0u8; 64];
        for round in 1..=3u64 {
            assert_eq!(e.run(&p, &mut ctx), Ok(0));
            assert_eq!(
                (at(&ctx, 0), at(&ctx, 8), at(&ctx, 16)),
                (1, 1, 0),
                "jit={jit}"
            );
            assert_eq!(value(&e.obj, "a", 2), round);
            assert_eq!(value(&e.obj, "a", 3), round);
            // Each lookup handing out a pointer marks its entry, also after a drain cleared
            // the marks (the inline path then takes the marking call).
            let mut marked = Vec::new();
            m.drain_changes(|c| {
                assert!(c.kind.pointer_handed_out());
                marked.push(c.slot);
            });
            marked.sort();
            assert_eq!(marked, [2, 3], "jit={jit} round={round}");
        }
    }
}

#[test]
fn hash_fast_calls_match_the_helpers() {
    for jit in VMS {
        let mut e = Env::new("fast-hash", jit, &[def("h", MapType::Hash, 4, 8, 8)]);
        // update(5, 40), lookup+bump 5, delete 6 (ENOENT), delete 5, lookup 5 (NULL).
        let p = e.load(&format!(
            "mov %r6, %r1\nstw [%r10-4], 5\nstdw [%r10-16], 40\nldmap %r1, 0\n{}{}mov %r4, 0\n\
             call 2\nstxdw [%r6+0], %r0\n{}stw [%r10-4], 6\nldmap %r1, 0\n{}call 3\n\
             stxdw [%r6+16], %r0\n{}\nmov %r0, 0\nexit\n",
            stack_ptr(2, -4),
            stack_ptr(3, -16),
            bump(0, 5, 8),
            stack_ptr(2, -4),
            lookup(0, 7) + "stxdw [%r6+24], %r0\n",
        ));
        let mut ctx = [0xffu8; 64];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 0, "update");
        assert_eq!(at(&ctx, 8), 1, "lookup found");
        assert_eq!(at(&ctx, 16), err(libc::ENOENT), "delete of a missing key");
        assert_eq!(at(&ctx, 24), 0, "lookup of a missing key");
        assert_eq!(value(&e.obj, "h", 5), 41);
    }
}

#[test]
fn a_call_site_reached_with_another_map_takes_the_generic_path() {
    // The JIT guesses the map of a call site from the code before it (here: map 1, loaded
    // last); on the path that jumps over that load r1 holds map 0, and the run-time guard
    // must send that call to map 0.
    for jit in VMS {
        let mut e = Env::new(
            "fast-guard",
            jit,
            &[
                def("a", MapType::Array, 4, 8, 4),
                def("b", MapType::Array, 4, 8, 4),
            ],
        );
        let p = e.load(&format!(
            "mov %r6, %r1\nldxdw %r7, [%r1+32]\nstw [%r10-4], 1\nldmap %r1, 0\n\
             jeq %r7, 0, +2\nldmap %r1, 1\n{}call 1\njeq %r0, 0, +2\nmov %r2, 1\n\
             lock add [%r0], %r2\nmov %r0, 0\nexit\n",
            stack_ptr(2, -4)
        ));
        let mut ctx = [0u8; 64];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        put(&mut ctx, 32, 1);
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(value(&e.obj, "a", 1), 1, "jit={jit}");
        assert_eq!(value(&e.obj, "b", 1), 2, "jit={jit}");
    }
}

#[test]
fn helpers_over_other_maps_never_use_the_fast_paths() {
    let defs = [
        def("a", MapType::Array, 4, 8, 4),
        def("h", MapType::Hash, 4, 8, 8),
    ];
    let e1 = Env::new("fast-set1", true, &defs);
    let e2 = Env::new("fast-set2", true, &defs);
    let src = format!(
        "mov %r6, %r1\n{}stw [%r10-4], 9\nstdw [%r10-16], 3\nldmap %r1, 1\n{}{}mov %r4, 0\n\
         call 2\nmov %r0, 0\nexit\n",
        bump(0, 1, 0),
        stack_ptr(2, -4),
        stack_ptr(3, -16)
    );
    // Compiled against object 1's maps.
    let p: Program = e1.h.load_program(assemble(&src).unwrap()).unwrap();
    let mut ctx = [0u8; 64];
    // Run with helpers over object 2: everything lands in object 2.
    let mut h2 = RuntimeHelpers::from_object(&e2.obj);
    // SAFETY: the program only touches its context, stack and map values.
    assert_eq!(unsafe { h2.run_jit(&p, &mut ctx) }, Ok(0));
    assert_eq!(value(&e2.obj, "a", 1), 1);
    assert_eq!(value(&e2.obj, "h", 9), 3);
    assert_eq!(value(&e1.obj, "a", 1), 0);
    assert!(e1
        .obj
        .map("h")
        .unwrap()
        .get(&9u32.to_le_bytes())
        .unwrap()
        .is_none());
    // Another helper set over object 1 (same maps): object 1.
    let mut h1 = RuntimeHelpers::from_object(&e1.obj);
    // SAFETY: as above.
    assert_eq!(unsafe { h1.run_jit(&p, &mut ctx) }, Ok(0));
    assert_eq!(value(&e1.obj, "a", 1), 1);
    assert_eq!(value(&e1.obj, "h", 9), 3);
    assert_eq!(value(&e2.obj, "a", 1), 1);
}

#[test]
fn fast_path_faults_read_like_the_generic_ones() {
    let defs = [
        def("h", MapType::Hash, 4, 8, 8),
        def("a", MapType::Array, 4, 8, 4),
    ];
    let e1 = Env::new("fast-fault1", true, &defs);
    let e2 = Env::new("fast-fault2", true, &defs);
    for map in 0..2 {
        // A NULL key (the verifier would refuse it; the JIT reports it, also on the inline
        // ARRAY path).
        let src = format!("ldmap %r1, {map}\nmov %r2, 0\ncall 1\nexit");
        let p = e1.h.load_program(assemble(&src).unwrap()).unwrap();
        let mut ctx = [0u8; 64];
        let mut fast = RuntimeHelpers::from_object(&e1.obj);
        let mut generic = RuntimeHelpers::from_object(&e2.obj);
        // SAFETY: the NULL key is caught before any access.
        let a = unsafe { fast.run_jit(&p, &mut ctx) }.unwrap_err();
        // SAFETY: as above.
        let b = unsafe { generic.run_jit(&p, &mut ctx) }.unwrap_err();
        assert_eq!(a.to_string(), b.to_string());
        assert!(a.to_string().contains("bpf_map_lookup_elem"), "{a}");
    }
}
