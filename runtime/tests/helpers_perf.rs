//! Rough cost of helper calls through `RuntimeHelpers` (run with
//! `cargo test --release --test helpers_perf -- --ignored --nocapture`).

mod helpers_common;

use std::time::Instant;

use bpftime_runtime::maps::MapType;
use helpers_common::*;

#[test]
#[ignore = "timing; run explicitly in release mode"]
fn hash_lookup_update_cost() {
    for jit in VMS {
        let mut e = Env::new("perf-hash", jit, &[def("h", MapType::Hash, 4, 8, 1024)]);
        let p = e.load(&format!(
            "stw [%r10-4], 7\nstdw [%r10-16], 1\nldmap %r1, 0\n{}call 1\njeq %r0, 0, upd\n\
             mov %r1, 1\nlock add [%r0], %r1\nupd:\nldmap %r1, 0\n{}{}mov %r4, 0\ncall 2\n\
             mov %r0, 0\nexit",
            stack_ptr(2, -4),
            stack_ptr(2, -4),
            stack_ptr(3, -16)
        ));
        let trivial = e.load("mov %r0, 0\nexit");
        if jit {
            // The map operations alone, for comparison.
            let m = e.obj.map("h").unwrap();
            let (k, v) = (7u32.to_le_bytes(), 1u64.to_le_bytes());
            let n = 200_000;
            let t = Instant::now();
            for _ in 0..n {
                if let Some(p) = m.lookup(std::hint::black_box(&k)).unwrap() {
                    p.atomic_u64(0)
                        .unwrap()
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                m.update(&k, &v, 0).unwrap();
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("direct       lookup+update  {ns:>8.1} ns (MapHandle calls only)");
        }
        let mut ctx = [0u8; 64];
        let n = 200_000;
        let two_calls = e.load("call 35\ncall 35\nexit");
        for (name, prog) in [
            ("trivial", &trivial),
            ("2 null calls", &two_calls),
            ("lookup+update", &p),
        ] {
            for _ in 0..1000 {
                e.run(prog, &mut ctx).unwrap();
            }
            let t = Instant::now();
            for _ in 0..n {
                e.run(prog, &mut ctx).unwrap();
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!(
                "{:<12} {name:<14} {ns:>8.1} ns/run (RuntimeHelpers::run_*)",
                if jit { "jit" } else { "interpreter" }
            );
        }
    }
}
