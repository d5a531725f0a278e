//! ns per call of a hooked function, every row measured in this one run: no probe, kernel
//! uprobes (aya) on three kinds of function entry, our userspace uprobe (agent preloaded, JIT and
//! interpreter), and the same for uretprobes, with the trivial array counter
//! (bench/bench_uprobe.bpf.c, bench/bench_uretprobe.bpf.c); then a non-leaf program (a helper
//! call and a hash update per call, bench/bench_nonleaf.bpf.c) and the array counter called
//! from 8 threads at once (thread CPU time per call), each against the kernel's nop5 path with
//! the same program and threads.
//!
//! The victim (bench/bench_victim.c) times its own loop, so process start-up and attaching are
//! outside the measurement: `bench_victim FUNC ITERS` prints the median and minimum ns per call
//! of 5 repetitions of ITERS calls. After each row the counter map must hold exactly the number
//! of calls the victim made, so a row whose probe did not fire cannot pass for a fast one.
//!
//! `BENCH_ITERS` (default 1,000,000) sets ITERS; `BENCH_ROUNDS` (default 3) how many
//! interleaved rounds run every row (each row reports its best round). Run as root: `cargo bench -p
//! bpftime-example-malloc --bench uprobe`.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use bpftime_example_malloc::{
    agent_status, bench_victim_path, kernel_attach, object_path, remove_agent_files, with_agent,
    Waiting,
};
use bpftime_runtime::loaded::{LoadOptions, LoadedObject, VmChoice};

#[derive(Clone, Copy)]
enum Probe {
    None,
    Kernel {
        object: &'static str,
        program: &'static str,
    },
    User {
        object: &'static str,
        no_jit: bool,
        /// The sync forwarder runs while the victim does, as under `bpftime-rs load` (its
        /// passes clear the marks the program's lookups set).
        synced: bool,
    },
}

struct Row {
    label: &'static str,
    function: &'static str,
    probe: Probe,
    /// Threads calling the function at once (`bench_victim`'s THREADS).
    threads: u32,
}

impl Row {
    fn new(label: &'static str, function: &'static str, probe: Probe) -> Self {
        Self {
            label,
            function,
            probe,
            threads: 1,
        }
    }

    fn on_threads(self, threads: u32) -> Self {
        Self { threads, ..self }
    }

    /// The program object it runs (`None`: no probe).
    fn object(&self) -> Option<&'static str> {
        match self.probe {
            Probe::None => None,
            Probe::Kernel { object, .. } | Probe::User { object, .. } => Some(object),
        }
    }
}

struct Measured {
    median: f64,
    min: f64,
}

/// The single-stepped kernel row runs ITERS / SLOW_DIVISOR calls.
const SLOW_DIVISOR: u64 = 10;

const KUPROBE: Probe = Probe::Kernel {
    object: "bench_uprobe",
    program: "count_uprobe",
};
const KURETPROBE: Probe = Probe::Kernel {
    object: "bench_uretprobe",
    program: "count_uretprobe",
};

const KNONLEAF: Probe = Probe::Kernel {
    object: "bench_nonleaf",
    program: "count_nonleaf",
};

const fn user(object: &'static str, no_jit: bool) -> Probe {
    Probe::User {
        object,
        no_jit,
        synced: false,
    }
}

/// Threads of the multi-threaded rows.
const THREADS: u32 = 8;

fn rows() -> Vec<Row> {
    vec![
        Row::new("no probe", "bench_target", Probe::None),
        Row::new(
            "kernel uprobe, ordinary entry (mov, single-stepped)",
            "bench_target_plain",
            KUPROBE,
        ),
        Row::new(
            "kernel uprobe, push %rbp entry (emulated)",
            "bench_target",
            KUPROBE,
        ),
        Row::new(
            "kernel uprobe, nop5 entry (fast path)",
            "bench_target_nop5",
            KUPROBE,
        ),
        Row::new(
            "userspace uprobe, JIT",
            "bench_target",
            user("bench_uprobe", false),
        ),
        Row::new(
            "userspace uprobe, JIT, synced (forwarder running)",
            "bench_target",
            Probe::User {
                object: "bench_uprobe",
                no_jit: false,
                synced: true,
            },
        ),
        Row::new(
            "userspace uprobe, interpreter",
            "bench_target",
            user("bench_uprobe", true),
        ),
        Row::new(
            "kernel uretprobe, push %rbp entry",
            "bench_target",
            KURETPROBE,
        ),
        Row::new(
            "kernel uretprobe, nop5 entry",
            "bench_target_nop5",
            KURETPROBE,
        ),
        Row::new(
            "userspace uretprobe, JIT",
            "bench_target",
            user("bench_uretprobe", false),
        ),
        Row::new(
            "userspace uretprobe, interpreter",
            "bench_target",
            user("bench_uretprobe", true),
        ),
        Row::new(
            "kernel uprobe, nop5 entry, non-leaf program",
            "bench_target_nop5",
            KNONLEAF,
        ),
        Row::new(
            "userspace uprobe, JIT, non-leaf program",
            "bench_target",
            user("bench_nonleaf", false),
        ),
        Row::new("no probe, 8 threads", "bench_target", Probe::None).on_threads(THREADS),
        Row::new(
            "kernel uprobe, nop5 entry, 8 threads",
            "bench_target_nop5",
            KUPROBE,
        )
        .on_threads(THREADS),
        Row::new(
            "userspace uprobe, JIT, 8 threads",
            "bench_target",
            user("bench_uprobe", false),
        )
        .on_threads(THREADS),
    ]
}

/// The index of the row `row` is compared with: the unprobed call with as many threads (`base`)
/// and the kernel's nop5 path with the same program and threads (`kernel`).
fn baselines(rows: &[Row], row: &Row) -> (usize, Option<usize>) {
    let base = rows
        .iter()
        .position(|r| matches!(r.probe, Probe::None) && r.threads == row.threads)
        .expect("an unprobed row for every thread count");
    let kernel = rows.iter().position(|r| {
        matches!(r.probe, Probe::Kernel { .. })
            && r.function == "bench_target_nop5"
            && r.threads == row.threads
            && r.object() == row.object()
    });
    (base, kernel)
}

/// Parses "ns_per_call MEDIAN MIN CALLS".
fn parse(out: &str) -> Result<(Measured, u64)> {
    let line = out
        .lines()
        .find(|l| l.starts_with("ns_per_call"))
        .with_context(|| format!("no result in {out:?}"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    ensure!(f.len() == 4, "bad result line {line:?}");
    Ok((
        Measured {
            median: f[1].parse()?,
            min: f[2].parse()?,
        },
        f[3].parse()?,
    ))
}

fn victim(row: &Row, iters: u64) -> Command {
    let mut command = Command::new(bench_victim_path());
    command.args([row.function, &iters.to_string()]);
    if row.threads > 1 {
        command.args(["5", &row.threads.to_string()]);
    }
    command
}

fn measure(row: &Row, iters: u64) -> Result<Measured> {
    match row.probe {
        Probe::None => Ok(parse(&Waiting::spawn(&mut victim(row, iters))?.go()?)?.0),
        Probe::Kernel { object, program } => {
            let bytes = std::fs::read(object_path(object))?;
            let mut ebpf = aya::EbpfLoader::new().load(&bytes)?;
            let waiting = Waiting::spawn(&mut victim(row, iters))?;
            kernel_attach(
                &mut ebpf,
                program,
                row.function,
                &bench_victim_path(),
                waiting.pid(),
            )?;
            let (measured, calls) = parse(&waiting.go()?)?;
            let hits = aya::maps::Array::<_, u64>::try_from(ebpf.map("hits").context("hits")?)?
                .get(&0, 0)?;
            ensure!(
                hits == calls,
                "{}: {hits} probe hits for {calls} calls",
                row.label
            );
            Ok(measured)
        }
        Probe::User {
            object,
            no_jit,
            synced,
        } => {
            let segment = format!("bench-{object}-{}", std::process::id());
            bpftime_runtime::loaded::unload_object(&segment);
            let options = LoadOptions {
                verify: true,
                vm: VmChoice::Ours,
                no_jit,
                ..LoadOptions::default()
            };
            let loaded = LoadedObject::load(&object_path(object), Some(&segment), options)
                .map_err(|e| anyhow::anyhow!("loading {object}: {e}"))?;
            // The forwarder `load` starts by default, on its own thread, for the whole row.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let forwarder = if synced {
                let (mut forwarder, _) =
                    bpftime_sync::Forwarder::start(&loaded.shm, Default::default())?;
                let stop = std::sync::Arc::clone(&stop);
                Some(std::thread::spawn(move || forwarder.run(&stop)))
            } else {
                None
            };
            let result = (|| {
                ensure!(loaded.refused.is_empty(), "refused: {:?}", loaded.refused);
                let mut command = victim(row, iters);
                let config = with_agent(&mut command, &segment)?;
                let run = (|| {
                    let (measured, calls) = parse(&Waiting::spawn(&mut command)?.go()?)?;
                    agent_status(&config)?;
                    let entries = loaded.shm.map("hits")?.iter();
                    let hits = entries.first().and_then(|e| e.value.sum_u64()).unwrap_or(0);
                    ensure!(
                        hits == calls,
                        "{}: {hits} probe hits for {calls} calls",
                        row.label
                    );
                    Ok(measured)
                })();
                remove_agent_files(&config);
                run
            })();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(f) = forwarder {
                f.join()
                    .map_err(|_| anyhow::anyhow!("the forwarder panicked"))?
                    .map_err(|e| anyhow::anyhow!("forwarding: {e}"))?;
            }
            let _ = loaded.unload();
            let _ = bpftime_kernel_bridge::mirror::remove_object_pins(&segment);
            result
        }
    }
}

fn main() -> Result<()> {
    // Without usable BPF this fails with the reason (or skips when told to), like the tests.
    if !bpftime_testutils::require_kernel("uprobe benchmark") {
        return Ok(());
    }
    let iters: u64 = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    // Rounds run every row once each, interleaved, and each row keeps its best round: the
    // shared vCPUs' load drifts by tens of percent between processes, and interleaving exposes
    // every row to the same drift.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rows = rows();
    let mut results: Vec<Option<Measured>> = rows.iter().map(|_| None).collect();
    // Every round's figure per row: the paired ratios below compare rows of one round.
    let mut per_round: Vec<Vec<f64>> = rows.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (row, best) in rows.iter().zip(results.iter_mut()) {
            // A single-stepped kernel uprobe costs ~10-20 us per call: a tenth of the calls
            // keeps the run short and the median as stable.
            let n = if row.function == "bench_target_plain"
                && matches!(row.probe, Probe::Kernel { .. })
            {
                iters / SLOW_DIVISOR
            } else {
                iters
            };
            let m = measure(row, n).with_context(|| row.label)?;
            eprintln!("round {}: {}: {:.1} ns", round + 1, row.label, m.median);
            per_round[rows
                .iter()
                .position(|r| std::ptr::eq(r, row))
                .expect("a row")]
            .push(m.median);
            if best.as_ref().is_none_or(|b| m.median < b.median) {
                *best = Some(m);
            }
        }
    }
    let results: Vec<Measured> = results.into_iter().flatten().collect();
    let nop5 = results[3].median;
    let base = results[0].median;
    println!(
        "\nns per call of a hooked function ({iters} calls x 5, median; min in parentheses; the \
         single-stepped row {} calls x 5; the 8-thread rows: each thread {iters} calls x 5, in \
         thread CPU time; best of {rounds} interleaved rounds per row; last column: the probe \
         cost (the call minus the unprobed call with as many threads) of the kernel's nop5 path \
         with the same program and threads / this row's)",
        iters / SLOW_DIVISOR
    );
    println!(
        "| {:<52} | {:>18} | {:>10} | {:>20} |",
        "probe", "ns/call (min)", "probe cost", "x cheaper than nop5"
    );
    println!("|{:-<54}|{:->20}|{:->12}|{:->22}|", "", "", "", "");
    for (row, m) in rows.iter().zip(&results) {
        let (base, kernel) = baselines(&rows, row);
        let base = results[base].median;
        let cost = m.median - base;
        // The ratio of probe costs: how many times cheaper than the kernel's fast path this
        // probe is (below 1: more expensive).
        let ratio = match (row.probe, kernel) {
            (Probe::None, _) | (_, None) => "-".to_string(),
            (_, Some(k)) => format!("{:.1}", (results[k].median - base) / cost.max(0.01)),
        };
        println!(
            "| {:<52} | {:>18} | {:>10} | {:>20} |",
            row.label,
            format!("{:.1} ({:.1})", m.median, m.min),
            format!("{cost:.1}"),
            ratio,
        );
    }
    // Paired per round: each round's kernel nop5 probe cost over the same round's JIT probe
    // cost, for the rows with a kernel baseline; the spread shows how much the shared vCPUs
    // moved the figures (the table's best-of-rounds ratio can pair a quiet kernel round with a
    // noisy one of ours, or the reverse).
    println!("\npaired per round (kernel nop5 probe cost / this row's, round by round; median):");
    for (i, row) in rows.iter().enumerate() {
        let (base, kernel) = baselines(&rows, row);
        let (Probe::User { .. }, Some(k)) = (row.probe, kernel) else {
            continue;
        };
        let ratios: Vec<f64> = (0..rounds)
            .map(|r| {
                let b = per_round[base][r];
                (per_round[k][r] - b) / (per_round[i][r] - b).max(0.01)
            })
            .collect();
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  {:<52} {} (median {:.1})",
            row.label,
            ratios
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            sorted[sorted.len() / 2]
        );
    }
    let jit = results[4].median;
    let ratio = (nop5 - base) / (jit - base).max(0.01);
    let cost = jit - base;
    // The README's budget: 20x below the kernel nop5 path measured on an idle machine (~268 ns),
    // i.e. about 13 ns per call; the ratio in this run moves with the load on the kernel rows.
    println!(
        "\ntarget: userspace uprobe (trivial array counter, JIT) at least 20x cheaper \
         than the kernel nop5 uprobe, i.e. about 13 ns per call.\nthis run: kernel nop5 \
         {nop5:.1} ns, userspace JIT {jit:.1} ns ({cost:.1} ns probe cost): {ratio:.1}x cheaper -> \
         {}; 13 ns budget -> {}",
        if ratio >= 20.0 { "met" } else { "NOT met" },
        if cost <= 13.0 { "met" } else { "NOT met" },
    );
    Ok(())
}
