//! Map helpers, global data, bpf_for_each_map_elem, bpf_tail_call and the load-time helper
//! check, on the interpreter and the JIT over real shared-memory maps.

mod helpers_common;

use std::sync::Arc;

use bpftime_runtime::helpers::{check_helper_calls, map_index, map_token, RuntimeHelpers};
use bpftime_runtime::maps::{MapType, BPF_ANY, BPF_EXIST, BPF_NOEXIST};
use bpftime_runtime::vm::{asm::assemble, VmError};
use helpers_common::*;

/// `bpf_map_update_elem(map 0, &key, &val, flags)` with key at r10-4, value at r10-16; r0 to
/// `[r6+out]`.
fn update(key: u32, val: i32, flags: u64, out: usize) -> String {
    format!(
        "stw [%r10-4], {key}\nstdw [%r10-16], {val}\nldmap %r1, 0\n{}{}mov %r4, {flags}\n\
         call 2\n{}",
        stack_ptr(2, -4),
        stack_ptr(3, -16),
        save(out)
    )
}

fn delete(key: u32, out: usize) -> String {
    format!(
        "stw [%r10-4], {key}\nldmap %r1, 0\n{}call 3\n{}",
        stack_ptr(2, -4),
        save(out)
    )
}

fn lookup(key: u32) -> String {
    format!(
        "stw [%r10-4], {key}\nldmap %r1, 0\n{}call 1\n",
        stack_ptr(2, -4)
    )
}

#[test]
fn hash_update_lookup_delete_kernel_semantics() {
    for jit in VMS {
        let mut e = Env::new("hash", jit, &[def("h", MapType::Hash, 4, 8, 2)]);
        let src = format!(
            "mov %r6, %r1\n{}{}{}{}{}\
             {}jeq %r0, 0, fail\nldxdw %r1, [%r0]\nstxdw [%r6+48], %r1\nadd %r1, 5\n\
             stxdw [%r0], %r1\n\
             {}{}{}{}{}mov %r0, 0\nexit\nfail:\nmov %r0, 1\nexit\n",
            update(1, 100, BPF_NOEXIST, 0),
            update(1, 200, BPF_NOEXIST, 8),
            update(2, 300, BPF_EXIST, 16),
            update(3, 400, BPF_ANY, 24),
            update(4, 500, BPF_ANY, 32),
            lookup(1),
            lookup(2),
            save(40),
            delete(2, 56),
            delete(3, 64),
            delete(3, 72),
        );
        let p = e.load(&src);
        let mut ctx = [0u8; 128];
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(at(&ctx, 8), err(libc::EEXIST));
        assert_eq!(at(&ctx, 16), err(libc::ENOENT));
        assert_eq!(at(&ctx, 24), 0);
        assert_eq!(at(&ctx, 32), err(libc::E2BIG), "full map");
        assert_eq!(at(&ctx, 40), 0, "lookup of a missing key");
        assert_eq!(at(&ctx, 48), 100, "value read through the lookup pointer");
        assert_eq!(at(&ctx, 56), err(libc::ENOENT));
        assert_eq!(at(&ctx, 64), 0);
        assert_eq!(at(&ctx, 72), err(libc::ENOENT));
        let m = e.obj.map("h").unwrap();
        let v = m.lookup_unmarked(&1u32.to_le_bytes(), 0).unwrap().unwrap();
        assert_eq!(
            v.read(),
            105u64.to_le_bytes(),
            "write through the value pointer"
        );
        assert!(m.lookup_unmarked(&3u32.to_le_bytes(), 0).unwrap().is_none());
    }
}

#[test]
fn array_semantics() {
    for jit in VMS {
        let mut e = Env::new("array", jit, &[def("a", MapType::Array, 4, 8, 4)]);
        let src = format!(
            "mov %r6, %r1\n{}{}{}{}{}{}mov %r0, 0\nexit\n",
            update(3, 7, BPF_ANY, 0),
            update(4, 7, BPF_ANY, 8),
            update(1, 7, BPF_NOEXIST, 16),
            delete(1, 24),
            lookup(4),
            save(32),
        );
        let p = e.load(&src);
        let mut ctx = [0xffu8; 64];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(at(&ctx, 8), err(libc::E2BIG), "index out of range");
        assert_eq!(
            at(&ctx, 16),
            err(libc::EEXIST),
            "array entries always exist"
        );
        assert_eq!(at(&ctx, 24), err(libc::EINVAL), "array delete");
        assert_eq!(at(&ctx, 32), 0, "lookup out of range");
    }
}

#[test]
fn queue_push_pop_peek() {
    for jit in VMS {
        let mut e = Env::new("queue", jit, &[def("q", MapType::Queue, 0, 8, 2)]);
        let push = |v: i32, flags: u64, out: usize| {
            format!(
                "stdw [%r10-16], {v}\nldmap %r1, 0\n{}mov %r3, {flags}\ncall 87\n{}",
                stack_ptr(2, -16),
                save(out)
            )
        };
        let take = |id: u32, out: usize| {
            format!(
                "stdw [%r10-24], -1\nldmap %r1, 0\n{}call {id}\n{}ldxdw %r0, [%r10-24]\n{}",
                stack_ptr(2, -24),
                save(out),
                save(out + 8)
            )
        };
        let src = format!(
            "mov %r6, %r1\n{}{}{}{}{}{}{}{}mov %r0, 0\nexit\n",
            push(1, 0, 0),
            push(2, 0, 8),
            push(3, 0, 16),
            push(3, BPF_EXIST, 24),
            take(89, 32),
            take(88, 48),
            take(88, 64),
            take(88, 80),
        );
        let p = e.load(&src);
        let mut ctx = [0u8; 128];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), 0);
        assert_eq!(at(&ctx, 8), 0);
        assert_eq!(at(&ctx, 16), err(libc::E2BIG), "full queue");
        assert_eq!(at(&ctx, 24), 0, "BPF_EXIST drops the oldest");
        assert_eq!((at(&ctx, 32), at(&ctx, 40)), (0, 2), "peek");
        assert_eq!((at(&ctx, 48), at(&ctx, 56)), (0, 2), "pop");
        assert_eq!((at(&ctx, 64), at(&ctx, 72)), (0, 3), "pop");
        assert_eq!(at(&ctx, 80), err(libc::ENOENT), "pop of an empty queue");
    }
}

#[test]
fn global_data_by_map_value_relocation() {
    for jit in VMS {
        let mut rodata = def(".rodata", MapType::Array, 4, 16, 1);
        rodata.flags = 1 << 7; // BPF_F_RDONLY_PROG
        let mut e = Env::new(
            "gdata",
            jit,
            &[rodata, def(".bss", MapType::Array, 4, 16, 1)],
        );
        let ro = e.obj.map(".rodata").unwrap();
        let mut init = [0u8; 16];
        init[8..].copy_from_slice(&41u64.to_le_bytes());
        ro.update(&0u32.to_le_bytes(), &init, BPF_ANY).unwrap();
        let p = e.load(
            "ldmapval %r1, 0, 8\nldxdw %r2, [%r1]\nldmapval %r3, 1, 8\nmov %r4, 1\n\
             lock add [%r3], %r4\nlock add [%r3], %r2\nldxdw %r0, [%r3]\nexit",
        );
        let mut ctx = [0u8; 8];
        assert_eq!(e.run(&p, &mut ctx), Ok(42));
        assert_eq!(e.run(&p, &mut ctx), Ok(84));
        let bss = e.obj.map(".bss").unwrap();
        let v = bss
            .lookup_unmarked(&0u32.to_le_bytes(), 0)
            .unwrap()
            .unwrap();
        assert_eq!(&v.read()[8..], &84u64.to_le_bytes());
        if !jit {
            // .rodata is read-only for the program (the interpreter enforces it).
            let p = e.load("ldmapval %r1, 0, 0\nstdw [%r1], 1\nmov %r0, 0\nexit");
            assert!(matches!(
                e.run(&p, &mut ctx),
                Err(VmError::MemoryFault { pc: 2, .. })
            ));
        }
    }
}

#[test]
fn relocation_errors_and_tokens() {
    let e = Env::new("reloc", false, &[def("h", MapType::Hash, 4, 8, 2)]);
    for (src, want) in [
        ("ldmap %r1, 3\nmov %r0, 0\nexit", "names map 3"),
        (
            "ldmapval %r1, 0, 0\nmov %r0, 0\nexit",
            "not a one-entry ARRAY",
        ),
    ] {
        let r = e.h.load_program(assemble(src).unwrap());
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains(want), "{msg}");
    }
    assert_eq!(map_index(map_token(5)), Some(5));
    assert_eq!(map_index(5), None);
    // A map token is not memory: dereferencing it faults on the interpreter.
    let mut e = e;
    let p = e.load("ldmap %r1, 0\nldxdw %r0, [%r1]\nexit");
    assert!(matches!(
        e.run(&p, &mut [0u8; 8]),
        Err(VmError::MemoryFault { pc: 2, .. })
    ));
    // A helper given something that is not a map fails the run with a clear error.
    let p = e.load(&format!("mov %r1, 1234\n{}call 1\nexit", stack_ptr(2, -8)));
    let msg = e.run(&p, &mut [0u8; 8]).unwrap_err().to_string();
    assert!(msg.contains("not a map of this program"), "{msg}");
}

/// Callback `(map, key, value, ctx)`: sums values into `*ctx`, counts calls in `ctx[8]`, adds 1000 to each value
/// through the value pointer, stops (returns 1) at key `stop`.
fn for_each_src(stop: u32) -> String {
    format!(
        "mov %r6, %r1\nldmap %r1, 0\nlddw %r2, cb\nmov %r3, %r6\nmov %r4, 0\ncall 164\n{}\
         mov %r0, 0\nexit\n\
         cb:\n\
         ldxdw %r7, [%r4+8]\nadd %r7, 1\nstxdw [%r4+8], %r7\n\
         ldxdw %r0, [%r4]\nldxdw %r8, [%r3]\nadd %r0, %r8\nstxdw [%r4], %r0\n\
         add %r8, 1000\nstxdw [%r3], %r8\n\
         ldxw %r9, [%r2]\nmov %r0, 0\njne %r9, {stop}, out\nmov %r0, 1\nout:\nexit\n",
        "stxdw [%r6+16], %r0\n"
    )
}

#[test]
fn for_each_map_elem_hash_and_array() {
    for jit in VMS {
        let mut e = Env::new("foreach", jit, &[def("h", MapType::Hash, 4, 8, 16)]);
        let h = e.obj.map("h").unwrap();
        for k in 1..=5u32 {
            h.update(&k.to_le_bytes(), &u64::from(k).to_le_bytes(), BPF_ANY)
                .unwrap();
        }
        let p = e.load(&for_each_src(999));
        let mut ctx = [0u8; 32];
        assert_eq!(e.run(&p, &mut ctx), Ok(0), "jit={jit}");
        assert_eq!(at(&ctx, 0), 15, "sum of the values");
        assert_eq!(at(&ctx, 8), 5, "callback calls");
        assert_eq!(at(&ctx, 16), 5, "return value: elements visited");
        for k in 1..=5u32 {
            let v = h.lookup_unmarked(&k.to_le_bytes(), 0).unwrap().unwrap();
            assert_eq!(v.read(), (u64::from(k) + 1000).to_le_bytes());
        }
        // Early stop: elements are visited in slot (here insertion) order, the walk ends at the
        // element whose callback returned 1 (key 3), and that element is counted.
        let p = e.load(&for_each_src(3));
        let mut ctx = [0u8; 32];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 8), 3, "callback calls: keys 1, 2, 3");
        assert_eq!(at(&ctx, 16), 3, "return value: elements visited");
        assert_eq!(at(&ctx, 0), 1001 + 1002 + 1003, "the values of keys 1..=3");
        for k in 1..=5u32 {
            let v = h.lookup_unmarked(&k.to_le_bytes(), 0).unwrap().unwrap();
            let passes = if k <= 3 { 2000 } else { 1000 };
            assert_eq!(v.read(), (u64::from(k) + passes).to_le_bytes(), "key {k}");
        }
        drop(e);

        let mut e = Env::new("foreach-a", jit, &[def("a", MapType::Array, 4, 8, 7)]);
        let p = e.load(&for_each_src(999));
        let mut ctx = [0u8; 32];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!((at(&ctx, 0), at(&ctx, 8), at(&ctx, 16)), (0, 7, 7));
        let p = e.load(&for_each_src(2));
        let mut ctx = [0u8; 32];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 16), 3, "indices 0, 1, 2 visited");
        assert_eq!(at(&ctx, 0), 3000, "values were 1000 after the first pass");
    }
}

#[test]
fn for_each_flags_and_map_type() {
    for jit in VMS {
        let mut e = Env::new(
            "foreach-e",
            jit,
            &[
                def("h", MapType::Hash, 4, 8, 4),
                def("q", MapType::Queue, 0, 8, 4),
            ],
        );
        let p = e.load(
            "mov %r6, %r1\nldmap %r1, 0\nlddw %r2, cb\nmov %r3, 0\nmov %r4, 1\ncall 164\n\
             stxdw [%r6+0], %r0\nldmap %r1, 1\nlddw %r2, cb\nmov %r3, 0\nmov %r4, 0\n\
             call 164\nstxdw [%r6+8], %r0\nmov %r0, 0\nexit\ncb:\nmov %r0, 0\nexit",
        );
        let mut ctx = [0u8; 16];
        assert_eq!(e.run(&p, &mut ctx), Ok(0));
        assert_eq!(at(&ctx, 0), err(libc::EINVAL), "flags must be 0");
        assert_eq!(at(&ctx, 8), err(libc::EINVAL), "queue cannot be iterated");
    }
}

#[test]
fn for_each_callback_fault_is_reported() {
    let mut e = Env::new("foreach-f", false, &[def("a", MapType::Array, 4, 8, 2)]);
    // The value pointer is valid only for value_size bytes.
    let p = e.load(
        "ldmap %r1, 0\nlddw %r2, cb\nmov %r3, 0\nmov %r4, 0\ncall 164\nexit\n\
         cb:\nldxdw %r0, [%r3+8]\nexit",
    );
    match e.run(&p, &mut [0u8; 8]) {
        Err(VmError::MemoryFault { pc: 8, len: 8, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn tail_calls_through_a_prog_array() {
    for jit in VMS {
        let mut e = Env::new("tail", jit, &[def("progs", MapType::ProgArray, 4, 4, 4)]);
        // Program 0 returns 42; program 1 counts its runs in ctx and tail-calls itself.
        let p0 = e.load("mov %r0, 42\nexit");
        let p1 = e.load(
            "ldxdw %r2, [%r1]\nadd %r2, 1\nstxdw [%r1], %r2\nmov %r6, %r1\n\
             ldmap %r2, 0\nmov %r3, 1\ncall 12\nstxdw [%r6+8], %r0\nmov %r0, 7\nexit",
        );
        let progs = vec![p0.clone(), p1.clone()];
        e.h = RuntimeHelpers::from_object(&e.obj).with_programs(progs);
        let m = e.obj.map("progs").unwrap();
        m.update(&0u32.to_le_bytes(), &0u32.to_le_bytes(), BPF_ANY)
            .unwrap();
        let main = e.load(
            "mov %r6, %r1\nldmap %r2, 0\nmov %r3, 2\ncall 12\nstxdw [%r6+8], %r0\n\
             mov %r1, %r6\nldmap %r2, 0\nmov %r3, 0\ncall 12\nmov %r0, 99\nexit",
        );
        let mut ctx = [0u8; 16];
        assert_eq!(e.run(&main, &mut ctx), Ok(42), "jit={jit}");
        assert_eq!(at(&ctx, 8), err(libc::ENOENT), "empty slot falls through");

        // The limit: 33 tail calls succeed, the 34th falls through.
        m.update(&1u32.to_le_bytes(), &1u32.to_le_bytes(), BPF_ANY)
            .unwrap();
        let mut ctx = [0u8; 16];
        assert_eq!(e.run(&p1, &mut ctx), Ok(7));
        assert_eq!(at(&ctx, 0), 34, "1 run + 33 tail calls");
        assert_eq!(at(&ctx, 8), err(libc::ENOENT));
        // The count restarts with every run.
        let mut ctx = [0u8; 16];
        assert_eq!(e.run(&p1, &mut ctx), Ok(7));
        assert_eq!(at(&ctx, 0), 34);
        let _ = Arc::strong_count(&p0);
    }
}

#[test]
fn unknown_helpers_are_refused_at_load_time() {
    let e = Env::new("unknown", false, &[]);
    let insns = assemble("mov %r1, 0\nlddw %r2, 5\ncall 84\nexit").unwrap();
    let err = check_helper_calls(&insns).unwrap_err();
    assert_eq!(
        err.to_string(),
        "helper 84 (bpf_sk_lookup_tcp) is not supported at instruction 3"
    );
    let msg = e.h.load_program(insns).unwrap_err().to_string();
    assert!(msg.contains("bpf_sk_lookup_tcp"), "{msg}");
    let err = check_helper_calls(&assemble("call 9999\nexit").unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "helper 9999 (unknown) is not supported at instruction 0"
    );
    // The CO-RE poison call loads, and fails only when reached.
    let mut e = e;
    let p = e.load("ja skip\ncall 195896080\nskip:\nmov %r0, 3\nexit");
    assert_eq!(e.run(&p, &mut [0u8; 8]), Ok(3));
    let p = e.load("call 195896080\nexit");
    let msg = e.run(&p, &mut [0u8; 8]).unwrap_err().to_string();
    assert!(msg.contains("CO-RE"), "{msg}");
}

#[test]
fn rbpf_runs_the_same_map_helpers() {
    use bpftime_runtime::vm::{run_with_ctx, InterpOptions, MemoryMap, VmKind};
    // rbpf's JIT only: rbpf's interpreter fixes its allowed memory before the run, so it
    // refuses loads through value pointers that helpers return during the run.
    let kind = VmKind::Rbpf;
    let mut e = Env::new("rbpf", false, &[def("h", MapType::Hash, 4, 8, 4)]);
    let src = format!(
        "mov %r6, %r1\n{}{}jeq %r0, 0, out\nldxdw %r0, [%r0]\nout:\nexit",
        update(1, 77, BPF_ANY, 0),
        lookup(1)
    );
    let p = e.load(&src);
    let mut ctx = [0u8; 16];
    let mut mem = MemoryMap::new();
    e.h.begin_run();
    // SAFETY: the program only touches its stack, its context and the looked-up value.
    let r = unsafe {
        run_with_ctx(
            kind,
            &p,
            &mut ctx,
            &mut mem,
            &mut e.h,
            InterpOptions::default(),
        )
    };
    assert_eq!(r, Ok(77), "{kind:?}");
    assert_eq!(at(&ctx, 0), 0);
}
