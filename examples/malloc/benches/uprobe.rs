//! ns per call of a hooked function, every row measured in this one run: no probe, kernel
//! uprobes (aya) on three kinds of function entry, our userspace uprobe (agent preloaded, JIT and
//! interpreter), and the same for uretprobes. The program is the same trivial array counter
//! everywhere (bench/bench_uprobe.bpf.c, bench/bench_uretprobe.bpf.c).
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
    },
}

struct Row {
    label: &'static str,
    function: &'static str,
    probe: Probe,
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

fn rows() -> Vec<Row> {
    vec![
        Row {
            label: "no probe",
            function: "bench_target",
            probe: Probe::None,
        },
        Row {
            label: "kernel uprobe, ordinary entry (mov, single-stepped)",
            function: "bench_target_plain",
            probe: KUPROBE,
        },
        Row {
            label: "kernel uprobe, push %rbp entry (emulated)",
            function: "bench_target",
            probe: KUPROBE,
        },
        Row {
            label: "kernel uprobe, nop5 entry (fast path)",
            function: "bench_target_nop5",
            probe: KUPROBE,
        },
        Row {
            label: "userspace uprobe, JIT",
            function: "bench_target",
            probe: Probe::User {
                object: "bench_uprobe",
                no_jit: false,
            },
        },
        Row {
            label: "userspace uprobe, interpreter",
            function: "bench_target",
            probe: Probe::User {
                object: "bench_uprobe",
                no_jit: true,
            },
        },
        Row {
            label: "kernel uretprobe, push %rbp entry",
            function: "bench_target",
            probe: KURETPROBE,
        },
        Row {
            label: "kernel uretprobe, nop5 entry",
            function: "bench_target_nop5",
            probe: KURETPROBE,
        },
        Row {
            label: "userspace uretprobe, JIT",
            function: "bench_target",
            probe: Probe::User {
                object: "bench_uretprobe",
                no_jit: false,
            },
        },
        Row {
            label: "userspace uretprobe, interpreter",
            function: "bench_target",
            probe: Probe::User {
                object: "bench_uretprobe",
                no_jit: true,
            },
        },
    ]
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

fn victim(function: &str, iters: u64) -> Command {
    let mut command = Command::new(bench_victim_path());
    command.args([function, &iters.to_string()]);
    command
}

fn measure(row: &Row, iters: u64) -> Result<Measured> {
    match row.probe {
        Probe::None => Ok(parse(&Waiting::spawn(&mut victim(row.function, iters))?.go()?)?.0),
        Probe::Kernel { object, program } => {
            let bytes = std::fs::read(object_path(object))?;
            let mut ebpf = aya::EbpfLoader::new().load(&bytes)?;
            let waiting = Waiting::spawn(&mut victim(row.function, iters))?;
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
        Probe::User { object, no_jit } => {
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
            let result = (|| {
                ensure!(loaded.refused.is_empty(), "refused: {:?}", loaded.refused);
                let mut command = victim(row.function, iters);
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
            let _ = loaded.unload();
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
            if best.as_ref().is_none_or(|b| m.median < b.median) {
                *best = Some(m);
            }
        }
    }
    let results: Vec<Measured> = results.into_iter().flatten().collect();
    let base = results[0].median;
    let nop5 = results[3].median;
    let nop5_ret = results[7].median;
    println!(
        "\nns per call of a hooked function ({iters} calls x 5, median; min in parentheses; the \
         single-stepped row {} calls x 5; best of {rounds} interleaved rounds per row; same \
         array-counter program in every probed row; last column: the probe cost of the kernel's \
         nop5 path of the same kind (uprobe rows: the nop5 uprobe, uretprobe rows: the nop5 \
         uretprobe) / this row's)",
        iters / SLOW_DIVISOR
    );
    println!(
        "| {:<52} | {:>18} | {:>10} | {:>20} |",
        "probe", "ns/call (min)", "probe cost", "x cheaper than nop5"
    );
    println!("|{:-<54}|{:->20}|{:->12}|{:->22}|", "", "", "", "");
    for (row, m) in rows.iter().zip(&results) {
        let cost = m.median - base;
        // The ratio of probe costs (call minus the unprobed call): how many times cheaper than
        // the kernel's fast path this probe is (below 1: more expensive).
        let kernel_nop5 = if row.label.contains("uretprobe") {
            nop5_ret
        } else {
            nop5
        };
        let ratio = match row.probe {
            Probe::None => "-".to_string(),
            _ => format!("{:.1}", (kernel_nop5 - base) / cost.max(0.01)),
        };
        println!(
            "| {:<52} | {:>18} | {:>10} | {:>20} |",
            row.label,
            format!("{:.1} ({:.1})", m.median, m.min),
            format!("{cost:.1}"),
            ratio,
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
