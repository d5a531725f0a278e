//! ns per call of a hooked function, as a table (harness = false).
//!
//! Rows: no hook; entry hook with an empty handler (the machinery alone); entry hook with a
//! trivial handler (one atomic counter increment) through the generic dispatcher, as a direct
//! entry (Rust) and as a direct entry that preserves the vector registers (a few instructions
//! of assembly: the stub saves no xmm); return hook; entry + return hook;
//! each on an ordinary entry and on a `nop5` entry; then a function too short for a detour
//! (`bench_short`, the int3 fallback: a signal per call). The lead adds the kernel uprobe
//! rows.
//! `cargo bench -p bpftime-attach --bench hook [-- CALLS REPS]`

#[path = "../tests/common/mod.rs"]
mod common;

use bpftime_attach::hook::ThreadSlot;
use bpftime_attach::{resolve, DirectEntry, EntryAction, HookSet, ProbeHandler, ProbeKind, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Default)]
struct Count(AtomicU64);

impl ProbeHandler for Count {
    fn on_entry(&self, _r: &mut PtRegs) -> EntryAction {
        self.0.fetch_add(1, Ordering::Relaxed);
        EntryAction::Continue
    }
    fn on_return(&self, _r: &mut PtRegs) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A counter with a direct entry: the stub calls it without the generic dispatcher.
#[derive(Default)]
struct DirectCount(AtomicU64);

unsafe extern "C" fn direct_count(data: *const (), _regs: *mut PtRegs, _thread: ThreadSlot) -> u64 {
    // SAFETY: `data` is the `DirectCount` that returned the entry, kept alive by the engine.
    unsafe { &*(data as *const DirectCount) }
        .0
        .fetch_add(1, Ordering::Relaxed);
    0
}

impl ProbeHandler for DirectCount {
    fn direct_entry(&self) -> Option<DirectEntry> {
        Some(DirectEntry {
            func: direct_count,
            data: self as *const Self as *const (),
            preserves_vector_regs: false,
        })
    }
}

// A direct entry that touches no vector register (the stub then skips saving them): counts
// calls in the `AtomicU64` at `data`.
core::arch::global_asm!(
    ".text",
    ".globl bpftime_bench_count_vector_safe",
    ".type bpftime_bench_count_vector_safe,@function",
    "bpftime_bench_count_vector_safe:",
    "lock inc qword ptr [rdi]",
    "xor eax, eax",
    "ret",
    ".size bpftime_bench_count_vector_safe, .-bpftime_bench_count_vector_safe",
);

extern "C" {
    fn bpftime_bench_count_vector_safe(
        data: *const (),
        regs: *mut PtRegs,
        thread: ThreadSlot,
    ) -> u64;
}

#[derive(Default)]
struct VectorSafeCount(AtomicU64);

impl ProbeHandler for VectorSafeCount {
    fn direct_entry(&self) -> Option<DirectEntry> {
        Some(DirectEntry {
            func: bpftime_bench_count_vector_safe,
            data: &self.0 as *const AtomicU64 as *const (),
            preserves_vector_regs: true,
        })
    }
}

/// Does nothing: the cost of the hook machinery alone.
struct Empty;
impl ProbeHandler for Empty {}

type F = extern "C" fn(i64) -> i64;

fn measure(f: F, calls: u64, reps: usize) -> (f64, f64) {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let mut s = 0i64;
            for i in 0..calls as i64 {
                s = s.wrapping_add(black_box(f)(i));
            }
            black_box(s);
            t.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let calls: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let reps: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    println!("hooked function: `long f(long)`, {calls} calls x {reps} runs, ns per call");
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} |",
        "hook", "min", "median", "events"
    );
    println!("|{:-<46}|{:->10}|{:->10}|{:->10}|", "", "", "", "");
    for func in ["bench_plain", "bench_nop5", "bench_short"] {
        let f: F = common::sym(func);
        let t = resolve(&common::target(func)).unwrap();
        let entry_desc = match func {
            "bench_nop5" => "nop5 entry",
            "bench_short" => "short function, int3",
            _ => "ordinary entry",
        };
        let row = |name: &str, kinds: &[ProbeKind]| {
            let c = Arc::new(Count::default());
            let d = Arc::new(DirectCount::default());
            let v = Arc::new(VectorSafeCount::default());
            let mut set = HookSet::new();
            for k in kinds {
                let h: Arc<dyn ProbeHandler> = if name.contains("empty") {
                    Arc::new(Empty)
                } else if name.contains("vector-safe") {
                    v.clone()
                } else if name.contains("direct") {
                    d.clone()
                } else {
                    c.clone()
                };
                set.install(&t, *k, h).unwrap();
            }
            let (min, med) = measure(f, calls, reps);
            set.detach().unwrap();
            println!(
                "| {:<44} | {:>8.2} | {:>8.2} | {:>8} |",
                format!("{name} ({entry_desc})"),
                min,
                med,
                c.0.load(Ordering::Relaxed)
                    + d.0.load(Ordering::Relaxed)
                    + v.0.load(Ordering::Relaxed)
            );
        };
        row("no hook", &[]);
        if func == "bench_short" {
            row("userspace uprobe, counter handler", &[ProbeKind::Uprobe]);
            row(
                "userspace uprobe + uretprobe",
                &[ProbeKind::Uprobe, ProbeKind::Uretprobe],
            );
            continue;
        }
        row("userspace uprobe, empty handler", &[ProbeKind::Uprobe]);
        row("userspace uprobe, counter handler", &[ProbeKind::Uprobe]);
        row("userspace uprobe, direct counter", &[ProbeKind::Uprobe]);
        row(
            "userspace uprobe, direct vector-safe counter",
            &[ProbeKind::Uprobe],
        );
        row(
            "userspace uretprobe, counter handler",
            &[ProbeKind::Uretprobe],
        );
        row(
            "userspace uprobe + uretprobe",
            &[ProbeKind::Uprobe, ProbeKind::Uretprobe],
        );
    }
}
